"""Builds fastcurv._C: C++ CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present. Switches (environment): FASTCURV_FORCE_CUDA=1 (fail if CUDA cannot be built),
FASTCURV_SKIP_CUDA=1, TORCH_CUDA_ARCH_LIST (default: the visible GPUs, else 8.0;8.6;8.9;9.0+PTX),
MAX_JOBS (parallel compile jobs, read by torch's ninja build). No GPU is needed to compile CUDA.

Install with ``pip install --no-build-isolation .`` after torch, so the extension is built against
the torch you will run with (an isolated build would fetch another torch)."""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as err:  # pragma: no cover
    raise SystemExit(
        "fastcurv needs torch installed before it is built: `pip install torch` first, then "
        "`pip install --no-build-isolation .`"
    ) from err

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _want_cuda() -> bool:
    if _flag("FASTCURV_SKIP_CUDA"):
        return False
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("FASTCURV_FORCE_CUDA"):
        if not possible:
            raise SystemExit(
                "FASTCURV_FORCE_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME} "
                "(install a CUDA build of torch and set CUDA_HOME=/usr/local/cuda)"
            )
        return True
    return possible


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


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
