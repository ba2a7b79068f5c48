"""The local media store: durable puts (fsync'd file and folder), sharded paths, safe frame ids."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from server.store import media as media_mod
from server.store.media import InvalidFrameId, LocalMediaStore, MediaStore, extension_for


def test_put_stores_bytes_at_a_sharded_path(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path / "media")
    fid = uuid.uuid4().hex
    path = store.put(fid, b"image bytes", "jpg")
    assert path == store.path_for(fid, "jpg")
    assert path.read_bytes() == b"image bytes"
    rel = path.relative_to(store.root)
    assert len(rel.parts) == 3 and rel.name == f"{fid}.jpg"
    assert [len(p) for p in rel.parts[:2]] == [2, 1]
    assert store.exists(fid, "jpg") and not store.exists(fid, "png")
    assert list((store.root / ".tmp").iterdir()) == []  # no temp file left behind


def test_put_is_idempotent(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path)
    fid = "frame-0001"
    first = store.put(fid, b"same", "jpg")
    second = store.put(fid, b"same", "jpg")
    assert first == second and second.read_bytes() == b"same"


def test_paths_spread_over_shards(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path)
    # Sequential ids share their first characters; the shard comes from a hash, so they still spread.
    shards = {store.path_for(f"cam1-{i:08d}", "jpg").parent for i in range(200)}
    assert len(shards) > 150


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    return synced


def test_put_commits_with_one_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.store.media as media

    if media._syncfs is None:
        pytest.skip("syncfs(2) is not available on this platform (see the fallback test)")
    store = LocalMediaStore(tmp_path)
    synced = _count_fsyncs(monkeypatch)
    calls: list[int] = []
    real_syncfs = media._syncfs
    monkeypatch.setattr(media, "_syncfs", lambda fd: calls.append(fd) or real_syncfs(fd))
    path = store.put("abcdef0123456789", b"x" * 1000, "jpg")
    # First put into a leaf folder: the new folder's entry is synced in its parent, then one
    # syncfs makes the file's data and name durable.
    assert synced == [str(path.parent.parent)] and len(calls) == 1
    assert path.read_bytes() == b"x" * 1000


def test_put_without_syncfs_fsyncs_the_file_and_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.store.media as media

    monkeypatch.setattr(media, "_syncfs", None)  # as on platforms without syncfs(2)
    store = LocalMediaStore(tmp_path)
    synced = _count_fsyncs(monkeypatch)
    path = store.put("abcdef0123456789", b"x" * 1000, "jpg")
    # The new folder's entry (its parent), the new file's data (written under its final name:
    # nothing refers to it yet), then the folder holding the name.
    assert synced == [str(path.parent.parent), str(path), str(path.parent)]
    synced.clear()
    # A name that exists may already be read: it is replaced through a synced temp file.
    store.put("abcdef0123456789", b"y" * 1000, "jpg")
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(path.parent)
    assert path.read_bytes() == b"y" * 1000
    # A failed commit keeps what it could not sync for the next one.
    assert store.write_new("fedcba9876543210", b"z", "jpg") is not None
    counting_fsync = os.fsync

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        store.commit()
    monkeypatch.setattr(os, "fsync", counting_fsync)
    synced.clear()
    store.commit()
    assert any(p.endswith("fedcba9876543210.jpg") for p in synced)


def test_a_partial_leftover_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash mid-write leaves a short file under the final name; the resend replaces it whole."""
    store = LocalMediaStore(tmp_path)
    path = store.path_for("abcdef0123456789", "jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"partial")
    opened: list[str] = []
    real_open = os.open

    def recording_open(file, flags, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        opened.append(str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    # What the ingest core does: the new-name write finds the name taken, then replaces the file.
    assert store.write_new("abcdef0123456789", b"whole frame", "jpg") is None
    assert path.read_bytes() == b"partial"
    result = store.replace("abcdef0123456789", b"whole frame", "jpg")
    store.commit()
    assert result == path and path.read_bytes() == b"whole frame"
    # The final name was only tried with O_EXCL (which failed): never truncated or written in place.
    assert opened.count(str(path)) == 1 and any(o.endswith(".tmp") for o in opened)
    assert list((store.root / ".tmp").iterdir()) == []


def test_shard_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _count_fsyncs(monkeypatch)
    store = LocalMediaStore(tmp_path / "media")
    tops = [p for p in store.root.iterdir() if p.is_dir() and p.name != ".tmp"]
    assert len(tops) == 256 and str(store.root) in synced
    # A shard folder removed behind the store's back is made again, durably.
    path = store.put("abcdef0123456789", b"x", "jpg")
    path.unlink()
    path.parent.rmdir()
    synced.clear()
    store.put("abcdef0123456789", b"y", "jpg")
    assert path.read_bytes() == b"y" and str(path.parent.parent) in synced


@pytest.mark.parametrize(
    "frame_id",
    ["../../etc/passwd", "..", "a/b/c/d/e/f", "", "short", "x" * 65, "abc def ghi", "frame\x00id12", "ü" * 10],
)
def test_unsafe_frame_ids_are_refused(tmp_path: Path, frame_id: str) -> None:
    store = LocalMediaStore(tmp_path / "media")
    with pytest.raises(InvalidFrameId):
        store.put(frame_id, b"x", "jpg")
    with pytest.raises(InvalidFrameId):
        store.path_for(frame_id, "jpg")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("ext", ["", "../jpg", "JPG", "jpg/x", "verylongext"])
def test_unsafe_extensions_are_refused(tmp_path: Path, ext: str) -> None:
    with pytest.raises(ValueError):
        LocalMediaStore(tmp_path).put("abcdef012345", b"x", ext)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalMediaStore(tmp_path)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        store.put("abcdef012345", b"x", "jpg")
    monkeypatch.undo()
    assert not store.exists("abcdef012345", "jpg")
    assert list((store.root / ".tmp").iterdir()) == []


def test_delete(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path)
    store.put("abcdef012345", b"x", "png")
    assert store.delete("abcdef012345", "png")
    assert not store.exists("abcdef012345", "png")
    assert not store.delete("abcdef012345", "png")


def test_stale_temp_files_are_swept_at_start(tmp_path: Path) -> None:
    LocalMediaStore(tmp_path)
    stale, fresh = tmp_path / ".tmp" / "old.tmp", tmp_path / ".tmp" / "new.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    old = time.time() - media_mod.STALE_TEMP_S - 10
    os.utime(stale, (old, old))
    LocalMediaStore(tmp_path)
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to another process's put


def test_concurrent_puts(tmp_path: Path) -> None:
    store: MediaStore = LocalMediaStore(tmp_path)
    ids = [uuid.uuid4().hex for _ in range(80)]
    errors: list[BaseException] = []

    def worker(chunk: list[str]) -> None:
        try:
            for fid in chunk:
                store.put(fid, fid.encode(), "jpg")
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(ids[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(store.path_for(fid, "jpg").read_bytes() == fid.encode() for fid in ids)


def test_extension_for() -> None:
    assert extension_for("image/jpeg") == extension_for("") == "jpg"
    assert extension_for("image/png") == "png"
    with pytest.raises(ValueError):
        extension_for("image/gif")


def test_a_batch_of_writes_is_committed_with_one_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: no per-file fsync, one syncfs for the batch, every file complete afterwards;
    a failing syncfs raises (none of the batch may be acknowledged)."""
    import server.store.media as media

    if media._syncfs is None:
        pytest.skip("syncfs(2) is not available on this platform (commit fsyncs each file instead)")
    store = LocalMediaStore(tmp_path / "media")
    synced = _count_fsyncs(monkeypatch)
    calls: list[int] = []
    real_syncfs = media._syncfs
    monkeypatch.setattr(media, "_syncfs", lambda fd: calls.append(fd) or real_syncfs(fd))
    items = [(f"{i:032x}", bytes([i]) * 1000, "jpg") for i in range(10)]
    paths = [store.write_new(*item) for item in items]
    store.commit()
    assert len(calls) == 1
    assert not [p for p in synced if p.endswith((".jpg", ".tmp"))]  # no per-file fsync
    for (fid, data, ext), path in zip(items, paths, strict=True):
        assert path == store.path_for(fid, ext) and path.read_bytes() == data

    monkeypatch.setattr(media, "_syncfs", lambda fd: -1)
    for i in range(20, 23):
        store.write_new(f"{i:032x}", b"x", "jpg")
    with pytest.raises(OSError):
        store.commit()
