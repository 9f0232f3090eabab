"""Statistics behind every verdict: a paired test across seeds and a one-line conclusion.

numpy only (scipy is not needed): the Student t tail for integer degrees of freedom has a closed form
(Abramowitz & Stegun 26.7.3-4), and the sign-flip permutation test is enumerated exactly.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

ALPHA = 0.05  # significance level of every verdict
REPRODUCED = "reproduced"
CONTRADICTED = "not reproduced (the opposite direction is significant)"
INCONCLUSIVE = "inconclusive at this budget"


def student_t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with integer ``df >= 1`` (closed form, no scipy)."""
    if int(df) != df or df < 1:
        raise ValueError(f"student_t_two_sided_p: df must be an integer >= 1, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2 == 1:  # A = (2/pi) [theta + sin(theta) (cos + 2/3 cos^3 + ... up to cos^(df-2))]
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        inside = 2.0 / math.pi * (theta + s * total)
    else:  # A = sin(theta) [1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ... up to cos^(df-2)]
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c * c * (2 * k - 1) / (2 * k)
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def sign_flip_p(differences) -> float:
    """Exact two-sided sign-flip permutation p-value of ``mean(differences) != 0`` (n <= 16)."""
    d = np.asarray(differences, dtype=np.float64)
    n = d.size
    if n == 0 or n > 16:
        raise ValueError(f"sign_flip_p: needs 1..16 paired differences, got {n}")
    observed = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    flipped = np.abs((signs * d).mean(axis=1))
    return float(np.mean(flipped >= observed - 1e-12 * max(observed, 1e-300)))


def paired_test(ours, baseline) -> dict:
    """Paired comparison of per-seed values ``ours[i]`` vs ``baseline[i]`` (same seed ``i``).

    Returns the mean and std of the differences, the paired t statistic with its two-sided p-value
    (the test the verdict uses; the sign-flip one when all differences are equal) and the exact sign-flip p-value (reported; with n seeds it cannot go
    below 2 / 2^n)."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_test: need two 1-d arrays of equal length, got shapes {a.shape} and {b.shape}")
    d = a - b
    d = d[np.isfinite(d)]  # a seed with a missing (NaN) value on either side is left out; "n" counts the rest
    n = d.size
    mean = float(d.mean()) if n else math.nan
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    if n < 2:
        t, p = math.nan, math.nan
    elif std == 0.0:
        # Identical differences make t infinite; fall back on the exact sign-flip p-value, which
        # cannot declare 2 or 3 seeds significant however consistent they are.
        t, p = (math.copysign(math.inf, mean) if mean != 0 else 0.0), sign_flip_p(d)
    else:
        t = mean / (std / math.sqrt(n))
        p = student_t_two_sided_p(t, n - 1)
    return {"n": n, "mean_difference": mean, "std_difference": std, "t": t, "p_t": p,
            "p_sign_flip": sign_flip_p(d) if 1 <= n <= 16 else math.nan}


def decide(test: dict, expected: str, alpha: float = ALPHA) -> str:
    """One of :data:`REPRODUCED`, :data:`CONTRADICTED`, :data:`INCONCLUSIVE`.

    ``expected`` is the paper's direction for ``ours - baseline``: ``"greater"`` or ``"less"``.
    A claim is reproduced only when the paired t-test is significant at ``alpha`` in the paper's
    direction; significant the other way is a contradiction; anything else is inconclusive."""
    if expected not in ("greater", "less"):
        raise ValueError(f"decide: expected must be 'greater' or 'less', got {expected!r}")
    p, mean = test["p_t"], test["mean_difference"]
    if math.isnan(p) or p >= alpha or mean == 0:
        return INCONCLUSIVE
    return REPRODUCED if (mean > 0) == (expected == "greater") else CONTRADICTED


def present(values) -> list[float]:
    """The values that are not missing (None or NaN)."""
    return [x for x in values if x is not None and not math.isnan(x)]


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for one value) ignoring NaNs; ``(nan, nan)`` when empty."""
    v = np.asarray(present(values), dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def claim(name: str, paper: str, ours_label: str, ours, baseline_label: str, baseline, expected: str,
          metric: str) -> dict:
    """A claim's record: per-seed values, their mean +- std, the paired test and the verdict."""
    test = paired_test(ours, baseline)
    return {
        "claim": name, "paper": paper, "metric": metric, "expected": f"{ours_label} {'>' if expected == 'greater' else '<'} {baseline_label}",
        "ours": {"label": ours_label, "values": [float(x) for x in ours], "mean_std": mean_std(ours)},
        "baseline": {"label": baseline_label, "values": [float(x) for x in baseline], "mean_std": mean_std(baseline)},
        "test": test, "verdict": decide(test, expected),
    }


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties) over the pairs where both values are finite;
    NaN when fewer than 3 such pairs remain or either side is constant (a missing value must not be
    ranked as if it were the largest)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: need two 1-d sequences of equal length, got shapes {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return math.nan
    x, y = x[keep], y[keep]

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(v.size)
        r[order] = np.arange(v.size, dtype=np.float64)
        for value in np.unique(v):  # ties share their average rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])
