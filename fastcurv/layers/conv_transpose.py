"""nn.ConvTranspose1d/2d/3d (stride, padding, output_padding / output_size, dilation, groups, bias).

A transposed convolution scatters input position ``t`` into the output at ``t * stride - padding +
k * dilation``, so one example's weight gradient ``[C_in, C_out/G, k...]`` is
``g[c_in, c_out, k] = sum_t x[c_in, t] * delta[c_out, t * stride - padding + k * dilation]``: the
*delta* unfolded with the layer's geometry gives, per input position ``t``, a row
``[C_out/G * prod(k)]``, and ``g = sum_t x_t^T unfold(delta)_t`` per group. That is the linear map
of :class:`~fastcurv.layers.linear.LinearMapLayer` with the roles swapped (the unfolded delta in the
place of the unfolded input, the input in the place of the delta), so its norm / Gram / dot kernels
serve the weight unchanged. The bias (per output channel, ``sum`` of the delta over output
positions) is not the swapped map's bias and is added here."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.layers.base import batched_pairs, common_dtype
from fastcurv.layers.linear import SpatialMapLayer
from fastcurv.layers.registry import register

__all__ = ["ConvTransposeLayer"]


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeLayer(SpatialMapLayer):
    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        # the LinearMapLayer kernels handle the weight only (their "bias" would be the input's sum)
        self.output_bias_trainable = self.bias_trainable
        self.bias_trainable = False

    def unfold_delta(self, delta: torch.Tensor, in_sizes: tuple) -> torch.Tensor:
        """``[B, C_out, *out]`` -> ``[B, G, T_in, C_out/G * prod(kernel)]``: for each input position,
        the output entries its kernel taps reached (the weight's flattening order)."""
        m = self.module
        n = len(in_sizes)
        pad = [p for p in reversed(m.padding) for _ in range(2)]  # F.pad lists the last dim first
        if any(pad):
            delta = F.pad(delta, pad)
        for i in range(n):
            k, dil, st = m.kernel_size[i], m.dilation[i], m.stride[i]
            delta = delta.unfold(2 + i, dil * (k - 1) + 1, st)[..., ::dil]
            # windows past the last input position only cover output_padding / output_size extras
            delta = delta.narrow(2 + i, 0, in_sizes[i])
        B, C_out = delta.shape[:2]
        G = m.groups
        delta = delta.reshape(B, G, C_out // G, *in_sizes, *m.kernel_size)
        perm = [0, 1] + list(range(3, 3 + n)) + [2] + list(range(3 + n, 3 + 2 * n))
        return delta.permute(perm).reshape(B, G, math.prod(in_sizes), C_out // G * math.prod(m.kernel_size))

    def operands(self, deltas):
        """``(unfolded deltas [B, G, T, C_out/G * k], inputs [B, G, T, C_in/G])``, calls along T."""
        a_parts, d_parts = [], []
        for x, delta in batched_pairs(self, deltas):
            B, C_in = x.shape[:2]
            G = self.module.groups
            in_sizes = tuple(x.shape[2:])
            a_parts.append(self.unfold_delta(delta, in_sizes))
            d_parts.append(x.reshape(B, G, C_in // G, math.prod(in_sizes)).transpose(2, 3))
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=2)
        d = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, dim=2)
        return common_dtype(a, d)

    def bias_grads(self, deltas) -> torch.Tensor:
        """``[B, C_out]``: the bias gradient, every call's delta summed over its output positions."""
        return sum(d.flatten(2).sum(2) for _, d in batched_pairs(self, deltas))

    def _per_example_grads(self, deltas):
        grads = super()._per_example_grads(deltas) if self.weight_trainable else []
        if self.output_bias_trainable:
            grads.append(self.bias_grads(deltas))
        return grads

    def _sqnorm(self, deltas):
        total = super()._sqnorm(deltas) if self.weight_trainable else 0
        if self.output_bias_trainable:
            total = total + self.bias_grads(deltas).square().sum(1)
        return total

    def _gram(self, deltas):
        total = super()._gram(deltas) if self.weight_trainable else 0
        if self.output_bias_trainable:
            gb = self.bias_grads(deltas)
            total = total + gb @ gb.T
        return total

    def _dot(self, deltas, vectors):
        total = super()._dot(deltas, vectors) if self.weight_trainable else 0  # uses vectors[0] only
        if self.output_bias_trainable:
            gb = self.bias_grads(deltas)
            total = total + gb @ vectors[-1].to(gb.dtype).T
        return total

    def _weighted_grad_sum(self, deltas, coeffs):
        result = super()._weighted_grad_sum(deltas, coeffs) if self.weight_trainable else []
        if self.output_bias_trainable:
            gb = self.bias_grads(deltas)
            result.append(coeffs.to(gb.dtype).T @ gb)
        return result
