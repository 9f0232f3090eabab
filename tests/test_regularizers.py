"""The papers' regularizers (fastcurv.regularizers, except Curvature) against their literal definitions.

float64 throughout for exactness: explicit P x P matrices, explicit Hessians, step-by-step loops with
model copies.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fastcurv.losses import multiclass_hinge
from fastcurv.regularizers import (
    L2,
    FisherNorm,
    GroupLasso,
    Metric,
    SelectiveL2,
    SpectralNorm,
    SubBatchGradNorm,
    fisher_norm,
)

DT = torch.float64


def _mlp(device, d_in=4, hidden=5, d_out=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(device, DT)


def _explicit_minmax_fisher(g):
    f = (g.reshape(-1, 1) @ g.reshape(1, -1)).abs()
    return (f - f.min()) / (f.max() - f.min() + 1e-8)


# ----------------------------------------------------------------------------------------- fisher_norm


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (4, 2, 3)])
def test_fisher_norm_matches_explicit_matrix(device, shape):
    w = torch.randn(shape, dtype=DT, device=device, requires_grad=True)
    g = torch.randn(shape, dtype=DT, device=device, requires_grad=True)
    f_tilde = _explicit_minmax_fisher(g.detach())
    expected = w.detach().reshape(-1) @ f_tilde @ w.detach().reshape(-1)
    value = fisher_norm(w, g)
    torch.testing.assert_close(value, expected)
    value.backward()
    # g is a constant of the penalty; the gradient in w is 2 F~ w (F~ symmetric).
    assert g.grad is None
    torch.testing.assert_close(w.grad.reshape(-1), 2 * f_tilde @ w.detach().reshape(-1))


def test_fisher_norm_signs_and_scale_invariance():
    # |g g^T| uses |g|, so flipping signs of g changes nothing; scaling g cancels up to the 1e-8.
    w, g = torch.randn(10, dtype=DT), torch.randn(10, dtype=DT)
    base = fisher_norm(w, g)
    torch.testing.assert_close(fisher_norm(w, -g), base)
    torch.testing.assert_close(fisher_norm(w, 100 * g), base, rtol=1e-7, atol=0)


def test_fisher_norm_bad_input():
    with pytest.raises(ValueError, match=r"same shape, got w \(3,\) and g \(4,\)"):
        fisher_norm(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="empty"):
        fisher_norm(torch.randn(0), torch.randn(0))
    with pytest.raises(TypeError, match="floating point"):
        fisher_norm(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long))


# ------------------------------------------------------------------------------- FisherNorm, batch mode


def test_fisher_norm_batch_mode_value_and_gradient(device):
    model = _mlp(device)
    layer = model[2]
    x = torch.randn(9, 4, dtype=DT, device=device)
    y = torch.randint(0, 3, (9,), device=device)
    gamma, beta = 0.3, 0.07
    reg = FisherNorm(layer, gamma=gamma, beta=beta)

    loss = multiclass_hinge(model(x), y)
    # The literal definition: the paper's code, with the explicit P x P matrix.
    g = torch.autograd.grad(loss, layer.weight, retain_graph=True)[0]
    f_tilde = _explicit_minmax_fisher(g)
    w = layer.weight.detach().reshape(-1)
    expected_value = gamma * (w @ f_tilde @ w) + beta * (w @ w)
    plain_grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)

    penalty = reg(loss)
    torch.testing.assert_close(penalty, expected_value)
    (loss + penalty).backward()
    expected_weight_grad = plain_grads[2] + (2 * gamma * f_tilde @ w + 2 * beta * w).reshape(layer.weight.shape)
    torch.testing.assert_close(layer.weight.grad, expected_weight_grad)
    # No gradient through g: every other parameter sees only the data loss.
    for p, expected in zip(list(model.parameters()), plain_grads):
        if p is not layer.weight:
            torch.testing.assert_close(p.grad, expected)


def test_fisher_norm_batch_mode_accepts_per_example_losses():
    model = _mlp("cpu")
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    per_example = F.cross_entropy(model(x), y, reduction="none")
    reg = FisherNorm(model[2], gamma=1.0)
    with reg.track():  # a no-op in batch mode
        pass
    torch.testing.assert_close(reg(per_example), reg(per_example.mean()))


def test_fisher_norm_bad_input():
    with pytest.raises(ValueError, match="ReLU has no `weight`"):
        FisherNorm(nn.ReLU(), gamma=1.0)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0, got -1.0"):
        FisherNorm(nn.Linear(2, 2), gamma=-1.0)
    with pytest.raises(ValueError, match="beta must be finite"):
        FisherNorm(nn.Linear(2, 2), gamma=1.0, beta=float("nan"))
    with pytest.raises(ValueError, match="mode must be one of"):
        FisherNorm(nn.Linear(2, 2), gamma=1.0, mode="sample")
    with pytest.raises(ValueError, match="LayerNorm is not supported"):
        FisherNorm(nn.LayerNorm(3), gamma=1.0, mode="per_example")
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"weight of layer Linear \(shape \(2, 2\)\) does not require grad"):
        FisherNorm(frozen, gamma=1.0)
    model = _mlp("cpu")
    reg = FisherNorm(model[2], gamma=1.0)
    with pytest.raises(ValueError, match=r"got shape \(2, 3\)"):
        reg(torch.ones(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match="does not require grad"):
        reg(torch.tensor(1.0))
    other = nn.Linear(4, 1).double()
    with pytest.raises(ValueError, match="does not depend on the weight"):
        reg(other(torch.randn(3, 4, dtype=DT)).sum())


# -------------------------------------------------------------------------- FisherNorm, per-example mode


class _SeqNet(nn.Module):
    """Linear on a sequence (T > 1) followed by a pooled classifier."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)).mean(dim=1))


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)
    )


@pytest.mark.parametrize(
    "make,layer_of,x_shape,frozen_bias",
    [
        (lambda: _mlp("cpu"), lambda m: m[2], (7, 4), False),
        (lambda: _mlp("cpu"), lambda m: m[0], (7, 4), True),
        (_SeqNet, lambda m: m.inner, (5, 3, 4), False),
        (_conv_net, lambda m: m[0], (5, 2, 6, 6), False),
    ],
    ids=["mlp-head", "mlp-first-frozen-bias", "sequence", "conv"],
)
def test_fisher_norm_per_example_against_explicit_fisher(device, make, layer_of, x_shape, frozen_bias):
    model = make().to(device, DT)
    layer = layer_of(model)
    if frozen_bias:
        layer.bias.requires_grad_(False)
    x = torch.randn(x_shape, dtype=DT, device=device)
    y = torch.randint(0, 3, (x_shape[0],), device=device)
    gamma, beta = 0.2, 0.05

    # Literal definition: per-sample gradients g_i of the layer's trainable params, F = (1/B) sum g_i g_i^T.
    layer_ids = {id(q) for q in layer.parameters(recurse=False) if q.requires_grad}
    own = [n for n, p in model.named_parameters() if id(p) in layer_ids]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([per_sample[n].reshape(x.shape[0], -1) for n in own], dim=1)  # [B, P_layer]
    fisher = g.t() @ g / x.shape[0]
    w = torch.cat([params[n].reshape(-1) for n in own])
    expected_value = gamma * (w @ fisher @ w) + beta * layer.weight.detach().pow(2).sum()

    reg = FisherNorm(layer, gamma=gamma, beta=beta, mode="per_example")
    with reg.track():
        out = model(x)
    per_example = F.cross_entropy(out, y, reduction="none")
    plain = torch.autograd.grad(per_example.mean(), [p for p in model.parameters() if p.requires_grad], retain_graph=True)
    penalty = reg(per_example)
    torch.testing.assert_close(penalty, expected_value)
    (per_example.mean() + penalty).backward()
    # g_i detached: the penalty's gradient is 2 gamma F w on the layer (+ 2 beta W), zero elsewhere.
    extra = dict(zip(own, torch.split(2 * gamma * fisher @ w, [params[n].numel() for n in own])))
    for (n, p), base in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], plain):
        expected = base.clone()
        if n in extra:
            expected += extra[n].reshape(p.shape)
        if p is layer.weight:
            expected += 2 * beta * p.detach()
        torch.testing.assert_close(p.grad, expected)


def test_fisher_norm_per_example_errors():
    model = _mlp("cpu")
    reg = FisherNorm(model[2], gamma=1.0, mode="per_example")
    x, y = torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4,))
    losses = F.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(RuntimeError, match="no forward of the layer was recorded"):
        reg(losses)
    with reg.track():
        out = model(x)
    losses = F.cross_entropy(out, y, reduction="none")
    with pytest.raises(ValueError, match=r"per-example losses of shape \[B\]"):
        reg(losses.mean())
    with pytest.raises(ValueError, match="got 3 per-example losses but the recorded Linear output has batch size 4"):
        reg(losses[:3])
    with pytest.raises(RuntimeError, match="called twice inside one reg.track"):
        with reg.track():
            model(x)
            model(x)
    assert not model[2]._forward_hooks  # removed also after the exception


# ---------------------------------------------------------------------------------- Metric, SelectiveL2


def _flat_loss_and_hessian(model, x, y, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        chunks = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return loss_fn(functional_call(model, params, (x,)), y)

    return flat, torch.autograd.functional.hessian(loss_of, flat)


@pytest.mark.parametrize("absolute", [False, True])
def test_metric_against_explicit_hessian(device, absolute):
    model = _mlp(device)
    x = torch.randn(7, 4, dtype=DT, device=device)
    y = torch.randint(0, 3, (7,), device=device)
    lam = 0.4
    theta, hessian = _flat_loss_and_hessian(model, x, y, F.cross_entropy)
    direction = hessian @ theta
    used = direction.abs() if absolute else direction

    reg = Metric(model, lam, absolute=absolute)
    loss = F.cross_entropy(model(x), y)
    plain = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)])
    penalty = reg(loss)
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in reg.last_direction]), direction)
    torch.testing.assert_close(penalty, lam * theta @ used)
    (loss + penalty).backward()  # the loss graph survives the regularizer's HVP
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(total, plain + lam * used)


def test_metric_per_example_losses_are_averaged():
    model = _mlp("cpu")
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    reg = Metric(model, 1.0)
    a = reg(F.cross_entropy(model(x), y, reduction="none"))
    b = reg(F.cross_entropy(model(x), y))
    torch.testing.assert_close(a, b)


def test_selective_l2_mask_by_hand():
    # loss = (1/3) sum_i 0.5 (x_i . w)^2 with X = diag(1, 2, 3): H = diag(1/3, 4/3, 3).
    layer = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 1.0, 0.1]]))
    x = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    # H w = (1, 4/3, 0.3); max |.| = 4/3.
    cases = {0.5: [False, False, True], 0.8: [True, False, True], 1.0: [True, False, True], 0.2: [False, False, False]}
    for omega, mask in cases.items():
        layer.zero_grad()
        loss = 0.5 * layer(x).pow(2).squeeze(1).mean()
        reg = SelectiveL2(layer, lam=0.5, omega=omega)
        penalty = reg(loss)
        torch.testing.assert_close(reg.last_direction[0], torch.tensor([[1.0, 4 / 3, 0.3]], dtype=DT))
        assert reg.last_mask[0].tolist() == [mask], omega
        w = layer.weight.detach()
        m = torch.tensor([mask])
        torch.testing.assert_close(penalty, 0.25 * (w[m] ** 2).sum())
        penalty.backward()
        torch.testing.assert_close(layer.weight.grad, 0.5 * m * w)


def test_selective_l2_against_explicit_hessian():
    model = _mlp("cpu", d_in=3, hidden=4, d_out=2)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    theta, hessian = _flat_loss_and_hessian(model, x, y, F.cross_entropy)
    direction = hessian @ theta
    omega, lam = 0.3, 0.2
    expected_mask = []
    offset = 0
    for p in model.parameters():  # max per parameter tensor
        d = direction[offset:offset + p.numel()].abs()
        expected_mask.append(d < omega * d.max())
        offset += p.numel()
    expected_mask = torch.cat(expected_mask)
    assert 0 < int(expected_mask.sum()) < theta.numel()  # the test distinguishes something
    reg = SelectiveL2(model, lam=lam, omega=omega)
    penalty = reg(F.cross_entropy(model(x), y))
    assert torch.equal(torch.cat([m.reshape(-1) for m in reg.last_mask]), expected_mask)
    penalty.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(grads, lam * expected_mask * theta)


def _metric_problem(device):
    """An MLP with a frozen bias and a parameter that the loss never uses (zero gradient and zero HVP)."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 2)).to(device, DT)
    model[0].bias.requires_grad_(False)
    x = torch.randn(7, 4, dtype=DT, device=device)
    y = torch.randint(0, 3, (7,), device=device)

    def per_example_loss():
        return F.cross_entropy(model[:3](x), y, reduction="none")  # model[3] is never used

    return model, per_example_loss


@pytest.mark.parametrize("make", [
    lambda m: Metric(m, 0.4), lambda m: Metric(m, 0.4, absolute=True), lambda m: SelectiveL2(m, 0.7, omega=0.3),
], ids=["metric", "metric_absolute", "selective_l2"])
def test_backward_is_the_step_loss_plus_penalty_backward(device, make):
    """reg.backward(l) (data gradient reused from the HVP's create_graph backward) == (l.mean() + reg(l)).backward(),
    gradients accumulated onto existing .grad, same penalty and same last_direction / last_mask."""
    model, per_example_loss = _metric_problem(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [torch.randn_like(p) for p in trainable]  # .grad already holds something: must accumulate

    reg = make(model)
    for p, g in zip(trainable, start):
        p.grad = g.clone()
    per_example = per_example_loss()
    expected_penalty = reg(per_example)
    (per_example.mean() + expected_penalty).backward()
    expected = [p.grad.clone() for p in trainable]
    expected_state = [t.clone() for t in reg.last_direction] + [t.clone() for t in getattr(reg, "last_mask", [])]

    for p, g in zip(trainable, start):
        p.grad = g.clone()
    penalty = reg.backward(per_example_loss())
    torch.testing.assert_close(penalty, expected_penalty.detach())
    assert not penalty.requires_grad
    for p, e in zip(trainable, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
    state = list(reg.last_direction) + list(getattr(reg, "last_mask", []))
    for a, b in zip(state, expected_state):
        assert torch.equal(a, b)
    # From .grad = None the result is the plain step's gradient.
    model.zero_grad(set_to_none=True)
    reg.backward(per_example_loss())
    for p, e, g0 in zip(trainable, expected, start):
        torch.testing.assert_close(p.grad, e - g0, rtol=1e-12, atol=1e-14)
    # The unused layer gets zero gradient (and, having zero H thetabar, no Selective L2 either);
    # the frozen bias gets none.
    assert model[0].bias.grad is None
    assert torch.count_nonzero(model[3].weight.grad) == 0 and torch.count_nonzero(model[3].bias.grad) == 0


def test_metric_bad_input():
    model = _mlp("cpu")
    with pytest.raises(ValueError, match="lam must be finite and >= 0, got -0.1"):
        Metric(model, -0.1)
    with pytest.raises(ValueError, match=r"omega must be finite and in \(0, 1\]"):
        SelectiveL2(model, 0.1, omega=-1)
    with pytest.raises(ValueError, match="Sequential has no parameters that require grad"):
        Metric(nn.Sequential(nn.ReLU()), 0.1)
    reg = Metric(model, 0.1)
    with pytest.raises(ValueError, match=r"got shape \(2, 2\)"):
        reg(torch.ones(2, 2, requires_grad=True))
    with pytest.raises(ValueError, match="does not require grad"):
        reg(torch.tensor(1.0))
    with pytest.raises(ValueError, match="does not depend on any of the model's parameters"):
        reg(torch.ones(3, requires_grad=True).sum())
    with pytest.raises(ValueError, match="does not depend on any of the model's parameters"):
        reg.backward(torch.ones(3, requires_grad=True).sum())
    with pytest.raises(ValueError, match=r"SelectiveL2: expected the batch loss.*got shape \(2, 2\)"):
        SelectiveL2(model, 0.1, 0.5).backward(torch.ones(2, 2, requires_grad=True))


# ------------------------------------------------------------------------------------------- baselines


def test_l2_value_gradient_and_ignored_loss():
    model = _mlp("cpu")
    reg = L2(model, lam=0.3)
    penalty = reg(torch.tensor(5.0))  # the loss is accepted and ignored
    expected = 0.15 * sum(p.detach().pow(2).sum() for p in model.parameters())
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    for p in model.parameters():  # lam * theta: the trainers' theta -= lr (grad L + lam theta)
        torch.testing.assert_close(p.grad, 0.3 * p.detach())
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        L2(model, -1)


# Factories, not layers: built inside the test after the seeding fixture (torch's own initial seed is
# random per process here, so layers made at collection time gave a different spectrum every run).
@pytest.mark.parametrize(
    "make_layer", [lambda: nn.Linear(7, 5), lambda: nn.Linear(3, 9), lambda: nn.Conv2d(3, 4, kernel_size=3)],
    ids=["5x7", "9x3", "conv"],
)
def test_spectral_norm_against_svdvals(device, make_layer):
    layer = make_layer().to(device, DT)
    gamma, beta = 0.5, 0.1
    reg = SpectralNorm(layer, gamma=gamma, beta=beta, n_power_iterations=500)
    w_mat = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    u_svd, s, vh = torch.linalg.svd(w_mat)
    penalty = reg()
    torch.testing.assert_close(penalty, gamma * s[0] + beta * w_mat.pow(2).sum())
    penalty.backward()
    # d sigma_max / dW = u_1 v_1^T (sign-invariant product).
    expected = gamma * torch.outer(u_svd[:, 0], vh[0]) + 2 * beta * w_mat
    torch.testing.assert_close(layer.weight.grad.reshape(w_mat.shape), expected)


def test_spectral_norm_vector_persists_across_calls():
    layer = nn.Linear(8, 6).double()
    reg = SpectralNorm(layer, gamma=1.0)  # one iteration per call, like torch's spectral_norm
    sigma_max = torch.linalg.svdvals(layer.weight.detach())[0]
    first = reg().item()
    for _ in range(300):
        last = reg().item()
    assert first <= sigma_max.item() + 1e-12
    assert last == pytest.approx(sigma_max.item(), rel=1e-10)


def test_spectral_norm_bad_input():
    with pytest.raises(ValueError, match=r"weight of shape \(3,\); expected a matrix"):
        SpectralNorm(nn.LayerNorm(3), gamma=1.0)
    with pytest.raises(ValueError, match="ReLU has no `weight`"):
        SpectralNorm(nn.ReLU(), gamma=1.0)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
        SpectralNorm(nn.Linear(2, 2), gamma=-1.0)
    with pytest.raises(ValueError, match="n_power_iterations must be an integer >= 1"):
        SpectralNorm(nn.Linear(2, 2), gamma=1.0, n_power_iterations=0)


def test_group_lasso_layer_and_model():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 4)
    ).double()
    with torch.no_grad():
        model[4].weight[1].zero_()  # an all-zero row: subgradient 0, not nan
    lam = 0.7
    reg = GroupLasso(model, lam)
    expected = 0.0
    for w in (model[0].weight, model[4].weight):
        for row in w.detach().reshape(w.shape[0], -1):
            expected += math.sqrt(float((row ** 2).sum()))
    penalty = reg(torch.tensor(1.0))
    torch.testing.assert_close(penalty.item(), lam * expected)
    penalty.backward()
    w = model[4].weight.detach()
    norms = w.norm(dim=1, keepdim=True)
    expected_grad = torch.where(norms > 0, lam * w / norms.clamp_min(1e-300), torch.zeros_like(w))
    torch.testing.assert_close(model[4].weight.grad, expected_grad)
    assert model[3].weight.grad is None  # LayerNorm is not a grouped layer
    single = GroupLasso(model[4], lam)
    torch.testing.assert_close(single().item(), lam * float(norms.sum()))


def test_group_lasso_bad_input():
    with pytest.raises(ValueError, match="contains no nn.Linear / nn.Conv layer"):
        GroupLasso(nn.Sequential(nn.ReLU()), 1.0)
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        GroupLasso(nn.Linear(2, 2), -2.0)


def test_every_regularizer_returns_a_scalar_added_to_the_loss():
    model = _mlp("cpu")
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    regs = [
        L2(model, 0.1),
        SpectralNorm(model[2], 0.1),
        GroupLasso(model, 0.1),
        FisherNorm(model[2], 0.1),
        FisherNorm(model[2], 0.1, mode="per_example"),
        Metric(model, 0.1),
        SelectiveL2(model, 0.1, 0.5),
    ]
    for reg in regs:
        with reg.track():
            out = model(x)
        per_example = F.cross_entropy(out, y, reduction="none")
        penalty = reg(per_example)
        assert penalty.shape == () and penalty.dtype == DT and penalty.requires_grad, type(reg).__name__
        (per_example.mean() + penalty).backward()
    penalty = SubBatchGradNorm(model, num_subbatches=4)(x, y)  # needs the data, not the loss
    assert penalty.shape == () and penalty.requires_grad
