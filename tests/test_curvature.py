"""fastcurv.curvature: Hessian / EmpiricalFisher products against explicit float64 matrices, the eigen-solvers
against torch.linalg.eigh, the trace / Frobenius estimators against exact values, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

from fastcurv.curvature import (
    ConvergenceWarning,
    EmpiricalFisher,
    Hessian,
    frobenius_sq,
    quadratic_form,
    spectral_radius,
    top_eigenvalues,
    trace,
)

DT = torch.float64


# ------------------------------------------------------------------------------------------ models
def tanh_mlp(device):
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(device, DT)


def small_cnn(device):
    """Conv -> eval BatchNorm -> tanh -> conv -> linear; the BatchNorm has non-trivial running stats."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
        nn.Conv2d(3, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3),
    ).to(device, DT)
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return model.eval()


def inputs_for(model, n, device):
    shape = (n, 4) if isinstance(model[0], nn.Linear) else (n, 2, 6, 6)
    return torch.randn(shape, dtype=DT, device=device), torch.randint(0, 3, (n,), device=device)


MODELS = {"tanh_mlp": tanh_mlp, "small_cnn": small_cnn}


def flat_params(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def unflatten(flat, params):
    out, offset = [], 0
    for p in params:
        out.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def explicit_hessian(model, loss_fn, batches):
    """Hessian of (1/N) sum_i l_i over all batches (loss_fn a batch mean), by torch.func.hessian."""
    names, params = flat_params(model)
    N = sum(len(x) for x, _ in batches)

    def mean_loss(flat):
        ps = dict(zip(names, unflatten(flat, params)))
        return sum(len(x) / N * loss_fn(functional_call(model, ps, (x,)), y) for x, y in batches)

    return hessian(mean_loss)(torch.cat([p.detach().reshape(-1) for p in params]))


def explicit_empirical_fisher(model, batches, per_example_loss):
    """(1/N) sum_i g_i g_i^T from torch.func per-sample gradients."""
    names, params = flat_params(model)
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_one(flat, x, y):
        out = functional_call(model, dict(zip(names, unflatten(flat, params))), (x[None],))
        return per_example_loss(out, y[None])

    rows = torch.cat([vmap(grad(loss_one), in_dims=(None, 0, 0))(flat0, x, y) for x, y in batches])
    return rows.T @ rows / rows.shape[0]


# ------------------------------------------------------------------------------------- Hessian @ V
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("K", [1, 3, 17])
def test_hessian_matmat_matches_explicit(model_name, method, K, device):
    model = MODELS[model_name](device)
    x, y = inputs_for(model, 7, device)
    H = Hessian(model, F.cross_entropy, (x, y), method=method)
    dense = explicit_hessian(model, F.cross_entropy, [(x, y)])
    assert H.num_params == dense.shape[0] == sum(p.numel() for p in model.parameters())
    assert H.dtype == DT and H.device == torch.device(device) and H.shape == dense.shape
    V = torch.randn(H.num_params, K, dtype=DT, device=device)
    torch.testing.assert_close(H @ V, dense @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H.matmat(V), dense @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H @ V[:, 0], dense @ V[:, 0], rtol=1e-10, atol=1e-12)


def test_hessian_unequal_batches_is_hessian_of_the_mean(device):
    model = tanh_mlp(device)
    sizes = [5, 3, 9, 1]
    batches = [inputs_for(model, n, device) for n in sizes]
    x_all, y_all = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    dense = explicit_hessian(model, F.cross_entropy, [(x_all, y_all)])
    V = torch.randn(dense.shape[0], 4, dtype=DT, device=device)
    expected = dense @ V
    # A list, a generator (read once into a list) and a batch of zero examples, which is skipped.
    empty = (x_all[:0], y_all[:0])
    for data in (batches, iter(batches), (b for b in batches + [empty])):
        H = Hessian(model, F.cross_entropy, data)
        torch.testing.assert_close(H @ V, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(H @ V, expected, rtol=1e-10, atol=1e-12)  # data is reusable
    # A loss that sums over its batch needs loss_reduction="sum" for the same matrix.
    sum_ce = lambda out, target: F.cross_entropy(out, target, reduction="sum")  # noqa: E731
    H_sum = Hessian(model, sum_ce, batches, loss_reduction="sum")
    torch.testing.assert_close(H_sum @ V, expected, rtol=1e-10, atol=1e-12)


def test_hessian_with_params_subset_and_unused_parameter():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tanh_mlp("cpu")
            self.unused = nn.Linear(2, 2).to(DT)  # never called: its Hessian block is zero

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    x, y = inputs_for(model.net, 6, "cpu")
    H_all = Hessian(model, F.cross_entropy, (x, y))
    P_used = sum(p.numel() for p in model.net.parameters())
    assert H_all.num_params == P_used + 6
    dense = H_all.to_dense()
    torch.testing.assert_close(dense[:P_used, :P_used], explicit_hessian(model.net, F.cross_entropy, [(x, y)]))
    assert dense[P_used:].abs().max() == 0 and dense[:, P_used:].abs().max() == 0
    last = list(model.net[4].parameters())
    H_last = Hessian(model, F.cross_entropy, (x, y), params=last)
    offset = P_used - sum(p.numel() for p in last)
    torch.testing.assert_close(H_last.to_dense(), dense[offset:P_used, offset:P_used])


# ------------------------------------------------------------------------------- EmpiricalFisher @ V
def _mean_ce(out, target):
    return F.cross_entropy(out, target)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("K", [1, 3, 17])
def test_empirical_fisher_matmat_matches_per_sample_gradients(model_name, K, device):
    model = MODELS[model_name](device)
    batches = [inputs_for(model, n, device) for n in (5, 2, 6)]
    dense = explicit_empirical_fisher(model, batches, F.cross_entropy)
    V = torch.randn(dense.shape[0], K, dtype=DT, device=device)
    for loss_fn, cache in ((F.cross_entropy, False), (nn.CrossEntropyLoss(), True)):
        Fisher = EmpiricalFisher(model, loss_fn, batches, cache=cache)
        assert Fisher.num_params == dense.shape[0] and Fisher.dtype == DT
        for _ in range(2):  # the second product comes from the cache when cache=True
            result = Fisher @ V
            assert not result.requires_grad
            torch.testing.assert_close(result, dense @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Fisher @ V[:, 0], dense @ V[:, 0], rtol=1e-10, atol=1e-12)


def test_empirical_fisher_per_example_loss_is_the_mean_over_outputs():
    model = tanh_mlp("cpu")
    x = torch.randn(6, 4, dtype=DT)
    target = torch.randn(6, 3, dtype=DT)
    # l_i = mean_j (f_ij - t_ij)^2: what F.mse_loss gives for example i alone.
    dense = explicit_empirical_fisher(model, [(x, target)], F.mse_loss)
    V = torch.randn(dense.shape[0], 2, dtype=DT)
    torch.testing.assert_close(EmpiricalFisher(model, F.mse_loss, (x, target)) @ V, dense @ V)
    torch.testing.assert_close(EmpiricalFisher(model, nn.MSELoss(reduction="sum"), (x, target)) @ V, dense @ V)


def test_empirical_fisher_params_subset():
    model = tanh_mlp("cpu")
    x, y = inputs_for(model, 7, "cpu")
    dense = explicit_empirical_fisher(model, [(x, y)], F.cross_entropy)
    first = list(model[0].parameters())
    n_first = sum(p.numel() for p in first)
    V = torch.randn(n_first, 3, dtype=DT)
    torch.testing.assert_close(EmpiricalFisher(model, F.cross_entropy, (x, y), params=first) @ V,
                               dense[:n_first, :n_first] @ V)


def test_empirical_fisher_bad_input():
    model = tanh_mlp("cpu")
    x, y = inputs_for(model, 4, "cpu")
    with pytest.raises(TypeError, match="needs per-example losses: loss_fn must take a `reduction` keyword"):
        EmpiricalFisher(model, _mean_ce, (x, y))

    with pytest.raises(RuntimeError, match="BatchNorm2d"):
        EmpiricalFisher(small_cnn("cpu").train(), F.cross_entropy, inputs_for(small_cnn("cpu"), 4, "cpu"))
    with pytest.raises(ValueError, match="data is empty"):
        EmpiricalFisher(model, F.cross_entropy, [])


# ------------------------------------------------------------------------------------- eigen-solvers
def _reference_top(dense, k, which):
    evals, evecs = torch.linalg.eigh(dense)
    order = torch.argsort(evals.abs() if which == "LM" else evals, descending=True)[:k]
    return evals[order], evecs[:, order]


def _indefinite_loss(out, target):
    # Strongly negative curvature in some directions, so "LM" and "LA" pick different eigenvalues.
    return F.cross_entropy(out, target) - 3.0 * out.square().mean()


SOLVERS = ["lanczos", "block_lanczos", "power"]


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("which", ["LM", "LA"])
def test_top_eigenvalues_match_eigh(model_name, method, which, device):
    model = MODELS[model_name](device)
    x, y = inputs_for(model, 8, device)
    H = Hessian(model, _indefinite_loss, (x, y))
    dense = explicit_hessian(model, _indefinite_loss, [(x, y)])
    k = 3
    ref_vals, ref_vecs = _reference_top(dense, k, which)
    if which == "LA":  # the test must be able to tell LM from LA apart
        assert not torch.allclose(ref_vals, _reference_top(dense, k, "LM")[0])
    vals, vecs = top_eigenvalues(H, k=k, which=which, method=method, tol=1e-9, max_iter=3000)
    assert vals.shape == (k,) and vecs.shape == (H.num_params, k)
    assert vals.dtype == DT and vals.device == torch.device(device)
    scale = dense.abs().max()
    torch.testing.assert_close(vals, ref_vals, rtol=0, atol=1e-8 * scale)
    # Eigenvectors up to sign (eigenvalues are simple here), orthonormal, and satisfy H v = lambda v.
    overlaps = (vecs.T @ ref_vecs).diagonal().abs()
    torch.testing.assert_close(overlaps, torch.ones_like(overlaps), rtol=0, atol=1e-6)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=DT, device=device), rtol=0, atol=1e-10)
    torch.testing.assert_close(dense @ vecs, vecs * vals, rtol=0, atol=1e-7 * scale)


@pytest.mark.parametrize("method", SOLVERS)
def test_top_eigenvalues_of_a_matrix_with_known_spectrum(method):
    P = 40
    Q = torch.linalg.qr(torch.randn(P, P, dtype=DT)).Q
    spectrum = torch.linspace(-1.0, 0.5, P, dtype=DT)
    spectrum[:4] = torch.tensor([-9.0, 7.0, -5.0, 2.0], dtype=DT)
    A = Q @ torch.diag(spectrum) @ Q.T
    vals, _ = top_eigenvalues(A, k=3, which="LM", method=method, tol=1e-10)
    torch.testing.assert_close(vals, torch.tensor([-9.0, 7.0, -5.0], dtype=DT), rtol=0, atol=1e-8)
    vals, _ = top_eigenvalues(A, k=2, which="LA", method=method, tol=1e-10)
    torch.testing.assert_close(vals, torch.tensor([7.0, 2.0], dtype=DT), rtol=0, atol=1e-8)
    assert spectral_radius(A, method=method, tol=1e-10) == pytest.approx(9.0, abs=1e-8)


@pytest.mark.parametrize("method", ["block_lanczos", "power"])
def test_block_solvers_find_a_repeated_eigenvalue(method):
    P = 30
    Q = torch.linalg.qr(torch.randn(P, P, dtype=DT)).Q
    spectrum = torch.rand(P, dtype=DT)
    spectrum[:2] = 4.0
    vals, vecs = top_eigenvalues(Q @ torch.diag(spectrum) @ Q.T, k=2, method=method, tol=1e-10)
    torch.testing.assert_close(vals, torch.tensor([4.0, 4.0], dtype=DT))


@pytest.mark.parametrize("P", [1, 3, 17, 40])
@pytest.mark.parametrize("which", ["LM", "LA"])
@pytest.mark.parametrize("method", ["lanczos", "block_lanczos"])
def test_lanczos_solvers_on_odd_sizes_k_from_1_to_P(P, which, method):
    """k = 1, k = P - 1 and k = P, block sizes that do not divide P, against float64 eigh."""
    g = torch.Generator().manual_seed(P)
    A = torch.randn(P, P, dtype=DT, generator=g)
    A = A + A.T
    eigenvalues = torch.linalg.eigvalsh(A)
    reference = eigenvalues[eigenvalues.abs().argsort(descending=True)] if which == "LM" else eigenvalues.flip(0)
    for k in sorted({1, max(P - 1, 1), P}):
        for block_size in ([None] if method == "lanczos" else sorted({1, min(2, P), min(5, P), P})):
            vals, vecs, info = top_eigenvalues(A, k=k, which=which, method=method, block_size=block_size,
                                               tol=1e-10, return_info=True)
            torch.testing.assert_close(vals, reference[:k], rtol=0, atol=1e-9 * eigenvalues.abs().max())
            torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=DT), rtol=0, atol=1e-9)
            torch.testing.assert_close(A @ vecs, vecs * vals, rtol=0, atol=1e-8 * eigenvalues.abs().max())
            assert info.converged and info.num_products <= P and len(info.residuals) == k


@pytest.mark.parametrize("method, block_size, spectrum, expected", [
    # 3 distinct eigenvalues, k = 4: single-vector Lanczos exhausts its Krylov space after 3 steps.
    ("lanczos", None, [5.0, 2.0] + [1.0] * 11, [5.0, 2.0, 1.0, 1.0]),
    # Blocks of 2 and 4 see both copies of the repeated eigenvalue 2.
    ("block_lanczos", 2, [5.0] + [2.0] * 6 + [1.0] * 6, [5.0, 2.0, 2.0]),
    ("block_lanczos", 4, [5.0] + [2.0] * 6 + [1.0] * 6, [5.0, 2.0, 2.0]),
])
def test_lanczos_restarts_after_an_invariant_subspace(method, block_size, spectrum, expected):
    """Few distinct eigenvalues: the Krylov space of the start block becomes invariant after a few steps
    (W = 0). The solver must continue from fresh random directions with zero coupling, orthogonal to the
    basis, instead of dividing by zero or stopping short."""
    P = len(spectrum)
    Q = torch.linalg.qr(torch.randn(P, P, dtype=DT, generator=torch.Generator().manual_seed(1))).Q
    A = Q @ torch.diag(torch.tensor(spectrum, dtype=DT)) @ Q.T
    k = len(expected)
    vals, vecs, info = top_eigenvalues(A, k=k, method=method, block_size=block_size, tol=1e-10, return_info=True)
    torch.testing.assert_close(vals, torch.tensor(expected, dtype=DT))
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=DT), rtol=0, atol=1e-9)
    torch.testing.assert_close(A @ vecs, vecs * vals, rtol=0, atol=1e-9)
    assert info.converged and info.num_products < P  # found before the basis filled the space


def test_convergence_info_reports_residuals_and_products():
    g = torch.Generator().manual_seed(0)
    P = 60
    Q = torch.linalg.qr(torch.randn(P, P, dtype=DT, generator=g)).Q
    spectrum = torch.linspace(0.0, 1.0, P, dtype=DT)
    spectrum[-3:] = torch.tensor([3.0, 4.0, 5.0], dtype=DT)
    A = Q @ torch.diag(spectrum) @ Q.T

    class Counting:
        num_params, dtype, device = P, DT, torch.device("cpu")
        products = 0

        def matmat(self, V):
            self.products += V.shape[1]
            return A @ V

    for method in SOLVERS:
        op = Counting()
        vals, vecs, info = top_eigenvalues(op, k=2, method=method, tol=1e-6, return_info=True)
        assert info.method == method and info.converged
        assert info.num_products == op.products  # every column multiplied is counted
        true_residuals = (A @ vecs - vecs * vals).norm(dim=0) / 5.0
        assert max(info.residuals) <= 1e-6
        torch.testing.assert_close(torch.tensor(info.residuals, dtype=DT), true_residuals, rtol=1e-2, atol=1e-12)
    # Not converged: reported, and warned.
    with pytest.warns(ConvergenceWarning):
        _, _, info = top_eigenvalues(A, k=2, method="block_lanczos", block_size=2, max_iter=4, tol=1e-12,
                                     return_info=True)
    assert not info.converged and info.num_products == 4 and max(info.residuals) > 1e-12


def test_lanczos_full_krylov_space_is_exact_and_k_equals_P():
    A = torch.randn(12, 12, dtype=DT)
    A = A + A.T
    vals, vecs = top_eigenvalues(A, k=12, which="LA", method="lanczos", tol=1e-12)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A).flip(0))
    torch.testing.assert_close(vecs.T @ A @ vecs, torch.diag(vals), rtol=0, atol=1e-10)


def test_solvers_are_deterministic_given_seed():
    A = torch.randn(25, 25, dtype=DT)
    A = A @ A.T
    a = top_eigenvalues(A, k=2, method="power", seed=3, tol=1e-3)
    b = top_eigenvalues(A, k=2, method="power", seed=3, tol=1e-3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert trace(A, 5, seed=1) == trace(A, 5, seed=1) != trace(A, 5, seed=2)


def test_not_converged_warns():
    A = torch.diag(torch.linspace(1.0, 1.001, 50, dtype=DT))  # tiny gaps: slow convergence
    with pytest.warns(ConvergenceWarning, match="not converged"):
        top_eigenvalues(A, k=1, method="power", max_iter=2, tol=1e-12)
    with pytest.warns(ConvergenceWarning, match="not converged"):
        top_eigenvalues(A, k=1, method="lanczos", max_iter=3, tol=1e-12)
    with pytest.warns(ConvergenceWarning, match="not converged"):
        top_eigenvalues(A, k=1, method="block_lanczos", max_iter=6, tol=1e-12)


def test_eigen_solver_on_float32_hessian():
    model = tanh_mlp("cpu").float()
    x, y = inputs_for(model, 10, "cpu")
    H = Hessian(model, F.cross_entropy, (x.float(), y))
    dense = explicit_hessian(model.double(), F.cross_entropy, [(x, y)])
    model.float()
    vals, vecs = top_eigenvalues(H, k=2, tol=1e-4)
    assert vals.dtype == torch.float32
    torch.testing.assert_close(vals.double(), _reference_top(dense, 2, "LM")[0], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- estimators
@pytest.fixture
def mlp_hessian():
    model = tanh_mlp("cpu")
    x, y = inputs_for(model, 12, "cpu")
    return Hessian(model, F.cross_entropy, (x, y)), explicit_hessian(model, F.cross_entropy, [(x, y)])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_four_standard_errors(mlp_hessian, method, seed):
    H, dense = mlp_hessian
    exact = dense.trace().item()
    estimate, stderr = trace(H, num_probes=30, method=method, seed=seed, return_stderr=True)
    assert 0 < stderr < abs(exact)  # a bound that means something
    assert abs(estimate - exact) <= 4 * stderr


def test_hutchinson_standard_error_matches_theory(mlp_hessian):
    H, dense = mlp_hessian
    m = 40
    theory = ((2 * (dense.square().sum() - dense.diagonal().square().sum())) / m).sqrt().item()
    _, stderr = trace(H, num_probes=m, return_stderr=True, probe_batch_size=7)
    assert 0.5 * theory < stderr < 2 * theory


def test_hutchpp_is_exact_with_num_probes_at_least_P(mlp_hessian):
    H, dense = mlp_hessian
    estimate, stderr = trace(H, num_probes=H.num_params, method="hutch++", return_stderr=True)
    assert estimate == pytest.approx(dense.trace().item(), rel=1e-10) and stderr == 0.0


def test_hutchpp_is_exact_for_low_rank_with_sketch_covering_the_range():
    U = torch.randn(60, 4, dtype=DT)
    A = U @ torch.diag(torch.tensor([5.0, -2.0, 1.0, 3.0], dtype=DT)) @ U.T
    assert trace(A, num_probes=15, method="hutch++") == pytest.approx(A.trace().item(), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_frobenius_sq_within_four_standard_errors(mlp_hessian, seed):
    H, dense = mlp_hessian
    exact = dense.square().sum().item()
    estimate, stderr = frobenius_sq(H, num_probes=30, seed=seed, return_stderr=True)
    assert 0 < stderr < exact
    assert abs(estimate - exact) <= 4 * stderr


def test_quadratic_form(mlp_hessian):
    H, dense = mlp_hessian
    V = torch.randn(H.num_params, 3, dtype=DT)
    torch.testing.assert_close(quadratic_form(H, V), (V * (dense @ V)).sum(0))
    torch.testing.assert_close(quadratic_form(H, V[:, 1]), V[:, 1] @ dense @ V[:, 1])


# ------------------------------------------------------------------------------------- bad input
def test_bad_vectors_give_clear_errors(mlp_hessian):
    H, _ = mlp_hessian
    P = H.num_params
    with pytest.raises(ValueError, match=rf"expected V of shape \[{P}\] or \[{P}, K\].*got \({P + 1}, 2\)"):
        H @ torch.zeros(P + 1, 2, dtype=DT)
    with pytest.raises(ValueError, match="expected V of shape"):
        H @ torch.zeros(P, 2, 1, dtype=DT)
    with pytest.raises(TypeError, match="V has dtype torch.float32, the parameters have torch.float64"):
        H @ torch.zeros(P, 2)
    with pytest.raises(ValueError, match="V is on meta, the parameters are on cpu"):
        H @ torch.zeros(P, 2, dtype=DT, device="meta")
    with pytest.raises(ValueError, match="K = 0 columns"):
        H @ torch.zeros(P, 0, dtype=DT)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        H @ [0.0] * P


def test_bad_solver_arguments(mlp_hessian):
    H, _ = mlp_hessian
    P = H.num_params
    for k in (0, -1, P + 1, 1.5):
        with pytest.raises(ValueError, match=rf"k must be an integer in \[1, P = {P}\]"):
            top_eigenvalues(H, k=k)
    with pytest.raises(ValueError, match="which must be one of"):
        top_eigenvalues(H, which="SM")
    with pytest.raises(ValueError, match="method must be one of"):
        top_eigenvalues(H, method="arnoldi")
    with pytest.raises(ValueError, match="block_size must be in"):
        top_eigenvalues(H, k=3, method="power", block_size=2)
    for bad in (0, P + 1, 2.0):
        with pytest.raises(ValueError, match=rf"block_size must be in \[1, P = {P}\] for method='block_lanczos'"):
            top_eigenvalues(H, k=1, method="block_lanczos", block_size=bad)
    with pytest.raises(ValueError, match="block_size applies to method='power' or 'block_lanczos' only"):
        top_eigenvalues(H, k=1, method="lanczos", block_size=2)
    with pytest.raises(ValueError, match="num_probes must be a positive integer"):
        trace(H, num_probes=0)
    with pytest.raises(ValueError, match="needs num_probes >= 3"):
        trace(H, num_probes=2, method="hutch++")
    with pytest.raises(TypeError, match="expected a curvature operator"):
        trace(object())
    with pytest.raises(ValueError, match="must be square"):
        trace(torch.zeros(3, 4))


def test_bad_data_and_models():
    model = tanh_mlp("cpu")
    x, y = inputs_for(model, 4, "cpu")
    P = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="data is empty"):
        Hessian(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="data holds no examples"):
        Hessian(model, F.cross_entropy, iter([(x[:0], y[:0])])) @ torch.zeros(P, dtype=DT)
    with pytest.raises(TypeError, match=r"batch 0 must be an \(x, y\) pair"):
        Hessian(model, F.cross_entropy, [x]) @ torch.zeros(P, dtype=DT)
    with pytest.raises(ValueError, match="loss_fn must return the scalar loss of a batch, got \\(4,\\)"):
        no_reduce = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
        Hessian(model, no_reduce, (x, y)) @ torch.zeros(P, dtype=DT)
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        Hessian(model, F.cross_entropy, (x, y), params=[nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="loss_reduction must be"):
        Hessian(model, F.cross_entropy, (x, y), loss_reduction="batchmean")
    frozen = tanh_mlp("cpu").requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        Hessian(frozen, F.cross_entropy, (x, y))


def test_train_mode_batchnorm_and_dropout_are_refused():
    cnn = small_cnn("cpu").train()
    x, y = inputs_for(cnn, 4, "cpu")
    with pytest.raises(RuntimeError, match=r"module '1' \(BatchNorm2d\) is in train mode.*model.eval\(\).*allow_train_mode=True"):
        Hessian(cnn, F.cross_entropy, (x, y))
    dropout_mlp = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).to(DT)
    xm, ym = inputs_for(tanh_mlp("cpu"), 4, "cpu")
    with pytest.raises(RuntimeError, match=r"'1' \(Dropout\) is in train mode and draws a new random mask"):
        Hessian(dropout_mlp, F.cross_entropy, (xm, ym))
    # Explicit opt-in: accepted, and for p = 0 dropout it is still the exact Hessian.
    no_drop = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.0)).to(DT)
    H = Hessian(no_drop, F.cross_entropy, (xm, ym))
    Hessian(dropout_mlp, F.cross_entropy, (xm, ym), allow_train_mode=True)
    torch.testing.assert_close(H.to_dense(), explicit_hessian(no_drop, F.cross_entropy, [(xm, ym)]))


def test_hessian_cached_graph_matches_and_follows_parameter_updates():
    """The cached create_graph gradient gives the same products, and is rebuilt after an in-place update."""
    model = tanh_mlp("cpu")
    x, y = inputs_for(model, 8, "cpu")
    H = Hessian(model, F.cross_entropy, (x, y))
    assert H.cache_graph  # one batch: cached by default
    V = torch.randn(H.num_params, 3, dtype=DT)
    torch.testing.assert_close(H @ V, explicit_hessian(model, F.cross_entropy, [(x, y)]) @ V)
    torch.testing.assert_close(H @ V, Hessian(model, F.cross_entropy, (x, y), cache_graph=False) @ V)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # in place: bumps the version counters the cache checks
    torch.testing.assert_close(H @ V, explicit_hessian(model, F.cross_entropy, [(x, y)]) @ V)


# ------------------------------------------------------------------- stale caches (Hessian, Fisher)
def _change_parameters(model, how):
    """Every way a user changes parameters; the cached products must follow all of them."""
    params = list(model.parameters())
    if how == "optimizer_step":
        for p in params:
            p.grad = torch.randn_like(p)
        torch.optim.SGD(params, lr=0.5).step()
    elif how == "data_assignment":
        for p in params:
            p.data = p.data * 1.5 + 0.1
    elif how == "data_inplace":
        for p in params:
            p.data.add_(0.3 * torch.randn_like(p))  # .data has its own version counter: p._version is unchanged
    elif how == "single_element_data":
        params[0].data[0, 0] += 0.7
    else:
        raise AssertionError(how)


UPDATES = ["optimizer_step", "data_assignment", "data_inplace", "single_element_data"]


@pytest.mark.parametrize("how", UPDATES)
def test_hessian_cache_follows_every_kind_of_parameter_change(how):
    model = tanh_mlp("cpu")
    x, y = inputs_for(model, 8, "cpu")
    H = Hessian(model, F.cross_entropy, (x, y))
    V = torch.randn(H.num_params, 3, dtype=DT)
    H @ V  # fills the cache
    _change_parameters(model, how)
    torch.testing.assert_close(H @ V, explicit_hessian(model, F.cross_entropy, [(x, y)]) @ V)
    torch.testing.assert_close(H @ V, explicit_hessian(model, F.cross_entropy, [(x, y)]) @ V)  # rebuilt cache reused


@pytest.mark.parametrize("how", UPDATES)
def test_empirical_fisher_cache_follows_every_kind_of_parameter_change(how):
    model = tanh_mlp("cpu")
    batches = [inputs_for(model, n, "cpu") for n in (5, 3)]
    Fisher = EmpiricalFisher(model, F.cross_entropy, batches, cache=True)
    V = torch.randn(Fisher.num_params, 2, dtype=DT)
    torch.testing.assert_close(Fisher @ V, explicit_empirical_fisher(model, batches, F.cross_entropy) @ V)
    _change_parameters(model, how)
    expected = explicit_empirical_fisher(model, batches, F.cross_entropy) @ V
    torch.testing.assert_close(Fisher @ V, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Fisher @ V, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partial_reorthogonalization_leaves_no_ghost_eigenvalues(dtype, monkeypatch):
    """Plain Lanczos loses orthogonality once the dominant Ritz value converges and then returns copies
    ("ghosts") of it. The omega recurrence must trigger enough full passes to prevent that (and skip
    the others)."""
    import fastcurv.curvature.eigen as eigen

    decisions = []
    original = eigen._OrthogonalityEstimate.next

    def record(self, *args):
        decisions.append(original(self, *args))
        return decisions[-1]

    monkeypatch.setattr(eigen._OrthogonalityEstimate, "next", record)
    g = torch.Generator().manual_seed(0)
    P = 400
    spectrum = torch.cat([torch.tensor([100.0, 1.1, 1.05]), torch.rand(P - 3, generator=g, dtype=DT)])
    Q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT)).Q
    A = ((Q * spectrum) @ Q.T).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    vals, vecs, info = top_eigenvalues(A, k=3, tol=tol, max_iter=P, return_info=True)
    assert info.converged
    torch.testing.assert_close(vals.double(), torch.tensor([100.0, 1.1, 1.05], dtype=DT), rtol=0, atol=20 * tol * 100)
    atol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(3, dtype=dtype), rtol=0, atol=atol)
    assert any(decisions) and not all(decisions), decisions  # some full passes, not all
