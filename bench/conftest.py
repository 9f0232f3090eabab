"""Benchmark helpers: the device under test (FASTCURV_BENCH_DEVICE, default cuda if present else cpu),
sizes scaled to it, and the device name recorded in every benchmark's extra_info."""
import os
import platform

import pytest
import torch


def bench_device() -> torch.device:
    name = os.environ.get("FASTCURV_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture(scope="session")
def dev():
    return bench_device()


@pytest.fixture
def record(benchmark, dev):
    """Call record(group, name) first in each benchmark: sets the group and names the device."""

    def _record(group: str, **info):
        benchmark.group = group
        benchmark.extra_info["device"] = device_name(dev)
        benchmark.extra_info["torch"] = torch.__version__
        benchmark.extra_info.update(info)

    return _record


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Peak bytes of tensor memory that ``fn()`` holds above what was live before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, caching allocator). CPU: the profiler's
    allocation and free events summed in time order (``profile_memory=True``); resolution is one
    operator, so a temporary allocated and freed inside a single op is not seen. Run it outside the
    timed rounds (profiling slows the call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        # "[memory]" events are frees/allocations outside an op; an op's own net allocation is its self usage
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def memory_next_to_plain(fn, plain_fn, device: torch.device, model: torch.nn.Module) -> dict:
    """extra_info entries: the peak memory of ``fn`` and of the plain step ``plain_fn``, and their ratio.

    Each is measured from a state with no gradient buffers (``model.zero_grad(set_to_none=True)``), so
    that a step's own gradients count: otherwise freeing the previous step's gradients at its start
    would hide them."""

    def measured(step):
        model.zero_grad(set_to_none=True)
        return peak_memory_bytes(step, device)

    peak, plain = measured(fn), measured(plain_fn)
    return {
        "peak_mem_MiB": round(peak / 2**20, 3),
        "plain_peak_mem_MiB": round(plain / 2**20, 3),
        "peak_mem_vs_plain": round(peak / plain, 3) if plain else None,
        "peak_mem_method": "cuda.max_memory_allocated" if device.type == "cuda" else "profiler alloc/free events",
    }
