"""The last stage of tools/gpu/run.sh: the stages' times and exit codes, the two ceilings (env.json) and
issue 15's targets computed from bench.json, printed as a short table and written to summary.json.

A missing or partial input (a stage that failed or timed out) leaves its rows as "n/a" with the reason;
the summary itself fails only on an unreadable stages file. In a dry run the targets are computed the same
way, on tiny CPU sizes: they check the arithmetic, not the library's speed.

    python tools/gpu/summarize.py --stages stages.tsv --env env.json --bench bench.json --mode gpu --out summary.json
"""
from __future__ import annotations

import argparse
import json
import os


def load(path: str):
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        return {"unreadable": str(err)}


def median(bench, group, contender):
    return ((bench or {}).get("groups", {}).get(group, {}).get("contenders", {}).get(contender, {}) or {}).get("median_ms")


def contenders(bench, group) -> dict:
    return (bench or {}).get("groups", {}).get(group, {}).get("contenders", {}) or {}


def target(name, value, goal, met, why=""):
    return {"target": name, "value": value, "goal": goal, "met": met, "note": why}


def targets(env, bench) -> list[dict]:
    rows = []
    copy_gbs = ((env or {}).get("copy") or {}).get("GB_per_s")
    # 1. T = 1 norm kernel bandwidth vs the copy's
    for dtype in ("fp32", "bf16"):
        group = contenders(bench, f"kernel-t1-{dtype}")
        best = {n: r["GB_per_s"] for n, r in group.items() if n.endswith(" forward") and "GB_per_s" in r
                and not n.startswith("reference")}
        if best and copy_gbs:
            name = max(best, key=best.get)
            frac = best[name] / copy_gbs
            rows.append(target(f"T=1 norm kernel bandwidth ({dtype})", f"{frac:.0%} of copy ({best[name]:.0f} GB/s, {name})",
                               ">= 70%", frac >= 0.70))
        else:
            rows.append(target(f"T=1 norm kernel bandwidth ({dtype})", "n/a", ">= 70%", None, "no kernel timing or no copy bandwidth"))
    # 2-3. norms vs the plain step and vs the peers
    for case, goal in (("mlp", 1.05), ("resnet18", 1.15), ("gpt", 1.15)):
        group = f"norms-{case}"
        fast, plain = median(bench, group, "fastcurv"), median(bench, group, "plain_fwd_bwd")
        if fast and plain:
            rows.append(target(f"norms / plain fwd+bwd, {case}", f"{fast / plain:.2f}x", f"<= {goal}x", fast / plain <= goal))
        else:
            rows.append(target(f"norms / plain fwd+bwd, {case}", "n/a", f"<= {goal}x", None, "not measured"))
        peers = {p: median(bench, group, p) for p in ("torch_func", "backpack", "opacus")}
        peers = {p: t for p, t in peers.items() if t}
        if fast and peers:
            best = min(peers, key=peers.get)
            errors = {p: r.get("error", "")[:60] for p, r in contenders(bench, group).items() if "error" in r}
            rows.append(target(f"norms speed-up vs fastest peer, {case}", f"{peers[best] / fast:.2f}x ({best})", ">= 2x",
                               peers[best] / fast >= 2.0, f"peers that failed: {errors}" if errors else ""))
        else:
            rows.append(target(f"norms speed-up vs fastest peer, {case}", "n/a", ">= 2x", None, "no peer or fastcurv timing"))
    # 4. the regularized step
    for case, goal in (("mlp", 1.6), ("resnet18", 2.0)):
        group = f"regstep-{case}"
        reg, plain, sam = (median(bench, group, c) for c in ("fastcurv_curvature", "plain_step", "sam"))
        if reg and plain:
            rows.append(target(f"Curvature step / plain, {case}", f"{reg / plain:.2f}x", f"<= {goal}x", reg / plain <= goal))
        else:
            rows.append(target(f"Curvature step / plain, {case}", "n/a", f"<= {goal}x", None, "not measured"))
        if reg and sam:
            rows.append(target(f"Curvature step vs SAM, {case}", f"{reg / sam:.2f}x SAM's time", "< 1x", reg < sam))
    # 5. HVP per vector at K >= 8
    hvp = {n: r.get("gradient_equivalents_per_vector") for n, r in contenders(bench, "hvp").items()}
    wide = {n: v for n, v in hvp.items() if v is not None and int(n.rsplit("=", 1)[1]) >= 8}
    if wide:
        best = min(wide, key=wide.get)
        rows.append(target("HVP gradient-equivalents per vector, K >= 8", f"{wide[best]:.2f} ({best})", "<= 2", wide[best] <= 2.0))
    else:
        rows.append(target("HVP gradient-equivalents per vector, K >= 8", "n/a", "<= 2", None, "not measured"))
    # 6. top eigenvalues vs PyHessian
    eig = contenders(bench, "eigen-top10")
    fast, pyh = eig.get("fastcurv top_eigenvalues", {}), eig.get("pyhessian eigenvalues", {})
    if "median_ms" in fast and "median_ms" in pyh:
        speed = pyh["median_ms"] / fast["median_ms"]
        acc_ok = fast.get("max_rel_error", 1.0) <= pyh.get("max_rel_error", 0.0)
        rows.append(target("top-10 eigenvalues vs PyHessian", f"{speed:.2f}x faster; error {fast.get('max_rel_error', float('nan')):.1e} vs "
                           f"{pyh.get('max_rel_error', float('nan')):.1e}", ">= 5x, error <=", speed >= 5.0 and acc_ok))
    else:
        rows.append(target("top-10 eigenvalues vs PyHessian", "n/a", ">= 5x, error <=", None,
                           pyh.get("error", "") or fast.get("error", "") or "not measured"))
    # 7. backend choice: the fastest backend per kernel shape vs what "auto" picks
    for group in ("kernel-ghost", "kernel-materialized", "kernel-gram"):
        g = (bench or {}).get("groups", {}).get(group)
        if g and g.get("fastest"):
            rows.append(target(f"auto backend = fastest, {group}", f"auto {g.get('auto_picks')}, fastest {g['fastest']}", "same",
                               g.get("auto_picks") == g["fastest"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", required=True)
    parser.add_argument("--env", default="")
    parser.add_argument("--bench", default="")
    parser.add_argument("--mode", default="gpu")
    parser.add_argument("--total", type=float, default=None, help="seconds of the whole run so far")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    stages = []
    with open(args.stages) as f:
        for line in f:
            name, rc, secs, limit = line.rstrip("\n").split("\t")
            stages.append({"stage": name, "rc": int(rc), "seconds": float(secs), "limit_s": int(limit)})
    env, bench = load(args.env), load(args.bench)
    rows = targets(env, bench)
    summary = {"mode": args.mode, "total_seconds": args.total, "stages": stages, "env": env,
               "bench_meta": (bench or {}).get("meta"), "targets": rows}
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1, default=str)

    print("=" * 100)
    print(f"SUMMARY ({args.mode}{': tiny CPU sizes, the targets below check the arithmetic, not the speed' if args.mode != 'gpu' else ''})")
    if env and "copy" in env:
        print(f"device: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, driver {env.get('driver', '-')}")
        print(f"ceilings: copy {env['copy']['GB_per_s']:.0f} GB/s (read + written); GEMM {env['gemm']['TFLOP_per_s']:.1f} TFLOP/s "
              f"({env['gemm']['dtype']}, n = {env['gemm']['n']})")
    else:
        print("ceilings: n/a (the env stage did not finish)")
    print(f"{'stage':<10}{'rc':>5}{'seconds':>10}{'limit':>8}")
    for s in stages:
        flag = "  TIMED OUT" if s["rc"] in (124, 137) else ("  FAILED" if s["rc"] else "")
        print(f"{s['stage']:<10}{s['rc']:>5}{s['seconds']:>10.1f}{s['limit_s']:>8}{flag}")
    if args.total is not None:
        print(f"{'total':<10}{'':>5}{args.total:>10.1f}")
    print(f"{'target':<48}{'value':<52}{'goal':<16}met")
    for r in rows:
        met = {True: "yes", False: "NO", None: "n/a"}[r["met"]]
        print(f"{r['target']:<48}{str(r['value'])[:51]:<52}{r['goal']:<16}{met}" + (f"  ({r['note'][:80]})" if r["note"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
