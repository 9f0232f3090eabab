"""Models the fast rules alone do not cover: the generic rule, shared parameters (tied weights, a
module called twice), inputs without a batch dim, sequence-first layouts, BatchNorm with batch
statistics. Everything in float64 against the per-example autograd loop of tests/zoo.py."""
import math

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv.capture import capture
from zoo import check_against_loop, loop_grads

pytestmark = [pytest.mark.filterwarnings("ignore::fastcurv.capture.GenericRuleWarning"), pytest.mark.usefixtures("float64_default")]


def ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none").reshape(y.shape).reshape(y.shape[0], -1).sum(1)


# ------------------------------------------------------------------ the generic rule
class Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(()))

    def forward(self, x):
        return x * self.scale + self.shift * x.square()


class Gated(nn.Module):
    """A parameter used through an op no functional rule serves (Scale's x * w and w * x^2 are fast)."""

    def __init__(self, d):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(d))

    def forward(self, x):
        # (x * torch.sigmoid(self.gate) is fast now: a tensor of the parameters only, served where it meets x)
        return x * torch.atan2(x, self.gate)


class MyLinear(nn.Linear):
    def forward(self, x):
        return torch.tanh(super().forward(x)) * 2


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(4, 4, 3)

    def forward(self, x):
        return self.bil(x, torch.tanh(x))


@pytest.mark.parametrize(
    "custom", [lambda: Scale(4), lambda: Gated(4), lambda: nn.PReLU(4), lambda: MyLinear(4, 4), lambda: nn.Sequential(TwoInputs(), nn.Linear(3, 4))],
    ids=["custom_param", "custom_param_generic", "prelu", "subclass_forward", "bilinear_two_inputs"],
)
def test_generic_rule_is_exact(custom):
    model = nn.Sequential(nn.Linear(3, 4), custom(), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    check_against_loop(model, lambda m: m(x), lambda out: F.cross_entropy(out, y, reduction="none"))
    cap = capture(model)
    assert cap.generic, "the custom module should be reported as going through the generic rule"


def test_generic_rule_refuses_modules_that_mix_the_batch():
    class Centre(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return (x - x.mean(0)) * self.w  # examples interact

    model = nn.Sequential(nn.Linear(3, 4), Centre(), nn.Linear(4, 2))
    with capture(model) as cap:
        out = model(torch.randn(5, 3))
    with pytest.raises(RuntimeError, match=r"module '1' \(Centre\).*examples interact"):
        cap.per_example_sqnorms(out.sum(1))


def test_generic_rule_is_reported_once():
    fastcurv.capture._reported.clear()
    model = nn.Sequential(nn.Linear(3, 4), Gated(4))
    match = r"generic rule for '1' \(no fast rule for Gated; '1.gate' is used by Atan2Backward0\)"
    with pytest.warns(fastcurv.capture.GenericRuleWarning, match=match):
        with capture(model):
            model(torch.randn(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastcurv.capture.GenericRuleWarning)
        with capture(model):  # said once
            model(torch.randn(2, 3))
        with capture(nn.Sequential(nn.Linear(3, 4), Scale(4))) as cap:  # served by the functional rules: nothing to say
            cap.model(torch.randn(2, 3))
    assert not cap.generic


# ------------------------------------------------------------------ shared parameters
class TiedLM(nn.Module):
    """GPT-2 / nanoGPT: the token embedding is the output projection, positions are unbatched."""

    def __init__(self, V=11, D=6, T_max=8, bias=False):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(T_max, D)
        self.ln = nn.LayerNorm(D)
        self.mix = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=bias)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        x = x + torch.tanh(self.mix(self.ln(x)))
        return self.lm_head(x)


@pytest.mark.parametrize("B, T", [(3, 5), (4, 4), (1, 6), (5, 1)], ids=["T!=B", "T==B", "B=1", "T=1"])
def test_tied_embedding_and_unbatched_positions(B, T):
    torch.manual_seed(B * 10 + T)
    model = TiedLM()
    idx = torch.randint(0, 11, (B, T))
    idx[0, 0] = idx[-1, -1]  # repeated tokens across and within examples
    targets = torch.randint(0, 11, (B, T))
    by_layer = check_against_loop(model, lambda m: m(idx), lambda out: ce(out, targets))
    assert "shared:wte.weight" in by_layer


def test_module_called_twice_siamese():
    tower = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    head = nn.Linear(4, 2)

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower, self.head = tower, head

        def forward(self, pair):
            a, b = pair[:, 0], pair[:, 1]
            return self.head(self.tower(a) * self.tower(b))

    x, y = torch.randn(6, 2, 3), torch.randint(0, 2, (6,))
    check_against_loop(Siamese(), lambda m: m(x), lambda out: F.cross_entropy(out, y, reduction="none"))


def test_weight_tied_across_two_linear_modules_and_a_norm_called_twice():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight  # bias stays separate
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.b(torch.tanh(self.norm(self.a(x)))))

    x = torch.randn(5, 3, 4)
    check_against_loop(Tied(), lambda m: m(x), lambda out: out.square().sum((1, 2)))


# ------------------------------------------------------------------ layouts
def test_sequence_first_linear_is_exact():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):  # b sees [T, B, d]
            return self.b(torch.tanh(self.a(x)).transpose(0, 1)).sum(0)

    for B, T in [(4, 6), (5, 5)]:
        x, y = torch.randn(B, T, 3), torch.randint(0, 2, (B,))
        check_against_loop(SeqFirst(), lambda m: m(x), lambda out: F.cross_entropy(out, y, reduction="none"))


def test_class_embedding_of_batch_size_is_per_example():
    """A 1-D embedding input of length B that IS per example (labels): kept per example."""

    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(4, 3), nn.Linear(3, 3)

        def forward(self, x, c):
            return self.lin(x) * self.emb(c)

    B = 5
    x, c = torch.randn(B, 3), torch.randint(0, 4, (B,))
    check_against_loop(Cond(), lambda m: m(x, c), lambda out: out.square().sum(1))


# ------------------------------------------------------------------ BatchNorm with batch statistics
def _bn_net(bn_cls=nn.BatchNorm1d):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), bn_cls(4), nn.Tanh(), nn.Linear(4, 2)).train()


def test_batchnorm_exact_mode_matches_the_loop():
    model = _bn_net()
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    check_against_loop(model, lambda m: m(x), lambda out: F.cross_entropy(out, y, reduction="none"),
                       capture_kwargs={"batchnorm": "exact"})


def test_batchnorm_frozen_stats_is_the_gradient_with_constant_statistics():
    model = _bn_net()
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    bn = model[1]
    # oracle: the same forward with the batch statistics detached
    h = model[0](x)
    mean, var = h.mean(0).detach(), h.var(0, unbiased=False).detach()
    out = model[3](torch.tanh((h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias))
    params = list(model.parameters())
    ref = loop_grads(F.cross_entropy(out, y, reduction="none"), params).square().sum(1)
    running = bn.running_mean.clone()
    with capture(model, batchnorm="frozen_stats") as cap:
        out2 = model(x)
    losses = F.cross_entropy(out2, y, reduction="none")
    torch.testing.assert_close(cap.per_example_sqnorms(losses), ref)
    # the forward and the training gradient are BatchNorm's own
    model2 = _bn_net()
    torch.testing.assert_close(out2, model2(x))
    assert not torch.equal(bn.running_mean, running)  # running statistics were updated as usual
    losses.mean().backward()
    g = [p.grad.clone() for p in model.parameters()]
    F.cross_entropy(model2(x), y).backward()
    for a, b in zip(g, model2.parameters()):
        torch.testing.assert_close(a, b.grad)


class _ConvBNBlock(nn.Module):
    """One conv -> BatchNorm2d -> in-place ReLU block and a linear head (torchvision's pattern)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3, 4)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x)), inplace=True).mean((2, 3)))


@pytest.mark.parametrize("mode", ["frozen_stats", "exact"])
def test_batchnorm_train_mode_penalty_gradient_against_torch_func(mode):
    """The gradient of P = mean_i ||g_i||^2 with train-mode BatchNorm, against a functional reference
    written out with torch.func (no capture, no autograd hooks) and central finite differences of P.
    exact: g_i is grad l_i of the coupled batch. frozen_stats: g_i holds the batch statistics s constant,
    but s = s(theta) is the batch's, so dP/dtheta includes (dP/ds)(ds/dtheta)."""
    from torch.func import grad, jacrev

    torch.manual_seed(0)
    model = _ConvBNBlock().train()
    B = 4
    x, y = torch.randn(B, 2, 5, 5), torch.randint(0, 4, (B,))
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    shape = [1, -1, 1, 1]

    def conv(th):
        return F.conv2d(x, th["conv.weight"], th["conv.bias"], padding=1)

    def batch_stats(th):
        z = conv(th)
        return z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)

    def losses(th, stats):
        mean, var = stats
        h = (conv(th) - mean.view(shape)) / torch.sqrt(var.view(shape) + model.bn.eps)
        h = F.relu(h * th["bn.weight"].view(shape) + th["bn.bias"].view(shape))
        return F.cross_entropy(F.linear(h.mean((2, 3)), th["fc.weight"], th["fc.bias"]), y, reduction="none")

    def penalty(th):
        if mode == "exact":  # the statistics inside the differentiated function: coupled examples
            J = jacrev(lambda t: losses(t, batch_stats(t)))(th)
        else:  # differentiated with the statistics fixed at their value for th
            s = batch_stats(th)
            J = jacrev(lambda t: losses(t, s))(th)
        return torch.cat([J[n].reshape(B, -1) for n in names], 1).square().sum(1).mean()

    want = grad(penalty)(theta)
    v = {n: torch.randn_like(t) for n, t in theta.items()}
    eps = 1e-5
    fd = (penalty({n: theta[n] + eps * v[n] for n in names}) - penalty({n: theta[n] - eps * v[n] for n in names})) / (2 * eps)
    torch.testing.assert_close(sum((want[n] * v[n]).sum() for n in names), fd, rtol=1e-6, atol=1e-8)

    with capture(model, batchnorm=mode) as cap:
        out = model(x)
    sq = cap.per_example_sqnorms(F.cross_entropy(out, y, reduction="none"), create_graph=True)
    got = torch.autograd.grad(sq.mean(), list(model.parameters()))
    for n, g in zip(names, got):
        torch.testing.assert_close(g, want[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"penalty gradient of {n}: {m}")


def test_batchnorm_default_refusal_names_both_options():
    model = _bn_net()
    with pytest.raises(RuntimeError, match=r"batchnorm='frozen_stats'.*batchnorm='exact'"):
        with capture(model):
            model(torch.randn(4, 3))


# ------------------------------------------------------------------ results that must not mislead
def test_results_without_create_graph_are_detached():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with capture(model) as cap:
        out = model(torch.randn(5, 3))
    s = cap.per_example_sqnorms(out.square().sum(1))
    assert s.grad_fn is None and not s.requires_grad
    assert cap.per_example_sqnorms(out.square().sum(1), create_graph=True).requires_grad


def test_loss_partly_outside_the_capture_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with capture(model) as cap:
        out = model(x)
    losses = out.square().sum(1) + model(x).square().sum(1)
    with pytest.raises(RuntimeError, match=r"parameter '.*' through a path that does not go through"):
        cap.per_example_sqnorms(losses)


def test_parameter_used_outside_its_module_is_refused():
    class Leak(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(self.a(x) + F.linear(x, self.a.weight))

    model = Leak()
    with capture(model) as cap:
        out = model(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match=r"'a.weight' through a path"):
        cap.per_example_sqnorms(out.sum(1))


def test_norms_after_backward_explain_the_order():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with capture(model) as cap:
        out = model(torch.randn(5, 3))
    losses = out.square().sum(1)
    losses.mean().backward()
    with pytest.raises(RuntimeError, match=r"already freed by a backward\(\).*retain_graph=True"):
        cap.per_example_sqnorms(losses)


def test_compiled_wrapper_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"torch.compile\(\) wrapper.*model.compile\(\)"):
        capture(torch.compile(model))


@pytest.mark.parametrize("mode", ["frozen_stats", "exact"])
def test_resnet18_with_train_mode_batchnorm(mode):
    """ResNet-18 topology (narrow, 16x16 inputs to keep the float64 loop short) in train mode."""
    from fastcurv.models import resnet18

    torch.manual_seed(0)
    model = resnet18(width=4).train()
    x, y = torch.randn(3, 3, 16, 16), torch.randint(0, 10, (3,))
    if mode == "exact":
        check_against_loop(model, lambda m: m(x), lambda out: F.cross_entropy(out, y, reduction="none"),
                           capture_kwargs={"batchnorm": mode})
        return
    # frozen_stats: the oracle is the same network with every BatchNorm's statistics detached
    def frozen(m):
        bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
        saved = [b.forward for b in bns]
        for b in bns:
            b.forward = (lambda b: lambda h: (h - h.mean((0, 2, 3), keepdim=True).detach())
                         / torch.sqrt(h.var((0, 2, 3), unbiased=False, keepdim=True).detach() + b.eps)
                         * b.weight.view(1, -1, 1, 1) + b.bias.view(1, -1, 1, 1))(b)
        try:
            return m(x)
        finally:
            for b, f in zip(bns, saved):
                b.forward = f

    params = [p for p in model.parameters()]
    ref = loop_grads(F.cross_entropy(frozen(model), y, reduction="none"), params).square().sum(1)
    with capture(model, batchnorm="frozen_stats") as cap:
        out = model(x)
    torch.testing.assert_close(cap.per_example_sqnorms(F.cross_entropy(out, y, reduction="none")), ref)


def test_broadcast_positions_need_no_batched_backward(monkeypatch):
    """wte(idx) + wpe(arange(T)): the add's output gradient is wpe's per-example delta."""
    model = TiedLM()
    idx, targets = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))

    def refuse(*args, **kwargs):
        raise AssertionError("took the batched backward")

    monkeypatch.setattr(fastcurv.capture.Capture, "_per_example_deltas", refuse)
    check_against_loop(model, lambda m: m(idx), lambda out: ce(out, targets))


def test_sequence_first_layernorm_with_t_equal_b_is_refused():
    """A LayerNorm fed [T, B, E] with T == B looks batch-first; the random-weighted check catches it."""

    class SeqFirstNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = nn.Linear(3, 3), nn.LayerNorm(3)

        def forward(self, x):  # x [B, T, 3]
            return self.norm(torch.tanh(self.lin(x)).transpose(0, 1)).sum(0)

    model = SeqFirstNorm()
    with capture(model) as cap:
        out = model(torch.randn(4, 4, 3))
    with pytest.raises(RuntimeError, match=r"module 'norm' \(LayerNorm\) is not the batch.*batch_first=True"):
        cap.per_example_sqnorms(out.square().sum(1))


def test_ambiguous_layout_is_checked_once_per_capture(monkeypatch):
    """T == B: the random-weighted check runs at the first query, not again for the Gram."""
    model = TiedLM()
    idx, targets = torch.randint(0, 11, (4, 4)), torch.randint(0, 11, (4, 4))
    calls = []
    original = fastcurv.capture.Capture._interacting

    def counting(self, losses, suspects, found):
        calls.append(len(suspects))
        return original(self, losses, suspects, found)

    monkeypatch.setattr(fastcurv.capture.Capture, "_interacting", counting)
    with capture(model) as cap:
        out = model(idx)
    losses = ce(out, targets)
    first = cap.per_example_sqnorms(losses)
    cap.per_example_gram(losses)
    assert calls[0] > 0 and all(n == 0 for n in calls[1:])
    torch.testing.assert_close(cap.per_example_gram(losses).diagonal(), first)
