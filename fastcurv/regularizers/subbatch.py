"""Sub-batch gradient-norm regularizer R_alpha of Jia & Su 2020 (section 6, Algorithm 1; docs/METHODS.md section 3).

Split the batch B into M sub-batches B_k, let ``g_k = grad L(B_k, w)`` (detached; ``L(B_k, w)`` is the
MEAN loss over B_k) and

    R_alpha(w) = (1/M) sum_k [ L(B_k, w) - L(B_k, w - alpha g_k) ]  ~=  alpha (1/M) sum_k ||g_k||^2.

Training minimizes ``L(B, w) + beta R_alpha(w)`` with no gradient through g_k: the gradient of R_alpha is
``(1/M) sum_k [g_k - grad L(B_k, w - alpha g_k)]``.

How it is computed: two passes of the model over the whole batch (no model copies, no loop over k),
in which sub-batch k (examples k, k+M, k+2M, ...) sees its own parameter set. Layers without
parameters (activations, pooling, residual adds, dropout) run on the whole batch as usual.

1. Clean pass, every set equal to ``w``. Conv and norm layers run with ``[M, *shape]`` stacks of their
   parameters (Conv: one convolution with the sub-batches folded into channel groups, a view thanks to
   the interleaved layout; norm layers: a per-example gather of the small affine vectors); the
   backward gives the stacks' gradients, i.e. all ``g_k`` at the FLOPs of one ordinary weight gradient.
   Linear layers run as usual and keep their input and output delta instead: ``g_k`` of a Linear
   layer is ``sum_{i in B_k} delta_i a_i^T``, never formed for an MLP. ``grad L(B, w)`` and
   ``grad (1/M) sum_k L(B_k, w)`` come out of the same backward (weighted sub-batch losses), so the
   data loss needs no pass of its own.
2. Perturbed pass, set k equal to ``w - alpha g_k``: the stacks shifted; Linear layers compute
   ``x W^T + b - alpha (x g_k^T + g_k^b)`` with ``x g_k^T = (x A_k^T) D_k`` from the clean inputs A
   and deltas D of sub-batch k (the sub-batch Gram, or ``g_k`` formed when that is cheaper). One
   forward and backward give all ``grad L(B_k, w - alpha g_k)``, summed over k by the backward.

Models with a module this grouped forward does not cover (see :data:`GROUPED_MODULES`) fall back to
``torch.func.vmap`` over the sub-batches of ``functional_call`` (same values and gradients, slower); so do
layers whose weight a pre-hook rebuilds (pruning, weight_norm), and where an op has no vmap rule
(``aten::lstm``, ``aten::gru``) the sub-batches run one ``functional_call`` each.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fastcurv._validate import check_flag, check_number
from fastcurv.layers.base import describe
from fastcurv.layers.reparam import reparametrized
from fastcurv.regularizers.norms import Regularizer, check_coefficient, trainable_parameters

__all__ = ["SubBatchGradNorm", "GROUPED_MODULES"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_RMSNORM = getattr(nn, "RMSNorm", None)  # torch >= 2.4


# ================================================================================ sub-batch layout
@dataclass
class _Layout:
    """Interleaved sub-batches: example i belongs to sub-batch ``i mod M``, so the first ``B mod M``
    sub-batches have ``ceil(B/M)`` examples and the others ``floor(B/M)``. Interleaving makes a
    ``[B, ...]`` tensor's rows ``[rounds, M, ...]`` (round-major), so folding the sub-batches into
    channel groups is a view, not a copy. ``segments``: ``(first sub-batch, how many, rounds, first
    row)``: all M sub-batches for ``floor(B/M)`` rounds, then one round of the first ``B mod M``."""

    sizes: list[int]
    segments: list[tuple[int, int, int, int]]
    subbatch_of: torch.Tensor  # [B] long: the sub-batch of each example
    inverse_size: torch.Tensor  # [B]: 1 / |B_k(i)|, so that sum_i inverse_size_i l_i = sum_k L(B_k)

    @classmethod
    def split(cls, batch: int, m: int, device, dtype) -> "_Layout":
        q, r = divmod(batch, m)
        sizes = [q + 1] * r + [q] * (m - r)
        segments = [(0, m, q, 0)] if q else []
        if r:
            segments.append((0, r, 1, q * m))
        subbatch_of = torch.arange(batch, device=device) % m
        inverse_size = (1.0 / torch.tensor(sizes, device=device, dtype=dtype))[subbatch_of]
        return cls(sizes, segments, subbatch_of, inverse_size)


def _by_subbatch(t: torch.Tensor, segment) -> torch.Tensor:
    """A segment's rows of ``t [B, *rest, d]`` as ``[count, rounds * prod(rest), d]``."""
    _, count, rounds, start = segment
    rows = t[start:start + rounds * count].reshape(rounds, count, -1, t.shape[-1])
    return rows.transpose(0, 1).reshape(count, -1, t.shape[-1])


def _to_rows(t: torch.Tensor, segment, row_shape) -> torch.Tensor:
    """Inverse of :func:`_by_subbatch`: ``[count, rounds * prod(rest), d]`` -> ``[rounds * count, *row_shape]``."""
    _, count, rounds, _ = segment
    return t.reshape(count, rounds, -1).transpose(0, 1).reshape(rounds * count, *row_shape)


# ====================================================================== grouped forward of one layer
@dataclass
class _Pass:
    """One grouped pass.

    ``stacks``: ``id(param) -> [M, *shape]`` parameter sets; a parameter without one is shared by all
    sub-batches (frozen, or a Linear parameter in ``low_rank``). ``low_rank``: ids of Linear
    parameters whose sub-batch gradients are kept as the clean pass's (input, delta) pairs instead of
    ``[M, *shape]`` stacks; the clean pass appends one pair per use to ``uses[id(weight or bias)]``,
    and the perturbed pass (``shifted=True``) subtracts ``alpha x g_k^T`` built from them.
    """

    stacks: dict
    layout: _Layout
    update_running_stats: bool
    low_rank: frozenset = frozenset()
    uses: Optional[dict] = None
    shifted: bool = False
    alpha: float = 0.0

    def stacked(self, module: nn.Module, pname: str, first: int, count: int) -> Optional[torch.Tensor]:
        """``[count, *shape]``: sub-batches ``first .. first + count`` of a parameter (None if absent)."""
        p = getattr(module, pname, None)
        if p is None:
            return None
        stack = self.stacks.get(id(p))
        if stack is None:
            return p.unsqueeze(0).expand(count, *p.shape)
        if first == 0 and count == stack.shape[0]:
            return stack  # a full slice would cost an M x P zero-fill and copy in the backward
        return stack[first:first + count]


def _join(outs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _linear(module: nn.Linear, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    if id(weight) in run.low_rank or (bias is not None and id(bias) in run.low_rank):
        return _low_rank_linear(module, run, x)
    outs = []
    for segment in run.layout.segments:
        first, count = segment[:2]
        xs = _by_subbatch(x, segment)  # [count, rounds*T, d_in]
        w = run.stacked(module, "weight", first, count).transpose(1, 2)
        b = run.stacked(module, "bias", first, count)
        z = torch.bmm(xs, w) if b is None else torch.baddbmm(b.unsqueeze(1), xs, w)
        outs.append(_to_rows(z, segment, (*x.shape[1:-1], w.shape[2])))
    return _join(outs)


def _low_rank_linear(module: nn.Linear, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` on the whole batch; in the perturbed pass minus ``alpha (x g_k^T + g_k^b)`` where
    ``g_k^W = sum_{uses v} D_v,k^T A_v,k`` comes from the clean pass's inputs A and deltas D of sub-batch
    k: via the sub-batch Gram ``(X A^T) D`` when that is cheaper than forming ``g_k^W``, so an MLP never
    builds the M x P sub-batch gradients."""
    z = F.linear(x, module.weight, module.bias)
    weight_uses = run.uses.setdefault(id(module.weight), []) if id(module.weight) in run.low_rank else None
    bias_uses = (run.uses.setdefault(id(module.bias), [])
                 if module.bias is not None and id(module.bias) in run.low_rank else None)
    if not run.shifted:  # clean pass: remember this use; its delta is filled in after the backward
        record = [x.detach(), z, None]
        for uses in (weight_uses, bias_uses):
            if uses is not None:
                uses.append(record)
        return z
    d_in, d_out = x.shape[-1], z.shape[-1]
    segments = run.layout.segments
    # sub-batch k's clean rows lie in every segment (the last round holds only the first B mod M)
    weight_pairs = [(_by_subbatch(a, seg), _by_subbatch(d, seg)) for a, _, d in weight_uses or () for seg in segments]
    bias_sums = [_by_subbatch(d, seg).sum(1) for _, _, d in bias_uses or () for seg in segments]  # [count, d_out]
    shifts = []
    for segment in segments:
        xs = _by_subbatch(x, segment)  # [count, rounds*T, d_in]
        count = xs.shape[0]
        terms = []
        if weight_pairs:
            use_rows = sum(a.shape[1] for a, _ in weight_pairs)
            if xs.shape[1] * use_rows * (d_in + d_out) <= (xs.shape[1] + use_rows) * d_in * d_out:
                terms += [torch.bmm(torch.bmm(xs[:len(a)], a[:count].transpose(1, 2)), d[:count])
                          for a, d in weight_pairs]
            else:
                g = _sum_first(count, [torch.bmm(d[:count].transpose(1, 2), a[:count]) for a, d in weight_pairs])
                terms.append(torch.bmm(xs, g.transpose(1, 2)))  # g: [count, d_out, d_in]
        if bias_sums:
            terms.append(_sum_first(count, [gb[:count] for gb in bias_sums]).unsqueeze(1))
        shift = _sum_first(count, terms)
        shifts.append(_to_rows(shift.expand(-1, xs.shape[1], -1), segment, z.shape[1:]))
    return z - run.alpha * _join(shifts)


def _sum_first(count: int, terms: list[torch.Tensor]) -> torch.Tensor:
    """Sum of ``[n <= count, ...]`` tensors into ``[count, ...]`` (a shorter one covers the first n)."""
    total = None
    for t in terms:
        if t.shape[0] < count:
            t = torch.cat([t, t.new_zeros(count - t.shape[0], *t.shape[1:])])
        total = t if total is None else total + t
    return total


def _conv(module: nn.modules.conv._ConvNd, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    # Sub-batches folded into channel groups, a view thanks to the interleaved layout:
    # input [rounds, count*C_in, ...], weight [count*C_out, C_in/G, ...], groups count*G.
    if x.ndim != len(module.kernel_size) + 2:
        raise ValueError(
            f"SubBatchGradNorm: {describe(name, module)} got input {tuple(x.shape)}; expected a batched "
            f"[B, C, {len(module.kernel_size)} spatial dims] input"
        )
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    outs = []
    for first, count, rounds, start in run.layout.segments:
        xs = x[start:start + rounds * count].reshape(rounds, count * x.shape[1], *x.shape[2:])
        w = run.stacked(module, "weight", first, count)
        b = run.stacked(module, "bias", first, count)
        z = _CONV[type(module)](
            xs, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
            module.stride, padding, module.dilation, count * module.groups,
        )
        outs.append(z.reshape(rounds * count, w.shape[1], *z.shape[2:]))
    return _join(outs)


def _ghost_batch_norm(module: nn.modules.batchnorm._BatchNorm, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm with each sub-batch's own statistics (biased variance, as BatchNorm normalizes with)
    when M does not divide B (else :func:`_per_channel_norm_folded`). In a pass that may update them, the running statistics move once, towards the mean over the M
    sub-batches of their (mean, unbiased variance)."""
    layout = run.layout
    m, channels = len(layout.sizes), x.shape[1]
    _check_values_per_channel(module, name, layout, x)
    counts = torch.tensor(layout.sizes, dtype=x.dtype, device=x.device) * x[:1, :1].numel()
    # [rounds, count, C, values] views of each segment; statistics summed over rounds and values
    parts = [x[start:start + rounds * count].reshape(rounds, count, channels, -1)
             for _, count, rounds, start in layout.segments]

    def per_subbatch(terms):
        total = x.new_zeros(m, channels)
        for (first, count, _, _), t in zip(layout.segments, terms):
            total = total.index_add(0, torch.arange(first, first + count, device=x.device), t.sum((0, 3)))
        return total / counts[:, None]

    mean = per_subbatch(parts)
    centered = [p - mean[first:first + count, :, None] for (first, count, _, _), p in zip(layout.segments, parts)]
    var = per_subbatch([c.square() for c in centered])
    inv_std = torch.rsqrt(var + module.eps)
    out = [(c * inv_std[first:first + count, :, None]).reshape(-1, *x.shape[1:])
           for (first, count, _, _), c in zip(layout.segments, centered)]
    if run.update_running_stats and module.training and module.running_mean is not None:
        with torch.no_grad():
            module.num_batches_tracked.add_(1)
            momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
            unbiased = var * (counts / (counts - 1))[:, None]
            module.running_mean.lerp_(mean.mean(0).to(module.running_mean.dtype), momentum)
            module.running_var.lerp_(unbiased.mean(0).to(module.running_var.dtype), momentum)
    return _join(out)


def _per_channel_norm_folded(module: nn.Module, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm / BatchNorm when M divides B: the rows ``[rounds, M]`` viewed as ``[rounds, M*C, ...]``
    make channel ``k*C + c`` sub-batch k's channel c, so one fused ``batch_norm`` computes every
    sub-batch's statistics (and ``group_norm`` with ``M*G`` groups each example's), with the ``[M, C]``
    affine stacks as its ``[M*C]`` weight and bias: no copies, no per-example gather."""
    m = len(run.layout.sizes)
    xv = x.reshape(run.layout.segments[0][2], m * x.shape[1], *x.shape[2:])
    w, b = (run.stacked(module, pname, 0, m) for pname in ("weight", "bias"))
    w, b = (None if t is None else t.reshape(-1) for t in (w, b))
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(xv, m * module.num_groups, w, b, module.eps).reshape(x.shape)
    if not (module.training or module.running_mean is None):  # eval: running statistics
        mean, var = module.running_mean.repeat(m), module.running_var.repeat(m)
        return F.batch_norm(xv, mean, var, w, b, False, 0.0, module.eps).reshape(x.shape)
    _check_values_per_channel(module, name, run.layout, x)
    if not (run.update_running_stats and module.training and module.running_mean is not None):
        return F.batch_norm(xv, None, None, w, b, True, 0.0, module.eps).reshape(x.shape)
    module.num_batches_tracked.add_(1)
    momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
    # per-(sub-batch, channel) running statistics, then their mean over the sub-batches
    mean, var = module.running_mean.repeat(m), module.running_var.repeat(m)
    out = F.batch_norm(xv, mean, var, w, b, True, momentum, module.eps)
    with torch.no_grad():
        module.running_mean.copy_(mean.view(m, -1).mean(0))
        module.running_var.copy_(var.view(m, -1).mean(0))
    return out.reshape(x.shape)


def _check_values_per_channel(module, name: str, layout: _Layout, x: torch.Tensor) -> None:
    smallest = min(layout.sizes) * x[:1, :1].numel()  # values per channel in the smallest sub-batch
    if smallest <= 1:
        raise ValueError(
            f"SubBatchGradNorm: {describe(name, module)} normalizes each sub-batch with its own batch "
            f"statistics, but with input {tuple(x.shape)} and num_subbatches={len(layout.sizes)} a sub-batch has "
            f"{smallest} value per channel (need more than 1): use fewer sub-batches, a larger batch, or eval mode"
        )


def _norm(module: nn.Module, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module._check_input_dim(x)
    if len(run.layout.segments) == 1 and isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        return _per_channel_norm_folded(module, name, run, x)
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    elif _RMSNORM is not None and isinstance(module, _RMSNORM):
        xhat = F.rms_norm(x, module.normalized_shape, None, module.eps)
    elif isinstance(module, nn.GroupNorm):
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    elif module.training or module.running_mean is None:
        xhat = _ghost_batch_norm(module, name, run, x)
    else:
        xhat = F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    # the affine vectors are small: gather each example's sub-batch set
    if isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)  # one value per channel
    else:
        view = (x.shape[0],) + (1,) * (x.ndim - 1 - len(module.normalized_shape)) + tuple(module.normalized_shape)
    m = len(run.layout.sizes)
    w = run.stacked(module, "weight", 0, m)
    b = run.stacked(module, "bias", 0, m)
    if w is not None:
        xhat = xhat * w[run.layout.subbatch_of].reshape(view)
    if b is not None:
        xhat = xhat + b[run.layout.subbatch_of].reshape(view)
    return xhat


# Exact types only: a subclass may override forward and compute something else (then: vmap fallback).
_GROUPED_RULES = {nn.Linear: _linear, nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
                  nn.LayerNorm: _norm, nn.GroupNorm: _norm,
                  nn.BatchNorm1d: _norm, nn.BatchNorm2d: _norm, nn.BatchNorm3d: _norm}
if _RMSNORM is not None:
    _GROUPED_RULES[_RMSNORM] = _norm
GROUPED_MODULES = tuple(_GROUPED_RULES)


def _grouped_call(rule, module: nn.Module, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] != run.layout.subbatch_of.shape[0]:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"SubBatchGradNorm: {describe(name, module)} got input {shape}; expected dim 0 to be the batch of "
            f"{run.layout.subbatch_of.shape[0]} examples (examples are assigned to sub-batches by row)"
        )
    return rule(module, name, run, x)


@contextlib.contextmanager
def _grouped_forward(modules: list[tuple[str, nn.Module]], run: _Pass):
    """Inside: each listed module's forward is its grouped rule (an instance attribute, so the
    module's hooks still run); restored on exit, also on an exception."""
    try:
        for name, module in modules:
            module.forward = functools.partial(_grouped_call, _GROUPED_RULES[type(module)], module, name, run)
        yield
    finally:
        for _, module in modules:
            module.__dict__.pop("forward", None)


# ================================================================================ the regularizer
def _cross_entropy_per_example(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target, reduction="none")


class SubBatchGradNorm(Regularizer):
    """``beta * R_alpha(w)`` of Jia & Su's Algorithm 1 (docs/METHODS.md section 3), or its exact first-order form.

    Args:
        model: the network; its parameters that require grad are ``w``.
        alpha: perturbation size (paper: 1e-4), ``> 0``.
        beta: weight of the regularizer (paper: 1..100), ``>= 0``.
        num_subbatches: M (paper: 8). ``M = B`` (one example per sub-batch) gives the per-example
            squared-gradient-norm penalty of docs/METHODS.md section 1.
        exact: if True, ``beta * alpha * (1/M) sum_k ||g_k||^2`` with ``g_k`` differentiated through
            (double backward), the quantity R_alpha approximates to first order; if False (default),
            Algorithm 1's finite difference with ``g_k`` held constant.
        loss_fn: ``loss_fn(output, target)`` -> PER-EXAMPLE losses ``[B]`` (``reduction="none"``);
            default cross-entropy. ``L(B_k, w)`` is their mean over B_k.

    Two ways to use it, same numbers:

    * ``loss = reg.backward(x, y)``: the whole step's gradient, ``grad [L(B, w) + beta R_alpha(w)]``,
      accumulated into ``.grad`` from the two grouped passes (the fast path; the data loss ``L(B, w)``
      comes from the clean pass, so no separate forward is needed). Returns ``L(B, w)`` (detached);
      ``reg.last_penalty`` holds ``beta R_alpha`` (detached).
    * ``loss = data_loss + reg(x, y)``: a scalar whose value is ``beta R_alpha`` and whose gradient is
      Algorithm 1's (one derivative; the finite-difference form is not twice differentiable), for
      combining with other terms. The caller's own forward is a third pass.

    Sub-batches: sub-batch k holds examples k, k+M, k+2M, ... (interleaved, which makes the grouped
    convolution a view; the paper splits at random, which a shuffled data loader already gives), with
    near-equal sizes when M does not divide B (the first ``B mod M`` get one example more). ``L(B_k, w)`` is the mean over B_k and R_alpha averages the M terms with
    equal weight 1/M (Algorithm 1 as written, also for unequal sizes); ``L(B, w)`` is the mean over B.
    B < M is an error (a sub-batch would be empty).

    BatchNorm in train mode (or without running statistics): each sub-batch is normalized with its
    own batch statistics (ghost batch norm over the M sub-batches, biased variance), in every pass,
    as M separate forwards of Algorithm 1 would; with ``backward`` this includes the data loss
    ``L(B, w)``. The running statistics are updated once per ``backward`` call, by the clean pass only,
    towards the mean over the sub-batches of their (mean, unbiased variance); the perturbed pass and
    ``reg(x, y)`` leave them alone. Eval-mode BatchNorm uses the running statistics as usual.

    Dropout: every pass draws fresh masks (one per example), so the clean and the perturbed pass see
    different masks, as two separate forwards would.

    The grouped forward covers ``GROUPED_MODULES`` (Linear, Conv1d/2d/3d, LayerNorm, RMSNorm,
    GroupNorm, BatchNorm1d/2d/3d, exact types); layers without parameters can be anything. A model with
    another module holding trainable parameters runs on ``torch.func.vmap`` over the sub-batches
    instead (same numbers, slower; BatchNorm with batch statistics is then refused).
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 1e-4,
        beta: float = 1.0,
        num_subbatches: int = 8,
        exact: bool = False,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _cross_entropy_per_example,
    ):
        self.alpha = check_coefficient("SubBatchGradNorm", "alpha", alpha, positive=True)
        self.beta = check_coefficient("SubBatchGradNorm", "beta", beta)
        self.num_subbatches = check_number("SubBatchGradNorm", "num_subbatches", num_subbatches, integer=True, low=1)
        self.exact = check_flag("SubBatchGradNorm", "exact", exact)
        if not callable(loss_fn):
            raise TypeError(f"SubBatchGradNorm: loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.model = model
        self.params = trainable_parameters("SubBatchGradNorm", model)
        self.last_penalty: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------- planning
    def _grouped_modules(self) -> Optional[list[tuple[str, nn.Module]]]:
        """The modules to run grouped, or None when some module with trainable parameters is not
        covered (then the whole model runs under vmap)."""
        grouped = []
        for name, module in self.model.named_modules():
            if reparametrized(module):
                return None  # weight rebuilt by a pre-hook (pruning, weight_norm): the functional forward runs it
            if type(module) in _GROUPED_RULES and "forward" not in module.__dict__:  # no instance override
                grouped.append((name, module))  # frozen ones too: BatchNorm's statistics are per sub-batch
            elif any(p.requires_grad for p in module.parameters(recurse=False)):
                return None
        return grouped

    def _check_vmap_model(self) -> None:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.training or module.running_mean is None
            ):
                raise ValueError(
                    f"SubBatchGradNorm: {describe(name, module)} normalizes with batch statistics (train mode "
                    "or no running stats), and the model has a module outside the grouped forward "
                    f"({', '.join(t.__name__ for t in GROUPED_MODULES)}), so it runs under torch.func.vmap, "
                    "where BatchNorm's running-statistics update cannot run. Put it in eval mode, or use "
                    "only grouped modules"
                )

    def _layout(self, x: torch.Tensor, y: torch.Tensor) -> _Layout:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(
                f"SubBatchGradNorm: x and y must be tensors, got {type(x).__name__} and {type(y).__name__}"
            )
        if x.dim() == 0 or y.dim() == 0:
            raise ValueError(
                f"SubBatchGradNorm: x and y need a leading batch dim, got shapes {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        batch = x.shape[0]
        if y.shape[0] != batch:
            raise ValueError(
                f"SubBatchGradNorm: x has batch size {batch} (shape {tuple(x.shape)}) but y has "
                f"{y.shape[0]} (shape {tuple(y.shape)})"
            )
        if batch < self.num_subbatches:
            raise ValueError(
                f"SubBatchGradNorm: batch size {batch} is smaller than num_subbatches={self.num_subbatches}; "
                "a sub-batch would be empty"
            )
        return _Layout.split(batch, self.num_subbatches, x.device, self.params[0][1].dtype)

    # ------------------------------------------------------------------------------- passes
    def _per_example_losses(self, grouped, run: _Pass, x, y) -> torch.Tensor:
        """``[B]`` losses, example i evaluated at parameter set ``k(i)`` of ``run``."""
        if grouped is not None:
            with _grouped_forward(grouped, run):
                losses = self.loss_fn(self.model(x), y)
        else:
            self._check_vmap_model()
            names = {id(p): n for n, p in self.params}
            losses = self._vmapped_losses({names[i]: s for i, s in run.stacks.items()}, x, y, run.layout)
        if not isinstance(losses, torch.Tensor) or losses.shape != (x.shape[0],):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"SubBatchGradNorm: loss_fn must return per-example losses of shape [B] = [{x.shape[0]}] "
                f"(reduction='none'), got {shape}"
            )
        return losses

    def _vmapped_losses(self, stacks: dict, x, y, layout: _Layout) -> torch.Tensor:
        # Frozen parameters and buffers are constants shared by all sub-batches.
        frozen = {n: p for n, p in self.model.named_parameters() if not p.requires_grad}
        frozen.update(dict(self.model.named_buffers()))

        def subbatch_losses(params, xk, yk):
            return self.loss_fn(functional_call(self.model, (params, frozen), (xk,)), yk)

        # randomness="different": dropout draws its own masks per sub-batch, as separate forwards would
        vmapped = vmap(subbatch_losses, in_dims=(0, 0, 0), randomness="different")

        def per_subbatch(params, xs, ys):
            try:
                return vmapped(params, xs, ys)
            except RuntimeError as exc:
                if "Batching rule not implemented" not in str(exc) and "vmap" not in str(exc):
                    raise
                # no vmap rule for an op of the model (aten::lstm, aten::gru): one functional forward per
                # sub-batch, the same values and gradients
                return torch.stack([subbatch_losses({n: t[k] for n, t in params.items()}, xs[k], ys[k])
                                    for k in range(xs.shape[0])])
        out = []
        for first, count, rounds, start in layout.segments:
            rows = slice(start, start + rounds * count)  # [rounds, count] -> [count, rounds]
            xs = x[rows].reshape(rounds, count, *x.shape[1:]).transpose(0, 1)
            ys = y[rows].reshape(rounds, count, *y.shape[1:]).transpose(0, 1)
            losses = per_subbatch({n: s[first:first + count] for n, s in stacks.items()}, xs, ys)
            out.append(losses.transpose(0, 1).reshape(-1))
        return _join(out)

    def _finite_difference(self, x, y, clean_weight: Callable[[_Layout], torch.Tensor], update_running_stats: bool):
        """Algorithm 1's two passes. ``clean_weight(layout)`` gives ``c [M] > 0``; returns, per trainable
        parameter, ``sum_k c_k g_k`` and ``sum_k grad L(B_k, w - alpha g_k)``, the losses ``[B]`` at ``w``
        and R_alpha, all detached."""
        layout = self._layout(x, y)
        grouped = self._grouped_modules()
        m = self.num_subbatches
        low_rank = frozenset(
            id(p) for _, module in (grouped or ()) if type(module) is nn.Linear
            for p in (module.weight, module.bias) if p is not None and p.requires_grad
        )
        stacked = [p for _, p in self.params if id(p) not in low_rank]
        direct = [p for _, p in self.params if id(p) in low_rank]
        c = clean_weight(layout).to(layout.inverse_size)
        # clean pass: every set equal to w; the stacks' gradients are c_k g_k
        stacks = {id(p): p.detach().unsqueeze(0).expand(m, *p.shape).requires_grad_() for p in stacked}
        run = _Pass(stacks, layout, update_running_stats, low_rank, uses={})
        losses = self._per_example_losses(grouped, run, x, y)
        records = list({id(r): r for uses in run.uses.values() for r in uses}.values())
        grads = torch.autograd.grad(
            (losses * (c[layout.subbatch_of] * layout.inverse_size)).sum(),
            list(stacks.values()) + direct + [r[1] for r in records],
            allow_unused=True,
        )
        stack_grads, direct_grads = grads[:len(stacked)], grads[len(stacked):len(stacked) + len(direct)]
        per_example_c = c[layout.subbatch_of]
        for record, delta in zip(records, grads[len(stacked) + len(direct):]):
            delta = torch.zeros_like(record[1]) if delta is None else delta
            # delta of L(B_k) alone: sum_{i in B_k} a_i delta_i^T is then g_k
            record[1], record[2] = None, delta.detach() / per_example_c.reshape(-1, *([1] * (delta.ndim - 1)))
        clean = {id(p): g.sum(0) for p, g in zip(stacked, stack_grads)}
        clean.update({id(p): torch.zeros_like(p) if g is None else g for p, g in zip(direct, direct_grads)})
        # perturbed pass: set k equal to w - alpha g_k
        shifted_stacks = {
            id(p): torch.addcdiv(p.detach(), g, c.reshape(m, *([1] * p.ndim)), value=-self.alpha).requires_grad_()
            for p, g in zip(stacked, stack_grads)
        }
        run = _Pass(shifted_stacks, layout, False, low_rank, uses=run.uses, shifted=True, alpha=self.alpha)
        shifted = self._per_example_losses(grouped, run, x, y)
        grads = torch.autograd.grad(
            (shifted * layout.inverse_size).sum(), list(shifted_stacks.values()) + direct, allow_unused=True
        )
        shifted_sum = {id(p): g.sum(0) for p, g in zip(stacked, grads[:len(stacked)])}
        shifted_sum.update({id(p): torch.zeros_like(p) if g is None else g for p, g in zip(direct, grads[len(stacked):])})
        r_alpha = ((losses.detach() - shifted.detach()) * layout.inverse_size).sum() / m
        params = [p for _, p in self.params]
        return losses.detach(), [clean[id(p)] for p in params], [shifted_sum[id(p)] for p in params], r_alpha

    def _exact_penalty(self, x, y, update_running_stats: bool):
        """``(losses [B], beta alpha (1/M) sum_k ||g_k||^2)``, both differentiable in ``w``."""
        layout = self._layout(x, y)
        m = self.num_subbatches
        stacks = {id(p): p.unsqueeze(0).expand(m, *p.shape) for _, p in self.params}  # views of w, differentiable
        losses = self._per_example_losses(self._grouped_modules(), _Pass(stacks, layout, update_running_stats), x, y)
        g = torch.autograd.grad((losses * layout.inverse_size).sum(), list(stacks.values()), create_graph=True)
        return losses, self.beta * self.alpha * sum(gk.square().sum() for gk in g) / m

    # ------------------------------------------------------------------------------- public
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``beta R_alpha`` as a loss term (value and gradient of Algorithm 1), see the class doc."""
        if self.exact:
            return self._exact_penalty(x, y, update_running_stats=False)[1]
        m = self.num_subbatches
        _, clean, shifted, r_alpha = self._finite_difference(
            x, y, lambda layout: torch.full((m,), 1.0 / m, dtype=torch.float64), update_running_stats=False
        )
        # value beta R_alpha, gradient beta (1/M) sum_k [g_k - grad L(B_k, w - alpha g_k)], as one node
        from fastcurv.regularizers.curvature import gradient_term

        grads = [gc.add_(gs, alpha=-1.0 / m).mul_(self.beta) for gc, gs in zip(clean, shifted)]  # ours: in place
        return gradient_term(self.beta * torch.as_tensor(r_alpha), grads, [p for _, p in self.params])

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accumulate ``grad [L(B, w) + beta R_alpha(w)]`` into ``.grad``; return ``L(B, w)`` (detached)."""
        if self.exact:
            losses, penalty = self._exact_penalty(x, y, update_running_stats=True)
            (losses.mean() + penalty).backward()
            self.last_penalty = penalty.detach()
            return losses.detach().mean()
        m = self.num_subbatches
        batch = x.shape[0]

        def clean_weight(layout):
            # grad L(B, w) = sum_k (|B_k|/B) g_k, grad (1/M) sum_k L(B_k, w) = (1/M) sum_k g_k
            return torch.tensor(layout.sizes, dtype=torch.float64) / batch + self.beta / m

        losses, clean, shifted, r_alpha = self._finite_difference(x, y, clean_weight, update_running_stats=True)
        for (_, p), gc, gs in zip(self.params, clean, shifted):
            step = gc.add_(gs, alpha=-self.beta / m)  # gc is ours: updating it in place saves a P-sized allocation
            if p.grad is None:
                p.grad = step
            else:
                p.grad.add_(step)
        self.last_penalty = self.beta * r_alpha
        return losses.mean()
