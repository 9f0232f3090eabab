"""The one place public arguments are checked: every constructor, ``fit`` and the CLI call these, so
a bad value is refused at once with a message naming the argument, what was expected and what came.

    check_number("Curvature", "alpha", alpha, low=0)              # finite, >= 0
    check_number("SelectiveL2", "omega", omega, low=0, high=1, low_open=True, high_open=True)
    check_number("fit", "epochs", epochs, integer=True, low=0)
    check_flag("Metric", "absolute", absolute)

``owner`` prefixes the message (``"Curvature: alpha must be ..."``); ``None`` leaves it out, for
command-line flags whose name says it all (``"--lr must be finite and > 0, got 0.0"``).
"""
from __future__ import annotations

import math
import numbers

__all__ = ["check_number", "check_flag"]


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_number(owner: str | None, name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 allow_none: bool = False, why: str = ""):
    """``value`` as a float (an int with ``integer=True``), or a clear error.

    Refuses (``TypeError``) what is not a real number (a string, a bool, a tensor with several
    elements) and (``ValueError``) nan/inf, a non-integral value where an integer is needed, and a
    value outside ``[low, high]`` (open ends with ``low_open`` / ``high_open``). ``None`` passes
    through with ``allow_none``. ``why`` is appended to the message (what the bound means)."""
    if value is None and allow_none:
        return None
    bounds = _bounds(low, high, low_open, high_open)
    need = (f"an integer {bounds}" if integer else f"finite and {bounds}") if bounds else (
        "an integer" if integer else "finite")
    suffix = (" or None" if allow_none else "") + (f" ({why})" if why else "")
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _is_scalar_tensor(value)):
        kind = "an integer" if integer else "a real number"
        raise TypeError(f"{_prefix(owner)}{name} must be {kind}{' ' + bounds if bounds else ''}{suffix}, "
                        f"got {value!r} ({type(value).__name__})")
    number = float(value)
    out_of_bounds = ((low is not None and (number <= low if low_open else number < low))
                     or (high is not None and (number >= high if high_open else number > high)))
    if not math.isfinite(number) or (integer and number != int(number)) or out_of_bounds:
        raise ValueError(f"{_prefix(owner)}{name} must be {need}{suffix}, got {value}")
    return int(number) if integer else number


def _is_scalar_tensor(value) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex


def check_flag(owner: str | None, name: str, value) -> bool:
    """``value`` if it is a bool (numpy bools too), else a ``TypeError``: ``exact="no"`` must not mean True."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{_prefix(owner)}{name} must be True or False, got {value!r} ({type(value).__name__})")
