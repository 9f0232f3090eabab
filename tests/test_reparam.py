"""Layers whose weights are rebuilt before the forward (prune, weight_norm, spectral_norm,
parametrizations): per-example gradients w.r.t. the stored parameters against a float64 loop of
separate per-example forwards (norms, Gram, per_example_grads names, the penalty's gradient)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import fastcurv

KINDS = ["prune", "weight_norm_hook", "spectral_norm_hook", "weight_norm", "spectral_norm", "orthogonal",
         "prune_conv", "weight_norm_embedding"]


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "prune_conv":
        m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        prune.random_unstructured(m[0], "weight", amount=0.5)
        return m.double()
    if kind == "weight_norm_embedding":
        m = nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(12, 3))
        parametrizations.weight_norm(m[0])
        return m.double()
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm is deprecated, still used
        if kind == "prune":
            prune.l1_unstructured(m[0], "weight", amount=0.4)
            prune.random_unstructured(m[0], "bias", amount=0.3)
        elif kind == "weight_norm_hook":
            torch.nn.utils.weight_norm(m[2])
        elif kind == "spectral_norm_hook":
            torch.nn.utils.spectral_norm(m[2])
        elif kind == "weight_norm":
            parametrizations.weight_norm(m[0])
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(m[2])
        elif kind == "orthogonal":
            parametrizations.orthogonal(m[2])
    return m


def _inputs(kind: str, B: int = 5):
    g = torch.Generator().manual_seed(1)
    if kind == "prune_conv":
        x = torch.randn(B, 2, 6, generator=g, dtype=torch.float64)
    elif kind == "weight_norm_embedding":
        x = torch.randint(0, 9, (B, 3), generator=g)
    else:
        x = torch.randn(B, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (B,), generator=g)


def _buffers(m):
    return [b.detach().clone() for b in m.buffers()]


def _restore(m, saved):
    with torch.no_grad():
        for b, v in zip(m.buffers(), saved):
            if not torch.equal(b, v):  # only spectral norm's u, v change (a mask's in-place copy would break graphs)
                b.copy_(v)


def _oracle(m, x, y, names, state):
    """Per-example gradients of the stored parameters, one forward per example (each from the same
    spectral-norm state as the batched forward, so its power iteration gives the same u, v)."""
    params = dict(m.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        _restore(m, state)
        loss = F.cross_entropy(m(x[i:i + 1]), y[i:i + 1], reduction="sum")
        g = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        rows.append(torch.cat([t.flatten() for t in g]))
    return torch.stack(rows)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_reparametrized_layers_match_float64_loop(kind, train):
    m = _model(kind).train(train)
    x, y = _inputs(kind)
    state = _buffers(m)
    with fastcurv.capture(m) as cap:
        out = m(x)
    after = _buffers(m)
    losses = F.cross_entropy(out, y, reduction="none")
    grads = cap.per_example_grads(losses)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert sorted(grads) == sorted(trainable)  # keyed by the stored names (weight_orig, original0, ...)
    names = list(grads)
    ref = _oracle(m, x, y, names, state)
    got = torch.cat([grads[n].flatten(1) for n in names], 1)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-9, atol=1e-11)
    s = cap.per_example_sqnorms(losses)
    torch.testing.assert_close(s, ref.detach().square().sum(1), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(cap.per_example_gram(losses), ref.detach() @ ref.detach().T, rtol=1e-9, atol=1e-11)
    # the penalty's gradient w.r.t. the stored parameters, through the reparametrization
    s = cap.per_example_sqnorms(losses, create_graph=True)
    params = [dict(m.named_parameters())[n] for n in names]
    got_pen = torch.autograd.grad(s.sum(), params, retain_graph=True)
    ref_pen = torch.autograd.grad(ref.square().sum(), params)
    for n, a, b in zip(names, got_pen, ref_pen):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=n)
    # the capture ran the power iteration exactly as often as an uncaptured forward
    _restore(m, state)
    m(x)
    for a, b in zip(after, _buffers(m)):
        torch.testing.assert_close(a, b)


def test_reparametrized_rule_it_cannot_serve_is_refused():
    m = nn.Sequential(nn.Linear(4, 4), nn.PReLU())
    prune.random_unstructured(m[1], "weight", amount=0.0)
    with pytest.raises(TypeError, match=r"'1' \(PReLU\) has reparametrized tensors \['weight'\]"):
        fastcurv.capture(m)


def test_parametrization_inside_cached_context_and_second_step():
    """A user's own parametrize.cached() around the forward, and a second capture step (the recorded
    weight of the first step is not reused)."""
    m = _model("spectral_norm")
    x, y = _inputs("spectral_norm")
    cap = fastcurv.capture(m)
    for _ in range(2):
        state = _buffers(m)
        with parametrize.cached(), cap:
            out = m(x)
        losses = F.cross_entropy(out, y, reduction="none")
        s = cap.per_example_sqnorms(losses, create_graph=True)
        names = [n for n, _ in cap.params]
        ref = _oracle(m, x, y, names, state)
        torch.testing.assert_close(s.detach(), ref.detach().square().sum(1), rtol=1e-9, atol=1e-11)
        (losses.mean() + s.mean()).backward()


def test_custom_pre_hook_rebuilding_the_weight_is_refused():
    lin = nn.Linear(4, 3)
    raw = lin.weight
    del lin.weight
    lin.register_parameter("weight_raw", raw)
    lin.weight = torch.sin(lin.weight_raw)
    lin.register_forward_pre_hook(lambda m, a: setattr(m, "weight", torch.sin(m.weight_raw)))
    with pytest.raises(TypeError, match=r"module '0' \(Linear\).weight is not one of its parameters"):
        fastcurv.capture(nn.Sequential(lin))


@pytest.mark.parametrize("kind", ["prune", "weight_norm_hook", "spectral_norm_hook", "weight_norm", "spectral_norm",
                                  "orthogonal"])
def test_group_lasso_on_reparametrized_layers(kind):
    """The penalty is on the effective weight, differentiated into the stored parameters, at every step."""
    from fastcurv.regularizers import GroupLasso

    m = _model(kind).train()
    x, _ = _inputs(kind)
    reg = GroupLasso(m, lam=0.1)
    stored = [p for n, p in m.named_parameters() if "weight" in n and ("orig" in n or n.endswith(("_g", "_v")))]
    assert stored
    for _ in range(2):  # the second step used to hit a freed graph
        m(x)  # the forward (and spectral_norm's power iteration) of a training step
        with torch.no_grad():
            weights = [mod.weight.detach().clone() for mod in m.modules() if isinstance(mod, nn.Linear)]
        penalty = reg()
        expect = 0.1 * sum(torch.linalg.vector_norm(w, dim=1).sum() for w in weights)
        torch.testing.assert_close(penalty, expect, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(penalty, stored)
        assert all(g.abs().sum() > 0 for g in grads)  # the gradient reaches weight_orig / original0 / ...


def test_fisher_norm_batch_on_a_pruned_layer_matches_the_plain_layer():
    """FisherNorm(mode='batch') on weight = weight_orig * mask equals the penalty on a plain layer holding that
    weight, and its gradient reaches weight_orig as mask * (gradient w.r.t. the weight), at every step."""
    from fastcurv.regularizers import FisherNorm

    m = _model("prune")
    plain = _model("prune")
    prune.remove(plain[0], "weight")
    prune.remove(plain[0], "bias")
    x, y = _inputs("prune")
    reg, reg_plain = FisherNorm(m[0], gamma=0.5, beta=0.1), FisherNorm(plain[0], gamma=0.5, beta=0.1)
    for _ in range(2):
        penalty = reg(F.cross_entropy(m(x), y))
        expect = reg_plain(F.cross_entropy(plain(x), y))
        torch.testing.assert_close(penalty, expect, rtol=1e-12, atol=1e-12)
        (g_orig,) = torch.autograd.grad(penalty, [m[0].weight_orig])
        (g_plain,) = torch.autograd.grad(expect, [plain[0].weight])
        torch.testing.assert_close(g_orig, g_plain * m[0].weight_mask, rtol=1e-10, atol=1e-12)


def test_fisher_norm_refuses_what_it_cannot_do_exactly():
    from fastcurv.regularizers import FisherNorm

    with pytest.raises(ValueError, match=r"FisherNorm\(mode='batch'\): the \['weight'\] of layer ParametrizedLinear are rebuilt"):
        FisherNorm(_model("weight_norm")[0], gamma=0.1)
    with pytest.raises(ValueError, match=r"FisherNorm\(mode='per_example'\): the \['bias', 'weight'\] of layer"):
        FisherNorm(_model("prune")[0], gamma=0.1, mode="per_example")


def _subbatch_oracle(m, x, y, alpha, M):
    """R_alpha and grad [L(B) + R_alpha] (g_k held constant) w.r.t. the stored parameters, one functional
    forward per sub-batch (example i in sub-batch i mod M)."""
    from torch.func import functional_call

    names = [n for n, p in m.named_parameters() if p.requires_grad]
    w = {n: p for n, p in m.named_parameters() if p.requires_grad}
    full = F.cross_entropy(m(x), y)
    total = torch.autograd.grad(full, [w[n] for n in names])
    penalty, extra = 0.0, [torch.zeros_like(t) for t in total]
    for k in range(M):
        xk, yk = x[k::M], y[k::M]
        clean = F.cross_entropy(functional_call(m, w, (xk,)), yk)
        g = torch.autograd.grad(clean, [w[n] for n in names])
        shifted_w = {n: w[n] - alpha * gk.detach() for n, gk in zip(names, g)}
        shifted = F.cross_entropy(functional_call(m, shifted_w, (xk,)), yk)
        gs = torch.autograd.grad(shifted, [shifted_w[n] for n in names])
        penalty = penalty + (clean - shifted).detach() / M
        extra = [e + (a - b) / M for e, a, b in zip(extra, g, gs)]
    return penalty, {n: t + e for n, t, e in zip(names, total, extra)}


@pytest.mark.parametrize("kind", ["prune", "weight_norm_hook", "spectral_norm_hook", "weight_norm", "spectral_norm",
                                  "orthogonal", "lstm"])
def test_subbatch_grad_norm_on_reparametrized_and_recurrent_layers(kind):
    """SubBatchGradNorm through the functional fallback (LSTM: a loop over sub-batches, since aten::lstm has no
    vmap rule): R_alpha and the step's gradient w.r.t. the stored parameters against a per-sub-batch loop."""
    from fastcurv.regularizers import SubBatchGradNorm

    if kind == "lstm":
        torch.manual_seed(0)
        m = nn.Sequential(nn.LSTM(4, 5, batch_first=True), _LastStep(), nn.Linear(5, 3)).double()
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(6, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    else:
        m = _model(kind).eval()
        x, y = _inputs(kind, B=6)
    penalty, grads = _subbatch_oracle(m, x, y, alpha=0.05, M=2)
    reg = SubBatchGradNorm(m, alpha=0.05, beta=1.0, num_subbatches=2)
    for p in m.parameters():
        p.grad = None
    reg.backward(x, y)
    torch.testing.assert_close(reg.last_penalty, penalty, rtol=1e-9, atol=1e-12)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-8, atol=1e-11, msg=n)


class _LastStep(nn.Module):
    def forward(self, out):
        return out[0][:, -1]
