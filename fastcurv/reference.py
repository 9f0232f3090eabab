"""Plain-PyTorch versions of every fastcurv op.

They are the test oracle, the fallback when no compiled/Triton backend is available, and the
benchmark baseline. They are written for clarity first, but pick the cheaper of the ghost and the
materialized form (see :func:`use_ghost`) so the fallback is not pathologically slow.

Shapes: ``a`` is ``[B, T, d_in]`` (layer inputs), ``delta`` is ``[B, T, d_out]`` (dl_i/dz_i).
Half-precision inputs are computed in float32; results are float32 for them (squared norms
overflow fp16 easily) and in the input dtype otherwise. Gradients come back in the input dtypes.
"""
from __future__ import annotations

import torch

__all__ = [
    "use_ghost",
    "compute_dtype",
    "per_example_sqnorm",
    "per_example_sqnorm_backward",
    "per_example_gram",
    "per_example_gram_backward",
]


def use_ghost(T: int, d_in: int, d_out: int) -> bool:
    """The per-layer cost rule for T > 1: the ghost form costs O(T^2 (d_in + d_out)) per example,
    the materialized per-example gradient O(T d_in d_out). Every backend uses this same rule."""
    return 2 * T * T <= d_in * d_out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and result) dtype: fp32 for fp16/bf16, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x.dtype))


# ---------------------------------------------------------------- per-example squared norms
def per_example_sqnorm(a: torch.Tensor, delta: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """s_i = ||sum_t delta_it a_it^T||_F^2 (+ ||sum_t delta_it||^2 if bias). Returns [B]."""
    a, delta = _up(a), _up(delta)
    B, T, d_in = a.shape
    d_out = delta.shape[2]
    if T == 1:
        s = delta[:, 0].square().sum(1) * a[:, 0].square().sum(1)
    elif use_ghost(T, d_in, d_out):
        s = (a @ a.transpose(1, 2) * (delta @ delta.transpose(1, 2))).sum((1, 2))
    else:
        s = (delta.transpose(1, 2) @ a).square().sum((1, 2))
    if bias:
        s = s + delta.sum(1).square().sum(1)
    return s


def per_example_sqnorm_backward(grad: torch.Tensor, a: torch.Tensor, delta: torch.Tensor, bias: bool = True):
    """Vector-Jacobian product of :func:`per_example_sqnorm`: returns (grad_a, grad_delta)."""
    in_a, in_d = a.dtype, delta.dtype
    g2 = 2 * _up(grad)[:, None, None]
    a, delta = _up(a), _up(delta)
    B, T, d_in = a.shape
    d_out = delta.shape[2]
    if T == 1:
        grad_a = g2 * delta.square().sum(2, keepdim=True) * a
        grad_d = g2 * a.square().sum(2, keepdim=True) * delta
    elif use_ghost(T, d_in, d_out):
        grad_a = g2 * ((delta @ delta.transpose(1, 2)) @ a)
        grad_d = g2 * ((a @ a.transpose(1, 2)) @ delta)
    else:
        per_example_grad = delta.transpose(1, 2) @ a  # [B, d_out, d_in]
        grad_a = g2 * (delta @ per_example_grad)
        grad_d = g2 * (a @ per_example_grad.transpose(1, 2))
    if bias:
        grad_d = grad_d + g2 * delta.sum(1, keepdim=True)
    return grad_a.to(in_a), grad_d.to(in_d)


# ---------------------------------------------------------------- per-example gradient Gram
def per_example_gram(a: torch.Tensor, delta: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """G_ij = <g_i, g_j> of the per-example gradients (weight, + bias if bias). Returns [B, B]."""
    a, delta = _up(a), _up(delta)
    B, T, d_in = a.shape
    d_out = delta.shape[2]
    if T == 1:
        A, D = a[:, 0], delta[:, 0]
        gram_a = A @ A.T
        return (gram_a + 1 if bias else gram_a) * (D @ D.T)
    if use_ghost(T, d_in, d_out):
        A, D = a.reshape(B * T, d_in), delta.reshape(B * T, d_out)
        G = ((A @ A.T) * (D @ D.T)).reshape(B, T, B, T).sum((1, 3))
    else:
        J = (delta.transpose(1, 2) @ a).reshape(B, d_out * d_in)
        G = J @ J.T
    if bias:
        Dsum = delta.sum(1)
        G = G + Dsum @ Dsum.T
    return G


def per_example_gram_backward(grad: torch.Tensor, a: torch.Tensor, delta: torch.Tensor, bias: bool = True):
    """Vector-Jacobian product of :func:`per_example_gram`: returns (grad_a, grad_delta)."""
    in_a, in_d = a.dtype, delta.dtype
    W = _up(grad)
    W = W + W.T  # G is symmetric in (i, j): both slots see the gradient
    a, delta = _up(a), _up(delta)
    B, T, d_in = a.shape
    d_out = delta.shape[2]
    if T == 1:
        A, D = a[:, 0], delta[:, 0]
        gram_a = A @ A.T
        grad_a = ((W * (D @ D.T)) @ A)[:, None]
        grad_d = ((W * (gram_a + 1 if bias else gram_a)) @ D)[:, None]
        return grad_a.to(in_a), grad_d.to(in_d)
    if use_ghost(T, d_in, d_out):
        A, D = a.reshape(B * T, d_in), delta.reshape(B * T, d_out)
        W_big = W.repeat_interleave(T, 0).repeat_interleave(T, 1)
        grad_a = ((W_big * (D @ D.T)) @ A).reshape(B, T, d_in)
        grad_d = ((W_big * (A @ A.T)) @ D).reshape(B, T, d_out)
    else:
        J = (delta.transpose(1, 2) @ a).reshape(B, d_out * d_in)
        dJ = (W @ J).reshape(B, d_out, d_in)
        grad_a = delta @ dJ
        grad_d = a @ dJ.transpose(1, 2)
    if bias:
        grad_d = grad_d + (W @ delta.sum(1))[:, None, :]
    return grad_a.to(in_a), grad_d.to(in_d)
