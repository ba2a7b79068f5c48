"""Benchmark: `curate next-batch` wall time against the size of the inbox (1k, 10k, 100k frames).

    .venv/bin/python bench/next_batch.py [--sizes 1000,10000,100000] [--write docs/benchmarks.md]

Frames are uploaded through the real ingest path (gRPC over a loopback socket into the ingest
core, the media store and the FiftyOne inbox on a bundled MongoDB), as agents running the
curation model send them: 160x120 JPEGs of distinct synthetic content from 40 cameras, each with
its predictions (1-6 boxes), trigger reasons and the curation model's embedding (so the server
computes none). Then, per size, :meth:`Curation.next_batch` (``dry_run``: nothing is taken, so
every size is measured on the same inbox) twice: the first call hashes every frame it has not
seen (the dHash is computed on the server once, from the stored JPEG, then cached on the
sample); the second is what a curator waits for once that is done. Stages are timed apart:
reading the vectors, the selection itself, the rest.

The curation model is the shared COCO detector prepared with `edgeloop models prepare` (its
embedding output and reference statistics), as a registry release would be.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "yolov8n_int8.onnx"
CAMERAS = 40
CLASSES = ["person", "car", "dog"]
BATCH = 64


def prepare(work: Path) -> Path:
    from server.registry.prepare import prepare_model

    out = work / "curation-model.onnx"
    prepare_model(MODEL, out, sorted((SHARED / "data/coco8/images").rglob("*.jpg")))
    return out


def frames(n: int, start: int, space, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """``n`` frames as agents running the curation model send them (embedding included)."""
    from edge_agent.encoding import encode_frame
    from edgeloop.convert import serialize_frame
    from edgeloop.domain import Detection, FrameRecord, Reason

    out = []
    for i in range(start, start + n):
        image = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        image = cv2.resize(image, (160, 120), interpolation=cv2.INTER_LINEAR)  # smooth: a dHash that varies
        enc = encode_frame(image, [], quality=90, max_side=640)
        k = int(rng.integers(1, 7))
        dets = [
            Detection(box=(10.0 + 20 * j, 10.0, 30.0 + 20 * j, 40.0), class_id=j % 3, class_name=CLASSES[j % 3],
                      confidence=float(rng.uniform(0.25, 0.95)))
            for j in range(k)
        ]  # fmt: skip
        reasons = [Reason("confidence_band", float(rng.uniform(0.2, 0.99)), "bench")]
        if rng.uniform() < 0.2:
            reasons.append(Reason("flicker", float(rng.uniform(0.1, 0.9)), "bench"))
        record = FrameRecord(
            frame_id=f"nb-{uuid.uuid4().hex[:12]}-{i}",
            device_id=f"cam-{i % CAMERAS:02d}",
            capture_time=1.8e9 + (i // CAMERAS) * 0.2,
            sequence=i // CAMERAS,
            model_version=space.model_version,
            image=enc.data,
            media_type=enc.media_type,
            width=enc.width,
            height=enc.height,
            detections=dets,
            uncertainty=float(rng.uniform(0.2, 1.0)),
            reasons=reasons,
            class_names=CLASSES,
            embedding=rng.normal(0, 1, space.dim).astype(np.float32),
        )
        out.append((record.frame_id, serialize_frame(record)))
    return out


def upload(port: int, payloads: list[tuple[str, bytes]]) -> float:
    from bench.ingest import send_all
    from edge_agent.transports.grpc import GrpcTransport, GrpcTransportConfig

    transport = GrpcTransport(GrpcTransportConfig(target=f"127.0.0.1:{port}", deadline_s=300), "bench-fleet")
    try:
        return send_all(transport, payloads)
    finally:
        transport.close()


def timed_next_batch(curation) -> dict[str, float]:
    """Wall time of a dry-run next_batch, split into reading vectors, selecting, and the rest."""
    import server.curation.service as service

    spent = {"vectors": 0.0, "select": 0.0}
    real_vectors, real_select = curation.space.vectors, service.select_batch

    def vectors(collection):
        t0 = time.perf_counter()
        try:
            return real_vectors(collection)
        finally:
            spent["vectors"] += time.perf_counter() - t0

    def select(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_select(*args, **kwargs)
        finally:
            spent["select"] += time.perf_counter() - t0

    curation.space.vectors, service.select_batch = vectors, select
    try:
        t0 = time.perf_counter()
        result = curation.next_batch(40, dry_run=True)
        total = time.perf_counter() - t0
    finally:
        curation.space.vectors, service.select_batch = real_vectors, real_select
    assert len(result.batch.sample_ids) == 40, result.warnings
    return {"total": total, **spent, "rest": total - spent["vectors"] - spent["select"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="Inbox sizes, ascending, comma-separated.")
    parser.add_argument("--write", type=Path, help="Append the table to this markdown file.")
    parser.add_argument("--workdir", type=Path, help="Keep the work here (default: a temporary folder).")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgeloop-next-batch-"))
    work.mkdir(parents=True, exist_ok=True)

    from bench.ingest import start_grpc
    from server.curation.config import CurationConfig
    from server.curation.embeddings import CurationSpace
    from server.curation.service import Curation
    from server.ingest.base import AllowAllDevices
    from server.ingest.core import IngestCore
    from server.ingest.validation import ValidationConfig
    from server.metrics import ServerMetrics
    from server.store.inbox import Inbox, InboxConfig
    from server.store.media import LocalMediaStore
    from server.store.mongo import MongoConfig, MongoManager, configure_fiftyone

    mongo = MongoManager(MongoConfig(db_dir=work / "mongo"))
    configure_fiftyone(mongo.ensure_running(), work / "fiftyone")
    rows = []
    try:
        model = prepare(work)
        space = CurationSpace(model, threads=1)
        dataset = f"bench-next-batch-{uuid.uuid4().hex[:6]}"
        inbox = Inbox(InboxConfig(dataset=dataset))
        core = IngestCore(LocalMediaStore(work / "media"), inbox, AllowAllDevices(), ValidationConfig(),
                          ServerMetrics(), batch_size=BATCH)  # fmt: skip
        server, port = start_grpc(core, 0, reuse_port=False)
        config = CurationConfig(root=work / "curation", training_dataset=f"{dataset}-train", model={"path": model})
        curation = Curation(config, inbox_dataset=dataset, space=space)
        rng = np.random.default_rng(0)
        have = 0
        for size in sizes:
            t0 = time.perf_counter()
            while have < size:
                chunk = min(5000, size - have)
                upload(port, frames(chunk, have, space, rng))
                have += chunk
            uploaded = time.perf_counter() - t0
            first = timed_next_batch(curation)
            again = timed_next_batch(curation)
            rows.append((size, uploaded, first, again))
            print(f"{size}: upload {uploaded:.0f} s, first {first}, again {again}", flush=True)
        server.stop(1).wait()
        core.close()
    finally:
        mongo.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"## Curation: `next-batch` against the inbox size ({platform.machine()}, {CAMERAS} cameras, "
        f"batch of 40, embeddings sent by the edge)",
        "",
        "| inbox frames | upload (gRPC, s) | first next-batch (hashes every new frame) | once hashed: total | "
        "reading vectors | selection | rest |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, uploaded, first, again in rows:
        lines.append(
            f"| {size:,} | {uploaded:.0f} | {first['total']:.1f} s | {again['total']:.1f} s | "
            f"{again['vectors']:.1f} s | {again['select']:.1f} s | {again['rest']:.1f} s |"
        )
    emit("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
