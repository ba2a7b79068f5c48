"""Benchmark: how many labels does edgeloop's selection save against labelling random frames?

    .venv/bin/python bench/active_learning.py --data DATA.yaml|synthetic --seeds 3 --rounds 4 \\
        --per-round 40 --out results.json [--pool camera|iid|both] [--quick] [--plot out.png]

Same pool, same seed model, same training budget, same labels per round, for each strategy:

* ``edgeloop``: the edge agent's own detector and triggers score every pool frame (a camera's
  frames in order, as a stream); the frames the agent would keep are the candidates, and the
  product's batch selection, unchanged (``server.curation.selection``: episodes, calibrated score,
  allocation by need, coverage, class balance), picks the round's labels from them;
* baselines: ``random`` (uniform over the unlabelled stream), ``every-nth`` (every Nth frame of
  the stream, what most teams do), ``random-dedup`` (random after removing near-duplicates of each
  other and of the labelled set with the product's rule: what a careful team does);
* ablations: ``edgeloop-no-diversity`` (the same candidates, top by the edge's score),
  ``edgeloop-no-quotas`` (the selection with every frame on one camera);
* upper bounds: ``oracle-error`` (the frames where the current model makes the most errors
  against truth, de-duplicated) and ``oracle-world`` (knows which frames are shifted).

Each round the oracle labels the chosen frames from the data set's truth; a model is fine-tuned
from the same start every round (the seed model; backbone frozen) on every label so far, so a
round's mAP does not depend on the path, and scored on the frozen test split (mAP50 and
mAP50-95, ultralytics' validator; synthetic: also per world). The summary gives, against each
baseline, the labels edgeloop needs to reach its final mAP50-95 and the per-seed paired
difference of the areas under the labels-mAP curves with a 95% t-interval. Settings are chosen
on seeds 0-2 (``--first-seed 0 --seeds 3``) and reported on others (``--first-seed 3``).

Pools, both reported:

* ``camera``: camera-like streams. For ``synthetic``: cameras watching moving objects (a new scene
  every 10 frames), most in the world the seed model knows (``shapes``), a minority in shifted
  worlds (night, new looks, crowds); consecutive frames are near-duplicates. For a real data set
  (``--data``): each training photo becomes a short clip of jittered frames (small shifts and
  zooms; ``edgeloop.synth.photo_stream``), long clips for photos of the common classes and short
  ones for photos with a rare class, so the stream is mostly what the model handles already and
  a minority is what it needs.
* ``iid``: the training photos (or synthetic stills of the same worlds) once each, shuffled: here
  parity with random is the honest expectation.

The seed model is fine-tuned from the pretrained base checkpoint (../shared/models/
yolov8n_coco_dequant.pt) on a small random share of the training data (for ``synthetic``: stills of
the known world only). ``results.json`` holds, per pool, strategy and seed, the labels used and
test mAP50 / mAP50-95 after each round, and the summary: the labels edgeloop needs to reach
random's final mAP50-95.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeloop.synth.scenarios import get_scenario  # noqa: E402
from edgeloop.synth.scenes import format_labels, iter_camera_frames, iter_scenes  # noqa: E402
from edgeloop.yolo_dataset import YoloDataset, load_yolo_dataset  # noqa: E402

SHARED = ROOT.parent / "shared"
BASE_PT = SHARED / "models" / "yolov8n_coco_dequant.pt"
KNOWN_WORLD = "shapes"
#: Folder beside test.yaml with one data.yaml per world (synthetic only): per-world mAP.
WORLD_TESTS = "test-worlds"
SHIFTS = ["shapes-night", "shapes-shifted", "shapes-crowded"]
#: The headline arms (at least 5 seeds), then the ablations and the upper bounds (fewer seeds allowed).
HEADLINE = ["edgeloop", "random", "every-nth", "random-dedup"]
STRATEGIES = [*HEADLINE, "edgeloop-no-diversity", "edgeloop-no-quotas", "oracle-error", "oracle-world"]


@dataclass
class Settings:
    """One run's sizes; ``--quick`` shrinks them for a smoke run (not for conclusions)."""

    rounds: int = 3
    per_round: int = 30
    seeds: int = 3
    epochs: int = 8
    seed_epochs: int = 25
    imgsz: int = 320
    seed_labels: int = 40
    synth_size: tuple[int, int] = (320, 240)
    cameras: int = 16
    clip_frames: int = 40
    scene_length: int = 10  # a camera cuts to a new scene every this many frames (consecutive ones: near-duplicates)
    shift_every: int = 4  # one camera in this many watches a shifted world (4: 25%; 10: the 10% a real fleet sees)
    test_per_world: int = 20
    #: None: the candidates are what the agent keeps with its default triggers. A share: the agent
    #: keeps only that top share of the pool by score (what a stricter ``triggers.min_score`` does).
    keep_share: float | None = None
    #: Each round trains from the same start (the seed model) on every label so far, so a round's
    #: mAP does not depend on the path the strategy took (False: warm-start from the last round).
    same_start: bool = True
    #: Layers frozen while fine-tuning (10: the backbone; what won in bench/training.py at small budgets).
    freeze: int = 10

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=2, per_round=30, epochs=3, seed_epochs=10, imgsz=224, cameras=8, clip_frames=20,
                   test_per_world=8, seed_labels=30)  # fmt: skip


# ----------------------------------------------------------------------------------------- pools


@dataclass
class PoolFrame:
    """One frame of a pool: its image and label files on disk, its camera and place in the stream."""

    image: Path
    labels: Path
    camera: str
    order: int
    world: str = ""


@dataclass
class Pool:
    name: str
    frames: list[PoolFrame]
    stream: bool  # whether a camera's frames follow each other in time


def _write(out: Path, stem: str, image: np.ndarray, labels_text: str) -> tuple[Path, Path]:
    img, lab = out / "images" / f"{stem}.jpg", out / "labels" / f"{stem}.txt"
    img.parent.mkdir(parents=True, exist_ok=True)
    lab.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(img), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    lab.write_text(labels_text)
    return img, lab


def synthetic_data(work: Path, s: Settings, seed: int) -> tuple[Pool, Pool, Path, list[Path]]:
    """Pools (camera, iid), the test set's data.yaml and the seed model's training images."""
    w, h = s.synth_size
    worlds = {name: get_scenario(name).updated(width=w, height=h) for name in [KNOWN_WORLD, *SHIFTS]}
    # Most cameras watch the known world; one in ``shift_every`` a shifted one (the shifts in turn).
    plan = [KNOWN_WORLD if i % s.shift_every else SHIFTS[(i // s.shift_every) % len(SHIFTS)] for i in range(s.cameras)]
    camera = []
    for cam, world in enumerate(plan):
        frames = iter_camera_frames(worlds[world], s.clip_frames, seed * 1000 + cam, s.scene_length)
        for k, scene in enumerate(frames):
            img, lab = _write(work / "pool-camera", f"c{cam:02d}-{k:04d}", scene.image, format_labels(scene.labels))
            camera.append(PoolFrame(img, lab, f"cam-{cam:02d}", k, world))
    iid = []
    n_iid = len(camera)
    counts = {world: plan.count(world) * s.clip_frames for world in worlds}
    for world, n in counts.items():
        for k, scene in enumerate(iter_scenes(worlds[world], seed * 1000 + 500 + len(iid), n)):
            img, lab = _write(work / "pool-iid", f"{world}-{k:04d}", scene.image, format_labels(scene.labels))
            iid.append(PoolFrame(img, lab, "stills", 0, world))
    rng = np.random.default_rng(seed)
    iid = [iid[i] for i in rng.permutation(len(iid))][:n_iid]
    # The test set: every world equally, what we want the model to be good at.
    test = work / "test"
    for world, params in worlds.items():
        for k, scene in enumerate(iter_scenes(params, 90_000 + seed * 100, s.test_per_world)):
            _write(test / world, f"{world}-{k:03d}", scene.image, format_labels(scene.labels))
    # One data.yaml per world beside the whole test set: per-world mAP (run_strategy reads them).
    for world in worlds:
        _data_yaml(work / WORLD_TESTS / f"{world}.yaml", train=test / world / "images", test=test / world / "images",
                   names=worlds[KNOWN_WORLD].names)  # fmt: skip
    seed_dir = work / "seed-set"
    seed_images = []
    for k, scene in enumerate(iter_scenes(worlds[KNOWN_WORLD], 70_000 + seed, s.seed_labels)):
        seed_images.append(_write(seed_dir, f"seed-{k:03d}", scene.image, format_labels(scene.labels))[0])
    test_yaml = _data_yaml(work / "test.yaml", train=seed_dir / "images", test=[test / w / "images" for w in worlds],
                           names=worlds[KNOWN_WORLD].names)  # fmt: skip
    return Pool("camera", camera, True), Pool("iid", iid, False), test_yaml, seed_images


def real_data(data: YoloDataset, work: Path, s: Settings, seed: int) -> tuple[Pool, Pool, Path, list[Path]]:
    """Pools from a YOLO data set's train split (the product's photo streams); its test split is the test set."""
    from edgeloop.synth.photo_stream import write_photo_stream

    rng = np.random.default_rng(seed)
    train = list(data.split("train"))
    order = rng.permutation(len(train))
    seed_items = [train[i] for i in order[: s.seed_labels]]
    rest = [train[i] for i in order[s.seed_labels :]]
    stream = write_photo_stream(rest, work / "pool-camera", num_classes=len(data.names), seed=seed)
    photos = {p: n for n, p in enumerate(dict.fromkeys(f.photo for f in stream))}
    camera = [PoolFrame(f.image, f.labels, f"cam-{photos[f.photo] % 8}", k) for k, f in enumerate(stream)]
    iid = [PoolFrame(it.image, it.label_file, "photos", n) for n, it in enumerate(rest)]
    iid = [iid[i] for i in rng.permutation(len(iid))]
    test = data.split("test")
    test_yaml = _data_yaml(work / "test.yaml", train=seed_items[0].image.parent, test=test[0].image.parent,
                           names=data.names)  # fmt: skip
    return Pool("camera", camera, True), Pool("iid", iid, False), test_yaml, [it.image for it in seed_items]


def _data_yaml(
    path: Path, *, train: Path, test: Path | list[Path], names: dict[int, str] | list[str], val: Path | None = None
) -> Path:
    import yaml

    names_map = names if isinstance(names, dict) else dict(enumerate(names))
    tests = [str(t) for t in test] if isinstance(test, list) else str(test)
    doc = {"path": "/", "train": str(train), "val": str(val) if val else tests, "test": tests, "names": names_map}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _training_set(out: Path, images: list[Path], test_yaml: Path) -> Path:
    """A data.yaml whose train split is exactly ``images`` (linked, with their labels), val = the test split."""
    import yaml

    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir(parents=True)
    from edgeloop.yolo_dataset import label_path

    for i, img in enumerate(images):
        label = label_path(img)  # ultralytics' rule: both layouts (images/train/x.jpg and train/images/x.jpg)
        (out / "images" / f"{i:05d}{img.suffix}").symlink_to(img)
        if label.is_file():
            (out / "labels" / f"{i:05d}.txt").symlink_to(label)
    test = yaml.safe_load(test_yaml.read_text())
    tests = [Path(t) for t in test["test"]] if isinstance(test["test"], list) else Path(test["test"])
    return _data_yaml(out / "data.yaml", train=out / "images", test=tests, names=test["names"])


# ------------------------------------------------------------------------------------- training


def train_round(
    data_yaml: Path, start: Path, out: Path, *, epochs: int, imgsz: int, seed: int, freeze: int = 0
) -> Path:
    from flows.training.trainer import train

    result = train(data_yaml, out, base=start, epochs=epochs, imgsz=imgsz, seed=seed, val=False, patience=0,
                   optimizer="AdamW", lr0=0.001, warmup_epochs=0, freeze=freeze)  # fmt: skip
    return result.best if result.best.is_file() else result.run_dir / "weights" / "last.pt"


def evaluate(checkpoint: Path, data_yaml: Path, imgsz: int) -> tuple[float, float]:
    """(mAP50, mAP50-95) on the test split."""
    from ultralytics import YOLO

    metrics = YOLO(str(checkpoint)).val(data=str(data_yaml), split="test", imgsz=imgsz, batch=16, rect=False,
                                         plots=False, verbose=False, device="cpu", workers=0)  # fmt: skip
    return float(metrics.box.map50), float(metrics.box.map)


# ------------------------------------------------------------------------------------ strategies


@dataclass
class Scored:
    """What the edge agent says about each pool frame with the current model, and the labelled
    frames in the same embedding space (for curation's near-duplicate check against the training set)."""

    score: np.ndarray
    keep: np.ndarray
    embedding: np.ndarray
    hashes: np.ndarray
    classes: list[frozenset[str]]  # the predicted classes each frame contains
    labelled_embedding: np.ndarray
    labelled_hashes: np.ndarray
    scale: float  # the model's reference q50: curation's unit of distance
    evidence: list[dict[str, float]]  # per frame, curation's evidence kinds (server.curation.selection)
    errors: np.ndarray  # per frame, the current model's errors against truth (misses + false positives at IoU 0.5)


def score_pool(pool: Pool, checkpoint: Path, labelled_images: list[Path], imgsz: int, work: Path) -> Scored:
    """Run the agent's detector and triggers over the pool, a camera's frames in order."""
    from edge_agent.budget import dhash
    from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig
    from edge_agent.triggers import TriggersConfig, UncertaintyScorer
    from flows.training.trainer import export_onnx
    from server.curation.selection import frame_classes, frame_evidence
    from server.registry.prepare import prepare_model

    raw = export_onnx(checkpoint, work / "model-raw.onnx", imgsz=imgsz)
    release = work / "model.onnx"
    prepare_model(raw, release, labelled_images)
    detector = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=release))
    ref = detector.reference
    scorer = UncertaintyScorer(TriggersConfig.model_validate({"random": {"enabled": False}}), seed=0)
    scores, keeps, embeddings, hashes, classes, evidence, errors = [], [], [], [], [], [], []
    for i, f in enumerate(pool.frames):
        image = cv2.imread(str(f.image))
        out = detector.detect_all(image)
        verdict = scorer.score(
            f.camera, out.detections, i * 0.1, image_size=(image.shape[1], image.shape[0]),
            class_names=detector.class_names, weak=out.weak, embedding=out.embedding,
            reference=ref, stream=pool.stream,
        )  # fmt: skip
        scores.append(verdict.score)
        keeps.append(verdict.keep)
        embeddings.append(ref.project(out.embedding))
        hashes.append(dhash(image))
        classes.append(frame_classes(d.class_name for d in out.detections))
        evidence.append(
            frame_evidence(((r.trigger, r.score) for r in verdict.reasons), (d.confidence for d in out.detections))
        )
        errors.append(detection_errors(out.detections, f.labels, image.shape[1], image.shape[0]))
    lab_emb, lab_hash = [], []
    for path in labelled_images:
        image = cv2.imread(str(path))
        lab_emb.append(ref.project(detector.detect_all(image).embedding))
        lab_hash.append(dhash(image))
    return Scored(
        np.array(scores), np.array(keeps), np.stack(embeddings), np.array(hashes, np.uint64), classes,
        np.stack(lab_emb), np.array(lab_hash, np.uint64), ref.q50, evidence, np.array(errors, np.int64),
    )  # fmt: skip


Selector = Callable[[Pool, set[int], int, np.random.Generator, Callable[[], Scored]], list[int]]


def _free(pool: Pool, labelled: set[int]) -> list[int]:
    return [i for i in range(len(pool.frames)) if i not in labelled]


def select_random(pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, _: Callable) -> list[int]:
    free = _free(pool, labelled)
    return sorted(rng.choice(free, size=min(k, len(free)), replace=False).tolist())


def _candidates(pool: Pool, labelled: set[int], scored: Scored, k: int) -> list[int]:
    """What the agent would have uploaded (kept), topped up by score when that is fewer than ``k``."""
    free = _free(pool, labelled)
    kept = [i for i in free if scored.keep[i]]
    if len(kept) < k:
        rest = sorted((i for i in free if not scored.keep[i]), key=lambda i: -scored.score[i])
        kept += rest[: k - len(kept)]
    return kept


def select_top_score(pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, score: Callable) -> list[int]:
    scored = score()
    cands = _candidates(pool, labelled, scored, k)
    return sorted(sorted(cands, key=lambda i: -scored.score[i])[:k])


def select_edgeloop(
    pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, score: Callable, one_camera: bool = False
) -> list[int]:
    """The product's batch selection (server.curation.selection) over what the agent kept, with the
    product's defaults (class cap, near-duplicate rule); topped up by score when it picks fewer than
    ``k`` (near-duplicates, class cap), so every strategy spends the same labels per round."""
    from server.curation.config import CurationConfig
    from server.curation.duplicates import FrameSet, NearDuplicateRule
    from server.curation.selection import Pool as CurationPool
    from server.curation.selection import SelectionParams, select_batch

    scored = score()
    cands = _candidates(pool, labelled, scored, k)
    cfg = CurationConfig()
    candidates = CurationPool.from_rows(
        FrameSet(scored.embedding[cands], scored.hashes[cands]),
        [scored.evidence[i] for i in cands],
        ["fleet" if one_camera else pool.frames[i].camera for i in cands],
        [scored.classes[i] for i in cands],
        # A camera's frames are 0.1 s apart (score_pool's clock): episodes as the server sees them.
        np.array([pool.frames[i].order * 0.1 for i in cands]) if pool.stream else None,
    )
    done = sorted(labelled)
    training = FrameSet(
        np.concatenate([scored.labelled_embedding, scored.embedding[done]]),
        np.concatenate([scored.labelled_hashes, scored.hashes[done]]),
    )
    rule = NearDuplicateRule(cfg.near_duplicates.distance * scored.scale, cfg.near_duplicates.hash_bits)
    params = SelectionParams(
        size=k, class_cap=cfg.class_cap, rule=rule, scale=scored.scale, device_share_cap=cfg.device_share_cap,
        candidates=cfg.candidates_per_slot, episode_gap_s=cfg.splits.episode_gap_s,
        rare_class_bonus=cfg.rare_class_bonus,
    )  # fmt: skip
    picked = [cands[i] for i in select_batch(candidates, {"training set": training}, params).picked]
    if len(picked) < k:
        rest = sorted((i for i in cands if i not in set(picked)), key=lambda i: -scored.score[i])
        picked += rest[: k - len(picked)]
    return sorted(picked)


def detection_errors(detections, label_file: Path, width: int, height: int) -> int:
    """Misses plus false positives of ``detections`` against a YOLO label file (edgeloop.matching, IoU 0.5)."""
    from edgeloop.matching import error_counts
    from edgeloop.yolo_dataset import read_labels

    truth = [(lab.class_id, lab.xyxy(width, height)) for lab in read_labels(label_file)] if label_file.is_file() else []
    return sum(error_counts(detections, truth))


def select_every_nth(pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, _: Callable) -> list[int]:
    """What most teams do: every Nth frame of the unlabelled stream (a random phase), N = free / k."""
    free = _free(pool, labelled)
    if len(free) <= k:
        return free
    step = len(free) / k
    start = rng.uniform(0, step)
    return sorted({free[int(start + j * step)] for j in range(k)})


def _dedup_order(order: list[int], scored: Scored, done: list[int]) -> list[int]:
    """``order`` without near-duplicates (the product's rule) of earlier frames in it or of ``done``."""
    from server.curation.config import CurationConfig
    from server.curation.duplicates import FrameSet, NearDuplicateRule

    cfg = CurationConfig().near_duplicates
    rule = NearDuplicateRule(cfg.distance * scored.scale, cfg.hash_bits)
    seen = FrameSet(
        np.concatenate([scored.labelled_embedding, scored.embedding[done]]),
        np.concatenate([scored.labelled_hashes, scored.hashes[done]]),
    )
    fresh = ~rule.any_in(FrameSet(scored.embedding[order], scored.hashes[order]), seen)
    kept: list[int] = []
    for i, ok in zip(order, fresh, strict=True):
        if not ok:
            continue
        mine = FrameSet(scored.embedding[[i]], scored.hashes[[i]])
        if kept and rule.any_in(mine, FrameSet(scored.embedding[kept], scored.hashes[kept]))[0]:
            continue
        kept.append(i)
    return kept


def select_random_dedup(pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, score: Callable) -> list[int]:
    """What a careful team does: random frames, skipping near-duplicates of each other and of the labelled set."""
    scored = score()
    free = _free(pool, labelled)
    order = [free[i] for i in rng.permutation(len(free))]
    picked = []
    # In chunks: the rule is O(n^2) over the whole pool, a few times the batch is enough.
    for start in range(0, len(order), 20 * k):
        picked += _dedup_order(order[start : start + 20 * k], scored, sorted(labelled) + picked)[: k - len(picked)]
        if len(picked) >= k:
            break
    return sorted(picked)


def select_error_oracle(pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, score: Callable) -> list[int]:
    """Upper bound: the frames where the current model makes the most errors against truth, de-duplicated."""
    scored = score()
    free = _free(pool, labelled)
    order = sorted(free, key=lambda i: (-scored.errors[i], rng.uniform()))
    return sorted(_dedup_order(order[: 20 * k], scored, sorted(labelled))[:k])


def select_world_oracle(pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, _: Callable) -> list[int]:
    """Upper bound: knows which frames are of a shifted world and labels those first, at random among them."""
    free = _free(pool, labelled)
    shifted = [i for i in free if pool.frames[i].world not in ("", KNOWN_WORLD)]
    rest = [i for i in free if i not in set(shifted)]
    picked = [shifted[i] for i in rng.permutation(len(shifted))[:k]]
    picked += [rest[i] for i in rng.permutation(len(rest))[: k - len(picked)]]
    return sorted(picked)


def select_edgeloop_no_quotas(
    pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, score: Callable
) -> list[int]:
    """The product's selection with every frame on one camera: what allocation by need is worth."""
    return select_edgeloop(pool, labelled, k, rng, score, one_camera=True)


SELECTORS: dict[str, Selector] = {
    "edgeloop": select_edgeloop,
    "edgeloop-no-diversity": select_top_score,
    "edgeloop-no-quotas": select_edgeloop_no_quotas,
    "random": select_random,
    "every-nth": select_every_nth,
    "random-dedup": select_random_dedup,
    "oracle-error": select_error_oracle,
    "oracle-world": select_world_oracle,
}


# ------------------------------------------------------------------------------------ the rounds


@dataclass
class Run:
    pool: str
    strategy: str
    seed: int
    labels: list[int] = field(default_factory=list)
    map50: list[float] = field(default_factory=list)
    map50_95: list[float] = field(default_factory=list)
    selected_worlds: list[dict[str, int]] = field(default_factory=list)
    seconds: float = 0.0
    boxes: list[int] = field(default_factory=list)  # boxes labelled after each round (the second cost)
    map50_95_by_world: list[dict[str, float]] = field(default_factory=list)  # synthetic: each world's test set


def run_strategy(pool: Pool, strategy: str, seed: int, seed_model: Path, seed_images: list[Path], seed_map: tuple,
                 test_yaml: Path, s: Settings, work: Path) -> Run:  # fmt: skip
    t0 = time.monotonic()
    rng = np.random.default_rng([seed, zlib.crc32(strategy.encode())])
    run = Run(pool.name, strategy, seed, [len(seed_images)], [seed_map[0]], [seed_map[1]])
    labelled: set[int] = set()
    model = seed_model
    for r in range(1, s.rounds + 1):
        rdir = work / f"{pool.name}-{strategy}-s{seed}-r{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        images = seed_images + [pool.frames[i].image for i in sorted(labelled)]

        def score(images: list[Path] = images, model: Path = model, rdir: Path = rdir, r: int = r) -> Scored:
            scored = score_pool(pool, model, images, s.imgsz, rdir)
            print(f"[bench] {pool.name} {strategy} seed {seed} round {r}: the agent keeps "
                  f"{scored.keep.mean():.0%} of the pool", file=sys.stderr, flush=True)  # fmt: skip
            if s.keep_share is None:
                return scored
            top = np.argsort(-scored.score, kind="stable")[: max(1, round(s.keep_share * len(scored.score)))]
            keep = np.zeros_like(scored.keep)
            keep[top] = True
            return replace(scored, keep=keep)

        picked = SELECTORS[strategy](pool, labelled, s.per_round, rng, score)
        labelled |= set(picked)
        worlds: dict[str, int] = {}
        for i in picked:
            worlds[pool.frames[i].world or "?"] = worlds.get(pool.frames[i].world or "?", 0) + 1
        data = _training_set(rdir / "data", seed_images + [pool.frames[i].image for i in sorted(labelled)], test_yaml)
        start = seed_model if s.same_start else model
        model = train_round(data, start, rdir / "train", epochs=s.epochs, imgsz=s.imgsz, seed=seed, freeze=s.freeze)
        m50, m = evaluate(model, data, s.imgsz)
        run.map50_95_by_world.append(
            {p.stem: evaluate(model, p, s.imgsz)[1] for p in sorted((test_yaml.parent / WORLD_TESTS).glob("*.yaml"))}
        )
        run.boxes.append(sum(_boxes(pool.frames[i].labels) for i in labelled))
        run.labels.append(len(seed_images) + len(labelled))
        run.map50.append(m50)
        run.map50_95.append(m)
        run.selected_worlds.append(worlds)
        print(f"[bench] {pool.name} {strategy} seed {seed} round {r}: {run.labels[-1]} labels, mAP50-95 {m:.3f} "
              f"(picked {worlds})", file=sys.stderr, flush=True)  # fmt: skip
    run.seconds = time.monotonic() - t0
    return run


def _boxes(label_file: Path) -> int:
    return sum(1 for line in label_file.read_text().splitlines() if line.strip()) if label_file.is_file() else 0


def labels_to_reach(target: float, labels: list[int], maps: list[float]) -> float | None:
    """Labels at which a curve first reaches ``target`` (linear between rounds); None if it never does."""
    for (l0, m0), (l1, m1) in zip(zip(labels, maps, strict=True), zip(labels[1:], maps[1:], strict=True), strict=False):
        if m0 >= target:
            return float(l0)
        if m1 >= target:
            return l0 + (target - m0) / (m1 - m0) * (l1 - l0) if m1 != m0 else float(l1)
    return None


#: Two-sided 95% Student-t quantiles by number of seeds (df = n - 1): no scipy needed.
_T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def curve_area(labels: list[int], maps: list[float]) -> float:
    """Area under the labels-mAP curve over its label range, divided by the range: the mean mAP50-95."""
    x, y = np.asarray(labels, float), np.asarray(maps, float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0])) if x[-1] > x[0] else float(y[-1])


def paired_interval(diffs: list[float]) -> dict:
    """Mean of per-seed differences with its 95% t-interval (None for fewer than two seeds)."""
    d = np.asarray(diffs, float)
    if len(d) < 2:
        return {"mean": float(d.mean()) if len(d) else None, "low": None, "high": None, "seeds": len(d)}
    half = _T95.get(len(d), 1.96) * d.std(ddof=1) / np.sqrt(len(d))
    return {"mean": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half), "seeds": len(d)}


def summarise(runs: list[Run]) -> dict:
    out: dict = {}
    for pool in sorted({r.pool for r in runs}):
        by = {st: [r for r in runs if r.pool == pool and r.strategy == st] for st in STRATEGIES}
        mean = {st: np.mean([r.map50_95 for r in rs], axis=0).tolist() for st, rs in by.items() if rs}
        labels = next(rs for rs in by.values() if rs)[0].labels
        entry: dict = {"labels": labels, "mean_map50_95": mean}
        if "random" in mean and "edgeloop" in mean:
            target = mean["random"][-1]
            need = labels_to_reach(target, labels, mean["edgeloop"])
            entry["random_final_map50_95"] = target
            entry["edgeloop_labels_to_reach_it"] = need
            entry["edgeloop_share_of_random_labels"] = None if need is None else need / labels[-1]
            # The seed labels are paid either way: the share of the labels a curator adds is the saving.
            added = labels[-1] - labels[0]
            entry["edgeloop_share_of_random_added_labels"] = (
                None if need is None else max(0.0, need - labels[0]) / added if added else None
            )
        if "edgeloop" in mean:
            ours = {r.seed: r for r in by["edgeloop"]}
            entry["versus"] = {}
            for st, rs in by.items():
                if st == "edgeloop" or not rs:
                    continue
                reach = labels_to_reach(mean[st][-1], labels, mean["edgeloop"])
                diffs = [
                    curve_area(ours[r.seed].labels, ours[r.seed].map50_95) - curve_area(r.labels, r.map50_95)
                    for r in rs
                    if r.seed in ours
                ]
                entry["versus"][st] = {
                    "final_map50_95": mean[st][-1],
                    "edgeloop_labels_to_reach_it": reach,
                    "edgeloop_share_of_its_labels": None if reach is None else reach / labels[-1],
                    "area_difference": paired_interval(diffs),
                }
        worlds = {
            st: {
                w: np.mean([[m[w] for m in r.map50_95_by_world] for r in rs], axis=0).tolist()
                for w in rs[0].map50_95_by_world[0]
            }
            for st, rs in by.items()
            if rs and rs[0].map50_95_by_world and rs[0].map50_95_by_world[0]
        }
        if worlds:
            entry["mean_map50_95_by_world"] = worlds
        out[pool] = entry
    return out


def plot(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pools = sorted({r.pool for r in runs})
    fig, axes = plt.subplots(1, len(pools), figsize=(6 * len(pools), 4.2), squeeze=False)
    for ax, pool in zip(axes[0], pools, strict=True):
        for st in STRATEGIES:
            rs = [r for r in runs if r.pool == pool and r.strategy == st]
            if not rs:
                continue
            y = np.array([r.map50_95 for r in rs])
            ax.errorbar(rs[0].labels, y.mean(0), yerr=y.std(0), marker="o", capsize=3, label=st)
        ax.set_title(f"{title}: {pool} pool")
        ax.set_xlabel("labels used")
        ax.set_ylabel("test mAP50-95")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict, command: str) -> str:
    """A section for docs/benchmarks.md: settings, the mean curves per pool, the summary, per-seed finals."""
    st = result["settings"]
    runs = [Run(**r) for r in result["runs"]]
    seeds = sorted({r.seed for r in runs})
    lines = [
        f"`{command}` ({result['machine']}, {result['seconds'] / 60:.0f} min): {st['rounds']} rounds of "
        f"{st['per_round']} labels after {st['seed_labels']} seed labels, {len(seeds)} seeds, "
        f"{st['epochs']} epochs per round at {st['imgsz']} px (seed model: {st['seed_epochs']} epochs from the COCO "
        "checkpoint); mean test mAP50-95 over the seeds (± standard deviation).",
        "",
    ]
    for pool, summary in summarise(runs).items():
        labels = summary["labels"]
        lines += [f"**{pool} pool**", "", "| strategy | " + " | ".join(f"{n} labels" for n in labels) + " |",
                  "|---|" + "---:|" * len(labels)]  # fmt: skip
        for strategy in STRATEGIES:
            rs = [r for r in runs if r.pool == pool and r.strategy == strategy]
            if not rs:
                continue
            y = np.array([r.map50_95 for r in rs])
            cells = [f"{m:.3f} ± {sd:.3f}" for m, sd in zip(y.mean(0), y.std(0), strict=True)]
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        need, share = summary.get("edgeloop_labels_to_reach_it"), summary.get("edgeloop_share_of_random_labels")
        if "random_final_map50_95" in summary:
            added = summary["edgeloop_share_of_random_added_labels"]
            reach = (f"edgeloop reaches it with **{need:.0f} labels ({share:.0%} of random's {labels[-1]}; "
                     f"{added:.0%} of the {labels[-1] - labels[0]} labels added after the seed)**"
                     if need is not None else "edgeloop does not reach it within the rounds")  # fmt: skip
            lines += ["", f"Random's final mAP50-95 {summary['random_final_map50_95']:.3f} with {labels[-1]} labels; "
                      f"{reach}."]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="A YOLO data.yaml with train and test splits, or 'synthetic'.")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--per-round", type=int)
    parser.add_argument("--epochs", type=int, help="Epochs per round's fine-tuning (default 8).")
    parser.add_argument("--imgsz", type=int, help="Training and evaluation image size (default 320).")
    parser.add_argument("--seed-labels", type=int, help="Labels the seed model is trained on (default 40).")
    parser.add_argument("--seed-epochs", type=int, help="Epochs of the seed model's fine-tuning (default 25).")
    parser.add_argument(
        "--keep-share",
        type=float,
        help="The agent keeps only this top share of the pool by score (default: its triggers' keep).",
    )
    parser.add_argument("--cameras", type=int, help="Synthetic: cameras in the pool (default 16).")
    parser.add_argument("--clip-frames", type=int, help="Synthetic: frames per camera (default 40).")
    parser.add_argument("--scene-length", type=int, help="Synthetic: frames per scene (default 10).")
    parser.add_argument("--shift-every", type=int, help="Synthetic: one camera in this many is shifted (default 4).")
    parser.add_argument("--warm-start", action="store_true", help="Train each round from the last one's model.")
    parser.add_argument("--freeze", type=int, help="Layers frozen while fine-tuning (default 10: the backbone).")
    parser.add_argument("--pool", choices=["camera", "iid", "both"], default="both")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"Any of {', '.join(STRATEGIES)}.")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="Seeds run from here (0-2 choose settings; report others)."
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".edgeloop" / "bench-active-learning")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run, not a result.")
    parser.add_argument("--markdown", action="store_true", help="Print --out's results as markdown and exit.")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()  # the data.yaml files it writes hold absolute paths
    if args.markdown:
        result = json.loads(args.out.read_text())
        argv = [a for a in sys.argv[1:] if a != "--markdown"]
        print(markdown(result, result.get("command") or " ".join(["python bench/active_learning.py", *argv])))
        return

    s = Settings.quick() if args.quick else Settings()
    for name in ("seeds", "rounds", "per_round", "epochs", "imgsz", "seed_labels", "seed_epochs", "keep_share",
                 "cameras", "clip_frames", "scene_length", "shift_every", "freeze"):  # fmt: skip
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.same_start = not args.warm_start
    strategies = args.strategies.split(",")
    from edgeloop.offline import offline_environment

    os.environ.update(offline_environment(args.workdir / "ultralytics-state"))
    runs: list[Run] = []
    t_all = time.monotonic()
    for seed in range(args.first_seed, args.first_seed + s.seeds):
        work = args.workdir / f"{Path(args.data).stem if args.data != 'synthetic' else 'synthetic'}-seed{seed}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        if args.data == "synthetic":
            camera, iid, test_yaml, seed_images = synthetic_data(work, s, seed)
        else:
            camera, iid, test_yaml, seed_images = real_data(load_yolo_dataset(Path(args.data)), work, s, seed)
        seed_data = _training_set(work / "seed-data", seed_images, test_yaml)
        seed_model = train_round(seed_data, BASE_PT, work / "seed-train", epochs=s.seed_epochs, imgsz=s.imgsz,
                                 seed=seed)  # fmt: skip
        seed_map = evaluate(seed_model, seed_data, s.imgsz)
        print(f"[bench] seed {seed}: seed model on {len(seed_images)} labels, mAP50-95 {seed_map[1]:.3f}",
              file=sys.stderr, flush=True)  # fmt: skip
        pools = [p for p in (camera, iid) if args.pool in (p.name, "both")]
        for pool in pools:
            for strategy in strategies:
                runs.append(run_strategy(pool, strategy, seed, seed_model, seed_images, seed_map, test_yaml, s, work))
                args.out.write_text(json.dumps({"runs": [asdict(r) for r in runs]}, indent=1))
    summary = summarise(runs)
    result = {
        "data": args.data,
        "command": " ".join(["python bench/active_learning.py", *sys.argv[1:]]),
        "settings": asdict(s),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "seconds": time.monotonic() - t_all,
        "runs": [asdict(r) for r in runs],
        "summary": summary,
    }
    args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(runs, args.plot, "synthetic shift" if args.data == "synthetic" else Path(args.data).parent.name)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
