"""Checkpoints written atomically (temp file in the same folder + ``os.replace``), so an interrupted
write never leaves a truncated file where a good one was."""
from __future__ import annotations

import os
import tempfile

import torch

FORMAT = "fastcurv-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (a dict of tensors / plain Python values) to ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error for anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    # weights_only=False: the checkpoint holds the history and config (plain Python objects) next to
    # the tensors. Only load checkpoints you wrote (same caveat as torch.load).
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a fastcurv checkpoint (written by fastcurv.train.save_checkpoint)")
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path!r} has format version {state.get('format_version')}, this fastcurv reads {FORMAT_VERSION}"
        )
    return state
