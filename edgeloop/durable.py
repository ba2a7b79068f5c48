"""Durable file writes, in one place: a crash or power cut leaves the old content or the new one,
never a mix, and a file that was written is still there afterwards.

The recipe is the classic one: write a temporary file in the same directory, fsync it, rename it
over the target (atomic on POSIX), then fsync the directory, since the rename is only durable once
the directory entry is.

:func:`file_lock` serialises writers of one piece of state across processes (an ``fcntl`` lock
on a file beside it), with a deadline instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

#: How often a waiting :func:`file_lock` tries again.
LOCK_POLL_S = 0.05


class LockTimeout(TimeoutError):
    """Another process held a :func:`file_lock` for longer than the caller would wait."""


def fsync_dir(path: Path) -> None:
    """Make renames, links and new files in the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644, gid: int | None = None) -> None:
    """Replace ``path`` with ``data`` durably and atomically.

    Args:
        mode: The file's permissions (set explicitly: the umask may narrow what ``open`` gives).
        gid: Give the file to this group (e.g. so a broker running as another user can read it).
    """
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if gid is not None:
                os.fchown(f.fileno(), -1, gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing) for the ``with`` block.

    Raises:
        LockTimeout: another process held it for more than ``timeout`` seconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{path} is locked by another process for more than {timeout:g} s") from None
                time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
