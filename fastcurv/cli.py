"""The ``fastcurv`` command.

* ``fastcurv --version``: version and available backends.
* ``fastcurv compare``: train several rules from the same seeds, print a mean +- std table, write
  ``DIR/results.json`` and PNG plots.
* ``fastcurv train``: one run of one rule, with a checkpoint (resumable).
* ``fastcurv sharpness CHECKPOINT``: curvature metrics of a saved model.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import statistics
import sys

import torch

from fastcurv._io import write_json

# Defaults sized so that `fastcurv compare` with no options finishes in a few minutes on 2 CPU cores.
COMPARE_RULES = "sgd,l2,curvature,fisher,subbatch,metric,selective_l2"
COMPARE_EPOCHS = 20
COMPARE_SEEDS = 3
# The loss every rule's sharpness (top Hessian eigenvalue) and second gap are measured on in `compare`.
COMMON_LOSS = {"classification": "cross_entropy", "regression": "mse"}

# Generic flags -> (hyperparameter, rules it applies to). Rule-specific meanings differ (subbatch's
# alpha is a perturbation size, fisher's beta an L2 weight), so each flag targets the rules below only;
# anything else goes through --set rule.key=value.
FLAG_TARGETS = {
    "alpha": ("alpha", ("curvature",)),
    "lam": ("lam", ("l2", "metric", "selective_l2", "l2_stopped", "l2_stopped_selective")),
    "gamma": ("gamma", ("fisher",)),
    "beta": ("beta", ("subbatch",)),
    "omega": ("omega", ("selective_l2", "l2_stopped_selective")),
    "tau": ("tau", ("l2_stopped", "l2_stopped_selective")),
}


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


def _version_text() -> str:
    import fastcurv
    from fastcurv._backend import available, extension_problem

    backends = ", ".join(f"{name}={'yes' if ok else 'no'}" for name, ok in available().items())
    missing = extension_problem()
    return f"fastcurv {fastcurv.__version__} (torch {torch.__version__}; backends: {backends})" + (
        f"\n{missing}" if missing else "")


def _parse_rules(text: str) -> list[str]:
    from fastcurv.train import RULES

    rules = [r.strip() for r in text.split(",") if r.strip()]
    if not rules:
        raise UsageError(f"--rules is empty; valid rules: {', '.join(RULES)}")
    bad = [r for r in rules if r not in RULES]
    if bad:
        raise UsageError(f"unknown rule(s) {', '.join(map(repr, bad))}; valid rules: {', '.join(RULES)}")
    if len(set(rules)) != len(rules):
        raise UsageError(f"--rules lists a rule twice: {text}")
    return rules


def _check_dataset(name: str) -> str:
    from fastcurv.data import DATASETS

    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return name


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as per_example


def rule_options(rules: list[str], args) -> dict[str, dict]:
    """Per-rule hyperparameter overrides from the generic flags and ``--set rule.key=value``."""
    from fastcurv.train import DEFAULTS, RULES

    options: dict[str, dict] = {r: {} for r in rules}
    for flag, (key, targets) in FLAG_TARGETS.items():
        value = getattr(args, flag, None)
        if value is not None:
            for r in rules:
                if r in targets:
                    options[r][key] = value
    for item in getattr(args, "set", None) or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UsageError(f"--set expects rule.key=value (e.g. l2.lam=1e-3), got {item!r}")
        lhs, value = item.split("=", 1)
        rule, key = lhs.split(".", 1)
        if rule not in RULES:
            raise UsageError(f"--set {item!r}: unknown rule {rule!r}; valid rules: {', '.join(RULES)}")
        if key not in DEFAULTS[rule]:
            valid = ", ".join(sorted(DEFAULTS[rule])) or "none"
            raise UsageError(f"--set {item!r}: rule {rule!r} has no hyperparameter {key!r}; valid: {valid}")
        parsed = _parse_value(value)
        _check_set_type(item, rule, key, parsed, DEFAULTS[rule][key])
        if rule in options:
            options[rule][key] = parsed
    return options


def _check_set_type(item: str, rule: str, key: str, value, default) -> None:
    """The value of ``--set rule.key=value`` must have the type of the hyperparameter's default."""
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "True or False"
    elif isinstance(default, (int, float)) or default is None:  # None: tau, an epoch count (default: half)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number" if default is not None else "an integer (or None)"
        ok = ok or (default is None and value is None)
    else:
        ok, expected = isinstance(value, type(default)), f"a {type(default).__name__}"
    if not ok:
        raise UsageError(f"--set {item!r}: {rule}.{key} must be {expected} (default {default!r}), got {value!r}")


def _option_flags(rule: str, args) -> list[str]:
    """The command-line flags that set ``rule``'s hyperparameters, to name them in an error."""
    flags = [f"--{flag} {getattr(args, flag)}" for flag, (_, targets) in FLAG_TARGETS.items()
             if rule in targets and getattr(args, flag, None) is not None]
    flags += [f"--set {item}" for item in (getattr(args, "set", None) or []) if item.split(".", 1)[0] == rule]
    return flags


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="digits | xor | xord | synthetic | mnist | cifar10 (default: digits)")
    p.add_argument("--data-dir", default=None, help="folder with MNIST/CIFAR-10 files (or FASTCURV_DATA)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--lr", type=float, default=0.05, help="initial learning rate (default 0.05)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr-drop", type=int, default=None,
                   help="step halving lr0 * 0.5^ceil(t/lr_drop) (Fisher regularization paper, docs/METHODS.md section 4); default: constant lr")
    p.add_argument("--after-first-drop", action="store_true",
                   help="plain SGD until the first LR drop, then the rule (Jia & Su 2020); needs --lr-drop")
    p.add_argument("--loss", default="auto", choices=("auto", "cross_entropy", "hinge", "mse"),
                   help="auto: cross-entropy (hinge for rule fisher) for classification, MSE for regression")
    p.add_argument("--init", default="default", choices=("default", "small", "large"),
                   help="Jarvis (2021)'s initialization regime (default: PyTorch's)")
    p.add_argument("--activation", default="tanh", choices=("tanh", "relu"))
    p.add_argument("--width", type=int, default=None, help="hidden width of the default model")
    p.add_argument("--curvature-samples", type=int, default=256,
                   help="training examples used for the per-epoch Hessian eigenvalue (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for flag, (key, targets) in FLAG_TARGETS.items():
        p.add_argument(f"--{flag}", type=float if flag != "tau" else int, default=None,
                       help=f"{key} of rule(s) {', '.join(targets)}")
    p.add_argument("--set", action="append", metavar="RULE.KEY=VALUE",
                   help="any rule hyperparameter, e.g. --set subbatch.num_subbatches=4 (repeatable)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcurv", description="Curvature-aware training: compare learning rules, inspect sharpness.")
    parser.add_argument("--version", action="store_true", help="print the version and available backends")
    sub = parser.add_subparsers(dest="command")

    cmp = sub.add_parser("compare", help="train several rules from the same seeds and compare them")
    _add_training_args(cmp)
    cmp.add_argument("--rules", default=COMPARE_RULES, help=f"comma-separated (default: {COMPARE_RULES})")
    cmp.add_argument("--epochs", type=int, default=COMPARE_EPOCHS)
    cmp.add_argument("--seeds", type=int, default=COMPARE_SEEDS, help="number of seeds (0..S-1)")
    cmp.add_argument("--out", default="fastcurv-compare", help="output folder (results.json, plots, checkpoints)")
    cmp.add_argument("--no-eigenvalue", action="store_true", help="skip the per-epoch top Hessian eigenvalue")
    cmp.add_argument("--no-plots", action="store_true")
    cmp.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                     help="train every rule and seed for this many seconds of training steps instead of --epochs "
                          "(evaluation excluded); table and plot of test accuracy against wall time")

    tr = sub.add_parser("train", help="train one rule once, with a resumable checkpoint")
    _add_training_args(tr)
    tr.add_argument("--rule", default="sgd")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--checkpoint", required=True, help="checkpoint path (written every epoch)")
    tr.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    tr.add_argument("--overwrite", action="store_true", help="start over even if --checkpoint exists (replacing it)")
    tr.add_argument("--track-eigenvalue", action="store_true")
    tr.add_argument("--statistics", default=None, metavar="NAMES",
                    help="per-epoch training statistics, comma-separated: noise_scale (gradient noise scale, "
                         "overall and per layer), grand (GraNd mean/std/max)")

    sh = sub.add_parser("sharpness", help="curvature metrics of a checkpoint written by compare/train")
    sh.add_argument("checkpoint")
    sh.add_argument("--samples", type=int, default=256, help="training examples to measure on (default 256)")
    sh.add_argument("--data-dir", default=None)
    sh.add_argument("--logdet-subset", type=int, default=64, help="subset size N' of the log-det metric (default 64)")
    sh.add_argument("--logdet-trials", type=int, default=10, help="random subsets averaged (default 10)")
    sh.add_argument("--density", default=None, metavar="PNG",
                    help="also write the Hessian's spectral density (SLQ, log scale) to this image file")
    sh.add_argument("--data-batches", type=int, default=None, metavar="R",
                    help="also measure the top eigenvalue and trace on R disjoint batches of --samples training "
                         "examples each: mean ± standard error over batches, their spread and range")

    from fastcurv.reproduce.cli import add_parser as add_reproduce_parser

    add_reproduce_parser(sub)
    return parser


def _check_training_args(args) -> None:
    """Every numeric flag checked before anything trains, the error naming the flag."""
    from fastcurv._validate import check_number

    checks = [("--lr", args.lr, dict(low=0, low_open=True)), ("--momentum", args.momentum, dict(low=0)),
              ("--batch-size", args.batch_size, dict(integer=True, low=1)),
              ("--epochs", args.epochs, dict(integer=True, low=1)),
              ("--curvature-samples", args.curvature_samples, dict(integer=True, low=1)),
              ("--width", args.width, dict(integer=True, low=1)),
              ("--lr-drop", args.lr_drop, dict(integer=True, low=1, why="epochs between halvings")),
              ("--seed", getattr(args, "seed", 0), dict(integer=True))]
    for flag, value, bounds in checks:
        if value is None:  # an optional flag left out (--width, --lr-drop): its default applies, nothing to check
            continue
        try:
            check_number(None, flag, value, **bounds)
        except ValueError as err:
            raise UsageError(str(err)) from None


def _fit_kwargs(args) -> dict:
    _check_training_args(args)
    if args.after_first_drop and args.lr_drop is None:
        raise UsageError("--after-first-drop needs --lr-drop (a schedule whose first drop it waits for)")
    return dict(optimizer=args.optimizer, lr=args.lr, momentum=args.momentum if args.optimizer == "sgd" else 0.0,
                batch_size=args.batch_size, schedule=args.lr_drop, loss=args.loss,
                regularize_after_first_drop=args.after_first_drop, curvature_samples=args.curvature_samples,
                progress=False if args.quiet else None)


def _model_for(spec: dict, seed: int):
    from fastcurv.data import default_model

    torch.manual_seed(seed)  # same initial weights for every rule run with this seed
    return default_model(spec["dataset"], activation=spec["activation"], width=spec["width"])


def _init_for(args) -> tuple[str, float]:
    from fastcurv.train import regime

    try:
        return regime(args.dataset, args.init)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _cmd_compare(args) -> int:
    from fastcurv.data import load
    from fastcurv.train import fit
    from fastcurv.train.loop import resolve_loss

    dataset_name = _check_dataset(args.dataset)
    rules = _parse_rules(args.rules)
    options = rule_options(rules, args)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file; give a folder for results.json, plots and checkpoints")
    fit_kwargs = _fit_kwargs(args)
    budget = getattr(args, "time_budget", None)
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UsageError(f"--time-budget must be finite and > 0 seconds, got {budget}")
    # Equal wall time: the budget ends each run; epochs is only a bound that is never reached.
    epochs = args.epochs if budget is None else 10**9
    init_kind, init_scale = _init_for(args)
    _check_rules_ready(rules, options, {"dataset": dataset_name, "activation": args.activation, "width": args.width}, args)
    os.makedirs(os.path.join(args.out, "checkpoints"), exist_ok=True)
    spec = {"dataset": dataset_name, "activation": args.activation, "width": args.width}
    from fastcurv.reproduce.common import environment

    results = {"dataset": None, "config": {k: v for k, v in vars(args).items() if k != "command"}, "rules": {},
               "time_budget": budget, "environment": environment()}
    for rule in rules:
        results["rules"][rule] = {"options": options[rule], "runs": []}
    for seed in range(args.seeds):
        data = load(dataset_name, seed=seed, data_dir=args.data_dir)
        results["dataset"] = data.metadata()
        # One loss for every rule's sharpness and second gap: rules train on different losses (fisher on
        # the hinge loss by default), and curvatures of different losses are not comparable.
        common_loss = COMMON_LOSS[data.task]
        results["sharpness_loss"] = common_loss
        for rule in rules:
            results["rules"][rule]["training_loss"] = resolve_loss(args.loss, data.task, rule)
            model = _model_for(spec, seed)
            ckpt = os.path.join(args.out, "checkpoints", f"{rule}_seed{seed}.pt")
            history = fit(model, data, rule=rule, rule_options=options[rule], epochs=epochs, seed=seed,
                          init=init_kind, init_scale=init_scale, track_eigenvalue=not args.no_eigenvalue,
                          checkpoint=ckpt, model_spec={**spec, "seed": seed}, measure_loss=common_loss,
                          time_budget=budget, **fit_kwargs)
            last = history.last
            results["rules"][rule]["runs"].append({
                "seed": seed, "history": history.to_list(), "steps_taken": last["steps"],
                "train_seconds": last["wall_time"], "time_per_step": last["wall_time"] / max(last["steps"], 1)})
            if not args.quiet and _rank() == 0:
                last = history.last
                metric = "test_accuracy" if data.task == "classification" else "test_error"
                print(f"  seed {seed} {rule:<22} {metric} {last[metric]:.4f}  gap {last['gap']:+.4f} "
                      f"({results['rules'][rule]['training_loss']})", file=sys.stderr)
    task = results["dataset"]["task"]
    _summarize(results, rules, task)
    if _rank() != 0:  # data-parallel run: rank 0 writes the outputs
        return 0
    write_json(os.path.join(args.out, "results.json"), results, indent=1, default=float)
    print(_table(results, rules, task))
    if not args.no_plots:
        # per-epoch curves need equal epoch counts; equal-time runs take different numbers of epochs
        written = _plots(results, rules, task, args.out) if budget is None else _time_plot(results, rules, task, args.out)
        for path in written:
            print(f"wrote {path}")
    print(f"wrote {os.path.join(args.out, 'results.json')}")
    return 0


def _check_rules_ready(rules: list[str], options: dict, spec: dict, args) -> None:
    """Build every rule on a throwaway model before training anything, so that a missing regularizer
    module or a bad hyperparameter stops the run at once instead of after the other rules trained."""
    from fastcurv.train import make_rule, per_example_loss

    for rule in rules:
        try:
            make_rule(rule, **options[rule]).bind(_model_for(spec, 0), per_example_loss("cross_entropy"), max(args.epochs, 1))
        except ImportError as err:
            raise UsageError(f"rule {rule!r} is unavailable: {err}") from None
        except (TypeError, ValueError) as err:
            flags = _option_flags(rule, args)
            raise UsageError(f"{' '.join(flags) + ': ' if flags else ''}rule {rule!r}: {err}") from None


def _summarize(results: dict, rules: list[str], task: str) -> None:
    metric = "test_accuracy" if task == "classification" else "test_error"
    base = "sgd" if "sgd" in rules else rules[0]

    def mean_time(rule):
        # Median over a run's epochs: robust to an epoch stalled by other processes on the machine.
        runs = results["rules"][rule]["runs"]
        return _mean_std([statistics.median(r["time_per_step"] for r in run["history"]) for run in runs])[0]

    base_time = mean_time(base)
    for rule in rules:
        runs = results["rules"][rule]["runs"]
        finals = [run["history"][-1] for run in runs]
        summary = {"relative_to": base, "time_per_step": mean_time(rule), "relative_time": mean_time(rule) / base_time}
        steps, _ = _mean_std([run["steps_taken"] for run in runs])
        summary["steps_taken"] = steps
        for key in (metric, "gap", "measure_gap", "top_eigenvalue", "param_norm", "train_loss", "test_loss"):
            mean, std = _mean_std([f.get(key, math.nan) for f in finals])
            summary[key] = {"mean": mean, "std": std}
        results["rules"][rule]["summary"] = summary


def _table(results: dict, rules: list[str], task: str) -> str:
    metric = "test_accuracy" if task == "classification" else "test_error"
    base = results["rules"][rules[0]]["summary"]["relative_to"]
    common = results["sharpness_loss"]
    columns = [("rule", 22), ("trained on", 15), (metric, 22), ("gap, training loss", 22),
               (f"gap, {common}", 24), (f"top Hessian eig, {common}", 34), ("time/step vs " + base, 20)]
    header = "".join(f"{name:<{width}}" if i < 2 else f"{name:>{width}}" for i, (name, width) in enumerate(columns))
    lines = [header, "-" * len(header)]
    for rule in rules:
        s = results["rules"][rule]["summary"]
        cells = [f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}" for k in (metric, "gap", "measure_gap", "top_eigenvalue")]
        lines.append(f"{rule:<22}{results['rules'][rule]['training_loss']:<15}{cells[0]:>22}{cells[1]:>22}"
                     f"{cells[2]:>24}{cells[3]:>34}{s['relative_time']:>19.2f}x")
    lines.append(f"gap = test loss - train loss; 'training loss' is each rule's own (column 'trained on'), the "
                 f"other gap and the eigenvalue are of the {common} for every rule.")
    if results.get("time_budget") is not None:
        lines.append(f"equal wall time: {results['time_budget']:g} s of training steps per rule and seed on "
                     f"{results['environment']['device']}; steps taken: "
                     + ", ".join(f"{r} {results['rules'][r]['summary']['steps_taken']:.0f}" for r in rules))
    return "\n".join(lines)


def accuracy_at_times(history: list[dict], times: list[float], key: str) -> list[float]:
    """The metric of the last evaluation at or before each time (training seconds), nan before the first."""
    values, i = [], 0
    for t in times:
        while i < len(history) and history[i]["wall_time"] <= t:
            i += 1
        values.append(history[i - 1][key] if i else math.nan)
    return values


def _time_plot(results: dict, rules: list[str], task: str, out: str) -> list[str]:
    """Test metric against training wall time, mean and labelled ± std band over seeds on a common time
    grid (the reproductions' plot_curves: one line style and marker per rule)."""
    from fastcurv.reproduce.common import plot_curves

    metric = "test_accuracy" if task == "classification" else "test_error"
    # Up to the last evaluation: the partial last epoch ends after the budget, and a grid ending at the
    # budget would leave a short run's only evaluation off the plot.
    end = max([results["time_budget"]] + [r["wall_time"] for rule in rules for run in results["rules"][rule]["runs"]
                                           for r in run["history"]])
    grid = [end * (i + 1) / 100 for i in range(100)]
    series = {rule: [accuracy_at_times(run["history"], grid, metric) for run in results["rules"][rule]["runs"]]
              for rule in rules}
    path = plot_curves(os.path.join(out, f"{metric}_vs_time.png"),
                       f"{results['dataset']['name']}: {metric.replace('_', ' ')} at equal wall time "
                       f"({results['environment']['device']})", metric.replace("_", " "), series,
                       xlabel="training wall time (s)", x=grid)
    return [path] if path else []


def _plots(results: dict, rules: list[str], task: str, out: str) -> list[str]:
    """Per-epoch curves of the rules (1-based epochs, one line style and marker per rule, labelled std
    bands): the reproductions' plot_curves."""
    from fastcurv.reproduce.common import plot_curves

    metric = "test_accuracy" if task == "classification" else "test_error"
    written = []
    for key, fname in ((metric, f"{metric}.png"), ("top_eigenvalue", "top_eigenvalue.png")):
        series, epochs = {}, None
        for rule in rules:
            runs = results["rules"][rule]["runs"]
            per_seed = [[r.get(key, math.nan) for r in run["history"]] for run in runs]
            if all(math.isnan(v) for s in per_seed for v in s):
                continue
            series[f"{rule} (trained on {results['rules'][rule]['training_loss']})"] = per_seed
            epochs = [r["epoch"] + 1 for r in runs[0]["history"]]  # history epochs count from 0
        if not series:
            continue
        label = key.replace("_", " ") + (f" of the {results['sharpness_loss']}" if key == "top_eigenvalue" else "")
        path = plot_curves(os.path.join(out, fname), f"{results['dataset']['name']}: {label}", label, series, x=epochs)
        if path:
            written.append(path)
    return written


def _cmd_train(args) -> int:
    from fastcurv.data import load
    from fastcurv.train import RULES, ResumeMismatchError, fit

    dataset_name = _check_dataset(args.dataset)
    if args.rule not in RULES:
        raise UsageError(f"unknown rule {args.rule!r}; valid rules: {', '.join(RULES)}")
    options = rule_options([args.rule], args)
    fit_kwargs = _fit_kwargs(args)
    budget = getattr(args, "time_budget", None)
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UsageError(f"--time-budget must be finite and > 0 seconds, got {budget}")
    # Equal wall time: the budget ends each run; epochs is only a bound that is never reached.
    epochs = args.epochs if budget is None else 10**9
    init_kind, init_scale = _init_for(args)
    spec = {"dataset": dataset_name, "activation": args.activation, "width": args.width}
    _check_checkpoint_flag(args)
    statistics = _statistics_flag(args.statistics)
    _check_rules_ready([args.rule], options, spec, args)
    data = load(dataset_name, seed=args.seed, data_dir=args.data_dir)
    model = _model_for(spec, args.seed)
    try:
        history = fit(model, data, rule=args.rule, rule_options=options[args.rule], epochs=args.epochs,
                      seed=args.seed, init=init_kind, init_scale=init_scale, track_eigenvalue=args.track_eigenvalue,
                      checkpoint=args.checkpoint, resume=args.resume, model_spec={**spec, "seed": args.seed},
                      statistics=statistics, **fit_kwargs)
    except ResumeMismatchError as err:
        raise UsageError(_resume_mismatch_text(args, err)) from None
    if _rank() == 0:
        for record in history:
            print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}))
    return 0


def _statistics_flag(value) -> tuple:
    from fastcurv.train.statistics import STATISTICS

    if value is None:
        return ()
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    bad = [name for name in names if name not in STATISTICS]
    if bad or not names:
        raise UsageError(f"--statistics {value!r}: unknown {', '.join(map(repr, bad)) or 'empty list'}; valid: "
                         f"{', '.join(STATISTICS)}")
    return names


# fit's resume keys (fastcurv.train.loop._RESUME_KEYS, dotted for nested ones) -> the flag that sets them.
RESUME_FLAGS = {
    "model_spec.dataset": "--dataset", "data": "--dataset", "task": "--dataset", "model_spec.activation": "--activation",
    "model_spec.width": "--width", "model": "--activation/--width", "seed": "--seed", "model_spec.seed": "--seed",
    "rule.rule": "--rule", "loss": "--loss", "lr": "--lr", "batch_size": "--batch-size", "optimizer": "--optimizer",
    "momentum": "--momentum", "schedule": "--lr-drop", "regularize_after_first_drop": "--after-first-drop",
    "track_eigenvalue": "--track-eigenvalue", "curvature_samples": "--curvature-samples", "init": "--init",
    "init_scale": "--init",
}


def _resume_flag(key: str, rule: str) -> str:
    """The flag behind one resume key: a rule hyperparameter ``rule.alpha`` is ``--alpha`` where that
    flag targets the rule, else ``--set rule.alpha=...``."""
    if key in RESUME_FLAGS:
        return RESUME_FLAGS[key]
    if key.startswith("rule."):
        name = key.split(".", 1)[1]
        flags = [f"--{flag}" for flag, (hyper, targets) in FLAG_TARGETS.items() if hyper == name and rule in targets]
        return " / ".join(flags + [f"--set {rule}.{name}=..."])
    return key


def _resume_mismatch_text(args, err) -> str:
    """One line naming each flag whose value differs from the checkpoint's run, with both values."""
    differences = err.differences
    keys = {key for key, _, _ in differences}
    if keys - {"model", "data", "task"}:  # the fingerprints only add news when no flag explains them
        differences = [d for d in differences if d[0] not in ("model", "data", "task")]
    if "lr" in keys:  # the schedule's repr carries lr0: not a --lr-drop change unless its kind differs
        differences = [d for d in differences if d[0] != "schedule" or str(d[1]).split("(")[0] != str(d[2]).split("(")[0]]
    seen, parts = set(), []
    for key, saved, now in differences:
        flag = _resume_flag(key, args.rule)
        if flag in seen:  # e.g. --seed changes the seed, the model_spec seed and the generated data
            continue
        seen.add(flag)
        shown = lambda value: "the default" if value is None else repr(value)  # noqa: E731
        parts.append(f"{flag}: checkpoint {shown(saved)}, now {shown(now)}")
    return (f"--resume: the checkpoint {args.checkpoint!r} was written by a different run ({'; '.join(parts)}). "
            "Pass the same flags to continue it, --overwrite to start over, or another --checkpoint")


def _check_checkpoint_flag(args) -> None:
    """--checkpoint must name a file we may write, and an existing one is continued (--resume) or replaced
    (--overwrite), never overwritten silently."""
    path = args.checkpoint
    if os.path.isdir(path):
        raise UsageError(f"--checkpoint {path!r} is a directory; give a file name such as {os.path.join(path, 'run.pt')!r}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the checkpoint, "
                         "--overwrite discards it and starts over; pass one of them")
    if os.path.exists(path) and not (args.resume or args.overwrite):
        raise UsageError(f"--checkpoint {path!r} already exists; pass --resume to continue it or --overwrite to "
                         "start over and replace it")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--checkpoint {path!r}: cannot create its folder ({err.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--checkpoint {path!r}: folder {folder!r} is not writable")


def _cmd_sharpness(args) -> int:
    from fastcurv.data import load
    from fastcurv.train import load_checkpoint, per_example_loss

    for flag, value in (("--samples", args.samples), ("--logdet-subset", args.logdet_subset),
                        ("--logdet-trials", args.logdet_trials), ("--data-batches", args.data_batches)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    state = load_checkpoint(args.checkpoint)
    spec = state.get("model_spec")
    if not spec or "dataset" not in spec:
        raise UsageError(f"checkpoint {args.checkpoint!r} has no model description (model_spec); it was not "
                         "written by `fastcurv compare`/`fastcurv train`. Use the Python API (fastcurv.metrics) on it")
    model = _model_for(spec, spec.get("seed", 0))
    model.load_state_dict(state["model_state"])
    model.eval()
    data = load(spec["dataset"], seed=spec.get("seed", 0), data_dir=args.data_dir)
    x, y = data.x_train[: args.samples], data.y_train[: args.samples]
    loss_name = state["config"]["loss"]
    loss_fn = per_example_loss(loss_name)
    lines = [f"checkpoint {args.checkpoint}: dataset {spec['dataset']}, rule {state['config']['rule']['rule']}, "
             f"epoch {state['epoch']}, loss {loss_name}, {x.shape[0]} training examples"]
    from fastcurv.curvature import Hessian, spectral_density, top_eigenvalues

    hessian = Hessian(model, lambda out, target: loss_fn(out, target).mean(), (x, y))
    values, _, info = top_eigenvalues(hessian, k=1, which="LA", tol=1e-4, return_info=True, progress=False)
    top = values[0].item()
    # residuals[0] * max |Ritz value| bounds the eigenvalue's error (fastcurv.curvature.EigenInfo)
    lines.append(f"{'top Hessian eigenvalue':<40}{top:.6g} ± {info.residuals[0] * abs(top):.2g} (residual bound)")
    lines.extend(_metrics_lines(model, x, y, loss_fn, data.task, args.logdet_subset, args.logdet_trials))
    if args.density:
        density = spectral_density(hessian, num_probes=8, lanczos_steps=64, progress=False)
        density.plot(args.density, title=f"Hessian spectral density, {os.path.basename(args.checkpoint)} "
                                         f"({x.shape[0]} examples, 8 probes)")
        lines.append(f"{'Hessian spectral density (SLQ)':<40}written to {args.density}")
    if args.data_batches:
        lines.extend(_data_batches_lines(model, data.x_train, data.y_train, loss_fn, args.data_batches, x.shape[0]))
    print("\n".join(lines))
    return 0


def _data_batches_lines(model, x_all, y_all, loss_fn, num_batches: int, examples: int) -> list[str]:
    """The top eigenvalue and trace over ``num_batches`` disjoint batches of ``examples`` training examples."""
    from fastcurv.curvature import Hessian, over_batches

    if num_batches * examples > x_all.shape[0]:
        raise UsageError(f"--data-batches {num_batches} with --samples {examples} needs {num_batches * examples} "
                         f"training examples; the data set has {x_all.shape[0]} (lower --samples or --data-batches)")
    mean_loss = lambda out, target: loss_fn(out, target).mean()  # noqa: E731
    make = lambda batch: Hessian(model, mean_loss, batch)  # noqa: E731
    pair = (x_all[: num_batches * examples], y_all[: num_batches * examples])
    lines = [f"over {num_batches} disjoint batches of {examples} examples (mean ± standard error over batches; "
             "std: one batch's spread):"]
    for label, estimate in (("top Hessian eigenvalue", over_batches(make, pair, "top_eigenvalues", num_batches=num_batches,
                                                                    tol=1e-4)),
                            ("Hessian trace", over_batches(make, pair, "trace", num_batches=num_batches, num_probes=64))):
        mean, se, sd = estimate.mean.item(), estimate.stderr.item(), estimate.std.item()
        lines.append(f"  {label:<38}{mean:.6g} ± {se:.2g} (std {sd:.2g}, range {estimate.min.item():.6g} .. "
                     f"{estimate.max.item():.6g})")
    return lines


def _metrics_lines(model, x, y, loss_fn, task, logdet_subset: int, logdet_trials: int) -> list[str]:
    """Hessian trace (fastcurv.curvature), Fisher trace, log-det metric and robustness (fastcurv.metrics).

    A metric whose implementation cannot be imported (an optional piece missing from this install) is
    reported as unavailable on its own line; the others are still printed."""
    from fastcurv import metrics
    from fastcurv.curvature import Hessian, trace

    mean_loss = lambda out, target: loss_fn(out, target).mean()  # noqa: E731
    subset = min(logdet_subset, x.shape[0])

    def logdet():
        try:
            return f"{metrics.fisher_logdet(model, x, y, subset, logdet_trials):.6g}"
        except metrics.SingularGramError as err:
            return f"undefined: {err}"

    rows = [("Hessian trace (Hutchinson, 64 probes)",
             lambda: "{:.6g} ± {:.2g} (standard error over probes)".format(
                 *trace(Hessian(model, mean_loss, (x, y)), num_probes=64, progress=False, return_stderr=True)))]
    if task == "classification":
        # Both are defined with the cross-entropy of the labels (Jia & Su 2020, Geng et al.; docs/METHODS.md sections 1-2), whatever the training loss.
        rows.append(("Fisher trace (cross-entropy)", lambda: f"{metrics.fisher_trace(model, x, y):.6g}"))
        rows.append((f"log-det metric (N'={subset}, {logdet_trials} trials)", logdet))
    else:
        rows.append(("Fisher trace, log-det metric", lambda: "n/a (defined for classification)"))
    rows.append(("robustness (1/N) sum ||J_x f||_F^2", lambda: f"{metrics.robustness(model, x):.6g}"))
    lines = []
    for label, compute in rows:
        try:
            value = compute()
        except ImportError as err:
            value = f"unavailable ({err})"
        lines.append(f"{label:<40}{value}")
    return lines


def _rank() -> int:
    from fastcurv.train.loop import distributed_rank_world

    return distributed_rank_world()[0]


def _join_torchrun(command: str) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), join the process group: ``compare`` and
    ``train`` then train data-parallel (see :func:`fastcurv.train.fit`). gloo: the command trains on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or command not in ("compare", "train"):
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastcurv`` command; returns the exit status."""
    from fastcurv.train import NonFiniteError

    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    from fastcurv.reproduce.cli import run_command as _cmd_reproduce

    commands = {"compare": _cmd_compare, "train": _cmd_train, "sharpness": _cmd_sharpness, "reproduce": _cmd_reproduce}
    joined = _join_torchrun(args.command)
    # In a data-parallel run every process validates the same arguments: rank 0 reports for all.
    prefix = f"fastcurv {args.command}" + (f" [rank {_rank()}]" if _rank() else "")
    try:
        return commands[args.command](args)
    except (UsageError, OSError, ImportError, ValueError) as err:  # OSError: unreadable/unwritable paths
        if _rank() == 0 or not isinstance(err, UsageError):
            print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"{prefix}: training diverged: {err}", file=sys.stderr)
        return 1
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
