"""``per_example_gram(a, delta, bias)``: G_ij = <g_i, g_j> of the per-example gradients."""
from __future__ import annotations

import torch

from fastcurv import reference
from fastcurv.ops._register import define_op

_run = define_op(
    "per_example_gram",
    reference.per_example_gram,
    reference.per_example_gram_backward,
    out_shape=lambda a: (a.shape[0], a.shape[0]),
)


def per_example_gram(a: torch.Tensor, delta: torch.Tensor, bias: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """Gram matrix ``G_ij = <g_i, g_j>`` of the per-example gradients of one linear map, ``[B, B]``.

    Same arguments, dtype rules and differentiability as :func:`per_example_sqnorm`, whose result
    is this matrix's diagonal. T = 1: ``(A A^T + 1) * (D D^T)``, two GEMMs; T > 1: ghost or
    materialized form by cost. Never builds the B x P Jacobian of all parameters.
    """
    return _run(a, delta, bias, backend=backend)
