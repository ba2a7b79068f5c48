"""Benchmark: the server's peak memory when ten devices send large or lying images at once.

    .venv/bin/python bench/decode_memory.py [--write docs/reliability.md]

Runs the real server (``tests/fixtures/hardened_server.py``: mutual TLS, a bundled MongoDB) and,
from ten devices at once (one gRPC stream each), sends:

* the decompression bomb of the fuzz corpus: ~10 KB of lossless WebP declaring 160x120 and
  holding 16383x16383 pixels (decoding it takes ~1 GB);
* ten honest 4000x4000 (16 MP) WebPs, which validation decodes to check them, with the decode
  budget at 16 MP (one decode at a time) and with it out of the way (a budget of 1,000 MP).

For each it resets the server process's peak resident memory (``/proc/PID/clear_refs``) and
reports how far ``VmHWM`` rose above the resident memory before the burst. The bound the test
holds (``tests/test_server_hardening.py``) is 8 bytes per pixel of the budget plus 64 MB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bench.fuzz_ingest import bomb_image, load_corpus  # noqa: E402
from bench.report import emit  # noqa: E402
from edgeloop.convert import serialize_frame  # noqa: E402

DEVICES = tuple(f"mem-{i}" for i in range(10))
PIXELS = 16_000_000


def _frames(image: bytes, width: int, height: int) -> list[bytes]:
    import dataclasses

    seed = load_corpus()["jpeg-640x480"]
    return [
        serialize_frame(
            dataclasses.replace(
                seed,
                frame_id=uuid.uuid4().hex,
                device_id=d,
                image=image,
                media_type="image/webp",
                width=width,
                height=height,
                detections=[],
            )
        )
        for d in DEVICES
    ]


def _burst(stack, payloads: list[bytes]) -> tuple[int, list[str]]:
    """Send each payload from its own device at once; the peak RSS rise (bytes) and the verdicts."""
    channels = [stack.channel(d) for d in DEVICES]
    verdicts: list[str] = [""] * len(payloads)
    start = threading.Barrier(len(payloads))

    def send(i: int) -> None:
        start.wait()
        result = stack.upload([payloads[i]], channel=channels[i])
        verdicts[i] = result.acks[0].status if result.acks else str(result.code)

    stack.reset_peak_rss()
    base = stack.rss()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stack.peak_rss() - base, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="Append the result table to this markdown file.")
    args = parser.parse_args()
    from server.store.mongo import MongoConfig, MongoManager
    from tests.fixtures.hardened_server import ServerStack

    ok, buf = cv2.imencode(".webp", np.zeros((4000, 4000, 3), np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert ok
    honest = buf.tobytes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeloop-decode-") as tmp:
        manager = MongoManager(MongoConfig(db_dir=Path(tmp) / "mongo", cache_size_gb=0.25))
        uri = manager.ensure_running()
        try:
            for budget in (PIXELS, 1_000_000_000):
                stack = ServerStack(
                    Path(tmp) / f"stack-{budget}",
                    uri,
                    DEVICES,
                    overrides={"validation": {"max_image_pixels": PIXELS, "max_decode_pixels": budget}},
                )
                stack.start()
                try:
                    time.sleep(2.0)  # let start-up settle
                    if budget == PIXELS:
                        rise, verdicts = _burst(stack, _frames(bomb_image(), 160, 120))
                        rows.append(("ten WebP bombs (16383x16383 in 10 KB, declared 160x120)", budget, rise, verdicts))
                    rise, verdicts = _burst(stack, _frames(honest, 4000, 4000))
                    rows.append(("ten honest 4000x4000 WebPs", budget, rise, verdicts))
                finally:
                    stack.stop()
        finally:
            manager.stop()
    lines = [
        "### Peak memory of the server, ten devices at once",
        "",
        "| burst | decode budget (pixels) | peak RSS rise | bound (8 B/px + 64 MB) | verdicts |",
        "|---|---:|---:|---:|---|",
    ]
    for name, budget, rise, verdicts in rows:
        bound = f"{(8 * budget + 64 * 2**20) / 1e6:.0f} MB" if budget < 10**9 else "none"
        lines.append(f"| {name} | {budget:,} | {rise / 1e6:.0f} MB | {bound} | {', '.join(sorted(set(verdicts)))} |")
    emit("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
