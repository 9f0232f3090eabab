"""nn.Linear: ``z = a W^T + b`` over any number of leading dims; and the shared machinery of every
layer that is a linear map after unfolding (convolutions, see conv.py).

Operands are ``a [B, G, T, d_in]`` and ``delta [B, G, T, d_out]`` with the weight viewed as
``[G, d_out, d_in]`` (G = groups, 1 for Linear). Several calls of one module concatenate along T:
``g_i = sum over calls and positions of delta^T a`` is again one such product, so the summed
gradient's norm (cross terms included) comes out of the same kernels. Squared norms and Gram
matrices go through ``fastcurv.ops`` (ghost or materialized form chosen by cost per call)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fastcurv import ops, reference
from fastcurv.layers.base import (CapturedLayer, batched_pairs, budget_chunks, chunk_ranges, common_dtype, describe,
                                  gram_from_rows, symmetric_from_blocks, within_budget)
from fastcurv.layers import base
from fastcurv.layers.registry import register

__all__ = ["LinearMapLayer", "SpatialMapLayer", "LinearLayer"]


class LinearMapLayer(CapturedLayer):
    """A module whose weight gradient is ``sum_t delta_t^T a_t`` after unfolding its input."""

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        self.weight_trainable = module.weight.requires_grad
        self.bias_trainable = module.bias is not None and module.bias.requires_grad
        self._unfolded: Optional[list] = None

    def _cache_clear(self) -> None:
        self._unfolded = None

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """The input of one call as ``[B, G, T, d_in]``."""
        raise NotImplementedError

    def group_delta(self, delta: torch.Tensor, B: int, G: int, T: int) -> torch.Tensor:
        """The delta of one call as ``[B, G, T, d_out]``."""
        raise NotImplementedError

    def operands(self, deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():  # cached for later create_graph calls too: keep it in the graph
            pairs = batched_pairs(self, deltas)
            if self._unfolded is None or len(self._unfolded) != len(pairs):
                self._unfolded = [self.unfold(x) for x, _ in pairs]  # unfolding copies: once per forward
        a_parts, d_parts = [], []
        for a, (_, delta) in zip(self._unfolded, pairs):
            B, G, T, _ = a.shape
            if a.shape[0] != delta.shape[0]:  # a shared input's cached unfold was made for another B
                a = a.expand(delta.shape[0], *a.shape[1:])
            a_parts.append(a)
            d_parts.append(self.group_delta(delta, delta.shape[0], G, T))
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=2)
        d = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, dim=2)
        return common_dtype(a, d)

    def _per_example_grads(self, deltas):
        a, d = self.operands(deltas)
        B = a.shape[0]
        grads = []
        if self.weight_trainable:
            grads.append(torch.einsum("bgto,bgti->bgoi", d, a).reshape(B, *self.module.weight.shape))
        if self.bias_trainable:
            grads.append(d.sum(2).reshape(B, -1))
        return grads

    def _sqnorm(self, deltas):
        a, d = self.operands(deltas)
        B, G, T, d_in = a.shape
        if self.weight_trainable:
            a, d = a.reshape(B * G, T, d_in), d.reshape(B * G, T, d.shape[-1])
            # Each (example, group) row holds a T x T Gram pair (ghost) or a d_out x d_in gradient
            # (materialized) while the op runs: split the rows so that never exceeds the budget.
            per_row = 0 if T == 1 else (2 * T * T if reference.use_ghost(T, d_in, d.shape[-1]) else d_in * d.shape[-1])
            chunks = budget_chunks(B * G, per_row)
            parts = [ops.per_example_sqnorm(a[s:e], d[s:e], bias=self.bias_trainable) for s, e in chunks]
            s = parts[0] if len(parts) == 1 else torch.cat(parts)
            return s.view(B, G).sum(1)
        return d.sum(2).square().sum((1, 2))  # bias only

    def _gram(self, deltas):
        a, d = self.operands(deltas)
        B, G = a.shape[:2]
        if not self.weight_trainable:
            d_sum = d.sum(2).reshape(B, -1)
            return d_sum @ d_sum.T
        # groups: G_ij sums over matching groups only (never the (BG) x (BG) matrix)
        return sum(self._group_gram(a[:, g], d[:, g]) for g in range(G))

    def _group_gram(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``[B, B]`` Gram of one group's per-example gradients. The op holds ``(B T)^2`` (ghost) or
        ``B d_out d_in`` (materialized) elements at once; above the budget the batch is cut into chunks
        and the Gram is assembled from blocks ``G[I, J]`` with at most two chunks' worth alive."""
        B, T, d_in = a.shape
        d_out = d.shape[-1]
        ghost = T > 1 and reference.use_ghost(T, d_in, d_out)
        if within_budget((B * T) ** 2 if ghost else (B * d_in * d_out if T > 1 else 0)):
            return ops.per_example_gram(a, d, bias=self.bias_trainable)
        a, d = common_dtype(a, d)
        if ghost:
            def block(I, J):  # sum_{t,s} (a_it . a_js)(d_it . d_js), + the bias gradients' dot products
                (s, e), (u, v) = I, J
                prod = (a[s:e].reshape(-1, d_in) @ a[u:v].reshape(-1, d_in).T) * (d[s:e].reshape(-1, d_out) @ d[u:v].reshape(-1, d_out).T)
                out = prod.reshape(e - s, T, v - u, T).sum((1, 3))
                return out + d[s:e].sum(1) @ d[u:v].sum(1).T if self.bias_trainable else out

            # a block of b examples holds (b T)^2 elements
            return symmetric_from_blocks(chunk_ranges(B, math.isqrt(base.MAX_INTERMEDIATE_ELEMENTS) // T), block)

        def rows_of(s, e):  # per-example gradients, weight then bias, flattened
            g = (d[s:e].transpose(1, 2) @ a[s:e]).reshape(e - s, -1)
            return torch.cat([g, d[s:e].sum(1)], 1) if self.bias_trainable else g

        return gram_from_rows(budget_chunks(B, d_in * d_out), rows_of)

    def _dot(self, deltas, vectors):
        a, d = self.operands(deltas)
        B, G, T, d_in = a.shape
        d_out = d.shape[-1]
        K = vectors[0].shape[0]
        out = a.new_zeros(B, K)
        i = 0
        if self.weight_trainable:
            v = vectors[i].to(a.dtype).reshape(K, G, d_out, d_in)
            i += 1
            if T == 1:  # d_i^T V_k a_i without the B x P per-example gradients
                dv = torch.einsum("bgo,kgoi->bgki", d[:, :, 0], v)
                out = out + torch.einsum("bgki,bgi->bk", dv, a[:, :, 0])
            else:  # materializing g_i (one GEMM per group) is cheaper than T * K products
                g = torch.einsum("bgto,bgti->bgoi", d, a)
                out = out + g.reshape(B, -1) @ v.reshape(K, -1).T
        if self.bias_trainable:
            vb = vectors[i].to(a.dtype).reshape(K, G * d_out)
            out = out + d.sum(2).reshape(B, -1) @ vb.T
        return out

    def _weighted_grad_sum(self, deltas, coeffs):
        a, d = self.operands(deltas)
        K = coeffs.shape[1]
        c = coeffs.to(a.dtype)
        result = []
        if self.weight_trainable:
            # (c-weighted deltas)^T a over (b, t): one batched GEMM over groups
            cd = c.T[:, :, None, None, None] * d[None]  # [K, B, G, T, d_out]
            w = torch.einsum("kbgto,bgti->kgoi", cd, a)
            result.append(w.reshape(K, *self.module.weight.shape))
        if self.bias_trainable:
            result.append((c.T @ d.sum(2).reshape(d.shape[0], -1)).reshape(K, -1))
        return result


class SpatialMapLayer(LinearMapLayer):
    """A convolution-like layer: the operation itself treats dim 0 as the batch, and the input must be
    ``[B, C, *spatial]`` (unbatched inputs are refused with the fix)."""

    def layout_is_ambiguous(self, inp, batch_size):
        return False  # the convolution itself treats dim 0 as the batch

    def check_input(self, inp):
        super().check_input(inp)
        n = self.module.weight.ndim - 2
        if inp.ndim != n + 2:
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} got input {tuple(inp.shape)}; expected a "
                f"batched [B, C, {n} spatial dims] input (unbatched inputs are not supported: add the batch dim "
                "with x.unsqueeze(0))"
            )


@register(nn.Linear)
class LinearLayer(LinearMapLayer):
    supports_shared_input = True
    regroups_rows = True
    min_batched_ndim = 2

    def unfold(self, x):
        return x.reshape(x.shape[0], 1, math.prod(x.shape[1:-1]), x.shape[-1])  # explicit T: B may be 0

    def group_delta(self, delta, B, G, T):
        return delta.reshape(B, 1, T, delta.shape[-1])
