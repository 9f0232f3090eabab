"""nn.Conv1d/2d/3d as linear maps over unfolded patches (stride, padding incl. 'same'/'valid',
padding_mode, dilation, groups): ``a [B, G, T = output positions, C/G * prod(kernel)]``."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from fastcurv.layers.base import describe
from fastcurv.layers.linear import LinearMapLayer
from fastcurv.layers.registry import register

__all__ = ["ConvLayer"]


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvLayer(LinearMapLayer):
    def check_input(self, inp):
        super().check_input(inp)
        n = self.module.weight.ndim - 2
        if inp.ndim != n + 2:
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} got input {tuple(inp.shape)}; expected a "
                f"batched [B, C, {n} spatial dims] input (unbatched inputs are not supported)"
            )

    def unfold(self, x):
        m = self.module
        B, C = x.shape[:2]
        n = x.ndim - 2
        pad = list(m._reversed_padding_repeated_twice)  # set by _ConvNd for int, tuple, 'same', 'valid'
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        for i in range(n):
            k, dil, st = m.kernel_size[i], m.dilation[i], m.stride[i]
            x = x.unfold(2 + i, dil * (k - 1) + 1, st)  # appends the window as a trailing dim
            x = x[..., ::dil]
        # x: [B, C, o_1..o_n, k_1..k_n] -> [B, G, T, C/G * k_1...k_n] (weight's flattening order)
        G = m.groups
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
