"""Affine parameters of LayerNorm / RMSNorm / GroupNorm / BatchNorm:
``g_i^gamma = sum delta * xhat``, ``g_i^beta = sum delta`` over the non-parameter dims.
Small per-example vectors: materialized.

BatchNorm normalizing with batch statistics (train mode, or no running stats) makes examples
interact; the capture refuses it unless asked for ``batchnorm="frozen_stats"`` (the per-example
gradient with the batch statistics held constant: :func:`frozen_stats_forward` below) or
``batchnorm="exact"`` (handled by the capture itself, see capture.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fastcurv.layers.base import CapturedLayer, common_dtype, describe
from fastcurv.layers.registry import register

__all__ = ["NormLayer", "uses_batch_stats", "frozen_stats_forward", "frozen_batch_norm", "frozen_batch_norm_calls", "stats_gate_closed"]

_RMSNORM = getattr(nn, "RMSNorm", None)  # torch >= 2.4
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LAST_DIM_NORMS = (nn.LayerNorm,) + ((_RMSNORM,) if _RMSNORM else ())


def uses_batch_stats(module: nn.Module) -> bool:
    return module.training or module.running_mean is None or module.running_var is None


@register(nn.LayerNorm, nn.GroupNorm, *_BATCHNORM, *((_RMSNORM,) if _RMSNORM else ()))
class NormLayer(CapturedLayer):
    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        self._xhat = None
        m = module
        self.weight_trainable = getattr(m, "weight", None) is not None and m.weight.requires_grad
        self.bias_trainable = getattr(m, "bias", None) is not None and m.bias.requires_grad

    def _cache_clear(self):
        self._xhat = None

    @property
    def accepts_parameter_input(self) -> bool:
        # a last-dim norm of a parameter (DeBERTa's LayerNorm of its rel_embeddings table), shared by the batch:
        # xhat [*, C] broadcasts against the per-example deltas [B, *, C]
        return isinstance(self.module, _LAST_DIM_NORMS)

    @property
    def regroups_rows(self) -> bool:
        return isinstance(self.module, _LAST_DIM_NORMS)  # per-channel norms treat dim 0 as the batch themselves

    def layout_is_ambiguous(self, inp, batch_size):
        # per-channel norms (GroupNorm, BatchNorm, InstanceNorm) treat dim 0 as the batch themselves
        return isinstance(self.module, _LAST_DIM_NORMS) and super().layout_is_ambiguous(inp, batch_size)

    def check_input(self, inp):
        super().check_input(inp)
        m = self.module
        if isinstance(m, _LAST_DIM_NORMS) and inp.ndim <= len(m.normalized_shape):
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} got input {tuple(inp.shape)} with no "
                f"batch dim in front of normalized_shape {tuple(m.normalized_shape)}"
            )
        if isinstance(m, (nn.GroupNorm,) + _BATCHNORM) and inp.ndim < 2:
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} got input {tuple(inp.shape)}; expected "
                "[B, C, *]"
            )

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """xhat recomputed from a recorded input, differentiably."""
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if _RMSNORM is not None and isinstance(m, _RMSNORM):
            return F.rms_norm(x, m.normalized_shape, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if uses_batch_stats(m):  # batchnorm="frozen_stats": the statistics this batch was normalized with
            return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
        return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)

    def _reduce_dims(self, ndim: int) -> tuple[int, ...]:
        """Dims summed over to get one example's gradient (everything but batch and param dims)."""
        m = self.module
        if isinstance(m, _LAST_DIM_NORMS):
            return tuple(range(1, ndim - len(m.normalized_shape)))  # [B, *, *normalized_shape]
        return tuple(range(2, ndim))  # GroupNorm / BatchNorm: [B, C] or [B, C, *], param per channel

    def _per_example_grads(self, deltas):
        if self._xhat is None:
            with torch.enable_grad():  # cached for later create_graph calls too: keep it in the graph
                self._xhat = [self._normalized(r.input) for r in self.records]
        weight = bias = 0
        for xhat, d in zip(self._xhat, deltas):
            xhat, d = common_dtype(xhat, d)
            dims = self._reduce_dims(d.ndim)
            if self.weight_trainable:
                weight = weight + ((d * xhat).sum(dims) if dims else d * xhat)
            if self.bias_trainable:
                bias = bias + (d.sum(dims) if dims else d)
        return ([weight] if self.weight_trainable else []) + ([bias] if self.bias_trainable else [])


# --------------------------------------------------------------------------- frozen batch statistics
_gate = {"closed": False}  # a plain global: autograd may run backward nodes on another thread


class stats_gate_closed:
    """While active, gradients do not flow into the batch statistics of BatchNorms running
    :func:`frozen_stats_forward` (the capture computes its deltas inside it)."""

    def __enter__(self):
        self._was = _gate["closed"]
        _gate["closed"] = True

    def __exit__(self, *exc):
        _gate["closed"] = self._was


class _StatsGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, var):
        return mean.view_as(mean), var.view_as(var)

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        if _gate["closed"]:
            return torch.zeros_like(grad_mean), torch.zeros_like(grad_var)
        return grad_mean, grad_var


def frozen_stats_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm's batch-statistics forward, with the statistics behind a gate: an ordinary
    backward (the training step) sees the true BatchNorm gradient, while the capture's deltas,
    computed with the gate closed, treat mean and variance as constants."""
    if x.ndim < 2:
        raise ValueError(f"BatchNorm: expected [B, C, *], got {tuple(x.shape)}")
    m = module
    track = m.training and m.track_running_stats and m.running_mean is not None
    momentum = 0.0
    if track:
        with torch.no_grad():
            m.num_batches_tracked.add_(1)
        momentum = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
    return frozen_batch_norm(x, m.running_mean if track else None, m.running_var if track else None,
                             m.weight, m.bias, momentum, m.eps)


def frozen_batch_norm(x, running_mean, running_var, weight, bias, momentum: float, eps: float) -> torch.Tensor:
    """``F.batch_norm(..., training=True)`` with the batch statistics behind the gate (running statistics,
    when given, updated with ``momentum`` as F.batch_norm does)."""
    dims = [0] + list(range(2, x.ndim))
    n = x.numel() // x.shape[1]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
            unbiased = var.detach() * (n / max(n - 1, 1))
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    mean, var = _StatsGate.apply(mean, var)
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


class frozen_batch_norm_calls(TorchFunctionMode):
    """batchnorm="frozen_stats" for a BatchNorm subclass with its own forward (timm's BatchNormAct2d:
    F.batch_norm, then an activation): its forward runs as written, with each batch-statistics
    F.batch_norm call replaced by :func:`frozen_batch_norm`."""

    _ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = dict(zip(self._ARGS, args), **kwargs)
            if call.get("training", False):
                momentum = call.get("momentum", 0.1)
                return frozen_batch_norm(call["input"], call.get("running_mean"), call.get("running_var"),
                                         call.get("weight"), call.get("bias"), 0.0 if momentum is None else momentum,
                                         call.get("eps", 1e-5))
        return func(*args, **kwargs)
