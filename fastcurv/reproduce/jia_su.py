"""Jia & Su, "Information-Theoretic Local Minima Characterization and Regularization" (ICML 2020).

Two claims:

1. Regularization (Table 1, CIFAR-10/100; e.g. CNN 8.52 +- 0.23% -> 7.55 +- 0.06% test error): training
   with ``beta R_alpha`` (Algorithm 1, alpha = 1e-4, M = 8, beta chosen on a validation split) switched on
   after the first learning-rate drop lowers the test error.
2. Characterization (Section 7.1, Figures 2 and 4, ResNet-20 on CIFAR-10): over minima that differ in
   generalization (Scenario I: a confusion set of randomly labelled examples of growing size; Scenario
   III: growing batch size), a lower log-det metric gamma_hat indicates a lower test error; the paper
   shows curves (no correlation numbers), with Frobenius norm and spectral radius also tracking the
   error in these two scenarios and the robustness metric failing.

Here: MNIST-1D (4,000 train / 1,000 test, generated offline) with an MLP 40-256-256-10 ReLU, SGD with
momentum 0.9, far fewer epochs; the step-halving schedule ``lr0 * 0.5^ceil(t / lr_drop)`` stands in for
"divide by 10 on plateau". For claim 2 we report the Spearman rank correlation between each metric and
the test error across the configurations of a scenario, per seed, and test it across seeds.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from fastcurv.reproduce.common import (Session, claims_table, curves, finals, format_cell, format_table,
                                       plot_curves, subset, validation_split, write_outputs)
from fastcurv.reproduce.verdict import claim, spearman

PAPER_TABLE1 = {"CNN (CIFAR-10)": (8.52, 7.55), "WRN-28-2 (CIFAR-100)": (None, 23.88),
                "DenseNet-k12 (CIFAR-10)": (4.61, 4.37), "ResNet-20 (CIFAR-10)": (8.50, 7.89)}  # test error %, plain -> +reg
METRICS = ("gamma_hat", "fisher_trace", "hessian_frobenius", "spectral_radius")

BUDGETS = {
    "tiny": dict(seeds=2, width=16, n_train=400, n_test=200, epochs=4, lr_drop=2, lr=0.05, batch_size=48, betas=[1.0],
                 char_epochs=3, confusion=[0, 100], batch_sizes=[24, 96], char_train=200, metric_examples=64,
                 logdet_subset=8, logdet_trials=2, probes=4),
    "quick": dict(seeds=4, width=256, n_train=None, n_test=None, epochs=30, lr_drop=10, lr=0.05, batch_size=128,
                  betas=[1.0, 10.0, 50.0], char_epochs=40, confusion=[0, 500, 1000, 2000], batch_sizes=[32, 128, 512],
                  char_train=2000, metric_examples=512, logdet_subset=32, logdet_trials=10, probes=16),
    "full": dict(seeds=5, width=256, n_train=None, n_test=None, epochs=90, lr_drop=30, lr=0.05, batch_size=128,
                 betas=[1.0, 5.0, 10.0, 20.0, 50.0, 100.0], char_epochs=150, confusion=[0, 400, 800, 1200, 1600, 2000],
                 batch_sizes=[32, 64, 128, 256, 512, 1024], char_train=2000, metric_examples=1024, logdet_subset=64,
                 logdet_trials=20, probes=32),
}
MOMENTUM = 0.9


def model_for(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _train(session, key, data, cfg, seed, *, rule="sgd", options=None, epochs, batch_size, lr_drop=None):
    model = model_for(cfg["width"], seed)
    history = session.train(key, model, data, rule=rule, rule_options=options or {}, optimizer="sgd", lr=cfg["lr"],
                            momentum=MOMENTUM, epochs=epochs, batch_size=batch_size, schedule=lr_drop, seed=seed,
                            loss="cross_entropy", regularize_after_first_drop=rule != "sgd")
    return model, history.to_list()


def measure(model, x, y, cfg, seed) -> dict:
    """The four metrics of Section 7.1 (robustness left out: it needs input gradients of a 1-d signal
    and the paper finds it fails) at a trained minimum, on training examples ``x, y``."""
    from fastcurv import metrics

    model.eval()
    mean_ce = lambda out, target: nn.functional.cross_entropy(out, target)  # noqa: E731
    try:
        gamma = metrics.fisher_logdet(model, x, y, cfg["logdet_subset"], cfg["logdet_trials"], seed=seed)
    except metrics.SingularGramError:
        gamma = math.nan  # reported as missing, never replaced by a made-up value
    return {"gamma_hat": gamma, "fisher_trace": float(metrics.fisher_trace(model, x, y)),
            "hessian_frobenius": float(metrics.hessian_frobenius(model, mean_ce, (x, y), num_probes=cfg["probes"], seed=seed)),
            "spectral_radius": float(metrics.spectral_radius(model, mean_ce, (x, y), tol=1e-3, seed=seed))}


def _with_confusion(data, n_clean: int, n_confusion: int, seed: int):
    """The first ``n_clean`` training examples plus ``n_confusion`` others with random labels (Scenario I)."""
    import copy

    gen = torch.Generator().manual_seed(10_000 + seed)
    out = copy.copy(data)
    extra = data.x_train[n_clean:n_clean + n_confusion]
    if extra.shape[0] < n_confusion:
        raise ValueError(f"jia-su: confusion set of {n_confusion} needs {n_clean + n_confusion} training examples, "
                         f"have {data.x_train.shape[0]}")
    random_labels = torch.randint(0, 10, (n_confusion,), generator=gen)
    out.x_train = torch.cat([data.x_train[:n_clean], extra])
    out.y_train = torch.cat([data.y_train[:n_clean], random_labels])
    return out


def run(session: Session, overrides: dict | None = None) -> dict:
    from fastcurv.data import load

    cfg = {**BUDGETS[session.budget], **(overrides or {})}
    data = subset(load("mnist1d"), cfg["n_train"], cfg["n_test"])

    # Claim 1: beta on a validation split (seed 0), then plain vs +reg from the same seeds.
    val = validation_split(data, 0.2, seed=0)
    val_error = {}
    for beta in cfg["betas"]:
        _, h = _train(session, f"select_beta{beta:g}", val, cfg, 0, rule="subbatch", options={"beta": beta},
                      epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr_drop=cfg["lr_drop"])
        val_error[beta] = 1 - h[-1]["test_accuracy"]
    beta = min(val_error, key=val_error.get)
    session.log(f"  validation picked beta {beta:g}")
    reg_runs = {"plain": [], "+reg": []}
    for seed in session.seeds:
        for name, rule, opts in (("plain", "sgd", {}), ("+reg", "subbatch", {"beta": beta})):
            _, h = _train(session, f"{name.strip('+')}_seed{seed}", data, cfg, seed, rule=rule, options=opts,
                          epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr_drop=cfg["lr_drop"])
            reg_runs[name].append(h)
    err = {n: [1 - a for a in finals(reg_runs[n], "test_accuracy")] for n in reg_runs}
    claims = [claim("R_alpha after the first LR drop lowers test error", "Table 1: e.g. CNN 8.52% -> 7.55% (CIFAR-10)",
                    "+reg", err["+reg"], "plain", err["plain"], "less", "test error")]

    # Claim 2: minima of different generalization (Section 7.1), metrics vs test error.
    scenarios = {"confusion": [(f"confusion{k}", k, cfg["batch_size"]) for k in cfg["confusion"]],
                 "batch_size": [(f"batch{b}", 0, b) for b in cfg["batch_sizes"]]}
    minima = {s: {name: [] for name, _, _ in configs} for s, configs in scenarios.items()}
    x_metric, y_metric = data.x_train[:cfg["metric_examples"]], data.y_train[:cfg["metric_examples"]]
    for seed in session.seeds:
        for scenario, configs in scenarios.items():
            for name, n_confusion, batch in configs:
                train = _with_confusion(data, cfg["char_train"], n_confusion, seed)
                model, h = _train(session, f"{name}_seed{seed}", train, cfg, seed, epochs=cfg["char_epochs"], batch_size=batch)
                record = {"test_error": 1 - h[-1]["test_accuracy"], "train_accuracy": h[-1]["train_accuracy"],
                          "train_loss": h[-1]["train_loss"], **measure(model, x_metric, y_metric, cfg, seed)}
                minima[scenario][name].append(record)
    correlations = {}
    for scenario, configs in scenarios.items():
        names = [n for n, _, _ in configs]
        correlations[scenario] = {m: [spearman([minima[scenario][n][i][m] for n in names],
                                               [minima[scenario][n][i]["test_error"] for n in names])
                                      for i in range(len(session.seeds))] for m in METRICS}
        rho = correlations[scenario]
        zeros = [0.0] * len(session.seeds)
        claims.append(claim(f"gamma_hat ranks minima by test error ({scenario})", "Sec. 7.1, Fig. 2/4: lower gamma_hat, lower error",
                            "Spearman(gamma_hat, test error)", rho["gamma_hat"], "0", zeros, "greater", "rank correlation per seed"))
        for other in METRICS[1:]:
            claims.append(claim(f"gamma_hat ranks better than {other} ({scenario})", "Sec. 7.1: 'our metric significantly outperforms others'",
                                "rho(gamma_hat)", rho["gamma_hat"], f"rho({other})", rho[other], "greater", "rank correlation per seed"))

    rows = [["plain", f"{PAPER_TABLE1['CNN (CIFAR-10)'][0]:.2f}%", format_cell([100 * e for e in err["plain"]])],
            [f"+reg (beta={beta:g})", f"{PAPER_TABLE1['CNN (CIFAR-10)'][1]:.2f}%", format_cell([100 * e for e in err["+reg"]])]]
    table = format_table(["training", "paper test error (CNN, CIFAR-10, Table 1)", "our test error % (mnist1d)"], rows)
    minima_rows = []
    for scenario, configs in scenarios.items():
        for name, _, _ in configs:
            recs = minima[scenario][name]
            minima_rows.append([scenario, name, format_cell([r["test_error"] for r in recs]),
                                format_cell([r["train_accuracy"] for r in recs]),
                                *[format_cell([r[m] for r in recs]) for m in METRICS]])
    minima_table = format_table(["scenario", "config", "test error", "train acc", *METRICS], minima_rows)
    rho_rows = [[s, m, format_cell(correlations[s][m])] for s in scenarios for m in METRICS]
    rho_table = format_table(["scenario", "metric", "Spearman rho with test error (mean ± std over seeds)"], rho_rows)
    text = (f"Jia & Su; ours: mnist1d, MLP 40-{cfg['width']}-{cfg['width']}-10, {len(session.seeds)} seeds\n\n{table}\n\n"
            f"Minima of Section 7.1 (metrics on {cfg['metric_examples']} clean training examples):\n{minima_table}\n\n"
            f"{rho_table}\n\n{claims_table(claims)}")

    plots = [
        plot_curves(os.path.join(session.out, "test_accuracy.png"), "Jia & Su protocol on mnist1d: test accuracy",
                    "test accuracy", {n: curves(reg_runs[n], "test_accuracy") for n in reg_runs}),
        plot_curves(os.path.join(session.out, "gap.png"), "Jia & Su protocol on mnist1d: generalization gap",
                    "test loss - train loss", {n: curves(reg_runs[n], "gap") for n in reg_runs}),
    ]
    for scenario, configs in scenarios.items():
        names = [n for n, _, _ in configs]
        xs = [k if scenario == "confusion" else b for _, k, b in configs]
        series = {"test error": [[minima[scenario][n][i]["test_error"] for n in names] for i in range(len(session.seeds))]}
        for m in METRICS:  # min-max scaled per seed so that all four fit one axis
            per_seed = [[minima[scenario][n][i][m] for n in names] for i in range(len(session.seeds))]
            series[f"{m} (scaled)"] = [_scaled(v) for v in per_seed]
        series["test error"] = [_scaled(v) for v in series["test error"]]
        plots.append(plot_curves(os.path.join(session.out, f"metrics_{scenario}.png"),
                                 f"Section 7.1 {scenario} scenario (each curve min-max scaled per seed)", "scaled value",
                                 series, xlabel="confusion set size" if scenario == "confusion" else "batch size", x=xs))
    results = {
        "protocol": {"dataset": "mnist1d", "model": f"MLP 40-{cfg['width']}-{cfg['width']}-10 ReLU", "optimizer": f"SGD momentum {MOMENTUM}",
                     "regularizer": "subbatch (R_alpha), alpha=1e-4, M=8, after the first LR drop", **cfg,
                     "chosen_beta": beta, "validation_error": {str(b): e for b, e in val_error.items()}},
        "paper_numbers": {"source": "Table 1, test error % (plain, +reg)", **{k: list(v) for k, v in PAPER_TABLE1.items()}},
        "regularization_runs": {n: [{"seed": s, "history": h} for s, h in zip(session.seeds, reg_runs[n])] for n in reg_runs},
        "minima": minima, "spearman": correlations, "claims": claims, "plots": [p for p in plots if p],
    }
    write_outputs(session, results, text)
    print(text)
    return results


def _scaled(values):
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return values
    lo, hi = min(finite), max(finite)
    return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]
