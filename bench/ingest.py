"""Benchmark: frames/s stored by the server through gRPC and through MQTT, each against a no-op
receiver on the same transport in the same run, and FiftyOne samples/s on their own.

    .venv/bin/python bench/ingest.py [--frames 1000] [--repeats 3] [--write docs/benchmarks.md]

* no-op: the production transport (``IngestServicer`` / ``MqttBridge`` behind Mosquitto) with an
  ingestor that acknowledges at once: what the transport alone can carry.
* stored: the same transport with the real ``IngestCore``: validation (protobuf, JPEG decode,
  boxes, classes), the media store (every image fsync'd), and the FiftyOne inbox on the bundled
  MongoDB with journaled writes; an ack only after both are durable.
* FiftyOne: ``Inbox.add_records`` in batches of 64, no transport, no media.

The client is the agent's own transport, sending batches of real frames (the COCO images as the
agent encodes them, ~100 KB).
The client runs in its own process, as an agent would; server, broker and MongoDB share the
machine's 2 cores with it. Rounds alternate no-op and
stored so that machine noise hits both; ratios use medians.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeloop.convert import parse_frame  # noqa: E402
from edgeloop.domain import Ack, AckStatus  # noqa: E402
from tests.fakes.frames import make_frame  # noqa: E402

BATCH = 256
DEVICE = "bench-cam"


class NoopIngestor:
    """Acknowledges every frame at once (parsing only the frame id for the ack)."""

    def submit(self, payload: bytes, identity) -> Future[Ack]:
        fut: Future[Ack] = Future()
        fut.set_result(Ack(parse_frame(payload).frame_id, AckStatus.STORED))
        return fut


def make_payloads(n: int, seed: str = "") -> list[tuple[str, bytes]]:
    """n frames as an agent sends them: the COCO images encoded by the agent's own encoder
    (JPEG quality 90, longest side 640), 5 boxes each, every frame with its own id."""
    import cv2

    from edge_agent.encoding import encode_frame

    images = sorted((ROOT.parent / "shared" / "data" / "coco8" / "images").rglob("*.jpg"))
    encoded = [encode_frame(cv2.imread(str(p)), [], quality=90, max_side=640) for p in images]
    frames = []
    for i in range(n):
        enc = encoded[i % len(encoded)]
        boxes = [(10 + 40 * k, 10, 40 + 40 * k, 60) for k in range(5)]
        frames.append(make_frame(i, device=DEVICE, image=enc.data, width=enc.width, height=enc.height, boxes=boxes))
    return frames


def send_all(transport, payloads: list[tuple[str, bytes]]) -> float:
    """Send everything in batches until every frame is acknowledged; returns the seconds it took."""
    pending = dict(payloads)
    t0 = time.perf_counter()
    while pending:
        batch = list(pending.items())[:BATCH]
        for ack in transport.send(batch):
            if ack.durable:
                pending.pop(ack.frame_id, None)
    return time.perf_counter() - t0


def _client(kind: str, port: int, n: int, seed: str, ready, go, out) -> None:
    """One device, in its own process as in a deployment (agents run elsewhere)."""
    payloads = make_payloads(n, seed)
    if kind == "grpc":
        from edge_agent.transports.grpc import GrpcTransport, GrpcTransportConfig

        transport = GrpcTransport(GrpcTransportConfig(target=f"127.0.0.1:{port}", deadline_s=120), DEVICE)
    else:
        from edge_agent.transports.mqtt import MqttTransport, MqttTransportConfig

        transport = MqttTransport(MqttTransportConfig(port=port, ack_timeout_s=30, client_id=f"agent-{seed}"), DEVICE)
    try:
        ready.put(seed)
        go.wait()  # every device starts sending at once
        out.put(send_all(transport, payloads))
    finally:
        transport.close()


def run_clients(kind: str, port: int, n: int, clients: int) -> float:
    """``clients`` devices send ``n`` frames between them; returns frames/s over the slowest one's time."""
    ctx = mp.get_context("spawn")  # fresh interpreters: no threads or sockets inherited from the server
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    per = n // clients
    procs = [
        ctx.Process(target=_client, args=(kind, port, per, uuid.uuid4().hex[:8], ready, go, out))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=600)
    go.set()
    elapsed = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(60)
    return per * clients / max(elapsed)


def grpc_round(ingestor, n: int, clients: int) -> float:
    from server.ingest.grpc_service import GrpcServerConfig, IngestServicer, build_grpc_server
    from server.ingest.heartbeats import HeartbeatStore
    from server.metrics import ServerMetrics

    servicer = IngestServicer(ingestor, metrics=ServerMetrics(), heartbeats=HeartbeatStore(None))
    server, port = build_grpc_server(GrpcServerConfig(port=0), [servicer.add_to_server])
    server.start()
    try:
        return run_clients("grpc", port, n, clients)
    finally:
        server.stop(1).wait()


def mqtt_round(ingestor, n: int, broker, clients: int) -> float:
    from server.ingest.heartbeats import HeartbeatStore
    from server.ingest.mqtt_bridge import MqttBridge, MqttBridgeConfig
    from server.metrics import ServerMetrics

    group = f"bench-{uuid.uuid4().hex[:6]}"
    bridge = MqttBridge(
        MqttBridgeConfig(enabled=True, port=broker.port, shared_group=group, client_id_prefix=group),
        ingestor,
        metrics=ServerMetrics(),
        heartbeats=HeartbeatStore(None),
    ).start()
    bridge.wait_ready(10)
    try:
        return run_clients("mqtt", broker.port, n, clients)
    finally:
        bridge.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=1, help="devices sending at once, each in its own process")
    ap.add_argument(
        "--decode", choices=["full", "header"], default="full", help="validation.decode_images of the stored path"
    )
    ap.add_argument("--write", type=Path, default=None, help="Append the result table to this markdown file.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from server.store.mongo import MongoConfig, MongoManager, configure_fiftyone

        mongo = MongoManager(MongoConfig(db_dir=work / "mongo"))
        uri = mongo.ensure_running()
        configure_fiftyone(uri, work / "fiftyone")
        from server.ingest.base import AllowAllDevices
        from server.ingest.core import IngestCore
        from server.ingest.validation import ValidationConfig
        from server.metrics import ServerMetrics
        from server.store.inbox import Inbox, InboxConfig
        from server.store.media import LocalMediaStore
        from tests.fixtures.mosquitto import MosquittoBroker, _free_port

        broker_dir = work / "mosquitto"
        broker_dir.mkdir()
        broker = MosquittoBroker(workdir=broker_dir, port=_free_port(), extra_conf="max_inflight_messages 0\n").start()
        payloads = make_payloads(args.frames)
        size = sum(len(p) for _, p in payloads) / len(payloads)
        results: dict[str, list[float]] = {k: [] for k in ("grpc_noop", "grpc", "mqtt_noop", "mqtt", "fiftyone")}
        cores = []
        # One media store for every round, warmed up first: its 4,096 shard folders are created
        # (and fsync'd) on first use, which a long-running server has long done.
        media = LocalMediaStore(work / "media")
        media.put_many([(f"{i:04x}{'0' * 28}", b"warm-up", "jpg") for i in range(1 << 14)])

        # One core for every round, warmed up: its first batch imports half of FiftyOne's
        # dependencies, a one-time cost a running server has long paid.
        inbox = Inbox(InboxConfig(dataset=f"bench-{uuid.uuid4().hex[:8]}"))
        validation = ValidationConfig(decode_images=args.decode)
        core = IngestCore(media, inbox, AllowAllDevices(), validation, ServerMetrics(), batch_size=64)
        cores.append((core, inbox))
        from server.ingest.base import Identity

        for fut in [core.submit(p, Identity("grpc", None)) for _, p in make_payloads(128)]:
            fut.result()

        def real_core() -> IngestCore:
            return core

        try:
            for r in range(args.repeats):
                # Each client makes new frame ids: every round stores, none is a duplicate.
                results["grpc_noop"].append(grpc_round(NoopIngestor(), args.frames, args.clients))
                results["grpc"].append(grpc_round(real_core(), args.frames, args.clients))
                results["mqtt_noop"].append(mqtt_round(NoopIngestor(), args.frames, broker, args.clients))
                results["mqtt"].append(mqtt_round(real_core(), args.frames, broker, args.clients))
                inbox = Inbox(InboxConfig(dataset=f"bench-fo-{uuid.uuid4().hex[:8]}"))
                recs = [(parse_frame(p), work / f"x{i}.jpg") for i, (_, p) in enumerate(make_payloads(args.frames))]
                t0 = time.perf_counter()
                for i in range(0, len(recs), BATCH):
                    inbox.add_records(recs[i : i + BATCH])
                results["fiftyone"].append(len(recs) / (time.perf_counter() - t0))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in results.items()), flush=True)
        finally:
            for core, _inbox in cores:
                core.close()
            broker.stop()
            mongo.stop()

    med = {k: statistics.median(v) for k, v in results.items()}
    rows = [
        ("gRPC, no-op receiver", med["grpc_noop"], "1.000"),
        (
            f"gRPC, stored (validation with decode_images={args.decode}, group-committed media, journaled insert)",
            med["grpc"],
            f"{med['grpc'] / med['grpc_noop']:.3f}",
        ),
        ("MQTT via Mosquitto, no-op receiver", med["mqtt_noop"], "1.000"),
        (
            f"MQTT via Mosquitto, stored (decode_images={args.decode})",
            med["mqtt"],
            f"{med['mqtt'] / med['mqtt_noop']:.3f}",
        ),
        ("FiftyOne inbox alone (add_records, batches of 64)", med["fiftyone"], "-"),
    ]
    table = (
        f"### Server ingest ({time.strftime('%Y-%m-%d')})\n\n"
        f"`bench/ingest.py --frames {args.frames} --repeats {args.repeats} --clients {args.clients} "
        f"--decode {args.decode}`: {platform.machine()}, "
        f"{os.cpu_count()} cores; frames of {size / 1024:.0f} KB on average (the COCO images as the agent "
        f"encodes them: JPEG q90, longest side 640; 5 boxes), batches of {BATCH}; "
        f"{args.clients} client process(es), server, broker and bundled MongoDB on one machine; "
        f"medians of {args.repeats} alternating rounds.\n\n"
        "| path | frames/s | ratio to no-op on the same transport |\n|---|---:|---:|\n"
        + "".join(f"| {name} | {fps:.0f} | {ratio} |\n" for name, fps, ratio in rows)
    )
    print(table)
    if args.write:
        with args.write.open("a") as fh:
            fh.write("\n" + table)


if __name__ == "__main__":
    main()
