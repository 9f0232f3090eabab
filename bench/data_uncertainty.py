"""How many examples give a stable curvature estimate? The top Hessian eigenvalue and the Hessian trace of a
trained network measured on R disjoint batches of n training examples each, for several n, with
``fastcurv.curvature.over_batches``: mean, standard error of the mean, one batch's spread (std and range),
the relative spread std / mean, and each batch's own error bar averaged (probes for the trace, the residual
bound for the eigenvalue): where the spread is no larger than that, more examples do not help. Not a timing: the numbers do not depend on the machine's load.

    python bench/data_uncertainty.py                      # mnist1d MLP 40-100-100-10, 20 epochs of SGD
    python bench/data_uncertainty.py --quick              # tiny sizes, to check that it runs
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastcurv.curvature import Hessian, over_batches  # noqa: E402
from fastcurv.data import default_model, load  # noqa: E402
from fastcurv.train import fit, per_example_loss  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batches", type=int, default=8, help="R disjoint batches per size (default 8)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256, 500])
    parser.add_argument("--quick", action="store_true", help="2 epochs, R = 3, sizes 8 and 16")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.batches, args.sizes = 2, 3, [8, 16]
    data = load(args.dataset, seed=0)
    torch.manual_seed(0)
    model = default_model(data)
    history = fit(model, data, rule="sgd", epochs=args.epochs, batch_size=64, lr=0.1, seed=0, progress=False)
    model.eval()
    last = history[-1]
    print(f"{args.dataset}, {type(model).__name__} with {sum(p.numel() for p in model.parameters())} parameters, "
          f"{args.epochs} epochs of SGD (lr 0.1, batch 64): train accuracy {last['train_accuracy']:.3f}, "
          f"test {last['test_accuracy']:.3f}; R = {args.batches} disjoint batches per size, torch {torch.__version__}")
    loss_fn = per_example_loss("cross_entropy")
    make = lambda batch: Hessian(model, lambda out, y: loss_fn(out, y).mean(), batch)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(data.x_train.shape[0], generator=g)
    x, y = data.x_train[order], data.y_train[order]
    print("\n| estimate | n per batch | mean ± s.e. | std (one batch) | std / mean | min .. max | mean within-batch error |")
    print("|---|---|---|---|---|---|---|")
    for estimator, options in (("top_eigenvalues", {"tol": 1e-4}), ("trace", {"num_probes": 64})):
        for n in args.sizes:
            if n * args.batches > x.shape[0]:
                print(f"| {estimator} | {n} | skipped: needs {n * args.batches} examples |  |  |  |  |")
                continue
            r = over_batches(make, (x, y), estimator, num_batches=args.batches, examples_per_batch=n, **options)
            mean, se, sd = r.mean.item(), r.stderr.item(), r.std.item()
            print(f"| {estimator} | {n} | {mean:.4g} ± {se:.2g} | {sd:.3g} | {sd / abs(mean):.2f} | "
                  f"{r.min.item():.4g} .. {r.max.item():.4g} | {r.within_batch.mean().item():.2g} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
