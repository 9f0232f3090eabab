"""The ``rules-mlp`` comparison measured interleaved: one step of every learning rule in turn, many
rounds, medians, ratios to sgd. pytest-benchmark times each contender in its own block of rounds, so on
a shared 2-core machine a slow minute can land on one contender only; alternating them spreads it over
all of them.

    python bench/interleaved_rules.py [--rounds 60] [--rules sgd metric selective_l2 ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bench_steps import rules_case  # noqa: E402  (the same model, batch and data as rules-mlp)

from fastcurv.train import RULES, make_rule  # noqa: E402
from fastcurv.train.loop import per_example_loss  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    args = parser.parse_args(argv)
    rules = ["sgd"] + [r for r in args.rules if r != "sgd"]
    dev = torch.device("cpu")
    steps = {}
    for rule in rules:
        model, x, y = rules_case(dev)
        loss = "hinge" if rule == "fisher" else "cross_entropy"
        bound = make_rule(rule).bind(model, per_example_loss(loss), epochs=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        steps[rule] = (bound, x, y, optimizer)
    times = {rule: [] for rule in rules}
    for round_ in range(args.rounds + 2):
        for rule, (bound, x, y, optimizer) in steps.items():
            start = time.perf_counter()
            bound.step(x, y, optimizer, epoch=0)
            if round_ >= 2:  # two warm-up rounds
                times[rule].append(time.perf_counter() - start)
    median = {rule: sorted(t)[len(t) // 2] for rule, t in times.items()}
    print(f"rules-mlp interleaved, {args.rounds} rounds, cpu ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    for rule in rules:
        print(f"  {rule:<22}{median[rule] * 1e3:8.3f} ms  {median[rule] / median['sgd']:6.2f}x sgd")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
