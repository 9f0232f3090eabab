"""Fast rules reached through functional calls: a module without a registered rule (a subclass that
overrides ``forward``, ``LlamaRMSNorm``, Hugging Face's ``Conv1D``, ``BatchNormAct2d``, a
layer-scale ``gamma``) is served by the existing Linear / Conv / Embedding / Norm math when its forward
uses its own parameters only through calls this file recognizes:

* ``F.linear(x, W, b)``, ``torch.addmm(b, x, W)`` (``W`` is ``[in, out]``), ``x @ W``: Linear rule;
* ``F.embedding(tokens, W, padding_idx)``: Embedding rule;
* ``F.conv1d/2d/3d(x, W, b, stride, padding, dilation, groups)``: Conv rule (timm's ``Conv2dSame``, which pads
  the input itself and then calls ``F.conv2d``: the tf_* EfficientNets / MobileNets);
* ``F.layer_norm``, ``F.rms_norm``, ``F.batch_norm`` with their affine parameters: Norm rule;
* ``x * w`` and ``x + w`` with ``w`` broadcast over a batched ``x`` (per-channel scale or shift,
  ``weight * hidden_states`` of the RMSNorm classes): per-example ``sum(delta * x)`` / ``sum(delta)``
  over the broadcast dims.

A parameter may reach these calls through value-preserving steps (``1.0 + w`` as in Gemma's RMSNorm,
``w.float()``, ``w.reshape(1, -1, 1, 1)``, ``w.t()``): their gradient maps back exactly.

How: a ``TorchFunctionMode`` is pushed for the module's forward (hooks from :meth:`hooks`) and
records each recognized call on its parameters as a *site* (data input, output, parameters). When the
forward returns, its autograd graph is walked from the module's outputs down to its inputs: a
parameter counts as served only if every graph edge into it (and into the steps derived from it)
leaves from one of its sites. Any other use (``torch.sigmoid(w)``, an in-place ``x.mul_(w)``, an
unrecognized op) sends that parameter, and only that one, to the exact generic rule (a vmapped
re-run of the module for that parameter), so the result stays exact whatever the forward does.

In-place ops on a site's output later in the forward (timm's ``BatchNormAct2d``: an in-place SiLU /
ReLU on its ``F.batch_norm`` result) are exact: each site keeps its output's autograd edge from the
moment the call returned and its delta is taken there; the rules read the site's input, never its
output's values.

Rows: a site whose data input has the batch in dim 0 is used as is. One fed ``[B*T, ...]`` rows (HF
``Conv1D``: ``addmm(b, x.view(-1, d), W)``) is regrouped to ``[B, T, ...]`` when the rows are provably
the module's batch-first input flattened (the same memory, contiguous) or its output is, else its
parameters take the generic rule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from fastcurv.layers.base import CapturedLayer, Record, _versions, common_dtype, describe, first_input, rows
from fastcurv.layers.conv import ConvLayer
from fastcurv.layers.embedding import EmbeddingLayer
from fastcurv.layers.generic import GenericLayer, replaying, replaying_context
from fastcurv.layers.linear import LinearLayer
from fastcurv.layers.norm import NormLayer, uses_batch_stats

__all__ = ["FunctionalLayer"]

T = torch.Tensor
# value-preserving steps from a parameter to the tensor a site uses (their gradient maps back exactly)
_CASTS = {T.float, T.double, T.half, T.bfloat16, T.to, T.type_as}
_RESHAPES = {T.reshape, T.view, T.unsqueeze, T.squeeze, T.flatten, T.view_as, T.reshape_as, torch.reshape,
             torch.unsqueeze, torch.squeeze, torch.flatten}
_TRANSPOSES = {T.t, torch.t, T.transpose, torch.transpose}
_SHIFTS = {T.add, T.sub, torch.add, torch.sub}
_MULS = {T.mul, torch.mul}
_MATMULS = {T.matmul, torch.matmul, T.__matmul__}
_CONVS = {F.conv1d, F.conv2d, F.conv3d}


@dataclass(frozen=True)
class _Derived:
    """A tensor computed from parameter ``index`` by value-preserving ``steps``: ("cast",),
    ("reshape", shape before), ("t",)."""

    index: int
    steps: tuple = ()

    def then(self, step) -> "_Derived":
        return _Derived(self.index, self.steps + (step,))


@dataclass(frozen=True)
class _General:
    """A tensor computed from the parameters ``indices`` (and constants: index buffers, numbers) by any ops
    (``table[index]``, ``permute``, ``torch.cat((q_bias, zeros, v_bias))``): shared by the examples, it meets
    the batch at a site. Per-example gradients of it map back to the parameters by a batched vector-Jacobian
    product of the (small, parameter-only) graph between them. ``key``: id of the tensor (kept in
    ``_SiteMode.bases``). ``expand``: set when the tensor is ``base.expand(B, ...)`` (``cls_token.expand(B, -1,
    -1)``), the shape of that base, whose own info is ``bases_info[key]``: row i is example i's copy."""

    indices: frozenset
    key: int
    expand: Optional[tuple] = None


def _indices(info) -> frozenset:
    return info.indices if isinstance(info, _General) else frozenset((info.index,))


def _forward_vectors(v: torch.Tensor, steps: tuple) -> torch.Tensor:
    """``[K, *param.shape]`` vectors carried to the derived tensor's shape."""
    K = v.shape[0]
    shape = tuple(v.shape[1:])
    for step in steps:
        if step[0] == "reshape":
            shape = step[2]
            v = v.reshape(K, *shape)
        elif step[0] == "t":
            v = v.transpose(-1, -2)
    return v


def _back_to_param(g: torch.Tensor, steps: tuple, param: torch.Tensor) -> torch.Tensor:
    """``[N, *derived shape]`` gradients carried back to ``[N, *param.shape]``."""
    for step in reversed(steps):
        if step[0] == "reshape":
            g = g.reshape(g.shape[0], *step[1])
        elif step[0] == "t":
            g = g.transpose(-1, -2)
    return g.reshape(g.shape[0], *param.shape).to(param.dtype)


@dataclass
class _Site:
    kind: str  # "linear", "conv", "embedding", "norm", "scale", "shift"
    output: torch.Tensor
    data: torch.Tensor
    operands: dict  # role ("weight"/"bias") -> (_Derived, tensor as the call saw it)
    extra: tuple = ()  # hashable call details (eps, normalized shape, padding_idx, ...)
    saved: dict = field(default_factory=dict)  # call details that are tensors (running statistics)
    # versions of (data, output) when the call ran: the data must stay unmodified (the rules read it)
    versions: tuple = ()
    # the output's autograd edge when the call ran: the delta is taken there, so an in-place op on the output
    # later in the module's forward (timm's BatchNormAct2d: an in-place activation on the batch_norm result)
    # does not change it; the rules read only the output's shape
    edge: Any = None
    others: tuple = ()  # further data inputs (the other pieces of a torch.cat): the graph walk stops at them too


# modules of the captured layers whose forward is running, innermost last (pushed and popped by the capture's hooks):
# a functional layer serves its children's parameters only in calls its own forward makes, not inside a child's call
_ACTIVE: list = []


def active_calls() -> list:
    return _ACTIVE


class _SiteMode(TorchFunctionMode):
    """Records the recognized calls on one module's parameters during one forward. ``params``: the module's own
    parameters, then ``candidates`` more (its children's, served only where its own forward uses them directly:
    timm BEiT's ``F.linear(x, self.qkv.weight, qkv_bias)``, torchvision Swin's ``qkv`` / ``proj`` weights)."""

    def __init__(self, params: list, module=None, batch: Optional[int] = None, own: Optional[int] = None):
        super().__init__()
        self.tracked: dict[int, tuple] = {id(p): (_Derived(k), p) for k, (_, p) in enumerate(params)}
        self.sites: list[_Site] = []
        self.module, self.batch = module, batch
        self.own = len(params) if own is None else own
        self.bases: dict[int, torch.Tensor] = {}  # _General.key -> the tensor (kept alive: its graph maps back)
        self.bases_info: dict[int, object] = {}
        self.buffers: Optional[set] = None  # ids of the module's buffers, on first need

    def derived(self, t):
        if isinstance(t, torch.Tensor):
            hit = self.tracked.get(id(t))
            if hit is not None and hit[1] is t:
                return hit[0]
        return None

    def _constant(self, t: torch.Tensor) -> bool:
        """A tensor argument that cannot carry the batch: an index or mask (not floating point), a scalar, or a
        buffer of the module (BEiT's zero k_bias)."""
        if self.buffers is None:
            self.buffers = {id(b) for b in self.module.buffers()} if self.module is not None else set()
        return not t.requires_grad and (not t.is_floating_point() or t.numel() == 1 or id(t) in self.buffers)

    def _here(self) -> bool:
        """True when the innermost running captured module is this one (a child's own call serves its parameters)."""
        return not _ACTIVE or _ACTIVE[-1] is self.module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = _flat_args(args, kwargs)
        hits = [self.derived(a) for a in flat]
        if not isinstance(out, torch.Tensor) or all(h is None for h in hits):
            return out
        if not self._here() and any(k >= self.own for h in hits if h is not None for k in _indices(h)):
            return out  # a child's parameter inside a child's (or another captured module's) own call
        try:
            if not self._note(func, args, kwargs, out) and isinstance(out, torch.Tensor):
                self._propagate(func, flat, hits, args, out)
        except (TypeError, ValueError, IndexError):  # an unusual signature: not a site (the graph check sends it to the generic rule)
            pass
        return out

    def _track(self, out, d):
        self.tracked[id(out)] = (d, out)

    def _propagate(self, func, flat, hits, args, out) -> None:
        """Any other op whose tensor inputs are derived or constant: its output is derived (general)."""
        if not out.is_floating_point():
            return
        if any(h is None and isinstance(a, torch.Tensor) and not self._constant(a) for a, h in zip(flat, hits)):
            return  # mixes a parameter with data (maybe batched): an unrecognized site (the graph check decides)
        if any(isinstance(h, _General) and h.expand is not None for h in hits):
            return  # already per example: not followed further
        indices = frozenset().union(*(_indices(h) for h in hits if h is not None))
        d0 = hits[0] if args and isinstance(args[0], torch.Tensor) else None
        B = self.batch
        if func in (T.expand, T.expand_as) and d0 is not None and B and B > 1 and out.ndim == args[0].ndim \
                and args[0].shape[0] == 1 and out.shape[0] == B:
            base = args[0]
            self.bases[id(base)], self.bases_info[id(base)] = base, d0
            self._track(out, _General(indices, id(base), tuple(base.shape)))
            return
        info = _General(indices, id(out))
        self.bases[id(out)], self.bases_info[id(out)] = out, info
        self._track(out, info)

    def _note(self, func, args, kwargs, out) -> bool:
        """Records a site or a value-preserving step; False when ``func`` is neither."""
        n = len(self.sites)
        d0 = self.derived(args[0]) if args else None
        if isinstance(d0, _General) and (func in _CASTS or func in _RESHAPES or func in _TRANSPOSES or func in _SHIFTS):
            return False  # steps of a general tensor: general again
        if func in (torch.cat, torch.concat) and args and isinstance(args[0], (list, tuple)):
            self._cat(out, list(args[0]), args[1] if len(args) > 1 else kwargs.get("dim", 0))
            return len(self.sites) > n
        if func in _CASTS and d0 is not None and out.is_floating_point():
            self._track(out, d0 if out is args[0] else d0.then(("cast",)))
        elif func in _RESHAPES and d0 is not None:
            self._track(out, d0.then(("reshape", tuple(args[0].shape), tuple(out.shape))))
        elif func in _TRANSPOSES and d0 is not None and args[0].ndim == 2:
            self._track(out, d0.then(("t",)))
        elif func in _SHIFTS and d0 is not None and isinstance(args[1], (int, float)) and kwargs.get("alpha", 1) == 1:
            self._track(out, d0)  # w + c, w - c: the gradient passes unchanged
        elif func is F.linear:
            self._linear(out, args[0], args[1] if len(args) > 1 else kwargs.get("weight"),
                         args[2] if len(args) > 2 else kwargs.get("bias"), transposed=False)
        elif func is torch.addmm and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and len(args) == 3:
            self._linear(out, args[1], args[2], args[0], transposed=True)
        elif func in _MATMULS and len(args) == 2 and self.derived(args[0]) is None:
            self._linear(out, args[0], args[1], None, transposed=True)
        elif func in _CONVS:
            self._conv(out, *args, **kwargs)
        elif func is F.embedding:
            self._embedding(out, *args, **kwargs)
        elif func in (F.layer_norm, F.rms_norm, F.batch_norm):
            self._norm(func, out, args, kwargs)
        elif func is F.scaled_dot_product_attention:
            self._sdpa(out, args, kwargs)
            return len(self.sites) > n
        elif func in _MULS or func in (T.add, torch.add):
            if len(args) == 2 and kwargs.get("alpha", 1) == 1:
                self._elementwise("scale" if func in _MULS else "shift", out, *args)
            return len(self.sites) > n
        else:
            return False
        return True

    def _cat(self, out, pieces, dim) -> None:
        """``torch.cat((cls_token.expand(B, -1, -1), x), dim=1)``: the derived pieces are per example (expanded to
        the batch); the data pieces are batched. Example i's gradient of a piece is its slice of delta_i."""
        if out.ndim < 2:
            return
        dim = dim % out.ndim
        if dim == 0:
            return
        operands, data, offset, slices = {}, [], 0, []
        for j, t in enumerate(pieces):
            d = self.derived(t)
            if d is not None:
                if not (isinstance(d, _General) and d.expand is not None):
                    return
                operands[f"piece{j}"] = (d, t)
                slices.append((f"piece{j}", offset, t.shape[dim]))
            elif isinstance(t, torch.Tensor):
                data.append(t)
            offset += t.shape[dim]
        if operands and data:
            self._add("cat", out, data[0], operands, extra=(dim, tuple(slices)), others=tuple(data[1:]))

    def _sdpa(self, out, args, kwargs) -> None:
        """``F.scaled_dot_product_attention(q, k, v, attn_mask=bias)`` with a derived float bias (timm BEiT's fused
        attention with its relative-position table): example i's gradient of the bias is its score gradient."""
        call = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args), **kwargs)
        q, k, v, mask = call.get("query"), call.get("key"), call.get("value"), call.get("attn_mask")
        if not isinstance(mask, torch.Tensor) or not mask.is_floating_point() or call.get("dropout_p", 0.0) \
                or call.get("is_causal", False) or call.get("enable_gqa", False) or q.ndim != 4 or mask.ndim > 4:
            return
        if any(self.derived(t) is not None for t in (q, k, v)) or k.shape[-3] != q.shape[-3]:
            return
        scale = call.get("scale")
        self._add("sdpa", out, q, {"weight": self._operand(mask)}, extra=(None if scale is None else float(scale),),
                  others=(k, v))

    def _operand(self, t):
        d = self.derived(t)
        return None if d is None else (d, t)

    def _add(self, kind, out, data, operands, extra=(), saved=None, others=()):
        operands = {role: op for role, op in operands.items() if op is not None}
        if operands and isinstance(data, torch.Tensor) and self.derived(data) is None:
            edge = get_gradient_edge(out) if out.requires_grad else None
            self.sites.append(_Site(kind, out, data, operands, extra, saved or {}, versions=_versions(data, out), edge=edge,
                                    others=others))

    def _linear(self, out, x, w, b, transposed):
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or (isinstance(b, torch.Tensor) and b.ndim != 1):
            return
        weight = self._operand(w)
        if weight is not None and transposed and isinstance(weight[0], _General):  # x @ (A @ B): its own base, w.t()
            wt = w.t()
            info = _General(weight[0].indices, id(wt))
            self.bases[id(wt)], self.bases_info[id(wt)] = wt, info
            weight = (info, wt)
        elif weight is not None and transposed:  # addmm / matmul take W as [in, out]
            weight = (weight[0].then(("t",)), w.t())
        self._add("linear", out, x, {"weight": weight, "bias": self._operand(b)},
                  extra=(tuple((w.t() if transposed else w).shape),))

    def _conv(self, out, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        n = weight.ndim - 2 if isinstance(weight, torch.Tensor) else 0
        if n < 1 or not isinstance(x, torch.Tensor) or x.ndim != n + 2:
            return  # an unbatched input [C, *S]: not a per-example site
        tup = (lambda v: (v,) * n if isinstance(v, int) else tuple(v))
        kernel, stride, dilation = tuple(weight.shape[2:]), tup(stride), tup(dilation)
        if isinstance(padding, str):  # 'valid' / 'same', as nn.Conv*d lays them out (last dim first)
            totals = [0] * n if padding == "valid" else [d * (k - 1) for d, k in zip(dilation, kernel)]
            reversed_padding = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
        else:
            reversed_padding = [p for v in reversed(tup(padding)) for p in (v, v)]
        self._add("conv", out, x, {"weight": self._operand(weight), "bias": self._operand(bias)},
                  extra=(tuple(weight.shape), stride, tuple(reversed_padding), dilation, int(groups)))

    def _embedding(self, out, tokens, weight, padding_idx=None, max_norm=None, norm_type=2.0,
                   scale_grad_by_freq=False, sparse=False):
        if max_norm is not None or scale_grad_by_freq or weight.ndim != 2 or tokens.is_floating_point():
            return  # renormed rows / batch-wide token counts: not an embedding the rule can serve
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        self._add("embedding", out, tokens, {"weight": self._operand(weight)}, extra=(tuple(weight.shape), padding_idx))

    def _norm(self, func, out, args, kwargs):
        names = {F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
                 F.rms_norm: ("input", "normalized_shape", "weight", "eps"),
                 F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")}[func]
        call = dict(zip(names, args), **kwargs)
        ops = {"weight": self._operand(call.get("weight")), "bias": self._operand(call.get("bias"))}
        eps = call.get("eps")
        if func is F.batch_norm:
            eps = 1e-5 if eps is None else eps
            stats = call.get("training", False) or call.get("running_mean") is None
            saved = {} if stats else {"mean": call["running_mean"].detach().clone(), "var": call["running_var"].detach().clone()}
            self._add("norm", out, call["input"], ops, extra=("batch", bool(stats), float(eps)), saved=saved)
        else:
            shape = call["normalized_shape"]
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            self._add("norm", out, call["input"], ops,
                      extra=("layer" if func is F.layer_norm else "rms", shape, None if eps is None else float(eps)))

    def _elementwise(self, kind, out, a, b):
        if self.derived(a) is not None:
            a, b = b, a  # the data operand first
        w = self.derived(b)
        if w is None or not isinstance(a, torch.Tensor) or tuple(out.shape) != tuple(a.shape) or a.ndim < 1:
            return
        if b.ndim == a.ndim and b.shape[0] != 1:
            return  # w spans the batch dim: not a per-example broadcast
        self._add(kind, out, a, {"weight": (w, b)}, extra=(tuple(b.shape),))


class _SiteModule(nn.Module):
    """Stands in for the module a site's rule expects (shapes and options only; never called)."""

    def __init__(self, owner: nn.Module, **attrs):
        super().__init__()
        self.owner = type(owner).__name__
        for k, v in attrs.items():
            object.__setattr__(self, k, v)


class _FunctionalNorm(NormLayer):
    """The Norm rule for a recorded F.layer_norm / F.rms_norm / F.batch_norm call."""

    def __init__(self, name, module, params, extra, saved):
        self.extra, self.saved = extra, saved
        super().__init__(name, module, params)

    def _normalized(self, x):
        kind = self.extra[0]
        if kind == "layer":
            return F.layer_norm(x, self.extra[1], None, None, 1e-5 if self.extra[2] is None else self.extra[2])
        if kind == "rms":
            return F.rms_norm(x, self.extra[1], None, self.extra[2])
        if self.extra[1]:  # batch statistics (batchnorm="frozen_stats"; the capture refuses them otherwise)
            return F.batch_norm(x, None, None, None, None, True, 0.0, self.extra[2])
        return F.batch_norm(x, self.saved["mean"], self.saved["var"], None, None, False, 0.0, self.extra[2])

    def _reduce_dims(self, ndim):
        if self.extra[0] == "batch":
            return tuple(range(2, ndim))
        return tuple(range(1, ndim - len(self.extra[1])))


class _Broadcast(CapturedLayer):
    """``x * w`` (scale) or ``x + w`` (shift) with ``w`` broadcast over a batched ``x``:
    ``g_i = sum over the broadcast dims of (delta_i * x_i)`` (or of ``delta_i``), ``[B, *w.shape]``."""

    def __init__(self, name, module, params, kind, shape):
        super().__init__(name, module, params)
        self.kind, self.shape = kind, shape

    def _per_example_grads(self, deltas):
        total = 0
        for r, d in zip(self.records, deltas):
            x, d = common_dtype(r.input, d)
            total = total + _per_example_broadcast_sum(d * x if self.kind == "scale" else d, self.shape)
        return [total]


def _per_example_broadcast_sum(g: torch.Tensor, shape) -> torch.Tensor:
    """``[B, ...]`` per-example gradients of a broadcast result -> ``[B, *shape]`` of the tensor broadcast (right-
    aligned with it): summed over its missing dims and its size-1 dims."""
    lead = g.ndim - len(shape)
    dims = tuple(range(1, lead)) + tuple(lead + k for k, n in enumerate(shape)
                                         if n == 1 and lead + k > 0 and g.shape[lead + k] != 1)
    g = g.sum(dims, keepdim=True) if dims else g
    return g.reshape(g.shape[0], *shape)


class _SdpaMask(CapturedLayer):
    """The float ``attn_mask`` of ``F.scaled_dot_product_attention`` (no dropout, not causal): with
    ``P = softmax(q k^T * scale + mask)`` and the output's delta ``dO``, example i's gradient of the mask is
    ``dS_i = P_i * (dP_i - rowsum(dP_i * P_i))``, ``dP_i = dO_i v_i^T``, summed over the dims the mask was broadcast
    along: ``[B, *mask.shape]`` (the attention is recomputed, in the rule's dtype, differentiably)."""

    def __init__(self, name, module, params, scale):
        super().__init__(name, module, params)
        self.scale = scale

    def _per_example_grads(self, deltas):
        (_, mask), = self.params
        total = 0
        for r, d in zip(self.records, deltas):
            q, (k, v) = r.input, r.args
            dtype = torch.promote_types(torch.promote_types(q.dtype, d.dtype), mask.dtype)
            q, k, v, d, m = q.to(dtype), k.to(dtype), v.to(dtype), d.to(dtype), mask.to(dtype)
            scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
            P = torch.softmax(q @ k.transpose(-1, -2) * scale + m, dim=-1)
            dP = d @ v.transpose(-1, -2)
            dS = P * (dP - (dP * P).sum(-1, keepdim=True))
            total = total + _per_example_broadcast_sum(dS, tuple(m.shape))
        return [total]


class _Cat(CapturedLayer):
    """The derived pieces of a ``torch.cat`` with batched data: example i's gradient of a piece (row i of a
    tensor expanded to the batch) is its slice of delta_i, ``[B, *piece.shape[1:]]``."""

    def __init__(self, name, module, params, dim, slices):
        super().__init__(name, module, params)
        self.dim, self.slices = dim, slices

    def _per_example_grads(self, deltas):
        out = []
        for _, offset, size in self.slices:
            out.append(sum(d.narrow(self.dim, offset, size) for d in deltas))
        return out


@dataclass
class _Unit:
    """One fast rule instance over the sites with the same kind, parameters and call details."""

    rule: CapturedLayer
    params: list  # [(param index, steps)] aligned with rule.params
    records: list = field(default_factory=list)  # indices into FunctionalLayer.records


class FunctionalLayer(CapturedLayer):
    """A module without a registered rule: fast rules for the parameters its recognized calls use,
    the generic rule for the others (see the module docstring)."""

    #: why the module has no registered rule (set by the capture; reported when some parameter stays generic)
    reason: str = ""
    # the generic part's re-run is compared with the module's recorded output: modified in place after the
    # module ran, it is refused (check_unchanged); the sites' deltas are taken at their recorded autograd edges
    # and their rules read only the site inputs, so an in-place op on a site's output is exact
    reads_output_values = True

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        self._own = len(params)  # own parameters first in self.params; children's used by this forward follow
        own = {id(p) for _, p in params}
        prefix = f"{name}." if name else ""
        # children's parameters this forward may read directly (BEiT's self.qkv.weight): served here when it does
        self._candidates = [(f"{prefix}{c}.{n}", p) for c, child in module.named_children()
                            for n, p in child.named_parameters(recurse=False) if p.requires_grad and id(p) not in own]
        self._all = list(params) + self._candidates
        self._bases: dict = {}
        self._bases_info: dict = {}
        self._calls = self._generic_calls = 0  # calls recorded, and those with a generic record
        self._modes: list = []
        self._units: dict = {}
        self._generic = GenericLayer(name, module, params)
        self._generic_records: list[int] = []
        self._site_records: set[int] = set()  # indices into records of the fast sites' records
        self._slow: dict[int, str] = {}  # param index -> the op that kept it off the fast rules
        self._pending: list = []  # the sites of the call that just ended, for record()
        self._regrouped: set = set()  # ids of site inputs regrouped from [B*T, ...] rows
        # The sites trust that row i of their data is example i's. A module that mixes the batch before a
        # site (x - x.mean(0)) would break that silently, so one call is re-run per example (a vmapped
        # forward, no backward) the first time, and again when the module's train/eval mode changes.
        self._verified_mode: Optional[bool] = None
        self._to_verify: Optional[Record] = None

    def install(self) -> list:
        """Pushes the site recorder for the forward and pops it when the forward ends (also on an error),
        before the capture's record hook runs (prepended)."""
        def push(module, args, kwargs):
            if replaying():
                self._modes.append(None)
                return
            self._all = list(self.params[:self._own]) + self._candidates
            mode = _SiteMode(self._all, module, _batch_of(first_input(args, kwargs)), own=self._own)
            mode.__enter__()
            self._modes.append(mode)

        def pop(module, args, output):
            mode = self._modes.pop() if self._modes else None
            if mode is not None:
                mode.__exit__(None, None, None)
                self._pending = mode.sites
                self._bases.update(mode.bases)
                self._bases_info.update(mode.bases_info)

        return [self.module.register_forward_pre_hook(push, with_kwargs=True),
                self.module.register_forward_hook(pop, always_call=True, prepend=True)]

    def rows_fallback(self, record) -> bool:
        """The capture's check found that ``record``'s tentative [B*T, ...] rows are not T consecutive rows per
        example: its parameters (and those sharing a unit with them) go to the generic rule, whose record of every
        call is there. False (the capture refuses) when a child's parameter is among them, or a call has no
        generic record."""
        i = next(j for j, r in enumerate(self.records) if r is record)
        ks = set().union(*(_entry_indices(e) for unit in self._units.values() if i in unit.records for e in unit.params))
        while True:
            touched = [key for key, unit in self._units.items() if any(_entry_indices(e) & ks for e in unit.params)]
            more = set().union(ks, *(_entry_indices(e) for key in touched for e in self._units[key].params))
            if more == ks:
                break
            ks = more
        if any(k >= self._own for k in ks) or self._generic_calls != self._calls:
            return False
        for key in touched:
            del self._units[key]
        for k in ks:
            self._slow.setdefault(k, f"'{self._all[k][0]}' is fed rows that are not T consecutive rows per example")
        return True

    def clear(self):
        super().clear()
        self._calls = self._generic_calls = 0
        del self.params[self._own:]  # children's parameters are adopted again by the next forward that uses them
        self._bases, self._bases_info = {}, {}
        self._units = {}
        self._generic.clear()
        self._generic_records = []
        self._site_records = set()
        self._slow = {}
        self._regrouped = set()
        self._to_verify = None

    @property
    def generic_params(self) -> dict[str, str]:
        """``{param name: why}`` for the parameters served by the generic rule in the captured forward."""
        return {self._all[k][0]: why for k, why in self._slow.items()}

    def check_input(self, inp):
        pass  # any call signature: sites carry their own inputs

    def layout_is_ambiguous(self, inp, batch_size):
        return id(inp) not in self._regrouped and super().layout_is_ambiguous(inp, batch_size)

    def check_unchanged(self) -> None:
        """The site records need their inputs unmodified, not their outputs (see reads_output_values)."""
        for k, r in enumerate(self.records):
            # a generic record kept only as the fallback of tentative rows (no parameter on the generic rule yet): its
            # output is compared by the generic rule's re-run itself, should the fallback happen
            self._check_unchanged(r, output_too=k not in self._site_records and bool(self._slow))

    # ------------------------------------------------------------------ recording
    def record(self, args, kwargs, output):
        sites, self._pending = self._pending, []
        inputs = _tensors_in((args, kwargs))
        outputs = _tensors_in(output)
        B = _batch_of(first_input(args, kwargs))
        per_example = {id(s): _rows_per_example(s, B, inputs, outputs, s.kind in _SHAREABLE) for s in sites} \
            if B is not None else {}
        usable = [s for s in sites if per_example.get(id(s)) is not None]
        slow = _uncovered(self._all, usable, outputs, inputs, self._own)
        if B is None and self.params:
            slow = {k: "its first input has no batch dim" for k in range(self._own)}
        for s in usable:
            s.operands = {role: op for role, op in s.operands.items() if not (_indices(op[0]) & set(slow))}
            general = {role: op for role, op in s.operands.items() if isinstance(op[0], _General)}
            plain = {role: op for role, op in s.operands.items() if role not in general}
            # a general operand's part is materialized; the plain ones keep their fast norms (BEiT: F.linear's weight
            # on the ghost/Linear rule, its bias torch.cat((q_bias, k_zeros, v_bias)) mapped back through the cat)
            for group in (plain, general):
                if group:
                    self._add_site(_Site(s.kind, s.output, s.data, group, s.extra, s.saved, versions=s.versions, edge=s.edge,
                                         others=s.others), B,
                                   per_example[id(s)])
        # (an output without the batch dim, BART's learned positions [1, T, d], is shared by the examples: nothing to verify)
        if self._verified_mode != self.module.training and self._to_verify is None and isinstance(output, torch.Tensor) \
                and output.ndim >= 1 and output.shape[0] == B:
            inp = first_input(args, kwargs)
            self._to_verify = Record(inp, output, args, kwargs, versions=_versions(inp, output))
        slow = {k: why for k, why in slow.items() if k < self._own}  # a child's parameter is then not adopted
        self._calls += 1
        if any(per_example[id(s)] < 0 for s in usable) and not slow:
            # the generic rule's record of this call, kept in case the capture's rows check fails
            self._generic.record(args, kwargs, output)
            self.records.append(self._generic.records[-1])
            self._generic_records.append(len(self.records) - 1)
            self._generic_calls += 1
            return None
        if slow:
            self._generic_calls += 1
            self._slow.update({k: why for k, why in slow.items() if k not in self._slow})
            replacement = self._generic.record(args, kwargs, output)  # any output pytree, as the generic rule takes it
            self.records.append(self._generic.records[-1])
            self._generic_records.append(len(self.records) - 1)
            return replacement
        return None

    def _add_site(self, s: _Site, B: int, per_example: int) -> None:
        roles = [r for r in ("weight", "bias") if r in s.operands] + sorted(r for r in s.operands if r.startswith("piece"))
        key = (s.kind, s.extra, tuple((r, s.operands[r][0]) for r in roles), tuple(id(v) for v in s.saved.values()))
        unit = self._units.get(key)
        if unit is None:
            unit = self._units[key] = _Unit(self._rule(s, roles), [_entry(s.operands[r][0]) for r in roles])
        for k in set().union(*(_indices(s.operands[r][0]) for r in roles)):
            if k >= self._own and all(p is not self._all[k][1] for _, p in self.params):
                self.params.append(self._all[k])  # a child's parameter this forward used directly
        shared = per_example == 0  # its data has no batch dim: the output is shared, its deltas come [B, *output]
        tentative = per_example < 0  # [B*T, ...] rows the capture checks (the record says so: rows_per_example)
        per_example = abs(per_example)
        regroup = (lambda t: t.reshape(B, -1, *t.shape[1:])) if per_example > 1 else (lambda t: t)
        if per_example > 1:
            self._regrouped.add(id(s.data))
        unit.rule.records.append(Record(regroup(s.data), regroup(s.output.detach()), shared=shared,
                                        args=tuple(regroup(t) for t in s.others)))
        self.records.append(Record(s.data, s.output, (s.data,), {}, versions=s.versions, edge=s.edge, shared=shared,
                                   rows_per_example=per_example if tentative else 1))
        self._site_records.add(len(self.records) - 1)
        unit.records.append(len(self.records) - 1)

    def _rule(self, s: _Site, roles: list) -> CapturedLayer:
        params = [(self._all[min(_indices(s.operands[r][0]))][0], s.operands[r][1]) for r in roles]
        weight = s.operands.get("weight", (None, None))[1]
        bias = s.operands.get("bias", (None, None))[1]
        if s.kind == "linear":
            shape = s.extra[0]
            stand_in = _SiteModule(self.module, weight=weight if weight is not None else torch.empty(shape, device="meta"), bias=bias)
            rule = LinearLayer(self.name, stand_in, params)
            rule.weight_trainable, rule.bias_trainable = weight is not None, bias is not None
        elif s.kind == "conv":
            shape, stride, reversed_padding, dilation, groups = s.extra
            stand_in = _SiteModule(self.module, weight=weight if weight is not None else torch.empty(shape, device="meta"),
                                   bias=bias, stride=stride, dilation=dilation, groups=groups, padding_mode="zeros",
                                   kernel_size=shape[2:], _reversed_padding_repeated_twice=list(reversed_padding))
            rule = ConvLayer(self.name, stand_in, params)
            rule.weight_trainable, rule.bias_trainable = weight is not None, bias is not None
        elif s.kind == "embedding":
            (V, D), padding_idx = s.extra
            rule = EmbeddingLayer(self.name, _SiteModule(self.module, weight=weight, num_embeddings=V, embedding_dim=D,
                                                         padding_idx=padding_idx, scale_grad_by_freq=False), params)
        elif s.kind == "norm":
            rule = _FunctionalNorm(self.name, _SiteModule(self.module, weight=weight, bias=bias), params, s.extra, s.saved)
        elif s.kind == "sdpa":
            rule = _SdpaMask(self.name, self.module, params, s.extra[0])
        elif s.kind == "cat":
            rule = _Cat(self.name, self.module, params, s.extra[0], [next(sl for sl in s.extra[1] if sl[0] == r) for r in roles])
        else:
            rule = _Broadcast(self.name, self.module, params, s.kind, s.extra[0])
        return rule

    # ------------------------------------------------------------------ quantities
    # Internally a parameter is its index k in self._all (own parameters, then the children's candidates); the
    # public lists are aligned with self.params (own, then the children's this forward used).
    def _verify_per_example(self) -> None:
        rec, self._to_verify = self._to_verify, None
        if isinstance(self.module, nn.modules.batchnorm._BatchNorm) and uses_batch_stats(self.module):
            return  # batch statistics: the capture's batchnorm= option already decided how examples interact
        if rec is not None and self._units:
            with torch.no_grad():
                if _versions(rec.input, rec.output)[1] != rec.versions[1]:
                    # the module's output was modified in place after it ran: compare with a fresh batched run
                    with replaying_context():
                        rec = Record(rec.input, self.module(*rec.args, **rec.kwargs), rec.args, rec.kwargs)
                self._generic.replay(rec, {}, rec.input.shape[0])
            self._verified_mode = self.module.training

    def _parts(self, deltas):
        """``[(rule, its deltas, [entry])]`` for the fast units and the generic part; an entry is ``(k, steps)``
        or ``("general", _General)``."""
        self._verify_per_example()
        parts = []
        for unit in self._units.values():
            ds = [deltas[i] if r.shared else deltas[i].reshape(r.output.shape) for i, r in zip(unit.records, unit.rule.records)]
            parts.append((unit.rule, ds, unit.params))
        if self._generic_records and self._slow:
            self._generic.params = [self._all[k] for k in sorted(self._slow)]
            parts.append((self._generic, [deltas[i] for i in self._generic_records], [(k, ()) for k in sorted(self._slow)]))
        return parts

    def _split(self, deltas):
        """Parts whose parameters no other part touches (their fast norms add up), and the shared rest (a general
        operand's part is always in the rest: it maps back to its parameters through a vector-Jacobian product)."""
        parts = self._parts(deltas)
        count: dict[int, int] = {}
        for _, _, ps in parts:
            for e in ps:
                for k in _entry_indices(e):
                    count[k] = count.get(k, 0) + 1
        def alone_ok(p):
            return all(e[0] != "general" and count[e[0]] == 1 for e in p[2])
        return [p for p in parts if alone_ok(p)], [p for p in parts if not alone_ok(p)]

    def _shared_grads(self, shared) -> dict[int, torch.Tensor]:
        grads: dict[int, torch.Tensor] = {}
        for rule, ds, ps in shared:
            for e, g in zip(ps, rule.per_example_grads(ds)):
                for k, gk in self._back(e, g).items():
                    grads[k] = gk if k not in grads else grads[k] + gk
        return grads

    def _back(self, entry, g) -> dict[int, torch.Tensor]:
        """Per-example gradients ``g`` of an entry's tensor -> ``{k: [B, *param k shape]}``."""
        if entry[0] != "general":
            k, steps = entry
            return {k: _back_to_param(g, steps, self._all[k][1])}
        info = entry[1]
        if info.expand is not None:  # g [B, *piece.shape[1:]]: example i's row of base.expand(B, ...)
            base_shape = info.expand
            dims = tuple(j for j in range(1, g.ndim) if base_shape[j] == 1 and g.shape[j] != 1)
            g = (g.sum(dims, keepdim=True) if dims else g).reshape(g.shape[0], *base_shape)
            return self._back(_entry(self._bases_info[info.key]), g)
        base = self._bases[info.key]
        ks = sorted(info.indices)
        with torch.enable_grad():
            vjps = torch.autograd.grad(base, [self._all[k][1] for k in ks], g.to(base.dtype), is_grads_batched=True,
                                       retain_graph=True, create_graph=g.requires_grad, allow_unused=True)
        B = g.shape[0]
        return {k: torch.zeros(B, *self._all[k][1].shape, dtype=g.dtype, device=g.device) if v is None else v
                for k, v in zip(ks, vjps)}

    def _public(self, by_k: dict, size: int, fill) -> list:
        index = {id(p): k for k, (_, p) in enumerate(self._all)}
        return [by_k[index[id(p)]] if index[id(p)] in by_k else fill(p) for _, p in self.params]

    def _per_example_grads(self, deltas):
        alone, shared = self._split(deltas)
        grads = self._shared_grads(shared)
        for rule, ds, ps in alone:
            for (k, steps), g in zip(ps, rule.per_example_grads(ds)):
                grads[k] = _back_to_param(g, steps, self._all[k][1])
        B = self.batch_size_hint(deltas)
        return self._public(grads, B, lambda p: torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device))

    def batch_size_hint(self, deltas):
        for unit in self._units.values():
            for i, r in zip(unit.records, unit.rule.records):
                return deltas[i].shape[0] if r.shared else r.input.shape[0]
        return self._generic.batch_size_hint([deltas[i] for i in self._generic_records])

    def _sqnorm(self, deltas):
        alone, shared = self._split(deltas)
        total = sum(rule.sqnorm(ds) for rule, ds, _ in alone)
        for g in self._shared_grads(shared).values():
            total = total + rows(g).square().sum(1)
        return total

    def _gram(self, deltas):
        alone, shared = self._split(deltas)
        total = sum(rule.gram(ds) for rule, ds, _ in alone)
        for g in self._shared_grads(shared).values():
            total = total + rows(g) @ rows(g).T
        return total

    def _dot(self, deltas, vectors):
        index = {id(p): k for k, (_, p) in enumerate(self._all)}
        by_k = {index[id(p)]: v for (_, p), v in zip(self.params, vectors)}
        alone, shared = self._split(deltas)
        total = 0
        for rule, ds, ps in alone:
            total = total + rule.dot(ds, [_forward_vectors(by_k[k], steps).to(p.dtype) for (k, steps), (_, p) in zip(ps, rule.params)])
        for k, g in self._shared_grads(shared).items():
            total = total + rows(g) @ rows(by_k[k]).to(g.dtype).T
        return total

    def _weighted_grad_sum(self, deltas, coeffs):
        alone, shared = self._split(deltas)
        out: dict[int, torch.Tensor] = {}
        for rule, ds, ps in alone:
            for (k, steps), w in zip(ps, rule.weighted_grad_sum(ds, coeffs)):
                out[k] = _back_to_param(w, steps, self._all[k][1])
        for k, g in self._shared_grads(shared).items():
            out[k] = (coeffs.to(g.dtype).T @ rows(g)).reshape(coeffs.shape[1], *g.shape[1:])
        K = coeffs.shape[1]
        return self._public(out, K, lambda p: torch.zeros(K, *p.shape, dtype=p.dtype, device=p.device))


def _entry(info) -> tuple:
    return ("general", info) if isinstance(info, _General) else (info.index, info.steps)


def _entry_indices(entry) -> frozenset:
    return entry[1].indices if entry[0] == "general" else frozenset((entry[0],))


def _flat_args(args, kwargs) -> list:
    """The call's arguments, one level of lists / tuples opened (torch.cat's pieces)."""
    flat = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            flat.extend(a)
        else:
            flat.append(a)
    return flat


# ---------------------------------------------------------------------------- helpers
def _tensors_in(obj) -> list[torch.Tensor]:
    """The tensors of a (nested) call argument or output: tuples, lists, dicts, HF ModelOutputs."""
    found, todo = [], [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
    return found


def _batch_of(inp) -> Optional[int]:
    return inp.shape[0] if isinstance(inp, torch.Tensor) and inp.ndim >= 1 else None


# sites whose rule takes an input without the batch dim (its output shared by the examples)
_SHAREABLE = ("linear", "embedding")


def _rows_per_example(s: _Site, B: int, inputs, outputs, shareable: bool = False) -> Optional[int]:
    """1 when the site's data has the batch in dim 0; T when it is ``[B*T, ...]`` rows provably flattened
    from the module's batch-first input (or into its output): same memory, contiguous, same size; 0 when the
    data has no batch dim (an integer index tensor of size 1 in dim 0, BART's decoder positions [1, T]: the output is
    shared by the examples, whose deltas the capture gives per example)."""
    n = s.data.shape[0] if s.data.ndim >= 1 else None
    if n == B:
        return 1
    if shareable and n == 1 and B > 1 and not s.data.is_floating_point() and not s.data.requires_grad:
        return 0
    if not n or B <= 0 or n % B:
        return None

    def flattened(a, b):
        return (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.is_contiguous() and b.is_contiguous()
                and b.ndim >= 2 and b.shape[0] == B)

    if any(flattened(s.data, t) for t in inputs) or any(flattened(s.output, t) for t in outputs):
        return n // B
    # rows not provably flattened batch-first (torchvision Swin's windows: x.view(B, ...).permute(...).reshape(B * nW,
    # ...)): tentatively T consecutive rows per example; the capture checks that with one random-weighted backward
    return -(n // B) if n > B else None


def walk_graph(starts, stops) -> set:
    """The autograd nodes reachable from ``starts`` without passing ``stops``."""
    nodes, todo = set(), list(starts)
    while todo:
        node = todo.pop()
        if node is None or node in nodes or node in stops:
            continue
        nodes.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return nodes


def _uncovered(params, sites, outputs, inputs, own=None) -> dict[int, str]:
    """``{param index: the op}`` for parameters some graph edge reaches other than through one of their sites (a
    child's parameter, index >= ``own``, is then not served here: a use inside the child's own call is the child's)."""
    index = {id(p): k for k, (_, p) in enumerate(params)}
    owners: dict = {}  # autograd node -> site indices it belongs to
    site_outputs = set()
    for j, s in enumerate(sites):
        node = s.edge.node if s.edge is not None else None  # the call's own node, whatever modified its output since
        if node is None:
            continue
        site_outputs.add(node)
        for node in walk_graph([node], {t.grad_fn for t in (s.data,) + tuple(s.others)} - {None}):
            owners.setdefault(node, set()).add(j)
    slow: dict[int, str] = {}
    module_nodes = walk_graph([t.grad_fn for t in outputs], {t.grad_fn for t in inputs} - {None})
    for node in module_nodes:
        mine = owners.get(node, set())
        for fn, _ in node.next_functions:
            if fn is None:
                continue
            var = getattr(fn, "variable", None)
            k = index.get(id(var)) if var is not None else None
            if k is not None:
                if not any(any(k in _indices(op[0]) for op in sites[j].operands.values()) for j in mine):
                    slow.setdefault(k, f"'{params[k][0]}' is used by {type(node).__name__}")
            elif var is None and fn in owners and fn not in site_outputs and not (owners[fn] & mine):
                for j in owners[fn]:
                    for op in sites[j].operands.values():
                        for k in _indices(op[0]):
                            slow.setdefault(k, f"'{params[k][0]}' is used by {type(node).__name__}")
    return slow
