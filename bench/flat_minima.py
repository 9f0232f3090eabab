"""Equal-wall-time accuracy of the flat-minima rules (issue 18): every rule and seed trains for the same
seconds of training steps (``fit(time_budget=)``, evaluation excluded) on

* ``geng``: Geng et al.'s protocol as ``fastcurv reproduce geng`` runs it (mnist5k, FC 3x512 ReLU, SGD
  momentum 0.9, lr 0.05, B=256), and
* ``cnn``: a small CNN on mnist5k (conv 16 - pool - conv 32 - pool - linear, ReLU, B=128, same optimizer);

then the test accuracy of each rule at several budgets (read off the same runs: the learning rate is
constant, so the accuracy after t seconds of a longer run is the accuracy of a t-second run) with the
paired test of ``fastcurv.reproduce.verdict`` against sgd and against sam. Wall-time budgets on a shared
machine favour whichever rule ran in a quiet stretch, so the tables also give the accuracy at equal
*compute*: each rule's steps weighted by its step cost relative to sgd, timed interleaved on the same
model and batch (``measure_step_costs``), with budgets in sgd steps.

    OMP_NUM_THREADS=1 python bench/flat_minima.py --budget 40 --seeds 3 --out docs/flat-minima
    OMP_NUM_THREADS=1 python bench/flat_minima.py --measure-costs --out docs/flat-minima   # re-time the steps only

Writes ``DIR/{protocol}.json`` (histories, steps, seconds, device), ``DIR/{protocol}_accuracy_vs_time.png``
and ``DIR/{protocol}.md`` (the tables). Every number comes from the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

from fastcurv.cli import _time_plot, accuracy_at_times
from fastcurv.data import load
from fastcurv.reproduce.common import environment
from fastcurv.reproduce.geng import model_for as geng_model
from fastcurv.reproduce.verdict import mean_std, paired_test
from fastcurv.train import fit

PROTOCOLS = {
    "geng": dict(batch_size=256, subsample=32),
    "cnn": dict(batch_size=128, subsample=16),
}


def cnn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def rules_for(protocol: str) -> dict[str, tuple[str, dict]]:
    """label -> (rule, options); subsample = B/8, every = 4, the penalty's alpha the rule default."""
    b = PROTOCOLS[protocol]["subsample"]
    return {
        "sgd": ("sgd", {}),
        "sam": ("sam", {}),
        "looksam": ("looksam", {}),
        "gnp": ("gnp", {}),
        "curvature": ("curvature", {}),
        f"curvature subsample={b}": ("curvature", {"subsample": b}),
        "curvature every=4": ("curvature", {"every": 4}),
    }


def measure_step_costs(protocol: str, rounds: int = 6, block: int = 20) -> dict:
    """Each rule's training step on this protocol's model and batch, timed interleaved (every rule runs
    ``block`` consecutive steps per round, in turn; median over rounds of the time per step): milliseconds
    per step and the ratio to sgd. ``block`` is a multiple of looksam's k = 5 and of every = 4, so each
    block holds whole cycles of their cheap and expensive steps. Unlike the training runs' own seconds
    per step, a slow stretch of a shared machine falls on every rule alike."""
    import time

    from fastcurv.train import make_rule, per_example_loss

    data = load("mnist5k")
    batch = PROTOCOLS[protocol]["batch_size"]
    x, y = data.x_train[:batch], data.y_train[:batch]
    steps = {}
    for label, (rule, options) in rules_for(protocol).items():
        model = geng_model(512, 0) if protocol == "geng" else cnn_model(0)
        bound = make_rule(rule, **options).bind(model, per_example_loss("cross_entropy"), epochs=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        steps[label] = lambda bound=bound, optimizer=optimizer: bound.step(x, y, optimizer, epoch=0)
    times = {label: [] for label in steps}
    for round_ in range(rounds + 1):
        for label, step in steps.items():
            start = time.perf_counter()
            for _ in range(block):
                step()
            if round_ >= 1:  # a warm-up round
                times[label].append((time.perf_counter() - start) / block)
    ms = {label: 1e3 * sorted(t)[len(t) // 2] for label, t in times.items()}
    return {"rounds": rounds, "steps_per_block": block, "ms_per_step": ms,
            "ratio_to_sgd": {label: ms[label] / ms["sgd"] for label in ms}}


def accuracy_at_compute(history: list[dict], ratio: float, budgets: list[float]) -> list[float]:
    """Test accuracy of the last evaluation within each compute budget, in sgd-step units (steps taken x
    the rule's step cost relative to sgd); nan before the first evaluation."""
    values = []
    for budget in budgets:
        within = [entry for entry in history if entry["steps"] * ratio <= budget]
        values.append(within[-1]["test_accuracy"] if within else float("nan"))
    return values


def run(protocol: str, budget: float, seeds: int) -> dict:
    data = load("mnist5k")
    batch = PROTOCOLS[protocol]["batch_size"]
    results = {"protocol": protocol, "time_budget": budget, "environment": environment(), "batch_size": batch,
               "dataset": {"name": f"mnist5k ({protocol})"}, "rules": {}}
    rules = rules_for(protocol)
    results["step_costs"] = measure_step_costs(protocol)
    for label in rules:
        results["rules"][label] = {"rule": rules[label][0], "options": rules[label][1], "runs": []}
    for seed in range(seeds):
        for label, (rule, options) in rules.items():  # rules interleaved within each seed
            model = geng_model(512, seed) if protocol == "geng" else cnn_model(seed)
            history = fit(model, data, rule=rule, rule_options=options, optimizer="sgd", lr=0.05, momentum=0.9,
                          epochs=10**9, batch_size=batch, seed=seed, loss="cross_entropy", time_budget=budget,
                          progress=False).to_list()
            last = history[-1]
            results["rules"][label]["runs"].append({
                "seed": seed, "history": history, "steps_taken": last["steps"], "train_seconds": last["wall_time"],
                "time_per_step": last["wall_time"] / max(last["steps"], 1)})
            print(f"{protocol} seed {seed} {label:<26} acc {last['test_accuracy']:.4f} steps {last['steps']}",
                  file=sys.stderr, flush=True)
    return results


def _mean_cells(per_budget: list[list[float]]) -> str:
    """One table row's ``mean ± std`` cells, a budget each."""
    return " | ".join("{:.4f} ± {:.4f}".format(*mean_std(values)) for values in per_budget)


def _paired_rows(acc: dict, rules: list[str], n_budgets: int) -> list[str]:
    """Paired t-test rows, every rule against sgd and against sam, a cell per budget."""
    rows = []
    for baseline in ("sgd", "sam"):
        for r in rules:
            if r == baseline:
                continue
            cells = []
            for i in range(n_budgets):
                test = paired_test(acc[r][i], acc[baseline][i])
                star = "*" if test["p_t"] == test["p_t"] and test["p_t"] < 0.05 else ""
                cells.append(f"{test['mean_difference']:+.4f} (p {test['p_t']:.2f}){star}")
            rows.append(f"| {r} | {baseline} | " + " | ".join(cells) + " |")
    return rows


def _winners(acc: dict, rules: list[str], labels: list[str]) -> str:
    """The rule with the highest mean accuracy at each budget (``labels[i]`` names budget i)."""
    best = []
    for i, label in enumerate(labels):
        means = {r: mean_std(acc[r][i])[0] for r in rules}
        winner = max(means, key=lambda r: means[r] if means[r] == means[r] else -1)
        best.append(label.format(winner=winner, mean=means[winner]))
    return "; ".join(best)


def tables(results: dict, checkpoints: list[float]) -> str:
    rules = list(results["rules"])
    env = results["environment"]
    lines = [f"# Equal wall time: {results['dataset']['name']}", "",
             f"Device: {env['device']}, {env['torch_threads']} torch thread(s), torch {env['torch']}; "
             f"{results.get('machine_note') or 'machine load not recorded'} (1-minute load average at the start "
             f"and end: {results.get('load_average', ['?', '?'])[0]} and {results.get('load_average', ['?', '?'])[-1]}; "
             "every rule ran each seed in turn, so a slow stretch falls on all of them). "
             f"Budget {results['time_budget']:g} s of training steps per rule and seed, "
             f"{len(results['rules']['sgd']['runs'])} seeds, batch {results['batch_size']}; accuracies at smaller "
             "budgets are read off the same runs (constant learning rate).", "",
             "| rule | steps in budget | ms / step | " + " | ".join(f"test acc @ {t:.3g} s" for t in checkpoints) + " |",
             "|---|---|---|" + "---|" * len(checkpoints)]
    acc = {r: [[accuracy_at_times(run["history"], [t], "test_accuracy")[0] for run in results["rules"][r]["runs"]]
               for t in checkpoints] for r in rules}
    for r in rules:
        runs = results["rules"][r]["runs"]
        steps, _ = mean_std([run["steps_taken"] for run in runs])
        ms, _ = mean_std([1e3 * run["time_per_step"] for run in runs])
        lines.append(f"| {r} | {steps:.0f} | {ms:.1f} | " + _mean_cells(acc[r]) + " |")
    lines += ["", "Paired t-test over seeds (fastcurv.reproduce.verdict.paired_test), difference in test accuracy "
              "(rule minus baseline), p two-sided; * = significant at 0.05.", "",
              "| rule | vs | " + " | ".join(f"@ {t:.3g} s" for t in checkpoints) + " |",
              "|---|---|" + "---|" * len(checkpoints)]
    lines += _paired_rows(acc, rules, len(checkpoints))
    labels = [f"@ {t:.3g} s: highest mean {{winner}} ({{mean:.4f}})" for t in checkpoints]
    lines += ["", "Highest mean test accuracy per budget: " + _winners(acc, rules, labels) + "."]
    if "step_costs" in results:
        lines += equal_compute_tables(results)
    return "\n".join(lines) + "\n"


def equal_compute_tables(results: dict) -> list[str]:
    """Accuracy at equal compute: budgets in sgd steps, each rule's steps weighted by its interleaved step
    cost, so the comparison does not depend on how loaded the machine was while each run trained."""
    rules, costs = list(results["rules"]), results["step_costs"]
    ratio = costs["ratio_to_sgd"]
    reach = min(run["steps_taken"] * ratio[r] for r in rules for run in results["rules"][r]["runs"])
    budgets = [reach / 3, 2 * reach / 3, reach]
    acc = {r: [[accuracy_at_compute(run["history"], ratio[r], [c])[0] for run in results["rules"][r]["runs"]]
               for c in budgets] for r in rules}
    lines = ["", "## Equal compute", "",
             f"Step costs measured interleaved on this protocol's model and batch ({costs['rounds']} rounds of "
             f"{costs.get('steps_per_block', 1)} steps per rule, medians, same machine); budgets in sgd steps (steps taken x step cost / sgd's), up to the "
             "largest every run reached.", "",
             "| rule | ms / step (interleaved) | cost / sgd | " + " | ".join(f"test acc @ {c:.0f} sgd steps" for c in budgets) + " |",
             "|---|---|---|" + "---|" * len(budgets)]
    for r in rules:
        lines.append(f"| {r} | {costs['ms_per_step'][r]:.1f} | {ratio[r]:.2f} | " + _mean_cells(acc[r]) + " |")
    lines += ["", "Paired t-test over seeds at equal compute (rule minus baseline); * = significant at 0.05.", "",
              "| rule | vs | " + " | ".join(f"@ {c:.0f}" for c in budgets) + " |", "|---|---|" + "---|" * len(budgets)]
    lines += _paired_rows(acc, rules, len(budgets))
    labels = [f"@ {c:.0f} sgd steps: {{winner}} ({{mean:.4f}})" for c in budgets]
    return lines + ["", "Highest mean test accuracy at equal compute: " + _winners(acc, rules, labels) + ".", ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", default="geng,cnn")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of training steps per rule and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="docs/flat-minima")
    parser.add_argument("--machine-note", default="", help="what else ran on the machine (written into the tables)")
    parser.add_argument("--measure-costs", action="store_true", help="time each rule's step interleaved, add it to "
                        "OUT/{protocol}.json and rewrite the tables (no training)")
    parser.add_argument("--tables-only", action="store_true", help="rewrite OUT/{protocol}.md and the plot from "
                        "OUT/{protocol}.json (no training)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    checkpoints = [args.budget / 3, 2 * args.budget / 3, args.budget]
    if args.tables_only or args.measure_costs:
        for protocol in args.protocols.split(","):
            path = os.path.join(args.out, f"{protocol}.json")
            with open(path) as handle:
                results = json.load(handle)
            if args.measure_costs:
                results["step_costs"] = measure_step_costs(protocol)
                with open(path, "w") as handle:
                    json.dump(results, handle, indent=1, default=float)
            write_tables(results, [results["time_budget"] * k / 3 for k in (1, 2, 3)], protocol, args.out)
        return 0
    for protocol in args.protocols.split(","):
        start_load = round(os.getloadavg()[0], 2)
        results = run(protocol, args.budget, args.seeds)
        results["load_average"] = [start_load, round(os.getloadavg()[0], 2)]
        results["machine_note"] = args.machine_note
        with open(os.path.join(args.out, f"{protocol}.json"), "w") as handle:
            json.dump(results, handle, indent=1, default=float)
        write_tables(results, checkpoints, protocol, args.out)
    return 0


def write_tables(results: dict, checkpoints: list[float], protocol: str, out: str) -> None:
    with open(os.path.join(out, f"{protocol}.md"), "w") as handle:
        handle.write(tables(results, checkpoints))
    for path in _time_plot(results, list(results["rules"]), "classification", out):
        os.replace(path, os.path.join(out, f"{protocol}_accuracy_vs_time.png"))
    print(tables(results, checkpoints))


if __name__ == "__main__":
    raise SystemExit(main())
