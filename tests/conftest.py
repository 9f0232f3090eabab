"""Shared fixtures: the device fixture (cpu always, cuda when present) and deterministic seeding.

Nothing here touches the GPU at import time."""
import os

import pytest
import torch


def pytest_configure(config):
    # Triton kernels run on the CPU through the interpreter where there is no GPU; must be set
    # before any @triton.jit function is defined.
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64_default():
    """float64 as the default dtype for the test (the per-example loop oracle is compared in float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
