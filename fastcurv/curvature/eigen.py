"""Extreme eigenpairs of a symmetric operator known through products: block power iteration with
Rayleigh-Ritz, Lanczos with partial reorthogonalization, and block Lanczos with full reorthogonalization."""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fastcurv.curvature._operator import CurvatureOperator, as_operator

__all__ = ["top_eigenvalues", "spectral_radius", "ConvergenceWarning", "EigenInfo"]

WHICH = ("LM", "LA")
METHODS = ("lanczos", "block_lanczos", "power")


@dataclass(frozen=True)
class EigenInfo:
    """How a :func:`top_eigenvalues` call ended (returned with ``return_info=True``).

    ``residuals[i]`` is ``||A x_i - lambda_i x_i|| / max_j |lambda_j|`` for the returned pair ``i``; the
    eigenvalue error is at most that (times ``max |lambda|``), and much smaller when eigenvalues are
    well separated. ``num_products`` counts matrix-vector products (columns), including any shift
    estimate for ``which="LA"`` with the power method.
    """

    method: str
    converged: bool
    num_products: int
    residuals: list[float]


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
    tol: float = 1e-3,
    max_iter: int | None = None,
    which: str = "LM",
    method: str = "lanczos",
    seed: int = 0,
    block_size: int | None = None,
    progress: bool | None = None,
    return_info: bool = False,
):
    """The ``k`` extreme eigenpairs of a symmetric operator.

    Args:
        op: a :class:`~fastcurv.curvature.Hessian`, :class:`~fastcurv.curvature.EmpiricalFisher`, any
            object with ``matmat`` (or ``@``), ``num_params``, ``dtype``, ``device``, or a square tensor.
        k: how many eigenpairs (``1 <= k <= P``).
        tol: convergence when every wanted Ritz pair has residual ``||A x - theta x|| <= tol * |theta_max|``
            (``theta_max`` = largest-magnitude Ritz value, an estimate of ``||A||_2``);
            the eigenvalue error is then at most that residual, and much smaller when eigenvalues are
            well separated. The default 1e-3 bounds the eigenvalue error by ``1e-3 |lambda_max|``; ask
            for a smaller ``tol`` when you need accurate eigenvectors.
        max_iter: ``"power"``: iterations (each one batched product of ``block_size`` columns; default 1000).
            ``"lanczos"`` / ``"block_lanczos"``: the largest Krylov dimension, i.e. number of columns
            multiplied (default ``min(P, max(200, 20 k))``); the basis of that many ``P``-vectors is
            kept in memory.
        which: ``"LM"`` largest magnitude (sorted by descending ``|lambda|``) or ``"LA"`` largest algebraic
            (sorted by descending ``lambda``).
        method: ``"lanczos"`` (default: Lanczos with partial reorthogonalization, one product per step,
            fewest products), ``"block_lanczos"`` (the same with ``block_size`` columns per step, each
            step one batched product: fewer, larger products; finds exactly repeated eigenvalues), or
            ``"power"`` (simultaneous power iteration with Rayleigh-Ritz, Jarvis 2021 Algorithm 1 with the
            ``k`` products of an iteration batched into one, and Ritz values instead of R's diagonal).
            For ``"LA"`` the power method iterates on ``A + rho I`` with ``rho`` its own ``"LM"`` estimate
            of the spectral radius, which makes the largest algebraic eigenvalues the dominant ones.
        seed: seed of the random start (drawn on the CPU, so the same on every device).
        block_size: ``"power"``: columns per iteration, ``>= k`` (default ``min(P, max(2k, k + 2))``;
            extra columns speed convergence from ``|lambda_{k+1}/lambda_k|`` to ``|lambda_{b+1}/lambda_k|``).
            ``"block_lanczos"``: columns per step, ``1 <= block_size <= P`` (default ``min(P, max(k, 4))``).
        progress: show a tqdm bar (default: only when stderr is a terminal).
        return_info: also return an :class:`EigenInfo` (converged or not, products used, residuals).

    Returns:
        ``(eigenvalues [k], eigenvectors [P, k])`` in the operator's dtype and device (plus the
        :class:`EigenInfo` with ``return_info=True``); eigenvectors are orthonormal, each with its
        largest-magnitude entry positive.

    Emits :class:`ConvergenceWarning` (with the residual reached) if ``max_iter`` is hit first.
    Single-vector Lanczos finds one copy of an exactly repeated eigenvalue before the others: for
    operators with exact multiplicities (symmetries) prefer ``"block_lanczos"`` or ``"power"``.
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
    if method in ("lanczos", "block_lanczos"):
        if method == "lanczos":
            if block_size is not None:
                raise ValueError("top_eigenvalues: block_size applies to method='power' or 'block_lanczos' only")
            b = 1
        else:
            b = block_size if block_size is not None else min(P, max(k, 4))
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= P:
                raise ValueError(f"top_eigenvalues: block_size must be in [1, P = {P}] for method='block_lanczos', "
                                 f"got {block_size!r}")
        m_max = min(P, max_iter if max_iter is not None else max(200, 20 * k))
        if m_max < k:
            raise ValueError(f"top_eigenvalues: max_iter = {max_iter} < k = {k}; Lanczos needs at least k products")
        m_max = max(m_max, min(b, P))  # room for the first block
        if b == 1:
            values, vectors, info = _lanczos(A, k, tol, m_max, which, generator, progress)
        else:
            values, vectors, info = _block_lanczos(A, k, tol, m_max, which, b, generator, progress)
    else:
        b = block_size if block_size is not None else min(P, max(2 * k, k + 2))
        if not k <= b <= P:
            raise ValueError(f"top_eigenvalues: block_size must be in [k = {k}, P = {P}], got {block_size!r}")
        iters = max_iter if max_iter is not None else 1000
        shift, shift_products = 0.0, 0
        if which == "LA":
            rho, _, shift_info = _block_power(A, 1, tol, iters, "LM", min(P, 3), 0.0, generator, progress)
            shift, shift_products = rho.abs().item(), shift_info.num_products
        values, vectors, info = _block_power(A, k, tol, iters, which, b, shift, generator, progress)
        info = EigenInfo(info.method, info.converged, info.num_products + shift_products, info.residuals)
    return (values, vectors, info) if return_info else (values, vectors)


def _block_power(A, k, tol, iters, which, b, shift, generator, progress):
    P = A.num_params
    Q = _orthonormal(_random_block(P, b, A, generator))
    bar = _progress_bar(iters, "block power", progress)
    worst, done = math.inf, 0
    try:
        for _ in range(iters):
            Z = A.matmat(Q)  # one batched product per iteration
            done += 1
            if shift:
                Z = Z + shift * Q
            # Rayleigh-Ritz on span(Q), in float64.
            T = Q.T.double() @ Z.double()
            theta, S = torch.linalg.eigh((T + T.T) / 2)
            order = _order(theta, which)  # shift is 0 for "LM"; for "LA" it preserves the order
            theta, S = theta[order], S[:, order]
            S_ = S.to(A.dtype)
            X, AX = Q @ S_, Z @ S_
            residual = (AX.double() - X.double() * theta).norm(dim=0)[:k]
            scale = max((theta - shift).abs().max().item(), torch.finfo(torch.float64).tiny)
            worst = (residual.max() / scale).item()
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
    info = EigenInfo("power", worst <= tol, done * b, (residual / scale).tolist())
    return values, _fix_signs(X[:, :k]), info


def _next_block(W, basis, rows, scale, generator, A):
    """The next Lanczos block: ``rows`` orthonormal rows, orthogonal to ``basis``, and their coupling
    ``B`` (``[rows, b]``, float64), with ``W ~= B^T Q`` for ``W [b, P]`` already orthogonal to ``basis``.

    Directions of ``W`` at rounding level relative to ``scale`` (~ ``||A||``) mean an invariant subspace
    was found (or fewer than ``b`` dimensions remain): they get zero coupling and fresh random
    directions take their place, so eigenvalues the start block missed are still found."""
    if W.shape[0] == 1:  # single-vector Lanczos: a norm, no factorization
        norm = W.norm()
        Q, coupling = W / norm, norm.double().reshape(1, 1)
    else:
        Qw, R = torch.linalg.qr(W.T)
        U_R, sigma, Vh = torch.linalg.svd(R.double())
        Q, coupling = (Qw @ U_R.to(W.dtype)).T, sigma[:, None] * Vh
    keep = coupling.norm(dim=1) > 100 * torch.finfo(W.dtype).eps * scale
    if not bool(keep.all()):
        Q, coupling = Q[keep], coupling[keep]
    Q, coupling = Q[:rows], coupling[:rows].cpu()
    missing = rows - Q.shape[0]
    if missing:
        Q = torch.cat([Q, _fresh_directions(missing, (basis, Q), generator, A)])
        coupling = torch.cat([coupling, coupling.new_zeros(missing, W.shape[0])])
    return Q.contiguous(), coupling


def _fresh_directions(count, orthogonal_to, generator, A) -> torch.Tensor:
    """``count`` random orthonormal rows orthogonal to the rows of every tensor in ``orthogonal_to``
    (two Gram-Schmidt passes): where the Krylov space became invariant, the iteration continues from them."""
    fresh = _random_block(A.num_params, count, A, generator).T
    for _ in range(2):
        for V in orthogonal_to:
            fresh = fresh - (fresh @ V.T) @ V
    return torch.linalg.qr(fresh.T).Q.T


class _OrthogonalityEstimate:
    """Simon's omega recurrence (partial reorthogonalization, Simon 1984; Larsen's PROPACK form) for
    single-vector Lanczos: estimates ``|q_{j+1}^T q_i|`` for all earlier vectors from the tridiagonal
    entries alone, so the full pass over the basis (two reads of ``[m, P]``, the memory-bound part of an
    iteration) runs only when orthogonality is about to be lost, not at every step. Keeping the basis
    semi-orthogonal (``|q_i^T q_j| <= sqrt(eps)``) is enough for Ritz values accurate to ``eps ||A||``.
    NumPy float64 vectors: a step is a dozen operations on vectors of length ``j``, which cost less as NumPy
    calls than as torch dispatches."""

    def __init__(self, dtype: torch.dtype):
        self.eps = torch.finfo(dtype).eps
        self.limit = math.sqrt(self.eps)
        self.previous = np.ones(0)  # omega for q_{j-1} against q_0..q_{j-1}
        self.current = np.ones(1)  # omega for q_j against q_0..q_j
        self.force_next = False

    def next(self, alpha: np.ndarray, betas: np.ndarray, j: int, beta: float, scale: float) -> bool:
        """Advance to ``q_{j+1}`` (coupling ``beta``) given ``alpha[:j+1]`` and ``betas[:j]`` (``betas[i]``
        couples ``q_i`` and ``q_{i+1}``); True when ``q_{j+1}`` must be fully reorthogonalized."""
        omega = np.full(j + 2, self.eps)
        omega[j + 1] = 1.0
        if beta > 0 and j > 0:
            cur, prev = self.current, self.previous
            t = betas * cur[1 : j + 1] + (alpha[:j] - alpha[j]) * cur[:j]
            t[1:] += betas[: j - 1] * cur[: j - 1]
            t -= betas[j - 1] * prev[:j]
            # Rounding feeds the recurrence: add its size, eps ||A||, with the sign that grows the estimate.
            noise = self.eps * scale
            omega[:j] = (t + np.where(t >= 0, noise, -noise)) / beta
        self.previous, self.current = self.current, omega
        reorthogonalize = self.force_next or bool((np.abs(omega[: j + 1]) > self.limit).any())
        # Reorthogonalize two consecutive vectors: q_{j+2}'s estimate is built from q_{j+1}'s and q_j's.
        self.force_next = reorthogonalize and not self.force_next
        return reorthogonalize

    def reset(self) -> None:
        """``q_{j+1}`` was just fully reorthogonalized: its overlaps are at rounding level."""
        self.current[:-1] = self.eps


def _lanczos(A, k, tol, m_max, which, generator, progress):
    """Single-vector Lanczos with partial reorthogonalization (:class:`_OrthogonalityEstimate`).

    The basis is kept as contiguous rows ``[m, P]``; a step is one product, two vector updates and, only
    when the estimate asks for it, a full pass over the basis. The tridiagonal entries, the tridiagonal
    itself (filled in place, one entry per step) and its eigendecomposition are NumPy float64 on the CPU:
    the ~40 small operations a step makes on them cost less as NumPy calls than as torch dispatches."""
    P = A.num_params
    basis = torch.empty(m_max, P, dtype=A.dtype, device=A.device)  # rows; never zero-filled
    alpha = np.zeros(m_max)
    betas = np.zeros(m_max)  # betas[j] couples q_j and q_{j+1}
    T_full = np.zeros((m_max, m_max))  # the tridiagonal, grown by one row and column per step
    q = _random_block(P, 1, A, generator)[:, 0]
    torch.div(q, q.norm(), out=basis[0])
    orthogonality = _OrthogonalityEstimate(A.dtype)
    tiny = torch.finfo(torch.float64).tiny
    bar = _progress_bar(m_max, "lanczos", progress)
    m, scale, worst, converged = 0, tiny, math.inf, False
    try:
        while True:
            # Each Lanczos vector is written once, straight into its basis row (below): no temporary
            # vector and no copy per step; fresh P-vectors cost page faults as much as the pass itself.
            q = basis[m]
            w = A.matmat(q[:, None])[:, 0]  # a fresh tensor: updated in place below
            a = torch.dot(q, w).item()
            alpha[m] = T_full[m, m] = a
            w.sub_(q, alpha=a)
            previous_beta = float(betas[m - 1]) if m > 0 else 0.0
            if previous_beta:
                w.sub_(basis[m - 1], alpha=previous_beta)
            before = w.norm().item()
            # ||A q|| (an estimate of ||A||) from its orthogonal parts, without another pass over w.
            scale = max(scale, math.sqrt(a * a + previous_beta * previous_beta + before * before))
            if orthogonality.next(alpha[: m + 1], betas[:m], m, before, scale):
                V = basis[: m + 1]
                w.sub_(V.T @ (V @ w))
                # A second pass only when the first one cancelled most of w (Daniel-Gragg-Kaufman-
                # Stewart criterion): then rounding left components along V that one more pass removes.
                if w.norm().item() < 0.7 * before:
                    w.sub_(V.T @ (V @ w))
                orthogonality.reset()
            beta = w.norm().item()
            m += 1
            bar.update(1)
            theta_all, S_all = np.linalg.eigh(T_full[:m, :m])
            theta_scale = max(float(np.abs(theta_all).max()), tiny)
            key = np.abs(theta_all) if which == "LM" else theta_all
            order = np.argsort(-key, kind="stable")[:k]
            theta, S = theta_all[order], S_all[:, order]
            if m >= k:
                # Ritz pair (theta_j, V^T s_j) has residual beta * |s_j[last]|.
                residual = beta * np.abs(S[m - 1])
                worst = float(residual.max() / theta_scale)
                bar.set_postfix(residual=f"{worst:.1e}")
                converged = worst <= tol or m == P
                if converged or m >= m_max:
                    break
            if beta > 100 * torch.finfo(A.dtype).eps * scale:
                torch.div(w, beta, out=basis[m])
            else:
                # An invariant subspace: continue from a fresh random direction orthogonal to the basis,
                # with zero coupling, so eigenvalues the start vector missed are still found.
                basis[m], beta = _fresh_directions(1, (basis[:m],), generator, A)[0], 0.0
            betas[m - 1] = T_full[m - 1, m] = T_full[m, m - 1] = beta
    finally:
        bar.close()
    if not converged:
        warnings.warn(
            f"top_eigenvalues(method='lanczos', which={which!r}): not converged after {m} products; "
            f"largest relative residual {worst:.2e} > tol {tol:.1e}. Raise max_iter.",
            ConvergenceWarning,
            stacklevel=3,
        )
    # [k, m] @ [m, P] on the contiguous rows, then transposed: the product with basis[:m].T ([P, m], strided)
    # took ~10x longer (a strided tall-skinny GEMM; 101k-parameter MLP, torch.profiler)
    vectors = (torch.from_numpy(S.T.copy()).to(A.device, A.dtype) @ basis[:m]).T
    info = EigenInfo("lanczos", converged, m, (residual / theta_scale).tolist())
    return torch.from_numpy(theta.copy()).to(A.device, A.dtype), _fix_signs(vectors), info


def _block_lanczos(A, k, tol, m_max, which, b, generator, progress):
    """Block Lanczos with full reorthogonalization.

    The Krylov basis is stored as contiguous rows ``[m, P]``, so projecting a new block out of it is two
    GEMMs that stream the basis once each. Each step applies ``A`` to ``b`` columns in one batched
    product."""
    P = A.num_params
    basis = torch.empty(m_max, P, dtype=A.dtype, device=A.device)  # rows; never zero-filled
    T = torch.zeros(m_max, m_max, dtype=torch.float64)  # block tridiagonal projection V A V^T
    Q = _random_block(P, b, A, generator).T
    Q = torch.linalg.qr(Q.T).Q.T.contiguous() if b > 1 else Q / Q.norm()
    bar = _progress_bar(m_max, "lanczos" if b == 1 else f"block lanczos (b={b})", progress)
    m, previous, scale, worst = 0, 0, torch.finfo(torch.float64).tiny, math.inf
    try:
        while True:
            rows = Q.shape[0]
            basis[m : m + rows] = Q
            W = A.matmat(Q.T).T  # [rows, P]: one batched product of the block
            scale = max(scale, W.norm(dim=1).max().item())
            V = basis[: m + rows]
            # The three-term (block) recurrence first, against the previous and current blocks only:
            # it removes almost all of W's projection onto V, so the full pass below, which streams
            # the whole basis (the memory-bound part of an iteration), is needed once, not twice.
            local = basis[previous : m + rows]
            C = local @ W.T
            T[m : m + rows, m : m + rows] = (C[m - previous :].double() + C[m - previous :].double().T) / 2
            W = W - C.T @ local
            before = W.norm(dim=1)
            W = W - (V @ W.T).T @ V
            # A second pass only when the first one cancelled most of W (Daniel-Gragg-Kaufman-Stewart
            # criterion): then rounding left components along V that one more pass removes.
            if bool((W.norm(dim=1) < 0.7 * before).any()):
                W = W - (V @ W.T).T @ V
            previous = m
            m += rows
            bar.update(rows)
            theta, S = torch.linalg.eigh(T[:m, :m])
            theta_scale = max(theta.abs().max().item(), torch.finfo(torch.float64).tiny)
            order = _order(theta, which)[:k]
            theta, S = theta[order], S[:, order]
            if m >= k:
                # Ritz pair (theta_i, V^T s_i) has residual A y - theta y = W^T s_i[last block].
                residual = (S[m - rows :, :].T.to(A.device, A.dtype) @ W).norm(dim=1).double()
                worst = (residual.max() / theta_scale).item()
                bar.set_postfix(residual=f"{worst:.1e}")
                if worst <= tol or m == P:
                    break
            if m >= m_max:
                break
            Q, coupling = _next_block(W, V, min(b, P - m, m_max - m), scale, generator, A)
            T[m : m + Q.shape[0], m - rows : m] = coupling
            T[m - rows : m, m : m + Q.shape[0]] = coupling.T
    finally:
        bar.close()
    converged = worst <= tol or m == P
    if not converged:
        name = "lanczos" if b == 1 else "block_lanczos"
        warnings.warn(
            f"top_eigenvalues(method={name!r}, which={which!r}): not converged after {m} products; "
            f"largest relative residual {worst:.2e} > tol {tol:.1e}. Raise max_iter.",
            ConvergenceWarning,
            stacklevel=3,
        )
    vectors = (S.T.to(A.device, A.dtype) @ basis[:m]).T
    info = EigenInfo("lanczos" if b == 1 else "block_lanczos", converged, m, (residual / theta_scale).tolist())
    return theta.to(A.dtype).to(A.device), _fix_signs(vectors), info


def spectral_radius(op, tol: float = 1e-3, max_iter: int | None = None, method: str = "lanczos", seed: int = 0,
                    progress: bool | None = None) -> float:
    """``rho(A) = max |lambda|``, the largest-magnitude eigenvalue's absolute value (see :func:`top_eigenvalues`)."""
    values, _ = top_eigenvalues(op, k=1, tol=tol, max_iter=max_iter, which="LM", method=method, seed=seed,
                                progress=progress)
    return values[0].abs().item()
