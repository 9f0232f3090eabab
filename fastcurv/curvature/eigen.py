"""Extreme eigenpairs of a symmetric operator known through products: block power iteration with
Rayleigh-Ritz, and Lanczos with full reorthogonalization."""
from __future__ import annotations

import math
import sys
import warnings

import torch

from fastcurv.curvature._operator import CurvatureOperator, as_operator

__all__ = ["top_eigenvalues", "spectral_radius", "ConvergenceWarning"]

WHICH = ("LM", "LA")
METHODS = ("lanczos", "power")


class ConvergenceWarning(RuntimeWarning):
    """An iterative solver stopped at ``max_iter`` before meeting its tolerance."""


def _progress_bar(total: int, desc: str, progress):
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc=desc, disable=disable, leave=False)


def _random_block(P: int, cols: int, A: CurvatureOperator, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU from a seeded generator so results do not depend on the device.
    return torch.randn(P, cols, generator=generator, dtype=torch.float64).to(A.dtype).to(A.device)


def _orthonormal(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(X).Q


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    key = theta.abs() if which == "LM" else theta
    return torch.argsort(key, descending=True)


def _fix_signs(X: torch.Tensor) -> torch.Tensor:
    """Eigenvectors are defined up to sign: make each one's largest-magnitude entry positive."""
    idx = X.abs().argmax(0)
    signs = torch.sign(X[idx, torch.arange(X.shape[1], device=X.device)])
    signs[signs == 0] = 1
    return X * signs


def top_eigenvalues(
    op,
    k: int = 1,
    tol: float = 1e-4,
    max_iter: int | None = None,
    which: str = "LM",
    method: str = "lanczos",
    seed: int = 0,
    block_size: int | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` extreme eigenpairs of a symmetric operator.

    Args:
        op: a :class:`~fastcurv.curvature.Hessian`, :class:`~fastcurv.curvature.EmpiricalFisher`, any
            object with ``matmat`` (or ``@``), ``num_params``, ``dtype``, ``device``, or a square tensor.
        k: how many eigenpairs (``1 <= k <= P``).
        tol: convergence when every wanted Ritz pair has residual ``||A x - theta x|| <= tol * |theta_max|``
            (``theta_max`` = largest-magnitude Ritz value seen, an estimate of ``||A||_2``); the eigenvalue
            error is then at most that residual, and much smaller when eigenvalues are well separated.
        max_iter: ``"power"``: iterations (each one batched product of ``block_size`` columns; default 1000).
            ``"lanczos"``: the largest Krylov dimension, i.e. number of single products (default
            ``min(P, max(200, 20 k))``); the basis of that many ``P``-vectors is kept in memory.
        which: ``"LM"`` largest magnitude (sorted by descending ``|lambda|``) or ``"LA"`` largest algebraic
            (sorted by descending ``lambda``).
        method: ``"lanczos"`` (Lanczos with full reorthogonalization, fewest products) or ``"power"``
            (simultaneous power iteration with Rayleigh-Ritz, paper 002 Algorithm 1 with the ``k``
            products of an iteration batched into one, and Ritz values instead of R's diagonal). For
            ``"LA"`` the power method iterates on ``A + rho I`` with ``rho`` its own ``"LM"`` estimate of
            the spectral radius, which makes the largest algebraic eigenvalues the dominant ones.
        seed: seed of the random start (drawn on the CPU, so the same on every device).
        block_size: power method only: columns per iteration, ``>= k`` (default ``min(P, max(2k, k + 2))``;
            extra columns speed convergence from ``|lambda_{k+1}/lambda_k|`` to ``|lambda_{b+1}/lambda_k|``).
        progress: show a tqdm bar (default: only when stderr is a terminal).

    Returns:
        ``(eigenvalues [k], eigenvectors [P, k])`` in the operator's dtype and device; eigenvectors are
        orthonormal, each with its largest-magnitude entry positive.

    Emits :class:`ConvergenceWarning` (with the residual reached) if ``max_iter`` is hit first.
    Single-vector Lanczos finds one copy of an exactly repeated eigenvalue before the others: for
    operators with exact multiplicities (symmetries) prefer ``method="power"``.
    """
    A = as_operator(op)
    P = A.num_params
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= P:
        raise ValueError(f"top_eigenvalues: k must be an integer in [1, P = {P}], got {k!r}")
    if which not in WHICH:
        raise ValueError(f"top_eigenvalues: which must be one of {WHICH}, got {which!r}")
    if method not in METHODS:
        raise ValueError(f"top_eigenvalues: method must be one of {METHODS}, got {method!r}")
    if not tol > 0:
        raise ValueError(f"top_eigenvalues: tol must be > 0, got {tol!r}")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"top_eigenvalues: max_iter must be >= 1, got {max_iter!r}")
    if not A.dtype.is_floating_point:
        raise TypeError(f"top_eigenvalues: the operator's dtype must be floating point, got {A.dtype}")
    generator = torch.Generator().manual_seed(seed)
    if method == "lanczos":
        if block_size is not None:
            raise ValueError("top_eigenvalues: block_size applies to method='power' only")
        m_max = min(P, max_iter if max_iter is not None else max(200, 20 * k))
        if m_max < k:
            raise ValueError(f"top_eigenvalues: max_iter = {max_iter} < k = {k}; Lanczos needs at least k products")
        return _lanczos(A, k, tol, m_max, which, generator, progress)
    b = block_size if block_size is not None else min(P, max(2 * k, k + 2))
    if not k <= b <= P:
        raise ValueError(f"top_eigenvalues: block_size must be in [k = {k}, P = {P}], got {block_size!r}")
    iters = max_iter if max_iter is not None else 1000
    shift = 0.0
    if which == "LA":
        rho = _block_power(A, 1, tol, iters, "LM", min(P, 3), 0.0, generator, progress)[0].abs().item()
        shift = rho
    values, vectors = _block_power(A, k, tol, iters, which, b, shift, generator, progress)
    return values, vectors


def _block_power(A, k, tol, iters, which, b, shift, generator, progress):
    P = A.num_params
    Q = _orthonormal(_random_block(P, b, A, generator))
    bar = _progress_bar(iters, "block power", progress)
    worst = math.inf
    try:
        for _ in range(iters):
            Z = A.matmat(Q)  # one batched product per iteration
            if shift:
                Z = Z + shift * Q
            # Rayleigh-Ritz on span(Q), in float64.
            T = Q.T.double() @ Z.double()
            theta, S = torch.linalg.eigh((T + T.T) / 2)
            order = _order(theta, which)  # shift is 0 for "LM"; for "LA" it preserves the order
            theta, S = theta[order], S[:, order]
            S_ = S.to(A.dtype)
            X, AX = Q @ S_, Z @ S_
            residual = (AX.double() - X.double() * theta).norm(dim=0)
            scale = max((theta - shift).abs().max().item(), torch.finfo(torch.float64).tiny)
            worst = (residual[:k].max() / scale).item()
            bar.update(1)
            bar.set_postfix(residual=f"{worst:.1e}")
            if worst <= tol:
                break
            Q = _orthonormal(AX)
        else:
            warnings.warn(
                f"top_eigenvalues(method='power', which={which!r}): not converged after {iters} iterations; "
                f"largest relative residual {worst:.2e} > tol {tol:.1e}. Raise max_iter or block_size.",
                ConvergenceWarning,
                stacklevel=3,
            )
    finally:
        bar.close()
    values = (theta[:k] - shift).to(A.dtype).to(A.device)
    return values, _fix_signs(X[:, :k])


def _lanczos(A, k, tol, m_max, which, generator, progress):
    P = A.num_params
    basis = torch.zeros(P, m_max, dtype=A.dtype, device=A.device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[:, j] and basis[:, j + 1]
    eps = torch.finfo(A.dtype).eps
    q = _random_block(P, 1, A, generator)[:, 0]
    q = q / q.norm()
    bar = _progress_bar(m_max, "lanczos", progress)
    worst, theta, S, m = math.inf, None, None, 0
    try:
        for j in range(m_max):
            basis[:, j] = q
            w = A.matmat(q[:, None])[:, 0]
            alpha = torch.dot(q, w).item()
            alphas.append(alpha)
            # Full reorthogonalization (twice is enough: "twice is enough", Parlett) keeps the basis
            # orthonormal to working precision, so no ghost eigenvalues appear.
            V = basis[:, : j + 1]
            for _ in range(2):
                w = w - V @ (V.T @ w)
            beta = w.norm().item()
            m = j + 1
            bar.update(1)
            if m >= k:
                T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
                if m > 1:
                    off = torch.tensor(betas, dtype=torch.float64)
                    T = T + torch.diag(off, 1) + torch.diag(off, -1)
                theta, S = torch.linalg.eigh(T)
                order = _order(theta, which)
                theta, S = theta[order], S[:, order]
                scale = max(theta.abs().max().item(), torch.finfo(torch.float64).tiny)
                # Residual of Ritz pair i is |beta_m * (last component of its eigenvector of T)|.
                worst = (beta * S[-1, :k].abs().max() / scale).item()
                bar.set_postfix(residual=f"{worst:.1e}")
                if worst <= tol or m == P:
                    break
            if m == m_max:
                break
            if beta <= 100 * eps * max(abs(a) for a in alphas):
                # Invariant subspace found: continue from a fresh random direction orthogonal to it
                # (a zero coupling in T), so eigenvalues the start vector missed are still found.
                w = _random_block(P, 1, A, generator)[:, 0]
                for _ in range(2):
                    w = w - V @ (V.T @ w)
                beta_next, q = 0.0, w / w.norm()
            else:
                beta_next, q = beta, w / beta
            betas.append(beta_next)
        if worst > tol and m < P:
            warnings.warn(
                f"top_eigenvalues(method='lanczos', which={which!r}): not converged after {m} products; "
                f"largest relative residual {worst:.2e} > tol {tol:.1e}. Raise max_iter.",
                ConvergenceWarning,
                stacklevel=3,
            )
    finally:
        bar.close()
    vectors = basis[:, :m] @ S[:, :k].to(A.dtype)
    return theta[:k].to(A.dtype).to(A.device), _fix_signs(vectors)


def spectral_radius(op, tol: float = 1e-4, max_iter: int | None = None, method: str = "lanczos", seed: int = 0,
                    progress: bool | None = None) -> float:
    """``rho(A) = max |lambda|``, the largest-magnitude eigenvalue's absolute value (see :func:`top_eigenvalues`)."""
    values, _ = top_eigenvalues(op, k=1, tol=tol, max_iter=max_iter, which="LM", method=method, seed=seed,
                                progress=progress)
    return values[0].abs().item()
