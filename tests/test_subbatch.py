"""SubBatchGradNorm (paper 001's R_alpha) against Algorithm 1 run literally: a Python loop over the
sub-batches with model copies, float64.

Sub-batch k holds examples k, k+M, k+2M, ... (near-equal sizes when M does not divide B)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.losses import multiclass_hinge
from fastcurv.regularizers import SubBatchGradNorm
from fastcurv.regularizers.subbatch import GROUPED_MODULES

DT = torch.float64


def per_example_ce(out, target):
    return F.cross_entropy(out, target, reduction="none")


def algorithm1(model, x, y, alpha, beta, m, loss_fn=per_example_ce):
    """Each sub-batch on its own model copies (so BatchNorm in train mode sees that sub-batch's
    statistics). Returns (R_alpha, grad beta R_alpha, grad L(B, w)) over the trainable parameters,
    with L(B, w) = sum_k |B_k|/B L(B_k, w)."""
    trainable = lambda net: [p for p in net.parameters() if p.requires_grad]  # noqa: E731
    value = 0.0
    reg_grads = [torch.zeros_like(p) for p in trainable(model)]
    data_grads = [torch.zeros_like(p) for p in trainable(model)]
    for k in range(m):
        xk, yk = x[k::m], y[k::m]
        clean = copy.deepcopy(model)
        loss_w = loss_fn(clean(xk), yk).mean()
        g_k = torch.autograd.grad(loss_w, trainable(clean))
        shifted = copy.deepcopy(model)
        with torch.no_grad():  # w - alpha g_k, g_k a constant
            for p, g in zip(trainable(shifted), g_k):
                p -= alpha * g
        loss_shifted = loss_fn(shifted(xk), yk).mean()
        h_k = torch.autograd.grad(loss_shifted, trainable(shifted))
        value += (loss_w.item() - loss_shifted.item()) / m
        for acc, data, a, b in zip(reg_grads, data_grads, g_k, h_k):
            acc += beta * (a - b) / m
            data += xk.shape[0] / x.shape[0] * a
    return value, reg_grads, data_grads


def exact_penalty_grads(model, x, y, alpha, beta, m, loss_fn=per_example_ce):
    """beta alpha (1/M) sum_k ||g_k||^2 with g_k differentiated through, by a loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for k in range(m):
        g_k = torch.autograd.grad(loss_fn(model(x[k::m]), y[k::m]).mean(), params, create_graph=True)
        total = total + sum(g.square().sum() for g in g_k)
    penalty = beta * alpha * total / m
    return penalty.detach(), torch.autograd.grad(penalty, params)


class Scale(nn.Module):
    """A module holding its own parameter: outside the grouped forward (vmap fallback)."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.scale


class TwiceShared(nn.Module):
    """One Linear applied twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class Sequence(nn.Module):
    """Linear over [B, T, d] (T > 1): sub-batch Gram with many rows -> the materialized g_k route."""

    def __init__(self, t=5):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3 * t, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.proj(x))).flatten(1))


def make_case(name):
    """(model, x shape) in float64; every model is put in train mode."""
    cases = {
        "mlp": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (4,)),
        "cnn": (lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.GroupNorm(2, 4), nn.ReLU(),
            nn.Conv2d(4, 4, 2, stride=2, groups=2), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 3)), (2, 4, 4)),
        "conv1d_3d": (lambda: nn.Sequential(
            nn.Conv3d(1, 2, 2, dilation=1, bias=False), nn.Tanh(), nn.Flatten(2), nn.Conv1d(2, 3, 3, padding="same"),
            nn.Flatten(), nn.Linear(3 * 8, 3)), (1, 3, 3, 3)),
        "batchnorm_train": (lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 9, 6),
            nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)), (2, 3, 3)),
        "batchnorm_no_affine_no_stats": (lambda: nn.Sequential(
            nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False, track_running_stats=False), nn.Tanh(),
            nn.Linear(5, 3)), (4,)),
        "sequence": (Sequence, (5, 3)),
        "shared_linear": (TwiceShared, (4,)),
        "vmap_fallback": (lambda: nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)), (4,)),
    }
    build, shape = cases[name]
    return build().to(DT).train(), shape


CASES = ["mlp", "cnn", "conv1d_3d", "batchnorm_train", "batchnorm_no_affine_no_stats", "sequence",
         "shared_linear", "vmap_fallback"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch,m", [(12, 4), (10, 4), (8, 8), (7, 1)])
def test_matches_algorithm1(device, case, batch, m):
    model, shape = make_case(case)
    model.to(device)
    if "batchnorm" in case and batch // m < 2:
        pytest.skip("BatchNorm1d needs 2 examples per sub-batch")
    x = torch.randn(batch, *shape, dtype=DT, device=device)
    y = torch.randint(0, 3, (batch,), device=device)
    alpha, beta = 1e-3, 3.0
    value, reg_grads, data_grads = algorithm1(model, x, y, alpha, beta, m)
    params = [p for p in model.parameters() if p.requires_grad]
    reg = SubBatchGradNorm(model, alpha=alpha, beta=beta, num_subbatches=m)

    penalty = reg(x, y)  # the loss-term form
    assert penalty.shape == ()
    torch.testing.assert_close(penalty.item(), beta * value, rtol=1e-9, atol=1e-15)
    penalty.backward()
    for p, expected in zip(params, reg_grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-8, atol=1e-13)

    model.zero_grad(set_to_none=True)
    loss = reg.backward(x, y)  # the fast path: grad [L(B, w) + beta R_alpha]
    torch.testing.assert_close(reg.last_penalty.item(), beta * value, rtol=1e-9, atol=1e-15)
    expected_loss = sum(per_example_ce(model(x[k::m]), y[k::m]).sum() for k in range(m)) / batch
    if "batchnorm" not in case:  # without batch statistics L(B, w) is the plain full-batch mean
        expected_loss = per_example_ce(model(x), y).mean()
    torch.testing.assert_close(loss, expected_loss.detach())
    for p, r, d in zip(params, reg_grads, data_grads):
        torch.testing.assert_close(p.grad, r + d, rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize("case", ["mlp", "cnn", "batchnorm_train", "sequence", "shared_linear", "vmap_fallback"])
@pytest.mark.parametrize("batch,m", [(12, 4), (10, 3)])
def test_exact_form(device, case, batch, m):
    model, shape = make_case(case)
    model.to(device)
    x = torch.randn(batch, *shape, dtype=DT, device=device)
    y = torch.randint(0, 3, (batch,), device=device)
    alpha, beta = 1e-2, 2.0
    model_copy = copy.deepcopy(model)  # the loop's train-mode forwards must not move our statistics
    expected, expected_grads = exact_penalty_grads(model_copy, x, y, alpha, beta, m)
    reg = SubBatchGradNorm(model, alpha=alpha, beta=beta, num_subbatches=m, exact=True)
    penalty = reg(x, y)
    torch.testing.assert_close(penalty.detach(), expected)
    penalty.backward()
    for p, e in zip([p for p in model.parameters() if p.requires_grad], expected_grads):
        torch.testing.assert_close(p.grad, e, rtol=1e-8, atol=1e-13)


def test_exact_form_one_example_per_subbatch_is_the_per_example_penalty():
    model, _ = make_case("mlp")
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    params = list(model.parameters())
    sq = [sum(g.square().sum() for g in torch.autograd.grad(per_example_ce(model(x[i:i + 1]), y[i:i + 1]).sum(),
                                                             params)) for i in range(6)]
    penalty = SubBatchGradNorm(model, alpha=0.1, beta=2.0, num_subbatches=6, exact=True)(x, y)
    torch.testing.assert_close(penalty.detach(), 2.0 * 0.1 * torch.stack(sq).mean())


def test_finite_difference_approaches_exact_linearly():
    # R_alpha = alpha (1/M) sum ||g_k||^2 + O(alpha^2): the relative gap shrinks linearly with alpha.
    model, _ = make_case("cnn")
    x, y = torch.randn(8, 2, 4, 4, dtype=DT), torch.randint(0, 3, (8,))
    exact = SubBatchGradNorm(model, alpha=1e-4, num_subbatches=4, exact=True)(x, y).item()
    gaps = []
    for alpha in (1e-3, 1e-4):
        approx = SubBatchGradNorm(model, alpha=alpha, num_subbatches=4)(x, y).item() * 1e-4 / alpha
        gaps.append(abs(approx - exact) / exact)
    assert gaps[1] < 1e-2
    assert gaps[1] < gaps[0] / 5


def test_custom_loss_and_frozen_parameter():
    model, _ = make_case("mlp")
    model[0].bias.requires_grad_(False)  # frozen: a constant of every pass, never perturbed
    hinge = lambda out, t: multiclass_hinge(out, t, reduction="none")  # noqa: E731
    x, y = torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))
    value, reg_grads, data_grads = algorithm1(model, x, y, 1e-3, 1.0, 2, loss_fn=hinge)
    reg = SubBatchGradNorm(model, alpha=1e-3, num_subbatches=2, loss_fn=hinge)
    reg.backward(x, y)
    assert model[0].bias.grad is None
    torch.testing.assert_close(reg.last_penalty.item(), value, rtol=1e-9, atol=1e-15)
    for p, r, d in zip([p for p in model.parameters() if p.requires_grad], reg_grads, data_grads):
        torch.testing.assert_close(p.grad, r + d, rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize("batch", [12, 10])  # M | B: one fused batch_norm over a view; else per-segment sums
def test_batchnorm_running_statistics(batch):
    # backward(): one update, towards the mean over sub-batches of (mean, unbiased variance);
    # reg(x, y) and the perturbed pass leave them alone.
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.25), nn.Linear(3, 3)).to(DT)
    bn = model[1]
    x, y = torch.randn(batch, 4, dtype=DT), torch.randint(0, 3, (batch,))
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    reg = SubBatchGradNorm(model, num_subbatches=3)
    reg(x, y)
    assert bn.num_batches_tracked.item() == 0
    torch.testing.assert_close(bn.running_mean, torch.full((3,), 0.5, dtype=DT))
    with torch.no_grad():
        h = model[0](x)
        means = torch.stack([h[k::3].mean(0) for k in range(3)]).mean(0)
        variances = torch.stack([h[k::3].var(0, correction=1) for k in range(3)]).mean(0)
    reg.backward(x, y)
    assert bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(bn.running_mean, 0.75 * 0.5 + 0.25 * means)
    torch.testing.assert_close(bn.running_var, 0.75 * 2.0 + 0.25 * variances)
    bn.eval()  # eval mode: running statistics, nothing updated, still matches Algorithm 1
    value, reg_grads, _ = algorithm1(model, x, y, 1e-4, 1.0, 3)
    model.zero_grad()
    reg(x, y).backward()
    for p, e in zip(model.parameters(), reg_grads):
        torch.testing.assert_close(p.grad, e, rtol=1e-8, atol=1e-13)
    assert bn.num_batches_tracked.item() == 1


def test_forward_is_restored_after_an_error():
    model, _ = make_case("mlp")
    reg = SubBatchGradNorm(model, num_subbatches=2)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="loss_fn must return per-example losses"):
        SubBatchGradNorm(model, num_subbatches=2, loss_fn=F.cross_entropy)(x, y)
    assert all("forward" not in m.__dict__ for m in model.modules())
    reg(x, y).backward()


def test_bad_input():
    model, _ = make_case("mlp")
    x, y = torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="batch size 10 is smaller than num_subbatches=16"):
        SubBatchGradNorm(model, num_subbatches=16)(x, y)
    with pytest.raises(ValueError, match=r"x has batch size 10 .* but y has 9"):
        SubBatchGradNorm(model, num_subbatches=2)(x, y[:9])
    with pytest.raises(ValueError, match="beta must be finite and >= 0, got -1.0"):
        SubBatchGradNorm(model, beta=-1.0)
    with pytest.raises(ValueError, match="alpha must be finite and > 0, got 0.0"):
        SubBatchGradNorm(model, alpha=0.0)
    with pytest.raises(ValueError, match="num_subbatches must be an integer >= 1"):
        SubBatchGradNorm(model, num_subbatches=0)
    with pytest.raises(ValueError, match=r"per-example losses of shape \[B\] = \[10\].*got \(\)"):
        SubBatchGradNorm(model, num_subbatches=2, loss_fn=F.cross_entropy).backward(x, y)
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(DT)
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) .* sub-batch has 1 value per channel"):
        SubBatchGradNorm(bn, num_subbatches=10)(x, y)
    class Transposed(nn.Module):  # a Linear fed [features, B]: rows are not examples
        def forward(self, h):
            return h.T

    transposed = nn.Sequential(Transposed(), nn.Linear(10, 3), Transposed()).to(DT)
    with pytest.raises(ValueError, match=r"module '1' \(Linear\) got input \(4, 10\); expected dim 0 to be the batch"):
        SubBatchGradNorm(transposed, num_subbatches=2)(x, y)
    fallback, _ = make_case("vmap_fallback")
    fallback.insert(1, nn.BatchNorm1d(5).to(DT))
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) normalizes with batch statistics.*vmap"):
        SubBatchGradNorm(fallback, num_subbatches=2)(x, y)
    fallback.eval()
    SubBatchGradNorm(fallback, num_subbatches=2)(x, y).backward()


def test_grouped_modules_are_stock_types():
    assert nn.Linear in GROUPED_MODULES and nn.BatchNorm2d in GROUPED_MODULES
    assert Scale not in GROUPED_MODULES
