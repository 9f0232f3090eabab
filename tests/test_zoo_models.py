"""Third-party models as users build them (torchvision, timm, Hugging Face transformers), from small
configs (no downloads), checked in float64 against a per-example autograd loop: per-example squared
norms, the Gram matrix and the gradient of the curvature penalty ``mean_i ||grad l_i||^2``.

Each model is one :class:`ZooCase` in :data:`CASES`: how to build it (as built: in-place ops kept,
dropout off through eval mode or a zero dropout config), its batched inputs, its per-example losses,
and what the capture must do (``exact``, or ``refused`` with a regex naming the reason). Every case
also reports the fraction of its trainable parameters served by fast rules (the rest go through the
generic rule, named in ``Capture.generic``) and must reach ``min_fast``.

The oracle: eval-mode models run one separate forward + backward per example; train-mode BatchNorm
runs the full batch (``batchnorm="exact"``: ``grad l_i`` of the coupled batch; ``"frozen_stats"``:
the same with every BatchNorm's batch statistics held constant; the penalty's gradient then also has the
term of the statistics' own dependence on the parameters, see :func:`oracle_penalty_gradient`).

``python tests/test_zoo_models.py`` prints the per-model table (exact?, fraction on fast rules).
The libraries are optional test dependencies: a case skips when its library is absent."""
from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from thirdparty import import_timm, import_torchvision, import_transformers  # noqa: E402

import fastcurv  # noqa: E402


# ============================================================================ the harness
@dataclass
class ZooCase:
    """One model of the zoo.

    ``build()`` returns ``(model, inputs, losses)``: the model (any dtype: the harness casts it to
    float64), a dict of batched keyword inputs (dim 0 is the batch; floating ones are cast to
    float64) and ``losses(output, inputs) -> [B]`` per-example losses.
    ``modes``: the BatchNorm settings to check; ``"eval"`` is the model in eval mode, ``"frozen_stats"``
    and ``"exact"`` in train mode with that ``batchnorm=`` option. ``refused``: a regex the capture's
    error must match (the model is not served, and says why) instead of an exact answer."""

    name: str
    build: Callable
    modes: tuple = ("eval",)
    min_fast: float = 0.99
    refused: Optional[str] = None
    penalty: bool = True  # also check the penalty gradient (off where the float64 double-backward loop is too slow)
    # the penalty gradient's absolute tolerance, relative to its largest entry: float64 rounding, unless the model
    # itself computes something in float32 (T5LayerNorm's variance)
    penalty_atol: float = 1e-8
    capture_kwargs: dict = field(default_factory=dict)


def _float64(inputs: dict) -> dict:
    return {k: v.double() if torch.is_floating_point(v) else v for k, v in inputs.items()}


def _example(inputs: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in inputs.items()}


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


class _BatchStatistics(TorchFunctionMode):
    """Every batch-statistics ``F.batch_norm`` (nn.BatchNorm's forward, and subclasses with their own
    forward such as timm's BatchNormAct2d, whose activation still runs) written out: with ``given=None``
    it normalizes with the batch statistics computed from its input, differentiably as BatchNorm does,
    and keeps them in :attr:`stats` (mean, var per call, in call order); with ``given`` it normalizes
    with the given tensors instead (the frozen_stats oracle: leaves, so constants of each ``grad l_i``).
    Running statistics are not updated (they do not enter a train-mode output)."""

    _ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")

    def __init__(self, given=None):
        super().__init__()
        self.given, self.stats = given, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = dict(zip(self._ARGS, args), **kwargs)
            if call.get("training", False):
                h, w, b, eps = call["input"], call.get("weight"), call.get("bias"), call.get("eps", 1e-5)
                dims = [d for d in range(h.ndim) if d != 1]
                if self.given is None:
                    mean, var = h.mean(dims), h.var(dims, unbiased=False)
                else:
                    mean, var = self.given[len(self.stats)], self.given[len(self.stats) + 1]
                self.stats += [mean, var]
                shape = [1, -1] + [1] * (h.ndim - 2)
                y = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
                if w is not None:
                    y = y * w.view(shape)
                return y if b is None else y + b.view(shape)
        return func(*args, **kwargs)


def _flat(grads, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def _oracle_rows(model, inputs, losses_fn, mode, create_graph, stats_out=None):
    """``[B, P]`` per-example gradients (flattened, model order) from the float64 loop. frozen_stats with
    ``stats_out`` (a list): appends the batch statistics as functions of the parameters, then their leaves."""
    params = _trainable(model)
    B = next(iter(inputs.values())).shape[0]
    if mode == "eval":  # one separate forward + backward per example
        rows = []
        for i in range(B):
            one = _example(inputs, i)
            loss = losses_fn(model(**one), one)[0]
            rows.append(_flat(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True), params))
        return torch.stack(rows)
    held = contextlib.nullcontext()
    if mode == "frozen_stats":  # the statistics this batch gives, then a forward normalizing with them as constants
        with _BatchStatistics() as actual:
            model(**inputs)
        leaves = [s.detach().requires_grad_(create_graph) for s in actual.stats]
        held = _BatchStatistics(given=leaves)
        if stats_out is not None:
            stats_out += [actual.stats, leaves]
    with held:
        losses = losses_fn(model(**inputs), inputs)
    return torch.stack([
        _flat(torch.autograd.grad(losses[i], params, retain_graph=True, create_graph=create_graph, allow_unused=True), params)
        for i in range(B)
    ])


def oracle_penalty_gradient(model, inputs, losses_fn, mode) -> list[torch.Tensor]:
    """The gradient of ``P = mean_i ||grad l_i||^2`` w.r.t. the trainable parameters, from the loop.

    frozen_stats: ``grad l_i`` holds the batch statistics ``s`` constant, but ``s = s(theta)`` is still
    the batch's, so ``P(theta) = P~(theta, s(theta))`` and its gradient is
    ``dP~/dtheta + (dP~/ds) ds/dtheta``: the loop's leaves give both partials, and one vector-Jacobian
    product of the statistics (from a plain forward) the second term. (Detaching the statistics in the
    forward drops that term; checked against torch.func and finite differences on a toy.)"""
    params = _trainable(model)
    stats: list = []
    P = _oracle_rows(model, inputs, losses_fn, mode, create_graph=True, stats_out=stats).square().sum(1).mean()
    if mode != "frozen_stats":
        grads = torch.autograd.grad(P, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    actual, leaves = stats
    grads = torch.autograd.grad(P, params + leaves, allow_unused=True)
    direct, through = grads[:len(params)], [torch.zeros_like(s) if g is None else g for g, s in zip(grads[len(params):], leaves)]
    via_stats = torch.autograd.grad(actual, params, grad_outputs=through, allow_unused=True)
    return [sum(g for g in (a, b) if g is not None) if (a is not None or b is not None) else torch.zeros_like(p)
            for a, b, p in zip(direct, via_stats, params)]


def fast_fraction(model, cap) -> float:
    """Fraction of the trainable parameters (counted once each) served by fast rules."""
    total = sum(p.numel() for p in _trainable(model))
    generic = {id(p): p.numel() for layer in cap.layers if layer.name in cap.generic for _, p in layer.params}
    return 1.0 - sum(generic.values()) / max(total, 1)


def prepare(case: ZooCase, mode: str):
    torch.manual_seed(0)
    model, inputs, losses_fn = case.build()
    model = model.double()
    model.train(mode != "eval")
    kwargs = dict(case.capture_kwargs)
    if mode != "eval":
        kwargs["batchnorm"] = mode
    return model, _float64(inputs), losses_fn, kwargs


def run_case(case: ZooCase, mode: str, penalty: bool = True) -> float:
    """Checks one case in one mode against the loop; returns the fraction on fast rules."""
    model, inputs, losses_fn, kwargs = prepare(case, mode)
    params = _trainable(model)
    tol = dict(atol=1e-9, rtol=1e-7)
    with fastcurv.capture(model, **kwargs) as cap:
        out = model(**inputs)
    losses = losses_fn(out, inputs)
    sq = cap.per_example_sqnorms(losses)
    gram = cap.per_example_gram(losses)
    G = _oracle_rows(model, inputs, losses_fn, mode, create_graph=False)
    torch.testing.assert_close(sq, G.square().sum(1), **tol)
    torch.testing.assert_close(gram, G @ G.T, **tol)
    if penalty and case.penalty:
        got = torch.autograd.grad(cap.per_example_sqnorms(losses, create_graph=True).mean(), params, allow_unused=True)
        want = oracle_penalty_gradient(model, inputs, losses_fn, mode)
        # float64 rounding of the largest terms reaches every parameter: the tolerance is relative to the largest
        # entry of the whole gradient (train-mode BatchNorm over 3 examples at 1x1 maps gives entries ~1e17)
        scale = max(float(w.abs().max()) for w in want)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        for name, g, w, p in zip(names, got, want, params):
            g = torch.zeros_like(p) if g is None else g
            torch.testing.assert_close(g, w, atol=case.penalty_atol * max(scale, 1.0), rtol=1e-6,
                                       msg=lambda m, name=name: f"penalty gradient of {name}: {m}")
    fraction = fast_fraction(model, cap)
    called = {layer.name for layer in cap.layers}
    assert set(cap.generic) <= called, f"cap.generic names modules that were not called: {set(cap.generic) - called}"
    cap.clear()
    return fraction


def check_refused(case: ZooCase, mode: str) -> str:
    model, inputs, losses_fn, kwargs = prepare(case, mode)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        with fastcurv.capture(model, **kwargs) as cap:
            out = model(**inputs)
        cap.per_example_sqnorms(losses_fn(out, inputs))
    assert re.search(case.refused, str(info.value)), f"refused for another reason: {info.value}"
    return str(info.value)


# ============================================================================ losses
def class_ce(out, inputs):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits, inputs["target"] if "target" in inputs else inputs["labels"], reduction="none")


def token_ce(out, inputs):
    """Per-example sum over the sequence of the token cross-entropy against ``labels``."""
    logits, labels = out.logits, inputs["labels"]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).sum(1)


class _Classifier(nn.Module):
    """An image classifier called as ``model(x=..., target=...)`` (the target only feeds the loss)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, target=None):
        return self.net(x)


def _images(B, size, classes=10):
    return {"x": torch.randn(B, 3, size, size), "target": torch.randint(0, classes, (B,))}


# ============================================================================ the models
def torchvision_model(fn, size=32, B=3, **kw):
    """``torchvision.models.<fn>(num_classes=10, **kw)``; ``fn`` may name a class (DenseNet) for a smaller width."""
    def build():
        tv = import_torchvision()
        make = getattr(tv.models, fn)
        net = make(num_classes=10, **kw) if isinstance(make, type) else make(weights=None, num_classes=10, **kw)
        return _Classifier(net), _images(B, size), class_ce
    return build


def timm_model(name, size=32, B=3, **kw):
    def build():
        timm = import_timm()
        net = timm.create_model(name, pretrained=False, num_classes=10, **kw)
        return _Classifier(net), _images(B, size), class_ce
    return build


def hf_vit(B):
    def build():
        tr = import_transformers()
        # this config was refused at B = 3 (= its channels) before the layout check used power-of-two weights
        cfg = tr.ViTConfig(image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=5, attn_implementation="eager",
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = tr.ViTForImageClassification(cfg)
        return model, {"pixel_values": torch.randn(B, 3, 32, 32), "labels": torch.randint(0, 5, (B,))}, class_ce
    return build


def hf_seq2seq(kind, B=3, T=5, V=23, tied=True):
    """T5 / BART as built: ``shared`` holds the embedding, used by the encoder's and decoder's
    ``embed_tokens`` and (tied) by ``lm_head``; ``shared`` itself is never called."""
    def build():
        tr = import_transformers()
        if kind == "t5":
            cfg = tr.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                              dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, tie_word_embeddings=tied,
                              attn_implementation="eager")
            model = tr.T5ForConditionalGeneration(cfg)
            if not tied:  # transformers 5 always ties lm_head (tie_word_embeddings=False only drops the output scaling)
                model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
                assert model.lm_head.weight is not model.shared.weight
        else:
            cfg = tr.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0,
                                attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=16,
                                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                                attn_implementation="eager")
            model = tr.BartForConditionalGeneration(cfg)
        inputs = {"input_ids": torch.randint(3, V, (B, T)), "decoder_input_ids": torch.randint(3, V, (B, T)),
                  "labels": torch.randint(3, V, (B, T))}
        return _Seq2Seq(model), inputs, token_ce
    return build


def _t5_norms_in_float64(build):
    """The T5 build with every T5LayerNorm computing its variance in the model's dtype (its own forward casts the
    hidden states to float32 for it): the penalty gradient can then be checked at float64 tolerance."""
    def t5_norm_forward(norm, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return norm.weight * (hidden_states * torch.rsqrt(variance + norm.variance_epsilon))

    def wrapped():
        model, inputs, losses = build()
        for m in model.modules():
            if type(m).__name__ == "T5LayerNorm":
                m.forward = t5_norm_forward.__get__(m)
        return model, inputs, losses
    return wrapped


class _Seq2Seq(nn.Module):
    """Calls the model without ``labels`` (the loss is per example, computed outside)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, decoder_input_ids, labels=None):
        return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids)


def timm_beit(fused=None, B=3):
    """timm BEiT (tiny config): relative-position tables (``table[index]``, fed to the fused attention's
    ``attn_mask`` as built, or added to the scores in eager attention), ``torch.cat((q_bias, k_zeros, v_bias))`` as the
    bias of ``F.linear(x, self.qkv.weight, ...)`` (the child ``qkv`` is never called), layer-scale gammas, cls_token."""
    def build():
        timm = import_timm()
        from timm.layers import config
        old = config._USE_FUSED_ATTN
        if fused is not None:
            config._USE_FUSED_ATTN = int(fused)
        try:
            net = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                                    embed_dim=16, depth=2, num_heads=2, init_values=0.5)
        finally:
            config._USE_FUSED_ATTN = old
        return _Classifier(net), _images(B, 32), class_ce
    return build


def tv_swin_tiny(B=3):
    """torchvision's SwinTransformer (swin_t's blocks) at embed_dim 8, depths [2, 2], 2x2 windows on 16x16 images:
    shifted windows flattened into [B * windows, ...] rows, qkv / proj weights read by the parent's forward, the
    relative-position table."""
    def build():
        import_torchvision()
        from torchvision.models.swin_transformer import SwinTransformer
        net = SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2],
                              stochastic_depth_prob=0.0, num_classes=10)
        return _Classifier(net), _images(B, 16), class_ce
    return build


def hf_deberta_v2(B=3, T=6, V=23):
    """DeBERTa-v2 with relative attention (c2p and p2c, shared attention keys, position buckets): the encoder reads
    ``rel_embeddings.weight`` (its Embedding is never called) into its LayerNorm and every attention's query/key
    projections, unbatched, until ``.repeat`` meets the batch."""
    def build():
        tr = import_transformers()
        cfg = tr.DebertaV2Config(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16, relative_attention=True,
                                 position_buckets=4, max_relative_positions=8, pos_att_type=["p2c", "c2p"],
                                 norm_rel_ebd="layer_norm", share_att_key=True, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=3, type_vocab_size=0)
        model = tr.DebertaV2ForSequenceClassification(cfg)
        return model, {"input_ids": torch.randint(3, V, (B, T)), "labels": torch.randint(0, 3, (B,))}, class_ce
    return build


TRAIN = ("eval", "frozen_stats", "exact")

def tv_efficientnet_b0_narrow(**kw):
    """efficientnet_b0's own configuration builder at width 0.25, depth 0.5 (the same block types)."""
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.5)
    return EfficientNet(setting, last_channel=last, **kw)


def tv_regnet_y_narrow(**kw):
    """regnet_y's block parameters (SE ratio 0.25) at depth 4, w_0 = 8."""
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25), **kw)


def tv_builder(make, size=32, B=3, **kw):
    def build():
        import_torchvision()
        return _Classifier(make(num_classes=10, **kw)), _images(B, size), class_ce
    return build


CASES = [
    # as built at full width (11M parameters: the slowest case here)
    ZooCase("torchvision resnet18", torchvision_model("resnet18"), TRAIN),
    ZooCase("torchvision densenet121 (growth 4)", torchvision_model("DenseNet", block_config=(6, 12, 24, 16),
                                                                  growth_rate=4, num_init_features=8, bn_size=2), TRAIN),
    ZooCase("torchvision efficientnet_b0 (width 0.25, depth 0.5)",
            tv_builder(tv_efficientnet_b0_narrow, dropout=0.0, stochastic_depth_prob=0.0), TRAIN),
    ZooCase("torchvision mobilenet_v3_small (width 0.25)",
            torchvision_model("mobilenet_v3_small", dropout=0.0, width_mult=0.25), TRAIN,
            penalty=False),  # torch has no double backward for Hardsigmoid: no penalty gradient at all
    ZooCase("torchvision regnet_y (depth 4, w_0 8)", tv_builder(tv_regnet_y_narrow), TRAIN),
    ZooCase("torchvision shufflenet_v2 (narrow)", torchvision_model("ShuffleNetV2", stages_repeats=[2, 2, 2],
                                                                  stages_out_channels=[8, 16, 32, 64, 128]), TRAIN),
    ZooCase("torchvision squeezenet1_1", torchvision_model("squeezenet1_1", size=48, dropout=0.0), TRAIN),
    ZooCase("timm resnet18d (channels 8-64)", timm_model("resnet18d", channels=(8, 16, 32, 64), stem_width=8), TRAIN),
    ZooCase("HF ViT eager B=4", hf_vit(4)),
    ZooCase("HF ViT eager B=3", hf_vit(3)),
    # `shared` (never called) used by encoder/decoder embed_tokens and lm_head: counted once, cross terms included
    # T5LayerNorm computes its variance in float32 (hidden_states.to(torch.float32)) even in a float64 model, so the
    # capture's and the loop's penalty gradients, two different double backwards through it, agree to ~1.3e-7 of the
    # largest entry; with that cast removed they agree at the float64 tolerance (the third case)
    ZooCase("HF T5 (tied lm_head)", hf_seq2seq("t5"), penalty_atol=1e-6),
    # T5 v1.1 style: tie_word_embeddings=False (no decoder output scaling) and lm_head its own parameter
    ZooCase("HF T5 (untied lm_head)", hf_seq2seq("t5", tied=False), penalty_atol=1e-6),
    ZooCase("HF T5 (untied, T5LayerNorm variance in float64)", _t5_norms_in_float64(hf_seq2seq("t5", tied=False))),
    ZooCase("HF BART", hf_seq2seq("bart")),
    # parameters read directly by a parent's forward, served there (fastcurv/layers/functional.py)
    # fused attention as built: the penalty needs the double backward of torch's fused CPU attention, which it lacks
    ZooCase("timm beit (fused attention)", timm_beit(), penalty=False),
    ZooCase("timm beit (eager attention)", timm_beit(fused=False)),
    ZooCase("torchvision swin_t blocks (tiny)", tv_swin_tiny()),
    ZooCase("torchvision swin_t as built (32x32)", torchvision_model("swin_t")),
    # rel_embeddings.weight and the projections of it: per-example deltas from one batched backward (exact)
    ZooCase("HF DeBERTa-v2 (relative attention)", hf_deberta_v2()),
]


def _params():
    return [pytest.param(case, mode, id=f"{case.name}-{mode}") for case in CASES for mode in case.modes]


def check_case(case: ZooCase, mode: str) -> None:
    """The zoo tests' one check: refused as expected, or exact with enough parameters on fast rules."""
    if case.refused:
        check_refused(case, mode)
        return
    fraction = run_case(case, mode)
    assert fraction >= case.min_fast, f"{case.name}: {fraction:.4f} of the parameters on fast rules < {case.min_fast}"


@pytest.mark.parametrize("case, mode", _params())
def test_zoo_model(case, mode):
    check_case(case, mode)


if __name__ == "__main__":  # the per-model table
    torch.set_num_threads(1)
    for case in CASES:
        for mode in case.modes:
            try:
                if case.refused:
                    why = check_refused(case, mode).split(":")[1:3]
                    print(f"{case.name:34s} {mode:13s} refused: {':'.join(why)[:120]}")
                else:
                    print(f"{case.name:34s} {mode:13s} exact, {run_case(case, mode, penalty=False):.4f} on fast rules")
            except BaseException as exc:  # noqa: BLE001 - a table, not a test
                print(f"{case.name:34s} {mode:13s} FAILED {type(exc).__name__}: {str(exc)[:160]}")
