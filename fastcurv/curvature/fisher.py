"""The empirical Fisher ``F = (1/N) sum_i g_i g_i^T`` as a linear operator built on captured activations
and deltas: ``F V`` for K vectors costs a few GEMMs per layer and no backward pass per vector."""
from __future__ import annotations

import copy
import functools
import inspect
from typing import Callable

import torch
from torch import nn

from fastcurv.curvature._operator import ModelOperator, ParameterSnapshot, join_columns, split_columns

__all__ = ["EmpiricalFisher", "per_example_loss_fn"]


def per_example_loss_fn(loss_fn: Callable, what: str = "EmpiricalFisher") -> Callable:
    """``loss_fn`` with ``reduction="none"``: a copy of a loss module with its ``reduction`` attribute set
    to ``"none"``, or the function with ``reduction="none"`` bound (``F.cross_entropy``, ``F.mse_loss``...)."""
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        per_example = copy.copy(loss_fn)
        per_example.reduction = "none"
        return per_example
    try:
        parameters = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "reduction" in parameters:
        return functools.partial(loss_fn, reduction="none")
    raise TypeError(
        f"{what} needs per-example losses: loss_fn must take a `reduction` keyword (like F.cross_entropy, "
        f"F.mse_loss) or be a loss module with a `reduction` attribute (like nn.CrossEntropyLoss()); "
        f"got {getattr(loss_fn, '__name__', type(loss_fn).__name__)}"
    )


class EmpiricalFisher(ModelOperator):
    """``F = (1/N) sum_i g_i g_i^T`` over all examples of ``data``, ``g_i = grad_theta l_i``.

    Same interface as :class:`~fastcurv.curvature.Hessian`. ``l_i`` is example ``i``'s loss:
    ``loss_fn(output, target, reduction="none")`` (see :func:`per_example_loss_fn`), averaged over any
    non-batch dimensions, i.e. the loss ``loss_fn`` would give for that example alone with its default
    mean reduction. So ``F`` pairs with the Hessian of the mean loss (equal to it in expectation at a
    minimum of a log-likelihood loss). Class weights or ``ignore_index`` in the loss change what "mean"
    means and are not accounted for.

    Products use the capture layer (:mod:`fastcurv.capture`): per batch one forward and one backward of
    ``sum_i l_i`` record activations ``a`` and deltas ``delta``; then for all K columns at once
    ``c = [g_i . v_k]`` (``layer.dot``, ``[B, K]``) and ``(F V)_layer = sum_i c_ik g_i``
    (``layer.weighted_grad_sum``). With ``cache=True`` the captures of every batch are kept after the
    first product, so later products do no forward or backward at all (memory: all activations and
    deltas of ``data``). The cache is dropped and rebuilt when any parameter changed since it was
    filled (``optimizer.step()``, in-place updates, ``.data`` assignment; see
    :class:`~fastcurv.curvature._operator.ParameterSnapshot`).

    Every parameter in ``params`` must belong to a layer the capture layer supports; otherwise the
    first product raises (an unsupported layer's gradient would be silently missing).
    """

    name = "EmpiricalFisher"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data,
        params=None,
        *,
        cache: bool = False,
        allow_train_mode: bool = False,
    ):
        super().__init__(model, loss_fn, data, params, allow_train_mode=allow_train_mode)
        self.per_example_loss = per_example_loss_fn(loss_fn)
        self.cache = cache
        self._cached: list | None = None
        self._cached_snapshot: ParameterSnapshot | None = None  # the parameters the cache was filled at
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def _losses(self, output, y, n: int) -> torch.Tensor:
        losses = self.per_example_loss(output, y)
        if not isinstance(losses, torch.Tensor) or losses.dim() == 0 or losses.shape[0] != n:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"EmpiricalFisher: loss_fn(output, target, reduction='none') must return per-example losses "
                f"with leading dimension {n}, got {shape}"
            )
        return losses.reshape(n, -1).mean(1)

    def _captures(self):
        """Yields ``(layers, deltas)`` per batch: from the cache, or by a forward + backward."""
        if self._cached is not None and self._cached_snapshot.matches(self.params):
            yield from self._cached
            return
        self._cached = None  # stale (or never filled)
        from fastcurv.capture import capture

        kept = []
        snapshot = ParameterSnapshot(self.params) if self.cache else None
        for x, y, n in self.data:
            with torch.enable_grad(), capture(self.model) as cap:
                losses = self._losses(self.model(x), y, n)
                deltas = cap.deltas(losses)
            self._check_coverage(cap)
            # a layer recorded several times (LSTM steps, a reused Linear) has one delta per call
            item = (cap.layers, [[t.detach() for t in d] if isinstance(d, list) else d.detach() for d in deltas], n)
            if self.cache:
                kept.append(item)
            yield item
        if self.cache:
            self._cached, self._cached_snapshot = kept, snapshot

    def _check_coverage(self, cap) -> None:
        captured = {id(p) for _, p in cap.params}
        missing = [name for name, p in zip(self.param_names, self.params) if id(p) not in captured]
        if missing:
            raise RuntimeError(
                f"EmpiricalFisher: parameters {missing} are not in any layer the capture layer supports "
                f"(or their layer was not called); their per-example gradients are unknown, so F @ V would "
                f"be wrong. Pass params= without them, or use Hessian."
            )

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        K = V.shape[1]
        blocks = split_columns(V, self.params)
        out: list[torch.Tensor | None] = [None] * len(self.params)
        count = 0
        for layers, deltas, n in self._captures():
            with torch.no_grad():  # the products need no graph (and must not extend the captured one)
                self._accumulate(layers, deltas, blocks, out, K)
            count += n
        return join_columns(out, self.params, K) / count

    def _accumulate(self, layers, deltas, blocks, out, K) -> None:
        """Adds one batch's ``sum_i g_i (g_i . V)`` into ``out`` (one ``[K, *shape]`` block per parameter)."""
        # Columns of V for each layer's parameters; zeros for captured parameters outside `params`.
        per_layer = []
        for layer in layers:
            vecs = []
            for _, p in layer.params:
                i = self._index.get(id(p))
                vecs.append(blocks[i] if i is not None else torch.zeros(K, *p.shape, dtype=self.dtype, device=self.device))
            per_layer.append(vecs)
        coeffs = sum(layer.dot(delta, vecs) for layer, delta, vecs in zip(layers, deltas, per_layer) if vecs)  # [B, K]
        for layer, delta in zip(layers, deltas):
            if not layer.params:
                continue
            for (_, p), s in zip(layer.params, layer.weighted_grad_sum(delta, coeffs)):
                i = self._index.get(id(p))
                if i is not None:
                    out[i] = s if out[i] is None else out[i] + s
