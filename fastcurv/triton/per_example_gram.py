"""Triton kernels and launchers for ``per_example_gram`` (semantics: :func:`fastcurv.reference.per_example_gram`).

G_ij = <g_i, g_j> of the per-example gradients of one linear map (weight, + bias with bias), for a
[B, T, d_in], delta [B, T, d_out] of any strides.

Forward:
* T == 1: :func:`fastcurv.triton._common.scaled_gram_kernel`, tiled over (i, j) blocks of the upper
  triangle: (A_i . A_j + bias) * (D_i . D_j) with two ``tl.dot`` per tile, each tile stored with its
  mirror; no B x B intermediate besides the output.
* T > 1, ghost: :func:`fastcurv.triton._common.ghost_kernel`, one program per pair (i, j >= i)
  sweeping the T x T plane of (a_it . a_js + bias)(d_it . d_js) tile by tile in registers.
* T > 1, materialized: torch GEMMs, J = [D_i^T A_i]_i as [B, d_out*d_in], G = J J^T (+ Dsum Dsum^T):
  a plain GEMM pair is what cuBLAS does best and there is nothing to fuse.

Backward (cotangent W = grad + grad^T, G being symmetric):
* T == 1 and T > 1 ghost: the scaled Gram kernel writes W_big o (D D^T) and W_big o (A A^T + bias)
  over all B*T rows (W_big repeats W over T x T blocks; the Hadamard product is fused into the
  Gram tile), then one torch GEMM each multiplies them into A and D.
* T > 1, materialized: torch GEMMs (dJ = W J, then per-example products).
The torch GEMMs follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default).
"""
from __future__ import annotations

import torch

from fastcurv.reference import compute_dtype, use_ghost
from fastcurv.triton._common import (
    acc_tl_dtype,
    check_grad,
    check_inputs,
    device_guard,
    ghost_kernel,
    scaled_gram,
    dot_tile,
    dot_mode,
)

__all__ = ["forward", "backward"]

_OP = "per_example_gram"


def forward(a: torch.Tensor, delta: torch.Tensor, bias: bool) -> torch.Tensor:
    """Gram matrix [B, B] of the per-example gradients (see module doc for the kernels).

    a [B, T, d_in], delta [B, T, d_out], same floating dtype and device, any strides. Returns a
    fresh tensor in float32 for fp16/bf16 inputs, else in the input dtype."""
    check_inputs(_OP, a, delta)
    B, T, d_in = a.shape
    d_out = delta.shape[2]
    acc = compute_dtype(a.dtype)
    bias = bool(bias)
    if B == 0:
        return torch.empty(0, 0, device=a.device, dtype=acc)
    if T == 1:
        return scaled_gram(a, rows_per_group=1, batched=False, plus_one=bias, y=delta)[0]
    if use_ghost(T, d_in, d_out):
        dot = dot_mode(a.dtype)
        block_t = dot_tile(T, dot)
        block_k = dot_tile(max(d_in, d_out), dot)
        out = torch.empty(B, B, device=a.device, dtype=acc)
        with device_guard(a):
            ghost_kernel[(B, B)](
                a, delta, out, T, d_in, d_out,
                a.stride(0), a.stride(1), a.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
                out.stride(0), out.stride(1),
                BIAS=bias, DIAGONAL=False, DOT_MODE=dot, BLOCK_T=block_t, BLOCK_K=block_k, ACC_DTYPE=acc_tl_dtype(a.dtype),
            )
        return out
    a_up, d_up = a.to(acc), delta.to(acc)
    per_example_grads = torch.bmm(d_up.transpose(1, 2), a_up).reshape(B, d_out * d_in)
    out = per_example_grads @ per_example_grads.T
    if bias:
        d_sum = d_up.sum(1)
        out.addmm_(d_sum, d_sum.T)
    return out


def backward(grad: torch.Tensor, a: torch.Tensor, delta: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of :func:`forward` for the cotangent ``grad`` [B, B].

    Returns fresh (grad_a, grad_delta) shaped and typed like a and delta."""
    check_inputs(_OP, a, delta)
    B, T, d_in = a.shape
    d_out = delta.shape[2]
    check_grad(_OP, grad, (B, B), a.device)
    bias = bool(bias)
    acc = compute_dtype(a.dtype)
    if a.numel() == 0 and delta.numel() == 0:
        return torch.zeros_like(a, memory_format=torch.contiguous_format), torch.zeros_like(delta, memory_format=torch.contiguous_format)
    a_up, d_up = a.to(acc), delta.to(acc)
    if T == 1 or use_ghost(T, d_in, d_out):
        # [B*T, B*T] matrices W_big o (D D^T) and W_big o (A A^T + bias), each followed by one GEMM
        weighted_dd = scaled_gram(delta, rows_per_group=T, batched=False, plus_one=False, w=grad, w_mode=1)[0]
        grad_a = (weighted_dd @ a_up.reshape(B * T, d_in)).reshape(B, T, d_in)
        del weighted_dd
        weighted_aa = scaled_gram(a, rows_per_group=T, batched=False, plus_one=bias, w=grad, w_mode=1)[0]
        grad_d = (weighted_aa @ d_up.reshape(B * T, d_out)).reshape(B, T, d_out)
    else:
        W = grad.to(acc)
        W = W + W.T  # G is symmetric: both of its slots see the cotangent
        per_example_grads = torch.bmm(d_up.transpose(1, 2), a_up).reshape(B, d_out * d_in)
        d_grads = (W @ per_example_grads).reshape(B, d_out, d_in)
        grad_a = torch.bmm(d_up, d_grads)
        if bias:
            grad_d = torch.baddbmm((W @ d_up.sum(1))[:, None, :], a_up, d_grads.transpose(1, 2))
        else:
            grad_d = torch.bmm(a_up, d_grads.transpose(1, 2))
    return grad_a.to(a.dtype), grad_d.to(delta.dtype)
