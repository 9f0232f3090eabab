"""Trainers: learning rules, schedules, the training loop, history and checkpoints.

``fit(model, train_data, test_data, rule="l2", ...)`` trains with one of :data:`RULES` and returns the
per-epoch :class:`History`. See :mod:`fastcurv.train.rules` for the rules' conventions.
"""
from fastcurv.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastcurv.train.history import History
from fastcurv.train.init import INIT_SCALES, initialize, regime
from fastcurv.train.loop import DivergenceError, ResumeMismatchError, evaluate, fit, parameter_norm, per_example_loss
from fastcurv.train.rules import DEFAULTS, RULES, NonFiniteError, Rule, make_rule
from fastcurv.train.schedules import Constant, MultiStep, StepHalving, make_schedule, step_halving_lr

__all__ = [
    "fit", "evaluate", "parameter_norm", "per_example_loss", "History", "RULES", "DEFAULTS", "Rule",
    "make_rule", "NonFiniteError", "DivergenceError", "ResumeMismatchError", "Constant", "StepHalving", "MultiStep", "make_schedule",
    "step_halving_lr", "save_checkpoint", "load_checkpoint", "CheckpointError", "initialize", "regime", "INIT_SCALES",
]
