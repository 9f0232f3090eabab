"""The generalized Gauss-Newton matrix ``G = J^T H_loss J`` of the mean loss over a data set, as a linear
operator with batched products: a Jacobian-vector product (forward mode), the loss Hessian with respect to
the network's output (closed form for cross-entropy and MSE), then a vector-Jacobian product."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.curvature._operator import ModelOperator, backward_columns, scalar_loss

__all__ = ["GGN", "output_hessian"]


def _loss_kind(loss_fn) -> tuple[str, str, int] | None:
    """``(kind, reduction, ignore_index)`` when ``loss_fn`` is a cross-entropy or MSE loss with a closed-form output
    Hessian (default options only), else None (the generic autograd path then serves it)."""
    if loss_fn is F.cross_entropy:
        return "cross_entropy", "mean", -100
    if loss_fn is F.mse_loss:
        return "mse", "mean", -100
    if type(loss_fn) is nn.CrossEntropyLoss:
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0
        return ("cross_entropy", loss_fn.reduction, loss_fn.ignore_index) if plain and loss_fn.reduction in ("mean", "sum") else None
    if type(loss_fn) is nn.MSELoss:
        return ("mse", loss_fn.reduction, -100) if loss_fn.reduction in ("mean", "sum") else None
    return None


def output_hessian(loss_fn, output: torch.Tensor, y) -> Callable[[torch.Tensor], torch.Tensor]:
    """``U [K, *output.shape] -> (d^2 loss_fn(f, y) / d f^2 at f = output) U``, column by column.

    Closed forms (no autograd): cross-entropy on ``[n, C]`` logits with class-index targets, ``H_i =
    (diag p_i - p_i p_i^T) / n`` (``/ 1`` for ``reduction="sum"``); MSE with targets of the output's shape,
    ``H = 2 I / numel`` (``2 I`` for sum). Any other loss (class weights, label smoothing, soft targets,
    ``ignore_index`` hits, custom losses): the exact Hessian-vector product by double backward through
    ``loss_fn`` alone, which is cheap, since it does not go through the network."""
    kind = _loss_kind(loss_fn)
    output = output.detach()
    if kind is not None and kind[0] == "cross_entropy" and output.dim() == 2 and isinstance(y, torch.Tensor) \
            and y.dim() == 1 and not y.is_floating_point() and not bool((y == kind[2]).any()):
        probs = output.softmax(1)
        scale = 1.0 / output.shape[0] if kind[1] == "mean" else 1.0

        def cross_entropy_hessian(U):
            return (probs * U - probs * (probs * U).sum(-1, keepdim=True)) * scale

        return cross_entropy_hessian
    if kind is not None and kind[0] == "mse" and isinstance(y, torch.Tensor) and y.shape == output.shape:
        scale = 2.0 / output.numel() if kind[1] == "mean" else 2.0
        return lambda U: U * scale
    f = output.requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(scalar_loss(loss_fn, f, y, "GGN"), f, create_graph=True)
    if not g.requires_grad:  # the loss is linear in the output: its Hessian is zero
        return torch.zeros_like

    def autograd_hessian(U):
        return torch.stack([torch.autograd.grad(g, f, grad_outputs=u, retain_graph=True)[0] for u in U])

    return autograd_hessian


class GGN(ModelOperator):
    """``G = sum_b (n_b / N) J_b^T H_b J_b`` over the batches of ``data``: ``J_b`` the Jacobian of the
    network's output on batch ``b`` w.r.t. the parameters, ``H_b`` the Hessian of ``loss_fn(output, y)``
    w.r.t. that output. For a convex loss of the output (cross-entropy, MSE) ``G`` is positive
    semi-definite; it is the Hessian minus the term with the network's second derivatives, and for
    cross-entropy it equals the (true) Fisher information of the model's predictive distribution.

    Same interface as :class:`~fastcurv.curvature.Hessian` (``model``, ``loss_fn``, ``data``, ``params``,
    ``loss_reduction``, ``allow_train_mode``): it is the Gauss-Newton matrix of exactly the objective that
    ``Hessian`` differentiates twice, so the two are comparable number for number.

    ``G @ V`` for ``V [P, K]``, per batch: ``J V`` for all K columns by ``torch.func.jvp`` vmapped over K
    (forward mode: about one forward per column), then ``H_b (J V)`` (:func:`output_hessian`: closed form
    for cross-entropy and MSE), then ``J^T (.)`` by backwards through the graph of one forward.
    ``cache_graph``: keep each batch's output graph and loss Hessian between products (default: on for a
    single batch, off for several, as for ``Hessian``); rebuilt when a parameter changed in any way.
    Needs forward-mode AD rules for the model's ops (``torch.func.jvp``), which PyTorch has for the
    common layers.
    """

    name = "GGN"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data,
        params=None,
        *,
        loss_reduction: str = "mean",
        allow_train_mode: bool = False,
        cache_graph: bool | None = None,
    ):
        super().__init__(model, loss_fn, data, params, allow_train_mode=allow_train_mode,
                         loss_reduction=loss_reduction, cache_graph=cache_graph)

    def _output_and_hessian(self, x, y):
        with torch.enable_grad():
            output = self.model(x)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"GGN: the model must return one tensor (the network's output), got {type(output).__name__}")
        return output, output_hessian(self.loss_fn, output, y)

    def _jacobian_columns(self, x, blocks) -> torch.Tensor:
        """``J V`` as ``[K, *output.shape]``, forward mode, vmapped over the K columns."""
        from torch.func import functional_call, jvp, vmap

        primals = tuple(p.detach() for p in self.params)
        names = self.param_names

        def output_of(*ps):
            return functional_call(self.model, dict(zip(names, ps)), (x,))

        return vmap(lambda *tangents: jvp(output_of, primals, tangents)[1])(*blocks)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._sum_over_batches(V, self._batch_product)

    def _batch_product(self, index, x, y, blocks):
        output, loss_hessian = self._cached(index, lambda: self._output_and_hessian(x, y))
        if not output.requires_grad:  # the output does not depend on the parameters
            return [None] * len(self.params)
        JV = self._jacobian_columns(x, blocks)
        return backward_columns([output], self.params, [loss_hessian(JV)], self.cache_graph)
