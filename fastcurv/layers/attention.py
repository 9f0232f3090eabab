"""nn.MultiheadAttention: four linear maps (q, k, v, out projections) around a parameter-free
attention, plus the optional ``bias_k`` / ``bias_v`` rows appended to the keys and values.

While captured, the module's output is recomputed by :func:`attention_forward` (explicit softmax
math, so double backward works, unlike the fused CPU SDPA kernels) from ``F.linear`` calls on the
projections; each projection is recorded as its own linear "site" (a :class:`LinearLayer` on a
slice of ``in_proj_weight`` / ``in_proj_bias``, or on ``q/k/v_proj_weight`` when kdim/vdim differ),
so ghost norms and Gram matrices come from the Linear machinery. The sites hold disjoint blocks of
the parameters, so the module's squared norm / Gram is the sum of the sites'. ``bias_k`` (and
``bias_v``) is one extra key (value) per example: its per-example gradient is the delta at that
position. The rule claims the whole subtree (``out_proj`` is one of its sites).

Cost: the stock forward runs too (its result is replaced), i.e. one extra attention forward per
captured call. Refused: unbatched inputs (no batch dim to take per-example gradients over).

Transformer modules (:class:`SequenceFirstTransformer`): with ``batch_first=True`` their submodules
are served one by one; with ``batch_first=False`` the outermost one is re-run batch-first while
captured, so that every submodule's dim 0 is the batch."""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.layers.base import CapturedLayer, Record, _versions, describe, first_input
from fastcurv.layers.linear import LinearLayer
from fastcurv.layers.registry import register, rule_for

__all__ = ["MultiheadAttentionLayer", "SequenceFirstTransformer", "attention_forward"]

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class _Projection:
    """What a Linear site's rule reads of its "module": shapes and which parts are trainable.
    Meta tensors: no storage, no aliasing of the real parameters."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], weight_trainable: bool, bias_trainable: bool):
        self.weight = torch.empty(weight.shape, device="meta").requires_grad_(weight_trainable)
        self.bias = None if bias is None else torch.empty(bias.shape, device="meta").requires_grad_(bias_trainable)


def _canonical(mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """Boolean masks (True = not allowed) as additive float masks, as nn.MultiheadAttention does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def attention_forward(mha: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                      attn_mask=None, average_attn_weights=True, is_causal=False, sites=None):
    """nn.MultiheadAttention's forward for batched inputs, with explicit math. ``sites`` (a dict)
    receives ``role -> (input, output)`` of every linear map and ``bias_k`` / ``bias_v`` use, all with
    the batch in dim 0. Returns what the module returns (output, weights or None)."""
    sites = {} if sites is None else sites
    if not mha.batch_first:  # every recorded site gets the batch in dim 0
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    B, L, E = query.shape
    S, H = key.shape[1], mha.num_heads
    hd = E // H
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q = b_k = b_v = None
    if mha.in_proj_bias is not None:
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q)
    k = F.linear(key, w_k, b_k)
    v = F.linear(value, w_v, b_v)
    sites.update(q=(query, q), k=(key, k), v=(value, v))
    attn_mask = _canonical(attn_mask, q.dtype)
    key_padding_mask = _canonical(key_padding_mask, q.dtype)
    if mha.bias_k is not None:
        bias_k = mha.bias_k.reshape(1, 1, E).expand(B, 1, E)  # row i: example i's extra key
        bias_v = mha.bias_v.reshape(1, 1, E).expand(B, 1, E)
        sites.update(bias_k=(key, bias_k), bias_v=(value, bias_v))
        k, v = torch.cat([k, bias_k], 1), torch.cat([v, bias_v], 1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q, k, v = (t.reshape(B, t.shape[1], H, hd).transpose(1, 2) for t in (q, k, v))  # [B, H, len, hd]
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(B, H, 1, hd)], 2)
        v = torch.cat([v, v.new_zeros(B, H, 1, hd)], 2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)  # [B, H, L, S']
    if attn_mask is not None:
        scores = scores + (attn_mask.reshape(B, H, L, -1) if attn_mask.ndim == 3 else attn_mask)
    elif is_causal:
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if key_padding_mask is not None:
        scores = scores + key_padding_mask.reshape(B, 1, 1, -1)
    weights = torch.softmax(scores, -1)
    if mha.dropout > 0.0 and mha.training:
        weights = F.dropout(weights, p=mha.dropout)
    context = (weights @ v).transpose(1, 2).reshape(B, L, E)
    out = F.linear(context, mha.out_proj.weight, mha.out_proj.bias)
    sites["out"] = (context, out)
    result = out if mha.batch_first else out.transpose(0, 1)
    if not need_weights:
        return result, None
    return result, (weights.mean(1) if average_attn_weights else weights)


@register(nn.MultiheadAttention)
class MultiheadAttentionLayer(CapturedLayer):
    """Per-example quantities of an nn.MultiheadAttention's parameters from its four linear sites
    and the bias_k / bias_v rows; see the module docstring."""

    claims_subtree = True  # out_proj is served here, as the "out" site

    def layout_is_ambiguous(self, inp, batch_size):
        return False  # the rule reads the batch from the module's own batch_first flag

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        m = module
        trainable = {id(p) for _, p in params}

        def is_trainable(p):
            return p is not None and id(p) in trainable

        if m._qkv_same_embed_dim:
            weights = dict(zip("qkv", m.in_proj_weight.chunk(3)))
            weight_trainable = dict.fromkeys("qkv", is_trainable(m.in_proj_weight))
        else:
            weights = {"q": m.q_proj_weight, "k": m.k_proj_weight, "v": m.v_proj_weight}
            weight_trainable = {r: is_trainable(w) for r, w in weights.items()}
        biases = dict.fromkeys("qkv") if m.in_proj_bias is None else dict(zip("qkv", m.in_proj_bias.chunk(3)))
        self.sites: dict[str, LinearLayer] = {}
        for role in "qkv":
            proj = _Projection(weights[role], biases[role], weight_trainable[role], is_trainable(m.in_proj_bias))
            self.sites[role] = LinearLayer(f"{name}.{role}_proj" if name else f"{role}_proj", proj, [])
        o = m.out_proj
        self.sites["out"] = LinearLayer(
            f"{name}.out_proj" if name else "out_proj",
            _Projection(o.weight, o.bias, is_trainable(o.weight), is_trainable(o.bias)), [],
        )
        # sites with nothing trainable give nothing (a frozen bias-free projection)
        self.sites = {r: s for r, s in self.sites.items() if s.weight_trainable or s.bias_trainable}
        self.kv_biases = [r for r, p in (("bias_k", m.bias_k), ("bias_v", m.bias_v)) if is_trainable(p)]
        self._roles: list[str] = []  # role of each record, aligned with self.records

    def batch_witness(self, args, kwargs, output):
        query = args[0] if args else kwargs.get("query")
        if not self.module.batch_first and isinstance(query, torch.Tensor) and query.ndim == 3:
            return query.transpose(0, 1)  # [L, B, E]: the capture reads the batch from dim 0
        return query


    def clear(self) -> None:
        super().clear()
        self._roles = []
        for site in self.sites.values():
            site.clear()

    def record(self, args, kwargs, output):
        bound = _MHA_SIGNATURE.bind(self.module, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self")
        query = call["query"]
        if not isinstance(query, torch.Tensor) or query.ndim != 3:
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            layout = "[B, L, E] (batch_first=True)" if self.module.batch_first else "[L, B, E] (batch_first=False)"
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} got query {shape}; expected a batched "
                f"query {layout}. Unbatched attention has no batch to take per-example gradients over: add a batch "
                "dim of 1."
            )
        sites: dict = {}
        replacement = attention_forward(self.module, **call, sites=sites)
        for role, (inp, out) in sites.items():
            if role not in self.sites and role not in self.kv_biases:
                continue
            rec = Record(inp, out, versions=_versions(inp, out))
            self.records.append(rec)
            self._roles.append(role)
            if role in self.sites:
                self.sites[role].records.append(rec)
        return replacement

    def _split(self, deltas) -> dict[str, list[torch.Tensor]]:
        """The deltas of each role, in call order."""
        by_role: dict[str, list] = {}
        for role, d in zip(self._roles, deltas):
            by_role.setdefault(role, []).append(d)
        return by_role

    def _per_example_grads(self, deltas):
        by_role = self._split(deltas)
        m = self.module
        grads: dict[int, torch.Tensor] = {}

        def add(param, g):
            grads[id(param)] = g

        site_grads = {r: s._per_example_grads(by_role[r]) for r, s in self.sites.items()}
        weight_of = {r: (g[0] if self.sites[r].weight_trainable else None) for r, g in site_grads.items()}
        bias_of = {r: (g[-1] if self.sites[r].bias_trainable else None) for r, g in site_grads.items()}
        if m._qkv_same_embed_dim:
            if weight_of.get("q") is not None:
                add(m.in_proj_weight, torch.cat([weight_of[r] for r in "qkv"], 1))
        else:
            for r, p in zip("qkv", (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)):
                if weight_of.get(r) is not None:
                    add(p, weight_of[r])
        if bias_of.get("q") is not None:
            add(m.in_proj_bias, torch.cat([bias_of[r] for r in "qkv"], 1))
        if weight_of.get("out") is not None:
            add(m.out_proj.weight, weight_of["out"])
        if bias_of.get("out") is not None:
            add(m.out_proj.bias, bias_of["out"])
        for r in self.kv_biases:
            p = getattr(m, r)
            add(p, sum(d[:, 0] for d in by_role[r]).reshape(-1, *p.shape))
        return [grads[id(p)] for _, p in self.params]

    def _kv_bias_rows(self, by_role) -> list[torch.Tensor]:
        """``[B, E]`` per-example gradient of each trainable bias_k / bias_v."""
        return [sum(d[:, 0] for d in by_role[r]) for r in self.kv_biases]

    def _sqnorm(self, deltas):
        by_role = self._split(deltas)
        total = sum(s._sqnorm(by_role[r]) for r, s in self.sites.items())
        return total + sum(g.square().sum(1) for g in self._kv_bias_rows(by_role))

    def _gram(self, deltas):
        by_role = self._split(deltas)
        total = sum(s._gram(by_role[r]) for r, s in self.sites.items())
        return total + sum(g @ g.T for g in self._kv_bias_rows(by_role))


_SEQUENCE_FIRST_CONTAINERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                              nn.TransformerDecoder, nn.Transformer)


def _attentions(module: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]


@register(*_SEQUENCE_FIRST_CONTAINERS)
class SequenceFirstTransformer(CapturedLayer):
    """Transformer modules with ``batch_first=True`` need no rule of their own: their MultiheadAttention,
    Linear and LayerNorm submodules are captured one by one (the layer's fused fast path is off whenever
    grad is enabled and a parameter requires grad, as in any capture).

    With ``batch_first=False`` those submodules would see ``[T, B, E]``, whose dim 0 is not the batch
    (with T == B a LayerNorm would be read batch-first and give wrong numbers without any error). So this
    rule claims the outermost such module (a layer, an nn.TransformerEncoder/Decoder with its final norm,
    or an nn.Transformer): while captured, it is re-run on the batch-first transpose of its inputs (every
    attention inside switched to batch_first=True), each submodule recorded by its own rule, and the
    output transposed back. Cost: the stock forward runs too (its result is replaced)."""

    claims_subtree = True

    def layout_is_ambiguous(self, inp, batch_size):
        return False  # the rule reads the batch from the module's own batch_first flag

    @staticmethod
    def not_supported_reason(module) -> str:
        attentions = _attentions(module)
        if not attentions or attentions[0].batch_first:
            # "no rule" here, so the capture serves the submodules themselves
            return "batch_first=True: served by its submodules' rules"
        return ""

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        trainable = {id(p) for _, p in params}
        self.parts: list[tuple[nn.Module, CapturedLayer]] = []
        claimed: list[str] = []
        for sub_name, sub in module.named_modules():
            if not sub_name or any(sub_name.startswith(c + ".") for c in claimed):
                continue
            if isinstance(sub, _SEQUENCE_FIRST_CONTAINERS):
                continue  # re-run batch-first with the rest: its submodules are the parts
            qualified = f"{name}.{sub_name}" if name else sub_name
            rule, why = rule_for(sub)
            recurse = bool(rule is not None and getattr(rule, "claims_subtree", False))
            sub_params = [(f"{qualified}.{pn}", p) for pn, p in sub.named_parameters(recurse=recurse)
                          if id(p) in trainable]
            if recurse:
                claimed.append(sub_name)
            if not sub_params:
                continue
            if rule is None:
                raise ValueError(
                    f"fastcurv.capture: {describe(qualified, sub)} inside batch_first=False "
                    f"{type(module).__name__} '{name}' has no fast rule ({why}); build the model with "
                    "batch_first=True (transpose the input once) so the generic rule can serve it, or freeze it."
                )
            self.parts.append((sub, rule(qualified, sub, sub_params)))
        self._owner: list[int] = []  # index in self.parts of each record's rule
        self._signature = inspect.signature(type(module).forward)

    def batch_witness(self, args, kwargs, output):
        first = first_input(args, kwargs)
        return first.transpose(0, 1) if isinstance(first, torch.Tensor) and first.ndim == 3 else first

    def clear(self) -> None:
        super().clear()
        self._owner = []
        for _, rule in self.parts:
            rule.clear()

    def record(self, args, kwargs, output):
        bound = self._signature.bind(self.module, *args, **kwargs)
        call = dict(bound.arguments)
        call.pop("self")
        for key in ("src", "tgt", "memory"):
            if key in call:
                if call[key].ndim != 3:
                    raise ValueError(
                        f"fastcurv.capture: {describe(self.name, self.module)} got {key} {tuple(call[key].shape)}; "
                        "expected a batched [T, B, E] input (batch_first=False)"
                    )
                call[key] = call[key].transpose(0, 1)
        attentions = _attentions(self.module)
        flags = [m for m in [self.module] if isinstance(m, nn.Transformer)]  # nn.Transformer checks its own flag
        handles = []
        try:
            for m in attentions + flags:
                m.batch_first = True
            for k, (child, _) in enumerate(self.parts):
                handles.append(child.register_forward_hook(self._part_hook(k), with_kwargs=True))
            out = type(self.module).forward(self.module, **call)
        finally:
            for h in handles:
                h.remove()
            for m in attentions + flags:
                m.batch_first = False
        return out.transpose(0, 1)

    def _part_hook(self, k):
        rule = self.parts[k][1]

        def hook(module, args, kwargs, output):
            before = len(rule.records)
            replacement = rule.record(args, kwargs, output)
            self.records.extend(rule.records[before:])
            self._owner.extend([k] * (len(rule.records) - before))
            return replacement

        return hook

    def _by_part(self, deltas) -> list[list[torch.Tensor]]:
        split: list[list] = [[] for _ in self.parts]
        for k, d in zip(self._owner, deltas):
            split[k].append(d)
        return split

    def _per_example_grads(self, deltas):
        grads = {}
        for (_, rule), ds in zip(self.parts, self._by_part(deltas)):
            grads.update({id(p): g for (_, p), g in zip(rule.params, rule._per_example_grads(ds))})
        return [grads[id(p)] for _, p in self.params]

    def _sqnorm(self, deltas):
        return sum(rule._sqnorm(ds) for (_, rule), ds in zip(self.parts, self._by_part(deltas)))

    def _gram(self, deltas):
        return sum(rule._gram(ds) for (_, rule), ds in zip(self.parts, self._by_part(deltas)))
