"""``per_example_sqnorm(a, delta, bias)``: ||g_i^W||_F^2 (+ ||g_i^b||^2) for each example."""
from __future__ import annotations

import torch

from fastcurv import reference
from fastcurv.ops._register import define_op

_run = define_op(
    "per_example_sqnorm",
    reference.per_example_sqnorm,
    reference.per_example_sqnorm_backward,
    out_shape=lambda a: (a.shape[0],),
)


def per_example_sqnorm(a: torch.Tensor, delta: torch.Tensor, bias: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """Per-example squared gradient norm of one linear map ``z = a W^T + b``.

    Args:
        a: layer inputs, ``[B, d_in]`` or ``[B, T, d_in]`` (T = sequence length / patches).
        delta: gradients of the *per-example* losses w.r.t. the layer outputs, ``[B, d_out]`` or
            ``[B, T, d_out]``. If your deltas come from a mean-reduced batch loss they carry a
            factor 1/B and the result is off by 1/B^2: use per-example (or summed) losses.
        bias: add ``||sum_t delta_it||^2``, the bias gradient's squared norm.
        backend: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"triton"`` | ``"reference"``.

    Returns ``[B]``: float32 for fp16/bf16 inputs, else the input dtype. Differentiable in
    ``a`` and ``delta`` (twice). For T > 1 every backend chooses per call between the ghost form
    and the materialized per-example gradient, by cost (:func:`fastcurv.reference.use_ghost`).
    """
    return _run(a, delta, bias, backend=backend)
