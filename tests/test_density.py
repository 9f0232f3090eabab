"""fastcurv.curvature.spectral_density (stochastic Lanczos quadrature) against dense eigendecompositions:
Gauss-quadrature exactness per probe, moments within their standard errors, the Wasserstein distance to the
dense spectrum for Hessian, GGN and EmpiricalFisher of a small model, and the plot."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastcurv.curvature import GGN, EmpiricalFisher, Hessian, spectral_density
from fastcurv.curvature.density import wasserstein_1
from fastcurv.curvature.estimators import _rademacher
from test_ggn import batches_for, tanh_mlp

DT = torch.float64


def matrix_with_spectrum(eigenvalues, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=DT))
    return U @ torch.diag(eigenvalues) @ U.T, U


def probes_of(A, num_probes, seed):
    """The probes spectral_density draws: Rademacher from ``seed`` on the CPU, unit norm."""
    P = A.shape[0]
    return _rademacher(P, num_probes, A, torch.Generator().manual_seed(seed)) / math.sqrt(P)


def test_each_probe_quadrature_is_exact_below_degree_twice_the_steps():
    A, _ = matrix_with_spectrum(torch.linspace(-1, 3, 30, dtype=DT) ** 3)
    steps = 6
    result = spectral_density(A, num_probes=5, lanczos_steps=steps, seed=3)
    V = probes_of(A, 5, seed=3)
    for k in range(2 * steps):
        exact = (V * (torch.linalg.matrix_power(A, k) @ V)).sum(0)
        quadrature = (result.weights * result.nodes.pow(k)).sum(1)
        torch.testing.assert_close(quadrature, exact, rtol=1e-9, atol=1e-9 * 27 ** k)


def test_full_steps_give_the_eigenvalues_weighted_by_the_probe_projections():
    eigenvalues = torch.linspace(-2, 5, 25, dtype=DT)
    A, U = matrix_with_spectrum(eigenvalues)
    result = spectral_density(A, num_probes=3, lanczos_steps=25, seed=1)
    V = probes_of(A, 3, seed=1)
    for r in range(3):
        torch.testing.assert_close(result.nodes[r], eigenvalues, rtol=0, atol=1e-10)
        torch.testing.assert_close(result.weights[r], (U.T @ V[:, r]).square(), rtol=0, atol=1e-10)


def test_a_low_rank_operator_stops_at_its_invariant_subspace_and_stays_exact():
    eigenvalues = torch.cat([torch.tensor([4.0, 2.0, 1.0], dtype=DT), torch.zeros(17, dtype=DT)])
    A, _ = matrix_with_spectrum(eigenvalues)
    result = spectral_density(A, num_probes=4, lanczos_steps=15)
    assert result.num_products == 4 * 4  # rank 3 + the null space: an invariant Krylov space after 4 steps
    torch.testing.assert_close(result.weights.sum(1), torch.ones(4, dtype=DT))
    V = probes_of(A, 4, seed=0)
    for k in range(1, 6):
        exact = (V * (torch.linalg.matrix_power(A, k) @ V)).sum(0)
        torch.testing.assert_close((result.weights * result.nodes.pow(k)).sum(1), exact, rtol=1e-9, atol=1e-12)


def operators():
    torch.manual_seed(0)
    model = tanh_mlp().eval()
    batches = batches_for(model, [24, 16])
    return {
        "Hessian": Hessian(model, F.cross_entropy, batches),
        "GGN": GGN(model, F.cross_entropy, batches),
        "EmpiricalFisher": EmpiricalFisher(model, F.cross_entropy, batches),
    }


@pytest.mark.parametrize("name", ["Hessian", "GGN", "EmpiricalFisher"])
def test_density_of_curvature_operators_matches_their_dense_spectrum(name):
    op = operators()[name]
    dense = op.to_dense()
    eigenvalues = torch.linalg.eigvalsh((dense + dense.T) / 2)
    P = op.num_params
    result = spectral_density(op, num_probes=16, lanczos_steps=20, probe_batch_size=16, seed=2)
    for k in (1, 2, 3):
        estimate, stderr = result.moment(k)
        assert abs(estimate - eigenvalues.pow(k).mean().item()) < 4 * stderr + 1e-12, k
    estimate, stderr = result.trace()
    assert abs(estimate - eigenvalues.sum().item()) < 4 * stderr + 1e-12
    # The probe-averaged quadrature measure is close to the uniform measure on the eigenvalues: its distance
    # is a small fraction of the spectrum's width (16 probes).
    width = (eigenvalues.max() - eigenvalues.min()).item()
    distance = result.wasserstein_to(eigenvalues)
    assert distance < 0.03 * width, (distance, width)
    mass = (result.density[:-1] * result.grid.diff()).sum().item()
    assert mass == pytest.approx(1.0, abs=1e-6)
    assert bool((result.density_stderr >= 0).all()) and result.density_stderr.max() > 0 and P == result.num_params


def test_wasserstein_1_of_known_measures():
    assert wasserstein_1([0.0], [1.0], [1.0]) == pytest.approx(1.0)
    assert wasserstein_1([0.0, 1.0], [0.5, 0.5], [0.0, 1.0]) == pytest.approx(0.0)
    assert wasserstein_1([0.0, 2.0], [0.5, 0.5], [1.0]) == pytest.approx(1.0)


def test_density_plot_is_written_and_bad_arguments_are_refused(tmp_path):
    pytest.importorskip("matplotlib")
    A, _ = matrix_with_spectrum(torch.linspace(0, 1, 10, dtype=DT))
    result = spectral_density(A, num_probes=2, lanczos_steps=5)
    path = tmp_path / "density.png"
    ax = result.plot(path)
    assert path.stat().st_size > 1000 and ax.get_yscale() == "log" and "eigenvalue" in ax.get_xlabel()
    for bad in ({"num_probes": 0}, {"lanczos_steps": 1.5}, {"sigma": -1.0}, {"grid_size": 1}):
        with pytest.raises(ValueError):
            spectral_density(A, **bad)
    with pytest.raises(ValueError, match="k must be"):
        result.moment(-1)
    assert math.isinf(spectral_density(A, num_probes=1, lanczos_steps=3).moment(1)[1])
