"""fastcurv.metrics against explicit float64 computations: torch.func per-sample gradients and
Jacobians, explicit Hessians, and slogdet of an explicit Gram matrix."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from fastcurv import metrics

DT = torch.float64


def tanh_mlp(device="cpu", d_in=4, hidden=6, classes=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(device, DT)


def small_cnn(device="cpu"):
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)
    ).to(device, DT)
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def per_sample_grads(model, x, y):
    """[N, P] per-example gradients of the cross-entropy, by torch.func."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(ps, xi, yi):
        return F.cross_entropy(functional_call(model, ps, (xi[None],)), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], 1)


def explicit_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def loss(flat):
        ps = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, ps, (x,)), y)

    return hessian(loss)(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


# ----------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("make", [tanh_mlp, small_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_robustness_matches_per_example_jacobians(make, batch_size, device):
    model = make(device)
    x = torch.randn((7, 4) if make is tanh_mlp else (7, 2, 5, 5), dtype=DT, device=device)
    jac = vmap(jacrev(lambda xi: model(xi[None])[0]))(x)  # [N, C, *x.shape[1:]]
    expected = jac.square().sum().item() / x.shape[0]
    assert metrics.robustness(model, x, batch_size=batch_size) == pytest.approx(expected, rel=1e-12)


def test_robustness_refuses_train_mode_dropout_and_bad_input():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.2)).to(DT)
    with pytest.raises(RuntimeError, match=r"robustness: module '1' \(Dropout\) is in train mode"):
        metrics.robustness(model, torch.randn(5, 4, dtype=DT))
    with pytest.raises(ValueError, match="non-empty batch dimension"):
        metrics.robustness(model.eval(), torch.randn(0, 4, dtype=DT))
    with pytest.raises(TypeError, match="must be floating point"):
        metrics.robustness(nn.Embedding(5, 3).to(DT), torch.tensor([[1, 2]]))


# ----------------------------------------------------------------------------------- Hessian metrics
def test_hessian_metrics_match_explicit_hessian():
    model = tanh_mlp()
    x, y = torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,))
    dense = explicit_hessian(model, x, y)
    evals = torch.linalg.eigvalsh(dense)
    rho = evals.abs().max().item()
    assert metrics.spectral_radius(model, F.cross_entropy, (x, y), tol=1e-10) == pytest.approx(rho, rel=1e-8)
    assert metrics.top_hessian_eigenvalue(model, F.cross_entropy, (x, y), tol=1e-10) == pytest.approx(
        evals.max().item(), rel=1e-8)
    exact = dense.square().sum().item()
    estimate, stderr = metrics.hessian_frobenius(model, F.cross_entropy, (x, y), num_probes=40, return_stderr=True)
    assert 0 < stderr < exact and abs(estimate - exact) <= 4 * stderr
    # Batches of unequal size give the same matrix as one batch.
    split = [(x[:3], y[:3]), (x[3:], y[3:])]
    assert metrics.spectral_radius(model, F.cross_entropy, split, tol=1e-10) == pytest.approx(rho, rel=1e-8)


# ----------------------------------------------------------------------------------- Fisher metrics
def test_fisher_trace_matches_per_sample_gradients(device):
    model = tanh_mlp(device)
    x, y = torch.randn(9, 4, dtype=DT, device=device), torch.randint(0, 3, (9,), device=device)
    expected = per_sample_grads(model, x, y).square().sum(1).mean().item()
    assert metrics.fisher_trace(model, x, y) == pytest.approx(expected, rel=1e-10)
    assert metrics.fisher_trace(model, x, y, batch_size=4) == pytest.approx(expected, rel=1e-10)


def _expected_logdet(model, x, labels, subset_size, trials, seed, jitter=0.0):
    J = per_sample_grads(model, x, labels)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(trials):
        idx = torch.randperm(x.shape[0], generator=g)[:subset_size]
        G = J[idx.to(J.device)] @ J[idx.to(J.device)].T
        G = G + jitter * G.diagonal().mean() * torch.eye(subset_size, dtype=DT, device=G.device)
        sign, logabsdet = torch.linalg.slogdet(G)
        assert sign > 0
        total += logabsdet.item()
    return total / trials


@pytest.mark.parametrize("make", [tanh_mlp, small_cnn], ids=["mlp", "cnn"])
def test_fisher_logdet_matches_explicit_gram(make, device):
    model = make(device)
    n = 20
    x = torch.randn((n, 4) if make is tanh_mlp else (n, 2, 5, 5), dtype=DT, device=device)
    y = torch.randint(0, 3, (n,), device=device)
    expected = _expected_logdet(model, x, y, subset_size=6, trials=4, seed=5)
    assert metrics.fisher_logdet(model, x, y, subset_size=6, trials=4, seed=5) == pytest.approx(expected, rel=1e-9)
    # One-hot and soft labels mean their argmax.
    soft = F.softmax(5 * F.one_hot(y, 3).to(DT) + 0.1 * torch.rand(n, 3, dtype=DT, device=device), 1)
    assert metrics.fisher_logdet(model, x, soft, subset_size=6, trials=4, seed=5) == pytest.approx(expected, rel=1e-9)
    # A different seed draws different subsets.
    assert metrics.fisher_logdet(model, x, y, subset_size=6, trials=4, seed=6) != pytest.approx(expected, rel=1e-9)


def test_fisher_logdet_singular_gram_error_and_jitter():
    model = tanh_mlp(hidden=1, classes=2, d_in=1)  # P = 1 + 1 + 2 + 2 = 6
    x, y = torch.randn(12, 1, dtype=DT), torch.randint(0, 2, (12,))
    with pytest.raises(metrics.SingularGramError, match=r"subset_size = 10 examples vs P = 6 parameters.*jitter"):
        metrics.fisher_logdet(model, x, y, subset_size=10, trials=2)
    value = metrics.fisher_logdet(model, x, y, subset_size=10, trials=2, jitter=1e-3)
    assert math.isfinite(value)
    assert value == pytest.approx(_expected_logdet(model, x, y, 10, 2, 0, jitter=1e-3), rel=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_fisher_logdet_always_refuses_exactly_singular_grams(dtype):
    """Singular Gram matrices must raise whatever rounding does: subset larger than P (rank <= P), and
    duplicated examples (two equal rows). Before the rank test, rounding gave a finite log-det about half
    the time (e.g. -253.4)."""
    model = tanh_mlp(hidden=1, classes=2, d_in=1).to(dtype)  # P = 6
    for seed in range(8):
        x, y = torch.randn(12, 1, dtype=dtype), torch.randint(0, 2, (12,))
        with pytest.raises(metrics.SingularGramError, match="subset_size = 10 examples vs P = 6"):
            metrics.fisher_logdet(model, x, y, subset_size=10, trials=1, seed=seed)
    wide = tanh_mlp(d_in=4, hidden=6, classes=3).to(dtype)  # P = 51 >> subset size
    for seed in range(8):
        x, y = torch.randn(3, 4, dtype=dtype), torch.randint(0, 3, (3,))
        x, y = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])  # example 3 duplicates example 0
        with pytest.raises(metrics.SingularGramError, match=r"numerically singular \(rank 3 of 4"):
            metrics.fisher_logdet(wide, x, y, subset_size=4, trials=1, seed=seed)
        # Without the duplicate the same examples are fine (and match the explicit Gram in float64).
        value = metrics.fisher_logdet(wide, x[:3], y[:3], subset_size=3, trials=1, seed=seed)
        if dtype == DT:
            assert value == pytest.approx(_expected_logdet(wide, x[:3], y[:3], 3, 1, seed), rel=1e-9)


def test_train_mode_errors_offer_only_arguments_that_exist():
    """Per-example metrics have no train-mode opt-in, so their error must not recommend one; the Hessian
    metrics take allow_train_mode and pass it on."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 3)).to(DT)
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    for call in (lambda: metrics.fisher_trace(model, x, y), lambda: metrics.robustness(model, x),
                 lambda: metrics.fisher_logdet(model, x, y, subset_size=2, trials=1)):
        with pytest.raises(RuntimeError, match=r"Dropout\) is in train mode") as info:
            call()
        assert "allow_train_mode" not in str(info.value) and "model.eval()" in str(info.value)
    for fn in (metrics.spectral_radius, metrics.top_hessian_eigenvalue):
        with pytest.raises(RuntimeError, match="allow_train_mode=True"):
            fn(model, F.cross_entropy, (x, y))
    # With the opt-in the stochastic model is accepted (its "Hessian" then changes with each mask).
    for fn in (metrics.spectral_radius, metrics.top_hessian_eigenvalue, metrics.hessian_frobenius):
        value = fn(model, F.cross_entropy, (x, y), allow_train_mode=True, **({"num_probes": 4} if fn is metrics.hessian_frobenius else {"max_iter": 5}))
        assert math.isfinite(value)


def test_fisher_metrics_bad_input():
    model = tanh_mlp()
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    for size in (0, 9, 2.0):
        with pytest.raises(ValueError, match=r"subset_size must be an integer in \[1, N = 8\]"):
            metrics.fisher_logdet(model, x, y, subset_size=size, trials=1)
    with pytest.raises(ValueError, match="trials must be a positive integer"):
        metrics.fisher_logdet(model, x, y, subset_size=2, trials=0)
    with pytest.raises(ValueError, match="jitter must be >= 0"):
        metrics.fisher_logdet(model, x, y, subset_size=2, trials=1, jitter=-1.0)
    with pytest.raises(ValueError, match=r"expected labels of shape \[8\] or \[8, C\], got \(7,\)"):
        metrics.fisher_logdet(model, x, y[:7], subset_size=2, trials=1)
    with pytest.raises(ValueError, match=r"expected labels of shape \[8\] or \[8, C\]"):
        metrics.fisher_trace(model, x, y[:7])
    with pytest.raises(ValueError, match=r"logits of shape \[N, C\]"):
        metrics.fisher_trace(nn.Sequential(model, nn.Flatten(0)), x, y)
    with pytest.raises(RuntimeError, match=r"fisher_logdet: module '1' \(BatchNorm1d\) is in train mode"):
        metrics.fisher_logdet(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).to(DT), x, y, subset_size=2, trials=1)


def test_fisher_logdet_resolves_small_gradients_of_a_float32_model():
    """A float32 model whose examples' gradients differ by 1e4 in scale: the float32 Gram cannot resolve
    the small eigenvalue (it would be called singular); the float64 copy gives the true log-det."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).eval()  # no bias: gradients scale with the input
    x = torch.tensor([[1.0, 0.5, -0.3], [1e-4 * 0.2, 1e-4, 1e-4 * 0.7]])
    y = torch.tensor([0, 1])
    got = metrics.fisher_logdet(model, x, y, subset_size=2, trials=1)
    m64 = nn.Sequential(nn.Linear(3, 2, bias=False)).double().eval()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    out = m64(x.double())
    losses = torch.nn.functional.cross_entropy(out, y, reduction="none")
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(l, list(m64.parameters()), retain_graph=True)]) for l in losses]
    J = torch.stack(rows)
    want = torch.linalg.slogdet(J @ J.T)[1].item()
    assert abs(got - want) < 1e-6 * abs(want)
