"""The environment of a GPU run and its two ceilings (the device tool's METHOD.md, "two numbers"):

* copy bandwidth: a device-to-device copy of a large random buffer (bytes read + bytes written, over the
  median of timed copies after warm-up; 2 GiB on the GPU, several times its 60 MB L2);
* bf16 GEMM rate: an 8192^3 bf16 matrix product on random data (2 n^3 flop over the median time).

Timed with CUDA events (perf_counter on the CPU). Prints nvidia-smi, the versions (python, torch, triton,
nvcc), the GPU's name, multiprocessor count, L2 and memory, then writes everything to ``--out`` (JSON).

    python tools/gpu/env_probe.py --out env.json [--cpu-dry-run]   (dry run: the CPU, tiny sizes)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time


def shell(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable: {err}"


def timed_median(fn, device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` (CUDA events around each call on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int) -> dict:
    import torch

    src = torch.rand(nbytes // 4, device=device)  # random data: zeros can run faster than real data
    dst = torch.empty_like(src)
    seconds = timed_median(lambda: dst.copy_(src), device, warmup=3, repeats=20)
    assert torch.equal(dst[:: max(1, src.numel() // 4096)], src[:: max(1, src.numel() // 4096)]), "copy is wrong"
    moved = 2 * src.numel() * src.element_size()
    return {"bytes_read_plus_written": moved, "seconds": seconds, "GB_per_s": moved / seconds / 1e9}


def gemm_rate(device, n: int, dtype) -> dict:
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = timed_median(lambda: a @ b, device, warmup=3, repeats=10)
    c = (a[:64].double() @ b[:, :64].double())
    err = ((a @ b)[:64, :64].double() - c).norm() / c.norm()
    return {"n": n, "dtype": str(dtype), "seconds": seconds, "TFLOP_per_s": 2 * n**3 / seconds / 1e12,
            "rel_error_vs_float64": err.item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args(argv)

    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "mode": "cpu-dry-run" if args.cpu_dry_run else "gpu"}
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    if not args.cpu_dry_run:
        print(shell(["nvidia-smi"]))
        print(shell(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,power.limit,temperature.gpu", "--format=csv"]))
    info["nvcc"] = shell(["nvcc", "--version"]).splitlines()[-1] if not args.cpu_dry_run else "not used (dry run)"
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"not importable: {err}"
    print(f"torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, nvcc: {info['nvcc']}")

    if args.cpu_dry_run:
        device = torch.device("cpu")
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        sizes = {"copy_bytes": 16 * 2**20, "gemm_n": 256, "gemm_dtype": torch.float32}
    else:
        if not torch.cuda.is_available():
            print("env_probe: torch sees no CUDA device", file=sys.stderr)
            info["device"] = "no CUDA device visible"
            with open(args.out, "w") as f:
                json.dump(info, f, indent=1)
            return 1
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        info["device"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["l2_MB"] = round(getattr(props, "L2_cache_size", 0) / 1e6, 1)
        info["driver"] = shell(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        sizes = {"copy_bytes": 2 * 2**30, "gemm_n": 8192, "gemm_dtype": torch.bfloat16}
        print(f"GPU {props.name}: capability {info['capability']}, {info['sm_count']} SMs, L2 {info['l2_MB']} MB, "
              f"{info['memory_GiB']} GiB, driver {info['driver']}")

    info["copy"] = copy_bandwidth(device, sizes["copy_bytes"])
    info["gemm"] = gemm_rate(device, sizes["gemm_n"], sizes["gemm_dtype"])
    print(f"copy bandwidth: {info['copy']['GB_per_s']:.0f} GB/s (read + written, {sizes['copy_bytes'] / 2**30:.3g} GiB buffer)")
    print(f"GEMM rate: {info['gemm']['TFLOP_per_s']:.1f} TFLOP/s ({info['gemm']['dtype']}, n = {sizes['gemm_n']}, "
          f"rel. error vs float64 {info['gemm']['rel_error_vs_float64']:.1e})")
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
