"""Fast rules reached through functional calls (fastcurv/layers/functional.py): modules without a
registered rule whose forward calls F.linear / addmm / matmul / F.embedding / F.layer_norm /
F.rms_norm / F.batch_norm or a broadcast ``x * w`` / ``x + w`` on their own parameters, each checked
against the float64 per-example loop (norms, Gram, penalty gradient), plus the fallback of the
parameters they cannot serve to the generic rule."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv import capture
from fastcurv.layers import FunctionalLayer, GenericLayer
from zoo import check_against_loop, loop_grads, trainable

pytestmark = [pytest.mark.filterwarnings("ignore::fastcurv.capture.GenericRuleWarning"), pytest.mark.usefixtures("float64_default")]


def fast_fraction(cap) -> float:
    """Fraction of the captured parameters (elements) served by fast rules in the last forward."""
    total = slow = 0
    for layer in cap.layers:
        for name, p in layer.params:
            total += p.numel()
            if isinstance(layer, GenericLayer) or (isinstance(layer, FunctionalLayer) and name in layer.generic_params):
                slow += p.numel()
    return 1 - slow / total


# ------------------------------------------------------------------ the modules (shaped like the real ones)
class RMSNorm(nn.Module):  # LlamaRMSNorm / MistralRMSNorm / Qwen2RMSNorm
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(d)), eps

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32) if dtype != torch.float64 else h
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class GemmaRMSNorm(RMSNorm):
    def forward(self, x):
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out * (1.0 + self.weight.double())


class FunctionalRMSNorm(RMSNorm):
    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Conv1D(nn.Module):  # Hugging Face GPT-2: W is [in, out], rows flattened
    def __init__(self, nf, nx):
        super().__init__()
        self.weight, self.bias, self.nf = nn.Parameter(torch.randn(nx, nf) * 0.3), nn.Parameter(torch.randn(nf)), nf

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class MatmulProj(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, d_out) * 0.3)

    def forward(self, x):
        return x @ self.w


class ScaledEmbedding(nn.Embedding):  # Gemma's normalizer, BART's BartScaledWordEmbedding
    def forward(self, ids):
        return super().forward(ids) * self.embedding_dim ** 0.5


class OffsetPositions(nn.Embedding):  # OPT / BART learned positions with an offset of 2
    def forward(self, mask):
        pos = (torch.cumsum(mask, 1) * mask - 1).long()
        return super().forward(pos + 2)


class LayerNorm2d(nn.LayerNorm):  # timm
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class Conv2dSame(nn.Conv2d):  # timm: TensorFlow's 'SAME' padding applied to the input, then F.conv2d unpadded
    def forward(self, x):
        pads = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), reversed(self.dilation)):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class GroupedSameConv(nn.Conv2d):  # F.conv2d with padding='same', dilation and groups, on its own parameters
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, 1, "same", self.dilation, self.groups)


class LayerScale2d(nn.Module):  # timm ConvNeXt: gamma reshaped to the channels
    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return x.mul(self.gamma.reshape(1, -1, 1, 1))


class BatchNormAct2d(nn.BatchNorm2d):  # timm: F.batch_norm then the activation (in place as timm builds it)
    def __init__(self, c, inplace=False):
        super().__init__(c)
        self.inplace = inplace

    def forward(self, x):
        bn_training = self.training or self.running_mean is None
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, 0.1, self.eps)
        return torch.relu_(x) if self.inplace else torch.relu(x)


class PosEmbed(nn.Module):  # a learned position table added to a batched tensor
    def __init__(self, n, d):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, n, d))

    def forward(self, x):
        return x + self.pos


class LinearTanh(nn.Linear):  # a subclass overriding forward
    def forward(self, x):
        return torch.tanh(super().forward(x)) * 2


class TwiceScaled(nn.Module):  # one parameter at two sites, one reaching its site through an op, one no site serves
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.gate = nn.Parameter(torch.randn(d))
        self.angle = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return (x * self.w) * self.w + x * torch.sigmoid(self.gate) + torch.atan2(x, self.angle.exp())


class Tokens(nn.Module):
    def __init__(self, inner, V=13, d=6):
        super().__init__()
        self.inner, self.head = inner, nn.Linear(d, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.inner(ids)).mean(1))


def seq_model(block, d=6):
    return nn.Sequential(nn.Linear(4, d), block, nn.Tanh(), nn.Linear(d, 3))


def conv_model(block, c=4):
    return nn.Sequential(nn.Conv2d(2, c, 3, padding=1), block, nn.Tanh(), nn.Flatten(), nn.Linear(c * 5 * 5, 3))


SEQ = {
    "llama_rmsnorm": lambda: RMSNorm(6), "gemma_rmsnorm": lambda: GemmaRMSNorm(6), "f_rms_norm": lambda: FunctionalRMSNorm(6),
    "conv1d_addmm": lambda: Conv1D(6, 6), "matmul": lambda: MatmulProj(6, 6), "linear_subclass": lambda: LinearTanh(6, 6),
    "pos_embed_add": lambda: PosEmbed(5, 6),
}
CONV = {"layernorm2d": lambda: LayerNorm2d(4), "layer_scale": lambda: LayerScale2d(4), "batchnorm_act_eval": lambda: BatchNormAct2d(4).eval(),
        "batchnorm_act_inplace_eval": lambda: BatchNormAct2d(4, inplace=True).eval(),
        "conv2d_same_even_kernel": lambda: Conv2dSame(4, 4, 2), "conv2d_same_bias_free": lambda: Conv2dSame(4, 4, 3, bias=False),
        "conv_same_grouped_dilated": lambda: GroupedSameConv(4, 4, (2, 3), dilation=(1, 2), groups=2, padding="same")}


def _losses(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("case", list(SEQ))
def test_sequence_modules_are_exact_on_fast_rules(case):
    torch.manual_seed(0)
    model = seq_model(SEQ[case]())
    x, y = torch.randn(4, 5, 4), torch.randint(0, 3, (4,))
    forward = lambda m: m(x).mean(1)  # noqa: E731
    check_against_loop(model, forward, lambda out: _losses(out, y))
    with capture(model) as cap:
        forward(model)
    assert fast_fraction(cap) == 1.0 and not cap.generic, cap.generic


@pytest.mark.parametrize("case", list(CONV))
def test_conv_modules_are_exact_on_fast_rules(case):
    torch.manual_seed(0)
    block = CONV[case]()
    if isinstance(block, nn.BatchNorm2d):
        block.running_mean.uniform_(-1, 1), block.running_var.uniform_(0.5, 2)
    model = conv_model(block)
    x, y = torch.randn(3, 2, 5, 5), torch.randint(0, 3, (3,))
    check_against_loop(model, lambda m: m(x), lambda out: _losses(out, y))
    with capture(model) as cap:
        model(x)
    assert fast_fraction(cap) == 1.0 and not cap.generic, cap.generic


@pytest.mark.parametrize("path", ["kernel", "unfold"])
def test_functional_strided_conv_same_both_paths(path, monkeypatch):
    """timm's Conv2dSame at stride 2 (asymmetric input padding, then F.conv2d) on the Conv rule's kernel and
    unfold paths: exact against the loop, on fast rules."""
    from fastcurv.layers.conv import ConvLayer

    monkeypatch.setattr(ConvLayer, "path", path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), Conv2dSame(4, 6, 3, stride=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(6 * 3 * 3, 3))
    x, y = torch.randn(3, 2, 5, 5), torch.randint(0, 3, (3,))
    check_against_loop(model, lambda m: m(x), lambda out: _losses(out, y))
    with capture(model) as cap:
        model(x)
    assert fast_fraction(cap) == 1.0 and not cap.generic, cap.generic


@pytest.mark.parametrize("case", ["layer_scale", "layernorm2d"])
def test_functional_module_output_modified_in_place_afterwards(case):
    """nn.ReLU(inplace=True) after a module served through its functional calls (torchvision's pattern
    around a layer-scale or norm subclass): exact, and its per-example check compares with a fresh run."""
    torch.manual_seed(0)
    block = CONV[case]()
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), block, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(100, 3))
    x, y = torch.randn(3, 2, 5, 5), torch.randint(0, 3, (3,))
    check_against_loop(model, lambda m: m(x), lambda out: _losses(out, y))
    with capture(model) as cap:
        model(x)
    assert fast_fraction(cap) == 1.0 and not cap.generic, cap.generic


@pytest.mark.parametrize("inner", ["scaled", "offset_positions"])
def test_embedding_subclasses_are_exact_on_fast_rules(inner):
    torch.manual_seed(0)
    emb = ScaledEmbedding(13, 6, padding_idx=1) if inner == "scaled" else OffsetPositions(12, 6)
    model = Tokens(emb)
    ids = torch.randint(0, 13, (4, 5))
    ids[0, 0] = 1
    arg = ids if inner == "scaled" else (ids > 2).long()
    y = torch.randint(0, 3, (4,))
    check_against_loop(model, lambda m: m(arg), lambda out: _losses(out, y))
    with capture(model) as cap:
        model(arg)
    assert fast_fraction(cap) == 1.0


@pytest.mark.parametrize("inplace", [False, True], ids=["activation", "inplace_activation"])
def test_batchnorm_subclass_in_train_mode_follows_the_batchnorm_option(inplace):
    torch.manual_seed(0)
    model = conv_model(BatchNormAct2d(4, inplace=inplace))
    x, y = torch.randn(3, 2, 5, 5), torch.randint(0, 3, (3,))
    with pytest.raises(RuntimeError, match=r"BatchNormAct2d.*batch statistics"):
        with capture(model):
            model(x)
    check_against_loop(model, lambda m: m(x), lambda out: _losses(out, y), capture_kwargs={"batchnorm": "exact"})


def test_parameters_no_site_serves_take_the_generic_rule_alone():
    torch.manual_seed(0)
    model = seq_model(TwiceScaled(6))
    x, y = torch.randn(4, 5, 4), torch.randint(0, 3, (4,))
    forward = lambda m: m(x).mean(1)  # noqa: E731
    check_against_loop(model, forward, lambda out: _losses(out, y))
    fastcurv.capture._reported.clear()
    with pytest.warns(fastcurv.capture.GenericRuleWarning, match=r"'1' \(no fast rule for TwiceScaled; '1.angle' is used by ExpBackward0\)"):
        with capture(model) as cap:
            forward(model)
    layer = next(l for l in cap.layers if l.name == "1")
    # sigmoid(gate) is a tensor of the parameters only, meeting the batch at x * (.): served there, mapped back
    # through the sigmoid by a vector-Jacobian product
    assert list(layer.generic_params) == ["1.angle"] and list(cap.generic) == ["1"]


def test_unprovable_flattened_rows_take_the_generic_rule():
    class SeqFirstFlatten(Conv1D):  # rows of x.transpose(0, 1) flattened: example of a row is not row // T
        def forward(self, x):
            flat = x.transpose(0, 1).reshape(-1, x.shape[-1])
            return torch.addmm(self.bias, flat, self.weight).view(x.shape[1], x.shape[0], -1).transpose(0, 1)

    torch.manual_seed(0)
    model = seq_model(SeqFirstFlatten(6, 6))
    x, y = torch.randn(4, 5, 4), torch.randint(0, 3, (4,))
    forward = lambda m: m(x).mean(1)  # noqa: E731
    check_against_loop(model, forward, lambda out: _losses(out, y))
    with capture(model) as cap:
        out = forward(model)
    # tentatively T consecutive rows per example; the capture's random-weighted check of the deltas refutes it
    cap.per_example_sqnorms(_losses(out, y))
    assert set(next(l for l in cap.layers if l.name == "1").generic_params) == {"1.weight", "1.bias"}
    assert "not T consecutive rows per example" in cap.generic["1"]


def test_dot_weighted_sum_and_grads_map_back_through_the_steps():
    """Conv1D's transposed weight, Gemma's 1 + w and the layer scale's reshape: every quantity of the
    per-example gradients (not only norms) comes back in the parameter's own layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Conv1D(5, 6), GemmaRMSNorm(5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(4, 3, 4), torch.randint(0, 3, (4,))
    params = [p for _, p in trainable(model)]
    G = loop_grads(_losses(model(x).mean(1), y), params)
    with capture(model) as cap:
        out = model(x).mean(1)
    losses = _losses(out, y)
    grads = cap.per_example_grads(losses)
    torch.testing.assert_close(torch.cat([grads[n].flatten(1) for n, _ in trainable(model)], 1), G)
    deltas = cap.deltas(losses)
    V = [torch.randn(2, *p.shape) for p in params]
    coeffs = torch.randn(4, 2)
    index = {id(p): k for k, p in enumerate(params)}
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    for layer, d in zip(cap.layers, deltas):
        vs = [V[index[id(p)]] for _, p in layer.params]
        cols = torch.cat([torch.arange(offsets[index[id(p)]], offsets[index[id(p)] + 1]) for _, p in layer.params])
        Vflat = torch.cat([v.flatten(1) for v in vs], 1)
        torch.testing.assert_close(layer.dot(d, vs), G[:, cols] @ Vflat.T)
        wsum = torch.cat([w.flatten(1) for w in layer.weighted_grad_sum(d, coeffs)], 1)
        torch.testing.assert_close(wsum, coeffs.T @ G[:, cols])


def test_the_recorder_is_gone_after_an_error_in_the_forward():
    class Boom(RMSNorm):
        def forward(self, x):
            raise ValueError("boom")

    model = seq_model(Boom(6))
    with pytest.raises(ValueError, match="boom"):
        with capture(model):
            model(torch.randn(2, 5, 4))
    from torch.overrides import _get_current_function_mode_stack
    assert not _get_current_function_mode_stack()


# ------------------------------------------------------------------ inputs without the batch dim (issue 20 item 5)
class PositionsLM(nn.Module):
    """HF GPT-2's embedding: position_ids [1, T] (no batch dim) added onto the token embeddings."""

    def __init__(self, V=11, D=6, T_max=8, use="add"):
        super().__init__()
        self.wte, self.wpe, self.use = nn.Embedding(V, D), nn.Embedding(T_max, D), use
        self.mix, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, idx):
        tokens = self.wte(idx)  # first: the first captured module's input sets the batch size
        p = self.wpe(torch.arange(idx.shape[1]).unsqueeze(0))
        x = tokens + p if self.use == "add" else tokens * torch.tanh(p)
        return self.head(torch.tanh(self.mix(x)).mean(1))


def test_broadcast_position_embedding_needs_no_batched_backward(monkeypatch):
    """The [1, T, D] output added onto [B, T, D]: its per-example deltas are the add's output gradient rows
    (summed over nothing here, over T for a [1, 1, D] table), exact against the loop, and the batched
    backward of the shared-input path never runs."""
    torch.manual_seed(0)
    model = PositionsLM()
    idx, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))

    def no_batched_backward(*args, **kwargs):
        raise AssertionError("the shared-input path's batched backward ran")

    monkeypatch.setattr(fastcurv.capture.Capture, "_per_example_deltas", no_batched_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastcurv.capture.SharedInputWarning)
        check_against_loop(model, lambda m: m(idx), lambda out: _losses(out, y))


def test_shared_input_used_otherwise_says_so_once_and_stays_exact():
    torch.manual_seed(0)
    model = PositionsLM(use="gate")
    idx, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    fastcurv.capture._reported.clear()
    with pytest.warns(fastcurv.capture.SharedInputWarning, match=r"'wpe' \(Embedding\) \(input \(1, 5\)\).*position_ids.expand"):
        check_against_loop(model, lambda m: m(idx), lambda out: _losses(out, y))


@pytest.mark.parametrize("shape", [(1, 5, 6), (5, 6), (1, 1, 6), (6,)])
def test_broadcast_delta_sums_over_the_broadcast_dims(shape):
    from fastcurv.capture import _broadcast_delta

    grad = torch.randn(4, 5, 6)
    shared = torch.zeros(shape)
    got = _broadcast_delta(grad, shared, 4)
    # example i's delta: the VJP of s -> (batched + s)[i] with row i of the add's output gradient
    want = torch.stack([torch.autograd.functional.vjp(lambda s: (torch.zeros(4, 5, 6) + s)[i], shared, grad[i])[1] for i in range(4)])
    torch.testing.assert_close(got, want)
    assert _broadcast_delta(torch.randn(4, 4, 6), torch.zeros(1, 4, 6), 4) is None  # a dim of size B: undecided


# ------------------------------------------------------------------ flattened batches (issue 16 item 3)
class FlatMLP(nn.Module):
    """OPT's decoder MLP: [B, T, d] flattened to [B*T, d] rows before LayerNorm / fc1 / fc2."""

    def __init__(self, d=6, seq_first=False):
        super().__init__()
        self.emb, self.ln, self.fc1, self.fc2, self.head = nn.Embedding(11, d), nn.LayerNorm(d), nn.Linear(d, 8), nn.Linear(8, d), nn.Linear(d, 3)
        self.seq_first = seq_first

    def forward(self, idx):
        h = self.emb(idx)
        shape = h.shape
        flat = (h.transpose(0, 1) if self.seq_first else h).reshape(-1, shape[-1])
        out = flat + self.fc2(torch.tanh(self.fc1(self.ln(flat))))
        out = out.view(shape[1], shape[0], -1).transpose(0, 1) if self.seq_first else out.view(shape)
        return self.head(out.mean(1))


def test_flattened_rows_are_regrouped_and_checked_once(monkeypatch):
    torch.manual_seed(0)
    model = FlatMLP()
    idx, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    check_against_loop(model, lambda m: m(idx), lambda out: _losses(out, y))
    cap = capture(model)
    calls = []
    original = fastcurv.capture.Capture._interacting
    monkeypatch.setattr(fastcurv.capture.Capture, "_interacting", lambda self, l, s, f: calls.append(len(s)) or original(self, l, s, f))
    for _ in range(2):
        with cap:
            out = model(idx)
        cap.per_example_sqnorms(_losses(out, y))
    # ln's input is a contiguous view of the [B, T, d] tensor (proven); fc1 and fc2 are checked on the first forward only
    assert calls == [2, 0] and fast_fraction(cap) == 1.0


def test_flattened_rows_of_another_layout_are_refused_with_the_fix():
    torch.manual_seed(0)
    model = FlatMLP(seq_first=True)
    idx, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    with capture(model) as cap:
        out = model(idx)
    with pytest.raises(RuntimeError, match=r"module 'ln' \(LayerNorm\) got \[B\*T, \.\.\.\] rows \(20, 6\) with batch size 4 "
                       r"\(dim 0 of the input \(4, 5\) of module 'emb' \(Embedding\).*taken as the batch\).*Flatten batch-first"):
        cap.per_example_sqnorms(_losses(out, y))


@pytest.mark.parametrize("inplace", [False, True], ids=["activation", "inplace_activation"])
def test_batchnorm_subclass_frozen_stats_keeps_its_own_forward(inplace):
    """batchnorm="frozen_stats" on BatchNormAct2d: its forward runs as written (the activation too), only
    its F.batch_norm holds the batch statistics constant; against a loop over one full-batch forward with
    the statistics detached."""
    from torch.overrides import TorchFunctionMode

    class DetachedStats(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            call = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"), args), **kwargs)
            if func is F.batch_norm and call["training"]:
                x, w, b, eps = call["input"], call["weight"], call["bias"], call["eps"]
                dims, shape = [0, 2, 3], [1, -1, 1, 1]
                mean, var = x.mean(dims, keepdim=True).detach(), x.var(dims, unbiased=False, keepdim=True).detach()
                return (x - mean) / torch.sqrt(var + eps) * w.view(shape) + b.view(shape)
            return func(*args, **kwargs)

    torch.manual_seed(0)
    model = conv_model(BatchNormAct2d(4, inplace=inplace))
    x, y = torch.randn(3, 2, 5, 5), torch.randint(0, 3, (3,))
    params = [p for _, p in trainable(model)]
    with DetachedStats():
        want_out = model(x)
        G = loop_grads(_losses(want_out, y), params)
    with capture(model, batchnorm="frozen_stats") as cap:
        out = model(x)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(cap.per_example_sqnorms(_losses(out, y)), G.square().sum(1))
    torch.testing.assert_close(cap.per_example_gram(_losses(out, y)), G @ G.T)
    assert fast_fraction(cap) == 1.0


class _BatchedConstant(nn.Module):
    """A parameter combined with batched data that needs no grad (the model's input) by an op no site knows: the
    result is per example, not a tensor of the parameters only, so it must not be served as one."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.lerp(self.w, x.detach(), 0.5)


def test_parameter_mixed_with_batched_data_without_grad_is_not_a_parameter_tensor():
    torch.manual_seed(0)
    model = _BatchedConstant(4).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 4, (3,))
    check_against_loop(model, lambda m: m(x), lambda out: _losses(out, y))


class _Windows(nn.Module):
    """Swin's pattern: rows of windows, [B * windows, ...], not provably batch-first (a permuted copy), through the
    module's own weight; the output is then modified in place by the next layer (ReLU(inplace=True))."""

    def __init__(self, d=6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):  # x [B, T, d], T even: windows of 2 positions
        B, T, d = x.shape
        # windows of positions (i, i + T/2): a copy, so the rows are only checked, not proven batch-first
        rows = x.view(B, 2, T // 2, d).transpose(1, 2).reshape(B * T // 2, 2, d)
        out = F.linear(rows, self.weight)  # [B * T/2, 2, d]
        return out.view(B, T // 2, 2, d).transpose(1, 2).reshape(B, T, d)


def test_window_rows_are_checked_and_exact_with_an_in_place_op_after():
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _Windows(), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x, y = torch.randn(3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    forward = lambda m: m(x).mean(1)  # noqa: E731
    check_against_loop(model, forward, lambda out: _losses(out, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastcurv.capture.GenericRuleWarning)  # the fallback is not needed
        with capture(model) as cap:
            out = forward(model)
        cap.per_example_sqnorms(_losses(out, y))
    assert not next(l for l in cap.layers if l.name == "1").generic_params
