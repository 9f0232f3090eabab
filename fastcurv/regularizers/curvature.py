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

Two cheaper estimators of the same penalty (docs/METHODS.md section 1, "Cheap estimators"):

* ``Curvature(model, alpha, subsample=b)``: the penalty from ``b`` of the batch's ``B`` examples drawn
  without replacement each call, ``alpha (1/b) sum_{i in S} s_i``: unbiased for the penalty and its
  gradient. It is called on the batch, ``reg(x, y)``, and runs its own captured forward on the ``b``
  examples only, so the data loss trains on all ``B`` with a plain (uncaptured) forward::

      reg = Curvature(model, alpha=1e-3, subsample=16)     # loss_fn: per-example cross-entropy by default
      loss = F.cross_entropy(model(x), y) + reg(x, y)
      loss.backward()
      # or, the same gradient with each example forwarded once (cheaper): reg.backward(x, y)

* ``Curvature(model, alpha, every=k)``: the penalty's gradient is computed on every k-th call and the
  stored gradient is reused unchanged on the ``k - 1`` calls between (no capture, no double backward
  there); ``every=1`` is the exact step. Works with both call forms.

How it is computed (docs/METHODS.md section 1, the measured cheapest exact form): one
``create_graph=True`` gradient of ``sum_i l_i`` w.r.t. the captured layer *outputs* only (not the
parameters) gives differentiable deltas; the per-example norms follow from (activations, deltas)
through ``fastcurv.ops`` (which register their own backward), and a single ``backward()`` of
``mean l + penalty`` then carries both losses to the parameters, autograd merging them per node.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastcurv._validate import check_flag
from fastcurv.capture import Capture, capture
from fastcurv.regularizers.guard import PenaltyGuard
from fastcurv.regularizers.norms import check_coefficient

__all__ = ["Curvature"]


@contextlib.contextmanager
def _running_statistics_paused(model: nn.Module) -> Iterator[None]:
    """The regularizer's own forward (``reg(x, y)``) leaves train-mode BatchNorm's running statistics
    alone: the data loss's forward updates them once per step, and an in-place update here would also
    invalidate that forward's saved tensors (autograd's version check) before its backward."""
    paused = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.training and m.track_running_stats]
    for m in paused:
        m.track_running_stats = False  # batch statistics, running ones neither read nor updated
    try:
        yield
    finally:
        for m in paused:
            m.track_running_stats = True


def _uses_batch_statistics(model: nn.Module) -> bool:
    """A BatchNorm normalizing by the batch's own statistics: splitting the batch would change them."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
               for m in model.modules())


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
        subsample: ``None`` (all examples) or ``b >= 1``: estimate the penalty from ``b`` examples of
            each batch drawn without replacement (``torch.randperm``, seeded by ``generator`` or the
            global RNG); needs the call form ``reg(x, y)``. ``b >= B`` uses the whole batch.
        every: compute the penalty's gradient on every ``every``-th call and add the stored gradient
            (unchanged, with the stored value) on the calls between; ``1`` (default): every call exact.
        loss_fn: ``loss_fn(out, y) -> [B]`` per-example losses for the call form ``reg(x, y)``
            (default: per-example cross-entropy).
        generator: a ``torch.Generator`` for the subsample draws (default: the global RNG).
        guard: ``"warn"`` (default), ``"error"`` or ``None``: the first time the penalty or the
            per-example norms are nan/inf or jump 1000x above their recent median, warn (or raise)
            with what to do (:class:`fastcurv.regularizers.guard.PenaltyGuard`; one host sync per call).

    Attributes:
        last_sqnorms: the last computed per-example squared norms (detached, ``[B]`` or ``[b]``), for
            logging; on a reused step of ``every=k`` they are the last computed step's.
        last_subset: the indices of the last ``subsample`` draw (``None`` without ``subsample``).
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float,
        ignore: Iterable[Union[nn.Module, str]] = (),
        strict: bool = False,
        batchnorm: str = "refuse",
        subsample: Optional[int] = None,
        every: int = 1,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        generator: Optional[torch.Generator] = None,
        guard: Optional[str] = "warn",
    ):
        if subsample is not None and (isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1):
            raise ValueError(f"Curvature: subsample must be None or an int >= 1 (examples per step), got {subsample!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Curvature: every must be an int >= 1 (steps between penalty computations), got {every!r}")
        self.subsample, self.every = subsample, every
        self.loss_fn = loss_fn if loss_fn is not None else _per_example_cross_entropy
        self.generator = generator
        self.last_subset: Optional[torch.Tensor] = None
        self._calls = 0  # penalty calls so far: call c computes when c % every == 0
        self._stored: Optional[tuple[torch.Tensor, list]] = None  # every > 1: (value, gradient per parameter)
        self.model = model
        self.alpha = check_coefficient("Curvature", "alpha", alpha)
        self.ignore = tuple([ignore] if isinstance(ignore, (str, nn.Module)) else ignore)
        self.capture_options = {"strict": check_flag("Curvature", "strict", strict), "batchnorm": batchnorm}
        capture(model, self.ignore, **self.capture_options)  # fail now, not at the first step, on bad options
        self._capture: Optional[Capture] = None
        self.last_sqnorms: Optional[torch.Tensor] = None
        self.guard = PenaltyGuard(f"Curvature(alpha={self.alpha:g})", guard)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v}" for k, v in (("subsample", self.subsample), ("every", self.every))
                          if v not in (None, 1))
        return f"Curvature(alpha={self.alpha}{options})"

    @property
    def computes_next(self) -> bool:
        """Whether the next call computes the penalty (always for ``every=1``); ``False``: it reuses
        the stored gradient and ``track()`` records nothing."""
        return self._calls % self.every == 0 or self._stored is None

    @contextlib.contextmanager
    def track(self) -> Iterator[Capture]:
        """Record the forward that produces the losses to regularize (one forward per ``track``).

        ``F.scaled_dot_product_attention`` inside the tracked forward runs on its math backend
        (``sdpa_kernel(SDPBackend.MATH)``): the penalty needs a double backward through attention,
        which the fused kernels (the CPU flash kernel, CUDA flash / memory-efficient) do not have.
        The math backend computes the same attention (more memory: it forms the score matrix).

        With ``every=k``, on the calls that reuse the stored gradient ``track()`` records nothing
        (yields ``None``) and the forward inside it runs as a plain forward."""
        self._capture = None
        if not self.computes_next:
            yield None
            return
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
        penalty = self.alpha * sqnorms.mean()
        self.guard.check(penalty, sqnorms)
        return penalty, sqnorms

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        """The penalty ``alpha * mean_i ||grad l_i||^2`` as a differentiable scalar, in one of two forms:

        * ``reg(per_example)``: per-example losses ``[B]`` of the forward run inside ``reg.track()``
          (``reduction="none"``; mean-scaled losses would give norms scaled by 1/B^2).
        * ``reg(x, y)``: the batch itself; the regularizer runs its own captured forward (on ``subsample``
          examples of it when set, else on all of them) and ``loss_fn`` gives the per-example losses.
          Add it to the data loss computed on all of ``x``.

        With ``every=k`` the calls between two computations return ``stored value + <theta - theta.detach(),
        stored gradient>``: its value is the last computed penalty and its gradient the stored one."""
        if len(batch) == 2:
            return self._penalty_of_batch(*batch)
        if len(batch) != 1:
            raise TypeError(f"Curvature: call reg(per_example) (losses of a tracked forward) or reg(x, y) (the batch), "
                            f"got {len(batch)} arguments")
        if self.subsample is not None:
            raise TypeError(
                f"Curvature(subsample={self.subsample}): call reg(x, y) with the batch, not reg(per_example): the "
                "subsample estimate runs its own forward on the drawn examples only (its cost scales with b/B)"
            )
        return self._counted(lambda: self.penalty_and_sqnorms(batch[0])[0])

    def backward(self, *batch: torch.Tensor) -> torch.Tensor:
        """The whole step, adding to ``.grad`` as any backward does; returns the penalty value (detached).

        ``reg.backward(per_example)``: ``(per_example.mean() + reg(per_example)).backward()``.
        ``reg.backward(x, y)``: ``(loss_fn(model(x), y).mean() + reg(x, y)).backward()``; with
        ``subsample=b`` the same gradient at less cost, see :meth:`backward_with_loss`."""
        if len(batch) == 2:
            return self.backward_with_loss(*batch)[1]
        if len(batch) != 1:
            raise TypeError(f"Curvature.backward: pass per_example or (x, y), got {len(batch)} arguments")
        penalty = self(batch[0])
        (batch[0].mean() + penalty).backward()
        return penalty.detach()

    def backward_with_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_fn(model(x), y).mean() + reg(x, y)).backward()``; returns ``(data loss, penalty)``, detached.

        With ``subsample=b`` (on a computing call) the drawn examples' data loss comes from the
        penalty's own captured forward and only the other ``B - b`` run a plain forward, so no example
        is forwarded twice: about ``(B - b)/B`` of a plain step plus the penalty's share on ``b``
        examples, instead of a whole plain step plus it. Same value and gradient up to summation
        order. Not while a BatchNorm uses batch statistics (train mode): there the data loss must see
        the whole batch's statistics, so it keeps its own forward on all ``B``."""
        if self.subsample is None or self.subsample >= x.shape[0] or not self.computes_next or _uses_batch_statistics(self.model):
            data_loss = self.loss_fn(self.model(x), y).mean()
            penalty = self(x, y)
            (data_loss + penalty).backward()
            return data_loss.detach(), penalty.detach()
        order = torch.randperm(x.shape[0], generator=self.generator).to(x.device)
        drawn, rest = order[: self.subsample], order[self.subsample:]
        self.last_subset = drawn
        drawn_loss = {}

        def compute():
            with self.track():
                out = self.model(x[drawn])
            per_example = self.loss_fn(out, y[drawn])
            drawn_loss["sum"] = per_example.sum()
            return self.penalty_and_sqnorms(per_example)[0]

        penalty = self._counted(compute)
        data_loss = (drawn_loss["sum"] + self.loss_fn(self.model(x[rest]), y[rest]).sum()) / x.shape[0]
        (data_loss + penalty).backward()
        return data_loss.detach(), penalty.detach()

    # --------------------------------------------------------------------------------- internals
    def _penalty_of_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def compute():
            xs, ys = x, y
            if self.subsample is not None and self.subsample < x.shape[0]:
                index = torch.randperm(x.shape[0], generator=self.generator)[: self.subsample].to(x.device)
                self.last_subset = index
                xs, ys = x[index], y[index]
            return self.penalty_on(xs, ys)

        return self._counted(compute)

    def penalty_on(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``alpha * mean_i ||grad l_i||^2`` over exactly the examples ``(x, y)`` (its own tracked forward):
        the ``subsample`` estimate for a given subset (the tests average it over every subset)."""
        with self.track() as cap, _running_statistics_paused(self.model):
            out = self.model(x)
        if cap is None:  # every=k reuse step: track() recorded nothing; penalty_on is only called to compute
            raise RuntimeError("Curvature.penalty_on: called on a step that reuses the stored gradient")
        return self.penalty_and_sqnorms(self.loss_fn(out, y))[0]

    def _counted(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``compute`` (every call for ``every=1``, exactly today's step) or, with ``every=k``,
        compute and store its gradient on every k-th call and return the stored term in between."""
        if self.every == 1:
            self._calls += 1
            return compute()
        if self.computes_next:
            penalty = compute()
            params = [p for p in self.model.parameters() if p.requires_grad]
            # The stored term is the penalty's own gradient, so it is taken apart from the data loss's
            # (one extra backward of the penalty graph, on the computing calls only).
            # retain_graph: a tracked forward is shared with the data loss, whose backward comes later.
            grads = torch.autograd.grad(penalty, params, retain_graph=True, allow_unused=True)
            self._stored = (penalty.detach(), [(p, g) for p, g in zip(params, grads) if g is not None])
        self._calls += 1
        return self.stored_term()

    def stored_term(self) -> torch.Tensor:
        """A scalar with the stored penalty's value whose gradient with respect to each parameter is the
        stored penalty gradient ``g`` (what ``every=k`` adds on the calls between): the value of
        ``stored + sum_p <p - p.detach(), g_p>``, written as one autograd node that hands ``g`` back (one
        pass over the parameters instead of the five of the elementwise form)."""
        if self._stored is None:
            raise RuntimeError("Curvature: no stored penalty gradient yet (every=k computes on the first call)")
        value, pairs = self._stored
        return gradient_term(value, [g for _, g in pairs], [p for p, _ in pairs])

    def estimator_state(self) -> dict:
        """What ``every=k`` carries from step to step (call count, stored value and gradient), for a
        checkpoint; :meth:`load_estimator_state` restores it so that a resumed run reuses the same term."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self._stored is None:
            return {"calls": self._calls, "value": None, "gradients": None}
        value, pairs = self._stored
        by_param = {id(p): g for p, g in pairs}
        return {"calls": self._calls, "value": value.detach().cpu(),
                "gradients": [None if id(p) not in by_param else by_param[id(p)].detach().cpu() for p in params]}

    def load_estimator_state(self, state: dict) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._calls = int(state["calls"])
        if state["value"] is None:
            self._stored = None
            return
        pairs = [(p, g.to(p.device, p.dtype)) for p, g in zip(params, state["gradients"]) if g is not None]
        self._stored = (state["value"].to(params[0].device), pairs)

    def reset(self) -> None:
        """Forget the stored gradient and the call count: the next call computes."""
        self._calls, self._stored = 0, None


class _StoredGradient(torch.autograd.Function):
    """``forward(value, grads, *params) = value``; ``backward`` returns ``grad_out * grads[i]`` for
    ``params[i]``: a term whose gradient is a stored one."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        return (None, None, *(grad_out * g for g in ctx.grads))


def gradient_term(value: torch.Tensor, grads: list, params: list) -> torch.Tensor:
    """A loss term with value ``value`` and gradient ``grads[i]`` with respect to ``params[i]`` (the
    linear surrogate ``value + sum_i <params[i] - params[i].detach(), grads[i]>`` as one autograd node)."""
    return _StoredGradient.apply(value, list(grads), *params)


def _per_example_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, y, reduction="none")
