"""Builds fastcurv._C: C++ CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present. Switches (environment): FASTCURV_FORCE_CUDA=1 (fail if CUDA cannot be built),
FASTCURV_SKIP_CUDA=1, TORCH_CUDA_ARCH_LIST, MAX_JOBS. No GPU is needed to compile CUDA.

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


def extensions():
    sources = [os.path.relpath(p, ROOT) for p in ["csrc/fastcurv.cpp", *sorted(glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")))]]
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if _want_cuda():
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")))]
        return [
            CUDAExtension(
                "fastcurv._C",
                sources,
                define_macros=[("FASTCURV_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [CppExtension("fastcurv._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
