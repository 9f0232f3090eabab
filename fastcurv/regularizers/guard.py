"""A watch on a penalty that can blow up: the first time the penalty or the per-example squared
gradient norms are nan/inf, or jump by orders of magnitude against their own recent history, it
warns (or raises), saying what to do.

Why: a gradient-norm penalty feeds on itself. A large per-example gradient makes a large penalty,
whose gradient (through the double backward) makes a larger step, and the next norms are larger
still; in a plain loop this runs silently to nan (``fastcurv.train.fit`` stops on nan by itself, a
user loop does not). Regularizers call :meth:`PenaltyGuard.check` once per penalty; it costs one
host sync (two numbers) per call, and ``guard=None`` on the regularizer removes it.
"""
from __future__ import annotations

import collections
import math
import statistics
import warnings

import torch

__all__ = ["PenaltyGuard", "PenaltyBlowupWarning", "PenaltyBlowupError", "GUARD_MODES"]

GUARD_MODES = ("warn", "error", None)


class PenaltyBlowupWarning(RuntimeWarning):
    """The penalty or the per-example norms became nan/inf or jumped by orders of magnitude."""


class PenaltyBlowupError(RuntimeError):
    """As :class:`PenaltyBlowupWarning`, raised with ``guard="error"``."""


class PenaltyGuard:
    """Watches ``(penalty, per-example squared norms)`` call after call.

    Args:
        owner: the regularizer's description, for the message (``"Curvature(alpha=0.01)"``).
        mode: ``"warn"`` (once, then quiet), ``"error"`` (raise :class:`PenaltyBlowupError`) or
            ``None`` (off).
        factor: a jump is the largest per-example squared norm exceeding ``factor`` times the median
            of its values over the last ``window`` calls (default 1e3: three orders of magnitude, a
            31x larger gradient norm; ordinary training moves this median by less than 10x per
            ``window`` calls).
        window, warmup: history length, and calls seen before jumps are judged.
    """

    def __init__(self, owner: str, mode: str | None = "warn", factor: float = 1e3, window: int = 50,
                 warmup: int = 10):
        from fastcurv._validate import check_number

        if mode not in GUARD_MODES:
            raise ValueError(f"{owner}: guard must be one of {GUARD_MODES}, got {mode!r}")
        self.owner, self.mode = owner, mode
        self.factor = check_number(owner, "guard factor", factor, low=1, low_open=True)
        self.warmup = check_number(owner, "guard warmup", warmup, integer=True, low=1)
        self.history: collections.deque = collections.deque(maxlen=check_number(owner, "guard window", window,
                                                                                integer=True, low=1))
        self.calls = 0
        self.fired = False

    def check(self, penalty: torch.Tensor, sqnorms: torch.Tensor) -> None:
        """Judge one call's penalty (a scalar) and per-example squared norms ``[B]``."""
        if self.mode is None:
            return
        self.calls += 1
        with torch.no_grad():
            value, largest = torch.stack([penalty.detach().reshape(()).float(),
                                          sqnorms.detach().float().max()]).tolist()
        problem = None
        if not (math.isfinite(value) and math.isfinite(largest)):
            problem = (f"the penalty is {value:.4g} and the largest per-example squared gradient norm {largest:.4g} "
                       f"at call {self.calls}: they are no longer finite")
        elif len(self.history) >= self.warmup:
            typical = statistics.median(self.history)
            if largest > self.factor * max(typical, 1e-30):
                problem = (f"the largest per-example squared gradient norm jumped to {largest:.4g} at call "
                           f"{self.calls}, {largest / max(typical, 1e-30):.3g}x its median {typical:.4g} over the last "
                           f"{len(self.history)} calls (penalty {value:.4g}): training is likely diverging")
        if math.isfinite(largest):
            self.history.append(largest)
        if problem is None or self.fired:
            return
        self.fired = True
        message = (f"{self.owner}: {problem}. What to do: lower alpha (keep the penalty a fraction of the data "
                   "loss; see the README, 'Choosing alpha'), lower the learning rate, or clip the gradient "
                   "(torch.nn.utils.clip_grad_norm_ before optimizer.step()). guard='error' raises instead, "
                   "guard=None turns this check off")
        if self.mode == "error":
            raise PenaltyBlowupError(message)
        warnings.warn(message, PenaltyBlowupWarning, stacklevel=4)
