"""The latest heartbeat of every device: what it runs and how it is doing, as it last reported.

Both transports hand heartbeats (``DeviceStatus``) here. The store keeps the newest status per
device in memory and mirrors it to one JSON file under the server's data directory, written to
a temporary file, fsync'd and renamed over the old one, so a crash leaves either the previous or
the new file, never a torn one.

Limits: the file is rewritten whole, at most once per ``flush_interval_s`` (a fleet heartbeating
every minute must not turn into a disk write per message); a status newer than the last write
reaches the disk within that interval, or at :meth:`HeartbeatStore.close`. Losing the last
interval in a crash is harmless: devices report again at their next heartbeat. A status older
(by the device's own clock) than the one kept is ignored, so an MQTT redelivery cannot roll a
device back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from edgeloop.domain import DeviceStatus
from edgeloop.durable import write_atomic

logger = logging.getLogger(__name__)

#: The file's name under the server's data directory.
FILE_NAME = "heartbeats.json"
#: Ingest worker i (``workers`` > 1) keeps its own file, ``heartbeats-w<i>.json``.
_WORKER_FILE_PREFIX = "heartbeats-w"
#: Bumped when the file's layout changes incompatibly.
FORMAT_VERSION = 1
_FIELDS = {f.name for f in dataclasses.fields(DeviceStatus)}


class HeartbeatStore:
    """Last ``DeviceStatus`` per device, in memory and in a JSON file; thread-safe.

    Args:
        path: The JSON file; ``None`` keeps heartbeats in memory only (tests, throwaway servers).
            An existing file is loaded; an unreadable one is logged and replaced at the next write.
        flush_interval_s: Shortest time between two writes of the file.
    """

    def __init__(self, path: Path | None, *, flush_interval_s: float = 1.0) -> None:
        self.path = Path(path) if path is not None else None
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._latest: dict[str, DeviceStatus] = {}
        self._received_at: dict[str, float] = {}
        self._dirty = False
        self._last_write = 0.0
        self._timer: threading.Timer | None = None
        self._closed = False
        if self.path is not None:
            self._load(self.path)

    @classmethod
    def in_dir(cls, data_dir: Path, *, worker: int = 0, **kwargs: Any) -> HeartbeatStore:
        """The store kept in ``data_dir/heartbeats.json``, or ``heartbeats-w<worker>.json`` for an
        ingest worker other than the main process (each keeps the devices that report to it)."""
        name = FILE_NAME if worker == 0 else f"{_WORKER_FILE_PREFIX}{worker}.json"
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
            self._dirty = True
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
        """Write the file now if anything changed since the last write."""
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        """Write pending changes and stop the background timer."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._flush_locked()

    # -- internals ----------------------------------------------------------------------------

    def _schedule_flush_locked(self) -> None:
        if self.path is None or self._closed:
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
        if self.path is None or not self._dirty:
            return
        doc = {
            "version": FORMAT_VERSION,
            "devices": {
                device_id: {"status": dataclasses.asdict(status), "received_at": self._received_at[device_id]}
                for device_id, status in sorted(self._latest.items())
            },
        }
        try:
            write_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())
        except OSError:
            # Heartbeats keep arriving; the next write may succeed (disk full, permissions fixed).
            logger.exception("cannot write heartbeats to %s; they stay in memory", self.path)
            return
        self._dirty = False
        self._last_write = time.monotonic()

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            for device_id, entry in doc["devices"].items():
                fields = {k: v for k, v in entry["status"].items() if k in _FIELDS}
                self._latest[device_id] = DeviceStatus(**fields)
                self._received_at[device_id] = float(entry.get("received_at", 0.0))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            logger.warning(
                "ignoring unreadable heartbeat file %s (%s); it is rewritten at the next heartbeat", path, err
            )
            self._latest.clear()
            self._received_at.clear()


@dataclasses.dataclass(frozen=True, slots=True)
class FleetEntry:
    """A device's latest heartbeat as the server last wrote it down."""

    status: DeviceStatus
    received_at: float  # server clock, seconds since the epoch


def read_fleet(data_dir: Path) -> dict[str, FleetEntry]:
    """Every device's latest heartbeat from the server's files, by device id.

    With several ingest processes a device's heartbeats land in whichever process the broker or
    the kernel picked, so each file may hold an older status of it: the newest by the device's
    clock wins (then the later arrival). Reads only; safe while the server runs (files are
    replaced atomically). An unreadable file is logged and skipped.
    """
    data_dir = Path(data_dir)
    paths = [data_dir / FILE_NAME, *sorted(data_dir.glob(f"{_WORKER_FILE_PREFIX}*.json"))]
    reports: list[tuple[float, DeviceStatus]] = []
    for path in paths:
        if path.is_file():
            store = HeartbeatStore(path)
            reports += [(store.last_seen(d) or 0.0, status) for d, status in store.all().items()]
    # record() keeps the newest by the device's clock; in arrival order, the later of two equal ones.
    merged = HeartbeatStore(None)
    for received_at, status in sorted(reports, key=lambda r: r[0]):
        merged.record(status, received_at=received_at)
    return {d: FleetEntry(status, merged.last_seen(d) or 0.0) for d, status in merged.all().items()}
