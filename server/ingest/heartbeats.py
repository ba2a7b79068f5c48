"""The latest heartbeat of every device: what it runs and how it is doing, as it last reported.

Both transports hand heartbeats (``DeviceStatus``) here, after :func:`bound_status` checked them
against the limits below. The store keeps the newest status per device in memory and mirrors it
to an SQLite database under the server's data directory (WAL journal, one row per device):
writing a heartbeat updates its device's row, never the whole fleet, and a crash leaves the
previous or the new row, never a torn file.

Limits: a heartbeat message is at most :data:`MAX_HEARTBEAT_BYTES`; names (device id, model and
agent versions, channel, counter names) are at most :data:`MAX_NAME_CHARS` characters (the
device id :data:`~server.ingest.base.MAX_DEVICE_ID_CHARS`); at most :data:`MAX_COUNTERS`
counters. A heartbeat over one is refused with a message that names the field (gRPC
``INVALID_ARGUMENT``; over MQTT a log line and ``heartbeats_rejected``). ``last_error`` is free
text (a traceback, say): it is cut to :data:`MAX_ERROR_CHARS` characters rather than refused.
So one device's row stays under ~16 KB whatever it sends.

Writes are batched: the rows of devices that reported since the last write are written in one
transaction, at most once per ``flush_interval_s`` (a fleet heartbeating every minute must not
turn into a disk write per message); a status newer than the last write reaches the disk within
that interval, or at :meth:`HeartbeatStore.close`. Losing the last interval in a crash is
harmless: devices report again at their next heartbeat. A status older (by the device's own
clock) than the one kept is ignored, so an MQTT redelivery cannot roll a device back.

Earlier versions kept one JSON file rewritten whole (``heartbeats.json``); a store finding one
beside its database takes its statuses over and removes it, and :func:`read_fleet` reads both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from edgeloop.domain import DeviceStatus
from server.ingest.base import MAX_DEVICE_ID_CHARS, clip

logger = logging.getLogger(__name__)

#: The database's name under the server's data directory.
FILE_NAME = "heartbeats.sqlite3"
#: Ingest worker i (``workers`` > 1) keeps its own database, ``heartbeats-w<i>.sqlite3``.
_WORKER_FILE_PREFIX = "heartbeats-w"
#: The file earlier versions wrote (``heartbeats.json``, ``heartbeats-w<i>.json``).
_LEGACY_SUFFIX = ".json"
#: Bumped when the layout changes incompatibly (SQLite ``user_version``).
FORMAT_VERSION = 2
_FIELDS = {f.name for f in dataclasses.fields(DeviceStatus)}

#: Largest serialized ``DeviceStatus`` accepted (bytes).
MAX_HEARTBEAT_BYTES = 64 * 1024
#: Longest model version, agent version, channel or counter name.
MAX_NAME_CHARS = 128
#: Most counters in one heartbeat.
MAX_COUNTERS = 64
#: ``last_error`` is cut to this many characters.
MAX_ERROR_CHARS = 2048


class HeartbeatRejected(ValueError):
    """A heartbeat over a limit; the message names the field and the limit."""


def check_heartbeat_size(size: int) -> None:
    """Refuse a serialized heartbeat larger than :data:`MAX_HEARTBEAT_BYTES` before parsing it.

    Raises:
        HeartbeatRejected: it is too large.
    """
    if size > MAX_HEARTBEAT_BYTES:
        raise HeartbeatRejected(f"heartbeat is {size:,} bytes, above the limit of {MAX_HEARTBEAT_BYTES:,}")


def bound_status(status: DeviceStatus) -> DeviceStatus:
    """``status`` within the limits: ``last_error`` cut to :data:`MAX_ERROR_CHARS`, the rest checked.

    Raises:
        HeartbeatRejected: a name or the counters are over their limit.
    """
    names = {
        "device_id": (status.device_id, MAX_DEVICE_ID_CHARS),
        "model_version": (status.model_version, MAX_NAME_CHARS),
        "agent_version": (status.agent_version, MAX_NAME_CHARS),
        "channel": (status.channel, MAX_NAME_CHARS),
    }
    for field, (value, limit) in names.items():
        if len(value) > limit:
            raise HeartbeatRejected(f"{field} is {len(value):,} characters, above the limit of {limit}: {clip(value)}")
    if len(status.counters) > MAX_COUNTERS:
        raise HeartbeatRejected(f"counters holds {len(status.counters):,} entries, above the limit of {MAX_COUNTERS}")
    for name in status.counters:
        if len(name) > MAX_NAME_CHARS:
            raise HeartbeatRejected(
                f"counter name is {len(name):,} characters, above the limit of {MAX_NAME_CHARS}: {clip(name)}"
            )
    if len(status.last_error) > MAX_ERROR_CHARS:
        cut = f"... ({len(status.last_error):,} characters, cut by the server)"
        return dataclasses.replace(status, last_error=status.last_error[: MAX_ERROR_CHARS - len(cut)] + cut)
    return status


class HeartbeatStore:
    """Last ``DeviceStatus`` per device, in memory and in an SQLite database; thread-safe.

    Args:
        path: The database file; ``None`` keeps heartbeats in memory only (tests, throwaway
            servers). An existing database is loaded; an unreadable one is logged, set aside
            (``<name>.unreadable``) and started anew. A legacy JSON file of the same name is
            taken over.
        flush_interval_s: Shortest time between two writes.
    """

    def __init__(self, path: Path | None, *, flush_interval_s: float = 1.0) -> None:
        self.path = Path(path) if path is not None else None
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._latest: dict[str, DeviceStatus] = {}
        self._received_at: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._last_write = 0.0
        self._timer: threading.Timer | None = None
        self._closed = False
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self._db = self._open(self.path)
            self._take_over_legacy(self.path.with_suffix(_LEGACY_SUFFIX))

    @classmethod
    def in_dir(cls, data_dir: Path, *, worker: int = 0, **kwargs: Any) -> HeartbeatStore:
        """The store kept in ``data_dir/heartbeats.sqlite3``, or ``heartbeats-w<worker>.sqlite3`` for
        an ingest worker other than the main process (each keeps the devices that report to it)."""
        name = FILE_NAME if worker == 0 else f"{_WORKER_FILE_PREFIX}{worker}.sqlite3"
        return cls(Path(data_dir) / name, **kwargs)

    def record(self, status: DeviceStatus, received_at: float | None = None) -> bool:
        """Keep ``status`` as its device's latest; returns False (and keeps the old one) when the kept
        status is newer by the device's clock."""
        now = time.time() if received_at is None else received_at
        with self._lock:
            kept = self._latest.get(status.device_id)
            if kept is not None and kept.time > status.time:
                return False
            self._latest[status.device_id] = status
            self._received_at[status.device_id] = now
            self._dirty.add(status.device_id)
            self._schedule_flush_locked()
        return True

    def latest(self, device_id: str) -> DeviceStatus | None:
        """The device's last reported status, or None if it never reported."""
        with self._lock:
            return self._latest.get(device_id)

    def last_seen(self, device_id: str) -> float | None:
        """When (server clock, seconds since the epoch) the device's latest status arrived."""
        with self._lock:
            return self._received_at.get(device_id)

    def all(self) -> dict[str, DeviceStatus]:
        """Every device's latest status, by device id (a copy)."""
        with self._lock:
            return dict(self._latest)

    def flush(self) -> None:
        """Write the devices that reported since the last write now."""
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        """Write pending changes, stop the background timer and close the database."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._flush_locked()
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- internals ----------------------------------------------------------------------------

    def _schedule_flush_locked(self) -> None:
        if self._db is None or self._closed:
            return
        wait = self._last_write + self.flush_interval_s - time.monotonic()
        if wait <= 0:
            self._flush_locked()
        elif self._timer is None:
            # One timer covers every status recorded until it fires.
            self._timer = threading.Timer(wait, self._timer_flush)
            self._timer.daemon = True
            self._timer.start()

    def _timer_flush(self) -> None:
        with self._lock:
            self._timer = None
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._db is None or not self._dirty:
            return
        rows = [
            (d, json.dumps(dataclasses.asdict(self._latest[d]), sort_keys=True), self._received_at[d])
            for d in sorted(self._dirty)
        ]
        try:
            with self._db:  # one transaction
                self._db.executemany(
                    "INSERT INTO heartbeats (device_id, status, received_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(device_id) DO UPDATE SET status = excluded.status, received_at = excluded.received_at",
                    rows,
                )
        except sqlite3.Error:
            # Heartbeats keep arriving; the next write may succeed (disk full, permissions fixed).
            logger.exception("cannot write heartbeats to %s; they stay in memory", self.path)
            return
        self._dirty.clear()
        self._last_write = time.monotonic()

    def _open(self, path: Path) -> sqlite3.Connection | None:
        db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = _connect(path)
            for device_id, status, received_at in db.execute("SELECT device_id, status, received_at FROM heartbeats"):
                self._latest[device_id] = _status_from_json(status)
                self._received_at[device_id] = float(received_at)
            return db
        except (OSError, sqlite3.Error, ValueError, TypeError) as err:
            if db is not None:
                db.close()
            aside = path.with_name(path.name + ".unreadable")
            logger.warning("ignoring unreadable heartbeat file %s (%s); set aside as %s", path, err, aside.name)
            self._latest.clear()
            self._received_at.clear()
        try:
            path.replace(aside)
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            return _connect(path)
        except (OSError, sqlite3.Error):
            logger.exception("cannot open a heartbeat database at %s; heartbeats stay in memory", path)
            return None

    def _take_over_legacy(self, legacy: Path) -> None:
        """Load an earlier version's JSON file into the database, then remove it."""
        if self._db is None or not legacy.is_file():
            return
        for status, received_at in _read_legacy(legacy).values():
            self.record(status, received_at=received_at)
        self.flush()
        if not self._dirty:
            legacy.unlink(missing_ok=True)
            logger.info("heartbeats of %s moved into %s", legacy.name, self.path)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
    try:
        # WAL: a write appends the changed pages; readers (edgeloop server fleet) never block it.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last writes, never the file
        db.execute(
            "CREATE TABLE IF NOT EXISTS heartbeats "
            "(device_id TEXT PRIMARY KEY, status TEXT NOT NULL, received_at REAL NOT NULL)"
        )
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        elif version != FORMAT_VERSION:
            raise sqlite3.DatabaseError(f"format version {version}, expected {FORMAT_VERSION}")
    except BaseException:
        db.close()
        raise
    return db


def _status_from_json(text: str) -> DeviceStatus:
    fields = {k: v for k, v in json.loads(text).items() if k in _FIELDS}
    return DeviceStatus(**fields)


def _read_legacy(path: Path) -> dict[str, tuple[DeviceStatus, float]]:
    """Statuses of an earlier version's ``heartbeats*.json``; an unreadable file is logged and skipped."""
    try:
        doc = json.loads(path.read_text())
        out = {}
        for device_id, entry in doc["devices"].items():
            fields = {k: v for k, v in entry["status"].items() if k in _FIELDS}
            out[device_id] = (DeviceStatus(**fields), float(entry.get("received_at", 0.0)))
        return out
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        logger.warning("ignoring unreadable heartbeat file %s (%s)", path, err)
        return {}


def _read_database(path: Path) -> dict[str, tuple[DeviceStatus, float]]:
    """Statuses in a heartbeat database, read without changing it; an unreadable one is logged and skipped."""
    try:
        db = sqlite3.connect(path, timeout=10.0)
        try:
            rows = db.execute("SELECT device_id, status, received_at FROM heartbeats").fetchall()
        finally:
            db.close()
        return {device_id: (_status_from_json(status), float(received)) for device_id, status, received in rows}
    except (sqlite3.Error, ValueError, TypeError) as err:
        logger.warning("ignoring unreadable heartbeat file %s (%s)", path, err)
        return {}


@dataclasses.dataclass(frozen=True, slots=True)
class FleetEntry:
    """A device's latest heartbeat as the server last wrote it down."""

    status: DeviceStatus
    received_at: float  # server clock, seconds since the epoch


def read_fleet(data_dir: Path) -> dict[str, FleetEntry]:
    """Every device's latest heartbeat from the server's files, by device id.

    With several ingest processes a device's heartbeats land in whichever process the broker or
    the kernel picked, so each file may hold an older status of it: the newest by the device's
    clock wins (then the later arrival). Reads only; safe while the server runs (SQLite readers
    see the last committed write). Legacy JSON files are read too; an unreadable file is logged
    and skipped.
    """
    data_dir = Path(data_dir)
    reports: list[tuple[float, DeviceStatus]] = []
    for stem in (FILE_NAME.removesuffix(".sqlite3"), f"{_WORKER_FILE_PREFIX}*"):
        for path in sorted(data_dir.glob(f"{stem}.sqlite3")):
            reports += [(received, status) for status, received in _read_database(path).values()]
        for path in sorted(data_dir.glob(f"{stem}{_LEGACY_SUFFIX}")):
            reports += [(received, status) for status, received in _read_legacy(path).values()]
    # record() keeps the newest by the device's clock; in arrival order, the later of two equal ones.
    merged = HeartbeatStore(None)
    for received_at, status in sorted(reports, key=lambda r: r[0]):
        merged.record(status, received_at=received_at)
    return {d: FleetEntry(status, merged.last_seen(d) or 0.0) for d, status in merged.all().items()}
