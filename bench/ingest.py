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
* ``--workers N``: the server side runs in N processes, as the server's ``workers: N`` does
  (gRPC sharing the port with SO_REUSEPORT, MQTT bridges in one shared group), for the no-op and
  the stored path alike.
* ``--connections k``: each gRPC device splits its batches over k connections (the agent's
  ``transport.connections``), for the no-op and the stored path alike.
* Where ``--workers`` or ``--connections`` change the defaults, the no-op also runs with the
  defaults (1 process, 1 connection), and the faster no-op is the baseline.

The client is the agent's own transport, sending batches of real frames (the COCO images as the
agent encodes them, ~100 KB).
The client runs in its own process, as an agent would; server, broker and MongoDB share the
machine's cores with it. Rounds alternate no-op and
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

    # EDGELOOP_BENCH_IMAGES: another folder of photos, e.g. on a machine without ../shared.
    folder = os.environ.get("EDGELOOP_BENCH_IMAGES") or ROOT.parent / "shared" / "data" / "coco8" / "images"
    images = sorted(Path(folder).rglob("*.jpg"))
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


def file_create_us(folder: Path, n: int = 256) -> float:
    """Mean microseconds to create (and close) an empty file in a new subfolder of ``folder``."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=folder))
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(probe / f"{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - t0) / n * 1e6


#: File creation slower than this (microseconds) means the file system is still "settling".
SETTLED_CREATE_US = 100.0


def settle_file_system(folder: Path, max_wait_s: float = 420.0) -> float:
    """Wait until creating files in ``folder`` is fast again; returns the last probe (microseconds).

    ext4 without a journal (this VM's root file system) does not reuse an inode for 60 s after
    it was freed (360 s while its inode table block is dirty): creating a file then scans past
    every such inode of the block group (``recently_deleted`` in fs/ext4/ialloc.c). After a run
    that deleted thousands of files (a test suite, the previous benchmark's temporary folder),
    every create costs up to ~750 us instead of ~15 us for minutes, which would be charged to the
    stored path. So: flush (the window is shortest for written-out inode tables), then probe,
    and wait while creates are slow. Probe files are left in place: deleting them would restart
    the window.
    """
    os.sync()
    deadline = time.monotonic() + max_wait_s
    while (us := file_create_us(folder)) > SETTLED_CREATE_US and time.monotonic() < deadline:
        print(f"file creation takes {us:.0f} us (recently deleted inodes); waiting for the file system", flush=True)
        time.sleep(20)
        os.sync()
    return us


class CpuMeter:
    """CPU seconds per frame of each role taking part in a round (one process, or several summed,
    e.g. the server's workers), and how busy the machine was."""

    def __init__(self, pids: dict[str, int | list[int] | None]) -> None:
        self.pids = {name: pid if isinstance(pid, list) else [pid] for name, pid in pids.items() if pid}
        self.before = {name: self._cpu(pids) for name, pids in self.pids.items()}
        self.machine = _machine_busy()

    @staticmethod
    def _cpu(pids: list[int]) -> float:
        return sum(_cpu_seconds(pid) for pid in pids)

    def per_frame_us(self, frames: int, clients_cpu: float) -> dict[str, float]:
        busy, total = _machine_busy()
        out = {name: (self._cpu(pids) - self.before[name]) / frames * 1e6 for name, pids in self.pids.items()}
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


def _client(kind: str, port: int, n: int, seed: str, ready, go, out, connections: int = 1) -> None:
    """One device, in its own process as in a deployment (agents run elsewhere)."""
    payloads = make_payloads(n, seed)
    if kind == "grpc":
        from edge_agent.transports.grpc import GrpcTransport, GrpcTransportConfig

        config = GrpcTransportConfig(target=f"127.0.0.1:{port}", deadline_s=120, connections=connections)
        transport = GrpcTransport(config, DEVICE)
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
#: The extra server processes (``--workers``), counted as the server.
WORKER_PIDS: list[int] = []
#: Per round: CPU microseconds per frame by process, and the machine's busy fraction.
CPU_LOG: list[tuple[str, dict[str, float]]] = []


def run_clients(kind: str, port: int, n: int, clients: int, label: str = "", connections: int = 1) -> float:
    """``clients`` devices send ``n`` frames between them (gRPC: each over ``connections``
    connections); returns frames/s over the slowest one's time."""
    ctx = mp.get_context("spawn")  # fresh interpreters: no threads or sockets inherited from the server
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    per = n // clients
    procs = [
        ctx.Process(target=_client, args=(kind, port, per, uuid.uuid4().hex[:8], ready, go, out, connections))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=600)
    meter = CpuMeter({"server": [os.getpid(), *WORKER_PIDS], **WATCHED})
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    CPU_LOG.append((label or kind, meter.per_frame_us(per * clients, sum(cpu for _, cpu in results))))
    for proc in procs:
        proc.join(60)
    return per * clients / max(elapsed for elapsed, _ in results)


def _label(kind: str, ingestor, plain: bool) -> str:
    label = f"{kind}_noop" if isinstance(ingestor, NoopIngestor) else kind
    return f"{label}_plain" if plain else label


def start_grpc(ingestor, port: int, reuse_port: bool) -> tuple[object, int]:
    from server.ingest.grpc_service import GrpcServerConfig, IngestServicer, build_grpc_server
    from server.ingest.heartbeats import HeartbeatStore
    from server.metrics import ServerMetrics

    servicer = IngestServicer(ingestor, metrics=ServerMetrics(), heartbeats=HeartbeatStore(None))
    server, port = build_grpc_server(GrpcServerConfig(port=port), [servicer.add_to_server], reuse_port=reuse_port)
    server.start()
    return server, port


def start_bridge(ingestor, broker_port: int, group: str, client_prefix: str):
    from server.ingest.heartbeats import HeartbeatStore
    from server.ingest.mqtt_bridge import MqttBridge, MqttBridgeConfig
    from server.metrics import ServerMetrics

    bridge = MqttBridge(
        MqttBridgeConfig(enabled=True, port=broker_port, shared_group=group, client_id_prefix=client_prefix),
        ingestor,
        metrics=ServerMetrics(),
        heartbeats=HeartbeatStore(None),
    ).start()
    bridge.wait_ready(10)
    return bridge


class Workers:
    """Server processes 1..N-1 (``--workers``), as ``server.workers`` runs them: each with its own
    ingest core on the same media store and dataset, serving the round's transport beside this
    process (gRPC on the same port with SO_REUSEPORT, MQTT in the same shared group)."""

    def __init__(self, n: int, uri: str, work: Path, dataset: str, decode: str, batch_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for index in range(1, n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(index, uri, str(work), dataset, decode, batch_size, theirs))
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if conn.recv() != "ready":
                raise RuntimeError(f"bench worker {proc.name} failed")
            WORKER_PIDS.append(proc.pid)

    def up(self, kind: str, noop: bool, port: int, group: str = "") -> None:
        for conn in self.conns:
            conn.send((kind, noop, port, group))
        for conn in self.conns:
            assert conn.recv() == "up"

    def down(self) -> None:
        for conn in self.conns:
            conn.send("down")
        for conn in self.conns:
            assert conn.recv() == "down"

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(60)
        WORKER_PIDS.clear()


def _worker(index: int, uri: str, work: str, dataset: str, decode: str, batch_size: int, conn) -> None:
    from server.store.mongo import configure_fiftyone

    configure_fiftyone(uri, Path(work) / "fiftyone")
    core = _make_core(Path(work), dataset, decode, batch_size)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        kind, noop, port, group = msg
        ingestor = NoopIngestor() if noop else core
        if kind == "grpc":
            server, _ = start_grpc(ingestor, port, reuse_port=True)
        else:
            bridge = start_bridge(ingestor, port, group, f"{group}-w{index}")
        conn.send("up")
        assert conn.recv() == "down"
        if kind == "grpc":
            server.stop(1).wait()
        else:
            bridge.stop()
        conn.send("down")
    core.close()


def _make_core(work: Path, dataset: str, decode: str, batch_size: int):
    """An ingest core on the shared media store and dataset, warmed up (its first batch imports
    half of FiftyOne's dependencies, a one-time cost a running server has long paid) and with the
    start-up heap frozen, as ``edgeloop server run`` does."""
    from server.app import freeze_startup_heap
    from server.ingest.base import AllowAllDevices, Identity
    from server.ingest.core import IngestCore
    from server.ingest.validation import ValidationConfig
    from server.metrics import ServerMetrics
    from server.store.inbox import Inbox, InboxConfig
    from server.store.media import LocalMediaStore

    inbox = Inbox(InboxConfig(dataset=dataset))
    validation = ValidationConfig(decode_images=decode)
    core = IngestCore(
        LocalMediaStore(work / "media"), inbox, AllowAllDevices(), validation, ServerMetrics(), batch_size=batch_size
    )
    for fut in [core.submit(p, Identity("grpc", None)) for _, p in make_payloads(128, uuid.uuid4().hex[:8])]:
        fut.result()
    freeze_startup_heap()
    return core


def grpc_round(
    ingestor, n: int, clients: int, workers: Workers | None, connections: int = 1, plain: bool = False
) -> float:
    server, port = start_grpc(ingestor, 0, reuse_port=workers is not None)
    try:
        if workers is not None:
            workers.up("grpc", isinstance(ingestor, NoopIngestor), port)
        try:
            return run_clients("grpc", port, n, clients, _label("grpc", ingestor, plain), connections)
        finally:
            if workers is not None:
                workers.down()
    finally:
        server.stop(1).wait()


def mqtt_round(ingestor, n: int, broker, clients: int, workers: Workers | None, plain: bool = False) -> float:
    group = f"bench-{uuid.uuid4().hex[:6]}"
    bridge = start_bridge(ingestor, broker.port, group, group)
    try:
        if workers is not None:
            workers.up("mqtt", isinstance(ingestor, NoopIngestor), broker.port, group)
        try:
            return run_clients("mqtt", broker.port, n, clients, _label("mqtt", ingestor, plain))
        finally:
            if workers is not None:
                workers.down()
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
        "CPU per frame (microseconds, medians; `machine busy` is the share of all cores in use):\n\n"
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
    ap.add_argument(
        "--workers", type=int, default=1, help="server processes (the server's `workers`), for no-op and stored alike"
    )
    ap.add_argument(
        "--connections", type=int, default=1, help="gRPC connections per device (the agent's `connections`)"
    )
    ap.add_argument("--batch-size", type=int, default=64, help="the server's inbox.batch_size (its default: 64)")
    ap.add_argument(
        "--only", choices=["grpc", "mqtt"], default=None, help="Measure one transport (while working on it)"
    )
    ap.add_argument("--write", type=Path, default=None, help="Append the result table to this markdown file.")
    args = ap.parse_args()
    if args.only and args.write:
        ap.error("--write takes a full run: leave out --only")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from server.store.mongo import MongoConfig, MongoManager, configure_fiftyone

        mongo = MongoManager(MongoConfig(db_dir=work / "mongo"))
        uri = mongo.ensure_running()
        configure_fiftyone(uri, work / "fiftyone")
        from server.store.inbox import Inbox, InboxConfig
        from server.store.media import LocalMediaStore
        from tests.fixtures.mosquitto import MosquittoBroker, _free_port

        broker_dir = work / "mosquitto"
        broker_dir.mkdir()
        # Mosquitto queues at most 1,000 messages per client past its in-flight window and drops
        # the rest (the agents resend after their ack timeout): 8 devices sending batches of 256
        # to one bridge client exceed that. A deployment raises it too (deploy/README.md).
        conf = "max_inflight_messages 0\nmax_queued_messages 0\n"
        broker = MosquittoBroker(workdir=broker_dir, port=_free_port(), extra_conf=conf).start()
        WATCHED.update(mongod=mongo.running_pid(), broker=broker.process.pid if broker.process else None)
        payloads = make_payloads(args.frames)
        size = sum(len(p) for _, p in payloads) / len(payloads)
        keys = ["grpc_noop", "grpc", "mqtt_noop", "mqtt", "fiftyone"]
        # The no-op also runs with the defaults (1 process, 1 connection) where the run changes
        # them: those could make the no-op slower, and the baseline is the faster no-op.
        plain = {"grpc": args.workers > 1 or args.connections > 1, "mqtt": args.workers > 1}
        keys += [f"{kind}_noop_plain" for kind, extra in plain.items() if extra]
        results: dict[str, list[float]] = {k: [] for k in keys}
        # One media store for every round, warmed up first: its 4,096 shard folders are created
        # (and fsync'd) on first use, which a long-running server has long done.
        media = LocalMediaStore(work / "media")
        for i in range(1 << 14):
            media.write_new(f"{i:04x}{'0' * 28}", b"warm-up", "jpg")
        media.commit()
        create_us = settle_file_system(work)

        # One core per server process for every round (see _make_core).
        dataset = f"bench-{uuid.uuid4().hex[:8]}"
        core = _make_core(work, dataset, args.decode, args.batch_size)
        workers = Workers(args.workers, uri, work, dataset, args.decode, args.batch_size) if args.workers > 1 else None

        try:
            for r in range(args.repeats):
                # Each client makes new frame ids: every round stores, none is a duplicate.
                if args.only != "mqtt":
                    for ingestor in (NoopIngestor(), core):
                        key = "grpc" if ingestor is core else "grpc_noop"
                        results[key].append(grpc_round(ingestor, args.frames, args.clients, workers, args.connections))
                if args.only != "grpc":
                    results["mqtt_noop"].append(mqtt_round(NoopIngestor(), args.frames, broker, args.clients, workers))
                    results["mqtt"].append(mqtt_round(core, args.frames, broker, args.clients, workers))
                if plain["grpc"] and args.only != "mqtt":
                    noop = grpc_round(NoopIngestor(), args.frames, args.clients, None, connections=1, plain=True)
                    results["grpc_noop_plain"].append(noop)
                if plain["mqtt"] and args.only != "grpc":
                    results["mqtt_noop_plain"].append(
                        mqtt_round(NoopIngestor(), args.frames, broker, args.clients, None, plain=True)
                    )
                inbox = Inbox(InboxConfig(dataset=f"bench-fo-{uuid.uuid4().hex[:8]}"))
                recs = [(parse_frame(p), work / f"x{i}.jpg") for i, (_, p) in enumerate(make_payloads(args.frames))]
                t0 = time.perf_counter()
                for i in range(0, len(recs), BATCH):
                    inbox.add_records(recs[i : i + BATCH])
                results["fiftyone"].append(len(recs) / (time.perf_counter() - t0))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in results.items() if v), flush=True)
        finally:
            if workers is not None:
                workers.close()
            core.close()
            broker.stop()
            mongo.stop()

    med = {k: statistics.median(v) for k, v in results.items() if v}
    if args.only:
        base = max(v for k, v in med.items() if k.startswith(f"{args.only}_noop"))
        print(f"{args.only}: stored {med[args.only]:.0f}/s, no-op {base:.0f}/s, ratio {med[args.only] / base:.3f}")
        print(cpu_table())
        return
    rows = []
    for kind, name in (("grpc", "gRPC"), ("mqtt", "MQTT via Mosquitto")):
        # Where the run changes the defaults the no-op runs both ways; the faster is the baseline.
        conns = f", {args.connections} connection(s) per device" if kind == "grpc" else ""
        noops = {f"{args.workers} process(es){conns}": med[f"{kind}_noop"]}
        if f"{kind}_noop_plain" in med:
            noops["1 process" + (", 1 connection per device" if kind == "grpc" else "")] = med[f"{kind}_noop_plain"]
        base = max(noops.values())
        for setup, fps in noops.items():
            rows.append((f"{name}, no-op receiver, {setup}", fps, f"{fps / base:.3f}"))
        stored = f"{name}, stored, {args.workers} process(es){conns} (decode_images={args.decode}, "
        rows.append((stored + "group-committed media, journaled insert)", med[kind], f"{med[kind] / base:.3f}"))
    rows.append(("FiftyOne inbox alone (add_records, batches of 64)", med["fiftyone"], "-"))
    table = (
        f"### Server ingest ({time.strftime('%Y-%m-%d')})\n\n"
        f"`bench/ingest.py --frames {args.frames} --repeats {args.repeats} --clients {args.clients} "
        f"--decode {args.decode} --workers {args.workers} --connections {args.connections} "
        f"--batch-size {args.batch_size}`: {platform.machine()}, "
        f"{os.cpu_count()} cores; frames of {size / 1024:.0f} KB on average (the COCO images as the agent "
        f"encodes them: JPEG q90, longest side 640; 5 boxes), batches of {BATCH}; "
        f"{args.clients} client process(es), {args.workers} server process(es) (no-op and stored alike), broker "
        f"and bundled MongoDB on one machine; file creation {create_us:.0f} us before the first round (settled); "
        f"medians of {args.repeats} alternating rounds.\n\n"
        "| path | frames/s | ratio to the faster no-op on the same transport |\n|---|---:|---:|\n"
        + "".join(f"| {name} | {fps:.0f} | {ratio} |\n" for name, fps, ratio in rows)
    )
    table += "\n" + cpu_table()
    emit(table, args.write)


if __name__ == "__main__":
    main()
