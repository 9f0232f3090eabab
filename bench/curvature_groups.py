"""Issue 19's interleaved groups (``bench/interleaved.py``), each contender a zero-argument call and a divisor
(the time is reported per vector where the divisor is K):

* ``ggn-mlp``: GGN-vector products, fastcurv ``GGN`` vs curvlinops' ``GGNLinearOperator``, K = 1 and K = 8
  (time per vector), against one plain gradient (the unit); operators built once, outside the timing, both
  at their defaults. Checked equal (float32 tolerance) before timing.
* ``density-mlp``: the Hessian's spectral density by SLQ, fastcurv ``spectral_density`` vs PyHessian's
  ``density()`` with the same probes x Lanczos steps, operator construction included (the calls as a user
  makes them), on an MLP small enough for a dense float64 ``eigvalsh``: each contender's 1-Wasserstein
  distance to the dense spectrum is printed with its time (equal settings; the accuracy shows whether they
  are equally accurate). PyHessian's ``density()`` calls ``torch.eig``, removed from torch 2.x; the bench
  supplies it for the symmetric tridiagonal PyHessian passes (``torch.linalg.eigh``; a 100 x 100 matrix per
  probe, negligible).
* ``statistics-mlp``: the cost of the noise-scale and GraNd statistics on a training step: an sgd step,
  the same with ``fit(statistics=...)``'s in-step recording, with fit's separate measurement (what
  rules other than sgd/l2 pay), with ``metrics.gradient_noise_scale`` + ``grand_scores`` called after the
  step by hand, and with torch.func per-example gradients (vmap(grad)) as researchers write it.
* ``eig-mlp``: the top-3 Hessian eigenvalues of the 101k-parameter benchmark MLP (256 examples), fastcurv
  ``top_eigenvalues(Hessian(...), k=3)`` (default Lanczos) vs PyHessian's default ``eigenvalues(top_n=3)``
  (power iteration with deflation) and a tighter PyHessian call (tol 1e-5), operator construction
  included; each note gives the largest relative error against a float64 reference (tol 1e-10) and the
  eigenvalues found.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUPS = ("ggn-mlp", "density-mlp", "statistics-mlp", "eig-mlp")


def _mlp(d_in, width, classes=10):
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, classes))


def _data(n, d_in, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)


def ggn_contenders(quick: bool) -> dict:
    import curvlinops

    from fastcurv.curvature import GGN

    torch.manual_seed(0)
    d_in, width, n = (8, 16, 16) if quick else (128, 256, 256)  # the benchmark MLP of test_bench_curvature (101k)
    model = _mlp(d_in, width)
    x, y = _data(n, d_in)
    params = list(model.parameters())
    ours = GGN(model, F.cross_entropy, (x, y))
    theirs = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    out = {"one gradient": (lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params), 1)}
    for K in (1, 8):
        V = torch.randn(ours.num_params, K, generator=torch.Generator().manual_seed(K))
        a, b = ours @ V, theirs @ V
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
        out[f"fastcurv GGN K={K}"] = (lambda V=V: ours @ V, K)
        out[f"curvlinops GGN K={K}"] = (lambda V=V: theirs @ V, K)
    return out


def _pyhessian_with_eig():
    """PyHessian's ``hessian`` class, with ``torch.eig(T, eigenvectors=True)`` supplied for its symmetric tridiagonal."""
    from pyhessian import hessian

    def eig(T, eigenvectors=False):
        values, vectors = torch.linalg.eigh(T)
        return torch.stack([values, torch.zeros_like(values)], 1), vectors

    try:
        torch.eig(torch.eye(1), eigenvectors=True)
    except (RuntimeError, AttributeError):
        torch.eig = eig
    return hessian


def density_contenders(quick: bool) -> tuple[dict, dict]:
    """Contenders and, per contender, a note with its accuracy against the dense spectrum."""
    from fastcurv.curvature import Hessian, spectral_density
    from fastcurv.curvature.density import wasserstein_1

    pyhessian_hessian = _pyhessian_with_eig()
    torch.manual_seed(0)
    d_in, width, n = (4, 8, 32) if quick else (16, 32, 256)  # P = 1930: dense eigvalsh in float64 is cheap
    model = _mlp(d_in, width)
    x, y = _data(n, d_in)
    dense = torch.linalg.eigvalsh(Hessian(copy.deepcopy(model).double(), F.cross_entropy, (x.double(), y)).to_dense())
    P = dense.numel()
    settings = [(1, min(100, P))] + ([] if quick else [(8, 100)])  # PyHessian's default (n_v=1, iter=100), and more probes
    out, notes = {}, {}
    for probes, steps in settings:
        def ours(probes=probes, steps=steps):
            return spectral_density(Hessian(model, F.cross_entropy, (x, y)), num_probes=probes, lanczos_steps=steps,
                                    seed=0, progress=False)

        def theirs(probes=probes, steps=steps):
            torch.manual_seed(0)  # PyHessian draws its probes from the global generator
            h = pyhessian_hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            return h.density(iter=steps, n_v=probes)

        sd = ours()
        nodes, weights = theirs()
        mine = f"fastcurv {probes} probe(s) x {steps} steps"
        peer = f"pyhessian {probes} probe(s) x {steps} steps"
        out[mine], out[peer] = (ours, 1), (theirs, 1)
        notes[mine] = f"W1 to dense {sd.wasserstein_to(dense):.3g}"
        w = torch.tensor(weights, dtype=torch.float64) / probes
        notes[peer] = f"W1 to dense {wasserstein_1(torch.tensor(nodes, dtype=torch.float64), w, dense):.3g}"
    return out, notes


def statistics_contenders(quick: bool) -> dict:
    from torch.func import functional_call, grad, vmap

    from fastcurv.metrics import gradient_noise_scale, grand_scores
    from fastcurv.train import make_rule, per_example_loss
    from fastcurv.train.statistics import StepStatistics

    d_in, width, n = (8, 16, 16) if quick else (64, 256, 128)  # the rules-mlp case of test_bench_steps
    torch.manual_seed(0)
    base = _mlp(d_in, width)
    x, y = _data(n, d_in)
    loss_fn = per_example_loss("cross_entropy")
    names = ("noise_scale", "grand")

    def sgd_step(statistics=None, measure=False, by_hand=None):
        model = copy.deepcopy(base)
        rule = make_rule("sgd").bind(model, loss_fn, epochs=1)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        stats = StepStatistics(model, loss_fn, names) if (statistics or measure) else None
        rule.statistics = stats if statistics else None

        def step():
            if measure:
                stats.measure(x, y)
            rule.step(x, y, opt, epoch=0)
            if by_hand is not None:
                by_hand(model)

        return step

    def metrics_by_hand(model):
        gradient_noise_scale(model, (x, y))
        grand_scores(model, x, y)

    def torch_func_by_hand(model):
        params = {k: p.detach() for k, p in model.named_parameters()}

        def loss_one(ps, xi, yi):
            return F.cross_entropy(functional_call(model, ps, (xi[None],)), yi[None])

        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
        rows = torch.cat([v.reshape(n, -1) for v in g.values()], 1)
        sq = rows.square().sum(1)
        (sq.mean() - rows.mean(0).square().sum()).item(), sq.sqrt()

    return {"sgd step": (sgd_step(), 1),
            "+ statistics in the step (sgd, l2)": (sgd_step(statistics=True), 1),
            "+ statistics measured apart (other rules)": (sgd_step(measure=True), 1),
            "+ gradient_noise_scale + grand_scores": (sgd_step(by_hand=metrics_by_hand), 1),
            "+ torch.func per-example grads": (sgd_step(by_hand=torch_func_by_hand), 1)}


def eig_contenders(quick: bool) -> tuple[dict, dict]:
    import pyhessian

    from fastcurv.curvature import Hessian, top_eigenvalues

    torch.manual_seed(0)
    d_in, width, n = (8, 16, 32) if quick else (128, 256, 256)
    model = _mlp(d_in, width)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, d_in, generator=g), torch.randint(0, 10, (n,), generator=g)
    reference = top_eigenvalues(Hessian(copy.deepcopy(model).double(), F.cross_entropy, (x.double(), y)), k=3,
                                tol=1e-10, max_iter=600)[0].to(torch.float64)

    def ours():
        return top_eigenvalues(Hessian(model, F.cross_entropy, (x, y)), k=3)[0]

    def theirs(**options):
        torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
        return pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues(top_n=3, **options)[0]

    def note(values):
        values = torch.tensor([float(v) for v in values], dtype=torch.float64)
        error = ((values - reference).abs() / reference.abs()).max().item()  # in the order each returns
        return f"max rel error {error:.2g}, eigenvalues {', '.join(f'{v:.5g}' for v in values.tolist())}"

    # PyHessian's tol is on the relative change of each power-iteration estimate; its default (1e-3) stops
    # early where eigenvalues are close, so a tighter call (tol 1e-5, up to 1000 iterations) is timed too.
    tight = dict(tol=1e-5, maxIter=1000)
    calls = {"fastcurv top_eigenvalues k=3": ours, "pyhessian eigenvalues(top_n=3)": theirs,
             "pyhessian tol=1e-5, maxIter=1000": lambda: theirs(**tight)}
    return {name: (call, 1) for name, call in calls.items()}, {name: note(call()) for name, call in calls.items()}


def contenders(group: str, quick: bool) -> tuple[dict, dict]:
    """``(name -> (call, divisor), name -> note)``, the group's baseline first."""
    if group == "ggn-mlp":
        return ggn_contenders(quick), {}
    if group == "density-mlp":
        return density_contenders(quick)
    if group == "statistics-mlp":
        return statistics_contenders(quick), {}
    if group == "eig-mlp":
        return eig_contenders(quick)
    raise ValueError(f"unknown group {group!r}; valid: {', '.join(GROUPS)}")
