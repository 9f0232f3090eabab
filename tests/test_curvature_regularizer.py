"""fastcurv.regularizers.Curvature: gradients of ``mean l + alpha mean ||grad l_i||^2`` against an
exact micro-batch loop (itself checked against central finite differences), in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fastcurv.regularizers import Curvature

pytestmark = [pytest.mark.filterwarnings("ignore:fastcurv._C is not available"), pytest.mark.usefixtures("float64_default")]

B = 4
ALPHA = 0.3  # large enough that the penalty's gradient is a sizeable part of the total


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def squared_error(out, y):
    return 0.5 * (out - y).square().flatten(1).sum(1)


# ---------------------------------------------------------------- models
def tanh_mlp():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    return model, torch.randn(B, 3), torch.randint(0, 3, (B,)), ce


def cnn_eval_batchnorm():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(model[1].weight, 0.5, 1.5)
    nn.init.uniform_(model[1].bias, -0.3, 0.3)
    model.eval()
    return model, torch.randn(B, 2, 3, 3), torch.randint(0, 3, (B,)), ce


class EmbedSeq(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4, padding_idx=0)
        self.proj = nn.Linear(4, 2)

    def forward(self, tokens):
        return self.proj(torch.tanh(self.embed(tokens)))


def embedding_seq_linear():
    tokens = torch.tensor([[1, 2, 2, 0], [0, 3, 3, 3], [5, 4, 1, 1], [2, 0, 5, 2]])
    return EmbedSeq(), tokens, torch.randn(B, 4, 2), squared_error


def layernorm_model():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    nn.init.uniform_(model[1].weight, 0.5, 1.5)
    nn.init.uniform_(model[1].bias, -0.3, 0.3)
    return model, torch.randn(B, 3, 4), torch.randn(B, 3, 3), squared_error


MODELS = [tanh_mlp, cnn_eval_batchnorm, embedding_seq_linear, layernorm_model]


# ---------------------------------------------------------------- references
def objective_by_loop(model, x, y, loss_fn, alpha, create_graph=True):
    """mean_i l_i + alpha mean_i ||grad l_i||^2, one example per micro-batch (the literal definition)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for i in range(x.shape[0]):
        l_i = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        g_i = torch.autograd.grad(l_i, params, create_graph=create_graph)
        total = total + (l_i + alpha * sum(g.square().sum() for g in g_i)) / x.shape[0]
    return total


def gradient_by_loop(model, x, y, loss_fn, alpha):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(objective_by_loop(model, x, y, loss_fn, alpha), params)


def gradient_by_torch_func(model, x, y, loss_fn, alpha):
    """The same gradient with per-example gradients from vmap(grad) under an outer autograd.grad."""
    params = dict(model.named_parameters())

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    sqnorms = sum(g.flatten(1).square().sum(1) for g in per_example.values())
    objective = loss_fn(model(x), y).mean() + alpha * sqnorms.mean()
    return torch.autograd.grad(objective, list(params.values()))


def gradient_by_fastcurv(model, x, y, loss_fn, alpha):
    reg = Curvature(model, alpha)
    model.zero_grad(set_to_none=True)
    with reg.track():
        out = model(x)
    per_example = loss_fn(out, y)
    (per_example.mean() + reg(per_example)).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], reg


# ---------------------------------------------------------------- tests
def test_loop_reference_matches_central_finite_differences():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(3, 2), torch.randint(0, 2, (3,))
    analytic = torch.cat([g.flatten() for g in gradient_by_loop(model, x, y, ce, ALPHA)])
    eps = 1e-5
    numeric = []
    for p in model.parameters():
        flat = p.data.view(-1)
        for k in range(flat.numel()):
            orig = flat[k].item()
            flat[k] = orig + eps
            plus = objective_by_loop(model, x, y, ce, ALPHA, create_graph=False).item()
            flat[k] = orig - eps
            minus = objective_by_loop(model, x, y, ce, ALPHA, create_graph=False).item()
            flat[k] = orig
            numeric.append((plus - minus) / (2 * eps))
    torch.testing.assert_close(analytic, torch.tensor(numeric), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__)
def test_gradient_matches_micro_batch_loop(make, device):
    model, x, y, loss_fn = make()
    model, x, y = model.to(device), x.to(device), y.to(device)
    expected = gradient_by_loop(model, x, y, loss_fn, ALPHA)
    got, reg = gradient_by_fastcurv(model, x, y, loss_fn, ALPHA)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    # logging: last per-example norms are the literal ones, detached
    s_ref = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(B):
        g_i = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        s_ref.append(sum(g.square().sum() for g in g_i))
    torch.testing.assert_close(reg.last_sqnorms, torch.stack(s_ref), rtol=1e-10, atol=1e-12)
    assert not reg.last_sqnorms.requires_grad


@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__)
def test_backward_method_gives_identical_gradients(make):
    model, x, y, loss_fn = make()
    expected, _ = gradient_by_fastcurv(model, x, y, loss_fn, ALPHA)
    reg = Curvature(model, ALPHA)
    model.zero_grad(set_to_none=True)
    with reg.track():
        out = model(x)
    per_example = loss_fn(out, y)
    penalty = reg.backward(per_example)
    assert not penalty.requires_grad
    torch.testing.assert_close(penalty, ALPHA * reg.last_sqnorms.mean(), rtol=0, atol=0)
    for p, e in zip([p for p in model.parameters() if p.requires_grad], expected):
        assert torch.equal(p.grad, e)


def test_penalty_value_and_capture_released():
    model, x, y, loss_fn = tanh_mlp()
    reg = Curvature(model, alpha=2.0)
    with reg.track() as cap:
        out = model(x)
    per_example = loss_fn(out, y)
    penalty = reg(per_example)
    torch.testing.assert_close(penalty, 2.0 * reg.last_sqnorms.mean())
    assert penalty.requires_grad
    assert all(layer.output is None and layer.input is None for layer in cap.layers)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="no tracked forward"):
        reg(per_example)  # one call per tracked forward


def test_frozen_parameters_excluded():
    model, x, y, loss_fn = tanh_mlp()
    model[0].weight.requires_grad_(False)
    expected = gradient_by_loop(model, x, y, loss_fn, ALPHA)
    got, _ = gradient_by_fastcurv(model, x, y, loss_fn, ALPHA)
    assert model[0].weight.grad is None
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_errors():
    model, x, y, loss_fn = tanh_mlp()
    with pytest.raises(RuntimeError, match="no tracked forward"):
        Curvature(model, 1.0)(torch.zeros(B))
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        Curvature(model, -1.0)
    with pytest.raises(TypeError, match="PReLU.*no fast rule.*strict=True"):
        Curvature(nn.Sequential(nn.PReLU(2)), 1.0, strict=True)
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        Curvature(nn.Sequential(nn.Linear(2, 2)), 1.0, batchnorm="sometimes")
    bn_model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))  # train mode
    reg = Curvature(bn_model, 1.0)
    with pytest.raises(RuntimeError, match="examples interact"):
        with reg.track():
            bn_model(x)
    reg = Curvature(model, 1.0)
    with reg.track():
        out = model(x)
    with pytest.raises(ValueError, match="per-example losses"):
        reg(loss_fn(out, y).mean())


def test_layernorm_torch_func_second_derivatives():
    """vmap(grad(...)) under an outer autograd.grad vs the exact loop, on a LayerNorm model.

    Observed with torch 2.13.0 (CPU) in float64: the torch.func gradient of the penalty is wrong
    for the parameters *below* the LayerNorm (first Linear: errors of order 1e-2 to 1e-1 against
    the finite-difference-checked loop), while it matches to 1e-15 on the LayerNorm and later
    parameters and on a LayerNorm-free tanh MLP (the control below). fastcurv matches the loop.
    So the reported torch.func problem through nn.LayerNorm does occur in this version too; if a
    torch release fixes it, the disagreement assertion fails and this docstring must be updated.
    """
    model, x, y, loss_fn = layernorm_model()
    exact = gradient_by_loop(model, x, y, loss_fn, ALPHA)
    # the loop is right below the LayerNorm: central differences on the first Linear's bias
    eps, bias, numeric = 1e-5, model[0].bias.data, []
    for k in range(bias.numel()):
        orig = bias[k].item()
        bias[k] = orig + eps
        plus = objective_by_loop(model, x, y, loss_fn, ALPHA, create_graph=False).item()
        bias[k] = orig - eps
        minus = objective_by_loop(model, x, y, loss_fn, ALPHA, create_graph=False).item()
        bias[k] = orig
        numeric.append((plus - minus) / (2 * eps))
    torch.testing.assert_close(exact[1], torch.tensor(numeric), rtol=1e-6, atol=1e-8)
    ours, _ = gradient_by_fastcurv(model, x, y, loss_fn, ALPHA)
    for g, e in zip(ours, exact):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)

    func = gradient_by_torch_func(model, x, y, loss_fn, ALPHA)
    errors = [(f - e).abs().max().item() for f, e in zip(func, exact)]
    # parameters: 0.weight, 0.bias (below the LayerNorm), 1.weight, 1.bias, 3.weight, 3.bias
    assert min(errors[:2]) > 1e-3, f"torch.func now agrees below the LayerNorm: {errors}"
    assert max(errors[2:]) < 1e-10, errors

    # control: without LayerNorm torch.func is exact, so the difference above is LayerNorm's
    mlp, x2, y2, loss2 = tanh_mlp()
    exact = gradient_by_loop(mlp, x2, y2, loss2, ALPHA)
    for f, e in zip(gradient_by_torch_func(mlp, x2, y2, loss2, ALPHA), exact):
        torch.testing.assert_close(f, e, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- cheap estimators: subsample=, every=
def _exact_penalty_and_grad(model, x, y, loss_fn, alpha):
    """The float64 per-example reference: alpha * mean_i ||grad l_i||^2 and its parameter gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for i in range(x.shape[0]):
        gi = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]).sum(), params, create_graph=True)
        total = total + sum(g.square().sum() for g in gi)
    penalty = alpha * total / x.shape[0]
    return penalty.detach(), torch.autograd.grad(penalty, params)


@pytest.mark.parametrize("make", [tanh_mlp, cnn_eval_batchnorm, layernorm_model], ids=lambda f: f.__name__)
@pytest.mark.parametrize("b", [1, 2, 3])
def test_subsample_mean_over_all_subsets_is_the_full_penalty(make, b):
    import itertools

    torch.manual_seed(0)
    model, x, y, loss_fn = make()
    reg = Curvature(model, alpha=ALPHA, subsample=b, loss_fn=loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    want_value, want_grad = _exact_penalty_and_grad(model, x, y, loss_fn, ALPHA)
    subsets = list(itertools.combinations(range(B), b))
    value_sum, grad_sum = 0.0, [torch.zeros_like(p) for p in params]
    for subset in subsets:
        index = torch.tensor(subset)
        estimate = reg.penalty_on(x[index], y[index])
        value_sum = value_sum + estimate.detach()
        for acc, g in zip(grad_sum, torch.autograd.grad(estimate, params)):
            acc += g
    torch.testing.assert_close(value_sum / len(subsets), want_value)
    for got, want in zip(grad_sum, want_grad):
        torch.testing.assert_close(got / len(subsets), want)


def test_subsample_call_draws_b_examples_and_uses_only_them():
    torch.manual_seed(0)
    model, x, y, loss_fn = tanh_mlp()
    reg = Curvature(model, alpha=ALPHA, subsample=2, generator=torch.Generator().manual_seed(3))
    params = list(model.parameters())
    estimate = reg(x, y)
    subset = reg.last_subset
    assert subset.shape == (2,) and len(set(subset.tolist())) == 2
    assert reg.last_sqnorms.shape == (2,)
    want_value, want_grad = _exact_penalty_and_grad(model, x[subset], y[subset], loss_fn, ALPHA)
    torch.testing.assert_close(estimate.detach(), want_value)
    for got, want in zip(torch.autograd.grad(estimate, params), want_grad):
        torch.testing.assert_close(got, want)
    # b >= B: the whole batch, the exact penalty
    whole = Curvature(model, alpha=ALPHA, subsample=B)(x, y)
    torch.testing.assert_close(whole.detach(), _exact_penalty_and_grad(model, x, y, loss_fn, ALPHA)[0])


def test_subsample_backward_trains_the_data_loss_on_all_examples():
    torch.manual_seed(0)
    model, x, y, loss_fn = tanh_mlp()
    reg = Curvature(model, alpha=ALPHA, subsample=2, generator=torch.Generator().manual_seed(1))
    penalty = reg.backward(x, y)
    got = [p.grad.clone() for p in model.parameters()]
    subset = reg.last_subset
    params = list(model.parameters())
    data = torch.autograd.grad(loss_fn(model(x), y).mean(), params)
    pen_value, pen_grad = _exact_penalty_and_grad(model, x[subset], y[subset], loss_fn, ALPHA)
    torch.testing.assert_close(penalty, pen_value)
    for g, d, h in zip(got, data, pen_grad):
        torch.testing.assert_close(g, d + h)


def _rows_forwarded(model):
    """How many examples the model's first layer sees (a forward hook), to count forwards per step."""
    rows = []
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    first.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    return rows


@pytest.mark.parametrize("make", [tanh_mlp, cnn_eval_batchnorm], ids=lambda f: f.__name__)
def test_subsample_backward_forwards_each_example_once(make):
    """The drawn examples' data loss comes from the penalty's captured forward, the others' from a plain
    one: B rows forwarded per step (not B + b), and the same gradient as the whole-batch formula."""
    torch.manual_seed(0)
    model, x, y, loss_fn = make()
    rows = _rows_forwarded(model)
    reg = Curvature(model, alpha=ALPHA, subsample=3, loss_fn=loss_fn, generator=torch.Generator().manual_seed(2))
    loss, penalty = reg.backward_with_loss(x, y)
    assert sorted(rows) == [1, 3] and sum(rows) == B
    got = [p.grad.clone() for p in model.parameters()]
    subset, params = reg.last_subset, list(model.parameters())
    data = torch.autograd.grad(loss_fn(model(x), y).mean(), params)
    pen_value, pen_grad = _exact_penalty_and_grad(model, x[subset], y[subset], loss_fn, ALPHA)
    torch.testing.assert_close(loss, loss_fn(model(x), y).mean().detach())
    torch.testing.assert_close(penalty, pen_value)
    for g, d, h in zip(got, data, pen_grad):
        torch.testing.assert_close(g, d + h)


def test_subsample_backward_with_batch_statistics_keeps_the_whole_batch_forward():
    """Train-mode BatchNorm: splitting the batch would change the data loss's statistics, so the data
    loss keeps its forward on all B (B + b rows) and its gradient is the whole batch's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(B, 3), torch.randint(0, 3, (B,))
    data_model = copy.deepcopy(model)
    want_data = torch.autograd.grad(ce(data_model(x), y).mean(), list(data_model.parameters()))
    rows = _rows_forwarded(model)
    reg = Curvature(model, alpha=ALPHA, subsample=2, batchnorm="frozen_stats",
                    generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    reg.backward(x, y)
    assert rows == [B, 2]
    # the running statistics moved once (the data loss's forward), as in a plain step
    torch.testing.assert_close(model[1].running_mean, data_model[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1
    penalty_model = copy.deepcopy(data_model)
    penalty = Curvature(penalty_model, alpha=ALPHA, batchnorm="frozen_stats").penalty_on(x[reg.last_subset], y[reg.last_subset])
    want_pen = torch.autograd.grad(penalty, list(penalty_model.parameters()))
    for p, d, h in zip(params, want_data, want_pen):
        torch.testing.assert_close(p.grad, d + h)


def _one_step(reg, model, x, y, loss_fn, tracked):
    model.zero_grad(set_to_none=True)
    if tracked:
        with reg.track():
            out = model(x)
        per_example = loss_fn(out, y)
        (per_example.mean() + reg(per_example)).backward()
    else:
        (loss_fn(model(x), y).mean() + reg(x, y)).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_every_1_is_the_exact_step_bit_for_bit():
    torch.manual_seed(0)
    model, x, y, loss_fn = tanh_mlp()
    exact, every1 = Curvature(model, alpha=ALPHA), Curvature(model, alpha=ALPHA, every=1)
    for _ in range(3):
        want = _one_step(exact, model, x, y, loss_fn, tracked=True)
        got = _one_step(every1, model, x, y, loss_fn, tracked=True)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        with torch.no_grad():  # move, so that the steps differ
            for p, g in zip(model.parameters(), want):
                p -= 0.1 * g


@pytest.mark.parametrize("tracked", [True, False], ids=["track", "x_y"])
def test_every_k_reuses_exactly_the_stored_gradient_between_computations(tracked):
    torch.manual_seed(0)
    model, x, y, loss_fn = tanh_mlp()
    k = 3
    reg = Curvature(model, alpha=ALPHA, every=k, loss_fn=loss_fn)
    params = list(model.parameters())
    stored = None
    for step in range(2 * k + 1):
        xb = x + 0.1 * step  # a different batch each step
        computes = step % k == 0
        assert reg.computes_next == computes
        if tracked:
            with reg.track() as cap:
                assert (cap is None) == (not computes)  # reuse steps record nothing
        data = torch.autograd.grad(loss_fn(model(xb), y).mean(), params)
        got = _one_step(reg, model, xb, y, loss_fn, tracked)
        if computes:
            value, stored = _exact_penalty_and_grad(model, xb, y, loss_fn, ALPHA)
            stored_value = value
        for g, d, h in zip(got, data, stored):
            torch.testing.assert_close(g, d + h)  # between computations: exactly the stored term
        torch.testing.assert_close(reg.stored_term().detach(), stored_value)
        with torch.no_grad():
            for p, g in zip(params, got):
                p -= 0.05 * g


def test_estimator_option_errors():
    model, x, y, loss_fn = tanh_mlp()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="subsample must be None or an int >= 1"):
            Curvature(model, alpha=1.0, subsample=bad)
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            Curvature(model, alpha=1.0, every=bad if bad is not True else 0)
    reg = Curvature(model, alpha=1.0, subsample=2)
    with reg.track():
        out = model(x)
    with pytest.raises(TypeError, match=r"call reg\(x, y\) with the batch"):
        reg(ce(out, y))
    with pytest.raises(TypeError, match="got 3 arguments"):
        reg(x, y, y)
    assert repr(Curvature(model, alpha=1.0, subsample=2, every=4)) == "Curvature(alpha=1.0, subsample=2, every=4)"
