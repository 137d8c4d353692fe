"""Atomic file writing shared by every layer (no medssl imports).

Everything medssl writes goes to a temporary file in the same folder and is renamed into place, so
a crash leaves the old content or the new, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def default_file_mode() -> int:
    """0666 minus the umask: what ``open`` would give. ``mkstemp`` makes 0600 files, which would
    hide results and checkpoints from colleagues on a shared cluster."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.fchmod(fd, default_file_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        named = named_disk_full(err, path)
        if named is None:
            raise
        raise named from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def named_disk_full(err: BaseException, path: str | Path) -> OSError | None:
    """A disk-full error that names ``path`` when it named no file (a write to an open file names
    none); None for any other error, or one that already names its file."""
    if not is_disk_full(err) or getattr(err, "filename", None):
        return None
    assert isinstance(err, OSError)
    return OSError(err.errno, err.strerror or os.strerror(err.errno or errno.ENOSPC), str(path))


class LockHeldError(RuntimeError):
    """A non-blocking :func:`file_lock` found the lock held by another process."""


@contextlib.contextmanager
def file_lock(lock_path: str | Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive OS lock on ``lock_path`` (released if the process dies), so that processes
    sharing an output folder take turns at a read-modify-write of shared files.

    ``blocking=False``: raise ``LockHeldError`` at once when another process holds it (a run claim)."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as err:
            if not blocking and err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockHeldError(f"{lock_path} is held by another process") from None
            raise
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def json_default(obj: Any) -> Any:
    """``json.dumps``'s ``default`` for everything medssl writes: paths, numpy/torch scalars and arrays."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(data: Any, indent: int | None = 2) -> str:
    return json.dumps(data, indent=indent, default=json_default)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, to_json(data) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's contents, read in chunks (checkpoints are hundreds of MB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
