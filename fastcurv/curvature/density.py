"""The spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ; Lin, Saad & Yang
2016; Ghorbani, Krishnan & Xiao 2019; PyHessian's ``density()``): per random probe ``v``, ``m`` Lanczos steps
give a tridiagonal ``T`` whose eigenvalues ``theta_j`` (Ritz nodes) and squared first eigenvector entries
``tau_j`` (weights) form the Gauss quadrature of the probe's spectral measure
``sum_i (u_i . v)^2 / ||v||^2 delta(t - lambda_i)``, whose expectation is the spectral density
``(1/P) sum_i delta(t - lambda_i)``. The probes run side by side: each Lanczos step is one batched product
of all probe columns."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastcurv._io import save_figure
from fastcurv.curvature._operator import as_operator
from fastcurv.curvature.eigen import _progress_bar
from fastcurv.curvature.estimators import _mean_and_stderr, _rademacher

__all__ = ["spectral_density", "SpectralDensity", "wasserstein_1"]


def _gaussian_mixture(grid: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[R, G]``: per probe, ``sum_j tau_j N(t; theta_j, sigma^2)`` on ``grid``."""
    z = (grid[None, None, :] - nodes[:, :, None]) / sigma
    return (weights[:, :, None] * torch.exp(-0.5 * z * z)).sum(1) / (sigma * math.sqrt(2 * math.pi))


def wasserstein_1(values_a, weights_a, values_b, weights_b=None) -> float:
    """The 1-Wasserstein distance ``int |F_a(t) - F_b(t)| dt`` between two discrete measures on the line
    (weights normalized to sum 1; ``weights_b=None``: uniform), e.g. an SLQ estimate and a dense spectrum."""
    a = torch.as_tensor(values_a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(values_b, dtype=torch.float64).reshape(-1)
    wa = torch.as_tensor(weights_a, dtype=torch.float64).reshape(-1)
    wb = torch.full_like(b, 1.0) if weights_b is None else torch.as_tensor(weights_b, dtype=torch.float64).reshape(-1)
    points = torch.cat([a, b])
    signed = torch.cat([wa / wa.sum(), -wb / wb.sum()])
    order = torch.argsort(points)
    points, cdf_difference = points[order], torch.cumsum(signed[order], 0)
    return (cdf_difference[:-1].abs() * points.diff()).sum().item()


@dataclass(frozen=True)
class SpectralDensity:
    """The result of :func:`spectral_density`.

    ``nodes`` and ``weights`` (``[num_probes, lanczos_steps]``, float64, CPU): the Ritz values of each probe's
    Lanczos run and their quadrature weights (each row sums to 1; a probe whose Krylov space became
    invariant before ``lanczos_steps`` has fewer nodes, the rest padded with weight 0). ``grid`` and
    ``density``: the probe-averaged quadrature measure smoothed by a Gaussian of width ``sigma``, a
    density in ``t`` that integrates to 1 (multiply by ``num_params`` for an eigenvalue count per unit
    of ``t``). ``density_stderr``: its standard error over probes at each grid point (the spread of the
    per-probe densities / sqrt(num_probes); ``inf`` with one probe). It covers the randomness of the
    probes only, not the data the operator was built on, nor the smoothing.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    density_stderr: torch.Tensor
    sigma: float
    num_params: int
    num_products: int
    operator: str

    @property
    def num_probes(self) -> int:
        return self.nodes.shape[0]

    def moment(self, k: int) -> tuple[float, float]:
        """``(estimate, standard error)`` of ``(1/P) tr(A^k) = int t^k rho(t) dt``: per probe the quadrature
        ``sum_j tau_j theta_j^k`` (exact for the probe's ``v^T A^k v / ||v||^2`` while ``k < 2 lanczos_steps``),
        averaged over probes; the error is the spread over probes / sqrt(num_probes)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"SpectralDensity.moment: k must be an integer >= 0, got {k!r}")
        return _mean_and_stderr((self.weights * self.nodes.pow(k)).sum(1))

    def trace(self) -> tuple[float, float]:
        """``(estimate, standard error)`` of ``tr(A) = P * moment(1)``."""
        mean, stderr = self.moment(1)
        return self.num_params * mean, self.num_params * stderr

    def smoothed(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """The smoothed density on another ``grid`` (or with another ``sigma``), probe-averaged."""
        sigma = self.sigma if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"SpectralDensity.smoothed: sigma must be > 0, got {sigma!r}")
        return _gaussian_mixture(torch.as_tensor(grid, dtype=torch.float64), self.nodes, self.weights, sigma).mean(0)

    def wasserstein_to(self, eigenvalues) -> float:
        """1-Wasserstein distance between the probe-averaged quadrature measure and the uniform measure on
        ``eigenvalues`` (e.g. a dense ``eigvalsh``): how far the estimate is from the true spectrum."""
        return wasserstein_1(self.nodes, self.weights / self.num_probes, eigenvalues)

    def plot(self, path=None, ax=None, title: str | None = None):
        """A log-scale plot of the density with its ±2 standard-error band; written to ``path`` if given.
        Needs matplotlib (the ``[plot]`` extra). Returns the matplotlib Axes."""
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(6, 4))
        floor = max(self.density.max().item() * 1e-12, torch.finfo(torch.float64).tiny)
        density = self.density.clamp_min(floor)
        low = (self.density - 2 * self.density_stderr).clamp_min(floor)
        high = (self.density + 2 * self.density_stderr).clamp_min(floor)
        ax.fill_between(self.grid.numpy(), low.numpy(), high.numpy(), alpha=0.3, label="±2 standard errors (probes)")
        ax.plot(self.grid.numpy(), density.numpy(), label="density")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
        ax.set_title(title or f"{self.operator} spectral density (SLQ: {self.num_probes} probes, "
                              f"{self.nodes.shape[1]} Lanczos steps, sigma {self.sigma:.2g})")
        ax.legend(loc="upper right")
        if own and path is not None:
            fig.tight_layout()
            save_figure(fig, path, dpi=120)
            plt.close(fig)
        return ax


def _lanczos_tridiagonals(A, probes: torch.Tensor, steps: int, reorthogonalize: bool, bar):
    """Independent Lanczos runs from the columns of ``probes [P, R]`` (unit norm), all R advanced by one
    batched product per step. Returns ``alpha [R, steps]``, ``beta [R, steps]`` (float64, CPU;
    ``beta[r, j]`` couples steps j and j + 1) and each run's length (< ``steps`` where its Krylov space
    became invariant: the quadrature is then exact)."""
    P, R = probes.shape
    alpha = torch.zeros(R, steps, dtype=torch.float64)
    beta = torch.zeros(R, steps, dtype=torch.float64)
    length = torch.full((R,), steps, dtype=torch.long)
    basis = torch.empty(steps, P, R, dtype=A.dtype, device=A.device) if reorthogonalize else None
    q, q_previous = probes, torch.zeros_like(probes)
    previous_beta = torch.zeros(R, dtype=A.dtype, device=A.device)
    active = torch.ones(R, dtype=torch.bool)
    scale = torch.zeros(R, dtype=torch.float64)
    eps = torch.finfo(A.dtype).eps
    for j in range(steps):
        if basis is not None:
            basis[j] = q
        w = A.matmat(q)
        bar.update(1)
        a = (q * w).sum(0)
        w = w - a * q - previous_beta * q_previous
        if basis is not None:
            # Full reorthogonalization, twice (Gram-Schmidt twice is enough): without it rounding makes
            # copies of converged Ritz values ("ghosts") that take weight from their neighbours.
            V = basis[: j + 1]
            for _ in range(2):
                w = w - torch.einsum("jpr,jr->pr", V, torch.einsum("jpr,pr->jr", V, w))
        b = w.norm(dim=0)
        alpha[:, j] = a.double().cpu()
        beta[:, j] = b.double().cpu()
        scale = torch.maximum(scale, (a.double().cpu() ** 2 + beta[:, j] ** 2).sqrt())
        # A run whose residual is at rounding level has found an invariant subspace: it stops here.
        stopped = active & (beta[:, j] <= 100 * eps * scale.clamp_min(torch.finfo(torch.float64).tiny))
        length[stopped] = j + 1
        active &= ~stopped
        if not bool(active.any()):
            break
        safe = torch.where(active.to(b.device), b, torch.ones_like(b))
        q_previous, q = q, torch.where(active.to(b.device), w / safe, torch.zeros_like(w))
        previous_beta = torch.where(active.to(b.device), b, torch.zeros_like(b))
    return alpha, beta, length


def spectral_density(
    op,
    num_probes: int = 8,
    lanczos_steps: int = 64,
    *,
    sigma: float | None = None,
    grid_size: int = 1000,
    seed: int = 0,
    probe_batch_size: int = 8,
    reorthogonalize: bool = True,
    progress: bool | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral density of a symmetric operator.

    Args:
        op: a :class:`~fastcurv.curvature.Hessian`, :class:`~fastcurv.curvature.GGN`,
            :class:`~fastcurv.curvature.EmpiricalFisher`, any operator :func:`top_eigenvalues` accepts, or a
            square tensor.
        num_probes: random Rademacher probes (normalized); the density's standard error falls as
            ``1/sqrt(num_probes)``. PyHessian's default is 1.
        lanczos_steps: Lanczos steps (= quadrature nodes) per probe, at most ``P``; the quadrature
            integrates polynomials of degree ``< 2 lanczos_steps`` exactly, so more steps resolve finer
            detail. PyHessian's default is 100.
        sigma: width of the Gaussian that smooths the nodes into a density (default: 1% of the range of
            the nodes).
        grid_size: points of ``grid`` (from the smallest node - 5 sigma to the largest + 5 sigma).
        seed: seed of the probes (drawn on the CPU).
        probe_batch_size: probes advanced together (one product of that many columns per step); memory
            ``lanczos_steps * P * probe_batch_size`` for the kept basis.
        reorthogonalize: full reorthogonalization against the kept basis (default; False keeps no basis,
            so memory is ``O(P * probe_batch_size)``, but rounding then adds spurious copies of the extreme
            Ritz values).
        progress: tqdm bar (default: only when stderr is a terminal).

    Returns a :class:`SpectralDensity` (nodes and weights per probe, the smoothed density on a grid with its
    standard error over probes, moments and trace with standard errors). Cost: ``num_probes *
    lanczos_steps`` products, batched ``probe_batch_size`` columns at a time.
    """
    A = as_operator(op)
    P = A.num_params
    for name, value in (("num_probes", num_probes), ("lanczos_steps", lanczos_steps), ("grid_size", grid_size),
                        ("probe_batch_size", probe_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"spectral_density: {name} must be a positive integer, got {value!r}")
    if grid_size < 2:
        raise ValueError(f"spectral_density: grid_size must be >= 2, got {grid_size}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"spectral_density: sigma must be > 0, got {sigma!r}")
    steps = min(lanczos_steps, P)
    generator = torch.Generator().manual_seed(seed)
    probes = _rademacher(P, num_probes, A, generator) / math.sqrt(P)
    nodes = torch.zeros(num_probes, steps, dtype=torch.float64)
    weights = torch.zeros(num_probes, steps, dtype=torch.float64)
    products = 0
    with _progress_bar(math.ceil(num_probes / probe_batch_size) * steps, "spectral density (SLQ)", progress) as bar:
        for start in range(0, num_probes, probe_batch_size):
            chunk = probes[:, start:start + probe_batch_size]
            alpha, beta, length = _lanczos_tridiagonals(A, chunk, steps, reorthogonalize, bar)
            products += chunk.shape[1] * int(length.max())
            for r in range(chunk.shape[1]):
                m = int(length[r])
                T = torch.diag(alpha[r, :m])
                if m > 1:
                    T += torch.diag(beta[r, : m - 1], 1) + torch.diag(beta[r, : m - 1], -1)
                theta, S = torch.linalg.eigh(T)
                nodes[start + r, :m] = theta
                nodes[start + r, m:] = theta[0]  # padding: weight 0 at an existing node
                weights[start + r, :m] = S[0].square()
    if sigma is None:
        spread = (nodes.max() - nodes.min()).item()
        sigma = 0.01 * spread if spread > 0 else max(abs(nodes.max().item()), 1.0) * 1e-2
    grid = torch.linspace(nodes.min().item() - 5 * sigma, nodes.max().item() + 5 * sigma, grid_size, dtype=torch.float64)
    per_probe = _gaussian_mixture(grid, nodes, weights, sigma)
    stderr = per_probe.std(0, correction=1) / math.sqrt(num_probes) if num_probes > 1 else torch.full_like(grid, math.inf)
    return SpectralDensity(nodes=nodes, weights=weights, grid=grid, density=per_probe.mean(0), density_stderr=stderr,
                           sigma=float(sigma), num_params=P, num_products=products, operator=A.name)
