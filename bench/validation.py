"""Benchmark: the ingest server's image check per frame, structural JPEG check vs a full decode.

    .venv/bin/python bench/validation.py [--repeats 5] [--write docs/benchmarks.md]

Frames are the COCO images as the agent encodes them (JPEG quality 90, longest side 640), once
baseline and once progressive. Each round times, on the same frames, ``check_jpeg`` (what
``validation.decode_images: structure`` runs) and ``cv2.imdecode(..., IMREAD_GRAYSCALE)`` (what
``full`` runs), alternating so that machine noise hits both; the table gives medians of the
per-round means and their ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from edge_agent.encoding import encode_frame  # noqa: E402
from server.ingest.jpeg_structure import check_jpeg  # noqa: E402

GRAY = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION


def frames() -> dict[str, list[bytes]]:
    images = [cv2.imread(str(p)) for p in sorted((ROOT.parent / "shared" / "data" / "coco8" / "images").rglob("*.jpg"))]
    baseline = [encode_frame(img, [], quality=90, max_side=640).data for img in images]
    progressive = [
        bytes(
            cv2.imencode(
                ".jpg",
                cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
                [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
            )[1]
        )
        for b in baseline
    ]
    return {"baseline": baseline, "progressive": progressive}


def mean_seconds(fn, data: list[bytes], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        for d in data:
            fn(d)
    return (time.perf_counter() - start) / (loops * len(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", type=Path, default=None, help="Append the result table to this markdown file.")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    rows = []
    for kind, data in frames().items():
        size = sum(map(len, data)) / len(data)
        checks, decodes = [], []
        for _ in range(args.repeats):
            checks.append(mean_seconds(check_jpeg, data, 50))
            decodes.append(mean_seconds(lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), GRAY), data, 5))
        check, decode = statistics.median(checks), statistics.median(decodes)
        rows.append((kind, size, check, decode))
        print(f"{kind}: {size / 1024:.0f} KB, check {check * 1e6:.0f} us, decode {decode * 1e6:.0f} us", flush=True)
    table = (
        f"### Frame image check ({time.strftime('%Y-%m-%d')})\n\n"
        f"`bench/validation.py --repeats {args.repeats}`: {platform.machine()}, {os.cpu_count()} cores, one thread; "
        "the 8 coco8 images as the agent encodes them (q90, longest side 640); medians of per-round means.\n\n"
        "| frames | mean size | structure check (`check_jpeg`) | full decode (`cv2.imdecode` gray) | decode / check |\n"
        "|---|---:|---:|---:|---:|\n"
        + "".join(
            f"| {kind} | {size / 1024:.0f} KB | {check * 1e6:.0f} us | {decode * 1e6:.0f} us "
            f"| {decode / check:.1f}x |\n"
            for kind, size, check, decode in rows
        )
    )
    emit(table, args.write)


if __name__ == "__main__":
    main()
