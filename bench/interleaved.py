"""Step benchmarks measured interleaved: every contender of a group runs once in turn, for many rounds;
medians; ratios to the group's first contender. pytest-benchmark times each contender in its own block
of rounds, so on a shared 2-core machine a slow stretch can land on one contender only; alternating them
spreads it over all of them. Same models, batches and contenders as ``test_bench_steps.py``.

    python bench/interleaved.py rules-mlp subbatch-cnn regstep-cnn [--rounds 30]

Groups: ``rules-mlp`` (every learning rule vs sgd), ``subbatch-{mlp,cnn,resnet18}`` (R_alpha, M = 8, vs an
sgd step; ResNet-18 with train-mode BatchNorm), ``regstep-{mlp,cnn,resnet18}`` (the curvature-regularized
step, SAM and GNP vs a plain step), ``flat-{mlp,cnn,resnet18}`` (issue 18: full training steps, optimizer
included, of sgd, sam, gnp, looksam, curvature exact, ``subsample=B/8`` and ``every=4``, all as rules of
``fastcurv.train``; looksam and every=4 are timed over whole cycles, k steps per call, and reported per step,
since the median of single steps would pick a cheap reuse step).
Issue 19 (``bench/curvature_groups.py``): ``ggn-mlp`` (GGN products vs curvlinops, K = 1 and 8, per vector),
``density-mlp`` (SLQ density vs PyHessian's ``density()``, accuracy against the dense spectrum printed beside
the times), ``statistics-mlp`` (noise scale and GraNd on a training step). ``--quick``: tiny sizes and 3
rounds, to check that a group runs.

    python bench/interleaved.py ggn-mlp density-mlp statistics-mlp [--quick]

Issue 16 (``bench/zoo_steps.py``): ``zoo-resnet18``, ``zoo-gpt2`` (torchvision resnet18 and HF GPT-2 as built:
per-example norms and the regularized step vs a plain step, torch.func and Opacus where they can run, each
checked against fastcurv before timing; a peer that cannot run says why). ``--quick`` shrinks them too.

    python bench/interleaved.py zoo-resnet18 zoo-gpt2 [--device cuda] [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import curvature_groups  # noqa: E402
import zoo_steps  # noqa: E402
from test_bench_steps import REGSTEP, rule_step, rules_case, step_case, subbatch_steps  # noqa: E402

from fastcurv.train import RULES  # noqa: E402
from fastcurv.train.rules import DEFAULTS as RULE_DEFAULTS  # noqa: E402

GROUPS = (["rules-mlp"] + [f"{kind}-{case}" for kind in ("subbatch", "regstep", "flat") for case in ("mlp", "cnn", "resnet18")]
          + list(curvature_groups.GROUPS) + zoo_steps.ZOO_GROUPS)


def cycle_of(rule: str, options: dict) -> int:
    """Steps in one cycle of a rule whose steps differ in cost (looksam: one SAM step then k - 1 reuses;
    curvature every=k: one computing step then k - 1 reuses); 1 for the others. A timed call runs a whole
    cycle and reports the mean step, since the median of single steps would be a cheap step."""
    if rule == "looksam":
        return int(options.get("k", RULE_DEFAULTS["looksam"]["k"]))
    if rule == "curvature":
        return int(options.get("every", 1))
    return 1


def rule_cycle(rule: str, model, x, y, **options):
    """``(call, divisor)``: one call runs a whole cycle of the rule's steps, ``divisor`` of them."""
    step, k = rule_step(rule, model, x, y, **options), cycle_of(rule, options)
    if k == 1:
        return step, 1

    def whole_cycle():
        for _ in range(k):
            step()

    return whole_cycle, k


def flat_contenders(model, x, y) -> dict:
    """Issue 18's step costs: each contender is a training step of a rule (own optimizer, one model);
    looksam and every=4 are timed over whole cycles (mean step)."""
    b = max(x.shape[0] // 8, 1)
    specs = {"sgd": ("sgd", {}), "sam": ("sam", {}), "gnp": ("gnp", {}), "looksam (k=5)": ("looksam", {}),
             "curvature exact": ("curvature", {"alpha": 1e-3}),
             f"curvature subsample={b} (B/8)": ("curvature", {"alpha": 1e-3, "subsample": b}),
             "curvature every=4": ("curvature", {"alpha": 1e-3, "every": 4})}
    return {name: rule_cycle(rule, model, x, y, **options) for name, (rule, options) in specs.items()}


def contenders(group: str, dev=torch.device("cpu")) -> dict:
    """name -> (a zero-argument call, steps per call), first the baseline."""
    kind, case = group.split("-", 1)
    if kind == "rules":
        return {rule: rule_cycle(rule, *rules_case(dev)) for rule in RULES}
    if kind == "subbatch":
        return {name: (step, 1) for name, step in subbatch_steps(*step_case(case, dev, train_batchnorm=True)).items()}
    if kind == "flat":
        return flat_contenders(*step_case(case, dev))
    model, x, y = step_case(case, dev)
    return {name: ((lambda fn=REGSTEP[name](model): fn(model, x, y)), 1) for name in ("plain_step", "fastcurv", "sam", "gnp")}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def group_tables(group: str, dev: torch.device, quick: bool) -> list:
    """``[(title, {name: (step, divisor)}, {name: note}, {name: why it cannot run})]`` for one group."""
    if group in zoo_steps.ZOO_GROUPS:
        return [(t.title, {name: (step, 1) for name, step in t.steps.items()}, t.notes, t.unavailable)
                for t in zoo_steps.tables(group, dev, quick)]
    if group in curvature_groups.GROUPS:
        steps, notes = curvature_groups.contenders(group, quick)
        return [(group, steps, notes, {})]
    return [(group, contenders(group, dev), {}, {})]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", choices=GROUPS)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per contender (after 2 warm-up rounds)")
    parser.add_argument("--quick", action="store_true",
                        help="issue 19's and the zoo groups at tiny sizes, 3 rounds: checks that they run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: the rules, regstep, subbatch, flat and zoo groups")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 3
    dev = torch.device(args.device)
    print(f"{device_name(dev)}, {args.rounds} interleaved rounds, medians{'; QUICK: tiny sizes, not a measurement' if args.quick else ''}")
    for group in args.groups:
        try:
            built = group_tables(group, dev, args.quick)
        except ImportError as exc:  # a zoo group whose library is absent (or does not import)
            print(f"\n{group}: cannot build its model ({type(exc).__name__}: {exc})")
            continue
        for title, steps, notes, unavailable in built:
            times = {name: [] for name in steps}
            for round_ in range(args.rounds + 2):
                for name, (step, divisor) in steps.items():
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    start = time.perf_counter()
                    step()
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if round_ >= 2:
                        times[name].append((time.perf_counter() - start) / divisor)
            median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            base = next(iter(median))
            per_vector = any(divisor > 1 for _, divisor in steps.values())
            print(f"\n{title} (ratio to {base}{'; K > 1: time per vector' if per_vector else ''})")
            width = max(22, *(len(name) + 2 for name in list(median) + list(unavailable)))
            for name, value in median.items():
                note = f"  {notes[name]}" if name in notes else ""
                print(f"  {name:<{width}}{value * 1e3:10.3f} ms  {value / median[base]:6.2f}x{note}")
            for name, why in unavailable.items():
                print(f"  {name:<{width}}cannot run: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
