"""Benchmark: the edge agent's frames/s through source, detect, score and enqueue, against raw
ONNX Runtime inference on the same frames in the same run.

    .venv/bin/python bench/edge_agent.py [--frames 200] [--repeats 3] [--write docs/benchmarks.md]

* raw: letterbox + ``session.run`` on frames already decoded in memory (nothing else), with the
  session settings the agent uses (ORT's worker threads do not spin between operators), and, for
  reference, with ORT's default spinning threads: faster alone, but they take the cores the
  agent's reading, scoring and encoding threads need.
* agent: ``Agent.run`` over an image folder on disk: JPEG decode, detection (pre, infer, post),
  uncertainty triggers, near-duplicate filter, JPEG encoding and a fsync'd outbox write for each
  kept frame; reading and scoring/encoding/enqueueing run in threads beside inference.
  Two trigger settings: the defaults (what a deployment keeps), and keep-every-frame (the worst
  case: every frame is encoded and fsync'd).

Runs alternate (raw, agent, raw, agent, ...) so machine noise hits both; the ratio uses medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from edge_agent.app import Agent  # noqa: E402
from edge_agent.config import AgentConfig  # noqa: E402
from edge_agent.detectors import create_detector  # noqa: E402
from edge_agent.detectors.onnxruntime import OnnxRuntimeDetectorConfig  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "yolov8n_int8.onnx"
IMAGES = [
    *sorted((SHARED / "data/coco8/images/train").glob("*.jpg")),
    *sorted((SHARED / "data/coco8/images/val").glob("*.jpg")),
]


def make_folder(n: int, where: Path) -> Path:
    """n frames on disk, cycling through the COCO images (distinct names, real JPEGs)."""
    folder = where / "frames"
    folder.mkdir()
    for i in range(n):
        shutil.copy(IMAGES[i % len(IMAGES)], folder / f"{i:06d}.jpg")
    return folder


def run_raw(folder: Path, threads: int | None, spinning: bool = False) -> float:
    # spinning=False: the agent's session settings (its config default); True: ORT's own default.
    det = create_detector(OnnxRuntimeDetectorConfig(model=MODEL, intra_op_threads=threads, allow_spinning=spinning))
    frames = [cv2.imread(str(p)) for p in sorted(folder.iterdir())]
    det.infer(det.preprocess(frames[0])[0])  # warm-up
    t0 = time.perf_counter()
    for image in frames:
        tensor, _info = det.preprocess(image)
        det.infer(tensor)
    elapsed = time.perf_counter() - t0
    det.close()
    return len(frames) / elapsed


def run_agent(folder: Path, work: Path, threads: int | None, keep_all: bool) -> tuple[float, dict[str, int]]:
    outbox = work / f"outbox-{time.monotonic_ns()}.sqlite3"
    triggers = {"random": {"enabled": True, "rate": 1.0}} if keep_all else {}
    cfg = AgentConfig.model_validate(
        {
            "device_id": "bench",
            "source": {"uri": str(folder)},
            "detector": {"type": "onnxruntime", "model": str(MODEL), "intra_op_threads": threads},
            "triggers": triggers,
            "budget": {"dedup": {"enabled": not keep_all}},
            "outbox": {"path": str(outbox)},
            "metrics": {"enabled": False},
            "seed": 0,
        }
    )
    agent = Agent(cfg)
    first = cv2.imread(str(next(iter(sorted(folder.iterdir())))))
    agent.detector.detect(first)  # warm-up, as for raw
    t0 = time.perf_counter()
    counters = agent.run()
    elapsed = time.perf_counter() - t0
    agent.close()
    return counters["frames_read"] / elapsed, counters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    ap.add_argument("--write", type=Path, default=None, help="Append the result table to this markdown file.")
    args = ap.parse_args()
    if not MODEL.exists():
        sys.exit(f"{MODEL} not found: this benchmark needs ../shared beside the checkout")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = make_folder(args.frames, work)
        raw, raw_spin, default, keep = [], [], [], []
        counters_default = counters_keep = {}
        for r in range(args.repeats):
            raw.append(run_raw(folder, args.threads))
            raw_spin.append(run_raw(folder, args.threads, spinning=True))
            fps, counters_default = run_agent(folder, work, args.threads, keep_all=False)
            default.append(fps)
            fps, counters_keep = run_agent(folder, work, args.threads, keep_all=True)
            keep.append(fps)
            print(
                f"round {r + 1}: raw {raw[-1]:.2f} fps, raw (spinning) {raw_spin[-1]:.2f} fps, "
                f"agent {default[-1]:.2f} fps, agent keep-all {keep[-1]:.2f} fps"
            )

    med = statistics.median
    base, spin = med(raw), med(raw_spin)

    def kept(c: dict[str, int]) -> str:
        return f"{c['frames_enqueued']}/{c['frames_read']}"

    rows = [
        ("raw ONNX Runtime (letterbox + session.run, frames in memory), the agent's session settings", base, "-"),
        ("raw ONNX Runtime with ORT's default spinning threads", spin, "-"),
        (
            "agent, default triggers (decode, detect, score, dedup, encode, fsync'd enqueue)",
            med(default),
            kept(counters_default),
        ),
        ("agent, keep every frame (each frame encoded and fsync'd)", med(keep), kept(counters_keep)),
    ]
    head = (
        f"### Edge agent throughput ({time.strftime('%Y-%m-%d')})\n\n"
        f"`bench/edge_agent.py --frames {args.frames} --repeats {args.repeats}`: "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, model yolov8n_int8.onnx at 640, COCO images (coco8, cycled), "
        f"ORT intra-op threads: {args.threads or 'default'}; medians of {args.repeats} alternating rounds.\n\n"
        "| pipeline | frames/s | ratio to raw (same settings) | ratio to raw (ORT defaults) | enqueued/read |\n"
        "|---|---:|---:|---:|---:|\n"
    )
    table = head + "".join(
        f"| {name} | {fps:.2f} | {fps / base:.3f} | {fps / spin:.3f} | {k} |\n" for name, fps, k in rows
    )
    emit(table, args.write)


if __name__ == "__main__":
    main()
