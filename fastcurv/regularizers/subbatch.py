"""Sub-batch gradient-norm regularizer R_alpha of Jia & Su (paper 001, section 6, Algorithm 1).

Split the batch B into M sub-batches B_k, let ``g_k = grad L(B_k, w)`` (detached; ``L(B_k, w)`` is the
MEAN loss over B_k) and

    R_alpha(w) = (1/M) sum_k [ L(B_k, w) - L(B_k, w - alpha g_k) ]  ~=  alpha (1/M) sum_k ||g_k||^2.

Training minimizes ``L(B, w) + beta R_alpha(w)`` with no gradient through g_k: the gradient of R_alpha is
``(1/M) sum_k [g_k - grad L(B_k, w - alpha g_k)]``.

How it is computed (two passes of the model over the whole batch, no model copies, no loop over k):
every layer holding trainable parameters runs with a STACK of M parameter sets ``[M, *param.shape]``,
sub-batch k using set k (Linear: one ``bmm``; Conv: one convolution with the sub-batches folded into
groups; norm layers: a per-example gather of the small affine vectors). Layers without parameters
(activations, pooling, residual adds) run on the whole batch as usual.

1. Clean pass, every set equal to ``w``: backpropagating the sub-batch mean losses to the stacks gives
   all M gradients ``g_k`` at once (per layer the ``bmm`` of the weight gradient: the FLOPs of one
   ordinary weight gradient). ``grad L(B, w)`` and ``grad (1/M) sum_k L(B_k, w)`` are linear
   combinations of them, so the data loss needs no backward of its own.
2. Perturbed pass, set k equal to ``w - alpha g_k``: one forward and backward give all
   ``grad L(B_k, w - alpha g_k)``.

Models with a module this grouped forward does not cover (see :data:`GROUPED_MODULES`) fall back to
``torch.func.vmap`` over the sub-batches of ``functional_call`` (same values and gradients, slower).
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

from fastcurv.regularizers.norms import Regularizer, check_coefficient, trainable_parameters

__all__ = ["SubBatchGradNorm", "GROUPED_MODULES"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_RMSNORM = getattr(nn, "RMSNorm", None)  # torch >= 2.4


# ================================================================================ sub-batch layout
@dataclass
class _Layout:
    """Near-equal sub-batches of consecutive examples: the first ``B mod M`` have ``ceil(B/M)``
    examples, the others ``floor(B/M)``. ``segments`` groups the sub-batches of one size:
    ``(first sub-batch, how many, their size, first example)``; at most two."""

    sizes: list[int]
    segments: list[tuple[int, int, int, int]]
    subbatch_of: torch.Tensor  # [B] long: the sub-batch of each example
    inverse_size: torch.Tensor  # [B]: 1 / |B_k(i)|, so that sum_i inverse_size_i l_i = sum_k L(B_k)

    @classmethod
    def split(cls, batch: int, m: int, device, dtype) -> "_Layout":
        q, r = divmod(batch, m)
        sizes = [q + 1] * r + [q] * (m - r)
        segments = [(0, r, q + 1, 0)] if r else []
        if m > r:
            segments.append((r, m - r, q, r * (q + 1)))
        sizes_t = torch.tensor(sizes, device=device)
        subbatch_of = torch.repeat_interleave(torch.arange(m, device=device), sizes_t)
        inverse_size = (1.0 / sizes_t.to(dtype))[subbatch_of]
        return cls(sizes, segments, subbatch_of, inverse_size)


# ====================================================================== grouped forward of one layer
@dataclass
class _Pass:
    """One grouped pass: the parameter stacks (by ``id(param)``; a frozen parameter has none and is
    shared by all sub-batches), the layout, and whether BatchNorm may update its running statistics."""

    stacks: dict
    layout: _Layout
    update_running_stats: bool

    def stacked(self, module: nn.Module, pname: str, first: int, count: int) -> Optional[torch.Tensor]:
        """``[count, *shape]``: sub-batches ``first .. first + count`` of a parameter (None if absent)."""
        p = getattr(module, pname, None)
        if p is None:
            return None
        stack = self.stacks.get(id(p))
        if stack is None:
            return p.unsqueeze(0).expand(count, *p.shape)
        return stack[first:first + count]


def _describe(name: str, module: nn.Module) -> str:
    return f"module '{name}' ({type(module).__name__})" if name else f"the root module ({type(module).__name__})"


def _join(outs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _linear(module: nn.Linear, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    outs = []
    for first, count, size, start in run.layout.segments:
        xs = x[start:start + count * size].reshape(count, -1, x.shape[-1])  # [count, size*T, d_in]
        w = run.stacked(module, "weight", first, count).transpose(1, 2)
        b = run.stacked(module, "bias", first, count)
        z = torch.bmm(xs, w) if b is None else torch.baddbmm(b.unsqueeze(1), xs, w)
        outs.append(z.reshape(count * size, *x.shape[1:-1], w.shape[2]))
    return _join(outs)


def _conv(module: nn.modules.conv._ConvNd, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    # The sub-batches folded into channel groups: input [size, count*C_in, ...], groups count*G.
    if x.ndim != len(module.kernel_size) + 2:
        raise ValueError(
            f"SubBatchGradNorm: {_describe(name, module)} got input {tuple(x.shape)}; expected a batched "
            f"[B, C, {len(module.kernel_size)} spatial dims] input"
        )
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    outs = []
    for first, count, size, start in run.layout.segments:
        xs = x[start:start + count * size].reshape(count, size, *x.shape[1:]).transpose(0, 1)
        w = run.stacked(module, "weight", first, count)
        b = run.stacked(module, "bias", first, count)
        z = _CONV[type(module)](
            xs.reshape(size, count * x.shape[1], *x.shape[2:]), w.reshape(-1, *w.shape[2:]),
            None if b is None else b.reshape(-1), module.stride, padding, module.dilation, count * module.groups,
        )
        c_out = w.shape[1]
        outs.append(z.reshape(size, count, c_out, *z.shape[2:]).transpose(0, 1).reshape(count * size, c_out, *z.shape[2:]))
    return _join(outs)


def _ghost_batch_norm(module: nn.modules.batchnorm._BatchNorm, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm with each sub-batch's own statistics (biased variance, as BatchNorm normalizes with).
    In a pass that may update them, the running statistics move once, towards the mean over the M
    sub-batches of their (mean, unbiased variance)."""
    update = run.update_running_stats and module.training and module.running_mean is not None
    dims = (1,) + tuple(range(3, x.ndim + 1))  # of [count, size, C, *spatial]: all but count and C
    parts, means, variances = [], [], []
    for _, count, size, start in run.layout.segments:
        xs = x[start:start + count * size].reshape(count, size, *x.shape[1:])
        n = size * xs[0, 0, 0].numel()  # values per channel in one sub-batch
        if n <= 1:
            raise ValueError(
                f"SubBatchGradNorm: {_describe(name, module)} normalizes each sub-batch with its own batch "
                f"statistics, but with input {tuple(x.shape)} a sub-batch of {size} example(s) has {n} value per "
                "channel (need more than 1): use fewer sub-batches, a larger batch, or eval mode"
            )
        var, mean = torch.var_mean(xs, dim=dims, keepdim=True, correction=0)
        parts.append(((xs - mean) * torch.rsqrt(var + module.eps)).reshape(count * size, *x.shape[1:]))
        if update:
            means.append(mean.detach().reshape(count, -1))
            variances.append(var.detach().reshape(count, -1) * (n / (n - 1)))
    if update:
        with torch.no_grad():
            module.num_batches_tracked.add_(1)
            momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
            module.running_mean.lerp_(torch.cat(means).mean(0).to(module.running_mean.dtype), momentum)
            module.running_var.lerp_(torch.cat(variances).mean(0).to(module.running_var.dtype), momentum)
    return _join(parts)


def _norm(module: nn.Module, name: str, run: _Pass, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    elif _RMSNORM is not None and isinstance(module, _RMSNORM):
        xhat = F.rms_norm(x, module.normalized_shape, None, module.eps)
    elif isinstance(module, nn.GroupNorm):
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    elif module.training or module.running_mean is None:
        module._check_input_dim(x)
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


@contextlib.contextmanager
def _grouped_forward(modules: list[tuple[str, nn.Module]], run: _Pass):
    """Inside: each listed module's forward is its grouped rule (an instance attribute, so the
    module's hooks still run); restored on exit, also on an exception."""
    try:
        for name, module in modules:
            module.forward = functools.partial(_GROUPED_RULES[type(module)], module, name, run)
        yield
    finally:
        for _, module in modules:
            module.__dict__.pop("forward", None)


# ================================================================================ the regularizer
def _cross_entropy_per_example(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target, reduction="none")


class SubBatchGradNorm(Regularizer):
    """``beta * R_alpha(w)`` of paper 001's Algorithm 1, or its exact first-order form.

    Args:
        model: the network; its parameters that require grad are ``w``.
        alpha: perturbation size (paper: 1e-4), ``> 0``.
        beta: weight of the regularizer (paper: 1..100), ``>= 0``.
        num_subbatches: M (paper: 8). ``M = B`` (one example per sub-batch) gives the per-example
            squared-gradient-norm penalty of SCIENCE.md section 1.
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

    Sub-batches: consecutive examples, near-equal sizes when M does not divide B (the first ``B mod M``
    get one example more). ``L(B_k, w)`` is the mean over B_k and R_alpha averages the M terms with
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
        if isinstance(num_subbatches, bool) or int(num_subbatches) != num_subbatches or num_subbatches < 1:
            raise ValueError(
                f"SubBatchGradNorm: num_subbatches must be an integer >= 1, got {num_subbatches!r}"
            )
        self.num_subbatches = int(num_subbatches)
        self.exact = bool(exact)
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
            if type(module) in _GROUPED_RULES:
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
                    f"SubBatchGradNorm: {_describe(name, module)} normalizes with batch statistics (train mode "
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
    def _per_example_losses(self, stacks: dict, x, y, layout: _Layout, update_running_stats: bool) -> torch.Tensor:
        """``[B]`` losses, example i evaluated at parameter set ``stacks[name][k(i)]``."""
        grouped = self._grouped_modules()
        if grouped is not None:
            ids = {name: id(p) for name, p in self.params}
            run = _Pass({ids[n]: s for n, s in stacks.items()}, layout, update_running_stats)
            with _grouped_forward(grouped, run):
                losses = self.loss_fn(self.model(x), y)
        else:
            self._check_vmap_model()
            losses = self._vmapped_losses(stacks, x, y, layout)
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
        per_subbatch = vmap(subbatch_losses, in_dims=(0, 0, 0), randomness="different")
        out = []
        for first, count, size, start in layout.segments:
            xs = x[start:start + count * size].reshape(count, size, *x.shape[1:])
            ys = y[start:start + count * size].reshape(count, size, *y.shape[1:])
            out.append(per_subbatch({n: s[first:first + count] for n, s in stacks.items()}, xs, ys).reshape(-1))
        return _join(out)

    def _repeated(self, differentiable: bool) -> dict:
        """Every sub-batch's parameter set equal to ``w``: ``[M, *shape]`` views, no copies."""
        m = self.num_subbatches
        if differentiable:
            return {n: p.unsqueeze(0).expand(m, *p.shape) for n, p in self.params}
        return {n: p.detach().unsqueeze(0).expand(m, *p.shape).requires_grad_() for n, p in self.params}

    def _finite_difference(self, x, y, update_running_stats: bool):
        """Both passes: ``(losses [B] at w, g_k and grad L(B_k, w - alpha g_k) per param as [M, *shape],
        R_alpha)``, all detached."""
        layout = self._layout(x, y)
        stacks = self._repeated(differentiable=False)
        losses = self._per_example_losses(stacks, x, y, layout, update_running_stats)
        # sum_i l_i / |B_k(i)| = sum_k L(B_k, w): its gradient w.r.t. stack k is g_k
        g = torch.autograd.grad((losses * layout.inverse_size).sum(), list(stacks.values()))
        shifted_stacks = {
            n: (p.detach().unsqueeze(0) - self.alpha * gk).requires_grad_() for (n, p), gk in zip(self.params, g)
        }
        shifted = self._per_example_losses(shifted_stacks, x, y, layout, update_running_stats=False)
        h = torch.autograd.grad((shifted * layout.inverse_size).sum(), list(shifted_stacks.values()))
        r_alpha = ((losses.detach() - shifted.detach()) * layout.inverse_size).sum() / self.num_subbatches
        return losses.detach(), layout, g, h, r_alpha

    def _exact_penalty(self, x, y, update_running_stats: bool):
        """``(losses [B], beta alpha (1/M) sum_k ||g_k||^2)``, both differentiable in ``w``."""
        layout = self._layout(x, y)
        stacks = self._repeated(differentiable=True)
        losses = self._per_example_losses(stacks, x, y, layout, update_running_stats)
        g = torch.autograd.grad((losses * layout.inverse_size).sum(), list(stacks.values()), create_graph=True)
        return losses, self.beta * self.alpha * sum(gk.square().sum() for gk in g) / self.num_subbatches

    # ------------------------------------------------------------------------------- public
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``beta R_alpha`` as a loss term (value and gradient of Algorithm 1), see the class doc."""
        if self.exact:
            return self._exact_penalty(x, y, update_running_stats=False)[1]
        _, _, g, h, r_alpha = self._finite_difference(x, y, update_running_stats=False)
        # linear surrogate: value beta R_alpha, gradient beta (1/M) sum_k [g_k - grad L(B_k, w - alpha g_k)]
        slope = sum(((p - p.detach()) * (gk - hk).mean(0)).sum() for (_, p), gk, hk in zip(self.params, g, h))
        return self.beta * (r_alpha + slope)

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accumulate ``grad [L(B, w) + beta R_alpha(w)]`` into ``.grad``; return ``L(B, w)`` (detached)."""
        if self.exact:
            losses, penalty = self._exact_penalty(x, y, update_running_stats=True)
            (losses.mean() + penalty).backward()
            self.last_penalty = penalty.detach()
            return losses.detach().mean()
        losses, layout, g, h, r_alpha = self._finite_difference(x, y, update_running_stats=True)
        m = self.num_subbatches
        # grad L(B, w) = sum_k (|B_k|/B) g_k and grad (1/M) sum_k L(B_k, w) = (1/M) sum_k g_k
        clean_weight = torch.tensor(layout.sizes, dtype=losses.dtype, device=losses.device) / losses.shape[0]
        clean_weight = clean_weight + self.beta / m
        for (_, p), gk, hk in zip(self.params, g, h):
            step = torch.tensordot(clean_weight.to(gk.dtype), gk, dims=1) - (self.beta / m) * hk.sum(0)
            if p.grad is None:
                p.grad = step
            else:
                p.grad += step
        self.last_penalty = self.beta * r_alpha
        return losses.mean()
