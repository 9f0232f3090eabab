"""nn.InstanceNorm1d/2d/3d with ``affine=True``: GroupNorm-like per-channel affine parameters,
``g_i^gamma[c] = sum_spatial delta * xhat``, ``g_i^beta[c] = sum_spatial delta``, with ``xhat``
normalized per (example, channel). Examples never interact: in train mode (or without running
statistics) each example uses its own statistics; in eval mode with ``track_running_stats=True``
the running statistics. (``affine=False`` has no parameters, so nothing is captured.)"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fastcurv.layers.base import describe
from fastcurv.layers.norm import NormLayer
from fastcurv.layers.registry import register

__all__ = ["InstanceNormLayer"]


@register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormLayer(NormLayer):
    def check_input(self, inp):
        super().check_input(inp)
        batched_ndim = self.module._get_no_batch_dim() + 1
        if inp.ndim != batched_ndim:
            raise ValueError(
                f"fastcurv.capture: {describe(self.name, self.module)} got input {tuple(inp.shape)}; expected a "
                f"batched {batched_ndim}-D [B, C, *spatial] input (unbatched inputs are not supported: add the batch "
                "dim with x.unsqueeze(0))"
            )

    def _normalized(self, x):
        m = self.module
        if m.training or not m.track_running_stats:  # the per-(example, channel) statistics
            return F.instance_norm(x, None, None, None, None, True, 0.0, m.eps)
        return F.instance_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
