"""Curvature regularizer (Geng et al., eq. 10-11): ``alpha * mean_i ||grad_theta l_i||^2``.

The mean per-example squared gradient norm estimates the trace of the Hessian near a minimum
(empirical Fisher trace); penalizing it biases training toward flat minima.

    reg = Curvature(model, alpha=1e-3)
    with reg.track():
        out = model(x)
    per_example = F.cross_entropy(out, y, reduction="none")
    loss = per_example.mean() + reg(per_example)
    loss.backward()
    # or, the same step: penalty = reg.backward(per_example)

How it is computed (docs/METHODS.md section 1, the measured cheapest exact form): one
``create_graph=True`` gradient of ``sum_i l_i`` w.r.t. the captured layer *outputs* only (not the
parameters) gives differentiable deltas; the per-example norms follow from (activations, deltas)
through ``fastcurv.ops`` (which register their own backward), and a single ``backward()`` of
``mean l + penalty`` then carries both losses to the parameters, autograd merging them per node.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastcurv.capture import Capture, capture

__all__ = ["Curvature"]


class Curvature:
    """``alpha * (1/B) sum_i ||grad_theta l_i||^2`` over every parameter requiring grad.

    Args:
        model: the network; every module holding trainable parameters is served by
            :func:`fastcurv.capture` (a fast rule, else the exact generic rule).
        alpha: penalty weight (>= 0). The norms are of the per-example losses you pass, so with
            ``reduction="none"`` losses ``alpha`` means exactly the paper's coefficient.
        ignore: modules or qualified names whose parameters are left out of the penalty.
        strict, batchnorm: passed to :func:`fastcurv.capture` (refuse modules without a fast rule;
            what to do with BatchNorm in train mode: "refuse", "frozen_stats" or "exact").

    Attributes:
        last_sqnorms: the last call's per-example squared norms ``[B]`` (detached), for logging.
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float,
        ignore: Iterable[Union[nn.Module, str]] = (),
        strict: bool = False,
        batchnorm: str = "refuse",
    ):
        alpha = float(alpha)
        if not alpha >= 0:  # also catches nan
            raise ValueError(f"Curvature: alpha must be >= 0, got {alpha}")
        self.model = model
        self.alpha = alpha
        self.ignore = tuple([ignore] if isinstance(ignore, (str, nn.Module)) else ignore)
        self.capture_options = {"strict": strict, "batchnorm": batchnorm}
        capture(model, self.ignore, **self.capture_options)  # fail now, not at the first step, on bad options
        self._capture: Optional[Capture] = None
        self.last_sqnorms: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return f"Curvature(alpha={self.alpha})"

    @contextlib.contextmanager
    def track(self) -> Iterator[Capture]:
        """Record the forward that produces the losses to regularize (one forward per ``track``).

        ``F.scaled_dot_product_attention`` inside the tracked forward runs on its math backend
        (``sdpa_kernel(SDPBackend.MATH)``): the penalty needs a double backward through attention,
        which the fused kernels (the CPU flash kernel, CUDA flash / memory-efficient) do not have.
        The math backend computes the same attention (more memory: it forms the score matrix)."""
        self._capture = None
        cap = capture(self.model, self.ignore, **self.capture_options)  # re-read requires_grad flags every step
        with cap, sdpa_kernel(SDPBackend.MATH):
            yield cap
        self._capture = cap

    def penalty_and_sqnorms(self, per_example: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha * mean_i s_i, s)`` with ``s`` differentiable; releases the tracked tensors."""
        cap, self._capture = self._capture, None
        if cap is None:
            raise RuntimeError(
                "Curvature: no tracked forward. Run the forward inside `with reg.track():` before calling the "
                "regularizer (each tracked forward serves one call)."
            )
        try:
            sqnorms = cap.per_example_sqnorms(per_example, create_graph=True)
        finally:
            cap.clear()  # what the penalty needs is now held by its own graph
        self.last_sqnorms = sqnorms.detach()
        return self.alpha * sqnorms.mean(), sqnorms

    def __call__(self, per_example: torch.Tensor) -> torch.Tensor:
        """The penalty ``alpha * mean_i ||grad l_i||^2`` (a differentiable scalar) for per-example
        losses ``[B]`` of the tracked forward (``reduction="none"``; mean-scaled losses would give
        norms scaled by 1/B^2)."""
        return self.penalty_and_sqnorms(per_example)[0]

    def backward(self, per_example: torch.Tensor) -> torch.Tensor:
        """The whole step ``(per_example.mean() + self(per_example)).backward()``; returns the
        penalty value (detached). Gradients accumulate into ``.grad`` as with any backward."""
        penalty = self(per_example)
        (per_example.mean() + penalty).backward()
        return penalty.detach()
