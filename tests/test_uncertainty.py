"""fastcurv.curvature.over_batches (data uncertainty) in float64: the mean, standard error and spread over R
disjoint batches equal a hand loop over each batch's dense Hessian / GGN (its eigenvalues, trace, squared
Frobenius norm, spectral moments)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastcurv.curvature import GGN, Hessian, disjoint_batches, frobenius_sq, over_batches, spectral_density

from test_ggn import tanh_mlp

DT = torch.float64
R = 4


def problem(n=40):
    torch.manual_seed(0)
    model = tanh_mlp()
    x, y = torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))
    return model, x, y


def dense_per_batch(model, x, y, quantity, operator=Hessian):
    out = []
    for xb, yb in disjoint_batches(x, y, R):
        A = operator(model, F.cross_entropy, (xb, yb)).to_dense()
        out.append(torch.as_tensor(quantity((A + A.T) / 2), dtype=DT).reshape(-1))
    return torch.stack(out)


def check_aggregates(result, expected):
    torch.testing.assert_close(result.values, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(result.mean, expected.mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(result.stderr, expected.std(0, correction=1) / math.sqrt(R), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(result.min, expected.min(0).values, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(result.max, expected.max(0).values, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("operator", [Hessian, GGN])
def test_top_eigenvalues_over_batches_match_dense_eigenvalues_per_batch(operator):
    model, x, y = problem()
    result = over_batches(lambda b: operator(model, F.cross_entropy, b), (x, y), "top_eigenvalues",
                          num_batches=R, k=3, tol=1e-10)
    expected = dense_per_batch(model, x, y, lambda A: torch.linalg.eigvalsh(A).flip(0)[:3], operator)
    check_aggregates(result, expected)
    assert result.batch_sizes == [10] * R and result.labels == ["eigenvalue 1", "eigenvalue 2", "eigenvalue 3"]
    assert result.within_batch.shape == (R, 3) and bool((result.within_batch <= 1e-8 * expected.abs().max()).all())
    # the batches differ: the spread is real, not zero
    assert bool((result.std > 1e-3 * result.mean.abs()).all())
    assert "± " in result.summary()[0] and "over 4 batches of 10" in result.summary()[0]


def test_exact_trace_over_batches_matches_dense_traces():
    model, x, y = problem()
    P = sum(p.numel() for p in model.parameters())
    result = over_batches(lambda b: Hessian(model, F.cross_entropy, b), (x, y), "trace", num_batches=R,
                          method="hutch++", num_probes=P)  # num_probes >= P: exact from unit vectors
    check_aggregates(result, dense_per_batch(model, x, y, lambda A: A.trace()))
    assert bool((result.within_batch == 0).all())


def test_frobenius_and_moments_over_batches_equal_the_per_batch_estimators_with_seed_plus_r():
    model, x, y = problem()
    batches = disjoint_batches(x, y, R)
    result = over_batches(lambda b: Hessian(model, F.cross_entropy, b), batches, "frobenius_sq", seed=5, num_probes=16)
    by_hand = [frobenius_sq(Hessian(model, F.cross_entropy, b), num_probes=16, seed=5 + r, return_stderr=True)
               for r, b in enumerate(batches)]
    check_aggregates(result, torch.tensor([[v] for v, _ in by_hand], dtype=DT))
    torch.testing.assert_close(result.within_batch[:, 0], torch.tensor([e for _, e in by_hand], dtype=DT))
    # and the estimates are near the dense ||H_b||_F^2 (within a few of their own standard errors)
    dense = dense_per_batch(model, x, y, lambda A: A.square().sum())
    assert bool(((result.values - dense).abs() <= 5 * result.within_batch + 1e-12).all())

    P = sum(p.numel() for p in model.parameters())
    moments = over_batches(lambda b: Hessian(model, F.cross_entropy, b), batches, "density_moments",
                           moments=(1, 2), num_probes=4, lanczos_steps=P)
    for r, b in enumerate(batches):
        sd = spectral_density(Hessian(model, F.cross_entropy, b), num_probes=4, lanczos_steps=P, seed=r)
        torch.testing.assert_close(moments.values[r], torch.tensor([sd.moment(1)[0], sd.moment(2)[0]], dtype=DT))
    assert moments.labels == ["moment 1", "moment 2"]


def test_callable_estimator_and_a_hand_loop_over_dense_matrices():
    model, x, y = problem()
    result = over_batches(lambda b: GGN(model, F.cross_entropy, b), disjoint_batches(x, y, R),
                          lambda op: torch.linalg.eigvalsh(op.to_dense())[-1])
    check_aggregates(result, dense_per_batch(model, x, y, lambda A: torch.linalg.eigvalsh(A)[-1], GGN))
    assert result.within_batch is None and result.estimator == "<lambda>"


def test_bad_arguments_are_refused():
    model, x, y = problem()
    make = lambda b: Hessian(model, F.cross_entropy, b)  # noqa: E731
    with pytest.raises(ValueError, match="estimator must be one of"):
        over_batches(make, (x, y), "eigen", num_batches=2)
    with pytest.raises(ValueError, match="need 60 examples, the data has 40"):
        over_batches(make, (x, y), num_batches=3, examples_per_batch=20)
    with pytest.raises(ValueError, match="examples_per_batch needs num_batches"):
        over_batches(make, [(x, y)], examples_per_batch=4)
    one = over_batches(make, [(x, y)], "trace", num_probes=4)
    assert math.isinf(one.stderr.item()) and one.num_batches == 1
