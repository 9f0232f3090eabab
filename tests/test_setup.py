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
