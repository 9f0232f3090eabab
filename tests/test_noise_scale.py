"""fastcurv.metrics.gradient_noise_scale, grand_scores and el2n_scores against torch.func per-example gradients
(float64): the unbiased estimators of McCandlish et al. (2018, appendix A.1) overall and per layer."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fastcurv.metrics import el2n_scores, gradient_noise_scale, grand_scores

DT = torch.float64


def model_and_batches(sizes=(6, 9)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    return model, [(torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))) for n in sizes]


def per_example_grads(model, x, y):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(ps, xi, yi):
        return F.cross_entropy(functional_call(model, ps, (xi[None],)), yi[None])

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)  # {name: [B, *shape]}


def reference(model, batches, prefix=""):
    grad_sq, trace_cov = 0.0, 0.0
    for x, y in batches:
        g = per_example_grads(model, x, y)
        rows = torch.cat([v.reshape(x.shape[0], -1) for k, v in g.items() if k.startswith(prefix)], 1)
        B = rows.shape[0]
        small = rows.square().sum(1).mean().item()
        big = rows.mean(0).square().sum().item()
        grad_sq += (B * big - small) / (B - 1)
        trace_cov += (small - big) / (1 - 1 / B)
    grad_sq, trace_cov = grad_sq / len(batches), trace_cov / len(batches)
    return {"noise_scale": trace_cov / grad_sq, "trace_covariance": trace_cov, "grad_sq_norm": grad_sq}


def test_noise_scale_overall_and_per_layer_match_per_example_gradients():
    model, batches = model_and_batches()
    result = gradient_noise_scale(model, batches)
    for key, value in reference(model, batches).items():
        assert result[key] == pytest.approx(value, rel=1e-10)
    assert result["batches"] == 2 and sorted(result["by_layer"]) == ["0", "2"]
    for layer in ("0", "2"):
        for key, value in reference(model, batches, prefix=layer + ".").items():
            assert result["by_layer"][layer][key] == pytest.approx(value, rel=1e-10)


def test_trace_covariance_estimator_is_unbiased_over_many_batches():
    """Average over many batches of 4 drawn from a fixed pool of 64: E[tr(Sigma)_est] is the pool's
    per-example gradient variance (with the finite pool treated as the population, sampling with replacement)."""
    model, (pool,) = model_and_batches((64,))
    x, y = pool
    g = per_example_grads(model, x, y)
    rows = torch.cat([v.reshape(64, -1) for v in g.values()], 1)
    mean = rows.mean(0)
    population_trace = (rows - mean).square().sum(1).mean().item()
    gen = torch.Generator().manual_seed(0)
    batches = [(x[i], y[i]) for i in (torch.randint(0, 64, (4,), generator=gen) for _ in range(400))]
    result = gradient_noise_scale(model, batches)
    assert result["trace_covariance"] == pytest.approx(population_trace, rel=0.1)
    assert result["grad_sq_norm"] == pytest.approx(mean.square().sum().item(), rel=0.2)


def test_grand_and_el2n_scores():
    model, ((x, y),) = model_and_batches((7,))
    g = per_example_grads(model, x, y)
    norms = torch.cat([v.reshape(7, -1) for v in g.values()], 1).norm(dim=1)
    torch.testing.assert_close(grand_scores(model, x, y, batch_size=3), norms, rtol=1e-10, atol=1e-12)
    expected = (model(x).softmax(1) - F.one_hot(y, 3).to(DT)).norm(dim=1)
    torch.testing.assert_close(el2n_scores(model, x, y), expected.detach())
    with pytest.raises(ValueError, match=">= 2 examples"):
        gradient_noise_scale(model, (x[:1], y[:1]))
