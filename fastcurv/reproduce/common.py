"""What every reproduction shares: runs with checkpoints (``--resume``), progress, results.json, the
side-by-side table and the plots."""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from fastcurv._io import save_figure, write_json, write_text
from fastcurv.reproduce.verdict import mean_std, present

BUDGETS = ("tiny", "quick", "full")  # tiny: seconds, for the tests (hidden from --help)


@dataclass
class Session:
    """One ``fastcurv reproduce PAPER`` invocation: where it writes and how it runs."""

    paper: str
    budget: str
    seeds: list[int]
    out: str
    resume: bool = False
    quiet: bool = False
    started: float = field(default_factory=time.perf_counter)
    runs_done: int = 0
    runs_resumed: int = 0  # runs found finished or partly done in the checkpoints (--resume)

    def __post_init__(self):
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        # Checkpoints are large and only serve --resume: keep them out of git wherever OUT lives.
        write_text(os.path.join(self.checkpoint_dir, ".gitignore"), "*\n")

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.out, "checkpoints")

    def log(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def train(self, key: str, model, data, **fit_kwargs):
        """``fastcurv.train.fit`` with a checkpoint named ``key``; with ``--resume`` a finished run is
        loaded instead of retrained (its model too) and an interrupted one continues."""
        from fastcurv.train import fit

        path = os.path.join(self.checkpoint_dir, f"{key}.pt")
        self.runs_resumed += self.resume and os.path.exists(path)
        start = time.perf_counter()
        history = fit(model, data, checkpoint=path, resume=self.resume, progress=not self.quiet and sys.stderr.isatty(),
                      **fit_kwargs)
        self.runs_done += 1
        metric = "test_accuracy" if "test_accuracy" in history.last else "test_error"
        self.log(f"  [{self.paper} {self.runs_done:>3}] {key:<44} {metric} {history.last[metric]:.4f}  "
                 f"({time.perf_counter() - start:.1f}s, {self.elapsed():.0f}s total)")
        return history

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def environment() -> dict:
    """Versions and the device, for results.json."""
    import numpy

    import fastcurv

    return {
        "fastcurv": fastcurv.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }


def curves(histories: list[list[dict]], key: str) -> list[list[float]]:
    """Per-seed series of ``key`` over epochs (NaN where missing)."""
    return [[record.get(key, math.nan) for record in history] for history in histories]


def finals(histories: list[list[dict]], key: str) -> list[float]:
    """The last epoch's ``key`` of each seed's run."""
    return [history[-1].get(key, math.nan) for history in histories]


def format_cell(values) -> str:
    """``mean ± std`` over the finite values, saying how many seeds a missing (NaN) value left out."""
    values = list(values)
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    finite = len(present(values))
    missing = f" ({finite} of {len(values)} seeds)" if finite < len(values) else ""
    return f"{mean:.4f} ± {std:.4f}{missing}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def claims_table(claims: list[dict]) -> str:
    rows = []
    for c in claims:
        t = c["test"]
        rows.append([c["claim"], c["expected"], format_cell(c["ours"]["values"]), format_cell(c["baseline"]["values"]),
                     f"{t['mean_difference']:+.4f}", f"{t['p_t']:.3g}", f"{t['p_sign_flip']:.3g}", c["verdict"]])
    return format_table(["claim", "paper's direction", "ours (mean ± std)", "baseline (mean ± std)",
                         "mean diff", "p (paired t)", "p (sign flip)", "verdict"], rows)


MAX_STORED_EPOCHS = 50  # per run history in results.json; the checkpoints keep every epoch


def _is_history(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) and "epoch" in r for r in value)


def compact(value):
    """results.json stays small enough to commit (the jarvis full budget has 240 runs of 1,000 epochs):
    each per-epoch history keeps at most ``MAX_STORED_EPOCHS`` evenly spaced epochs, always the first
    and the last, and floats keep 7 significant digits. Tables and verdicts use the full histories."""
    if _is_history(value) and len(value) > MAX_STORED_EPOCHS:
        stride = math.ceil(len(value) / MAX_STORED_EPOCHS)
        value = value[::stride] + ([value[-1]] if (len(value) - 1) % stride else [])
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [compact(v) for v in value]
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.7g}")
    return value


def write_outputs(session: Session, results: dict, table_text: str) -> None:
    """results.json (with environment, budget, seeds and wall time) and table.md in ``session.out``."""
    results = {"paper": session.paper, "budget": session.budget, "seeds": session.seeds,
               "environment": environment(), "wall_time_s": session.elapsed(),
               "num_runs": session.runs_done, "runs_from_checkpoints": session.runs_resumed,
               "histories": f"per-epoch histories keep at most {MAX_STORED_EPOCHS} evenly spaced epochs (first and "
                            f"last included); the checkpoints under checkpoints/ hold every epoch", **results}
    path = os.path.join(session.out, "results.json")
    write_json(path, compact(results), separators=(",", ":"), default=float)
    write_text(os.path.join(session.out, "table.md"),
               f"# fastcurv reproduce {session.paper} --budget {session.budget}\n\n```\n{table_text}\n```\n\n"
                     f"Seeds {session.seeds}; wall time {session.elapsed():.0f} s on {results['environment']['device']} "
               f"({results['environment']['cpu_count']} cores){resumed_note(session)}.\n")
    session.log(f"wrote {path} and table.md")


def resumed_note(session: Session) -> str:
    if not session.runs_resumed:
        return ""
    return (f"; {session.runs_resumed} of {session.runs_done} runs were continued or loaded from checkpoints "
            f"(--resume), so the wall time is this invocation's, not the whole experiment's")


LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (8, 2)))
MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'fastcurv[plot]')", file=sys.stderr)
        return None
    return plt


def plot_curves(path: str, title: str, ylabel: str, series: dict[str, list[list[float]]], xlabel: str = "epoch",
                x=None, zoom_tail: float | None = None) -> str | None:
    """Mean over seeds with a +-1 std band (labelled in the legend), one line style and marker per label
    (so no curve hides another), integer epoch ticks. ``series[label]`` is a list of per-seed sequences;
    ``x`` the epochs (default 1..N). ``zoom_tail=0.5``: the y-axis spans the last half of the epochs only,
    so differences of half a point at the end are visible (the title says so)."""
    import numpy as np
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    tail_values, seeds = [], 0
    for i, (label, per_seed) in enumerate(series.items()):
        values = np.asarray(per_seed, dtype=np.float64)
        if values.size == 0 or np.all(np.isnan(values)):
            continue
        seeds = max(seeds, values.shape[0])
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
        xs = np.arange(1, mean.size + 1) if x is None else np.asarray(x)
        measured = np.isfinite(mean)  # e.g. an eigenvalue tracked every few epochs: join the measured ones
        xs_m, mean_m, std_m = xs[measured], mean[measured], np.nan_to_num(std[measured])
        ax.plot(xs_m, mean_m, linestyle=LINE_STYLES[i % len(LINE_STYLES)], marker=MARKERS[i % len(MARKERS)],
                markevery=max(1, mean_m.size // 8), label=label)
        ax.fill_between(xs_m, mean_m - std_m, mean_m + std_m, alpha=0.15)
        if zoom_tail:
            start = int(mean.size * (1 - zoom_tail))
            tail_values += [mean[start:] - std[start:], mean[start:] + std[start:]]
    if seeds == 0:
        plt.close(fig)
        return None
    if zoom_tail and tail_values:
        low, high = np.nanmin(np.concatenate(tail_values)), np.nanmax(np.concatenate(tail_values))
        pad = 0.15 * max(high - low, 1e-6)
        ax.set_ylim(low - pad, high + pad)
        title += f" (y-axis: last {zoom_tail:.0%} of training)"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if seeds > 1:
        handles.append(Patch(color="grey", alpha=0.3))
        labels.append(f"shaded: ±1 std over {seeds} seeds")
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def plot_points(path: str, title: str, ylabel: str, values: dict[str, list[float]]) -> str | None:
    """One final quantity per label (e.g. the top Hessian eigenvalue per configuration): every seed's
    value as a dot and the mean with a ±1 std bar."""
    import numpy as np

    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, per_seed) in enumerate(values.items()):
        points = np.asarray(present(per_seed), dtype=np.float64)
        if points.size == 0:
            continue
        mean, std = mean_std(list(points))
        ax.errorbar([i], [mean], yerr=[0.0 if std != std else std], fmt=MARKERS[i % len(MARKERS)], color=f"C{i}",
                    markersize=9, capsize=6, label=f"{label}: mean ± std")
        ax.scatter(i + np.linspace(-0.12, 0.12, points.size), points, color=f"C{i}", alpha=0.5, s=18)
    ax.set_xticks(range(len(values)), list(values))
    ax.set_ylabel(ylabel)
    ax.set_title(title + " (dots: seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def plot_heatmap(path: str, title: str, grid, row_labels: list[str], col_labels: list[str], row_name: str,
                 col_name: str) -> str | None:
    """A matrix of mean values (e.g. test accuracy over learning rate x weight decay), annotated."""
    import numpy as np

    plt = _pyplot()
    if plt is None:
        return None
    grid = np.asarray(grid, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.2 * len(col_labels) + 2, 0.8 * len(row_labels) + 1.5))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def subset(data, n_train: int | None, n_test: int | None = None):
    """The first ``n_train`` / ``n_test`` examples of a Dataset (the tiny budget), in place."""
    if n_train is not None:
        data.x_train, data.y_train = data.x_train[:n_train], data.y_train[:n_train]
    if n_test is not None:
        data.x_test, data.y_test = data.x_test[:n_test], data.y_test[:n_test]
    return data


def validation_split(data, fraction: float = 0.2, seed: int = 0):
    """A copy of ``data`` whose test split is a held-out ``fraction`` of its training split (for
    choosing hyperparameters without looking at the test set)."""
    import copy

    n = data.x_train.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * n)))
    val, train = perm[:n_val], perm[n_val:]
    split = copy.copy(data)
    split.x_train, split.y_train = data.x_train[train], data.y_train[train]
    split.x_test, split.y_test = data.x_train[val], data.y_train[val]
    return split
