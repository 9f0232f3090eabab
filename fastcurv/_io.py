"""Every file fastcurv writes goes through here: written atomically, so nothing is ever half-written.

A write goes to a temp file in the destination's folder (same file system, so the rename is atomic),
is flushed and ``fsync``-ed, then renamed over the destination, and the folder is ``fsync``-ed so the
rename survives a power loss. A failed write (full disk, read-only folder, kill) leaves the previous
version of the file as it was and raises :class:`WriteError`, one line saying what happened and what
to do.

Temp files are named ``.NAME.tmp-HOST-PID-RANDOM``: a later write of the same file removes the ones
whose writer (same host, that PID) is no longer alive, and never a live writer's.

:func:`exclusive` is an advisory lock (``fcntl.flock`` on ``.NAME.lock``) for files that one run
rewrites for a long time (checkpoints): a second process asking for it is refused with
:class:`LockedError` naming the holder. The kernel releases the lock when its holder dies, so a
killed run never leaves a stale lock. (Without ``fcntl``, e.g. on Windows, there is no lock.)
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
import socket
import threading
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["WriteError", "LockedError", "atomic_write", "write_bytes", "write_text", "write_json",
           "save_figure", "exclusive"]

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]+$")


class WriteError(OSError):
    """A file could not be written; the previous version (if any) is intact."""

    def __init__(self, path: str, cause: OSError):
        super().__init__(cause.errno, cause.strerror, path)
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied"}.get(cause.errno, cause.strerror or str(cause))
        folder = os.path.dirname(os.path.abspath(path))
        kept = ("its previous version is kept unchanged" if os.path.exists(path)
                else "nothing was written")
        advice = {errno.ENOSPC: f"free space on the disk of {folder!r} or write somewhere else",
                  errno.EDQUOT: f"free space on the disk of {folder!r} or write somewhere else",
                  errno.EROFS: "write to a writable folder", errno.EACCES: f"make {folder!r} writable or write elsewhere",
                  errno.EPERM: f"make {folder!r} writable or write elsewhere"}.get(cause.errno, "check the folder")
        self.message = f"cannot write {path!r}: {reason} ({cause.strerror or cause}); {kept}. Fix: {advice}"

    def __str__(self) -> str:
        return self.message


class LockedError(OSError):
    """Another live process holds the lock of a file (see :func:`exclusive`)."""

    def __str__(self) -> str:
        return self.args[0]


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphans(path: str) -> None:
    """Delete temp files of ``path`` left by writers on this host that are no longer running."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = _temp_prefix(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMP.search(name) if name.startswith(prefix) else None
        if match and match["host"] == _HOST and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """``with atomic_write(path, "w") as handle: ...``: ``path`` is replaced only if the block and the
    write succeed. Raises :class:`WriteError` (an ``OSError``) for a full disk, a read-only or
    unwritable folder; any other exception in the block also leaves ``path`` untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_orphans(path)
    tmp = os.path.join(folder, f"{_temp_prefix(path)}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        handle = open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {}))
    except OSError as err:
        raise WriteError(path, err) from None
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(path, err) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, value, **dump_options) -> None:
    """``json.dump(value, ...)`` to ``path`` atomically (serialized first: a value json cannot encode
    raises before anything is written)."""
    write_text(path, json.dumps(value, **dump_options))


def save_figure(figure, path: str | os.PathLike, **savefig_options) -> None:
    """``figure.savefig(path)`` atomically (rendered in memory first; the format from the extension)."""
    buffer = io.BytesIO()
    fmt = savefig_options.pop("format", None) or os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    figure.savefig(buffer, format=fmt, **savefig_options)
    write_bytes(path, buffer.getvalue())


# path -> [open lock file, depth]: this process's held locks (flock locks are per open file, so a
# second flock in the same process would refuse itself; nested requests share the first one).
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


def _lock_path(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Hold the advisory write lock of ``path`` for the block; refuse (:class:`LockedError`) when
    another live process holds it. Re-entrant within one process. The ``.NAME.lock`` file stays (an
    empty marker: deleting it while others may open it would let two writers lock two files)."""
    key = os.path.abspath(os.fspath(path))
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    if fcntl is None:  # pragma: no cover - no advisory locks on this platform
        yield
        return
    lock = _lock_path(key)
    try:  # a raw descriptor: nothing buffered that a full disk could refuse at close
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise WriteError(lock, err) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockedError(
            f"{what} {os.fspath(path)!r} is being written by another process ({holder}); two runs writing one "
            f"{what} would overwrite each other's work. Wait for that run to finish, or give this run another path"
        ) from None
    with contextlib.suppress(OSError):  # who holds it, for the refusal message (a full disk may refuse)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    with _HELD_GUARD:
        _HELD[key] = entry = [fd, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            entry[1] -= 1
            release = entry[1] == 0
            if release:
                del _HELD[key]
        if release:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
