"""Builds fastcurv._C: C++ CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present. Switches (environment): FASTCURV_FORCE_CUDA=1 (fail if CUDA cannot be built),
FASTCURV_SKIP_CUDA=1, TORCH_CUDA_ARCH_LIST (default: the visible GPUs, else 8.0;8.6;8.9;9.0+PTX),
MAX_JOBS (parallel compile jobs, read by torch's ninja build). No GPU is needed to compile CUDA.

Install with ``pip install --no-build-isolation .`` after torch, so the extension is built against
the torch you will run with. torch is deliberately not in ``build-system.requires``: an isolated build
would fetch another torch (with gigabytes of CUDA wheels) and build an extension that does not load
with yours, so a build without torch importable stops at once with one line saying what to do.
CUDA kernels are skipped, with a message, when the toolkit's runtime library cannot be found to link
against (never a link failure after minutes of compiling)."""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - the message is the point
    raise SystemExit(
        "fastcurv: torch is not importable in this build environment. Install torch first, then build against "
        "it with `pip install --no-build-isolation .` (pip's default isolated build cannot see your torch)."
    ) from None

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _cudart_found() -> bool:
    """Whether the toolkit has the CUDA runtime library the extension links against."""
    patterns = ["lib64/libcudart.so*", "lib/libcudart.so*", "lib/x64/cudart.lib", "targets/*/lib/libcudart.so*"]
    return any(glob.glob(os.path.join(CUDA_HOME, pattern)) for pattern in patterns)


def _why_no_cuda():
    """Why CUDA kernels cannot be built here, or None if they can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME=/usr/local/cuda)"
    if not _cudart_found():
        return f"the CUDA toolkit at {CUDA_HOME} has no libcudart to link against"
    return None


def _want_cuda() -> bool:
    if _flag("FASTCURV_SKIP_CUDA"):
        return False
    why = _why_no_cuda()
    if _flag("FASTCURV_FORCE_CUDA") and why is not None:
        raise SystemExit(f"FASTCURV_FORCE_CUDA=1 but CUDA cannot be built: {why}")
    if why is not None and torch.version.cuda is not None:  # a CUDA torch: say why its kernels are missing
        print(f"fastcurv: building the C++ CPU kernels only, without CUDA kernels: {why}")
    return why is None


def _default_cuda_arch_list() -> None:
    """Without TORCH_CUDA_ARCH_LIST and without a visible GPU, torch would compile for every
    architecture the toolkit knows (slow, and each .cu already takes minutes): pick data-center and
    consumer generations still supported by CUDA 12/13, plus PTX for newer chips."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0+PTX"
    print(f"fastcurv: TORCH_CUDA_ARCH_LIST not set and no GPU visible; building for {os.environ['TORCH_CUDA_ARCH_LIST']}")


def extensions():
    def rel(paths):
        return [os.path.relpath(p, ROOT) for p in sorted(paths)]

    sources = rel([os.path.join(ROOT, "csrc/fastcurv.cpp"), *glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp"))])
    # Headers: edits to them must trigger a rebuild.
    depends = rel(glob.glob(os.path.join(ROOT, "csrc/**/*.h"), recursive=True))
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
    # No --use_fast_math for nvcc: it flushes fp32 denormals to zero, and results must match the reference.
    cxx = ["-O3", "-fopenmp"]
    if _want_cuda():
        _default_cuda_arch_list()
        sources += rel(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")))
        depends += rel(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cuh")))
        return [
            CUDAExtension(
                "fastcurv._C",
                sources,
                depends=depends,
                define_macros=[("FASTCURV_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [CppExtension("fastcurv._C", sources, depends=depends, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import its helpers
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
