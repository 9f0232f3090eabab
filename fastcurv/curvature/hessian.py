"""The Hessian of the mean loss over a data set, as a linear operator with batched products."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fastcurv.curvature._operator import ModelOperator, backward_columns, scalar_loss

__all__ = ["Hessian", "HVP_METHODS"]

HVP_METHODS = ("double_backward", "forward_over_reverse")


class Hessian(ModelOperator):
    """``H = d^2/dtheta^2 [ (1/N) sum_i l_i(theta) ]`` over all examples of ``data``.

    Args:
        model: the network; called as ``model(x)``.
        loss_fn: ``loss_fn(output, target)`` returning the scalar loss of a batch.
        data: one ``(x, y)`` batch or an iterable of batches (list, DataLoader, generator...).
        params: parameters to differentiate (default: all requiring grad, in ``model.parameters()``
            order); ``P`` is their total number of elements and vectors are flattened in that order.
        loss_reduction: ``"mean"`` (default) if ``loss_fn`` averages over the batch, as PyTorch losses do by
            default: batch ``b`` of ``n_b`` examples then gets weight ``n_b / N``, so unequal batches
            give exactly the Hessian of the mean over all ``N`` examples. ``"sum"`` if it sums over the
            batch: every batch gets weight ``1 / N``.
        method: how ``K`` products are batched; both build one graph per batch for all ``K`` columns.
            ``"double_backward"`` (default): gradient with ``create_graph=True``, then one
            ``torch.autograd.grad(..., is_grads_batched=True)`` (the second backward vmapped over K)
            on accelerators, or K plain backwards through the kept graph on the CPU (faster there).
            ``"forward_over_reverse"``: ``torch.func.vmap`` over ``torch.func.jvp`` of
            ``torch.func.grad``. Measured on CPU (2 threads, torch 2.13; tanh MLP 64-256-256-10 with
            B=128, and a 2-conv CNN on 3x16x16 with B=64), time per ``H @ V``:
            K=1: double backward 1.1-1.7x faster; K=8: forward-over-reverse 1.0-1.3x faster;
            K=32: forward-over-reverse 1.4x faster on the MLP, double backward 1.5x faster on the CNN.
            Neither wins everywhere; double backward is the default because the solvers' most
            frequent product is K=1 (Lanczos), it needs no forward-mode AD rules (which some ops
            lack), and it is the cheaper one on convolutions at large K.
        allow_train_mode: accept dropout / train-mode BatchNorm (the operator is then not a fixed matrix).
        cache_graph: ``"double_backward"`` only: keep each batch's ``create_graph`` gradient between
            products, so a product costs one (batched) backward instead of forward + two backwards, as
            iterative solvers need many products. Default: on for a single batch, off for several
            (each kept graph holds that batch's activations). The cache is rebuilt whenever a
            parameter changed in any way: in place (``optimizer.step()``, ``p.add_``, ``copy_``,
            ``load_state_dict``) or through ``.data`` (``p.data = t``, ``p.data.add_(...)``); see
            :class:`~fastcurv.curvature._operator.ParameterSnapshot`.

    ``H @ V`` takes ``V`` of shape ``[P, K]`` (or ``[P]``), matching ``H.dtype`` and ``H.device``, and
    returns the same shape. Each product makes one pass over ``data``.
    """

    name = "Hessian"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data,
        params=None,
        *,
        loss_reduction: str = "mean",
        method: str = "double_backward",
        allow_train_mode: bool = False,
        cache_graph: bool | None = None,
    ):
        if method not in HVP_METHODS:
            raise ValueError(f"Hessian: method must be one of {HVP_METHODS}, got {method!r}")
        super().__init__(model, loss_fn, data, params, allow_train_mode=allow_train_mode,
                         loss_reduction=loss_reduction, cache_graph=cache_graph)
        self.method = method

    # -------------------------------------------------------------------------------------------
    def _batch_loss(self, output, y) -> torch.Tensor:
        return scalar_loss(self.loss_fn, output, y, "Hessian")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.method == "double_backward":
            return self._sum_over_batches(V, self._double_backward)
        return self._sum_over_batches(V, lambda index, x, y, blocks: self._forward_over_reverse(x, y, blocks))

    def _gradient_graph(self, x, y):
        with torch.enable_grad():
            loss = self._batch_loss(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # A gradient that does not depend on the parameters (unused, or loss linear in them) has a
        # zero Hessian row block; autograd refuses to differentiate it, so leave it out.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return grads, live

    def _double_backward(self, index, x, y, blocks):
        grads, live = self._cached(index, lambda: self._gradient_graph(x, y))
        if not live:
            return [None] * len(self.params)
        return backward_columns([grads[i] for i in live], self.params, [blocks[i] for i in live], self.cache_graph)

    def _forward_over_reverse(self, x, y, blocks):
        from torch.func import functional_call, grad, jvp, vmap

        primals = tuple(p.detach() for p in self.params)
        names = self.param_names

        def loss_of(*ps):
            return self._batch_loss(functional_call(self.model, dict(zip(names, ps)), (x,)), y)

        grad_fn = grad(loss_of, argnums=tuple(range(len(primals))))

        def hvp(*tangents):
            return jvp(grad_fn, primals, tangents)[1]

        return vmap(hvp)(*blocks)
