"""Optional third-party model libraries for the tests: each helper returns the module or skips the
calling test when it is not installed (they are test extras, installed with ``--no-deps`` beside
torch, never replacing it).

torchvision wheels built for another torch (a CUDA wheel beside a CPU torch) fail at import with
"operator torchvision::nms does not exist": their C++ ops cannot load, and the Python side registers
fake kernels for ops nobody defined. Only in that case :func:`import_torchvision` defines the two
schemas it needs (``nms``, ``qnms``) without kernels and imports again; the models do not use them."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

__all__ = ["import_torchvision", "import_timm", "import_transformers"]

# kept alive for the session: dropping a torch.library.Library removes its definitions
_TORCHVISION_SCHEMAS: list = []


def _forget(package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


def _load_torchvision():
    """``torchvision`` or None when it is absent; defines the schemas only when its C++ ops did not load."""
    try:
        return importlib.import_module("torchvision")
    except ImportError:
        return None
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
    # a wheel built for another torch: define the schemas, import again
    _forget("torchvision")
    if not _TORCHVISION_SCHEMAS:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS.append(lib)
    return importlib.import_module("torchvision")


def _import_or_skip(name: str):
    _load_torchvision()  # timm and transformers import torchvision when it is installed
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not installed (optional test dependency)")


def import_torchvision():
    """``torchvision``, or a skip when it is absent."""
    tv = _load_torchvision()
    if tv is None:
        pytest.skip("torchvision is not installed (optional test dependency)")
    return tv


def import_timm():
    """``timm``, or a skip when it is absent."""
    return _import_or_skip("timm")


def import_transformers():
    """``transformers``, or a skip when it is absent."""
    return _import_or_skip("transformers")
