"""fit(statistics=("noise_scale", "grand")): per-epoch gradient noise scale (overall and per layer) and GraNd
summary, against a hand-written SGD loop with torch.func per-example gradients (float64)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fastcurv.metrics import gradient_noise_scale
from fastcurv.train import fit

DT = torch.float64
N, BATCH, LR, SEED = 24, 8, 0.3, 3


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=gen, dtype=DT), torch.randint(0, 3, (N,), generator=gen)
    return model, x, y


def per_example_grads(model, params, x, y):
    def loss_one(ps, xi, yi):
        return F.cross_entropy(functional_call(model, ps, (xi[None],)), yi[None])

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def hand_sgd(model, x, y, epochs):
    """SGD on the mean cross-entropy with fit's batch order; per epoch the statistics by the estimators of
    McCandlish et al. (appendix A.1), averaged over the steps, from per-example gradients."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = []
    for epoch in range(epochs):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED * 1_000_003 + epoch))
        sums = {}
        norms = []
        for step in range(N // BATCH):
            idx = order[step * BATCH:(step + 1) * BATCH]
            g = per_example_grads(model, params, x[idx], y[idx])
            for key in ("", "0.", "2."):
                rows = torch.cat([v.reshape(BATCH, -1) for k, v in g.items() if k.startswith(key)], 1)
                small, big = rows.square().sum(1).mean().item(), rows.mean(0).square().sum().item()
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += (BATCH * big - small) / (BATCH - 1)
                acc[1] += (small - big) / (1 - 1 / BATCH)
            norms.append(torch.cat([v.reshape(BATCH, -1) for v in g.values()], 1).norm(dim=1))
            params = {k: params[k] - LR * g[k].mean(0) for k in params}
        steps = N // BATCH
        ratio = {k: (v[1] / steps) / (v[0] / steps) for k, v in sums.items()}
        norms = torch.cat(norms)
        records.append({"noise_scale": ratio[""], "trace_covariance": sums[""][1] / steps,
                        "grad_sq_norm": sums[""][0] / steps, "noise_scale.0": ratio["0."], "noise_scale.2": ratio["2."],
                        "grand_mean": norms.mean().item(), "grand_std": norms.std(correction=0).item(),
                        "grand_max": norms.max().item()})
    return records


def run(model, x, y, rule="sgd", statistics=("noise_scale", "grand"), epochs=2, batch_size=BATCH, **options):
    return fit(model, (x, y), (x, y), rule=rule, epochs=epochs, batch_size=batch_size, lr=LR, seed=SEED,
               progress=False, statistics=statistics, **options)


def test_sgd_statistics_match_per_example_gradients_of_every_step():
    model, x, y = problem()
    expected = hand_sgd(copy.deepcopy(model), x, y, epochs=2)
    history = run(model, x, y)
    for record, want in zip(history, expected):
        for key, value in want.items():
            assert record[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("rule", ["sgd", "l2", "sam", "curvature"])
def test_statistics_do_not_change_the_run(rule):
    model, x, y = problem()
    plain = run(copy.deepcopy(model), x, y, rule=rule, statistics=())
    measured = run(copy.deepcopy(model), x, y, rule=rule)
    for a, b in zip(plain.without_timing(), measured.without_timing()):
        for key, value in a.items():
            assert b[key] == pytest.approx(value, rel=1e-10, abs=1e-13), (rule, key)
    assert "noise_scale" in measured[0] and "noise_scale" not in plain[0]


@pytest.mark.parametrize("rule", ["sam", "curvature"])
def test_rules_measured_apart_give_the_statistics_at_the_weights_of_the_step(rule):
    """One full-batch step per epoch: epoch 0's statistics are gradient_noise_scale at the initial weights."""
    model, x, y = problem()
    initial = copy.deepcopy(model)
    history = run(model, x, y, rule=rule, epochs=1, batch_size=N)
    want = gradient_noise_scale(initial, (x, y))
    assert history[0]["noise_scale"] == pytest.approx(want["noise_scale"], rel=1e-10)
    assert history[0]["noise_scale.2"] == pytest.approx(want["by_layer"]["2"]["noise_scale"], rel=1e-10)
    norms = torch.cat([v.reshape(N, -1) for v in per_example_grads(
        initial, {n: p.detach() for n, p in initial.named_parameters()}, x, y).values()], 1).norm(dim=1)
    assert history[0]["grand_mean"] == pytest.approx(norms.mean().item(), rel=1e-10)
    assert history[0]["grand_max"] == pytest.approx(norms.max().item(), rel=1e-10)


def test_unknown_statistics_are_refused():
    model, x, y = problem()
    with pytest.raises(ValueError, match="unknown statistics \\['el2n'\\]; valid: noise_scale, grand"):
        run(model, x, y, statistics=("el2n",))
    history = run(model, x, y, statistics="grand", epochs=1)
    assert "grand_mean" in history[0] and "noise_scale" not in history[0] and math.isfinite(history[0]["grand_std"])
