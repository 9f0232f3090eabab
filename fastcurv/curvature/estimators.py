"""Randomized estimators on a symmetric operator: trace (Hutchinson, Hutch++), squared Frobenius norm,
and quadratic forms. Probes are Rademacher vectors drawn on the CPU from ``seed``."""
from __future__ import annotations

import math

import torch

from fastcurv.curvature._operator import as_operator
from fastcurv.curvature.eigen import _progress_bar

__all__ = ["trace", "frobenius_sq", "quadratic_form"]

TRACE_METHODS = ("hutchinson", "hutch++")


def _rademacher(P: int, m: int, A, generator: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, (P, m), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(A.dtype).to(A.device)


def _apply(A, Z: torch.Tensor, probe_batch_size: int, bar) -> torch.Tensor:
    """``A @ Z`` in chunks of at most ``probe_batch_size`` columns (bounds the memory of one product)."""
    out = []
    for start in range(0, Z.shape[1], probe_batch_size):
        chunk = Z[:, start : start + probe_batch_size]
        out.append(A.matmat(chunk))
        bar.update(chunk.shape[1])
    return torch.cat(out, 1)


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    mean = samples.mean().item()
    stderr = (samples.std(correction=1) / math.sqrt(m)).item() if m > 1 else math.inf
    return mean, stderr


def _check(num_probes, probe_batch_size, what):
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"{what}: num_probes must be a positive integer, got {num_probes!r}")
    if isinstance(probe_batch_size, bool) or not isinstance(probe_batch_size, int) or probe_batch_size < 1:
        raise ValueError(f"{what}: probe_batch_size must be a positive integer, got {probe_batch_size!r}")


def trace(
    op,
    num_probes: int = 64,
    method: str = "hutchinson",
    seed: int = 0,
    probe_batch_size: int = 32,
    return_stderr: bool = False,
    progress: bool | None = None,
):
    """Estimate ``tr(A)`` from ``num_probes`` products.

    ``"hutchinson"``: ``mean_j z_j^T A z_j`` over Rademacher ``z_j`` (unbiased; variance
    ``2 (||A||_F^2 - sum_i A_ii^2) / m``). ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021): ``m/3``
    products sketch the top of the range, ``Q = qr(A S)``; ``tr(Q^T A Q)`` is exact on it, and Hutchinson
    with the remaining ``m/3`` probes, projected off ``Q``, estimates the rest; error ``O(1/m)`` instead of
    ``O(1/sqrt m)``. With ``num_probes >= P`` it returns the exact trace from the ``P`` unit vectors
    (fewer products than the budget allows, and no variance). Needs ``num_probes >= 3`` otherwise.

    Products are evaluated ``probe_batch_size`` columns at a time. With ``return_stderr=True`` returns
    ``(estimate, standard_error)``, the standard error computed from the Hutchinson samples' spread
    (for Hutch++ the spread of its residual part; 0 when exact; ``inf`` from a single probe).
    """
    _check(num_probes, probe_batch_size, "trace")
    if method not in TRACE_METHODS:
        raise ValueError(f"trace: method must be one of {TRACE_METHODS}, got {method!r}")
    A = as_operator(op)
    P = A.num_params
    generator = torch.Generator().manual_seed(seed)
    if method == "hutchinson":
        with _progress_bar(num_probes, "trace (hutchinson)", progress) as bar:
            Z = _rademacher(P, num_probes, A, generator)
            samples = (Z.double() * _apply(A, Z, probe_batch_size, bar).double()).sum(0)
        estimate, stderr = _mean_and_stderr(samples)
    elif num_probes >= P:
        with _progress_bar(P, "trace (exact)", progress) as bar:
            estimate, stderr = _exact_trace(A, probe_batch_size, bar), 0.0
    else:
        if num_probes < 3:
            raise ValueError(f"trace: method='hutch++' needs num_probes >= 3 (or >= P = {P}), got {num_probes}")
        sketch = num_probes // 3
        residual_probes = num_probes - 2 * sketch
        with _progress_bar(num_probes, "trace (hutch++)", progress) as bar:
            S = _rademacher(P, sketch, A, generator)
            Q = torch.linalg.qr(_apply(A, S, probe_batch_size, bar)).Q
            top = (Q.double() * _apply(A, Q, probe_batch_size, bar).double()).sum().item()
            G = _rademacher(P, residual_probes, A, generator)
            G = G - Q @ (Q.T @ G)
            samples = (G.double() * _apply(A, G, probe_batch_size, bar).double()).sum(0)
        rest, stderr = _mean_and_stderr(samples)
        estimate = top + rest
    return (estimate, stderr) if return_stderr else estimate


def _exact_trace(A, probe_batch_size: int, bar) -> float:
    P = A.num_params
    total = 0.0
    for start in range(0, P, probe_batch_size):
        stop = min(P, start + probe_batch_size)
        E = torch.zeros(P, stop - start, dtype=A.dtype, device=A.device)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1
        total += A.matmat(E)[start:stop].diagonal().double().sum().item()
        bar.update(stop - start)
    return total


def frobenius_sq(
    op,
    num_probes: int = 64,
    seed: int = 0,
    probe_batch_size: int = 32,
    return_stderr: bool = False,
    progress: bool | None = None,
):
    """Estimate ``||A||_F^2 = tr(A^T A) = E ||A z||^2`` over Rademacher ``z`` from ``num_probes`` products.

    With ``return_stderr=True`` returns ``(estimate, standard_error)`` from the samples' spread.
    """
    _check(num_probes, probe_batch_size, "frobenius_sq")
    A = as_operator(op)
    generator = torch.Generator().manual_seed(seed)
    with _progress_bar(num_probes, "frobenius_sq", progress) as bar:
        Z = _rademacher(A.num_params, num_probes, A, generator)
        samples = _apply(A, Z, probe_batch_size, bar).double().square().sum(0)
    estimate, stderr = _mean_and_stderr(samples)
    return (estimate, stderr) if return_stderr else estimate


def quadratic_form(op, v: torch.Tensor) -> torch.Tensor:
    """``v^T A v``: a 0-d tensor for ``v`` of shape ``[P]``, ``[K]`` (one per column) for ``[P, K]``."""
    A = as_operator(op)
    Av = A.matmat(v)
    return (v * Av).sum(0)
