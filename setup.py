"""Builds fastcurv._C: C++ CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present. The extension is optional: without a working C++ toolchain (no compiler, or no
Python headers / OpenMP for it) or with FASTCURV_SKIP_EXT=1, the pure-Python package is installed and
the library runs on its plain-PyTorch reference ops (one line says so at build time, with `pip -v`, and
again at run time; `fastcurv --version` lists the backends that run).

Switches (environment): FASTCURV_SKIP_EXT=1 (pure Python, torch not needed to build),
FASTCURV_REQUIRE_EXT=1 (fail instead of installing without the C++ kernels), FASTCURV_FORCE_CUDA=1
(fail if CUDA cannot be built), FASTCURV_SKIP_CUDA=1, TORCH_CUDA_ARCH_LIST (default: the visible GPUs,
else 8.0;8.6;8.9;9.0+PTX), MAX_JOBS (parallel compile jobs, read by torch's ninja build). No GPU is
needed to compile CUDA.

Install with ``pip install --no-build-isolation .`` after torch, so the extension is built against
the torch you will run with. torch is deliberately not in ``build-system.requires``: an isolated build
would fetch another torch (with gigabytes of CUDA wheels) and build an extension that does not load
with yours, so building the extension without torch importable stops at once with one line saying
what to do. Writing an sdist (or the metadata) never needs torch. A toolchain that is present but fails
on fastcurv's sources is an error, not a silent fallback. CUDA kernels are skipped, with a message,
when the toolkit's runtime library cannot be found to link against (never a link failure after
minutes of compiling)."""
import glob
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as SetuptoolsBuildExt

ROOT = os.path.dirname(os.path.abspath(__file__))

# One text with the run-time warning's: read by path (importing fastcurv would need torch).
HOW_TO_GET_KERNELS = runpy.run_path(os.path.join(ROOT, "fastcurv", "_build_hint.py"))["HOW_TO_GET_KERNELS"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _import_torch():
    """torch, or None when this build environment cannot import it. Quiet: a build without numpy
    (pip builds before it installs the dependencies) would print torch's "Failed to initialize NumPy"."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Failed to initialize NumPy.*")
        try:
            import torch
        except ImportError:
            return None
    return torch


torch = None if _flag("FASTCURV_SKIP_EXT") else _import_torch()
if torch is not None:
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
else:
    CUDA_HOME = None
    BuildExtension = SetuptoolsBuildExt


def _installed_torch_outside_build() -> str | None:
    """Where torch is installed in the environment pip runs in, when this (isolated) build cannot see it."""
    prefixes = {p for p in (os.environ.get("VIRTUAL_ENV"), sys.prefix, sys.base_prefix) if p}
    for prefix in sorted(prefixes):
        for found in glob.glob(os.path.join(prefix, "lib", "python*", "site-packages", "torch", "__init__.py")):
            return os.path.dirname(found)
    return None


def no_torch_message() -> str:
    """What to do when the extension is to be built but torch is not importable here."""
    installed = _installed_torch_outside_build()
    if installed:
        first = (f"fastcurv: torch is installed ({installed}) but this isolated build environment cannot import it: "
                 "build against it with `pip install --no-build-isolation .`")
    else:
        first = ("fastcurv: torch is not installed: install torch first, then build against it with "
                 "`pip install --no-build-isolation .`")
    return first + " (or FASTCURV_SKIP_EXT=1 for the pure-Python package without the C++/CUDA kernels)."


def cxx_compiler() -> str:
    """The C++ compiler torch's extension build runs (its own rule: $CXX, else c++)."""
    return os.environ.get("CXX", "c++")


def toolchain_problem() -> str | None:
    """Why no C++ extension can be compiled here, or None. A tiny translation unit with what every
    extension needs (Python.h, OpenMP) is compiled first, so a missing toolchain ends in one line
    instead of a compiler traceback."""
    compiler = cxx_compiler()
    command = compiler.split()
    if shutil.which(command[0]) is None:
        return f"no C++ compiler ({compiler!r} not found; set CXX or install g++)"
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "probe.cpp")
        with open(source, "w") as handle:
            handle.write("#include <Python.h>\n#include <omp.h>\nint probe() { return omp_get_max_threads(); }\n")
        try:
            result = subprocess.run([*command, "-fopenmp", f"-I{sysconfig.get_paths()['include']}", "-c", source,
                                     "-o", os.path.join(folder, "probe.o")], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as err:
            return f"the C++ compiler {compiler!r} cannot run ({err})"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        detail = lines[0] if lines else f"exit status {result.returncode}"
        return f"the C++ compiler {compiler!r} cannot build a Python extension with OpenMP ({detail})"
    return None


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


def _rel(patterns):
    return [os.path.relpath(p, ROOT) for pattern in patterns for p in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True))]


CPP_SOURCES = ["csrc/fastcurv.cpp", "csrc/cpu/*.cpp"]
CUDA_SOURCES = ["csrc/cuda/*.cu"]
HEADERS = ["csrc/**/*.h"]
CUDA_HEADERS = ["csrc/cuda/*.cuh"]


def extensions():
    """The torch extension to build (torch importable), with CUDA sources when CUDA can be built."""
    sources, depends = _rel(CPP_SOURCES), _rel(HEADERS)  # headers: edits to them must trigger a rebuild
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
    # -g0: Python's CFLAGS carry -g, which made a 6.1 MB .so of debug info (-g0 after it wins).
    # No --use_fast_math for nvcc: it flushes fp32 denormals to zero, and results must match the reference.
    cxx = ["-O3", "-g0", "-fopenmp"]
    if _want_cuda():
        _default_cuda_arch_list()
        return [CUDAExtension("fastcurv._C", sources + _rel(CUDA_SOURCES), depends=depends + _rel(CUDA_HEADERS),
                              define_macros=[("FASTCURV_WITH_CUDA", None)],
                              extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=["-fopenmp"])]
    return [CppExtension("fastcurv._C", sources, depends=depends, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


def skip_line(why: str) -> str:
    return (f"fastcurv: installing without the compiled kernels (C++ CPU and CUDA; Triton is unaffected): {why}. "
            f"The plain-PyTorch reference ops run instead (same results, slower); {HOW_TO_GET_KERNELS}.")


class OptionalBuildExtension(BuildExtension):
    """torch's BuildExtension, except that a missing C++ toolchain installs the pure-Python package
    (FASTCURV_REQUIRE_EXT=1 makes it an error), and a missing torch stops with what to do."""

    def run(self):
        if torch is None:
            raise SystemExit(no_torch_message())
        why = toolchain_problem()
        if why is None:
            return super().run()
        if _flag("FASTCURV_REQUIRE_EXT") or _flag("FASTCURV_FORCE_CUDA"):
            raise SystemExit(f"fastcurv: FASTCURV_REQUIRE_EXT/FASTCURV_FORCE_CUDA set but {why}")
        print(skip_line(why), file=sys.stderr)
        self.extensions = []  # nothing built: the wheel (or editable install) gets no fastcurv._C


def ext_modules():
    if _flag("FASTCURV_SKIP_EXT"):
        print(skip_line("FASTCURV_SKIP_EXT=1"), file=sys.stderr)
        return []
    if torch is not None:
        return extensions()
    # Without torch (an sdist, metadata, or an isolated build that will stop with no_torch_message in
    # build_ext): the extension is named with every source, so nothing here needs torch.
    return [Extension("fastcurv._C", _rel(CPP_SOURCES + CUDA_SOURCES), depends=_rel(HEADERS + CUDA_HEADERS))]


def build_ext_class():
    return OptionalBuildExtension.with_options(use_ninja=True) if torch is not None else OptionalBuildExtension


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import its helpers
    setup(ext_modules=ext_modules(), cmdclass={"build_ext": build_ext_class()})
