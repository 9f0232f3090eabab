"""Trainers: one step of each rule against a hand-computed update, schedules, resume, NaN guard."""
import io
import math
import os

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fastcurv.train import (
    CheckpointError, DivergenceError, NonFiniteError, RULES, StepHalving, fit, initialize, load_checkpoint, make_rule, per_example_loss,
    save_checkpoint, step_halving_lr,
)

LR = 0.1


# ---------------------------------------------------------------------------------------------
# Hand-computed updates on a tiny float64 model, written with functional_call over a flat vector.

def tiny_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tiny_batch(n=8):
    gen = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflatten(model, theta):
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def mean_loss(model, theta, x, y, loss="cross_entropy"):
    return per_example_loss(loss)(functional_call(model, unflatten(model, theta), (x,)), y).mean()


def grad_of(fn, theta, create_graph=False):
    theta = theta.detach().requires_grad_(True) if not create_graph else theta
    (g,) = torch.autograd.grad(fn(theta), theta, create_graph=create_graph)
    return g


def one_step(rule, epoch=0, loss="cross_entropy", **hyper):
    model = tiny_model()
    x, y = tiny_batch()
    theta0 = flat(model)
    r = make_rule(rule, **hyper).bind(model, per_example_loss(loss), epochs=4)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    r.step(x, y, opt, epoch)
    return model, theta0, x, y, flat(model)


def test_sgd_step():
    model, theta0, x, y, theta1 = one_step("sgd")
    g = grad_of(lambda t: mean_loss(model, t, x, y), theta0)
    torch.testing.assert_close(theta1, theta0 - LR * g)


@pytest.mark.parametrize("rule", ["l2", "l2_stopped"])
def test_l2_step(rule):
    model, theta0, x, y, theta1 = one_step(rule, lam=0.3)
    g = grad_of(lambda t: mean_loss(model, t, x, y), theta0)
    torch.testing.assert_close(theta1, theta0 - LR * (g + 0.3 * theta0))


def test_l2_stopped_is_sgd_from_tau():
    model, theta0, x, y, theta1 = one_step("l2_stopped", epoch=2, lam=0.3, tau=2)
    g = grad_of(lambda t: mean_loss(model, t, x, y), theta0)
    torch.testing.assert_close(theta1, theta0 - LR * g)


def hessian_times_theta(model, theta0, x, y):
    H = torch.autograd.functional.hessian(lambda t: mean_loss(model, t, x, y), theta0)
    return H @ theta0


def selective_mask(model, d, omega):
    masks, i = [], 0
    for p in model.parameters():
        block = d[i:i + p.numel()].abs()
        masks.append(block < omega * block.max())
        i += p.numel()
    return torch.cat(masks)


def test_metric_step():
    model, theta0, x, y, theta1 = one_step("metric", lam=0.5)
    g = grad_of(lambda t: mean_loss(model, t, x, y), theta0)
    d = hessian_times_theta(model, theta0, x, y)
    torch.testing.assert_close(theta1, theta0 - LR * (g + 0.5 * d))


@pytest.mark.parametrize("rule,epoch", [("selective_l2", 0), ("l2_stopped_selective", 3)])
def test_selective_l2_step(rule, epoch):
    hyper = {"lam": 0.5, "omega": 0.3}
    if rule == "l2_stopped_selective":  # selective phase: rate selective_lam; lam is the L2 phase's
        hyper = {"lam": 9.0, "selective_lam": 0.5, "omega": 0.3, "tau": 3}
    model, theta0, x, y, theta1 = one_step(rule, epoch=epoch, **hyper)
    g = grad_of(lambda t: mean_loss(model, t, x, y), theta0)
    mask = selective_mask(model, hessian_times_theta(model, theta0, x, y), 0.3)
    assert 0 < int(mask.sum()) < mask.numel()  # the test exercises both branches
    torch.testing.assert_close(theta1, theta0 - LR * (g + 0.5 * mask * theta0))


def test_l2_stopped_selective_is_l2_before_tau():
    model, theta0, x, y, theta1 = one_step("l2_stopped_selective", epoch=2, lam=0.5, selective_lam=9.0,
                                           omega=0.3, tau=3)
    g = grad_of(lambda t: mean_loss(model, t, x, y), theta0)
    torch.testing.assert_close(theta1, theta0 - LR * (g + 0.5 * theta0))


@pytest.mark.parametrize("loss", ["cross_entropy", "hinge"])
def test_subbatch_step(loss):
    alpha, beta, m = 1e-2, 3.0, 4
    model, theta0, x, y, theta1 = one_step("subbatch", loss=loss, alpha=alpha, beta=beta, num_subbatches=m)
    xs, ys = [x[k::m] for k in range(m)], [y[k::m] for k in range(m)]  # sub-batch k: examples k, k+M, ...

    def objective(t):
        reg = 0.0
        for xk, yk in zip(xs, ys):  # Algorithm 1, g_k held constant
            gk = grad_of(lambda s: mean_loss(model, s, xk, yk, loss), theta0)
            reg = reg + mean_loss(model, t, xk, yk, loss) - mean_loss(model, t - alpha * gk, xk, yk, loss)
        return mean_loss(model, t, x, y, loss) + beta * reg / m

    torch.testing.assert_close(theta1, theta0 - LR * grad_of(objective, theta0))


def test_curvature_step():
    pytest.importorskip("fastcurv.regularizers.curvature", reason="Curvature regularizer not landed yet")
    alpha = 0.7
    model, theta0, x, y, theta1 = one_step("curvature", alpha=alpha)

    def objective(t):
        sq = []
        for i in range(x.shape[0]):  # ||grad l_i||^2, differentiated through
            gi = grad_of(lambda s: mean_loss(model, s, x[i:i + 1], y[i:i + 1]), t, create_graph=True)
            sq.append(gi.pow(2).sum())
        return mean_loss(model, t, x, y) + alpha * torch.stack(sq).mean()

    torch.testing.assert_close(theta1, theta0 - LR * grad_of(objective, theta0.clone().requires_grad_(True)))


def test_fisher_step_batch_mode():
    gamma, beta = 0.4, 0.2
    model, theta0, x, y, theta1 = one_step("fisher", loss="hinge", gamma=gamma, beta=beta)
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[:2])  # the classifier's weight: the 3rd tensor
    w_slice = slice(start, start + sizes[2])

    # F = |g g^T| min-max normalized, built as the explicit P x P matrix (paper 000's appendix).
    g = grad_of(lambda t: mean_loss(model, t, x, y, "hinge"), theta0)[w_slice]
    Fm = (g[:, None] * g[None, :]).abs()
    Fn = (Fm - Fm.min()) / (Fm.max() - Fm.min() + 1e-8)

    def objective(t):
        w = t[w_slice]
        return mean_loss(model, t, x, y, "hinge") + gamma * w @ Fn @ w + beta * w.pow(2).sum()

    torch.testing.assert_close(theta1, theta0 - LR * grad_of(objective, theta0))


def test_rule_inactive_before_first_drop_is_sgd():
    model = tiny_model()
    x, y = tiny_batch()
    theta0 = flat(model)
    r = make_rule("l2", lam=0.3).bind(model, per_example_loss("cross_entropy"), epochs=4)
    r.step(x, y, torch.optim.SGD(model.parameters(), lr=LR), 0, active=False)
    g = grad_of(lambda t: mean_loss(model, t, x, y), theta0)
    torch.testing.assert_close(flat(model), theta0 - LR * g)


def test_bad_rule_names_and_hyperparameters():
    with pytest.raises(ValueError, match="valid rules: sgd, l2, curvature"):
        make_rule("adamw")
    with pytest.raises(ValueError, match="unknown hyperparameter.*'lr'.*valid: lam"):
        make_rule("l2", lr=0.1)


# ---------------------------------------------------------------------------------------------
def test_step_halving_formula():
    lr0, drop = 0.8, 3
    got = [step_halving_lr(t, lr0, drop) for t in range(8)]
    expected = [lr0 * 0.5 ** math.ceil(t / drop) for t in range(8)]
    assert got == expected
    assert got[:5] == [0.8, 0.4, 0.4, 0.4, 0.2]
    assert StepHalving(lr0, drop)(7) == expected[7] and StepHalving(lr0, drop).first_drop_epoch() == 1
    with pytest.raises(ValueError, match="lr_drop"):
        StepHalving(lr0, 0)


def xord_run(tmp_path, name, **kw):
    from fastcurv.data import default_model, load

    data = load("xord", seed=0)
    torch.manual_seed(0)
    model = default_model(data).double()
    data.x_train, data.x_test = data.x_train.double(), data.x_test.double()
    args = dict(rule="l2_stopped", rule_options={"lam": 1e-2, "tau": 2}, lr=0.2, momentum=0.9, epochs=5,
                batch_size=4, schedule=2, seed=3, track_eigenvalue=True, progress=False,
                checkpoint=os.path.join(tmp_path, name))
    args.update(kw)
    return model, fit(model, data, **args)


def test_history_columns_and_schedule(tmp_path):
    model, history = xord_run(tmp_path, "a.pt", epochs=3)
    assert len(history) == 3
    assert [r["lr"] for r in history] == [0.2, 0.1, 0.1]
    for key in ("train_loss", "test_loss", "gap", "train_accuracy", "test_accuracy", "param_norm",
                "time_per_step", "top_eigenvalue"):
        assert all(math.isfinite(v) for v in history.column(key)), key
    r = history.last
    assert r["gap"] == pytest.approx(r["test_loss"] - r["train_loss"])
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
    assert r["param_norm"] == pytest.approx(norm)


def test_resume_matches_uninterrupted_run(tmp_path):
    full_model, full = xord_run(tmp_path, "full.pt")
    _, part = xord_run(tmp_path, "part.pt", stop_after=2)
    assert len(part) == 2
    resumed_model, resumed = xord_run(tmp_path, "part.pt", resume=True)
    assert len(resumed) == 5
    assert resumed.without_timing() == full.without_timing()
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="differs from the one that wrote it.*lr"):
        xord_run(tmp_path, "part.pt", resume=True, lr=0.3)


def test_regularize_after_first_drop(tmp_path):
    _, history = xord_run(tmp_path, "d.pt", epochs=3, regularize_after_first_drop=True, track_eigenvalue=False)
    assert history.column("regularizing") == [False, True, True]
    with pytest.raises(ValueError, match="needs a schedule"):
        xord_run(tmp_path, "e.pt", schedule=None, regularize_after_first_drop=True)


def test_nan_guard_on_loss(tmp_path):
    x = torch.randn(16, 3, dtype=torch.float64)
    x[5, 1] = float("nan")
    y = torch.randint(0, 3, (16,))
    with pytest.raises(NonFiniteError, match=r"rule 'sgd'.*nan at epoch 0.*step"):
        fit(tiny_model(), (x, y), (x[:4], y[:4]), epochs=2, batch_size=16, progress=False)


def test_nan_guard_on_parameters():
    x = torch.rand(16, 3, dtype=torch.float64) * 1e3
    y = torch.randn(16, 3, dtype=torch.float64) * 1e3
    model = nn.Linear(3, 3).double()
    # float64 parameters pass 1e308 step by step; the loss guard (inf loss) or the parameter guard stops it.
    with pytest.raises(NonFiniteError, match="(parameters became nan/inf|the training loss is inf) at epoch"):
        fit(model, (x, y), (x, y), lr=1e3, epochs=50, batch_size=16, progress=False, divergence_factor=None)
    # With the divergence guard on (the default) it stops at once, long before overflow.
    with pytest.raises(DivergenceError, match="after epoch 0 is more than 100x"):
        fit(nn.Linear(3, 3).double(), (x, y), (x, y), lr=1e3, epochs=50, batch_size=16, progress=False)


def test_divergence_guard_stops_finite_garbage(tmp_path):
    """A tanh model at lr 1e12 stays finite (tanh saturates) but its loss explodes: stop, keep no checkpoint."""
    from fastcurv.data import default_model, load

    digits = load("digits", seed=0)
    data = ((digits.x_train[:256], digits.y_train[:256]), (digits.x_test[:64], digits.y_test[:64]))
    torch.manual_seed(0)
    ckpt = str(tmp_path / "diverged.pt")
    with pytest.raises(DivergenceError, match=r"rule 'sgd': the training loss .* after epoch 0 is more than 100x its "
                                              r"best so far .* above the untrained model's .*: the run diverged"):
        fit(default_model(digits), *data, lr=1e12, epochs=3, checkpoint=ckpt, progress=False)
    assert not os.path.exists(ckpt)
    torch.manual_seed(0)  # the check can be turned off
    history = fit(default_model(digits), *data, lr=1e12, epochs=1, progress=False, divergence_factor=None)
    assert history[0]["train_loss"] > 1e6
    with pytest.raises(ValueError, match="divergence_factor must be finite and > 1"):
        fit(default_model(digits), *data, epochs=1, progress=False, divergence_factor=0.5)


def test_divergence_guard_ignores_rises_below_the_untrained_loss():
    from fastcurv.train.loop import _check_divergence

    _check_divergence(0.5, best=0.0, untrained=0.69, factor=100.0, rule="fisher", epoch=3)  # hinge fitted to 0, then not
    _check_divergence(1e9, best=1e-3, untrained=2.3, factor=None, rule="sgd", epoch=3)  # off
    with pytest.raises(DivergenceError):
        _check_divergence(0.7, best=0.0, untrained=0.69, factor=100.0, rule="fisher", epoch=3)


def test_parameter_guard_names_only_real_nan_inf():
    """Finite parameters whose float32 sum overflows were reported as nan/inf ("(sum overflow)")."""
    from fastcurv.train.loop import _check_finite_parameters

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite; the sum of four is not
    _check_finite_parameters(model, "sgd", 2, 5)
    with torch.no_grad():
        model[1].bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"parameters became nan/inf at epoch 2, step 5 \(first bad: 1.bias\)"):
        _check_finite_parameters(model, "sgd", 2, 5)


@pytest.mark.parametrize("rule", RULES)
def test_normal_training_never_trips_the_divergence_guard(rule, tmp_path):
    from fastcurv.data import default_model, load

    data = load("xord", seed=0)
    torch.manual_seed(0)
    fit(default_model(data), data, rule=rule, lr=0.05, momentum=0.9, epochs=4, batch_size=8, progress=False)


def test_bad_input_errors():
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="valid rules"):
        fit(tiny_model().float(), (x, y), (x, y), rule="nope", progress=False)
    with pytest.raises(ValueError, match="x has 8 examples.*y has 7"):
        fit(tiny_model().float(), (x, y[:7]), (x, y), progress=False)
    with pytest.raises(ValueError, match="test_data is required"):
        fit(tiny_model().float(), (x, y), progress=False)
    with pytest.raises(ValueError, match="unknown loss"):
        fit(tiny_model().float(), (x, y), (x, y), loss="l1", progress=False)


def test_initialize_regimes():
    model = tiny_model()
    initialize(model, "uniform", 0.5, generator=torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0)
        else:
            assert p.min() >= 0 and p.max() <= 0.5
    big = nn.Linear(400, 300).double()
    initialize(big, "glorot", 4.0, generator=torch.Generator().manual_seed(0))
    assert big.weight.std().item() == pytest.approx(math.sqrt(4.0 * 2 / 700), rel=0.02)
    with pytest.raises(ValueError, match="valid: default, uniform, glorot"):
        initialize(model, "he")


def test_checkpoint_is_atomic_and_checked(tmp_path):
    path = os.path.join(tmp_path, "c.pt")
    save_checkpoint(path, {"epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3
    # No temp file left behind: only the checkpoint and its lock marker (fastcurv._io.exclusive keeps the
    # empty .c.pt.lock on purpose), and the lock is released once the save returns.
    assert sorted(os.listdir(tmp_path)) == [".c.pt.lock", "c.pt"]
    if fcntl is not None:
        fd = os.open(os.path.join(tmp_path, ".c.pt.lock"), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the save still held it
        finally:
            os.close(fd)
    torch.save({"x": 1}, os.path.join(tmp_path, "other.pt"))
    with pytest.raises(ValueError, match="not a fastcurv checkpoint"):
        load_checkpoint(os.path.join(tmp_path, "other.pt"))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(os.path.join(tmp_path, "missing.pt"))


def _damaged_checkpoints(folder, good_path):
    """(name, path) of every kind of damaged checkpoint: each must be refused with CheckpointError."""
    raw = open(good_path, "rb").read()
    cases = {"empty": b"", "truncated": raw[: len(raw) // 2], "garbage": bytes(range(256)) * 40}
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    cases["flipped byte"] = bytes(flipped)
    paths = []
    for name, content in cases.items():
        path = os.path.join(folder, name.replace(" ", "_") + ".pt")
        with open(path, "wb") as handle:
            handle.write(content)
        paths.append((name, path))
    # A weight overwritten inside a well-formed file (the envelope re-saved, the checksum left as it was).
    envelope = torch.load(good_path, weights_only=True)
    state = torch.load(io.BytesIO(envelope["payload"]), weights_only=False)
    first = next(iter(state["model_state"]))
    state["model_state"][first].fill_(1e30)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = os.path.join(folder, "overwritten_weight.pt")
    torch.save({**envelope, "payload": buffer.getvalue()}, path)
    paths.append(("overwritten weight", path))
    os.mkdir(os.path.join(folder, "a_directory.pt"))
    paths.append(("directory", os.path.join(folder, "a_directory.pt")))
    return paths


def test_damaged_checkpoints_are_refused_clearly(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    train = (torch.randn(16, 2), torch.randint(0, 2, (16,)))
    good = str(tmp_path / "good.pt")
    fit(model, train, train, epochs=1, checkpoint=good, progress=False)
    expected = {"empty": "is empty", "truncated": "cannot be read: truncated, corrupted",
                "garbage": "cannot be read", "flipped byte": "cannot be read|is corrupted",
                "overwritten weight": "is corrupted: its contents do not match the SHA-256 checksum",
                "directory": "is a directory"}
    for name, path in _damaged_checkpoints(str(tmp_path), good):
        with pytest.raises(CheckpointError, match=expected[name]):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match=expected[name]):  # from fit(resume=True) too, before training
            fit(model, train, train, epochs=2, checkpoint=path, resume=True, progress=False)


def test_orphan_temp_files_of_a_killed_save_are_removed(tmp_path):
    """A dead writer's temp file of this checkpoint is removed; a live writer's, and another
    checkpoint's, are kept (deleting a live one killed a concurrent save)."""
    import subprocess
    import sys

    from fastcurv._io import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = str(tmp_path / "run.pt")
        orphan = tmp_path / f".run.pt.tmp-{_HOST}-{dead.pid}-abc123"  # what a kill during save_checkpoint(path) leaves
        orphan.write_bytes(b"half a checkpoint")
        live = tmp_path / f".run.pt.tmp-{_HOST}-{alive.pid}-abc123"  # a save in progress in another process
        live.write_bytes(b"x")
        other = tmp_path / f".other.pt.tmp-{_HOST}-{dead.pid}-abc123"  # another checkpoint's: not ours to judge
        other.write_bytes(b"x")
        save_checkpoint(path, {"epoch": 1})
        assert sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock")) == sorted([other.name, live.name, "run.pt"])
    finally:
        alive.kill()
        alive.wait()


def test_all_rules_listed():
    assert RULES == ("sgd", "l2", "curvature", "fisher", "subbatch", "metric", "selective_l2",
                     "l2_stopped", "l2_stopped_selective", "sam", "gnp", "looksam")


def test_fisher_trace_tracking(tmp_path):
    pytest.importorskip("fastcurv.capture", reason="fastcurv.capture (used by metrics.fisher_trace) not landed yet")
    from fastcurv.metrics import fisher_trace

    model, history = xord_run(tmp_path, "f.pt", epochs=1, track_eigenvalue=False, track_fisher_trace=True)
    from fastcurv.data import load

    data = load("xord", seed=0)
    model.eval()
    assert history.last["fisher_trace"] == pytest.approx(fisher_trace(model, data.x_train.double(), data.y_train))


def test_default_loss_per_task_and_rule():
    from fastcurv.train.loop import resolve_loss

    assert resolve_loss("auto", "classification", "sgd") == "cross_entropy"
    assert resolve_loss("auto", "classification", "fisher") == "hinge"
    assert resolve_loss("auto", "regression", "fisher") == "mse"
    with pytest.raises(ValueError, match="regression task takes loss 'mse'"):
        resolve_loss("cross_entropy", "regression", "sgd")




def test_fit_with_model_compiled_in_place_matches_eager():
    """model.compile() (in place) works with every part of fit, curvature rule and Hessian tracking included:
    dynamo runs the hooked and double-backward parts eagerly, so the numbers are the eager ones."""
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    histories = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        if compiled:
            model.compile()
        history = fit(model, (x, y), (x, y), rule="curvature", epochs=2, batch_size=16, track_eigenvalue=True,
                      progress=False)
        histories.append([{k: v for k, v in r.items() if k not in ("time_per_step", "epoch_time", "wall_time")} for r in history])
    assert histories[0] == histories[1]


def test_torch_compile_wrapper_is_refused_clearly():
    from fastcurv.curvature import Hessian

    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    wrapped = torch.compile(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)))
    with pytest.raises(ValueError, match=r"fit: the model is a torch.compile wrapper .* Call model.compile\(\) instead"):
        fit(wrapped, (x, y), (x, y), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"Hessian: the model is a torch.compile wrapper"):
        Hessian(wrapped, nn.functional.cross_entropy, (x, y))
