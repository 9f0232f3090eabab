"""Which implementation runs an op: ``cuda`` | ``triton`` | ``cpu`` | ``reference``.

* ``cpu`` / ``cuda``: the compiled extension ``fastcurv._C`` (C++ CPU kernels always; CUDA kernels
  when it was built against a CUDA toolkit and a CUDA build of torch).
* ``triton``: Triton kernels, for tensors on a GPU, or on the CPU under ``TRITON_INTERPRET=1``.
* ``reference``: plain PyTorch (``fastcurv.reference``), always available.

``"auto"`` picks, for a tensor on a GPU: triton if importable, else the CUDA extension, else the
reference; on the CPU: the C++ CPU kernels, else the reference (with a one-time warning naming why
``_C`` did not load). Triton on the CPU (under ``TRITON_INTERPRET=1``) is a correctness tool, far
slower than the C++ kernels, so it runs only when asked for by name. The environment variable
``FASTCURV_BACKEND`` overrides ``"auto"``. Import never fails because a backend is missing; asking
for a missing one raises :class:`BackendUnavailable` with the reason.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from fastcurv._build_hint import HOW_TO_GET_KERNELS  # the advice setup.py prints when it skips them

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

try:  # registers torch.ops.fastcurv.* and their CPU (and maybe CUDA) kernels
    _C = importlib.import_module("fastcurv._C")

    _C_ERROR: Exception | None = None
except ImportError as err:  # pragma: no cover - depends on the build
    _C = None
    _C_ERROR = err

_warned_no_C = False



def extension_problem() -> str | None:
    """Why the compiled kernels do not run here (one line with the fix), or None when they load."""
    if _C is None:
        if isinstance(_C_ERROR, ModuleNotFoundError) and _C_ERROR.name == "fastcurv._C":
            what = "fastcurv._C was not built (installed without a C++ toolchain, or with FASTCURV_SKIP_EXT=1)"
        else:
            what = f"fastcurv._C failed to load ({_C_ERROR})"
        return f"{what}: the C++ CPU and CUDA kernels are missing; {HOW_TO_GET_KERNELS}"
    return None


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


def has_extension() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastcurv::per_example_sqnorm", "CUDA"
    )


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _unavailable(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device`, or None if it can."""
    if name == "reference":
        return None
    if name == "triton":
        if not has_triton():
            return "the `triton` package is not installed"
        if device.type == "cpu" and not triton_interpret():
            return "Triton runs on the CPU only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not support device {device}"
        return None
    if _C is None:
        return extension_problem()
    if name == "cpu":
        return None if device.type == "cpu" else f"backend 'cpu' needs CPU tensors, got {device}"
    if name == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device}"
        if not has_cuda_kernels():
            return "fastcurv._C was built without CUDA kernels (rebuild with a CUDA toolkit and a CUDA build of torch, or FASTCURV_FORCE_CUDA=1)"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def resolve(backend: str | None, device: torch.device) -> str:
    """The concrete backend for a call on tensors living on `device`."""
    if backend is None or backend == "auto":
        backend = os.environ.get("FASTCURV_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        why = _unavailable(backend, device)
        if why is not None:
            raise BackendUnavailable(f"fastcurv backend {backend!r} is unavailable: {why}")
        return backend
    if device.type == "cuda":
        order = ("triton", "cuda", "reference")
    else:
        order = ("cpu", "reference")
    for name in order:
        if _unavailable(name, device) is None:
            if name == "reference" and device.type == "cpu":
                _warn_no_extension()
            return name
    return "reference"


def _warn_no_extension() -> None:
    global _warned_no_C
    if not _warned_no_C and _C is None:
        _warned_no_C = True
        warnings.warn(
            f"{extension_problem()}. Using the plain-PyTorch reference ops (same results, slower).",
            RuntimeWarning,
            stacklevel=3,
        )


def available() -> dict[str, bool]:
    """Which backends can run here (for `fastcurv --version` and bug reports)."""
    cuda_ok = torch.cuda.is_available()
    return {
        "cpu": _C is not None,
        "cuda": cuda_ok and has_cuda_kernels(),
        "triton": has_triton() and (cuda_ok or triton_interpret()),
        "reference": True,
    }
