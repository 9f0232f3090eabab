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

pytestmark = [pytest.mark.filterwarnings("ignore::fastcurv.capture.GenericRuleWarning"), pytest.mark.usefixtures("float64_default")]


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
    # the materialized per-example gradients too (shared-parameter cross terms and dot products use them)
    with capture(model) as cap:
        losses = F.cross_entropy(model(x, kk, vv), y, reduction="none")
    layer = next(l for l in cap.layers if l.name == "attn")
    assert isinstance(layer, MultiheadAttentionLayer) and not cap.generic
    params = [p for _, p in trainable(model)]
    want = loop_grads(losses, params)
    got = torch.cat([g.reshape(B, -1) for g in cap.per_example_grads(losses).values()], 1)
    torch.testing.assert_close(got, want)
    vectors = [torch.randn(2, *p.shape) for _, p in layer.params]
    own = torch.cat([g.reshape(B, -1) for g in layer.per_example_grads(cap.deltas(losses)[1])], 1)
    torch.testing.assert_close(layer.dot(cap.deltas(losses)[1], vectors), own @ torch.cat([v.reshape(2, -1) for v in vectors], 1).T)


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


# ------------------------------------------------------------------ transformer containers
class Encoder(nn.Module):
    def __init__(self, batch_first=True, norm_first=False, E=8, layers=2):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(3, E)
        layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(E, 3)

    def forward(self, x, **call):
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, **call)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("masks", [False, True], ids=["no_mask", "causal_and_padding"])
def test_transformer_encoder_matches_the_loop(norm_first, masks):
    torch.manual_seed(4)
    model = Encoder(norm_first=norm_first)
    B, T = 3, 5
    x, y = torch.randn(B, T, 3), torch.randint(0, 3, (B,))
    call = {}
    if masks:
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[1, -2:] = True
        call = dict(mask=torch.ones(T, T, dtype=torch.bool).triu(1), is_causal=True, src_key_padding_mask=pad)
    check_against_loop(model, on_math_sdpa(lambda m: m(x, **call)),
                       lambda out: F.cross_entropy(out, y, reduction="none"))
    cap = capture(model)
    assert not cap.generic


def test_transformer_encoder_in_eval_mode_takes_no_fast_path_while_captured():
    """The encoder layer's fused fast path (torch._transformer_encoder_layer_fwd) skips its submodules;
    it is off whenever grad is enabled and a parameter requires grad, which a capture needs anyway."""
    torch.manual_seed(5)
    model = Encoder().eval()
    x, y = torch.randn(3, 5, 3), torch.randint(0, 3, (3,))
    check_against_loop(model, on_math_sdpa(lambda m: m(x)), lambda out: F.cross_entropy(out, y, reduction="none"))


def test_transformer_decoder_layer_matches_the_loop():
    torch.manual_seed(6)

    class Decoder(nn.Module):
        def __init__(self, E=8):
            super().__init__()
            self.src, self.tgt = nn.Linear(3, E), nn.Linear(3, E)
            self.decoder = nn.TransformerDecoderLayer(E, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
            self.head = nn.Linear(E, 2)

        def forward(self, src, tgt):
            T = tgt.shape[1]
            h = self.decoder(self.tgt(tgt), self.src(src), tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
                             tgt_is_causal=True)
            return self.head(h).sum(1)

    src, tgt, y = torch.randn(3, 6, 3), torch.randn(3, 4, 3), torch.randint(0, 2, (3,))
    check_against_loop(Decoder(), on_math_sdpa(lambda m: m(src, tgt)), lambda out: F.cross_entropy(out, y, reduction="none"))


# ------------------------------------------------------------------ ViT-tiny
class ViTTiny(nn.Module):
    """Patch embedding, a class token and position embedding held by the root module, pre-norm encoder."""

    def __init__(self, D=8, patch=4, image=8, classes=3):
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(3, D, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, D) * 0.1)
        layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=2 * D, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


def test_vit_tiny_matches_the_loop():
    torch.manual_seed(7)
    model = ViTTiny()
    img, y = torch.randn(3, 3, 8, 8), torch.randint(0, 3, (3,))
    check_against_loop(model, on_math_sdpa(lambda m: m(img)), lambda out: F.cross_entropy(out, y, reduction="none"))
    assert list(capture(model).generic) == [""]  # only the root's own cls_token / pos_embed


# ------------------------------------------------------------------ nanoGPT (karpathy/nanoGPT model.py, small)
class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=bias))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=13, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
            ln_f=LayerNorm(n_embd, bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def token_ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(targets.shape).sum(1)


@pytest.mark.parametrize("B, T", [(3, 5), (4, 4)], ids=["T!=B", "T==B"])
def test_nanogpt_matches_the_loop(B, T):
    torch.manual_seed(8 + T)
    model = GPT()
    idx, targets = torch.randint(0, 13, (B, T)), torch.randint(0, 13, (B, T))
    by_layer = check_against_loop(model, on_math_sdpa(lambda m: m(idx)), lambda out: token_ce(out, targets))
    assert any(k.startswith("shared:") for k in by_layer)  # tied wte / lm_head


def _loop_penalty_grads(model, forward, loss_fn):
    params = [p for _, p in trainable(model)]
    with sdpa_kernel(SDPBackend.MATH):
        losses = loss_fn(forward(model))
    penalty = loop_grads(losses, params, create_graph=True).square().sum(1).mean()
    return torch.autograd.grad(penalty, params, allow_unused=True)


@pytest.mark.parametrize("B, T", [(3, 5), (4, 4)], ids=["T!=B", "T==B"])
def test_curvature_penalty_through_sdpa_matches_the_loop(B, T):
    """Curvature.track() runs SDPA on its math backend: the penalty's double backward exists and is exact."""
    torch.manual_seed(10 + T)
    model = GPT()
    idx, targets = torch.randint(0, 13, (B, T)), torch.randint(0, 13, (B, T))
    reg = Curvature(model, alpha=0.5)
    with reg.track():
        logits = model(idx)
    penalty = reg(token_ce(logits, targets))
    params = [p for _, p in trainable(model)]
    got = torch.autograd.grad(penalty, params, allow_unused=True)
    want = _loop_penalty_grads(model, lambda m: m(idx), lambda out: token_ce(out, targets))
    for (name, _), g, w in zip(trainable(model), got, want):
        torch.testing.assert_close(g, 0.5 * w, atol=1e-8, rtol=1e-6, msg=f"penalty gradient of {name}")


def test_fused_sdpa_has_no_double_backward_outside_track():
    """Why track() switches the backend: a capture around the default (fused CPU) SDPA cannot give the
    penalty's gradient. If a future torch adds the derivative this test fails and the switch can go."""
    model = GPT()
    idx = torch.randint(0, 13, (2, 5))
    with capture(model) as cap:
        losses = token_ce(model(idx), torch.randint(0, 13, (2, 5)))
    if not cap.per_example_sqnorms(losses).isfinite().all():
        pytest.fail("sqnorms not finite")
    sq = cap.per_example_sqnorms(losses, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(sq.sum(), [p for _, p in trainable(model)], allow_unused=True)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("T", [5, 3], ids=["T!=B", "T==B"])
def test_sequence_first_transformer_encoder_matches_the_loop(T, norm_first):
    """batch_first=False: the layer is re-run batch-first while captured (T == B included, where reading
    its [T, B, E] LayerNorm inputs as batch-first would be silently wrong)."""
    torch.manual_seed(T)
    model = Encoder(batch_first=False, norm_first=norm_first)
    B = 3
    x, y = torch.randn(B, T, 3), torch.randint(0, 3, (B,))
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -1] = True
    call = dict(mask=torch.ones(T, T, dtype=torch.bool).triu(1), src_key_padding_mask=pad)
    check_against_loop(model, on_math_sdpa(lambda m: m(x, **call)), lambda out: F.cross_entropy(out, y, reduction="none"))
    with capture(model):
        got = model(x, **call)
    torch.testing.assert_close(got, model(x, **call))
    assert all(not m.batch_first for m in model.modules() if isinstance(m, nn.MultiheadAttention))


def test_sequence_first_transformer_decoder_layer_matches_the_loop():
    torch.manual_seed(9)
    layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=False)
    head = nn.Linear(8, 2)
    model = nn.ModuleDict(dict(layer=layer, head=head))
    tgt, mem, y = torch.randn(4, 3, 8), torch.randn(6, 3, 8), torch.randint(0, 2, (3,))

    def forward(m):
        return m["head"](m["layer"](tgt, mem, tgt_mask=torch.ones(4, 4, dtype=torch.bool).triu(1)).sum(0))

    check_against_loop(model, on_math_sdpa(forward), lambda out: F.cross_entropy(out, y, reduction="none"))


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_full_transformer_with_final_norms_matches_the_loop(batch_first):
    """nn.Transformer: encoder and decoder stacks with their final LayerNorms; source length == B."""
    torch.manual_seed(11)
    model = nn.ModuleDict(dict(
        net=nn.Transformer(8, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=12, dropout=0.0,
                           batch_first=batch_first),
        head=nn.Linear(8, 2),
    ))
    B = 3
    src, tgt, y = torch.randn(B, 3, 8), torch.randn(B, 4, 8), torch.randint(0, 2, (B,))
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)

    def forward(m):
        out = m["net"](src, tgt, tgt_mask=torch.ones(4, 4, dtype=torch.bool).triu(1))
        return m["head"](out.sum(1 if batch_first else 0))

    check_against_loop(model, on_math_sdpa(forward), lambda out: F.cross_entropy(out, y, reduction="none"))
    assert not capture(model).generic


def test_attention_module_called_twice_sums_both_uses():
    """One MultiheadAttention applied twice (self-attention, then attention to a memory): its four sites
    and bias_k / bias_v concatenate both calls, so the norm is of the summed gradient."""
    torch.manual_seed(12)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.attn = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x, mem):
            h = torch.tanh(self.inp(x))
            h = h + self.attn(h, h, h, need_weights=False)[0]
            return self.head(self.attn(h, mem, mem)[0].mean(1))

    x, mem, y = torch.randn(3, 4, 3), torch.randn(3, 6, 4), torch.randint(0, 2, (3,))
    check_against_loop(Twice(), on_math_sdpa(lambda m: m(x, mem)), lambda out: F.cross_entropy(out, y, reduction="none"))
