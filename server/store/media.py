"""The media store: where the image bytes of ingested frames live, durably, one file per frame.

The FiftyOne inbox stores each sample's ``filepath``; this module decides that path and makes
the bytes behind it durable *before* the sample is written, so the database never points at a
file that a crash could lose.

Layout: ``root/<ab>/<c>/<frame_id>.<ext>`` where ``abc`` are the first hex digits of a hash of
the frame id. Hashing (rather than taking the id's own first characters) spreads any id scheme
evenly over 4,096 leaf folders: ~250 files each at a million frames, ~25,000 at a hundred
million, so no folder ever holds millions of files. The 256 top folders are made when a store
is opened; a leaf folder is made (and its parent synced) by the first put that needs it, which
costs that put one more ``fsync``. Temporary files go to ``root/.tmp`` (same file system, so
``os.replace`` is atomic) and leftovers of a crash older than :data:`STALE_TEMP_S` are swept at
start-up.

Durability: :meth:`LocalMediaStore.write_new` writes a new name directly,
:meth:`LocalMediaStore.replace` an existing one through a temp file and ``os.replace``; neither
is durable until :meth:`LocalMediaStore.commit`, one ``syncfs`` for every write before it (where
``syncfs`` is missing: an ``fsync`` of each file and folder written since the last commit). A new
folder's entry is synced in its parent when the folder is made. :meth:`LocalMediaStore.put` is
all of it for one frame: when it returns, the file survives a power cut with exactly the bytes
given.

Object storage
--------------
Open-source FiftyOne (the App and ``sample.filepath``) reads media from *local paths*; it does
not sign or fetch ``s3://``/``gs://`` URLs (that is FiftyOne Enterprise). Two ways to keep the
App working with a bucket, both without code changes here:

1. **Shared mount** (the recommended one): mount the bucket as a file system on the server and
   on every machine that runs the App or training (s3fs/goofys, gcsfuse, blobfuse2, or an NFS/
   EFS/Filestore share) and point :attr:`MediaConfig.root` at the mount. ``put`` keeps its
   contract as far as the mount honours ``fsync`` (gcsfuse and blobfuse2 upload on
   ``fsync``/``close``; check your driver's flags: e.g. goofys acknowledges before upload and
   must not be used for the ingest side).
2. **Local cache in front of the bucket**: ingest writes here (local, durable), a separate
   uploader copies files to the bucket with fsspec, and App machines read through fsspec's
   ``filecache::s3://...`` into a local directory laid out like this one. The inbox keeps local
   paths, so nothing in FiftyOne changes.

A store that writes straight to object storage would implement :class:`MediaStore` with
fsspec (``put`` = upload, returning once the object store confirms it); it is left out because
FiftyOne OSS could not display what it stores.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

from pydantic import Field

from edgeloop.config_base import StrictModel
from edgeloop.durable import fsync_dir

logger = logging.getLogger(__name__)

#: Frame ids become file names: only this charset and length are accepted (no ``/``, no ``..``).
FRAME_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")
#: File extensions the store writes (lower-case letters/digits, no dot).
_EXT_PATTERN = re.compile(r"[a-z0-9]{1,8}")
#: Media types the server accepts and the extension their files get.
EXTENSIONS: dict[str, str] = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
#: Temp files older than this are crash leftovers (a put takes milliseconds) and are removed at start-up.
STALE_TEMP_S = 3600.0
_TEMP_DIR = ".tmp"


class InvalidFrameId(ValueError):
    """A frame id that is not safe to use as a file name (path traversal, odd characters, length)."""


def check_frame_id(frame_id: str) -> str:
    """Return ``frame_id`` if it matches :data:`FRAME_ID_PATTERN`, else raise :class:`InvalidFrameId`."""
    if not isinstance(frame_id, str) or not FRAME_ID_PATTERN.fullmatch(frame_id):
        raise InvalidFrameId(f"frame id {frame_id!r} must be 8-64 characters of A-Z a-z 0-9 _ -")
    return frame_id


def extension_for(media_type: str) -> str:
    """The file extension for an accepted media type; ``""`` means JPEG (the wire default)."""
    try:
        return EXTENSIONS[media_type or "image/jpeg"]
    except KeyError:
        raise ValueError(f"unsupported media type {media_type!r}; accepted: {', '.join(EXTENSIONS)}") from None


class MediaConfig(StrictModel):
    """Where frame images are stored."""

    root: Path = Field(
        Path("var/media"),
        title="Media root",
        description=(
            "Local directory for frame images (fsync'd before a frame is acknowledged). FiftyOne OSS "
            "reads media from local paths: for object storage mount the bucket here or put a local "
            "cache in front of it (see server/store/media.py)."
        ),
    )


class MediaStore(Protocol):
    """Durable storage of one encoded image per frame id."""

    def put(self, frame_id: str, data: bytes, ext: str) -> Path:
        """Store ``data`` durably and return its local path; idempotent per (frame_id, ext)."""
        ...

    def write_new(self, frame_id: str, data: bytes, ext: str) -> Path | None:
        """Write a frame under a name that does not exist yet; None (nothing written) if it exists.

        Not durable until :meth:`commit` returns; nothing may refer to the path before that.
        """
        ...

    def commit(self) -> None:
        """Make every :meth:`write_new` that returned before this call durable; raises OSError."""
        ...

    def path_for(self, frame_id: str, ext: str) -> Path:
        """Where the frame's file is (or would be)."""
        ...

    def exists(self, frame_id: str, ext: str) -> bool: ...

    def files_of(self, frame_id: str) -> list[Path]:
        """The frame's files, whatever their extension (a frame id has one file at most, normally)."""
        ...

    def delete(self, frame_id: str, ext: str) -> bool:
        """Remove the frame's file; False if there was none."""
        ...


def _load_syncfs():
    """glibc's syncfs(2): flush one filesystem's dirty data and metadata; None where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs() if sys.platform.startswith("linux") else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LocalMediaStore:
    """A :class:`MediaStore` on a local (or mounted) directory; thread-safe.

    Args:
        root: The store's directory; created if missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._tmp = self.root / _TEMP_DIR
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        # Written but not yet committed (files; folders of replaced files), only where syncfs is missing.
        self._pending: set[Path] = set()
        self._pending_lock = threading.Lock()
        self._ensure_dir(self._tmp)
        self._create_shards()
        self._sweep_temp()

    @classmethod
    def from_config(cls, config: MediaConfig) -> LocalMediaStore:
        return cls(config.root)

    def path_for(self, frame_id: str, ext: str) -> Path:
        check_frame_id(frame_id)
        if not _EXT_PATTERN.fullmatch(ext):
            raise ValueError(f"file extension {ext!r} must be 1-8 lower-case letters or digits")
        digest = hashlib.blake2b(frame_id.encode(), digest_size=2).hexdigest()
        return self.root / digest[:2] / digest[2] / f"{frame_id}.{ext}"

    def put(self, frame_id: str, data: bytes, ext: str) -> Path:
        """Write ``data`` as the frame's file and return its path once it is on disk.

        Rewriting a frame that is already stored replaces the file atomically (a redelivered
        frame carries the same bytes), so readers never see a partial file.
        """
        path = self.write_new(frame_id, data, ext)
        if path is None:
            path = self.replace(frame_id, data, ext)
        self.commit()
        return path

    def write_new(self, frame_id: str, data: bytes, ext: str) -> Path | None:
        """Write a new frame straight to its final name; None (nothing written) if the name exists.

        Not durable until :meth:`commit`. Writing in place is safe because nothing refers to a
        new name until its frame's sample is stored, which happens only after the commit: no
        reader can meet a partial file, and a crash mid-write leaves a file no sample points at
        (the resend finds the name taken and goes through :meth:`replace`). Measured: ~45 us per
        100 KB file, against ~70 us through a temp file and a rename.
        """
        path = self.path_for(frame_id, ext)
        if path.parent not in self._known_dirs:
            self._ensure_dir(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return None
        except FileNotFoundError:  # its shard folder was removed while the store was open
            self._known_dirs.discard(path.parent)
            self._ensure_dir(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)  # a partial file must not be taken for the frame
            raise
        os.close(fd)
        if _syncfs is None:
            with self._pending_lock:
                self._pending.add(path)
        return path

    def replace(self, frame_id: str, data: bytes, ext: str) -> Path:
        """Write the frame's file whether or not it exists, atomically (temp file + rename): the
        name may already be read, or hold a partial leftover of a crash. Durable after :meth:`commit`."""
        path = self.path_for(frame_id, ext)
        if path.parent not in self._known_dirs:
            self._ensure_dir(path.parent)
        tmp = self._tmp / f"{frame_id}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, data)
                if _syncfs is None:
                    os.fsync(fd)  # the fallback commit syncs folders, not this temp file
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if _syncfs is None:
            with self._pending_lock:
                self._pending.add(path.parent)
        return path

    def commit(self) -> None:
        """One ``syncfs`` of the store's file system: every file written before it, data and
        name, is then on disk. Where ``syncfs`` is missing, each file written since the last
        commit and its folder are fsync'd instead."""
        if _syncfs is not None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _syncfs(fd) != 0:
                    raise OSError(ctypes.get_errno(), f"syncfs({self.root}) failed")
            finally:
                os.close(fd)
            return
        with self._pending_lock:
            pending, self._pending = self._pending, set()
        try:
            folders = set()
            for path in pending:
                if path.is_dir():
                    folders.add(path)
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                folders.add(path.parent)
            for folder in folders:
                fsync_dir(folder)
        except BaseException:
            with self._pending_lock:
                self._pending |= pending  # still not durable: the next commit tries again
            raise

    def exists(self, frame_id: str, ext: str) -> bool:
        return self.path_for(frame_id, ext).is_file()

    def files_of(self, frame_id: str) -> list[Path]:
        """The frame's files under every extension the store writes (one ``stat`` per media type:
        they share a folder, as the folder depends on the frame id only)."""
        return [path for ext in EXTENSIONS.values() if (path := self.path_for(frame_id, ext)).is_file()]

    def delete(self, frame_id: str, ext: str) -> bool:
        path = self.path_for(frame_id, ext)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def _create_shards(self) -> None:
        """Create the missing top-level shard folders, then sync the root once."""
        for hi in range(256):
            with contextlib.suppress(FileExistsError):
                (self.root / f"{hi:02x}").mkdir()
        # Unconditionally: folders an earlier process made may not have been synced before it died.
        fsync_dir(self.root)

    def _ensure_dir(self, path: Path) -> None:
        """Make ``path`` (and missing parents) exist durably: each one's entry synced in its parent.

        The parent is synced even when ``path`` already existed: a previous process may have made
        it and died before syncing, leaving the entry only in the page cache.
        """
        with self._dirs_lock:
            if path in self._known_dirs:
                return
            missing: list[Path] = []
            p = path
            while not p.is_dir():
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                    d.mkdir()
            for parent in dict.fromkeys([d.parent for d in reversed(missing)] + [path.parent]):
                fsync_dir(parent)
            self._known_dirs.add(path)

    def _sweep_temp(self) -> None:
        cutoff = time.time() - STALE_TEMP_S
        removed = 0
        for entry in os.scandir(self._tmp):
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError as err:
                if err.errno != errno.ENOENT:
                    logger.warning("could not remove stale temp file %s: %s", entry.path, err)
        if removed:
            logger.info("removed %d stale temp files from %s", removed, self._tmp)
