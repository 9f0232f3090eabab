"""The ``fastcurv reproduce`` subcommand (registered by :mod:`fastcurv.cli`)."""
from __future__ import annotations

import argparse
import importlib
import os

from fastcurv.reproduce import PAPERS
from fastcurv.reproduce.common import Session

MODULES = {"geng": "geng", "jia-su": "jia_su", "fisher": "fisher", "jarvis": "jarvis"}


def paper_module(paper: str):
    if paper not in MODULES:
        raise ValueError(f"unknown paper {paper!r}; valid: {', '.join(PAPERS)}")
    return importlib.import_module(f"fastcurv.reproduce.{MODULES[paper]}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("reproduce", help="re-run a paper's headline experiment on real offline data",
                              description="Run PAPER's protocol scaled to this machine; print the paper's numbers "
                                          "beside ours with a verdict per claim; write results.json, table.md and plots.")
    p.add_argument("paper", choices=PAPERS, help="geng (003) | jia-su (001) | fisher (000) | jarvis (002)")
    # "tiny" (seconds, for the tests) is accepted but not advertised.
    p.add_argument("--budget", default="quick", choices=("quick", "full", "tiny"), metavar="{quick,full}",
                   help="quick (default): a few minutes on 2 cores; full: about an hour")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..S-1 (default: the budget's)")
    p.add_argument("--out", default=None, help="output folder (default: reproduce-PAPER)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs and continue interrupted ones in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run_command(args) -> int:
    module = paper_module(args.paper)
    budget = module.BUDGETS[args.budget]
    seeds = budget["seeds"] if args.seeds is None else args.seeds
    if seeds < 2:
        raise ValueError(f"--seeds must be >= 2 (the verdict is a paired test across seeds), got {seeds}")
    session = Session(args.paper, args.budget, list(range(seeds)), args.out or f"reproduce-{args.paper}",
                      resume=args.resume, quiet=args.quiet)
    session.log(f"fastcurv reproduce {args.paper} --budget {args.budget}: {seeds} seeds, writing to "
                f"{os.path.abspath(session.out)}")
    module.run(session)
    return 0
