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
