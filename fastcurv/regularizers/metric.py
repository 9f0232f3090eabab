"""Metric regularization and Selective L2 (Jarvis 2021, sections 3.8-3.9 and Table 4.1).

Both use ``d = H thetabar``: the Hessian ``H`` of the batch loss times the current parameters taken
as a constant (``thetabar = theta.detach()``), from ONE Hessian-vector product,
``d = grad_theta (thetabar . grad_theta L)`` (the thesis's section 3.8; H is symmetric, so
``thetabar^T H = H thetabar``). The Hessian is never formed.

Update rules (Table 4.1, in the trainers' convention ``theta -= lr * (grad L + grad penalty)`` of
docs/METHODS.md section 5, so every regularization term is scaled by the learning rate):

* Metric: ``theta -= lr * (grad L + lam * thetabar^T H)``;
* Selective L2: ``theta -= lr * (grad L + lam * mask * theta)``, with
  ``mask_j = |thetabar^T H|_j < omega * max_{j' in same tensor} |thetabar^T H|_{j'}``.

"Absolute" (the thesis, end of section 4.3): away from a critical point the Hessian is not positive
definite, so the thesis uses "the absolute value of the Expected Hessian in our regularizers" and
writes the Selective L2 condition with ``|thetabar^T H|``. The thesis computes everything from the
product ``thetabar^T H`` (one HVP); a matrix absolute value (Dauphin et al.'s ``|H|`` from an
eigendecomposition) cannot be obtained that way. So ``absolute=True`` takes the elementwise absolute
value of the product: update term ``lam * |thetabar^T H|``. Selective L2 always uses ``|thetabar^T H|``.
"""
from __future__ import annotations

import torch
from torch import nn

from fastcurv._validate import check_flag, check_number
from fastcurv.regularizers.norms import Regularizer, check_coefficient, trainable_parameters

__all__ = ["Metric", "SelectiveL2", "hessian_parameter_product"]


def _batch_loss(owner: str, loss: torch.Tensor) -> torch.Tensor:
    """The scalar batch loss; a 1-D tensor of per-example losses is averaged (the trainers' loss)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{owner}: expected the loss as a tensor, got {type(loss).__name__}")
    if loss.dim() == 1:
        loss = loss.mean()
    elif loss.dim() != 0:
        raise ValueError(
            f"{owner}: expected the batch loss (a scalar) or per-example losses [B], got shape "
            f"{tuple(loss.shape)}"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"{owner}: the loss does not require grad; compute it from the model's output (not under "
            "torch.no_grad) and call the regularizer before loss.backward()"
        )
    return loss


def _gradient_and_direction(
    owner: str, loss: torch.Tensor, params: list[torch.Tensor], keep_graph: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(grad L, H thetabar)`` per parameter tensor (both detached), H the Hessian of ``loss``: one
    create_graph backward gives ``grad L``, one double backward through it gives the HVP.

    ``keep_graph=True`` leaves the graph of ``loss`` intact for a later ``loss.backward()``.
    Parameters that ``loss`` does not depend on get zeros."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    if all(g is None for g in grads):
        raise ValueError(
            f"{owner}: the loss does not depend on any of the model's parameters; pass the loss "
            "computed from this model's output"
        )
    gradient = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
    # A gradient that does not depend on the parameters (p unused, or entering only linearly) has no
    # curvature through it; autograd refuses to differentiate it, so leave it out.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return gradient, [torch.zeros_like(p) for p in params]
    # H thetabar = grad_theta (thetabar . grad L): the vector-Jacobian product of grad L with thetabar,
    # without building the contraction's graph.
    products = torch.autograd.grad(
        [grads[i] for i in live], params, grad_outputs=[params[i].detach() for i in live],
        retain_graph=keep_graph, allow_unused=True,
    )
    return gradient, [torch.zeros_like(p) if d is None else d.detach() for p, d in zip(params, products)]


def hessian_parameter_product(
    owner: str, loss: torch.Tensor, params: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``H thetabar`` per parameter tensor (detached), H the Hessian of ``loss``, by one HVP.

    Leaves the graph of ``loss`` intact, so the caller can still run ``loss.backward()``.
    Parameters that ``loss`` does not depend on get zeros.
    """
    return _gradient_and_direction(owner, loss, params, keep_graph=True)[1]


class _HessianProductRegularizer(Regularizer):
    """Shared by :class:`Metric` and :class:`SelectiveL2`: a penalty built from ``d = H thetabar``,
    as a loss term (``reg(loss)``) or as the whole step (``reg.backward(loss)``)."""

    owner = ""

    # The penalty's value is value_factor * sum_j theta_j * (its gradient)_j: 1 for Metric, 1/2 for
    # Selective L2 (a quadratic); backward() gets the value that way, from the gradients it needs anyway.
    value_factor = 1.0

    def _penalty_gradients(self, tensors, direction) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """The penalty's gradient per tensor (detached); records ``last_direction`` (and ``last_mask``)."""
        raise NotImplementedError

    def _penalty(self, tensors, penalty_gradients) -> torch.Tensor:  # pragma: no cover - abstract
        """The penalty, differentiable in ``tensors``, given its gradients."""
        raise NotImplementedError

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        loss = _batch_loss(self.owner, loss)
        tensors = [p for _, p in self.params]
        direction = hessian_parameter_product(self.owner, loss, tensors)
        return self._penalty(tensors, self._penalty_gradients(tensors, direction))

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The whole step ``(loss + self(loss)).backward()`` for the model's parameters, without the
        second backward of ``loss``: its gradient is taken from the create_graph backward that the HVP
        needs anyway (one forward, one create_graph backward, one double backward per step). Gradients
        accumulate into ``.grad`` as with any backward; the graph of ``loss`` is freed. Returns the
        penalty value (detached)."""
        loss = _batch_loss(self.owner, loss)
        tensors = [p for _, p in self.params]
        gradient, direction = _gradient_and_direction(self.owner, loss, tensors, keep_graph=False)
        with torch.no_grad():
            penalty_gradients = self._penalty_gradients(tensors, direction)
            penalty = self.value_factor * sum(torch.vdot(p.reshape(-1), r.reshape(-1)) for p, r in zip(tensors, penalty_gradients))
            torch._foreach_add_(gradient, penalty_gradients)
            for p, total in zip(tensors, gradient):
                if p.grad is None:
                    p.grad = total
                else:
                    p.grad.add_(total)
        return penalty


class Metric(_HessianProductRegularizer):
    """Metric regularization (Jarvis 2021): update term ``lam * thetabar^T H`` (or ``lam * |thetabar^T H|``).

    ``reg(loss)``: ``loss`` is the batch loss (a scalar; per-example losses ``[B]`` are averaged
    first), computed from ``model``'s output and not yet backpropagated. H is the Hessian of exactly
    that loss (of the mean loss, the thesis's expected Hessian, when you pass per-example losses or a
    mean-reduced loss). Returns ``lam * sum_j theta_j * d_j`` with ``d = H thetabar`` (``|H thetabar|``
    when ``absolute``) detached: its gradient w.r.t. theta is exactly ``lam * d`` and its value is
    ``lam * thetabar^T H thetabar`` (``lam * thetabar^T |H thetabar|``).

    Cost: one create_graph backward plus one double-backward pass per call, on top of the caller's
    ``loss.backward()``; ``reg.backward(loss)`` does the whole step without that extra backward.
    ``reg.last_direction`` holds the detached ``H thetabar`` of the last call (before any absolute
    value), one tensor per parameter, aligned with ``reg.params``.
    """

    owner = "Metric"

    def __init__(self, model: nn.Module, lam: float, absolute: bool = False):
        self.lam = check_coefficient("Metric", "lam", lam)
        self.absolute = check_flag("Metric", "absolute", absolute)
        self.params = trainable_parameters("Metric", model)
        self.last_direction: list[torch.Tensor] | None = None

    def _penalty_gradients(self, tensors, direction):
        self.last_direction = direction
        return torch._foreach_mul(torch._foreach_abs(direction) if self.absolute else direction, self.lam)

    def _penalty(self, tensors, penalty_gradients):
        return torch.stack([(p * r).sum() for p, r in zip(tensors, penalty_gradients)]).sum()


class SelectiveL2(_HessianProductRegularizer):
    """Selective L2 (Jarvis 2021, Table 4.1): L2 only on the parameters that matter little to the metric.

    Parameter ``j`` of a parameter tensor is regularized when
    ``|thetabar^T H|_j < omega * max over that tensor of |thetabar^T H|`` (the thesis takes the max per
    layer; here per parameter tensor, so a layer's weight and bias are thresholded separately).
    The mask is recomputed at every call from one Hessian-vector product (see :class:`Metric`).
    A tensor whose ``thetabar^T H`` is all zero gets no regularization (nothing is ``< 0``).

    ``reg(loss)``: ``loss`` as for :class:`Metric`. Returns ``(lam / 2) * sum_j mask_j theta_j^2``,
    whose gradient is ``lam * mask * theta``, consistent with :class:`~fastcurv.regularizers.L2`.
    ``reg.backward(loss)``: the whole step, as for :class:`Metric`.
    ``reg.last_mask`` (bool tensors aligned with ``reg.params``) and ``reg.last_direction`` hold the
    mask and ``H thetabar`` of the last call.
    """

    owner = "SelectiveL2"

    def __init__(self, model: nn.Module, lam: float, omega: float):
        self.lam = check_coefficient("SelectiveL2", "lam", lam)
        self.omega = check_number("SelectiveL2", "omega", omega, low=0, high=1, low_open=True,
                                  why="a fraction of the largest |thetabar^T H|: omega > 1 would regularize every "
                                      "parameter (plain L2), omega <= 0 none")
        self.params = trainable_parameters("SelectiveL2", model)
        self.last_direction: list[torch.Tensor] | None = None
        self.last_mask: list[torch.Tensor] | None = None

    @staticmethod
    def mask_from_direction(direction: torch.Tensor, omega: float) -> torch.Tensor:
        """``|d| < omega * max |d|`` elementwise, the max taken over the whole tensor ``d``."""
        magnitude = direction.abs()
        if magnitude.numel() == 0:
            return torch.zeros_like(direction, dtype=torch.bool)
        return magnitude < omega * magnitude.max()

    value_factor = 0.5

    def _penalty_gradients(self, tensors, direction):
        masks = [self.mask_from_direction(d, self.omega) for d in direction]
        self.last_direction, self.last_mask = direction, masks
        return [torch.where(m, p.detach(), 0).mul_(self.lam) for p, m in zip(tensors, masks)]

    def _penalty(self, tensors, penalty_gradients):
        masks = self.last_mask
        return 0.5 * self.lam * torch.stack([p.pow(2).masked_fill(~m, 0).sum() for p, m in zip(tensors, masks)]).sum()
