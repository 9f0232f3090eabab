"""The GPU benchmark of issue 15: every speed target in one file, one JSON, contenders alternating.

Groups (GPU sizes; ``--cpu-dry-run`` runs the same groups at tiny sizes on the CPU, Triton interpreted):

* ``kernel-t1-{fp32,bf16}``: ``per_example_sqnorm`` at T = 1 (a [65536, 4096], delta [65536, 4096]),
  backends cuda / triton / reference, forward and forward+backward; bytes moved per call recorded so
  that achieved bandwidth can be set against the measured copy bandwidth (target >= 70%).
* ``kernel-{ghost,materialized,gram}``: the T > 1 and Gram paths per backend (which one ``auto`` should pick).
* ``norms-{mlp,resnet18,gpt}``: per-example squared gradient norms, fastcurv vs a plain forward+backward,
  torch.func (vmap(grad), in chunks of examples so that B x P fits), BackPACK BatchL2Grad and Opacus
  ghost clipping. MLP 784-4096-4096-10 B=1024; ResNet-18 (CIFAR stem, eval-mode BatchNorm) 32x32
  B=256; nanoGPT T=512 (6 layers, d=384, vocab 4096) B=16, per-example loss = summed token losses.
* ``regstep-{mlp,resnet18}``: one curvature-regularized step (fastcurv ``Curvature``) vs a plain step,
  SAM and GNP (``bench/_peers.py``), same models and batches as the norms.
* ``hvp``: ``Hessian @ V`` for K = 1, 8, 32 vs one gradient (MLP 784-1024-1024-10, B=1024).
* ``eigen-top10``: ``top_eigenvalues(Hessian(...), k=10)`` (default call, operator built inside the
  timing) vs PyHessian's ``eigenvalues(top_n=10)``, each answer's largest relative error against a float64
  Lanczos at tol 1e-10 (MLP 784-256-256-10, B=1024).

Timing: CUDA events around each call (perf_counter on the CPU), warm-up calls first, then rounds in which
every contender of a group runs once in turn; medians. The number of rounds is fitted to a per-group time
budget from the first timed round. A contender that cannot be built or fails (missing package, an
unsupported layer, out of memory) is recorded with its error and the group goes on without it.

    python bench/gpu/bench_gpu.py --out bench.json [--cpu-dry-run] [--groups norms-mlp,hvp]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
from _peers import make_gnp_step, make_sam_step  # noqa: E402

import fastcurv  # noqa: E402
from fastcurv.curvature import Hessian, top_eigenvalues  # noqa: E402
from fastcurv.models import NanoGPT, resnet18  # noqa: E402
from fastcurv.regularizers import Curvature  # noqa: E402

ALPHA = 1e-3  # the curvature penalty's weight in the regularized step (as bench/test_bench_steps.py)


class Skip(Exception):
    """A contender that cannot run here (missing package, unsupported model)."""


# ------------------------------------------------------------------------------------------ sizes
def sizes(dry: bool) -> dict:
    if dry:
        return {
            "t1": (512, 64, 64), "ghost": (4, 16, 24, 24), "materialized": (4, 16, 6, 6), "gram": (16, 4, 24, 24),
            "mlp": (784, 32, 16), "mlp_batch": 16, "resnet_width": 8, "resnet_batch": 4,
            "gpt": dict(vocab=64, block_size=16, layers=1, heads=2, d=16), "gpt_batch": 2,
            "hvp_mlp": (784, 32, 8), "hvp_K": (1, 8), "eig_mlp": (784, 16, 16), "eig_k": 4,
            "warmup": 1, "max_rounds": 2, "group_budget_s": 5.0, "func_chunk_elements": 2**22,
        }
    return {
        "t1": (65536, 4096, 4096), "ghost": (64, 512, 768, 768), "materialized": (64, 512, 256, 256),
        "gram": (64, 128, 768, 768),
        "mlp": (784, 4096, 1024), "mlp_batch": 1024, "resnet_width": 64, "resnet_batch": 256,
        "gpt": dict(vocab=4096, block_size=512, layers=6, heads=6, d=384), "gpt_batch": 16,
        "hvp_mlp": (784, 1024, 1024), "hvp_K": (1, 8, 32), "eig_mlp": (784, 256, 1024), "eig_k": 10,
        "warmup": 3, "max_rounds": 25, "group_budget_s": 10.0, "func_chunk_elements": 2**30,
    }


# ------------------------------------------------------------------------------------------ timing
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_call(fn, dev) -> float:
    """Seconds of one call of ``fn`` (CUDA events; the end event is waited for)."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def free_memory(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def interleaved(contenders: dict, dev, cfg: dict, budget_s: float | None = None) -> dict:
    """name -> {"median_ms", "times_ms", "peak_mem_MiB"} or {"error"}; every round calls each contender once."""
    results, alive = {}, {}
    for name, fn in contenders.items():
        if isinstance(fn, BaseException):
            results[name] = {"error": short_error(fn)}
            continue
        try:
            for _ in range(cfg["warmup"]):
                fn()
            sync(dev)
            alive[name] = fn
            results[name] = {"times_ms": []}
        except (Exception, Skip) as err:  # noqa: BLE001 - recorded, the group goes on
            results[name] = {"error": short_error(err)}
            free_memory(dev)
    budget = budget_s if budget_s is not None else cfg["group_budget_s"]
    rounds, spent, round_ = cfg["max_rounds"], 0.0, 0
    while round_ < rounds and alive:
        start = time.perf_counter()
        for name in list(alive):
            try:
                results[name]["times_ms"].append(time_call(alive[name], dev) * 1e3)
            except Exception as err:  # noqa: BLE001
                results[name] = {"error": f"failed in round {round_}: {short_error(err)}"}
                del alive[name]
                free_memory(dev)
        spent += time.perf_counter() - start
        round_ += 1
        if round_ == 1 and spent > 0:  # fit the rounds to the budget (at least 3 on the GPU, as many as allowed)
            rounds = max(min(rounds, int(budget / spent)), min(3, rounds))
    for name in alive:
        t = results[name]["times_ms"]
        results[name]["median_ms"] = statistics.median(t)
        results[name]["rounds"] = len(t)
        if dev.type == "cuda":
            sync(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            alive[name]()
            sync(dev)
            results[name]["peak_mem_MiB"] = round((torch.cuda.max_memory_allocated(dev) - base) / 2**20, 1)
    return results


def add_ratios(results: dict, baseline: str) -> None:
    base = results.get(baseline, {}).get("median_ms")
    for r in results.values():
        if base and "median_ms" in r:
            r["ratio_to_" + baseline] = round(r["median_ms"] / base, 4)


# ------------------------------------------------------------------------------------------ kernels
def kernel_t1_group(dev, cfg, dtype) -> dict:
    B, d_in, d_out = cfg["t1"]
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(B, d_in, device=dev, generator=g).to(dtype)
    delta = torch.randn(B, d_out, device=dev, generator=g).to(dtype)
    cot = torch.randn(B, device=dev, generator=g)
    elt = a.element_size()
    fwd_bytes = (B * d_in + B * d_out) * elt + B * 4
    # backward kernel: reads a, delta, grad; writes grad_a, grad_delta (the forward's bytes again, twice)
    bwd_bytes = 2 * (B * d_in + B * d_out) * elt + B * 4
    want = (a.double().square().sum(1) + 1) * delta.double().square().sum(1)
    contenders, checks = {}, {}
    for backend in backends_for(dev):
        def fwd(backend=backend):
            return fastcurv.ops.per_example_sqnorm(a, delta, True, backend=backend)

        def fwd_bwd(backend=backend):
            ar, dr = a.detach().requires_grad_(), delta.detach().requires_grad_()
            out = fastcurv.ops.per_example_sqnorm(ar, dr, True, backend=backend)
            return torch.autograd.grad(out, (ar, dr), cot)

        try:
            got = fwd().double()
            checks[backend] = ((got - want).norm() / want.norm()).item()
            contenders[f"{backend} forward"] = fwd
            contenders[f"{backend} forward+backward"] = fwd_bwd
        except Exception as err:  # noqa: BLE001
            contenders[f"{backend} forward"] = err
    results = interleaved(contenders, dev, cfg)
    for name, r in results.items():
        if "median_ms" in r:
            moved = fwd_bytes if name.endswith(" forward") else fwd_bytes + bwd_bytes
            r["bytes"] = moved
            r["GB_per_s"] = round(moved / (r["median_ms"] / 1e3) / 1e9, 1)
    return {"shape": {"B": B, "d_in": d_in, "d_out": d_out, "dtype": str(dtype)}, "forward_bytes": fwd_bytes,
            "backward_bytes": bwd_bytes, "rel_error_vs_float64": checks, "contenders": results}


def backends_for(dev) -> list[str]:
    if dev.type == "cuda":
        return ["cuda", "triton", "reference"]
    return ["cpu", "triton", "reference"]  # dry run: triton under TRITON_INTERPRET=1


def kernel_shape_group(dev, cfg, which) -> dict:
    B, T, d_in, d_out = cfg[which]
    op = fastcurv.ops.per_example_gram if which == "gram" else fastcurv.ops.per_example_sqnorm
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(B, T, d_in, device=dev, generator=g)
    delta = torch.randn(B, T, d_out, device=dev, generator=g)
    cot = torch.randn((B, B) if which == "gram" else (B,), device=dev, generator=g)
    ref = op(a.double(), delta.double(), True, backend="reference")
    contenders, checks = {}, {}
    for backend in backends_for(dev):
        def fwd_bwd(backend=backend):
            ar, dr = a.detach().requires_grad_(), delta.detach().requires_grad_()
            return torch.autograd.grad(op(ar, dr, True, backend=backend), (ar, dr), cot)

        try:
            got = op(a, delta, True, backend=backend).double()
            checks[backend] = ((got - ref).norm() / ref.norm()).item()
            contenders[backend] = fwd_bwd
        except Exception as err:  # noqa: BLE001
            contenders[backend] = err
    results = interleaved(contenders, dev, cfg)
    timed = {n: r["median_ms"] for n, r in results.items() if "median_ms" in r}
    from fastcurv import _backend

    return {"shape": {"B": B, "T": T, "d_in": d_in, "d_out": d_out, "fp32": True, "fwd+bwd": True},
            "ghost": fastcurv.reference.use_ghost(T, d_in, d_out), "rel_error_vs_float64": checks,
            "auto_picks": _backend.resolve("auto", dev), "fastest": min(timed, key=timed.get) if timed else None,
            "contenders": results}


# ------------------------------------------------------------------------------------------ models
def mlp(d_in, width, classes=10):
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, classes))


def classification_loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def token_loss(out, y):
    B, T, V = out.shape
    return F.cross_entropy(out.reshape(B * T, V), y.reshape(B * T), reduction="none").view(B, T).sum(1)


def model_case(name, dev, cfg):
    """(model, x, y, per-example loss) of the norms / regularized-step groups."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        d_in, width, _ = cfg["mlp"]
        B = cfg["mlp_batch"]
        model, x, y = mlp(d_in, width), torch.randn(B, d_in, generator=g), torch.randint(0, 10, (B,), generator=g)
        loss = classification_loss
    elif name == "resnet18":
        B = cfg["resnet_batch"]
        model = resnet18(width=cfg["resnet_width"]).eval()  # running statistics: the per-example gradient is defined
        x, y = torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)
        loss = classification_loss
    else:
        spec = cfg["gpt"]
        B, T = cfg["gpt_batch"], spec["block_size"]
        model = NanoGPT(**spec)
        x = torch.randint(0, spec["vocab"], (B, T), generator=g)
        y = torch.randint(0, spec["vocab"], (B, T), generator=g)
        loss = token_loss
    return model.to(dev), x.to(dev), y.to(dev), loss


def norms_contenders(model, x, y, loss, cfg, case) -> dict:
    """name -> zero-argument call; each norms contender returns the [B] squared norms."""
    out = {}

    def plain():
        model.zero_grad(set_to_none=True)
        loss(model(x), y).sum().backward()

    def fast():
        with fastcurv.capture(model) as cap:
            o = model(x)
        return cap.per_example_sqnorms(loss(o, y))

    out["plain_fwd_bwd"], out["fastcurv"] = plain, fast
    out["torch_func"] = torch_func_norms(model, x, y, loss, cfg["func_chunk_elements"])
    out["backpack"] = guarded(backpack_norms, model, x, y, case)
    out["opacus"] = guarded(opacus_norms, model, x, y, loss)
    return out


def guarded(build, *args):
    try:
        return build(*args)
    except BaseException as err:  # noqa: BLE001 - ImportError, a peer refusing a layer: recorded
        if isinstance(err, KeyboardInterrupt):
            raise
        return err


def torch_func_norms(model, x, y, loss, chunk_elements):
    """torch.func vmap(grad) per-example gradients, squared and summed, in chunks of examples so that the
    [chunk, P] gradients stay under ``chunk_elements`` elements (B x P does not fit for the big models)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    P = sum(p.numel() for p in params.values())
    chunk = max(1, min(x.shape[0], chunk_elements // P))

    def loss_one(p, xi, yi):
        return loss(torch.func.functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))

    def run():
        parts = []
        for i in range(0, x.shape[0], chunk):
            grads = per_sample(params, x[i : i + chunk], y[i : i + chunk])
            parts.append(sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values()))
        return torch.cat(parts)

    return run


def backpack_norms(model, x, y, case):
    if case == "gpt":
        raise Skip("BackPACK BatchL2Grad: no nn.Embedding / attention support")
    import backpack
    from backpack.extensions import BatchL2Grad

    # BatchL2Grad needs each leaf layer's input and output gradient only, so the residual additions inside
    # ResNet's blocks need no conversion (BackPACK's converter fails on this model with torch >= 2.11)
    bp_model = backpack.extend(copy.deepcopy(model))
    loss_fn = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))

    def run():
        bp_model.zero_grad(set_to_none=True)
        with backpack.backpack(BatchL2Grad()):
            loss_fn(bp_model(x), y).backward()
        return sum(p.batch_l2 for p in bp_model.parameters())

    return run


def opacus_norms(model, x, y, loss):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(copy.deepcopy(model), loss_reduction="sum", use_ghost_clipping=True,
                                                   max_grad_norm=1.0)

    def run():
        wrapped.zero_grad(set_to_none=True)
        loss(wrapped(x), y).sum().backward()
        return wrapped.get_norm_sample().square()

    return run


def norms_group(dev, cfg, case) -> dict:
    model, x, y, loss = model_case(case, dev, cfg)
    contenders = norms_contenders(model, x, y, loss, cfg, case)
    # every contender computes the same numbers: relative difference to fastcurv's, checked once
    agree = {}
    want = contenders["fastcurv"]().detach().double()
    for name, fn in list(contenders.items()):
        if name in ("plain_fwd_bwd", "fastcurv") or isinstance(fn, BaseException):
            continue
        try:
            got = fn().detach().double()
            agree[name] = ((got - want).norm() / want.norm()).item()
        except BaseException as err:  # noqa: BLE001
            if isinstance(err, KeyboardInterrupt):
                raise
            contenders[name] = err
            free_memory(dev)
    results = interleaved(contenders, dev, cfg)
    add_ratios(results, "plain_fwd_bwd")
    return {"batch": x.shape[0], "num_params": sum(p.numel() for p in model.parameters()),
            "rel_diff_to_fastcurv": agree, "contenders": results}


def regstep_group(dev, cfg, case) -> dict:
    model, x, y, loss = model_case(case, dev, cfg)
    reg = Curvature(model, alpha=ALPHA)

    def plain():
        model.zero_grad(set_to_none=True)
        loss(model(x), y).mean().backward()

    def curvature():
        model.zero_grad(set_to_none=True)
        with reg.track():
            out = model(x)
        reg.backward(loss(out, y))

    sam, gnp = make_sam_step(model), make_gnp_step(model)
    contenders = {"plain_step": plain, "fastcurv_curvature": curvature, "sam": lambda: sam(model, x, y),
                  "gnp": lambda: gnp(model, x, y)}
    results = interleaved(contenders, dev, cfg)
    add_ratios(results, "plain_step")
    return {"batch": x.shape[0], "alpha": ALPHA, "contenders": results}


def hvp_group(dev, cfg) -> dict:
    d_in, width, B = cfg["hvp_mlp"]
    torch.manual_seed(0)
    model = mlp(d_in, width).to(dev)
    x, y = torch.randn(B, d_in, device=dev), torch.randint(0, 10, (B,), device=dev)
    params = list(model.parameters())
    contenders = {"one_gradient": lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params)}
    for method in ("double_backward", "forward_over_reverse"):
        H = Hessian(model, F.cross_entropy, (x, y), method=method)
        for K in cfg["hvp_K"]:
            V = torch.randn(H.num_params, K, device=dev)
            contenders[f"H@V {method} K={K}"] = lambda H=H, V=V: H @ V
    results = interleaved(contenders, dev, cfg)
    grad_ms = results.get("one_gradient", {}).get("median_ms")
    for name, r in results.items():
        if name.startswith("H@V") and "median_ms" in r and grad_ms:
            K = int(name.rsplit("=", 1)[1])
            r["gradient_equivalents_per_vector"] = round(r["median_ms"] / (K * grad_ms), 3)
    return {"batch": B, "num_params": sum(p.numel() for p in params), "contenders": results}


def eigen_group(dev, cfg) -> dict:
    d_in, width, B = cfg["eig_mlp"]
    k = cfg["eig_k"]
    torch.manual_seed(0)
    model = mlp(d_in, width).to(dev)
    x, y = torch.randn(B, d_in, device=dev), torch.randint(0, 10, (B,), device=dev)
    H64 = Hessian(copy.deepcopy(model).double(), F.cross_entropy, (x.double(), y))
    ref, _, info = top_eigenvalues(H64, k=k, tol=1e-10, return_info=True)
    ref = ref.double().cpu()
    answers = {}

    def fast():
        answers["fastcurv"] = top_eigenvalues(Hessian(model, F.cross_entropy, (x, y)), k=k)[0]

    contenders = {"fastcurv top_eigenvalues": fast}
    try:
        import pyhessian

        def pyh():
            torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
            h = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=dev.type == "cuda")
            answers["pyhessian"] = h.eigenvalues(top_n=k)[0]

        contenders["pyhessian eigenvalues"] = pyh
    except ImportError as err:
        contenders["pyhessian eigenvalues"] = err
    eig_cfg = dict(cfg, warmup=1, max_rounds=min(cfg["max_rounds"], 5))
    results = interleaved(contenders, dev, eig_cfg, budget_s=2 * cfg["group_budget_s"])
    add_ratios(results, "fastcurv top_eigenvalues")
    for name, key in (("fastcurv top_eigenvalues", "fastcurv"), ("pyhessian eigenvalues", "pyhessian")):
        if key in answers and "median_ms" in results.get(name, {}):
            vals = torch.as_tensor([float(v) for v in answers[key]], dtype=torch.float64)
            vals = vals[vals.abs().argsort(descending=True)]
            results[name]["eigenvalues"] = [round(v, 7) for v in vals.tolist()]
            results[name]["max_rel_error"] = ((vals - ref).abs() / ref.abs()).max().item()
    return {"k": k, "batch": B, "num_params": sum(p.numel() for p in model.parameters()),
            "reference_float64": [round(v, 9) for v in ref.tolist()], "reference_converged": bool(info.converged),
            "contenders": results}


# ------------------------------------------------------------------------------------------ main
def groups(dev, cfg) -> dict:
    return {
        "kernel-t1-fp32": lambda: kernel_t1_group(dev, cfg, torch.float32),
        "kernel-t1-bf16": lambda: kernel_t1_group(dev, cfg, torch.bfloat16),
        "kernel-ghost": lambda: kernel_shape_group(dev, cfg, "ghost"),
        "kernel-materialized": lambda: kernel_shape_group(dev, cfg, "materialized"),
        "kernel-gram": lambda: kernel_shape_group(dev, cfg, "gram"),
        "norms-mlp": lambda: norms_group(dev, cfg, "mlp"),
        "norms-resnet18": lambda: norms_group(dev, cfg, "resnet18"),
        "norms-gpt": lambda: norms_group(dev, cfg, "gpt"),
        "regstep-mlp": lambda: regstep_group(dev, cfg, "mlp"),
        "regstep-resnet18": lambda: regstep_group(dev, cfg, "resnet18"),
        "hvp": lambda: hvp_group(dev, cfg),
        "eigen-top10": lambda: eigen_group(dev, cfg),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreted)")
    parser.add_argument("--groups", default="", help="comma-separated subset of the groups")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        dev = torch.device("cpu")
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    else:
        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA device (use --cpu-dry-run on the CPU)", file=sys.stderr)
            return 1
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name(dev)
    cfg = sizes(args.cpu_dry_run)
    table = groups(dev, cfg)
    chosen = [g for g in args.groups.split(",") if g] or list(table)
    unknown = set(chosen) - set(table)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; known: {', '.join(table)}")
    report = {"meta": {"device": name, "torch": torch.__version__, "python": sys.version.split()[0],
                       "mode": "cpu-dry-run" if args.cpu_dry_run else "gpu", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "timing": "CUDA events, medians over interleaved rounds" if dev.type == "cuda" else "perf_counter, medians over interleaved rounds",
                       "sizes": {k: v for k, v in cfg.items()}}, "groups": {}}
    failed = []
    for group in chosen:
        start = time.perf_counter()
        print(f"--- {group}", flush=True)
        try:
            result = table[group]()
        except Exception as err:  # noqa: BLE001 - the next group still runs
            traceback.print_exc()
            result = {"error": short_error(err)}
            failed.append(group)
        result["seconds"] = round(time.perf_counter() - start, 2)
        report["groups"][group] = result
        for cname, r in result.get("contenders", {}).items():
            extra = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("times_ms", "median_ms", "error", "rounds"))
            shown = f"{r['median_ms']:10.3f} ms  ({r['rounds']} rounds) {extra}" if "median_ms" in r else f"ERROR {r.get('error')}"
            print(f"  {cname:<36} {shown}")
        print(f"    ({result['seconds']} s)", flush=True)
        free_memory(dev)
        with open(args.out, "w") as f:  # written after every group: a timed-out run keeps what it measured
            json.dump(report, f, indent=1, default=str)
    print(f"bench_gpu: {len(chosen) - len(failed)}/{len(chosen)} groups ran; failed: {failed or 'none'}; JSON in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
