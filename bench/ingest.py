"""Benchmark: frames/s stored by the server through gRPC and through MQTT, each against a no-op
receiver on the same transport in the same run, and FiftyOne samples/s on their own.

    .venv/bin/python bench/ingest.py [--frames 1000] [--repeats 3] [--write docs/benchmarks.md]

* no-op: the production transport (``IngestServicer`` / ``MqttBridge`` behind Mosquitto) with an
  ingestor that acknowledges at once: what the transport alone can carry.
* stored: the same transport with the real ``IngestCore``: validation (protobuf, the JPEG's
  structure or a full decode, boxes, classes), the media store (images group-committed with
  ``syncfs``), and the FiftyOne inbox on the bundled MongoDB with journaled writes; an ack only
  after both are durable.
* FiftyOne: ``Inbox.add_records`` in batches of 64, no transport, no media.

The client is the agent's own transport, sending batches of real frames (the COCO images as the
agent encodes them, ~100 KB).
The client runs in its own process, as an agent would; server, broker and MongoDB share the
machine's 2 cores with it. Rounds alternate no-op and
stored so that machine noise hits both; ratios use medians. Each round also records the CPU
each process spent per frame (Linux ``/proc``) and how busy the machine was: where the time goes.
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

from bench.report import emit  # noqa: E402
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc); 0 where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


class CpuMeter:
    """CPU seconds per frame of each process taking part in a round, and how busy the machine was."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.before = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        self.machine = _machine_busy()

    def per_frame_us(self, frames: int, clients_cpu: float) -> dict[str, float]:
        busy, total = _machine_busy()
        out = {name: (_cpu_seconds(pid) - self.before[name]) / frames * 1e6 for name, pid in self.pids.items()}
        out["client"] = clients_cpu / frames * 1e6
        out["machine_busy"] = (busy - self.machine[0]) / max(total - self.machine[1], 1e-9)
        return out


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
        cpu0 = time.process_time()
        elapsed = send_all(transport, payloads)
        out.put((elapsed, time.process_time() - cpu0))
    finally:
        transport.close()


#: Processes whose CPU each round accounts for, besides the clients (set in main()).
WATCHED: dict[str, int | None] = {}
#: Per round: CPU microseconds per frame by process, and the machine's busy fraction.
CPU_LOG: list[tuple[str, dict[str, float]]] = []


def run_clients(kind: str, port: int, n: int, clients: int, label: str = "") -> float:
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
    meter = CpuMeter({"server": os.getpid(), **WATCHED})
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    CPU_LOG.append((label or kind, meter.per_frame_us(per * clients, sum(cpu for _, cpu in results))))
    for proc in procs:
        proc.join(60)
    return per * clients / max(elapsed for elapsed, _ in results)


def _label(kind: str, ingestor) -> str:
    return f"{kind}_noop" if isinstance(ingestor, NoopIngestor) else kind


def grpc_round(ingestor, n: int, clients: int) -> float:
    from server.ingest.grpc_service import GrpcServerConfig, IngestServicer, build_grpc_server
    from server.ingest.heartbeats import HeartbeatStore
    from server.metrics import ServerMetrics

    servicer = IngestServicer(ingestor, metrics=ServerMetrics(), heartbeats=HeartbeatStore(None))
    server, port = build_grpc_server(GrpcServerConfig(port=0), [servicer.add_to_server])
    server.start()
    try:
        return run_clients("grpc", port, n, clients, _label("grpc", ingestor))
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
        return run_clients("mqtt", broker.port, n, clients, _label("mqtt", ingestor))
    finally:
        bridge.stop()


def cpu_table() -> str:
    """Median CPU microseconds per frame by process, per path: where each path's time goes."""
    names = ["client", "server", "broker", "mongod"]
    labels = list(dict.fromkeys(label for label, _ in CPU_LOG))
    rows = []
    for label in labels:
        logs = [cpu for lab, cpu in CPU_LOG if lab == label]
        med = {k: statistics.median(log.get(k, 0.0) for log in logs) for k in [*names, "machine_busy"]}
        total = sum(med[k] for k in names)
        cells = " | ".join(f"{med[k]:.0f}" for k in names)
        rows.append(f"| {label} | {cells} | {total:.0f} | {med['machine_busy']:.0%} |\n")
    return (
        "CPU per frame (microseconds, medians; `machine busy` is the share of both cores in use):\n\n"
        "| path | client | server | broker | mongod | total | machine busy |\n|---|---:|---:|---:|---:|---:|---:|\n"
        + "".join(rows)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=1, help="devices sending at once, each in its own process")
    ap.add_argument(
        "--decode",
        choices=["structure", "full"],
        default="structure",
        help="validation.decode_images of the stored path (the server default: structure)",
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
        WATCHED.update(mongod=mongo.running_pid(), broker=broker.process.pid if broker.process else None)
        payloads = make_payloads(args.frames)
        size = sum(len(p) for _, p in payloads) / len(payloads)
        results: dict[str, list[float]] = {k: [] for k in ("grpc_noop", "grpc", "mqtt_noop", "mqtt", "fiftyone")}
        cores = []
        # One media store for every round, warmed up first: its 4,096 shard folders are created
        # (and fsync'd) on first use, which a long-running server has long done.
        media = LocalMediaStore(work / "media")
        for i in range(1 << 14):
            media.write_new(f"{i:04x}{'0' * 28}", b"warm-up", "jpg")
        media.commit()

        # One core for every round, warmed up: its first batch imports half of FiftyOne's
        # dependencies, a one-time cost a running server has long paid.
        inbox = Inbox(InboxConfig(dataset=f"bench-{uuid.uuid4().hex[:8]}"))
        validation = ValidationConfig(decode_images=args.decode)
        core = IngestCore(media, inbox, AllowAllDevices(), validation, ServerMetrics(), batch_size=64)
        cores.append((core, inbox))
        from server.ingest.base import Identity

        for fut in [core.submit(p, Identity("grpc", None)) for _, p in make_payloads(128)]:
            fut.result()
        from server.app import freeze_startup_heap

        freeze_startup_heap()  # as `edgeloop server run` does once started (no-op and stored rounds alike)

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
    table += "\n" + cpu_table()
    emit(table, args.write)


if __name__ == "__main__":
    main()
