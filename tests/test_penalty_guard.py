"""The drop-in Curvature penalty warns (or raises) the first time it blows up, instead of running to nan."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.regularizers import Curvature
from fastcurv.regularizers.guard import PenaltyBlowupError, PenaltyBlowupWarning


def _step(reg, model, x, y):
    with reg.track():
        out = model(x)
    return reg(F.cross_entropy(out, y, reduction="none"))


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.randn(16, 4), torch.randint(0, 3, (16,))


def test_a_jump_of_orders_of_magnitude_warns_once_and_says_what_to_do():
    model, x, y = _model_and_data()
    reg = Curvature(model, alpha=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PenaltyBlowupWarning)  # ordinary steps: silent
        for _ in range(12):
            _step(reg, model, x, y)
    with pytest.warns(PenaltyBlowupWarning, match=r"jumped to .* its median .*lower alpha.*clip_grad_norm_.*guard=None"):
        _step(reg, model, 1e3 * x, y)  # per-example norms ~1e6x larger
    with warnings.catch_warnings():
        warnings.simplefilter("error", PenaltyBlowupWarning)  # the first time only
        _step(reg, model, 1e4 * x, y)


def test_non_finite_norms_warn_at_once_error_mode_raises_and_none_is_silent():
    model, x, y = _model_and_data()
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.warns(PenaltyBlowupWarning, match="no longer finite"):
        _step(Curvature(model, alpha=1e-2), model, bad, y)
    with pytest.raises(PenaltyBlowupError, match="no longer finite"):
        _step(Curvature(model, alpha=1e-2, guard="error"), model, bad, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PenaltyBlowupWarning)
        _step(Curvature(model, alpha=1e-2, guard=None), model, bad, y)


def test_the_guard_does_not_change_the_penalty():
    model, x, y = _model_and_data()
    guarded = _step(Curvature(model, alpha=1e-2), model, x, y)
    unguarded = _step(Curvature(model, alpha=1e-2, guard=None), model, x, y)
    assert torch.equal(guarded, unguarded)


def test_ordinary_training_never_trips_the_guard():
    from fastcurv.data import default_model, load
    from fastcurv.train import fit

    data = load("digits", seed=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PenaltyBlowupWarning)
        fit(default_model("digits"), data, rule="curvature", epochs=3, lr=0.05, momentum=0.9, progress=False)
