"""Shared registration: input checks, fake kernels and autograd for every (forward, backward)
op pair. Each forward's backward is its backward op (a kernel of the same backend); the backward
op is itself differentiable through the reference VJP, which is what double backward
(`gradgradcheck`, Hessians of a penalty) needs."""
import importlib
from typing import Callable, Optional

import torch

from fastcurv.reference import compute_dtype


def check_pair(op: str, a: torch.Tensor, delta: torch.Tensor):
    """Validate (a, delta) and return them as [B, T, d] views."""
    for name, t in (("a", a), ("delta", delta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastcurv.ops.{op}: `{name}` must be a Tensor, got {type(t).__name__}")
        if t.ndim not in (2, 3):
            raise ValueError(
                f"fastcurv.ops.{op}: `{name}` must be [B, d] or [B, T, d], got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"fastcurv.ops.{op}: `{name}` must be floating point, got {t.dtype}")
    if a.ndim != delta.ndim:
        raise ValueError(
            f"fastcurv.ops.{op}: `a` {tuple(a.shape)} and `delta` {tuple(delta.shape)} must both be 2-D or both 3-D"
        )
    if a.shape[:-1] != delta.shape[:-1]:
        raise ValueError(
            f"fastcurv.ops.{op}: leading dims of `a` {tuple(a.shape)} and `delta` {tuple(delta.shape)} "
            "must match ([B] or [B, T])"
        )
    if a.dtype != delta.dtype:
        raise TypeError(f"fastcurv.ops.{op}: `a` is {a.dtype} but `delta` is {delta.dtype}; cast one of them")
    if a.device != delta.device:
        raise ValueError(f"fastcurv.ops.{op}: `a` is on {a.device} but `delta` is on {delta.device}")
    if a.ndim == 2:
        a, delta = a.unsqueeze(1), delta.unsqueeze(1)
    return a, delta


def register_pair(
    forward: str,
    backward: str,
    reference_backward: Callable,
    out_shape: Callable[[torch.Tensor], tuple[int, ...]],
) -> None:
    """Fake kernels + autograd for ``forward(a, delta, bias)`` and ``backward(grad, a, delta, bias)``."""
    backward_op = getattr(torch.ops.fastcurv, backward).default

    @torch.library.register_fake(f"fastcurv::{forward}")
    def _forward_fake(a, delta, bias):
        return a.new_empty(out_shape(a), dtype=compute_dtype(a.dtype))

    @torch.library.register_fake(f"fastcurv::{backward}")
    def _backward_fake(grad, a, delta, bias):
        return torch.empty_like(a), torch.empty_like(delta)

    def setup_forward(ctx, inputs, output):
        a, delta, bias = inputs
        ctx.save_for_backward(a, delta)
        ctx.bias = bias

    def backward_of_forward(ctx, grad):
        a, delta = ctx.saved_tensors
        grad_a, grad_delta = backward_op(grad.contiguous(), a, delta, ctx.bias)
        return grad_a, grad_delta, None

    torch.library.register_autograd(f"fastcurv::{forward}", backward_of_forward, setup_context=setup_forward)

    def setup_backward(ctx, inputs, output):
        grad, a, delta, bias = inputs
        ctx.save_for_backward(grad, a, delta)
        ctx.bias = bias

    def backward_of_backward(ctx, grad_grad_a, grad_grad_delta):
        saved = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in saved]
            outs = reference_backward(*leaves, ctx.bias)
            cotangents = [
                torch.zeros_like(o) if g is None else g for o, g in zip(outs, (grad_grad_a, grad_grad_delta))
            ]
            grads = torch.autograd.grad(outs, leaves, cotangents, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(saved, grads)]
        return (*grads, None)

    torch.library.register_autograd(f"fastcurv::{backward}", backward_of_backward, setup_context=setup_backward)


def define_op(name: str, reference_forward: Callable, reference_backward: Callable, out_shape: Callable):
    """Register op ``name`` for every backend and return its dispatching Python entry point.

    * ``fastcurv::{name}`` / ``{name}_backward``: C++ ops from ``fastcurv._C`` (CPU, maybe CUDA).
    * ``fastcurv::{name}_triton`` / ``{name}_backward_triton``: Python custom ops around the
      launchers ``forward`` / ``backward`` of ``fastcurv.triton.{name}`` (imported on first use).
    """
    from fastcurv import _backend

    if _backend.has_extension():
        register_pair(name, f"{name}_backward", reference_backward, out_shape)

    def _triton_module():
        return importlib.import_module(f"fastcurv.triton.{name}")

    def triton_forward(a: torch.Tensor, delta: torch.Tensor, bias: bool) -> torch.Tensor:
        return _triton_module().forward(a, delta, bias)

    def triton_backward(grad: torch.Tensor, a: torch.Tensor, delta: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_module().backward(grad, a, delta, bias)

    torch.library.custom_op(f"fastcurv::{name}_triton", triton_forward, mutates_args=())
    torch.library.custom_op(f"fastcurv::{name}_backward_triton", triton_backward, mutates_args=())
    register_pair(f"{name}_triton", f"{name}_backward_triton", reference_backward, out_shape)

    def run(a: torch.Tensor, delta: torch.Tensor, bias: bool = True, *, backend: Optional[str] = "auto") -> torch.Tensor:
        a, delta = check_pair(name, a, delta)
        # Checked here, once for every backend: the reference would take any truthy object as True.
        if not isinstance(bias, bool):
            raise TypeError(f"fastcurv.ops.{name}: `bias` must be True or False, got {bias!r} ({type(bias).__name__})")
        which = _backend.resolve(backend, a.device)
        if which == "reference" or a.numel() == 0 or delta.numel() == 0:
            return reference_forward(a, delta, bias)  # empty inputs: nothing for a kernel to do
        if which == "triton":
            return getattr(torch.ops.fastcurv, f"{name}_triton")(a, delta, bias)
        return getattr(torch.ops.fastcurv, name)(a, delta, bias)

    return run
