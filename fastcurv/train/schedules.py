"""Learning-rate schedules, evaluated per epoch (``t`` = 0-based epoch index).

Each schedule is a callable ``schedule(t) -> lr`` with ``first_drop_epoch()`` (the first epoch whose
rate is below the initial one, or ``None``), which ``fit(..., regularize_after_first_drop=True)`` uses to
switch a regularizer on only after the first drop (Jia & Su 2020; docs/METHODS.md).
"""
from __future__ import annotations

import math


def step_halving_lr(t: int, lr0: float, lr_drop: int) -> float:
    """Paper 000's schedule ``lr(t) = lr0 * 0.5 ** ceil(t / lr_drop)``.

    With 0-based epochs, epoch 0 runs at ``lr0`` and epochs ``1..lr_drop`` at ``lr0 / 2`` (the formula
    as written; the paper's Keras scheduler also counts epochs from 0).
    """
    if lr_drop <= 0:
        raise ValueError(f"step_halving_lr: lr_drop must be a positive number of epochs, got {lr_drop}")
    if t < 0:
        raise ValueError(f"step_halving_lr: epoch t must be >= 0, got {t}")
    return lr0 * 0.5 ** math.ceil(t / lr_drop)


class Constant:
    """``lr(t) = lr0``."""

    def __init__(self, lr0: float):
        self.lr0 = float(lr0)

    def __call__(self, t: int) -> float:
        return self.lr0

    def first_drop_epoch(self) -> int | None:
        return None

    def __repr__(self) -> str:
        return f"Constant(lr0={self.lr0})"


class StepHalving:
    """``lr(t) = lr0 * 0.5 ** ceil(t / lr_drop)`` (Fisher regularization paper, docs/METHODS.md section 4); the first drop is at epoch 1."""

    def __init__(self, lr0: float, lr_drop: int):
        if int(lr_drop) != lr_drop or lr_drop <= 0:
            raise ValueError(f"StepHalving: lr_drop must be a positive integer (epochs), got {lr_drop}")
        self.lr0 = float(lr0)
        self.lr_drop = int(lr_drop)

    def __call__(self, t: int) -> float:
        return step_halving_lr(t, self.lr0, self.lr_drop)

    def first_drop_epoch(self) -> int | None:
        return 1

    def __repr__(self) -> str:
        return f"StepHalving(lr0={self.lr0}, lr_drop={self.lr_drop})"


class MultiStep:
    """``lr(t) = lr0 * factor ** (number of milestones <= t)``: the step decay of Jia & Su (2020)'s runs."""

    def __init__(self, lr0: float, milestones: list[int], factor: float = 0.1):
        milestones = sorted(int(m) for m in milestones)
        if any(m <= 0 for m in milestones):
            raise ValueError(f"MultiStep: milestones must be positive epochs, got {milestones}")
        if not 0 < factor < 1:
            raise ValueError(f"MultiStep: factor must lie in (0, 1), got {factor}")
        self.lr0, self.milestones, self.factor = float(lr0), milestones, float(factor)

    def __call__(self, t: int) -> float:
        return self.lr0 * self.factor ** sum(1 for m in self.milestones if m <= t)

    def first_drop_epoch(self) -> int | None:
        return self.milestones[0] if self.milestones else None

    def __repr__(self) -> str:
        return f"MultiStep(lr0={self.lr0}, milestones={self.milestones}, factor={self.factor})"


def make_schedule(lr: float, schedule=None):
    """``None`` -> :class:`Constant`; an int ``lr_drop`` -> :class:`StepHalving`; a callable is kept."""
    if schedule is None:
        return Constant(lr)
    if isinstance(schedule, bool):
        raise TypeError("schedule must be None, an int lr_drop or a schedule object, got a bool")
    if isinstance(schedule, int):
        return StepHalving(lr, schedule)
    if callable(schedule):
        return schedule
    raise TypeError(f"schedule must be None, an int lr_drop or a callable t -> lr, got {type(schedule).__name__}")
