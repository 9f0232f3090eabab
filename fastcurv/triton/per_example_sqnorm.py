"""Triton kernels and launchers for ``per_example_sqnorm`` (semantics: :func:`fastcurv.reference.per_example_sqnorm`).

s_i = ||sum_t delta_it a_it^T||_F^2 (+ ||sum_t delta_it||^2 with bias), for a [B, T, d_in], delta
[B, T, d_out] of any strides.

Forward:
* T == 1: one fused row-blocked pass, s_i = ||delta_i||^2 (||a_i||^2 + bias). Memory-bound.
* T > 1, ghost (``use_ghost``): :func:`fastcurv.triton._common.ghost_kernel`; tiles of the T x T
  plane are computed with two ``tl.dot`` each, multiplied and summed in registers (the bias term
  folded in as ``+1``); the T x T Gram matrices never reach memory.
* T > 1, materialized: :func:`_sqnorm_materialized_kernel`; each program owns one d_out x d_in tile
  of g_i = D_i^T A_i, accumulates it over t, squares and sums it; the bias term is fused into the
  programs of the first d_in tile, reusing their delta loads.
Partial sums go to a small [B, n_tiles] buffer reduced by torch: deterministic, no atomics.

Backward:
* T == 1: one fused elementwise pass (norms, then the two scaled copies in the input dtypes).
* T > 1, ghost: the scaled Gram kernel builds 2 g_i D_i D_i^T and 2 g_i (A_i A_i^T + bias) per
  example, then torch.bmm multiplies them into A_i and D_i.
* T > 1, materialized: torch.bmm for g_i = D_i^T A_i and its products (GEMMs are torch's job).
  Note: these torch GEMMs follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcurv.reference import compute_dtype, use_ghost
from fastcurv.triton._common import (
    acc_tl_dtype,
    cast_for_store,
    check_grad,
    check_inputs,
    device_guard,
    ghost_kernel,
    mm_acc,
    scaled_gram,
    dot_tile,
    tile,
    dot_mode,
)

__all__ = ["forward", "backward"]

_OP = "per_example_sqnorm"
_ROW_BLOCK = 16  # rows per program in the T == 1 kernels


@triton.jit
def _row_sumsq(ptr, rows, row_ok, n, s_b, s_k, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """sum_k x[row, k]^2 for a block of rows of a strided [B, n] matrix, accumulated in ACC_DTYPE."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_B], dtype=ACC_DTYPE)
    for k0 in range(0, n, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(ptr + rows[:, None] * s_b + kk[None, :] * s_k, mask=row_ok[:, None] & (kk < n)[None, :], other=0.0)
        x = x.to(ACC_DTYPE)
        acc += tl.sum(x * x, axis=1)
    return acc


@triton.jit
def _sqnorm_rows_kernel(
    a_ptr, d_ptr, out_ptr, B, d_in, d_out, sa_b, sa_k, sd_b, sd_k,
    BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """T == 1: out[i] = ||d_i||^2 (||a_i||^2 + BIAS) for BLOCK_B rows per program."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < B
    sq_a = _row_sumsq(a_ptr, rows, row_ok, d_in, sa_b, sa_k, BLOCK_B, BLOCK_K, ACC_DTYPE)
    sq_d = _row_sumsq(d_ptr, rows, row_ok, d_out, sd_b, sd_k, BLOCK_B, BLOCK_K, ACC_DTYPE)
    if BIAS:
        sq_a += 1.0
    tl.store(out_ptr + rows, sq_d * sq_a, mask=row_ok)


@triton.jit
def _sqnorm_rows_backward_kernel(
    g_ptr, a_ptr, d_ptr, ga_ptr, gd_ptr, B, d_in, d_out, sg, sa_b, sa_k, sd_b, sd_k,
    BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """T == 1: grad_a_i = 2 g_i ||d_i||^2 a_i, grad_d_i = 2 g_i (||a_i||^2 + BIAS) d_i, written
    contiguous in the input dtypes. Two passes over each row block: norms, then the scaled copies."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < B
    offs_k = tl.arange(0, BLOCK_K)
    sq_a = _row_sumsq(a_ptr, rows, row_ok, d_in, sa_b, sa_k, BLOCK_B, BLOCK_K, ACC_DTYPE)
    sq_d = _row_sumsq(d_ptr, rows, row_ok, d_out, sd_b, sd_k, BLOCK_B, BLOCK_K, ACC_DTYPE)
    g2 = 2.0 * tl.load(g_ptr + rows * sg, mask=row_ok, other=0.0).to(ACC_DTYPE)
    scale_a = g2 * sq_d
    if BIAS:
        sq_a += 1.0
    scale_d = g2 * sq_a
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + offs_k
        ok = row_ok[:, None] & (kk < d_in)[None, :]
        x = tl.load(a_ptr + rows[:, None] * sa_b + kk[None, :] * sa_k, mask=ok, other=0.0).to(ACC_DTYPE)
        tl.store(ga_ptr + rows[:, None] * d_in + kk[None, :], cast_for_store(x * scale_a[:, None], ga_ptr.dtype.element_ty), mask=ok)
    for k0 in range(0, d_out, BLOCK_K):
        kk = k0 + offs_k
        ok = row_ok[:, None] & (kk < d_out)[None, :]
        x = tl.load(d_ptr + rows[:, None] * sd_b + kk[None, :] * sd_k, mask=ok, other=0.0).to(ACC_DTYPE)
        tl.store(gd_ptr + rows[:, None] * d_out + kk[None, :], cast_for_store(x * scale_d[:, None], gd_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sqnorm_materialized_kernel(
    a_ptr, d_ptr, out_ptr, T, d_in, d_out, sa_b, sa_t, sa_k, sd_b, sd_t, sd_k, so_0,
    BIAS: tl.constexpr, DOT_MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """T > 1, materialized: program (i, o, c) accumulates tile (o, c) of g_i = D_i^T A_i over t and
    writes its squared sum (plus, for c == 0 and BIAS, ||sum_t d_it[o-tile]||^2) to out[i, o*n_c + c]."""
    i = tl.program_id(0).to(tl.int64)
    po = tl.program_id(1)
    pc = tl.program_id(2)
    offs_o = po * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = pc * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = offs_o < d_out
    c_ok = offs_c < d_in
    offs_t = tl.arange(0, BLOCK_T)
    g_tile = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC_DTYPE)
    d_colsum = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + offs_t
        t_ok = tt < T
        d_t = tl.load(d_ptr + i * sd_b + tt[:, None] * sd_t + offs_o[None, :] * sd_k, mask=t_ok[:, None] & o_ok[None, :], other=0.0)
        a_t = tl.load(a_ptr + i * sa_b + tt[:, None] * sa_t + offs_c[None, :] * sa_k, mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        g_tile = mm_acc(tl.trans(d_t), a_t, g_tile, DOT_MODE)
        if BIAS:
            d_colsum += tl.sum(d_t.to(ACC_DTYPE), axis=0)
    value = tl.sum(tl.sum(g_tile * g_tile, axis=1), axis=0)
    if BIAS:
        value += tl.sum(d_colsum * d_colsum, axis=0) * (pc == 0).to(ACC_DTYPE)
    tl.store(out_ptr + i * so_0 + po * tl.num_programs(2) + pc, value)


def forward(a: torch.Tensor, delta: torch.Tensor, bias: bool) -> torch.Tensor:
    """Per-example squared gradient norms [B] of one linear map (see module doc for the kernels).

    a [B, T, d_in], delta [B, T, d_out], same floating dtype and device, any strides. Returns a
    fresh tensor in float32 for fp16/bf16 inputs, else in the input dtype."""
    check_inputs(_OP, a, delta)
    B, T, d_in = a.shape
    d_out = delta.shape[2]
    acc = compute_dtype(a.dtype)
    acc_tl = acc_tl_dtype(a.dtype)
    out = torch.empty(B, device=a.device, dtype=acc)
    if B == 0:
        return out
    bias = bool(bias)
    dot = dot_mode(a.dtype)
    with device_guard(a):
        if T == 1:
            block_k = tile(max(d_in, d_out), largest=128)
            _sqnorm_rows_kernel[(triton.cdiv(B, _ROW_BLOCK),)](
                a, delta, out, B, d_in, d_out, a.stride(0), a.stride(2), delta.stride(0), delta.stride(2),
                BIAS=bias, BLOCK_B=_ROW_BLOCK, BLOCK_K=block_k, ACC_DTYPE=acc_tl,
            )
            return out
        if use_ghost(T, d_in, d_out):
            block_t = dot_tile(T, dot)
            block_k = dot_tile(max(d_in, d_out), dot)
            n_t = max(1, triton.cdiv(T, block_t))
            partial = torch.empty(B, n_t, device=a.device, dtype=acc)
            ghost_kernel[(B, n_t)](
                a, delta, partial, T, d_in, d_out,
                a.stride(0), a.stride(1), a.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
                partial.stride(0), partial.stride(1),
                BIAS=bias, DIAGONAL=True, DOT_MODE=dot, BLOCK_T=block_t, BLOCK_K=block_k, ACC_DTYPE=acc_tl,
            )
        else:
            block_t = dot_tile(T, dot, largest=32)
            block_o = dot_tile(d_out, dot)
            block_i = dot_tile(d_in, dot)
            n_o = max(1, triton.cdiv(d_out, block_o))
            n_i = max(1, triton.cdiv(d_in, block_i))
            partial = torch.empty(B, n_o * n_i, device=a.device, dtype=acc)
            _sqnorm_materialized_kernel[(B, n_o, n_i)](
                a, delta, partial, T, d_in, d_out,
                a.stride(0), a.stride(1), a.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
                partial.stride(0),
                BIAS=bias, DOT_MODE=dot, BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_I=block_i, ACC_DTYPE=acc_tl,
            )
    return torch.sum(partial, dim=1, out=out)


def backward(grad: torch.Tensor, a: torch.Tensor, delta: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of :func:`forward` for the cotangent ``grad`` [B].

    Returns fresh (grad_a, grad_delta) shaped and typed like a and delta."""
    check_inputs(_OP, a, delta)
    B, T, d_in = a.shape
    d_out = delta.shape[2]
    check_grad(_OP, grad, (B,), a.device)
    bias = bool(bias)
    if a.numel() == 0 and delta.numel() == 0:
        return torch.zeros_like(a, memory_format=torch.contiguous_format), torch.zeros_like(delta, memory_format=torch.contiguous_format)
    if T == 1:
        grad_a = torch.empty(B, 1, d_in, device=a.device, dtype=a.dtype)
        grad_d = torch.empty(B, 1, d_out, device=a.device, dtype=delta.dtype)
        block_k = tile(max(d_in, d_out), largest=128)
        with device_guard(a):
            _sqnorm_rows_backward_kernel[(triton.cdiv(B, _ROW_BLOCK),)](
                grad, a, delta, grad_a, grad_d, B, d_in, d_out, grad.stride(0),
                a.stride(0), a.stride(2), delta.stride(0), delta.stride(2),
                BIAS=bias, BLOCK_B=_ROW_BLOCK, BLOCK_K=block_k, ACC_DTYPE=acc_tl_dtype(a.dtype),
            )
        return grad_a, grad_d
    acc = compute_dtype(a.dtype)
    a_up, d_up = a.to(acc), delta.to(acc)
    if use_ghost(T, d_in, d_out):
        # [B, T, T] per-example matrices 2 g_i (D_i D_i^T) and 2 g_i (A_i A_i^T + bias), then GEMMs
        scaled_dd = scaled_gram(delta, rows_per_group=T, batched=True, plus_one=False, w=grad, w_mode=2)
        grad_a = torch.bmm(scaled_dd, a_up)
        del scaled_dd
        scaled_aa = scaled_gram(a, rows_per_group=T, batched=True, plus_one=bias, w=grad, w_mode=2)
        grad_d = torch.bmm(scaled_aa, d_up)
    else:
        per_example_grad = torch.bmm(d_up.transpose(1, 2), a_up)  # g_i = D_i^T A_i, [B, d_out, d_in]
        g2 = 2 * grad.to(acc)
        per_example_grad.mul_(g2[:, None, None])
        grad_a = torch.bmm(d_up, per_example_grad)
        if bias:
            bias_term = (g2[:, None] * d_up.sum(1))[:, None, :]  # 2 g_i sum_s d_is, broadcast over t
            grad_d = torch.baddbmm(bias_term, a_up, per_example_grad.transpose(1, 2))
        else:
            grad_d = torch.bmm(a_up, per_example_grad.transpose(1, 2))
    return grad_a.to(a.dtype), grad_d.to(delta.dtype)
