"""Attention: the nn.MultiheadAttention rule (every option), transformer containers, a ViT and a
nanoGPT-style GPT (SDPA), all in float64 against the per-example autograd loop of tests/zoo.py;
and the curvature penalty's double backward through SDPA."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastcurv
from fastcurv.capture import capture
from fastcurv.layers.attention import MultiheadAttentionLayer
from fastcurv.regularizers.curvature import Curvature
from zoo import check_against_loop, loop_grads, trainable

pytestmark = pytest.mark.filterwarnings("ignore::fastcurv.capture.GenericRuleWarning")


@pytest.fixture(autouse=True)
def _f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def on_math_sdpa(forward):
    """The oracle's forward with SDPA on its math backend: the loop's penalty gradient needs a double
    backward, which the fused CPU kernels (used by stock MHA with need_weights=False) do not have."""

    def run(model):
        with sdpa_kernel(SDPBackend.MATH):
            return forward(model)

    return run


# ------------------------------------------------------------------ nn.MultiheadAttention
MHA_CONFIGS = {
    "plain": dict(),
    "seq_first": dict(batch_first=False),
    "bias_kv": dict(add_bias_kv=True),
    "bias_kv_seq_first": dict(add_bias_kv=True, batch_first=False),
    "kdim_vdim": dict(kdim=3, vdim=5),
    "no_bias": dict(bias=False),
    "zero_attn": dict(add_zero_attn=True, add_bias_kv=True),
}


class Attend(nn.Module):
    """Cross-attention from a batch-first query projection to separate keys/values, then a head."""

    def __init__(self, E=4, heads=2, **kw):
        super().__init__()
        self.inp = nn.Linear(3, E)
        kw.setdefault("batch_first", True)
        self.attn = nn.MultiheadAttention(E, heads, **kw)
        self.head = nn.Linear(E, 2)

    def forward(self, x, kv_k, kv_v, **call):
        q = torch.tanh(self.inp(x))
        if not self.attn.batch_first:
            q, kv_k, kv_v = (t.transpose(0, 1) for t in (q, kv_k, kv_v))
        out, w = self.attn(q, kv_k, kv_v, **call)
        if not self.attn.batch_first:
            out = out.transpose(0, 1)
        weights_term = 0 if w is None else w.reshape(w.shape[0], -1).square().sum(1, keepdim=True)  # rows sum to 1
        return self.head(out).sum(1) + weights_term


def _kv(B, S, kw):
    return torch.randn(B, S, kw.get("kdim", 4)), torch.randn(B, S, kw.get("vdim", 4))


@pytest.mark.parametrize("config", list(MHA_CONFIGS), ids=list(MHA_CONFIGS))
def test_multihead_attention_matches_the_loop(config):
    torch.manual_seed(0)
    kw = MHA_CONFIGS[config]
    model = Attend(**kw)
    B, L, S = 3, 4, 5
    x = torch.randn(B, L, 3)
    kk, vv = _kv(B, S, kw)
    y = torch.randint(0, 2, (B,))
    check_against_loop(model, lambda m: m(x, kk, vv), lambda out: F.cross_entropy(out, y, reduction="none"))
    cap = capture(model)
    assert isinstance(next(l for l in cap.layers if l.name == "attn"), MultiheadAttentionLayer)
    assert not cap.generic


@pytest.mark.parametrize("masks", ["key_padding_bool", "attn_bool", "attn_float_3d", "both", "weights_per_head"])
def test_multihead_attention_masks_and_weights(masks):
    torch.manual_seed(1)
    model = Attend(add_bias_kv=True)
    B, L, S, H = 3, 4, 5, 2
    x = torch.randn(B, L, 3)
    kk, vv = _kv(B, S, {})
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, 0] = True
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    call = {
        "key_padding_bool": dict(key_padding_mask=pad),
        "attn_bool": dict(attn_mask=causal),
        "attn_float_3d": dict(attn_mask=torch.randn(B * H, L, S)),
        "both": dict(attn_mask=causal, key_padding_mask=pad, need_weights=False),
        "weights_per_head": dict(average_attn_weights=False, key_padding_mask=pad),
    }[masks]
    check_against_loop(model, on_math_sdpa(lambda m: m(x, kk, vv, **call)), lambda out: out.square().sum(1))


@pytest.mark.parametrize("config", ["plain", "seq_first", "bias_kv", "kdim_vdim", "zero_attn"])
def test_captured_forward_equals_the_stock_module(config):
    """Outputs and returned attention weights of the captured (re-implemented) forward are the module's."""
    torch.manual_seed(2)
    kw = dict(MHA_CONFIGS[config])
    batch_first = kw.pop("batch_first", True)
    mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, **kw)
    B, L, S = 3, 4, 5
    q = torch.randn(B, L, 4)
    kk, vv = _kv(B, S, kw)
    if not batch_first:
        q, kk, vv = (t.transpose(0, 1) for t in (q, kk, vv))
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 0] = True
    for call in [dict(), dict(key_padding_mask=pad, average_attn_weights=False), dict(need_weights=False)]:
        want = mha(q, kk, vv, **call)
        with capture(mha):
            got = mha(q, kk, vv, **call)
        torch.testing.assert_close(got[0], want[0])
        if want[1] is None:
            assert got[1] is None
        else:
            torch.testing.assert_close(got[1], want[1])


def test_frozen_parts_of_attention_count_nothing():
    torch.manual_seed(3)
    model = Attend(add_bias_kv=True)
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.bias_v.requires_grad_(False)
    x, (kk, vv) = torch.randn(3, 4, 3), _kv(3, 5, {})
    check_against_loop(model, lambda m: m(x, kk, vv), lambda out: out.square().sum(1))


def test_unbatched_attention_is_refused_with_the_fix():
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    with pytest.raises(ValueError, match=r"the root module \(MultiheadAttention\) got query \(5, 4\).*add a batch"):
        with capture(mha):
            mha(torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4))
