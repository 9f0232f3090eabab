"""Checkpoints written atomically (:mod:`fastcurv._io`: temp file in the same folder, fsync, rename), so an interrupted
write never leaves a truncated file where a good one was, and verified on load by a SHA-256 checksum
of their payload, so a corrupted file (flipped bytes, an overwritten weight) is refused instead of
silently resuming from, or measuring, a different model.

File layout (a ``torch.save`` file, readable with ``torch.load(path, weights_only=True)``)::

    {"format": "fastcurv-checkpoint", "format_version": 2, "sha256": <hex digest of payload>,
     "payload": <bytes of torch.save(state)>}
"""
from __future__ import annotations

import hashlib
import io
import os

import torch

from fastcurv._io import WriteError, exclusive, write_bytes

FORMAT = "fastcurv-checkpoint"
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file is missing, not a fastcurv checkpoint, truncated or corrupted."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (a dict of tensors / plain Python values) to ``path`` atomically, with a checksum.

    Serialized in memory first, then written by :func:`fastcurv._io.write_bytes`: a full disk or an
    unwritable folder raises :class:`fastcurv._io.WriteError` (an ``OSError``, one line) and leaves
    the previous checkpoint intact. While another process holds the checkpoint's lock (a ``fit`` run
    writing it, see :func:`fastcurv._io.exclusive`) the save is refused with
    :class:`fastcurv._io.LockedError`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is a directory; give a file name such as {os.path.join(path, 'run.pt')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise WriteError(path, err) from None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    envelope = {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": payload}
    buffer = io.BytesIO()
    torch.save(envelope, buffer)  # in memory: torch's own writer turns a full disk into an unclear RuntimeError
    with exclusive(path, "checkpoint"):
        write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying its checksum.

    Raises :class:`CheckpointError` (a ``ValueError``) with one clear line for a directory, an empty,
    truncated, corrupted or foreign file, and ``FileNotFoundError`` for a missing one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")
    try:
        # The envelope holds only strings, ints and bytes: the safe loader suffices.
        envelope = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise CheckpointError(f"checkpoint {path!r} cannot be read: truncated, corrupted or not a torch file "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a fastcurv checkpoint (written by fastcurv.train.save_checkpoint)")
    if envelope.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {envelope.get('format_version')}, this "
                              f"fastcurv reads {FORMAT_VERSION} (version 1 files carry no checksum; train again)")
    payload = envelope.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != envelope.get("sha256"):
        raise CheckpointError(f"checkpoint {path!r} is corrupted: its contents do not match the SHA-256 checksum "
                              "written with them")
    # weights_only=False: the state holds the history and config (plain Python objects) next to the
    # tensors. Only load checkpoints you wrote (same caveat as torch.load).
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
