"""setup.py's CUDA decision: a CUDA torch with a toolkit that cannot be linked (no libcudart) builds the CPU
kernels with a message instead of failing at link; FASTCURV_FORCE_CUDA=1 then fails at once, saying why."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("fastcurv_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers without building
    monkeypatch.delenv("FASTCURV_SKIP_CUDA", raising=False)
    monkeypatch.delenv("FASTCURV_FORCE_CUDA", raising=False)
    return module


def _fake_toolkit(folder, with_cudart: bool):
    os.makedirs(os.path.join(folder, "bin"))
    os.makedirs(os.path.join(folder, "lib64"))
    if with_cudart:
        open(os.path.join(folder, "lib64", "libcudart.so"), "w").close()
    return str(folder)


def test_cuda_toolkit_without_cudart_is_skipped_not_linked(setup_module, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(setup_module.torch.version, "cuda", "12.4")
    monkeypatch.setattr(setup_module, "CUDA_HOME", _fake_toolkit(tmp_path / "cuda", with_cudart=False))
    assert setup_module._want_cuda() is False
    assert "without CUDA kernels: the CUDA toolkit at" in capsys.readouterr().out
    monkeypatch.setenv("FASTCURV_FORCE_CUDA", "1")
    with pytest.raises(SystemExit, match="FASTCURV_FORCE_CUDA=1 but CUDA cannot be built: .* no libcudart"):
        setup_module._want_cuda()


def test_cuda_built_when_toolkit_and_cuda_torch_are_complete(setup_module, monkeypatch, tmp_path):
    monkeypatch.setattr(setup_module.torch.version, "cuda", "12.4")
    monkeypatch.setattr(setup_module, "CUDA_HOME", _fake_toolkit(tmp_path / "cuda", with_cudart=True))
    assert setup_module._want_cuda() is True
    monkeypatch.setenv("FASTCURV_SKIP_CUDA", "1")
    assert setup_module._want_cuda() is False


def test_cpu_torch_never_builds_cuda(setup_module, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(setup_module.torch.version, "cuda", None)
    monkeypatch.setattr(setup_module, "CUDA_HOME", _fake_toolkit(tmp_path / "cuda", with_cudart=True))
    assert setup_module._want_cuda() is False
    assert capsys.readouterr().out == ""  # nothing to explain for a CPU torch


# --- the extension is optional: no toolchain (or FASTCURV_SKIP_EXT=1) installs the pure-Python package ---

def _run_setup(args, tmp_path, env=None, hide_torch=False):
    """setup.py as pip runs it (as __main__, from the project root), optionally with torch unimportable."""
    import subprocess
    import sys

    code = ("import runpy, sys; " + ("sys.modules['torch'] = None; " if hide_torch else "")
            + f"sys.argv = ['setup.py', *{list(args)!r}]; runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("cxx, expected", [("/bin/false", "cannot build a Python extension"),
                                           ("no-such-compiler-xyz", "no C++ compiler")])
def test_missing_toolchain_is_named(setup_module, monkeypatch, cxx, expected):
    monkeypatch.setenv("CXX", cxx)
    assert expected in setup_module.toolchain_problem()


def test_working_toolchain_passes_the_probe(setup_module, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    if setup_module.shutil.which("c++") is None:
        pytest.skip("no c++ on this machine")
    assert setup_module.toolchain_problem() is None


def test_build_without_a_compiler_succeeds_with_one_line_and_no_extension(tmp_path):
    result = _run_setup(["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                        tmp_path, env={"CXX": "/bin/false"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fastcurv:")]
    assert len(lines) == 1 and "installing without the compiled kernels (C++ CPU and CUDA" in lines[0]
    assert "pip install --no-build-isolation --force-reinstall" in lines[0]
    assert not list(tmp_path.rglob("_C*.so"))
    assert "Failed to initialize NumPy" not in result.stderr + result.stdout


def test_required_extension_fails_without_a_compiler(tmp_path):
    result = _run_setup(["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                        tmp_path, env={"CXX": "/bin/false", "FASTCURV_REQUIRE_EXT": "1"})
    assert result.returncode != 0 and "FASTCURV_REQUIRE_EXT" in result.stderr


def test_isolated_build_message_says_torch_is_installed_when_it_is(setup_module, monkeypatch, tmp_path):
    venv = tmp_path / "venv"
    (venv / "lib" / "python3.11" / "site-packages" / "torch").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "site-packages" / "torch" / "__init__.py").write_text("")
    monkeypatch.setenv("VIRTUAL_ENV", str(venv))
    message = setup_module.no_torch_message()
    assert "torch is installed" in message and "--no-build-isolation" in message and "install torch first" not in message
    monkeypatch.setattr(setup_module, "_installed_torch_outside_build", lambda: None)
    assert "torch is not installed: install torch first" in setup_module.no_torch_message()


def _git_files(*patterns):
    import glob

    return sorted(os.path.relpath(p, ROOT) for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
                  if "__pycache__" not in p)


def test_sdist_needs_no_torch_and_carries_every_backend(tmp_path, monkeypatch):
    """`python -m build --sdist` runs setup.py in an environment without torch: the sdist must be written
    there and hold the sources of every backend (the CUDA ones too, on a machine that cannot build them),
    the tests' helpers, and build CUDA kernels from it where a toolkit and a CUDA torch are present."""
    import tarfile

    result = _run_setup(["sdist", "--dist-dir", str(tmp_path)], tmp_path, hide_torch=True)
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("fastcurv-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        tar.extractall(tmp_path / "unpacked", filter="data")
    needed = _git_files("csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh", "fastcurv/**/*.py",
                        "tests/*.py", "bench/*.py", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md")
    assert "csrc/cuda/per_example_sqnorm.cu" in needed and "tests/conftest.py" in needed and "tests/zoo.py" in needed
    missing = sorted(set(needed) - names)
    assert not missing, f"the sdist lacks {missing}: add them to MANIFEST.in"

    # The unpacked sdist's setup.py picks the CUDA sources when CUDA can be built.
    (root,) = (tmp_path / "unpacked").iterdir()
    spec = importlib.util.spec_from_file_location("sdist_setup", root / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("FASTCURV_SKIP_CUDA", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(module.torch.version, "cuda", "12.4")
    toolkit = _fake_toolkit(tmp_path / "cuda", with_cudart=True)
    monkeypatch.setattr(module, "CUDA_HOME", toolkit)
    monkeypatch.setattr(module.torch.utils.cpp_extension, "CUDA_HOME", toolkit)  # CUDAExtension reads torch's
    (extension,) = module.extensions()
    cu = sorted(s for s in extension.sources if s.endswith(".cu"))
    assert cu == ["csrc/cuda/per_example_gram.cu", "csrc/cuda/per_example_sqnorm.cu"]
    assert ("FASTCURV_WITH_CUDA", None) in extension.define_macros


def test_version_names_the_missing_kernels(monkeypatch, capsys):
    from fastcurv import _backend
    from fastcurv.cli import main

    err = ModuleNotFoundError("No module named 'fastcurv._C'", name="fastcurv._C")
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_C_ERROR", err)
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert "cpu=no" in out and "reference=yes" in out
    assert "fastcurv._C was not built" in out and "--no-build-isolation --force-reinstall" in out
