"""The model registry's durable state: versions, their signed artifacts, channels, groups and pins.

Layout under ``RegistryConfig.root``::

    registry.json              every version's facts, channel targets with history, pins, group assignments
    registry.lock              fcntl lock: one writer at a time across processes (CLI and server)
    release_key.pem            Ed25519 release key (0600), created on first publish; release_key.pub.pem beside it
    artifacts/<version>/model.onnx   read-only copies of the published ONNX files
    artifacts/<version>/checkpoint.pt  the training checkpoint it was exported from, when published with one:
                                       the next training fine-tunes it; never served to devices

A version carries its lineage: the parent version it was trained from, the dataset version, the
training parameters, its metrics and the id of the flow run that made it. A candidate the
promotion gate turned down is registered too, marked **rejected** with the reason: it stays for
inspection (``edgeloop models show``) but can never be released, pinned or downloaded by a device.

Targeting: a device resolves its release in this order: a **pin** (device -> version) beats a
**group release** (the channel's release for the group the device is assigned to) beats the
**channel release**. Every promotion keeps the replaced version in the target's history, and a
rollback pops it back (at most :data:`MAX_HISTORY` entries per target).

Concurrency and durability: every change takes the file lock, re-reads ``registry.json`` from disk,
applies the change and writes the whole file to a temporary file, fsyncs it and ``os.replace``-s it
over the old one; a crash leaves the old or the new file, never a torn one (a stale temporary file
is ignored and removed by the next writer). Readers need no lock: they re-read the file whenever its
inode, size or mtime changed (or it changed very recently), so a running server sees what the CLI
did a moment ago.

Artifacts are copied, hashed and checked in one pass into ``artifacts/.incoming/`` and renamed into
place only once the copy is fsync-ed: what is signed is exactly what is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.detectors.yolo import parse_ultralytics_metadata, read_onnx_metadata
from edgeloop.config_base import StrictModel
from edgeloop.convert import release_to_pb
from edgeloop.domain import Release
from edgeloop.durable import LockTimeout, file_lock, fsync_dir, write_atomic
from edgeloop.releases import (
    HASH_CHUNK_BYTES,
    ReleaseVerificationError,
    generate_signing_key,
    key_fingerprint,
    load_private_key,
    public_key_pem,
    sign_release,
    verify_artifact,
    verify_release,
)
from edgeloop.v1 import models_pb2

logger = logging.getLogger(__name__)

STATE_FILE = "registry.json"
LOCK_FILE = "registry.lock"
ARTIFACTS_DIR = "artifacts"
ARTIFACT_NAME = "model.onnx"
CHECKPOINT_NAME = "checkpoint.pt"
#: Bumped when registry.json changes shape; a reader refuses a format it does not know.
STATE_FORMAT = 1
#: Earlier releases remembered per target for rollback; older ones fall off (and may then be pruned).
MAX_HISTORY = 20
#: A registry.json modified less than this long ago is re-read even if its stat looks unchanged.
RACY_WINDOW_S = 2.0
#: How long a change waits for another process's lock before giving up with a clear error.
LOCK_TIMEOUT_S = 30.0
#: Versions, channels, groups and device ids: safe as directory names and as MQTT topic levels
#: (no ``/``, ``+``, ``#``); the same rule as the agent's ``device_id``.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
_AUTO_VERSION = re.compile(r"^v(\d+)$")


class RegistryError(Exception):
    """A registry operation cannot be done; the message says why in terms a user can act on."""


class UnknownVersionError(RegistryError):
    """No such version, or its artifact was pruned."""


class UnknownChannelError(RegistryError):
    """The channel is not one of the configured channels."""


class InvalidArtifactError(RegistryError):
    """The file offered for publishing is not an ultralytics YOLO detect export in ONNX."""


class NoRollbackError(RegistryError):
    """The target has no earlier release to return to."""


class RegistryLockedError(RegistryError):
    """Another process held the registry's lock for longer than the wait allows (worth retrying)."""


class RegistryStateError(RegistryError):
    """registry.json is unreadable or of an unknown format (it was edited by hand, or by a newer edgeloop)."""


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid version/channel/group/device name, else raise :class:`RegistryError`."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise RegistryError(
            f"invalid {kind} {value!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


class RegistryConfig(StrictModel):
    """Where the registry keeps its state and artifacts, and which channels it serves."""

    root: Path = Field(
        default=Path(".edgeloop/server/registry"),
        description="Directory of registry.json, the artifacts and (by default) the release key.",
    )
    signing_key: Path | None = Field(
        default=None,
        description="Ed25519 release key (PEM). Default: <root>/release_key.pem, created on first publish.",
    )
    channels: list[str] = Field(
        default_factory=lambda: ["stable", "canary"],
        min_length=1,
        description="Release channels devices can follow; the first is used when a query names none.",
    )
    keep_versions: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Keep the artifacts of this many newest versions (plus any version a channel, a rollback history "
            "or a pin refers to) and prune older ones; their facts stay for lineage. None keeps everything."
        ),
    )

    @field_validator("channels")
    @classmethod
    def _valid_channels(cls, value: list[str]) -> list[str]:
        for channel in value:
            try:
                check_name("channel", channel)
            except RegistryError as err:  # pydantic reports ValueErrors as validation errors
                raise ValueError(str(err)) from None
        if len(set(value)) != len(value):
            raise ValueError(f"channels must be unique: {value}")
        return value

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key if self.signing_key is not None else self.root / "release_key.pem"


# -- registry.json --------------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelVersion(_Record):
    """One published model: its facts, lineage and signature. Immutable once published."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    created: int = Field(description="Publish time, whole seconds since the epoch (exact through a Timestamp).")
    artifact_sha256: str
    artifact_size: int
    class_names: list[str]
    imgsz: int = Field(description="Model input size; the long side for a rectangular export.")
    parent_version: str = ""
    dataset_version: str = ""
    params: dict[str, Any] = Field(default_factory=dict, description="Training parameters (epochs, lr0, ...).")
    metrics: dict[str, float] = Field(default_factory=dict)
    notes: str = ""
    source: str = Field(default="", description="File name the artifact was published from.")
    signature: str = Field(default="", description="Ed25519 signature over the release digest, hex.")
    key_id: str = Field(default="", description="Fingerprint of the key that signed it.")
    pruned: bool = Field(default=False, description="The artifact was deleted by keep_versions; the facts stay.")
    checkpoint_sha256: str = Field(default="", description="sha256 of the training checkpoint kept beside the ONNX.")
    checkpoint_size: int = Field(default=0, description="Size of that checkpoint in bytes (0: none kept).")
    flow_run_id: str = Field(default="", description="The orchestrator run that trained and registered it.")
    rejected: str = Field(
        default="", description="Why the promotion gate (or a failed canary) turned it down; empty: not rejected."
    )

    @property
    def status(self) -> str:
        """``pruned``, ``rejected`` or ``ok``."""
        return "pruned" if self.pruned else "rejected" if self.rejected else "ok"

    def to_release(self, channel: str = "") -> Release:
        return Release(
            version=self.version,
            channel=channel,
            created=float(self.created),
            artifact_size=self.artifact_size,
            artifact_sha256=self.artifact_sha256,
            signature=bytes.fromhex(self.signature),
            class_names=list(self.class_names),
            imgsz=self.imgsz,
            parent_version=self.parent_version,
            dataset_version=self.dataset_version,
            metrics=dict(self.metrics),
        )


class HistoryEntry(_Record):
    version: str
    since: float


class Target(_Record):
    """What one channel (or one group on a channel) currently serves, and what it served before."""

    current: str | None = None
    since: float = 0.0
    history: list[HistoryEntry] = Field(default_factory=list, description="Oldest first; rollback pops the last.")


class ChannelState(_Record):
    release: Target = Field(default_factory=Target)
    groups: dict[str, Target] = Field(default_factory=dict)


class Pin(_Record):
    version: str
    since: float


class RegistryState(_Record):
    """The whole of registry.json."""

    format: int = STATE_FORMAT
    serial: int = Field(default=0, description="Incremented by every change; see ModelRegistry.revision().")
    version_counter: int = Field(default=0, description="Highest automatic version number handed out (v1, v2, ...).")
    versions: dict[str, ModelVersion] = Field(default_factory=dict, description="In publish order.")
    channels: dict[str, ChannelState] = Field(default_factory=dict)
    pins: dict[str, Pin] = Field(default_factory=dict)
    assignments: dict[str, str] = Field(default_factory=dict, description="device id -> group")
    unpinned: list[str] = Field(
        default_factory=list,
        description="Devices whose pin was removed: the announcer clears their retained message, even after a restart.",
    )

    def target(self, channel: str, group: str | None, *, create: bool = False) -> Target | None:
        state = self.channels.get(channel)
        if state is None:
            if not create:
                return None
            state = self.channels[channel] = ChannelState()
        if group is None:
            return state.release
        target = state.groups.get(group)
        if target is None and create:
            target = state.groups[group] = Target()
        return target

    def referenced(self) -> set[str]:
        """Versions something points at: a current release, a rollback history entry or a pin."""
        refs = {pin.version for pin in self.pins.values()}
        for channel in self.channels.values():
            for target in (channel.release, *channel.groups.values()):
                if target.current:
                    refs.add(target.current)
                refs.update(entry.version for entry in target.history)
        return refs


# -- the registry ---------------------------------------------------------------------------------


class ModelRegistry:
    """Versions, channels, groups and pins over one registry directory; safe to share between processes.

    Args:
        config: Where the state lives and which channels exist.
        clock: Seconds since the epoch (tests pass a fake one).
    """

    def __init__(self, config: RegistryConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.root = Path(config.root)
        self._clock = clock
        self._lock = threading.RLock()  # the file lock is per open file: threads of one process queue here
        self._state = RegistryState()
        self._state_bytes: bytes | None = None  # the bytes self._state was parsed from
        self._state_stamp: tuple[int, int, int] | None = None
        self._private_key: Ed25519PrivateKey | None = None

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def channels(self) -> list[str]:
        return list(self.config.channels)

    # -- reading ---------------------------------------------------------------------------------

    def revision(self) -> int:
        """A number that grows with every change to the registry (0 before the first one).

        A server compares it with the revision it last announced to notice changes made by the CLI.
        """
        return self.state().serial

    def state(self) -> RegistryState:
        """The current state, re-read if registry.json changed since last time. Treat it as read-only.

        A change is noticed by the file's inode, size and mtime; a file modified within
        :data:`RACY_WINDOW_S` is read again regardless, since two writes within one tick of the
        file system's clock may leave all three equal (git's "racy clean" problem).
        """
        with self._lock:
            stamp = self._stamp()
            racy = stamp is not None and time.time() - stamp[2] / 1e9 < RACY_WINDOW_S
            if stamp != self._state_stamp or racy:
                data = self._read_bytes()
                if data != self._state_bytes:
                    self._state = self._parse(data)
                    self._state_bytes = data
                self._state_stamp = stamp
            return self._state

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.state_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self, version: str) -> ModelVersion:
        record = self.state().versions.get(version)
        if record is None:
            raise UnknownVersionError(f"unknown version {version!r}")
        return record

    def list(self) -> list[ModelVersion]:
        """Every version, in publish order (pruned ones included, marked)."""
        return list(self.state().versions.values())

    def artifact_path(self, version: str) -> Path:
        """The stored ONNX of ``version``.

        Raises:
            UnknownVersionError: no such version, or its artifact was pruned.
        """
        return self._stored(version, ARTIFACT_NAME, "artifact")

    def checkpoint_path(self, version: str) -> Path:
        """The training checkpoint stored with ``version`` (for fine-tuning; never sent to devices).

        Raises:
            UnknownVersionError: no such version, it was published without a checkpoint, or it was pruned.
        """
        if not self.get(version).checkpoint_size:
            raise UnknownVersionError(f"version {version} was published without a training checkpoint")
        return self._stored(version, CHECKPOINT_NAME, "checkpoint")

    def _stored(self, version: str, name: str, what: str) -> Path:
        if self.get(version).pruned:
            raise UnknownVersionError(f"version {version}'s {what} was pruned (keep_versions)")
        path = self.root / ARTIFACTS_DIR / version / name
        if not path.is_file():
            raise UnknownVersionError(f"version {version}'s {what} is missing from {path}")
        return path

    def release(self, version: str, channel: str = "") -> models_pb2.ModelRelease:
        """The signed release of ``version`` as it goes on the wire, with ``channel`` filled in."""
        return release_to_pb(self.get(version).to_release(channel))

    def current(self, channel: str, group: str | None = None) -> str | None:
        """The version a channel (or a group on it) serves now, or None."""
        self._check_channel(channel)
        target = self.state().target(channel, group)
        return target.current if target is not None else None

    def resolve(self, device_id: str, channel: str = "", group: str | None = None) -> models_pb2.ModelRelease | None:
        """The release ``device_id`` should run on ``channel``: pin > group release > channel release.

        ``group`` defaults to the device's assigned group. ``channel`` defaults to the first configured
        one. A pinned release comes back with an empty ``channel`` (it is the device's, not a channel's).

        Raises:
            UnknownChannelError: ``channel`` is not configured.
        """
        channel = channel or self.config.channels[0]
        self._check_channel(channel)
        state = self.state()
        pin = state.pins.get(device_id)
        if pin is not None:
            return self.release(pin.version)
        group = group or state.assignments.get(device_id)
        if group is not None:
            target = state.target(channel, group)
            if target is not None and target.current:
                return self.release(target.current, channel)
        target = state.target(channel, None)
        if target is not None and target.current:
            return self.release(target.current, channel)
        return None

    def channel_releases(self) -> dict[str, models_pb2.ModelRelease]:
        """Each configured channel's own current release (channels with none are left out)."""
        out: dict[str, models_pb2.ModelRelease] = {}
        state = self.state()
        for channel in self.config.channels:
            target = state.target(channel, None)
            if target is not None and target.current:
                out[channel] = self.release(target.current, channel)
        return out

    def group_releases(self) -> dict[tuple[str, str], models_pb2.ModelRelease]:
        """``(group, channel) -> release`` for every group-targeted release on a configured channel."""
        out: dict[tuple[str, str], models_pb2.ModelRelease] = {}
        state = self.state()
        for channel in self.config.channels:
            channel_state = state.channels.get(channel)
            for group, target in (channel_state.groups if channel_state else {}).items():
                if target.current:
                    out[(group, channel)] = self.release(target.current, channel)
        return out

    def pinned_releases(self) -> dict[str, models_pb2.ModelRelease]:
        """``device id -> release`` for every pinned device."""
        return {device: self.release(pin.version) for device, pin in self.state().pins.items()}

    def unpinned_devices(self) -> list[str]:
        """Devices whose pin was removed (and not set again): their retained device message must be cleared."""
        return list(self.state().unpinned)

    def assignments(self) -> dict[str, str]:
        return dict(self.state().assignments)

    # -- keys ------------------------------------------------------------------------------------

    def signing_key(self, *, create: bool = True) -> Ed25519PrivateKey:
        """The release key; with ``create`` it is made (public half beside it) if it does not exist yet.

        Raises:
            ReleaseKeyError: the key file is unreadable or not Ed25519, or missing and ``create`` is false.
        """
        with self._lock:
            if self._private_key is not None:
                return self._private_key
            path = self.config.signing_key_path
            if not path.exists() and create:
                try:
                    key = generate_signing_key(path)
                except FileExistsError:  # another process created it a moment ago
                    key = load_private_key(path)
                else:
                    pub = path.with_name(path.stem + ".pub.pem")
                    write_atomic(pub, public_key_pem(key), mode=0o644)
                    logger.warning(
                        "created a new release key %s (%s); devices must trust its public key %s",
                        path,
                        key_fingerprint(key),
                        pub,
                    )
            else:
                key = load_private_key(path)
            self._private_key = key
            return key

    def public_key(self) -> Ed25519PublicKey:
        """The release key's public half (never creates a key)."""
        return self.signing_key(create=False).public_key()

    def verify(self, version: str) -> None:
        """Check a version's signature with the release key and its stored artifact's size and sha256.

        Raises:
            ReleaseVerificationError: either does not check out.
            UnknownVersionError: no such version, or its artifact was pruned.
        """
        release = self.release(version)
        verify_release(release, self.public_key())
        verify_artifact(self.artifact_path(version), release)

    # -- changes ---------------------------------------------------------------------------------

    def publish(
        self,
        onnx_path: str | os.PathLike[str],
        *,
        version: str | None = None,
        parent: str | None = None,
        dataset_version: str = "",
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        notes: str = "",
        checkpoint: str | os.PathLike[str] | None = None,
        flow_run_id: str = "",
        rejected: str = "",
    ) -> ModelVersion:
        """Copy an ultralytics YOLO detect ONNX into the registry, sign it and record it as a new version.

        Args:
            onnx_path: The export to publish; it is copied, never moved or modified.
            version: Its name; default the next ``v<N>``.
            parent: The version it was trained from (must exist).
            dataset_version: The dataset version it was trained on.
            params: Training parameters (JSON values).
            metrics: Evaluation metrics (finite numbers).
            notes: Free text.
            checkpoint: The training checkpoint (.pt) the ONNX was exported from; kept beside it for
                the next fine-tuning, never served to devices.
            flow_run_id: The orchestrator run that made it.
            rejected: Register it as rejected, with this reason: recorded, never releasable.

        Raises:
            InvalidArtifactError: not a file, not ONNX, or not a YOLO detect export (or the checkpoint is not a file).
            RegistryError: the version exists, the parent does not, or a value is invalid.
        """
        src = Path(onnx_path)
        if version is not None:
            check_name("version", version)
        if parent:
            check_name("parent version", parent)
        params = dict(params or {})
        try:
            json.dumps(params, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise RegistryError(f"training parameters must be JSON values: {err}") from err
        clean_metrics: dict[str, float] = {}
        for name, value in (metrics or {}).items():
            try:
                number = float(value)
            except (TypeError, ValueError) as err:
                raise RegistryError(f"metric {name!r} must be a number, not {value!r}") from err
            if not math.isfinite(number):
                raise RegistryError(f"metric {name!r} must be finite, not {value!r}")
            clean_metrics[str(name)] = number
        if not src.is_file():
            raise InvalidArtifactError(f"{src} is not a file")
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise InvalidArtifactError(f"checkpoint {checkpoint} is not a file")

        incoming = self.root / ARTIFACTS_DIR / ".incoming" / uuid.uuid4().hex
        incoming.mkdir(parents=True)
        try:
            sha, size = _copy_durably(src, incoming / ARTIFACT_NAME)
            # Read the metadata from the copy: what is checked and signed is what is stored.
            class_names, imgsz = _detect_metadata(incoming / ARTIFACT_NAME, shown=src)
            ckpt_sha, ckpt_size = "", 0
            if checkpoint is not None:
                ckpt_sha, ckpt_size = _copy_durably(Path(checkpoint), incoming / CHECKPOINT_NAME)
            key = self.signing_key()
            with self._change() as state:
                if parent and parent not in state.versions:
                    raise UnknownVersionError(f"unknown parent version {parent!r}")
                if version is None:
                    version = _next_version(state)
                elif version in state.versions:
                    raise RegistryError(f"version {version} already exists; publish under another name")
                final = self.root / ARTIFACTS_DIR / version
                if final.exists():  # left by a publish that crashed before recording it
                    logger.warning("removing orphaned artifact directory %s", final)
                    shutil.rmtree(final)
                os.rename(incoming, final)
                fsync_dir(final.parent)
                record = ModelVersion(
                    version=version,
                    created=int(self._clock()),
                    artifact_sha256=sha,
                    artifact_size=size,
                    class_names=class_names,
                    imgsz=imgsz,
                    parent_version=parent or "",
                    dataset_version=dataset_version,
                    params=params,
                    metrics=clean_metrics,
                    notes=notes,
                    source=src.name,
                    key_id=key_fingerprint(key),
                    checkpoint_sha256=ckpt_sha,
                    checkpoint_size=ckpt_size,
                    flow_run_id=flow_run_id,
                    rejected=rejected,
                )
                signature = sign_release(release_to_pb(record.to_release()), key)
                record = record.model_copy(update={"signature": signature.hex()})
                state.versions[version] = record
                pruned = self._prune(state)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        for name in pruned:
            shutil.rmtree(self.root / ARTIFACTS_DIR / name, ignore_errors=True)
            logger.info("pruned the artifact of %s (keep_versions=%s)", name, self.config.keep_versions)
        logger.info(
            "published %s (sha256 %s, %d bytes, %d classes%s)",
            version,
            sha,
            size,
            len(class_names),
            f"; rejected: {rejected}" if rejected else "",
        )
        return record

    def reject(self, version: str, reason: str) -> ModelVersion:
        """Mark a published version as rejected (e.g. its canary failed); it can no longer be released.

        Raises:
            RegistryError: it is still served by a channel, a group or a pin (roll that back first),
                or ``reason`` is empty.
            UnknownVersionError: no such version.
        """
        if not reason.strip():
            raise RegistryError("a rejection needs a reason")
        with self._change() as state:
            record = state.versions.get(version)
            if record is None:
                raise UnknownVersionError(f"unknown version {version!r}")
            serving = [pin for pin, p in state.pins.items() if p.version == version]
            for name, channel in state.channels.items():
                for group, target in [(None, channel.release), *channel.groups.items()]:
                    if target.current == version:
                        serving.append(_where(name, group))
            if serving:
                raise RegistryError(f"version {version} is still served ({', '.join(serving)}): roll it back first")
            record = record.model_copy(update={"rejected": reason})
            state.versions[version] = record
        logger.warning("rejected %s: %s", version, reason)
        return record

    def promote(self, version: str, channel: str, group: str | None = None) -> str | None:
        """Make ``version`` the current release of ``channel`` (or of ``group`` on it); return the one it replaced.

        The replaced version goes into the target's history, for :meth:`rollback`.
        """
        self._check_channel(channel)
        if group is not None:
            check_name("group", group)
        with self._change() as state:
            self._check_live(state, version)
            target = state.target(channel, group, create=True)
            assert target is not None
            previous = target.current
            if previous == version:
                return previous
            if previous:
                target.history.append(HistoryEntry(version=previous, since=target.since))
                del target.history[:-MAX_HISTORY]
            target.current, target.since = version, self._clock()
        logger.info("promoted %s to %s (was %s)", version, _where(channel, group), previous or "nothing")
        return previous

    def rollback(self, channel: str, group: str | None = None) -> str:
        """Return ``channel`` (or ``group`` on it) to the release it served before; return that version.

        The rolled-back version is dropped, not pushed to the history, so rolling back twice goes
        two steps back.

        Raises:
            NoRollbackError: there is no earlier release.
        """
        self._check_channel(channel)
        with self._change() as state:
            target = state.target(channel, group)
            if target is None or not target.history:
                current = target.current if target is not None else None
                raise NoRollbackError(
                    f"{_where(channel, group)} has no earlier release to roll back to (current: {current or 'none'})"
                )
            replaced = target.current
            entry = target.history.pop()
            target.current, target.since = entry.version, self._clock()
        logger.info("rolled %s back from %s to %s", _where(channel, group), replaced, entry.version)
        return entry.version

    def pin(self, device_id: str, version: str) -> str | None:
        """Pin a device to ``version`` whatever its channel says; return its previous pin."""
        check_name("device id", device_id)
        with self._change() as state:
            self._check_live(state, version)
            previous = state.pins.get(device_id)
            state.pins[device_id] = Pin(version=version, since=self._clock())
            if device_id in state.unpinned:
                state.unpinned.remove(device_id)
        logger.info("pinned %s to %s", device_id, version)
        return previous.version if previous else None

    def unpin(self, device_id: str) -> str | None:
        """Remove a device's pin (it follows its channel again); return the version it was pinned to, or None."""
        check_name("device id", device_id)
        with self._change() as state:
            previous = state.pins.pop(device_id, None)
            if previous is not None and device_id not in state.unpinned:
                state.unpinned.append(device_id)
        if previous is not None:
            logger.info("unpinned %s (was %s)", device_id, previous.version)
        return previous.version if previous else None

    def assign(self, device_id: str, group: str | None) -> str | None:
        """Put a device in ``group`` (None: in none); return its previous group."""
        check_name("device id", device_id)
        if group is not None:
            check_name("group", group)
        with self._change() as state:
            previous = state.assignments.get(device_id)
            if group is None:
                state.assignments.pop(device_id, None)
            else:
                state.assignments[device_id] = group
        return previous

    # -- internals ---------------------------------------------------------------------------------

    def _check_channel(self, channel: str) -> None:
        if channel not in self.config.channels:
            raise UnknownChannelError(f"unknown channel {channel!r}; configured: {', '.join(self.config.channels)}")

    @staticmethod
    def _check_live(state: RegistryState, version: str) -> None:
        record = state.versions.get(version)
        if record is None:
            raise UnknownVersionError(f"unknown version {version!r}")
        if record.pruned:
            raise UnknownVersionError(f"version {version}'s artifact was pruned (keep_versions); publish it again")
        if record.rejected:
            raise RegistryError(f"version {version} was rejected ({record.rejected}); it cannot be released")

    def _prune(self, state: RegistryState) -> list[str]:
        keep = self.config.keep_versions
        if not keep:
            return []
        live = [v for v in state.versions.values() if not v.pruned]
        referenced = state.referenced()
        pruned = [v.version for v in live[:-keep] if v.version not in referenced]
        for name in pruned:
            state.versions[name] = state.versions[name].model_copy(update={"pruned": True})
        return pruned

    def _read_bytes(self) -> bytes | None:
        try:
            return self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise RegistryStateError(f"cannot read {self.state_path}: {err}") from err

    def _parse(self, data: bytes | None) -> RegistryState:
        if data is None:
            return RegistryState()
        try:
            raw = json.loads(data)
        except ValueError as err:
            raise RegistryStateError(f"cannot read {self.state_path}: {err}") from err
        if isinstance(raw, dict) and raw.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise RegistryStateError(
                f"{self.state_path} has format {raw.get('format')!r}; this edgeloop reads format {STATE_FORMAT}"
            )
        try:
            return RegistryState.model_validate(raw)
        except ValidationError as err:
            raise RegistryStateError(f"{self.state_path} is not a valid registry state:\n{err}") from err

    @contextmanager
    def _change(self) -> Iterator[RegistryState]:
        """Lock, re-read from disk, let the caller change the state, write it atomically.

        An exception inside the block leaves registry.json untouched.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock, _file_lock(self.root / LOCK_FILE):
            for stale in self.root.glob(f".{STATE_FILE}.*.tmp"):  # a writer died mid-write; we hold the lock
                stale.unlink(missing_ok=True)
            state = self._parse(self._read_bytes())
            yield state
            state.serial += 1
            data = state.model_dump_json(indent=2).encode("utf-8") + b"\n"
            write_atomic(self.state_path, data, mode=0o644)
            self._state, self._state_bytes = RegistryState.model_validate_json(data), data
            self._state_stamp = self._stamp()


# -- helpers ---------------------------------------------------------------------------------------


def _where(channel: str, group: str | None) -> str:
    return f"channel {channel}" if group is None else f"group {group} on channel {channel}"


def _next_version(state: RegistryState) -> str:
    numbers = [int(m.group(1)) for name in state.versions if (m := _AUTO_VERSION.match(name))]
    n = max([state.version_counter, *numbers]) + 1
    state.version_counter = n
    return f"v{n}"


def _detect_metadata(path: Path, *, shown: Path) -> tuple[list[str], int]:
    """Class names and input size of an ultralytics detect export, or InvalidArtifactError saying what is wrong."""
    try:
        meta = read_onnx_metadata(path)
    except ValueError as err:
        raise InvalidArtifactError(f"{shown} is not an ONNX model ({err})") from err
    hint = "export it with ultralytics: YOLO('best.pt').export(format='onnx')"
    if not meta:
        raise InvalidArtifactError(f"{shown} has no ONNX metadata, so it is not an ultralytics YOLO export; {hint}")
    info = parse_ultralytics_metadata(meta)
    if info.task is not None and info.task != "detect":
        raise InvalidArtifactError(f"{shown} is a YOLO {info.task!r} model; the registry takes detect models")
    if not info.names:
        raise InvalidArtifactError(f"{shown} has no class names in its metadata; {hint}")
    if info.imgsz is None:
        raise InvalidArtifactError(f"{shown} has no input size (imgsz) in its metadata; {hint}")
    return info.names, max(info.imgsz)


def _copy_durably(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to the new file ``dst`` (fsync-ed, then read-only), hashing on the way; return (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    try:
        with src.open("rb") as fin, dst.open("xb") as fout:
            while chunk := fin.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as err:
        raise InvalidArtifactError(f"cannot copy {src}: {err}") from err
    os.chmod(dst, 0o444)  # published artifacts never change; their sha256 is signed
    fsync_dir(dst.parent)
    return digest.hexdigest(), size


@contextmanager
def _file_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive fcntl lock on ``path``, shared by every process using the same registry root."""
    try:
        with file_lock(path, timeout):
            yield
    except LockTimeout as err:
        raise RegistryLockedError(
            f"registry {path.parent} is locked by another process for more than {timeout:g} s"
        ) from err


__all__ = [
    "CHECKPOINT_NAME",
    "ChannelState",
    "InvalidArtifactError",
    "ModelRegistry",
    "ModelVersion",
    "NoRollbackError",
    "RegistryConfig",
    "RegistryError",
    "RegistryLockedError",
    "RegistryState",
    "RegistryStateError",
    "ReleaseVerificationError",
    "Target",
    "UnknownChannelError",
    "UnknownVersionError",
    "check_name",
]
