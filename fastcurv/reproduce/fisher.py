"""Paper 000, "Enhancing generalizability of deep networks via Fisher regularization": Table 2 and Figure 2.

Paper (Table 2, MNIST, convolutional network SVM, multiclass hinge loss, Adam lr 1e-4, batch 200, 40
epochs, step halving every 10): test accuracy L2 99.28%, spectral norm 99.34%, group L1 99.40%, Fisher
99.43%. Figure 2: the largest Hessian eigenvalue keeps growing with L2 and levels off with Fisher.

Here: real MNIST digits (mnist5k: 4,000 train / 1,000 test) instead of 60,000, a small CNN (fastcurv's
default MNIST CNN, narrower in the quick budget), fewer epochs with Adam at lr 1e-3 (1e-4 does not
converge in so few steps; fixed before any comparison), the same step halving. Every penalty is on the
classifier (the last weight layer), with fixed coefficients (no per-method tuning): Fisher
``gamma w^T F~ w + beta ||w||^2`` with paper 000's defaults gamma = 0.01, beta = 0.007 (fastcurv rule
``fisher``); L2 ``beta ||W, b||^2``; spectral norm ``gamma sigma_max(W) + beta ||W||^2``; group lasso
``gamma ||W||_{2,1} + beta ||W, b||^2``.
"""
from __future__ import annotations

import os

import torch

from fastcurv.reproduce.common import (Session, claims_table, curves, finals, format_cell, format_table,
                                       plot_curves, subset, write_outputs)
from fastcurv.reproduce.verdict import claim
from fastcurv.train import DEFAULTS, Rule
from fastcurv.train.rules import last_weight_layer

PAPER_TABLE2 = {"l2": 99.28, "spectral": 99.34, "group": 99.40, "fisher": 99.43}  # MNIST test accuracy, %
METHODS = ("l2", "spectral", "group", "fisher")
GAMMA, BETA = DEFAULTS["fisher"]["gamma"], DEFAULTS["fisher"]["beta"]

BUDGETS = {
    "tiny": dict(seeds=2, width=4, n_train=200, n_test=200, epochs=2, lr_drop=1, lr=1e-3, batch_size=50, eig_samples=32),
    "quick": dict(seeds=3, width=8, n_train=None, n_test=None, epochs=12, lr_drop=4, lr=1e-3, batch_size=200, eig_samples=128),
    "full": dict(seeds=5, width=16, n_train=None, n_test=None, epochs=40, lr_drop=10, lr=1e-3, batch_size=200, eig_samples=256),
}


class ClassifierPenalty(Rule):
    """A baseline penalty on the classifier layer, built from :mod:`fastcurv.regularizers`."""

    def __init__(self, name: str, gamma: float, beta: float):
        self.name = name  # not one of fastcurv.train.RULES: a reproduction-only baseline
        super().__init__()
        self.hyper = {"gamma": gamma, "beta": beta}

    def bind(self, model, loss_fn, epochs):
        from fastcurv.regularizers import L2, GroupLasso, SpectralNorm

        super().bind(model, loss_fn, epochs)
        layer = last_weight_layer(model)
        gamma, beta = self.hyper["gamma"], self.hyper["beta"]
        l2 = L2(layer, 2 * beta)  # L2's (lam/2)||.||^2: lam = 2 beta gives beta ||W, b||^2
        if self.name == "l2":
            self.terms = [l2]
        elif self.name == "spectral":
            self.terms = [SpectralNorm(layer, gamma, beta=beta)]
        elif self.name == "group":
            self.terms = [GroupLasso(layer, gamma), l2]
        else:
            raise ValueError(f"ClassifierPenalty: unknown baseline {self.name!r}; valid: l2, spectral, group")
        return self

    def penalty(self, per_example, x, y, epoch):
        return sum(term() for term in self.terms)


def run(session: Session, overrides: dict | None = None) -> dict:
    from fastcurv.data import default_model, load

    cfg = {**BUDGETS[session.budget], **(overrides or {})}
    data = subset(load("mnist5k"), cfg["n_train"], cfg["n_test"])
    runs = {m: [] for m in METHODS}
    for seed in session.seeds:
        for method in METHODS:
            torch.manual_seed(seed)
            model = default_model("mnist5k", activation="relu", width=cfg["width"])
            rule = "fisher" if method == "fisher" else ClassifierPenalty(method, GAMMA, BETA)
            history = session.train(f"{method}_seed{seed}", model, data, rule=rule, optimizer="adam", lr=cfg["lr"],
                                    epochs=cfg["epochs"], batch_size=cfg["batch_size"], schedule=cfg["lr_drop"],
                                    seed=seed, loss="hinge", track_eigenvalue=True, curvature_samples=cfg["eig_samples"])
            runs[method].append(history.to_list())
    acc = {m: finals(runs[m], "test_accuracy") for m in METHODS}
    eig = {m: finals(runs[m], "top_eigenvalue") for m in METHODS}
    gap = {m: finals(runs[m], "gap") for m in METHODS}
    claims = [claim(f"Fisher beats {m} (test accuracy)", f"Table 2: {PAPER_TABLE2['fisher']}% vs {PAPER_TABLE2[m]}%",
                    "fisher", acc["fisher"], m, acc[m], "greater", "test accuracy") for m in ("l2", "spectral", "group")]
    claims.append(claim("Fisher has a lower top Hessian eigenvalue than L2", "Figure 2 (MNIST)", "fisher", eig["fisher"],
                        "l2", eig["l2"], "less", "top Hessian eigenvalue, last epoch"))
    claims.append(claim("Fisher has a smaller generalization gap than L2", "Section 6 (shown on CIFAR-10, Table 3)", "fisher",
                        gap["fisher"], "l2", gap["l2"], "less", "test loss - train loss (hinge)"))

    rows = [[m, f"{PAPER_TABLE2[m]:.2f}%", format_cell([100 * a for a in acc[m]]), format_cell(gap[m]), format_cell(eig[m])]
            for m in METHODS]
    table = format_table(["regularizer", "paper test acc (MNIST, Table 2)", "our test acc % (mnist5k)",
                          "gap (test-train hinge)", "top Hessian eig (last epoch)"], rows)
    text = (f"Paper 000 (Fisher regularization); ours: mnist5k, CNN width {cfg['width']}, {cfg['epochs']} epochs, "
            f"{len(session.seeds)} seeds\n\n{table}\n\n{claims_table(claims)}")
    plots = [plot_curves(os.path.join(session.out, f"{key}.png"), f"Paper 000 protocol on mnist5k: {label}", label,
                         {m: curves(runs[m], key) for m in METHODS})
             for key, label in (("test_accuracy", "test accuracy"), ("top_eigenvalue", "top Hessian eigenvalue"),
                                ("gap", "test loss - train loss"))]
    results = {
        "protocol": {"dataset": "mnist5k", "model": f"fastcurv default MNIST CNN, ReLU, width {cfg['width']}",
                     "loss": "multiclass hinge", "optimizer": "adam", "gamma": GAMMA, "beta": BETA, **cfg},
        "paper_numbers": {"source": "Table 2, MNIST test accuracy %", **PAPER_TABLE2},
        "runs": {m: [{"seed": s, "history": h} for s, h in zip(session.seeds, runs[m])] for m in METHODS},
        "claims": claims, "plots": [p for p in plots if p],
    }
    write_outputs(session, results, text)
    print(text)
    return results
