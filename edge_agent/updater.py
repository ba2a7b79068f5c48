"""Model updates on the device: follow a release channel, download, verify, build, smoke-test,
swap -- and keep the running model whenever any step fails.

The steps, in order, each a reason to refuse the release (the old model keeps serving and the
reason goes into the next heartbeat's ``last_error``):

1. **Signature.** The release message (from gRPC ``GetRelease`` or a retained MQTT message) must
   carry a valid Ed25519 signature by the release key whose public half this device was given.
   Checked before a single byte of the artifact is fetched.
2. **Download.** Over gRPC ``DownloadArtifact`` into ``models_dir/<version>/model.onnx.part``;
   a broken download is no refusal: the next round resumes it from the bytes already on disk.
3. **Artifact.** Size and sha256 must match the signed release, else the file is deleted.
4. **Build.** A new detector is created from the file *beside* the running one (for TensorRT this
   is where the engine is built on the device).
5. **Smoke test.** The new detector runs on recent frames: it must not fail, must return sane
   detections, and must use the class names the release announced.
6. **Swap.** Between two frames, under the detector lock: no frame is dropped or processed twice.
   ``models_dir/current`` (a symlink, replaced atomically with ``os.replace``) then names the new
   version, so a restarted agent runs it; the previous version stays on disk for rollback.

A refused version's directory is removed (it is no rollback target and must not take the place of
one among ``keep_versions``), and the same release is not tried again; ``last_error`` keeps saying
why for as long as the channel offers it, and is cleared once the device runs what it is offered.

A rollback is just a release of an older version: it is verified and swapped the same way, from
disk when its artifact is still there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
from pydantic import Field

from edge_agent.detectors import Detector, DetectorError
from edge_agent.transports.base import TLSConfig
from edgeloop import topics
from edgeloop.config_base import StrictModel
from edgeloop.releases import ReleaseVerificationError, load_public_key, verify_artifact, verify_release
from edgeloop.tls import client_ssl_context
from edgeloop.v1 import models_pb2, models_pb2_grpc

logger = logging.getLogger(__name__)

ARTIFACT_NAME = "model.onnx"
CURRENT_LINK = "current"
#: A version names a directory under ``models_dir``: the registry's rule for names (server/registry/store.py
#: ``NAME_PATTERN``), checked before anything is fetched or created, whatever the release's signature says.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class UpdateError(Exception):
    """A release was refused; the message says at which step and why."""


class TransientUpdateError(UpdateError):
    """A step failed for a reason that may pass (a download broke off): the release is not refused,
    the next round tries again and a download resumes from the bytes already on disk."""


class UpdateConfig(StrictModel):
    """How the agent follows model releases."""

    enabled: bool = Field(default=False, description="Follow a release channel and swap to new models.")
    channel: str = Field(default="stable", description="Release channel to follow (e.g. stable, canary).")
    public_key: Path | None = Field(
        default=None, description="PEM public key of the server's release key; releases must be signed by it."
    )
    target: str = Field(
        default="127.0.0.1:50051", description="gRPC address of the registry (release look-up, download)."
    )
    tls: TLSConfig | None = Field(default=None, description="TLS for the registry connection (mutual TLS with a cert).")
    models_dir: Path = Field(default=Path(".edgeloop/models"), description="Where downloaded versions are kept.")
    poll_s: float = Field(default=60.0, gt=0, description="Seconds between release look-ups.")
    timeout_s: float = Field(default=30.0, gt=0, description="Deadline of one look-up or download call.")
    smoke_frames: int = Field(default=4, ge=1, description="Recent frames the new model must handle before the swap.")
    keep_versions: int = Field(default=2, ge=2, description="Versions kept on disk (the current one and rollbacks).")
    mqtt: MqttWatchConfig | None = Field(
        default=None, description="Also watch the retained release topics on this broker, for immediate updates."
    )


class MqttWatchConfig(StrictModel):
    """Broker connection for watching retained release messages (same fields as the MQTT transport)."""

    host: str = Field(default="127.0.0.1", description="Broker host.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port.")
    username: str | None = Field(default=None, description="Broker user.")
    password: str | None = Field(default=None, description="Broker password.")
    tls: TLSConfig | None = Field(default=None, description="TLS to the broker.")
    topic_prefix: str = Field(default=topics.DEFAULT_PREFIX, description="Prefix of edgeloop topics.")


UpdateConfig.model_rebuild()


class _Swappable:
    """What the updater needs from the agent (kept small so tests can fake it)."""

    model_version: str

    def recent_frames(self) -> Sequence[np.ndarray]: ...

    def swap_detector(self, detector: Detector, version: str) -> Detector: ...


class RegistryClient:
    """gRPC client of the registry: release look-up and resumable artifact download."""

    def __init__(self, target: str, tls: TLSConfig | None, timeout_s: float) -> None:
        if tls is None:
            self._channel = grpc.insecure_channel(target)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls.ca_file.read_bytes(),
                private_key=tls.key_file.read_bytes() if tls.key_file else None,
                certificate_chain=tls.cert_file.read_bytes() if tls.cert_file else None,
            )
            options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
            self._channel = grpc.secure_channel(target, creds, options=options)
        self._stub = models_pb2_grpc.RegistryStub(self._channel)
        self._timeout = timeout_s

    def get_release(self, device_id: str, channel: str) -> models_pb2.ModelRelease | None:
        try:
            return self._stub.GetRelease(
                models_pb2.ReleaseQuery(device_id=device_id, channel=channel), timeout=self._timeout
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise UpdateError(f"release look-up failed: {err.code().name}: {err.details()}") from err

    def download(self, version: str, device_id: str, dest: Path, expected_size: int) -> None:
        """Fetch the artifact into ``dest``, resuming from what ``dest`` already holds."""
        offset = dest.stat().st_size if dest.exists() else 0
        if offset > expected_size:  # a stale partial of something else: start over
            dest.unlink()
            offset = 0
        if offset == expected_size:
            return
        request = models_pb2.ArtifactRequest(version=version, offset=offset, device_id=device_id)
        try:
            with dest.open("ab") as fh:
                for chunk in self._stub.DownloadArtifact(request, timeout=self._timeout):
                    if chunk.offset != fh.tell():
                        raise UpdateError(f"download of {version}: chunk at {chunk.offset}, expected {fh.tell()}")
                    fh.write(chunk.data)
                fh.flush()
                os.fsync(fh.fileno())
        except grpc.RpcError as err:
            raise TransientUpdateError(f"download of {version} broke off: {err.code().name}: {err.details()}") from err

    def close(self) -> None:
        self._channel.close()


class Updater:
    """Follows releases for one agent. ``check_once()`` does one full round; ``start()`` polls."""

    def __init__(
        self,
        config: UpdateConfig,
        device_id: str,
        agent: _Swappable,
        build: Callable[[Path], Detector],
        client: RegistryClient | None = None,
    ) -> None:
        if config.public_key is None:
            raise UpdateError("update.public_key is required: releases are only accepted when signed")
        self.config = config
        self.device_id = device_id
        self.agent = agent
        self._build = build
        self._public_key = load_public_key(config.public_key)
        self._client = client or RegistryClient(config.target, config.tls, config.timeout_s)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._watcher = None
        self._pending: models_pb2.ModelRelease | None = None
        self.last_error = ""
        self.refused: dict[str, str] = {}  # version -> why it was refused (the latest refusal)
        # Refused releases by content, so one is not retried in a loop; by content rather than by version
        # so that a forged release naming a version cannot get the genuine one of that name refused.
        self._refused_releases: dict[bytes, str] = {}
        config.models_dir.mkdir(parents=True, exist_ok=True)

    # -- the model on disk ---------------------------------------------------------------------
    @staticmethod
    def current_model(models_dir: Path) -> tuple[str, Path] | None:
        """The version and artifact ``models_dir/current`` points at, if any (used at agent start)."""
        link = models_dir / CURRENT_LINK
        if not link.is_symlink():
            return None
        target = (models_dir / os.readlink(link)).resolve()
        artifact = target / ARTIFACT_NAME
        return (target.name, artifact) if artifact.is_file() else None

    def _point_current(self, version: str) -> None:
        tmp = self.config.models_dir / f".{CURRENT_LINK}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(version, tmp)
        os.replace(tmp, self.config.models_dir / CURRENT_LINK)  # atomic: old or new, never neither
        dir_fd = os.open(self.config.models_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _prune(self, keep: set[str]) -> None:
        versions = sorted(
            (
                p
                for p in self.config.models_dir.iterdir()
                # not the `current` link: it is no version and would take the rollback target's place
                if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
            ),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        kept = 0
        for path in versions:
            if path.name in keep or kept < self.config.keep_versions:
                kept += 1
                continue
            shutil.rmtree(path, ignore_errors=True)

    # -- one update round ----------------------------------------------------------------------
    def check_once(self) -> bool:
        """Look up the release for this device and apply it if it is new. True when a swap happened."""
        with self._lock:
            release = self._pending
            self._pending = None
            if release is None:
                try:
                    release = self._client.get_release(self.device_id, self.config.channel)
                except UpdateError as err:
                    self.last_error = str(err)
                    logger.warning("%s", err)
                    return False
            if release is None or release.version == self.agent.model_version:
                self.last_error = ""  # the registry answered and nothing is pending: no error is current
                return False
            identity = hashlib.sha256(release.SerializeToString(deterministic=True)).digest()
            if identity in self._refused_releases:
                self.last_error = self._refused_releases[identity]  # still offered, still refused
                return False
            try:
                self.apply(release)
            except TransientUpdateError as err:
                self.last_error = f"update to model {release.version} interrupted, will retry: {err}"
                logger.warning("%s", self.last_error)
                return False
            except UpdateError as err:
                self.refused[release.version] = str(err)
                self.last_error = f"refused model {release.version}: {err}"
                self._refused_releases[identity] = self.last_error
                logger.error("%s; still running %s", self.last_error, self.agent.model_version)
                return False
            self.last_error = ""
            return True

    def apply(self, release: models_pb2.ModelRelease) -> None:
        """Verify, fetch, build, smoke-test and swap to ``release`` (raises UpdateError on any failure)."""
        version = release.version
        if not VERSION_PATTERN.fullmatch(version):
            raise UpdateError(f"release version {version!r} is not a valid name")
        try:
            verify_release(release, self._public_key)
        except ReleaseVerificationError as err:
            raise UpdateError(f"signature check failed: {err}") from err
        vdir = self.config.models_dir / version
        vdir.mkdir(parents=True, exist_ok=True)
        try:
            detector = self._fetch_and_build(release, vdir)
        except TransientUpdateError:
            raise  # keep the partial download for the next round
        except UpdateError:
            # A refused version is no rollback target: it must not take a place among keep_versions.
            shutil.rmtree(vdir, ignore_errors=True)
            raise
        old = self.agent.swap_detector(detector, version)
        previous = old.model_version
        old.close()
        self._point_current(version)
        os.utime(vdir)
        self._prune(keep={version})
        logger.info("now running model %s (was %s)", version, previous)

    def _fetch_and_build(self, release: models_pb2.ModelRelease, vdir: Path) -> Detector:
        """Download (or find on disk) and check the artifact, build the detector and smoke-test it."""
        version = release.version
        artifact = vdir / ARTIFACT_NAME
        if not artifact.exists():
            part = vdir / (ARTIFACT_NAME + ".part")
            self._client.download(version, self.device_id, part, release.artifact_size)
            try:
                verify_artifact(part, release)
            except ReleaseVerificationError as err:
                part.unlink(missing_ok=True)
                raise UpdateError(f"artifact check failed: {err}") from err
            os.replace(part, artifact)
        else:
            try:
                verify_artifact(artifact, release)  # a rollback target on disk is checked again
            except ReleaseVerificationError as err:
                artifact.unlink(missing_ok=True)
                raise UpdateError(f"artifact on disk failed its check: {err}") from err
        try:
            detector = self._build(artifact)
        except DetectorError as err:
            raise UpdateError(f"model does not load: {err}") from err
        try:
            self._smoke_test(detector, release)
        except UpdateError:
            detector.close()
            raise
        return detector

    def _smoke_test(self, detector: Detector, release: models_pb2.ModelRelease) -> None:
        if list(release.class_names) and list(detector.class_names) != list(release.class_names):
            raise UpdateError(
                f"model's class names ({len(detector.class_names)}) differ from the release's "
                f"({len(release.class_names)})"
            )
        frames = list(self.agent.recent_frames())[-self.config.smoke_frames :]
        if not frames:
            frames = [np.full((480, 640, 3), 114, np.uint8)]
        for image in frames:
            try:
                dets = detector.detect(image)
            except Exception as err:  # any failure of an untrusted model is a refusal, not a crash
                raise UpdateError(f"smoke test: detection failed: {err}") from err
            h, w = image.shape[:2]
            for d in dets:
                x1, y1, x2, y2 = d.box
                if not (np.isfinite(d.confidence) and 0.0 <= d.confidence <= 1.0):
                    raise UpdateError(f"smoke test: confidence {d.confidence} out of [0, 1]")
                if not (-1 <= x1 <= x2 <= w + 1 and -1 <= y1 <= y2 <= h + 1):
                    raise UpdateError(f"smoke test: box {d.box} outside the {w}x{h} frame")
                if not 0 <= d.class_id < len(detector.class_names):
                    raise UpdateError(f"smoke test: class id {d.class_id} out of range")

    # -- background ------------------------------------------------------------------------------
    def offer(self, release: models_pb2.ModelRelease) -> None:
        """A release seen elsewhere (a retained MQTT message): check it on the next round, now."""
        self._pending = release
        self._wake.set()

    def start(self) -> None:
        if self.config.mqtt is not None:
            self._watcher = _ReleaseWatcher(self.config.mqtt, self.device_id, self.config.channel, self.offer)
            self._watcher.start()
        self._thread = threading.Thread(target=self._run, name="edgeloop-updater", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception:  # the updater must never take the agent down
                logger.exception("update round failed")
            self._wake.wait(self.config.poll_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._watcher is not None:
            self._watcher.stop()
        self._client.close()


class _ReleaseWatcher:
    """Subscribes to the retained release messages of this device and its channel."""

    def __init__(
        self,
        config: MqttWatchConfig,
        device_id: str,
        channel: str,
        on_release: Callable[[models_pb2.ModelRelease], None],
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._topics = [
            topics.device_release(config.topic_prefix, device_id),
            topics.channel_release(config.topic_prefix, channel),
        ]
        self._latest: dict[str, models_pb2.ModelRelease] = {}
        self._on_release = on_release
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edgeloop-updater-{device_id}", protocol=mqtt.MQTTv5
        )
        if config.username:
            self._client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            self._client.tls_set_context(client_ssl_context(config.tls))
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._config = config

    def start(self) -> None:
        self._client.connect_async(self._config.host, self._config.port)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        for topic in self._topics:
            client.subscribe(topic, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        if not message.payload:  # a cleared retained message (e.g. an unpin)
            self._latest.pop(message.topic, None)
        else:
            release = models_pb2.ModelRelease()
            try:
                release.ParseFromString(message.payload)
            except Exception:
                logger.warning("ignored a malformed release message on %s", message.topic)
                return
            self._latest[message.topic] = release
        # A device release (pin) wins over the channel's.
        for topic in self._topics:
            if topic in self._latest:
                self._on_release(self._latest[topic])
                return
