"""The gRPC ingest service against the agent's real gRPC transport and raw client stubs.

The core is a fake here (:class:`FakeIngestor`): it parses frames, runs the checks of the table
in ``server/ingest/base.py`` (or, when the real one is importable, ``server.ingest.validation``),
keeps raw bytes by frame id and resolves futures when told, so these tests pin down what the
transport does: byte-identical hand-over, ordered acks, read-ahead, the error mapping, mutual
TLS identities and heartbeats. The MQTT bridge's tests reuse the fake and the frame builders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from edge_agent.transports import GrpcTransport, GrpcTransportConfig, TLSConfig, TransportError
from edge_agent.transports.grpc import HEARTBEAT_METHOD, UPLOAD_METHOD
from edgeloop.convert import device_status_to_pb, parse_frame
from edgeloop.domain import Ack, AckStatus, DeviceStatus, FrameRecord
from edgeloop.v1 import frames_pb2
from server.ingest.base import AllowAllDevices, FrameRejected, Identity, RejectCode
from server.ingest.grpc_service import (
    GrpcServerConfig,
    IngestServicer,
    ServerStartError,
    ServerTLSConfig,
    build_grpc_server,
)
from server.ingest.heartbeats import FILE_NAME, HeartbeatStore, read_fleet
from server.metrics import ServerMetrics
from tests.fakes.frames import jpeg
from tests.fakes.frames import make_frame as shared_make_frame

DEVICE = "dev-a"
OTHER = "dev-b"
CLASSES = ["fish", "shark"]
W, H = 64, 48

# -- frames ----------------------------------------------------------------------------------


_JPEG = jpeg(W, H)


def make_frame(i: int = 0, *, device: str = DEVICE, image: bytes | None = None, **kw: Any) -> tuple[str, bytes]:
    """``(frame_id, serialized FrameUpload)`` for a valid frame unless told otherwise (one shared JPEG)."""
    return shared_make_frame(i, device=device, image=_JPEG if image is None else image, classes=CLASSES, **kw)


def frames(n: int, **kw: object) -> list[tuple[str, bytes]]:
    return [make_frame(i, **kw) for i in range(n)]  # type: ignore[arg-type]


# -- a fake core -----------------------------------------------------------------------------


def real_validate(devices: set[str] | None = None) -> Callable[[bytes, Identity], FrameRecord]:
    """``server.ingest.validation.validate`` (the core's own checks; no database needed)."""
    validation = pytest.importorskip("server.ingest.validation")
    directory = AllowAllDevices() if devices is None else _SetDirectory(devices)
    config = validation.ValidationConfig()
    return lambda payload, identity: validation.validate(payload, identity, directory, config)


class _SetDirectory:
    def __init__(self, active: set[str]) -> None:
        self.active = active

    def is_active(self, device_id: str) -> bool:
        return device_id in self.active


def fake_validate(payload: bytes, identity: Identity, devices: set[str] | None) -> FrameRecord:
    """The checks of ``base.py``'s table, in its order: stream-fatal first, then per frame."""
    try:
        rec = parse_frame(payload)
    except DecodeError as err:
        raise FrameRejected(RejectCode.MALFORMED, f"not a FrameUpload: {err}") from err
    if not rec.frame_id or not rec.device_id:
        raise FrameRejected(RejectCode.MISSING_ID, "frame_id and device_id are required", rec.frame_id)
    if identity.device_id is not None and rec.device_id != identity.device_id:
        raise FrameRejected(
            RejectCode.DEVICE_MISMATCH,
            f"frame says device {rec.device_id!r}, the connection is {identity.device_id!r}",
            rec.frame_id,
        )
    if devices is not None and rec.device_id not in devices:
        raise FrameRejected(RejectCode.UNKNOWN_DEVICE, f"device {rec.device_id!r} is not registered", rec.frame_id)
    img = cv2.imdecode(np.frombuffer(rec.image, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FrameRejected(RejectCode.BAD_IMAGE, "the image does not decode", rec.frame_id)
    for det in rec.detections:
        x1, y1, x2, y2 = det.box
        if not (0 <= x1 < x2 <= rec.width and 0 <= y1 < y2 <= rec.height):
            raise FrameRejected(RejectCode.BOX_OUTSIDE, f"box {det.box} outside {rec.width}x{rec.height}", rec.frame_id)
        if not 0 <= det.class_id < len(rec.class_names):
            raise FrameRejected(RejectCode.UNKNOWN_CLASS, f"class id {det.class_id} unknown", rec.frame_id)
    return rec


@dataclass
class FakeIngestor:
    """An in-memory Ingestor: validates, keeps raw bytes by frame id, answers STORED then DUPLICATE.

    Attributes:
        devices: Registered device ids (None: every id).
        delay_s: Futures resolve this long after submit (on a timer thread).
        hold: Futures stay pending until :meth:`release`.
        verdict: Replaces the stored/duplicate verdict (e.g. ``AckStatus.RETRY``).
        validate: False skips every check and only reads the frame id (a no-op core for throughput runs).
        reverse: Resolve held futures last-first on release (completion out of order).
        check: The validation to run (default: :func:`fake_validate` with ``devices``); see
            :func:`real_validate`.
    """

    devices: set[str] | None = None
    delay_s: float = 0.0
    hold: bool = False
    verdict: str | None = None
    validate: bool = True
    reverse: bool = False
    check: Callable[[bytes, Identity], FrameRecord] | None = None
    frames: dict[str, bytes] = field(default_factory=dict)
    #: Frame ids handed to submit and accepted, duplicates included, in order.
    deliveries: list[str] = field(default_factory=list)
    #: Names of the threads that called submit (one per bridge client or stream reader).
    threads: list[str] = field(default_factory=list)
    identities: list[Identity] = field(default_factory=list)
    rejected: list[RejectCode] = field(default_factory=list)
    _held: list[tuple[Future[Ack], str, bytes]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, payload: bytes, identity: Identity) -> Future[Ack]:
        with self._lock:
            self.threads.append(threading.current_thread().name)
            self.identities.append(identity)
        if self.validate:
            try:
                if self.check is not None:
                    rec = self.check(payload, identity)
                else:
                    rec = fake_validate(payload, identity, self.devices)
            except FrameRejected as err:
                with self._lock:
                    self.rejected.append(err.code)
                raise
            frame_id = rec.frame_id
        else:
            frame_id = frames_pb2.FrameUpload.FromString(payload).frame_id
        future: Future[Ack] = Future()
        with self._lock:
            self.deliveries.append(frame_id)
            if self.hold:
                self._held.append((future, frame_id, payload))
                return future
        if self.delay_s > 0:
            threading.Timer(self.delay_s, self._resolve, (future, frame_id, payload)).start()
        else:
            self._resolve(future, frame_id, payload)
        return future

    def release(self) -> int:
        """Resolve every held future; returns how many."""
        with self._lock:
            held, self._held = self._held, []
            self.hold = False
        for item in reversed(held) if self.reverse else held:
            self._resolve(*item)
        return len(held)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def _resolve(self, future: Future[Ack], frame_id: str, payload: bytes) -> None:
        with self._lock:
            if self.verdict is not None:
                status = self.verdict
            elif frame_id in self.frames:
                status = AckStatus.DUPLICATE
            else:
                self.frames[frame_id] = payload
                status = AckStatus.STORED
        future.set_result(Ack(frame_id, status))


def wait_for(cond: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def counter(metrics: ServerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"{name}_total", labels or None) or 0.0


# -- a running server ------------------------------------------------------------------------


@dataclass
class Server:
    ingestor: Any  # a FakeIngestor, or the real IngestCore
    metrics: ServerMetrics
    heartbeats: HeartbeatStore
    server: grpc.Server
    port: int
    transports: list[GrpcTransport] = field(default_factory=list)
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def transport(self, device: str = DEVICE, **kw: object) -> GrpcTransport:
        settings: dict[str, object] = {
            "target": self.target,
            "connect_timeout_s": 1.0,
            "deadline_s": 10.0,
            "reconnect_backoff_max_s": 0.3,
        }
        cfg = GrpcTransportConfig(**{**settings, **kw})  # type: ignore[arg-type]
        t = GrpcTransport(cfg, device)
        self.transports.append(t)
        return t

    def raw_upload(self, payloads: Sequence[bytes], credentials: grpc.ChannelCredentials | None = None):
        """Stream raw bytes (no agent in between); returns (acks received, the RpcError or None)."""
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
        if credentials is None:
            channel = grpc.insecure_channel(self.target, options=options)
        else:
            channel = grpc.secure_channel(self.target, credentials, options=options)
        self.channels.append(channel)
        call = channel.stream_stream(
            UPLOAD_METHOD, request_serializer=lambda b: b, response_deserializer=frames_pb2.FrameAck.FromString
        )(iter(payloads), timeout=10.0)
        acks: list[frames_pb2.FrameAck] = []
        try:
            for ack in call:
                acks.append(ack)
        except grpc.RpcError as err:
            return acks, err
        return acks, None

    def close(self) -> None:
        for t in self.transports:
            t.close()
        for c in self.channels:
            c.close()
        self.server.stop(None).wait(5)
        self.heartbeats.close()


def start_server(
    tmp_path: Path,
    ingestor: FakeIngestor | None = None,
    *,
    devices: object = None,
    extra: Sequence[Callable[[grpc.Server], None]] = (),
    metrics: ServerMetrics | None = None,
    **config: object,
) -> Server:
    ingestor = ingestor if ingestor is not None else FakeIngestor()
    metrics = metrics if metrics is not None else ServerMetrics()
    heartbeats = HeartbeatStore.in_dir(tmp_path / "data", flush_interval_s=0.05)
    cfg = GrpcServerConfig(port=0, **config)  # type: ignore[arg-type]
    servicer = IngestServicer.from_config(ingestor, cfg, metrics=metrics, heartbeats=heartbeats, devices=devices)
    server, port = build_grpc_server(cfg, [servicer.add_to_server, *extra])
    server.start()
    return Server(ingestor, metrics, heartbeats, server, port)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path)
    yield s
    s.close()


# -- the good path ---------------------------------------------------------------------------


def test_frames_arrive_byte_identical_and_acks_come_back_in_order(srv: Server) -> None:
    batch = frames(30)
    acks = srv.transport().send(batch)
    assert [a.frame_id for a in acks] == [fid for fid, _ in batch]
    assert {a.status for a in acks} == {AckStatus.STORED}
    assert srv.ingestor.frames == dict(batch)

    again = srv.transport().send(batch)
    assert [(a.frame_id, a.status) for a in again] == [(fid, AckStatus.DUPLICATE) for fid, _ in batch]
    assert counter(srv.metrics, "edgeloop_server_frames_received", transport="grpc") == 60
    # Without a client certificate the identity names no device; the core checks the claim.
    assert {i.device_id for i in srv.ingestor.identities} == {None}
    assert all(i.transport == "grpc" and i.peer for i in srv.ingestor.identities)


def test_acks_stay_in_order_when_storage_completes_out_of_order(tmp_path: Path) -> None:
    s = start_server(tmp_path, FakeIngestor(hold=True, reverse=True))
    try:
        batch = frames(10)
        result: list[list[Ack]] = []
        sender = threading.Thread(target=lambda: result.append(s.transport().send(batch)))
        sender.start()
        # Every frame is read and submitted before any is stored: the server reads ahead.
        wait_for(lambda: s.ingestor.held == 10, what="all frames submitted while none is stored")
        s.ingestor.release()  # last-first
        sender.join(10)
        assert [a.frame_id for a in result[0]] == [fid for fid, _ in batch]
    finally:
        s.close()


def test_read_ahead_is_bounded_per_stream(tmp_path: Path) -> None:
    s = start_server(tmp_path, FakeIngestor(hold=True), max_outstanding_per_stream=4)
    try:
        batch = frames(12)
        result: list[list[Ack]] = []
        sender = threading.Thread(target=lambda: result.append(s.transport().send(batch)))
        sender.start()
        wait_for(lambda: s.ingestor.held == 4, what="4 frames submitted")
        time.sleep(0.2)
        assert s.ingestor.held == 4  # the 5th frame stays unread until one is acknowledged
        deadline = time.monotonic() + 5.0
        while len(s.ingestor.deliveries) < 12 or s.ingestor.held:
            assert time.monotonic() < deadline, "the stream stalled"
            s.ingestor.release()
            time.sleep(0.01)
            s.ingestor.hold = len(s.ingestor.deliveries) < 12
        sender.join(10)
        assert [a.frame_id for a in result[0]] == [fid for fid, _ in batch]
    finally:
        s.close()


def test_a_cancelled_stream_frees_its_reader_and_the_server_goes_on(tmp_path: Path) -> None:
    s = start_server(tmp_path, FakeIngestor(hold=True), max_outstanding_per_stream=2)
    try:
        with pytest.raises(TransportError, match="DEADLINE_EXCEEDED"):
            s.transport(deadline_s=0.5).send(frames(6))
        s.ingestor.release()
        wait_for(
            lambda: not any(t.name.startswith("grpc-ingest-read") for t in threading.enumerate()),
            what="the stream's reader thread to end",
        )
        acks = s.transport().send(frames(2))
        assert [a.status for a in acks] == [AckStatus.STORED] * 2
    finally:
        s.close()


def test_streams_over_max_concurrent_streams_are_refused_not_queued(tmp_path: Path) -> None:
    s = start_server(tmp_path, FakeIngestor(hold=True), max_workers=2, max_concurrent_streams=2)
    try:
        # Two devices: one device alone may hold only one of the two slots (max_streams_per_device).
        senders = [threading.Thread(target=s.transport(d).send, args=(frames(1, device=d),)) for d in (DEVICE, OTHER)]
        for t in senders:
            t.start()
        wait_for(lambda: s.ingestor.held == 2, what="two streams in progress")
        with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED"):
            s.transport("dev-c").send(frames(1, device="dev-c"))
        s.ingestor.release()
        for t in senders:
            t.join(10)
        assert [a.status for a in s.transport().send(frames(1))] == [AckStatus.STORED]
    finally:
        s.close()


def test_heartbeat_is_stored_persisted_and_counted(srv: Server, tmp_path: Path) -> None:
    status = DeviceStatus(DEVICE, 1_700_000_100.0, "m1", 3, 3000, {"frames_read": 10}, agent_version="0.1")
    srv.transport().heartbeat(device_status_to_pb(status))
    assert srv.heartbeats.latest(DEVICE) == status
    assert srv.metrics.registry.get_sample_value("edgeloop_server_heartbeats_total") == 1
    srv.heartbeats.flush()
    assert read_fleet(tmp_path / "data")[DEVICE].status.outbox_depth == 3


def test_extra_servicers_share_the_port(tmp_path: Path) -> None:
    """The registry engineer passes one more adder; any generic service works beside ingest."""

    def add_echo(server: grpc.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Echo": handler}),))

    s = start_server(tmp_path, extra=[add_echo])
    try:
        with grpc.insecure_channel(s.target) as channel:
            assert channel.unary_unary("/test.Echo/Echo")(b"hi", timeout=5) == b"hi"
        assert [a.status for a in s.transport().send(frames(1))] == [AckStatus.STORED]
    finally:
        s.close()


# -- bad input ---------------------------------------------------------------------------------


def test_a_50mb_frame_gets_resource_exhausted_from_grpc_and_the_server_goes_on(srv: Server) -> None:
    big = make_frame(0, image=os.urandom(50 * 1024 * 1024))[1]
    acks, err = srv.raw_upload([big])
    assert acks == [] and err is not None
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert srv.ingestor.deliveries == []  # the core never saw it

    # The agent's own transport sees the same, as a TransportError naming the status.
    with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED"):
        srv.transport().send([("big", big)])
    assert [a.status for a in srv.transport().send(frames(1))] == [AckStatus.STORED]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(np.random.default_rng(0).bytes(4096), id="random-bytes"),
        pytest.param(make_frame(0)[1][:-100], id="truncated"),
    ],
)
def test_bytes_that_are_not_a_frame_end_the_stream_with_invalid_argument(
    tmp_path: Path, validator: Callable[..., FakeIngestor], payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    srv = start_server(tmp_path, validator())
    try:
        _check_not_a_frame(srv, payload, caplog)
    finally:
        srv.close()


def _check_not_a_frame(srv: Server, payload: bytes, caplog: pytest.LogCaptureFixture) -> None:
    good = frames(3)
    acks, err = srv.raw_upload([good[0][1], good[1][1], payload, good[2][1]])
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream closed after 2 frame(s)" in err.details()
    # The frames before the bad one are answered before the stream ends; the one after is not read.
    assert [a.frame_id for a in acks] == [good[0][0], good[1][0]]
    assert good[2][0] not in srv.ingestor.frames
    assert counter(srv.metrics, "edgeloop_server_frames_rejected", transport="grpc", reason="malformed") == 1
    assert any("gRPC stream from" in r.getMessage() for r in caplog.records)
    assert [a.status for a in srv.transport().send(frames(1))] == [AckStatus.STORED]


#: The per-frame problems of ``base.py``'s table, as frame overrides for :func:`make_frame`.
PER_FRAME_CASES = [
    pytest.param({"image": b"\xff\xd8 not really a jpeg"}, RejectCode.BAD_IMAGE, id="image-does-not-decode"),
    pytest.param({"boxes": [(10, 10, W + 50, 20)]}, RejectCode.BOX_OUTSIDE, id="box-outside"),
    pytest.param({"class_id": len(CLASSES) + 3}, RejectCode.UNKNOWN_CLASS, id="unknown-class"),
]


VALIDATIONS = ["fake-validation", "real-validation"]


def ingestor_factory(validation: str) -> Callable[..., FakeIngestor]:
    """``factory(devices=None)`` makes a FakeIngestor with this file's checks or the real ones."""
    if validation == "real-validation":
        return lambda devices=None: FakeIngestor(devices=devices, check=real_validate(devices))
    return lambda devices=None: FakeIngestor(devices=devices)


@pytest.fixture(params=VALIDATIONS)
def validator(request: pytest.FixtureRequest) -> Callable[..., FakeIngestor]:
    return ingestor_factory(request.param)


@pytest.mark.parametrize(("bad", "code"), PER_FRAME_CASES)
def test_per_frame_problems_get_a_rejected_ack_and_the_stream_goes_on(
    tmp_path: Path,
    validator: Callable[..., FakeIngestor],
    bad: dict[str, object],
    code: RejectCode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = start_server(tmp_path, validator())
    try:
        ok1, wrong, ok2 = make_frame(0), make_frame(1, **bad), make_frame(2)  # type: ignore[arg-type]
        acks = s.transport().send([ok1, wrong, ok2])
        assert [(a.frame_id, a.status) for a in acks] == [
            (ok1[0], AckStatus.STORED),
            (wrong[0], AckStatus.REJECTED),
            (ok2[0], AckStatus.STORED),
        ]
        assert acks[1].message.startswith(f"{code.value}: ")
        assert wrong[0] not in s.ingestor.frames
        assert counter(s.metrics, "edgeloop_server_frames_rejected", transport="grpc", reason=code.value) == 1
        assert any(code.value in r.getMessage() and wrong[0] in r.getMessage() for r in caplog.records)
    finally:
        s.close()


def test_unknown_device_ends_the_stream_with_permission_denied(
    tmp_path: Path, validator: Callable[..., FakeIngestor]
) -> None:
    s = start_server(tmp_path, validator({DEVICE}))
    try:
        acks, err = s.raw_upload([make_frame(0, device="intruder")[1]])
        assert acks == [] and err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "unknown_device" in err.details()
        assert counter(s.metrics, "edgeloop_server_frames_rejected", transport="grpc", reason="unknown_device") == 1
        assert [a.status for a in s.transport().send(frames(1))] == [AckStatus.STORED]
    finally:
        s.close()


def test_a_malformed_heartbeat_is_invalid_argument(srv: Server) -> None:
    with grpc.insecure_channel(srv.target) as channel:
        call = channel.unary_unary(HEARTBEAT_METHOD)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            call(device_status_to_pb(DeviceStatus("", 1.0, "m", 0, 0)).SerializeToString(), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert srv.heartbeats.all() == {}


# -- mutual TLS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]
    clients: dict[str, tuple[Path, Path]]  # device id -> (cert, key)

    def credentials(self, device: str | None) -> grpc.ChannelCredentials:
        cert_key = self.clients.get(device) if device else None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=cert_key[1].read_bytes() if cert_key else None,
            certificate_chain=cert_key[0].read_bytes() if cert_key else None,
        )

    def tls(self, device: str | None) -> TLSConfig:
        cert_key = self.clients.get(device) if device else None
        return TLSConfig(
            ca_file=self.ca, cert_file=cert_key[0] if cert_key else None, key_file=cert_key[1] if cert_key else None
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1, and client certificates whose common name is the device."""
    from tests.fakes.pki import CLIENT_AUTH, SERVER_AUTH, TestCA, loopback_names, x509

    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return Pki(
        ca=ca.path,
        server=ca.issue("server", loopback_names(), SERVER_AUTH),
        clients={d: ca.issue(d, [x509.DNSName(d)], CLIENT_AUTH) for d in (DEVICE, OTHER, "dev-revoked")},
    )


class Directory:
    """A device directory with a mutable set of active ids."""

    def __init__(self, active: set[str]) -> None:
        self.active = set(active)

    def is_active(self, device_id: str) -> bool:
        return device_id in self.active


@pytest.fixture
def mtls(tmp_path: Path, pki: Pki, validator: Callable[..., FakeIngestor]) -> Iterator[Server]:
    directory = Directory({DEVICE, OTHER})
    s = start_server(
        tmp_path,
        validator(directory.active),
        devices=directory,
        tls=ServerTLSConfig(cert_file=pki.server[0], key_file=pki.server[1], client_ca_file=pki.ca),
    )
    yield s
    s.close()


def test_mtls_identity_is_the_certificate_common_name(mtls: Server, pki: Pki) -> None:
    batch = frames(3)
    acks = mtls.transport(tls=pki.tls(DEVICE)).send(batch)
    assert [a.status for a in acks] == [AckStatus.STORED] * 3
    assert mtls.ingestor.frames == dict(batch)
    assert {i.device_id for i in mtls.ingestor.identities} == {DEVICE}


def test_mtls_frames_of_another_device_are_permission_denied(mtls: Server, pki: Pki) -> None:
    acks, err = mtls.raw_upload([make_frame(0, device=OTHER)[1]], credentials=pki.credentials(DEVICE))
    assert acks == [] and err is not None
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "device_mismatch" in err.details()
    assert counter(mtls.metrics, "edgeloop_server_frames_rejected", transport="grpc", reason="device_mismatch") == 1
    with pytest.raises(TransportError, match="PERMISSION_DENIED"):
        mtls.transport(DEVICE, tls=pki.tls(DEVICE)).send([make_frame(1, device=OTHER)])
    # The same device's own frames still go through.
    assert [a.status for a in mtls.transport(tls=pki.tls(DEVICE)).send(frames(1))] == [AckStatus.STORED]


def test_mtls_a_device_that_is_not_active_is_refused_before_any_frame_is_read(mtls: Server, pki: Pki) -> None:
    acks, err = mtls.raw_upload([make_frame(0, device="dev-revoked")[1]], credentials=pki.credentials("dev-revoked"))
    assert acks == [] and err is not None
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "dev-revoked" in err.details()
    assert mtls.ingestor.identities == []  # the core never saw the stream
    status = device_status_to_pb(DeviceStatus("dev-revoked", 1.0, "m", 0, 0))
    with pytest.raises(TransportError, match="PERMISSION_DENIED"):
        mtls.transport("dev-revoked", tls=pki.tls("dev-revoked")).heartbeat(status)
    assert mtls.heartbeats.all() == {}


def test_mtls_without_a_client_certificate_fails_the_handshake(mtls: Server, pki: Pki) -> None:
    acks, err = mtls.raw_upload([make_frame(0)[1]], credentials=pki.credentials(None))
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(TransportError, match="UNAVAILABLE"):
        mtls.transport(tls=pki.tls(None)).send(frames(1))
    assert mtls.ingestor.identities == []


def test_mtls_heartbeat_only_for_the_certificate_device(mtls: Server, pki: Pki) -> None:
    t = mtls.transport(DEVICE, tls=pki.tls(DEVICE))
    t.heartbeat(device_status_to_pb(DeviceStatus(DEVICE, 5.0, "m1", 0, 0)))
    with pytest.raises(TransportError, match="PERMISSION_DENIED"):
        t.heartbeat(device_status_to_pb(DeviceStatus(OTHER, 5.0, "m1", 0, 0)))
    assert set(mtls.heartbeats.all()) == {DEVICE}
    assert mtls.metrics.registry.get_sample_value("edgeloop_server_heartbeats_total") == 1


def test_mtls_uses_the_directorys_verify_peer_when_it_has_one(tmp_path: Path, pki: Pki) -> None:
    """``DeviceRegistry.verify_peer`` also refuses an outdated certificate of an active id."""

    class Registry(Directory):
        def __init__(self) -> None:
            super().__init__({DEVICE})
            self.seen: list[object] = []

        def verify_peer(self, auth_context: dict[str, list[bytes]]) -> str | None:
            self.seen.append(auth_context)
            return None  # say: this certificate is not the device's current one

    registry = Registry()
    s = start_server(
        tmp_path,
        devices=registry,
        tls=ServerTLSConfig(cert_file=pki.server[0], key_file=pki.server[1], client_ca_file=pki.ca),
    )
    try:
        acks, err = s.raw_upload([make_frame(0)[1]], credentials=pki.credentials(DEVICE))
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert registry.seen and s.ingestor.identities == []
    finally:
        s.close()


def test_mtls_with_the_real_device_registry_add_revoke_and_re_add(tmp_path: Path) -> None:
    """``server.devices.DeviceRegistry`` issues the certificates and answers ``verify_peer``."""
    devices = pytest.importorskip("server.devices")
    validation = pytest.importorskip("server.ingest.validation")
    registry = devices.DeviceRegistry(devices.DevicesConfig(root=tmp_path / "devices"))
    server_creds = registry.server_credentials()
    config = validation.ValidationConfig()
    ingestor = FakeIngestor(check=lambda payload, identity: validation.validate(payload, identity, registry, config))
    s = start_server(
        tmp_path,
        ingestor,
        devices=registry,
        tls=ServerTLSConfig(
            cert_file=server_creds.cert_file, key_file=server_creds.key_file, client_ca_file=registry.ca_file
        ),
    )

    def keep(creds: object, stem: str) -> TLSConfig:
        # revoke() deletes the bundle: keep a copy of the certificate the device still holds.
        cert, key = tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key"
        cert.write_bytes(creds.cert_file.read_bytes())  # type: ignore[attr-defined]
        key.write_bytes(creds.key_file.read_bytes())  # type: ignore[attr-defined]
        return TLSConfig(ca_file=registry.ca_file, cert_file=cert, key_file=key)

    try:
        old = keep(registry.add("cam-1"), "old")
        assert [a.status for a in s.transport("cam-1", tls=old).send(frames(2, device="cam-1"))] == [
            AckStatus.STORED
        ] * 2
        registry.revoke("cam-1")
        with pytest.raises(TransportError, match="PERMISSION_DENIED"):
            s.transport("cam-1", tls=old).send(frames(1, device="cam-1"))
        new = keep(registry.add("cam-1"), "new")
        with pytest.raises(TransportError, match="PERMISSION_DENIED"):  # the old certificate stays refused
            s.transport("cam-1", tls=old).send(frames(1, device="cam-1"))
        assert [a.status for a in s.transport("cam-1", tls=new).send(frames(1, device="cam-1"))] == [AckStatus.STORED]
    finally:
        s.close()


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GrpcServerConfig, ServerTLSConfig])
def test_every_config_field_is_described(cls: type) -> None:
    missing = [name for name, f in cls.model_fields.items() if not f.description]
    assert missing == []


def test_config_defaults_are_safe_and_fit_the_agent() -> None:
    cfg = GrpcServerConfig()
    assert cfg.host == "127.0.0.1" and cfg.max_message_bytes == 16 * 1024 * 1024
    # The agent pings every 60 s by default: the server must tolerate it.
    assert cfg.min_ping_interval_s <= GrpcTransportConfig().keepalive_time_s
    with pytest.raises(ValueError, match="max_workers"):
        GrpcServerConfig(max_workers=4, max_concurrent_streams=8)
    with pytest.raises(ValueError):
        GrpcServerConfig(bogus=1)  # type: ignore[call-arg]


def test_a_port_in_use_is_a_clear_error(srv: Server) -> None:
    with pytest.raises(ServerStartError, match=str(srv.port)):
        build_grpc_server(GrpcServerConfig(port=srv.port), [])


def test_unreadable_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    cfg = GrpcServerConfig(port=0, tls=ServerTLSConfig(cert_file=tmp_path / "no.crt", key_file=tmp_path / "no.key"))
    with pytest.raises(ServerStartError, match=r"no\.key"):
        build_grpc_server(cfg, [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_max_connection_age_moves_an_agent_to_new_connections_without_losing_a_frame(tmp_path: Path) -> None:
    """Each new connection is hashed again over the ingest workers (or a TCP load balancer's
    backends): an agent's batches keep flowing across the GOAWAYs."""
    s = start_server(tmp_path, max_connection_age_s=0.3, max_connection_age_grace_s=5.0)
    try:
        transport = s.transport()
        deadline = time.monotonic() + 2.0
        i = 0
        while time.monotonic() < deadline:
            batch = [make_frame(i + k) for k in range(4)]
            i += len(batch)
            assert [a.status for a in transport.send(batch)] == [AckStatus.STORED] * len(batch)
            time.sleep(0.05)
        peers = {identity.peer for identity in s.ingestor.identities}
        assert len(s.ingestor.identities) == i
        assert len(peers) >= 3, f"the agent kept its connection: {peers}"
    finally:
        s.close()


def test_loopback_by_default_and_explicit_port(tmp_path: Path) -> None:
    port = _free_port()
    s = start_server(tmp_path)
    s.close()
    server, bound = build_grpc_server(GrpcServerConfig(port=port), [])
    try:
        assert bound == port
    finally:
        server.stop(None)


# -- the heartbeat store -----------------------------------------------------------------------


def test_heartbeat_store_keeps_the_newest_and_survives_a_restart(tmp_path: Path) -> None:
    store = HeartbeatStore.in_dir(tmp_path, flush_interval_s=0.0)
    new = DeviceStatus(DEVICE, 200.0, "m2", 1, 10, {"a": 1}, channel="stable")
    assert store.record(new, received_at=1000.0)
    assert not store.record(DeviceStatus(DEVICE, 100.0, "m1", 9, 90))  # a late redelivery
    assert store.record(DeviceStatus(OTHER, 50.0, "m1", 0, 0))
    assert store.latest(DEVICE) == new and store.last_seen(DEVICE) == 1000.0
    store.close()
    assert not list(tmp_path.glob(".*.tmp"))  # written via a temporary file, renamed into place

    reopened = HeartbeatStore.in_dir(tmp_path)
    assert reopened.all() == {DEVICE: new, OTHER: DeviceStatus(OTHER, 50.0, "m1", 0, 0)}
    assert reopened.latest("nobody") is None


def test_heartbeat_store_writes_at_most_once_per_interval(tmp_path: Path) -> None:
    store = HeartbeatStore.in_dir(tmp_path, flush_interval_s=0.3)
    store.record(DeviceStatus(DEVICE, 1.0, "m", 0, 0))

    def saved_time() -> float:
        return read_fleet(tmp_path)[DEVICE].status.time

    store.record(DeviceStatus(DEVICE, 2.0, "m", 0, 0))
    assert saved_time() == 1.0  # not yet
    wait_for(lambda: saved_time() == 2.0, 3.0, "the timer")
    store.close()


def test_heartbeat_store_ignores_a_corrupt_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / FILE_NAME).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        store = HeartbeatStore.in_dir(tmp_path)
    assert store.all() == {} and "unreadable heartbeat file" in caplog.text
    store.record(DeviceStatus(DEVICE, 1.0, "m", 0, 0))
    store.close()
    assert set(HeartbeatStore.in_dir(tmp_path).all()) == {DEVICE}


# -- the real core (media store on disk, an in-memory stand-in for the FiftyOne inbox) ------------


class MemoryInbox:
    """The inbox calls IngestCore makes, in memory; ``down`` makes them fail like a lost MongoDB."""

    def __init__(self) -> None:
        self.samples: dict[str, tuple[FrameRecord, Path]] = {}
        self.down = False
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            from pymongo.errors import ServerSelectionTimeoutError

            raise ServerSelectionTimeoutError("test: database down")

    def existing_ids(self, frame_ids: Iterable[str]) -> set[str]:
        return set(self.stored(frame_ids))

    def stored(self, frame_ids: Iterable[str]) -> dict[str, Any]:
        from server.store.inbox import StoredSample

        self._check()
        with self._lock:
            return {
                fid: StoredSample(self.samples[fid][0].device_id, str(self.samples[fid][1]))
                for fid in frame_ids
                if fid in self.samples
            }

    def insert_records(self, items: Iterable[tuple[FrameRecord, Path]], *, check_existing: bool = True) -> Any:
        from server.store.inbox import InsertResult

        self._check()
        result = InsertResult()
        with self._lock:
            for record, path in items:
                if record.frame_id in self.samples:
                    result.duplicates.append(record.frame_id)
                else:
                    self.samples[record.frame_id] = (record, path)
                    result.stored.append(record.frame_id)
        return result


def real_core(tmp_path: Path, metrics: ServerMetrics, devices: set[str] | None = None) -> tuple[Any, MemoryInbox]:
    """``server.ingest.core.IngestCore`` with a real media store and a :class:`MemoryInbox`."""
    core = pytest.importorskip("server.ingest.core")
    from server.ingest.validation import ValidationConfig
    from server.store.media import LocalMediaStore

    inbox = MemoryInbox()
    directory = AllowAllDevices() if devices is None else _SetDirectory(devices)
    ingest = core.IngestCore(
        LocalMediaStore(tmp_path / "media"), inbox, directory, ValidationConfig(), metrics, max_wait_s=0.005
    )
    return ingest, inbox


def test_through_the_real_core_frames_are_stored_in_batches_and_acked_in_order(tmp_path: Path) -> None:
    metrics = ServerMetrics()
    core, inbox = real_core(tmp_path, metrics)
    s = start_server(tmp_path, core, metrics=metrics)
    try:
        batch = frames(64)
        acks = s.transport().send(batch)
        assert [(a.frame_id, a.status) for a in acks] == [(fid, AckStatus.STORED) for fid, _ in batch]
        assert set(inbox.samples) == {fid for fid, _ in batch}
        for record, path in inbox.samples.values():
            assert path.read_bytes() == record.image == _JPEG
        # Read-ahead is what lets the core batch: far fewer batches than frames.
        assert metrics.registry.get_sample_value("edgeloop_server_store_batch_seconds_count") < 64
        assert metrics.registry.get_sample_value("edgeloop_server_frames_stored_total") == 64

        again = s.transport().send(batch[:5])
        assert [a.status for a in again] == [AckStatus.DUPLICATE] * 5
    finally:
        s.close()
        core.close()


def test_through_the_real_core_a_database_outage_is_answered_retry(tmp_path: Path) -> None:
    metrics = ServerMetrics()
    core, inbox = real_core(tmp_path, metrics)
    s = start_server(tmp_path, core, metrics=metrics)
    try:
        batch = frames(3)
        inbox.down = True
        assert [a.status for a in s.transport().send(batch)] == [AckStatus.RETRY] * 3
        inbox.down = False
        assert [a.status for a in s.transport().send(batch)] == [AckStatus.STORED] * 3
    finally:
        s.close()
        core.close()


# -- per-device fairness and idle streams (issue 9) -------------------------------------------------


def test_peek_device_id_reads_field_2_without_parsing() -> None:
    from server.ingest.grpc_service import peek_device_id

    _, payload = make_frame(0, device="dev-x")
    assert peek_device_id(payload) == "dev-x"
    no_frame_id = frames_pb2.FrameUpload(device_id="dev-y", sequence=3).SerializeToString()
    assert peek_device_id(no_frame_id) == "dev-y"
    for junk in (b"", b"\xff\xff\xff", payload[:5], b"\x12\x05\xff\xfe\xfd\xfc\xfb"):
        assert peek_device_id(junk) == ""


def _held_streams(s: Server, n: int, first: bytes | None) -> list[tuple[grpc.Future, threading.Event]]:
    """``n`` upload calls that send ``first`` (or nothing) and stay open; acks are read as they come."""
    channel = grpc.insecure_channel(s.target)
    s.channels.append(channel)
    out = []
    for _ in range(n):
        done = threading.Event()

        def requests(done: threading.Event = done) -> Iterator[bytes]:
            if first is not None:
                yield first
            done.wait(30)

        call = channel.stream_stream(
            UPLOAD_METHOD, request_serializer=lambda b: b, response_deserializer=frames_pb2.FrameAck.FromString
        )(requests(), timeout=30)
        threading.Thread(target=_drain, args=(call,), daemon=True).start()
        out.append((call, done))
    return out


def _open(calls: list) -> list:
    return [c for c, _ in calls if not c.done()]


def test_a_device_holds_at_most_max_streams_per_device_and_idle_streams_end(tmp_path: Path) -> None:
    """Without certificates a stream counts for the device its first frame names; one past the cap
    is ended with UNAVAILABLE (which agents retry), another device still gets through, and
    streams that stay idle (with a frame sent, or none) end after stream_idle_timeout_s."""
    s = start_server(tmp_path, FakeIngestor(), max_streams_per_device=2, stream_idle_timeout_s=1.0)
    try:
        calls = _held_streams(s, 5, make_frame(0)[1])
        wait_for(lambda: len(_open(calls)) == 2, what="three streams refused")
        refused = [c for c, _ in calls if c.done()]
        assert {c.code() for c in refused} == {grpc.StatusCode.UNAVAILABLE}
        assert "already holds 2 upload streams" in refused[0].details()
        assert [a.status for a in s.transport(OTHER).send(frames(1, device=OTHER))] == [AckStatus.STORED]
        accepted = _open(calls)
        wait_for(lambda: not _open(calls), 4.0, "the idle streams to end")
        assert {c.code() for c in accepted} == {grpc.StatusCode.UNAVAILABLE}
        assert all("idle stream was closed" in c.details() for c in accepted)
        silent = _held_streams(s, 3, None)
        wait_for(lambda: not _open(silent), 4.0, "streams that never sent a frame to end")
        assert {c.code() for c, _ in silent} == {grpc.StatusCode.UNAVAILABLE}
        # Slots came back: the device may stream again.
        assert [a.status for a in s.transport().send(frames(2))] == [AckStatus.STORED] * 2
        for _, done in calls + silent:
            done.set()
    finally:
        s.close()


def _drain(call: grpc.Call) -> None:
    # A call's status shows only once the messages before it are read.
    with contextlib.suppress(grpc.RpcError):
        for _ in call:
            pass
