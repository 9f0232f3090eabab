"""Nothing lost: every file fastcurv writes goes through fastcurv._io (temp file, fsync, rename), a failed
write (full disk, read-only folder) leaves the previous version intact with a one-line message, and two
processes never write one checkpoint."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from fastcurv import _io
from fastcurv.cli import main
from fastcurv.train import fit, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mount_tmpfs(folder, size="64k"):
    folder.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a full disk on demand."""
    folder = tmp_path / "disk"
    _mount_tmpfs(folder)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder):
    """Fill the file system of ``folder`` to the last byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


def test_full_disk_during_a_checkpoint_save_keeps_the_previous_one(tiny_disk):
    path = tiny_disk / "run.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(10.0)})
    before = path.read_bytes()
    _fill(tiny_disk)
    with pytest.raises(_io.WriteError, match="the disk is full .*previous version is kept unchanged. Fix: free space"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(4000)})
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    assert _leftovers(tiny_disk) == []


def test_full_disk_in_the_cli_is_one_line_and_keeps_the_checkpoint(tiny_disk, capsys):
    ckpt = str(tiny_disk / "run.pt")
    base = ["train", "--dataset", "xord", "--quiet", "--epochs", "1", "--batch-size", "8", "--checkpoint", ckpt]
    assert main(base) == 0
    capsys.readouterr()
    before = open(ckpt, "rb").read()
    _fill(tiny_disk)
    assert main([*base, "--overwrite", "--width", "64"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "previous version is kept" in err, err
    assert len(err.strip().splitlines()) == 1 and "inline_container" not in err
    assert open(ckpt, "rb").read() == before
    assert _leftovers(tiny_disk) == []


def test_full_disk_keeps_the_previous_results_json(tiny_disk):
    path = tiny_disk / "results.json"
    _io.write_json(path, {"ok": 1})
    _fill(tiny_disk)
    with pytest.raises(OSError, match="disk is full"):
        _io.write_json(path, {"rows": list(range(20000))})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _leftovers(tiny_disk) == []


def test_read_only_folder_keeps_the_previous_version(tmp_path):
    folder = tmp_path / "ro"
    _mount_tmpfs(folder, "1m")
    try:
        path = folder / "table.md"
        _io.write_text(path, "old\n")
        remount = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True)
        if remount.returncode:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        for write in (lambda: _io.write_text(path, "new\n"), lambda: save_checkpoint(folder / "c.pt", {"epoch": 1})):
            with pytest.raises(_io.WriteError, match="read-only"):
                write()
        assert path.read_text() == "old\n"
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_failing_writer_leaves_the_file_alone(tmp_path):
    path = tmp_path / "results.json"
    _io.write_json(path, {"ok": 1})
    with pytest.raises(TypeError):  # not JSON: found before anything is written
        _io.write_json(path, {"bad": object()})
    with pytest.raises(ZeroDivisionError):
        with _io.atomic_write(path, "w") as handle:
            handle.write("half")
            1 / 0
    assert json.loads(path.read_text()) == {"ok": 1} and _leftovers(tmp_path) == []


def test_every_write_in_the_library_goes_through_fastcurv_io():
    """No open(..., 'w'), savefig(path), json.dump or torch.save(..., path) outside fastcurv/_io.py."""
    import re

    pattern = re.compile(r"open\([^)]*['\"][wa]b?['\"]|\.savefig\(|json\.dump\(|torch\.save\((?!state, buffer|envelope, buffer|state\))"
                         r"|os\.replace\(|\.write_(text|bytes)\(")
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "fastcurv")):
        for name in files:
            if name.endswith(".py") and name != "_io.py":
                text = open(os.path.join(folder, name)).read()
                offenders += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert offenders == []


_WRITER = """
import os, sys, time
import torch
from torch import nn
from fastcurv.train import fit
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
data = (torch.randn(16, 2), torch.randint(0, 2, (16,)))
def schedule(t):  # after epoch 0 is checkpointed, wait until the test says go on: the run is still live
    deadline = time.time() + 300
    while t == 1 and not os.path.exists(sys.argv[2]) and time.time() < deadline:
        time.sleep(0.05)
    return 0.1
fit(model, data, data, epochs=3, schedule=schedule, checkpoint=sys.argv[1], progress=False)
print("done")
"""


def test_a_second_process_writing_the_same_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "run.pt"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    go_on = tmp_path / "go_on"
    first = subprocess.Popen([sys.executable, "-c", _WRITER, str(ckpt), str(go_on)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline:  # the first run has written epoch 1
            time.sleep(0.05)
        assert ckpt.exists(), first.communicate(timeout=60)
        second = subprocess.run(
            [sys.executable, "-m", "fastcurv.cli", "train", "--dataset", "xord", "--quiet", "--epochs", "2",
             "--checkpoint", str(ckpt), "--overwrite"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, first.communicate()
        assert second.returncode == 2, second.stderr
        assert f"is being written by another process (pid {first.pid} on" in second.stderr, second.stderr
        with pytest.raises(_io.LockedError, match=f"pid {first.pid}"):  # in-process API too
            save_checkpoint(ckpt, {"epoch": 99})
        go_on.write_text("")
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and "done" in out, err
    assert load_checkpoint(ckpt)["epoch"] == 3  # the first run's work, whole
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))  # the lock is free again
    data = (torch.randn(8, 2), torch.randint(0, 2, (8,)))
    fit(model, data, data, epochs=1, checkpoint=str(ckpt), progress=False)
