"""nn.Conv1d/2d/3d (stride, padding incl. 'same'/'valid', padding_mode, dilation, groups).

Two exact forms, chosen per layer and per call by cost (:meth:`ConvLayer.choose_path`):

* ``"kernel"``: the per-example weight gradients from the convolution's own weight-gradient kernel,
  with the batch folded into the groups: input ``[1, B*C_in, *S]``, grad output ``[1, B*C_out, *S']``
  and ``groups = B*G`` give ``[B*C_out, C_in/G, *k]``, i.e. ``g_i`` for every example in one call,
  without copying the input into patches. Differentiable twice through autograd (its double
  backward is again convolutions), so the curvature penalty needs no unfold either.
* ``"unfold"``: the input unfolded into patches ``a [B, G, T = output positions, C/G * prod(k)]``
  and the linear-map machinery of linear.py (ghost form ``sum_ts (a_t.a_s)(d_t.d_s)`` via
  ``fastcurv.ops``); cheaper when there are few output positions and many channels.

``dot`` and ``weighted_grad_sum`` never unfold: ``g_i . v_k`` is ``<delta_i, conv(x_i, V_k)>`` (one
forward convolution with the K vectors stacked as output channels) and ``sum_i c_ik g_i`` is one
ordinary weight-gradient call with the coefficient-weighted deltas stacked as output channels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.layers.base import budget_chunks, common_dtype, describe, gram_from_rows, rows
from fastcurv.layers.linear import SpatialMapLayer
from fastcurv.layers.registry import register

__all__ = ["ConvLayer", "CONV_PATHS"]

CONV_PATHS = ("auto", "kernel", "unfold")


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvLayer(SpatialMapLayer):
    #: "auto" (choose by cost per call), or force "kernel" / "unfold" (tests, experiments); settable
    #: per instance or on the class
    path: str = "auto"

    # ------------------------------------------------------------------ cost model
    def _shape_terms(self, deltas) -> tuple[int, int, int, int, int]:
        """``(B, G, T, d_in, d_out)`` of the linear-map view: T = output positions over all calls."""
        w = self.module.weight
        G = self.module.groups
        T = sum(math.prod(d.shape[2:]) for d in deltas)
        return deltas[0].shape[0], G, T, w.shape[1] * math.prod(w.shape[2:]), w.shape[0] // G

    def choose_path(self, deltas, quantity: str) -> str:
        """Cost model, per example and group, in multiply-adds (T output positions, d_in = C_in/G *
        prod(kernel), d_out = C_out/G):

        * kernel: ``T d_in d_out`` to form g_i, plus ``d_in d_out`` to reduce it (sqnorm), or
          ``B d_in d_out`` more per example for the Gram matrix ``g g^T``.
        * unfold + ghost: ``T d_in`` to copy the patches, plus ``T^2 (d_in + d_out)`` for the two
          T x T Gram matrices per example (sqnorm), or ``B T^2 (d_in + d_out)`` for all pairs (gram).

        The "unfold" path then lets ``fastcurv.ops`` pick ghost or materialized for the patches.
        Measured (rough, loaded 2-core CPU, float32, B=64): the kernel ties unfold + batched GEMM on
        an RGB stem (3->32, 32x32), wins ~7x on a depthwise 32-channel 32x32 layer and ~10x on
        32->32 at 16x16; the ghost form wins on small maps with wide channels.

        Ghost wins for small T and large channels (a 4x4 map with 256 channels: T=16 vs d_in d_out =
        590k); the kernel wins for every early, high-resolution layer (T = 1024, C_in = 3)."""
        forced = self.path
        if forced not in CONV_PATHS:
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)}: ConvLayer.path must be one of {CONV_PATHS}, "
                f"got {forced!r}"
            )
        if not self.weight_trainable:
            return "kernel"  # bias only: sum of the deltas, nothing to unfold
        if forced != "auto":
            return forced
        B, _, T, d_in, d_out = self._shape_terms(deltas)
        pairs = B if quantity == "gram" else 1
        kernel = T * d_in * d_out + pairs * d_in * d_out
        ghost = T * d_in + pairs * T * T * (d_in + d_out)
        return "unfold" if ghost < kernel else "kernel"

    # ------------------------------------------------------------------ the kernel forms
    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The input ready for a convolution call, and the (symmetric) padding to pass to it.
        Zero padding is passed to the kernel when symmetric; any other mode (reflect, circular,
        replicate) or the asymmetric padding of 'same' with an even kernel is applied explicitly."""
        m = self.module
        pad = list(m._reversed_padding_repeated_twice)  # set by _ConvNd for int, tuple, 'same', 'valid'
        n = x.ndim - 2
        symmetric = all(pad[2 * i] == pad[2 * i + 1] for i in range(n))
        if m.padding_mode == "zeros" and symmetric:
            return x, [pad[2 * (n - 1 - i)] for i in range(n)]  # pad is last-dim-first
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        return x, [0] * n

    def _weight_grad(self, x, grad_out, weight_shape, padding, groups) -> torch.Tensor:
        """The weight gradient of ``conv(x, W)`` for ``grad_out`` (aten's own kernel, differentiable)."""
        m = self.module
        n = x.ndim - 2
        weight = grad_out.new_empty(1).expand(weight_shape)  # only its shape is read
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, list(m.stride), padding, list(m.dilation), False, [0] * n, groups,
            (False, True, False),
        )[1]

    def _kernel_pairs(self, deltas):
        """``(padded input, delta, padding)`` per call, in a common dtype."""
        for r, d in zip(self.records, deltas):
            x, d = common_dtype(r.input, d)
            x, padding = self._padded(x)
            yield x, d, padding

    def _kernel_grads(self, deltas, start: int = 0, stop: Optional[int] = None) -> list[torch.Tensor]:
        """Per-example ``[b, *param.shape]`` gradients of examples ``start:stop``, all calls summed."""
        w = self.module.weight
        G = self.module.groups
        weight_grad = bias_grad = None
        for x, d, padding in self._kernel_pairs(deltas):
            x, d = x[start:stop], d[start:stop]
            b = x.shape[0]
            if self.weight_trainable:
                if b == 0:
                    g = x.new_zeros(0, *w.shape)
                else:
                    folded = self._weight_grad(
                        x.reshape(1, b * x.shape[1], *x.shape[2:]), d.reshape(1, b * d.shape[1], *d.shape[2:]),
                        (b * w.shape[0], *w.shape[1:]), padding, b * G,
                    )
                    g = folded.view(b, *w.shape)
                weight_grad = g if weight_grad is None else weight_grad + g
            if self.bias_trainable:
                gb = d.sum(tuple(range(2, d.ndim)))
                bias_grad = gb if bias_grad is None else bias_grad + gb
        return [g for g in (weight_grad, bias_grad) if g is not None]

    def _chunks(self, B: int):
        """The kernel path materializes B x P per layer: chunks of the batch within the budget."""
        return budget_chunks(B, sum(p.numel() for _, p in self.params))

    # ------------------------------------------------------------------ quantities
    def _per_example_grads(self, deltas):
        return self._kernel_grads(deltas)

    def _sqnorm(self, deltas):
        if self.choose_path(deltas, "sqnorm") == "unfold":
            return super()._sqnorm(deltas)
        parts = [
            sum(rows(g).square().sum(1) for g in self._kernel_grads(deltas, s, e))
            for s, e in self._chunks(deltas[0].shape[0])
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gram(self, deltas):
        if self.choose_path(deltas, "gram") == "unfold":
            return super()._gram(deltas)

        def flat(s, e):
            return torch.cat([rows(g) for g in self._kernel_grads(deltas, s, e)], 1)

        return gram_from_rows(self._chunks(deltas[0].shape[0]), flat)

    def _dot(self, deltas, vectors):
        """``g_i . v_k = sum_t delta_it . (V_k a_it)``: one forward convolution of the input with the K
        vectors as extra output channels, then a reduction against the deltas (no B x P)."""
        m, w = self.module, self.module.weight
        G, O = m.groups, w.shape[0]
        K = vectors[0].shape[0]
        out = None
        for x, d, padding in self._kernel_pairs(deltas):
            B = x.shape[0]
            i = 0
            part = x.new_zeros(B, K)
            if self.weight_trainable:
                v = vectors[i].to(x.dtype)  # [K, O, C/G, *k] -> group-major [G*K*O/G, C/G, *k]
                i += 1
                v = v.reshape(K, G, O // G, *w.shape[1:]).transpose(0, 1).reshape(G * K * (O // G), *w.shape[1:])
                conv = _CONV[x.ndim - 2]
                y = conv(x, v, None, m.stride, padding, m.dilation, G)  # [B, G*K*O/G, *S']
                y = y.reshape(B, G, K, O // G, -1)
                part = part + torch.einsum("bgkot,bgot->bk", y, d.reshape(B, G, O // G, -1))
            if self.bias_trainable:
                part = part + d.sum(tuple(range(2, d.ndim))) @ vectors[i].to(x.dtype).T
            out = part if out is None else out + part
        return out

    def _weighted_grad_sum(self, deltas, coeffs):
        """``sum_i c_ik g_i``: one ordinary weight-gradient call over the batch whose grad output
        stacks the K coefficient-weighted deltas as output channels (no per-example gradients)."""
        w = self.module.weight
        G, O = self.module.groups, w.shape[0]
        K = coeffs.shape[1]
        weight_sum = bias_sum = None
        for x, d, padding in self._kernel_pairs(deltas):
            B = x.shape[0]
            c = coeffs.to(d.dtype)
            if self.weight_trainable:
                spatial = d.shape[2:]
                # [B, G, 1, O/G, *S'] * [B, 1, K, 1, ...] -> group-major channels [B, G*K*O/G, *S']
                dk = d.reshape(B, G, 1, O // G, *spatial) * c.reshape(B, 1, K, 1, *([1] * len(spatial)))
                dk = dk.reshape(B, G * K * (O // G), *spatial)
                gw = self._weight_grad(x, dk, (G * K * (O // G), *w.shape[1:]), padding, G)
                gw = gw.reshape(G, K, O // G, *w.shape[1:]).transpose(0, 1).reshape(K, *w.shape)
                weight_sum = gw if weight_sum is None else weight_sum + gw
            if self.bias_trainable:
                gb = c.T @ d.sum(tuple(range(2, d.ndim)))
                bias_sum = gb if bias_sum is None else bias_sum + gb
        return [g for g in (weight_sum, bias_sum) if g is not None]

    # ------------------------------------------------------------------ the unfold form
    def unfold(self, x):
        m = self.module
        B, C = x.shape[:2]
        n = x.ndim - 2
        G = m.groups
        pad = list(m._reversed_padding_repeated_twice)
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        if n <= 2:
            # im2col (F.unfold) writes [B, C * prod(k), T] in the weight's flattening order in one pass;
            # the [B, G, T, d_in] operand is then a transposed view (batched GEMMs take it as is), 2-4x
            # faster than gathering a strided window view into that layout.
            one_d = n == 1
            if one_d:
                x = x.unsqueeze(2)
            lift = (lambda v: (1, v[0])) if one_d else tuple
            a = F.unfold(x, lift(m.kernel_size), dilation=lift(m.dilation), stride=lift(m.stride))
            return a.view(B, G, a.shape[1] // G, a.shape[2]).transpose(2, 3)
        for i in range(n):
            k, dil, st = m.kernel_size[i], m.dilation[i], m.stride[i]
            x = x.unfold(2 + i, dil * (k - 1) + 1, st)  # appends the window as a trailing dim
            x = x[..., ::dil]
        # x: [B, C, o_1..o_n, k_1..k_n] -> [B, G, T, C/G * k_1...k_n] (weight's flattening order)
        out_sizes = x.shape[2 : 2 + n]
        x = x.reshape(B, G, C // G, *out_sizes, *m.kernel_size)
        perm = [0, 1] + list(range(3, 3 + n)) + [2] + list(range(3 + n, 3 + 2 * n))
        return x.permute(perm).reshape(B, G, math.prod(out_sizes), C // G * math.prod(m.kernel_size))

    def group_delta(self, delta, B, G, T):
        if math.prod(delta.shape[2:]) != T:
            raise RuntimeError(
                f"fastcurv.capture: {describe(self.name, self.module)}: unfolded input has {T} positions but the "
                f"output {tuple(delta.shape)} has {math.prod(delta.shape[2:])} (internal error, please report)"
            )
        return delta.reshape(B, G, delta.shape[1] // G, T).transpose(2, 3)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
