"""The SAM family as learning rules (sam, ASAM, gnp, looksam) and the curvature rule's cheap estimators
(subsample=, every=): each rule's update against a hand-written float64 reference on a flat parameter
vector (torch.func.functional_call), over several steps where the rule carries state."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from fastcurv.train import fit, make_rule, per_example_loss
from test_train import flat, unflatten  # the flat-parameter-vector helpers of the rules' references

LR = 0.1


def tiny_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def batches(n_steps, n=8):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(n_steps)]


def loss_at(model, theta, x, y):
    return per_example_loss("cross_entropy")(functional_call(model, unflatten(model, theta), (x,)), y).mean()


def grad_at(model, theta, x, y):
    theta = theta.detach().requires_grad_(True)
    return torch.autograd.grad(loss_at(model, theta, x, y), theta)[0]


def run_rule(rule, steps, **hyper):
    """theta after each of ``steps`` SGD steps of ``rule`` (lr LR, no momentum)."""
    model = tiny_model()
    r = make_rule(rule, **hyper).bind(model, per_example_loss("cross_entropy"), epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    thetas = [flat(model)]
    for x, y in steps:
        r.step(x, y, opt, 0)
        thetas.append(flat(model))
    return model, thetas


def weight_mask(model):
    """1 on the entries of parameters named 'weight' (ASAM's T = |w| + eta there), 0 on biases."""
    return torch.cat([torch.full((p.numel(),), float(n.endswith("weight")), dtype=torch.float64)
                      for n, p in model.named_parameters()])


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_and_asam_step(adaptive):
    rho, eta = (0.05, 0.01) if not adaptive else (0.5, 0.01)
    steps = batches(3)
    model, thetas = run_rule("sam", steps, rho=rho, adaptive=adaptive, eta=eta)
    mask = weight_mask(model)
    theta = thetas[0]
    for (x, y), got in zip(steps, thetas[1:]):
        g = grad_at(model, theta, x, y)
        if adaptive:  # Kwon et al. 2021: e = rho T^2 g / ||T g||, T = |w| + eta on weights, 1 on biases
            t = torch.where(mask.bool(), theta.abs() + eta, torch.ones_like(theta))
            e = rho * t * t * g / torch.linalg.vector_norm(t * g)
        else:  # Foret et al. 2021: e = rho g / ||g||
            e = rho * g / torch.linalg.vector_norm(g)
        theta = theta - LR * grad_at(model, theta + e, x, y)
        torch.testing.assert_close(got, theta)


def test_gnp_step():
    r, alpha = 0.05, 0.8
    steps = batches(3)
    model, thetas = run_rule("gnp", steps, r=r, alpha=alpha)
    theta = thetas[0]
    for (x, y), got in zip(steps, thetas[1:]):
        g = grad_at(model, theta, x, y)
        shifted = grad_at(model, theta + r * g / torch.linalg.vector_norm(g), x, y)
        theta = theta - LR * ((1 - alpha) * g + alpha * shifted)
        torch.testing.assert_close(got, theta)


def test_looksam_steps():
    rho, k, alpha = 0.05, 3, 0.7
    steps = batches(2 * k + 2)
    model, thetas = run_rule("looksam", steps, rho=rho, k=k, alpha=alpha)
    theta, g_v = thetas[0], None
    for t, ((x, y), got) in enumerate(zip(steps, thetas[1:])):
        g = grad_at(model, theta, x, y)
        if t % k == 0:  # Liu et al. 2022, Algorithm 1
            g_s = grad_at(model, theta + rho * g / torch.linalg.vector_norm(g), x, y)
            g_v = g_s - (g_s @ g) / (g @ g) * g
            direction = g_s
        else:
            direction = g + alpha * torch.linalg.vector_norm(g) / torch.linalg.vector_norm(g_v) * g_v
        theta = theta - LR * direction
        torch.testing.assert_close(got, theta)


@pytest.mark.parametrize("rule", ["sam", "gnp", "looksam"])
def test_two_pass_rules_restore_the_weights_and_leave_the_direction(rule):
    model = tiny_model()
    (x, y), = batches(1)
    r = make_rule(rule).bind(model, per_example_loss("cross_entropy"), epochs=1)
    before = flat(model)
    loss = r.gradient(x, y)
    assert torch.equal(flat(model), before)
    torch.testing.assert_close(loss, loss_at(model, before, x, y))
    assert all(p.grad is not None for p in model.parameters())


def test_looksam_bad_k():
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        make_rule("looksam", k=0).bind(tiny_model(), per_example_loss("cross_entropy"), epochs=1)


def penalty_grad(model, theta, x, y, alpha):
    """alpha * mean_i ||grad l_i||^2 differentiated through: the float64 reference for rule curvature."""
    theta = theta.detach().requires_grad_(True)
    sq = []
    for i in range(x.shape[0]):
        gi = torch.autograd.grad(loss_at(model, theta, x[i:i + 1], y[i:i + 1]), theta, create_graph=True)[0]
        sq.append(gi.square().sum())
    return torch.autograd.grad(alpha * torch.stack(sq).mean(), theta)[0]


def test_curvature_rule_subsample_step():
    alpha, b = 0.7, 3
    steps = batches(2)
    torch.manual_seed(5)
    model, thetas = None, None
    model = tiny_model()
    r = make_rule("curvature", alpha=alpha, subsample=b).bind(model, per_example_loss("cross_entropy"), epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    torch.manual_seed(5)
    theta = flat(model)
    for x, y in steps:
        r.step(x, y, opt, 0)
        subset = r.reg.last_subset
        assert subset.shape == (b,)
        theta = theta - LR * (grad_at(model, theta, x, y) + penalty_grad(model, theta, x[subset], y[subset], alpha))
        torch.testing.assert_close(flat(model), theta)


def test_curvature_rule_every_k_steps():
    alpha, k = 0.7, 2
    steps = batches(5)
    model, thetas = run_rule("curvature", steps, alpha=alpha, every=k)
    theta, stored = thetas[0], None
    for t, ((x, y), got) in enumerate(zip(steps, thetas[1:])):
        if t % k == 0:
            stored = penalty_grad(model, theta, x, y, alpha)
        theta = theta - LR * (grad_at(model, theta, x, y) + stored)
        torch.testing.assert_close(got, theta)


@pytest.mark.parametrize("rule,hyper", [("looksam", {"k": 3}), ("curvature", {"every": 3})])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, rule, hyper):
    """The reused direction (LookSAM's g_v, the curvature rule's stored gradient) survives a checkpoint."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (40,), generator=gen)
    kwargs = dict(rule=rule, rule_options=hyper, epochs=3, batch_size=16, lr=0.1, progress=False)
    whole = tiny_model()
    fit(whole, (x, y), (x, y), **kwargs)
    ckpt = tmp_path / "run.pt"
    part = tiny_model()
    fit(part, (x, y), (x, y), checkpoint=ckpt, stop_after=2, **kwargs)  # 2 steps per epoch: mid-cycle
    resumed = tiny_model()
    fit(resumed, (x, y), (x, y), checkpoint=ckpt, resume=True, **kwargs)
    torch.testing.assert_close(flat(resumed), flat(whole), rtol=0, atol=0)


def test_fit_time_budget_stops_on_time_and_records_wall_time_and_steps():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (64,), generator=gen)
    history = fit(tiny_model(), (x, y), (x, y), rule="sgd", epochs=10**6, batch_size=8, time_budget=0.3,
                  progress=False).to_list()
    last = history[-1]
    assert last["wall_time"] >= 0.3 and last["wall_time"] < 5.0  # stops after the step that crosses it
    assert last["steps"] == sum(round(r["epoch_time"] / r["time_per_step"]) for r in history)
    assert [r["steps"] for r in history] == sorted(r["steps"] for r in history)
    with pytest.raises(ValueError, match="time_budget must be finite and > 0"):
        fit(tiny_model(), (x, y), (x, y), time_budget=0.0, progress=False)


def test_compare_time_budget_writes_table_json_and_time_plot(tmp_path, capsys):
    import json

    from fastcurv.cli import accuracy_at_times, main

    out = tmp_path / "cmp"
    assert main(["compare", "--dataset", "digits", "--rules", "sgd,sam,looksam,curvature", "--set", "curvature.every=2",
                 "--time-budget", "0.4", "--seeds", "2", "--no-eigenvalue", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "equal wall time: 0.4 s" in printed and "steps taken: sgd" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["time_budget"] == 0.4 and "device" in results["environment"]
    for rule in ("sgd", "sam", "looksam", "curvature"):
        for run in results["rules"][rule]["runs"]:
            assert run["train_seconds"] >= 0.4 and run["steps_taken"] >= 1
            assert run["time_per_step"] == pytest.approx(run["train_seconds"] / run["steps_taken"])
    pytest.importorskip("matplotlib")
    assert (out / "test_accuracy_vs_time.png").exists()
    history = [{"wall_time": 1.0, "acc": 0.5}, {"wall_time": 2.0, "acc": 0.7}]
    assert accuracy_at_times(history, [0.5, 1.0, 1.5, 2.5], "acc")[1:] == [0.5, 0.5, 0.7]
