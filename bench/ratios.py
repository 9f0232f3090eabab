"""Print the ratio table of a pytest-benchmark JSON run: per group, each contender's median time
divided by the median of the group's first row (the plain step, sgd or one gradient), plus the
accuracy and memory fields the benchmarks record in ``extra_info``.

    python bench/ratios.py bench/results/cpu-2core-2026-11-23-session3.json [--markdown]

Every number printed comes from the file: nothing is typed in by hand.
"""
from __future__ import annotations

import argparse
import json
import math

EXTRA_FIELDS = ("max_rel_error", "peak_mem_vs_plain")


def load(path: str) -> tuple[dict, dict[str, list[dict]]]:
    with open(path) as handle:
        run = json.load(handle)
    groups: dict[str, list[dict]] = {}
    for bench in run["benchmarks"]:  # pytest-benchmark keeps collection order within a group
        groups.setdefault(bench["group"] or "(none)", []).append(bench)
    return run, groups


def label(bench: dict) -> str:
    info = bench["extra_info"]
    name = info.get("contender") or info.get("rule") or bench["name"]
    if "K" in info:
        name = f"{name} (K={info['K']})"
    return str(name)


def extras(bench: dict) -> str:
    info = bench["extra_info"]
    parts = []
    for key in EXTRA_FIELDS:
        value = info.get(key)
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{key} {value:.2g}")
    return ", ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a file written by pytest --benchmark-json")
    parser.add_argument("--markdown", action="store_true", help="markdown tables instead of plain text")
    args = parser.parse_args(argv)
    run, groups = load(args.json)
    first = run["benchmarks"][0]["extra_info"] if run["benchmarks"] else {}
    print(f"{args.json}: {len(run['benchmarks'])} benchmarks, {first.get('device', '?')}, torch {first.get('torch', '?')}, "
          f"{run.get('datetime', '?')}")
    for group, benches in groups.items():
        base = benches[0]["stats"]["median"]
        print(f"\n{'### ' if args.markdown else ''}{group} (ratio to {label(benches[0])}, {base * 1e3:.2f} ms)")
        if args.markdown:
            print("\n| contender | median ms | ratio | notes |\n|---|---|---|---|")
        for bench in benches:
            median = bench["stats"]["median"]
            ratio = median / base
            note = extras(bench)
            if "K" in bench["extra_info"]:  # HVPs: per vector, in units of the first row (one gradient)
                note = ", ".join(filter(None, [f"per vector {ratio / bench['extra_info']['K']:.2f}x", note]))
            row = (label(bench), f"{median * 1e3:.2f}", f"{ratio:.2f}", note)
            print(("| " + " | ".join(row) + " |") if args.markdown else f"  {row[0]:<44}{row[1]:>10} ms {row[2]:>7}x  {row[3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
