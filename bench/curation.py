"""Benchmark: curation's near-duplicate rule, its server-side embedding cost, and the batch pick's time.

    .venv/bin/python bench/curation.py [--model release.onnx] [--clips 4] [--clip-frames 30]
                                       [--write docs/benchmarks.md]

Without ``--model`` a detector is fine-tuned on the synthetic ``shapes`` world and prepared as a
release (embedding output and reference statistics), as ``bench/triggers.py`` does (cached in
``--workdir``). Then:

1. **Near-duplicates.** ``--clips`` synthetic video clips per scenario (five scenarios, a distinct
   scene each), every frame JPEG-encoded as the agent uploads it, embedded with the model and
   standardised with its reference statistics; distances in units of the reference q50 (also the
   embedding the agent computes before JPEG, to show how far the two lie apart). Reported:
   the embedding distance and the dHash bits between frames of one clip ``gap`` frames apart and
   between frames of different clips, and, for a grid of (distance, bits) rules, how many
   consecutive-frame pairs the rule misses and how many cross-clip pairs it wrongly calls
   near-duplicates. The default rule (0.75 q50 and 12 bits) is chosen from this table.
2. **Embedding cost on the server** per frame that needs it: reading the JPEG and hashing it, and
   the model's embedding (letterbox + ONNX Runtime, one thread), median over the clips' frames.
3. **Selection time** of :func:`server.curation.selection.select_batch` for a batch of 40 from
   300 and 3,000 candidates (448-d vectors) against 1,000 curated frames, median of 5 runs.
"""

from __future__ import annotations

import argparse
import itertools
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
from edge_agent.budget import dhash  # noqa: E402
from edgeloop.synth.scenarios import get_scenario  # noqa: E402
from edgeloop.synth.scenes import iter_video_frames  # noqa: E402
from server.curation.duplicates import FrameSet, NearDuplicateRule, hamming  # noqa: E402
from server.curation.embeddings import CurationSpace  # noqa: E402
from server.curation.selection import Pool, SelectionParams, select_batch  # noqa: E402

SCENARIOS = ["shapes", "shapes-night", "shapes-blur", "shapes-crowded", "shapes-shifted"]
GAPS = (1, 2, 3, 5, 10, 20)
RULE_GRID = list(itertools.product((0.6, 0.7, 0.75, 0.8, 1.0), (8, 12, 16)))
JPEG_QUALITY = 90  # the agent's default upload quality


def clips(space: CurationSpace, per_scenario: int, frames: int, tmp: Path):
    """Embedded, hashed frames of synthetic clips: {(clip, frame): (vector, hash)} plus timings."""
    reference = space.reference
    assert reference is not None, "the model has no reference statistics: prepare it"
    out, read_ms, embed_ms = {}, [], []
    tmp.mkdir(parents=True, exist_ok=True)
    clip = 0
    for si, scenario in enumerate(SCENARIOS):
        for c in range(per_scenario):
            for f, scene in enumerate(iter_video_frames(get_scenario(scenario), frames, seed=100 * si + c + 1)):
                path = tmp / f"{clip}-{f}.jpg"
                cv2.imwrite(str(path), scene.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                t0 = time.perf_counter()
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                h = dhash(image)
                t1 = time.perf_counter()
                vector = space._embed(image)
                t2 = time.perf_counter()
                read_ms.append((t1 - t0) * 1e3)
                embed_ms.append((t2 - t1) * 1e3)
                edge = space._embed(scene.image)  # what the agent computes, before JPEG
                out[(clip, f)] = (reference.project(vector) / reference.q50, h, reference.project(edge) / reference.q50)
            clip += 1
    return out, statistics.median(read_ms), statistics.median(embed_ms)


def near_duplicate_table(frames: dict, n_frames: int) -> str:
    keys = sorted(frames)
    vec = np.stack([frames[k][0] for k in keys])
    hashes = np.array([frames[k][1] for k in keys], dtype=np.uint64)
    d = np.sqrt(np.clip((vec**2).sum(1)[:, None] + (vec**2).sum(1)[None] - 2 * vec @ vec.T, 0, None))
    bits = hamming(hashes, hashes)
    clip_of = np.array([k[0] for k in keys])
    frame_of = np.array([k[1] for k in keys])
    same = clip_of[:, None] == clip_of[None, :]
    gap = np.abs(frame_of[:, None] - frame_of[None, :])
    upper = np.triu(np.ones_like(same), 1).astype(bool)
    rows = ["| pairs | distance (q50) min / median / max | dHash bits median / max |", "|---|---|---|"]
    for g in GAPS:
        if g >= n_frames:
            continue
        m = same & (gap == g) & upper
        rows.append(
            f"| same clip, {g} frame(s) apart ({m.sum()}) | {d[m].min():.2f} / {np.median(d[m]):.2f} / "
            f"{d[m].max():.2f} | {np.median(bits[m]):.0f} / {bits[m].max()} |"
        )
    edge = np.stack([frames[k][2] for k in keys])
    noise = np.linalg.norm(edge - vec, axis=1)
    across = np.sqrt(np.clip((edge**2).sum(1)[:, None] + (vec**2).sum(1)[None] - 2 * edge @ vec.T, 0, None))
    m = same & (gap == 1)
    rows.append(
        f"| same frame, edge-sent vs server-computed embedding ({len(keys)}) | {noise.min():.2f} / "
        f"{np.median(noise):.2f} / {noise.max():.2f} | - |"
    )
    rows.append(
        f"| same clip, 1 frame apart, edge-sent vs server-computed ({m.sum()}) | {across[m].min():.2f} / "
        f"{np.median(across[m]):.2f} / {across[m].max():.2f} | - |"
    )
    cross = ~same & upper
    rows.append(
        f"| different clips ({cross.sum()}) | {d[cross].min():.2f} / {np.median(d[cross]):.2f} / "
        f"{d[cross].max():.2f} | {np.median(bits[cross]):.0f} / min {bits[cross].min()} |"
    )
    consecutive = same & (gap == 1) & upper
    grid = [
        "",
        "| rule: distance < (q50) and bits <= | consecutive pairs missed | cross-clip pairs called near-duplicates |",
        "|---|---|---|",
    ]
    for dist, max_bits in RULE_GRID:
        dup = (d < dist) & (bits <= max_bits)
        grid.append(
            f"| {dist} and {max_bits} | {int((consecutive & ~dup).sum())} of {int(consecutive.sum())} | "
            f"{int((cross & dup).sum())} of {int(cross.sum())} |"
        )
    return "\n".join(rows + grid)


def selection_times(dim: int = 448, curated: int = 1000) -> list[tuple[int, float]]:
    rng = np.random.default_rng(0)
    out = []
    for n in (300, 3000):
        vectors = rng.normal(0, 1, (n, dim)).astype(np.float32)
        pool = Pool(
            FrameSet(vectors, rng.integers(0, 2**63, n, dtype=np.uint64)),
            {"box": rng.uniform(0, 1, n), "flicker": rng.uniform(0, 1, n) * (rng.uniform(0, 1, n) < 0.2)},
            [f"cam-{i % 5}" for i in range(n)],
            [frozenset({("circle", "square", "triangle", "")[i % 4]}) for i in range(n)],
            np.arange(n, dtype=np.float64) * 0.2,
        )
        seen = {
            "training set": FrameSet(
                rng.normal(0, 1, (curated, dim)).astype(np.float32), rng.integers(0, 2**63, curated, dtype=np.uint64)
            )
        }
        params = SelectionParams(size=40, class_cap=0.4, rule=NearDuplicateRule(0.75 * 20, 12), scale=20.0)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            select_batch(pool, seen, params)
            runs.append(time.perf_counter() - t0)
        out.append((n, statistics.median(runs) * 1e3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="A prepared release ONNX (default: train one).")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".edgeloop" / "bench-curation")
    parser.add_argument("--clips", type=int, default=4, help="Clips per scenario.")
    parser.add_argument("--clip-frames", type=int, default=30)
    parser.add_argument("--write", type=Path, help="Append the tables to this markdown file.")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from bench.triggers import build_model

        model = build_model(args.workdir, epochs=15, imgsz=320, n_train=200, seed=0)
    space = CurationSpace(model, threads=1)
    frames, read_ms, embed_ms = clips(space, args.clips, args.clip_frames, args.workdir / "frames")
    times = selection_times(space.dim)
    table = "\n".join(
        [
            f"## Curation: near-duplicates, embedding cost, selection time ({platform.machine()}, "
            f"{len(frames)} frames of {args.clips * len(SCENARIOS)} clips, model {model.name})",
            "",
            near_duplicate_table(frames, args.clip_frames),
            "",
            "| cost on the server, per frame | median |",
            "|---|---|",
            f"| read the JPEG (640x480) and dHash it | {read_ms:.1f} ms |",
            f"| embedding ({space.detector.input_size[1]} px input, 1 ORT thread) | {embed_ms:.1f} ms |",
            *[f"| select 40 of {n} candidates (vs 1,000 curated, {space.dim}-d) | {ms:.0f} ms |" for n, ms in times],
            "",
        ]
    )
    emit(table, args.write)


if __name__ == "__main__":
    main()
