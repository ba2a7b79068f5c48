"""Benchmark: how many labels does edgeloop's selection save against labelling random frames?

    .venv/bin/python bench/active_learning.py --data DATA.yaml|synthetic --seeds 3 --rounds 4 \\
        --per-round 40 --out results.json [--pool camera|iid|both] [--quick] [--plot out.png]

Same pool, same seed model, same training budget, same labels per round, for each strategy:

* ``edgeloop``: the edge agent's own detector and triggers score every pool frame (a camera's
  frames in order, as a stream); the frames the agent would keep are the candidates, and the
  curation batch selection (uncertainty x diversity, class balance, fair share per camera) picks
  the round's labels from them (``server.curation.selection``);
* ``edgeloop-no-diversity``: the same candidates, the top ones by score: what the diversity term is worth;
* ``random``: uniform over the unlabelled pool, as a team without edgeloop would label.

Each round the oracle labels the chosen frames from the data set's truth, the current model is
fine-tuned (transfer learning) on every label so far, and scored on the frozen test split
(mAP50 and mAP50-95, ultralytics' validator on the test split).

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
SHIFTS = ["shapes-night", "shapes-shifted", "shapes-crowded"]
STRATEGIES = ["edgeloop", "edgeloop-no-diversity", "random"]


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
    test_per_world: int = 20
    #: None: the candidates are what the agent keeps with its default triggers. A share: the agent
    #: keeps only that top share of the pool by score (what a stricter ``triggers.min_score`` does).
    keep_share: float | None = None

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
    # Three of four cameras watch the known world; the rest are split over the shifts.
    plan = [KNOWN_WORLD if i % 4 else SHIFTS[(i // 4) % len(SHIFTS)] for i in range(s.cameras)]
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
            _write(test, f"{world}-{k:03d}", scene.image, format_labels(scene.labels))
    seed_dir = work / "seed-set"
    seed_images = []
    for k, scene in enumerate(iter_scenes(worlds[KNOWN_WORLD], 70_000 + seed, s.seed_labels)):
        seed_images.append(_write(seed_dir, f"seed-{k:03d}", scene.image, format_labels(scene.labels))[0])
    test_yaml = _data_yaml(work / "test.yaml", train=seed_dir / "images", test=test / "images",
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
    path: Path, *, train: Path, test: Path, names: dict[int, str] | list[str], val: Path | None = None
) -> Path:
    import yaml

    names_map = names if isinstance(names, dict) else dict(enumerate(names))
    doc = {"path": "/", "train": str(train), "val": str(val or test), "test": str(test), "names": names_map}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _training_set(out: Path, images: list[Path], test_yaml: Path) -> Path:
    """A data.yaml whose train split is exactly ``images`` (linked, with their labels), val = the test split."""
    import yaml

    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir(parents=True)
    for i, img in enumerate(images):
        label = img.parent.parent / "labels" / (img.stem + ".txt")
        (out / "images" / f"{i:05d}{img.suffix}").symlink_to(img)
        if label.is_file():
            (out / "labels" / f"{i:05d}.txt").symlink_to(label)
    test = yaml.safe_load(test_yaml.read_text())
    return _data_yaml(out / "data.yaml", train=out / "images", test=Path(test["test"]), names=test["names"])


# ------------------------------------------------------------------------------------- training


def train_round(data_yaml: Path, start: Path, out: Path, *, epochs: int, imgsz: int, seed: int) -> Path:
    from flows.training.trainer import train

    result = train(data_yaml, out, base=start, epochs=epochs, imgsz=imgsz, seed=seed, val=False, patience=0,
                   optimizer="AdamW", lr0=0.001, warmup_epochs=0)  # fmt: skip
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
    classes: list[str]  # main predicted class per frame ("" for none)
    labelled_embedding: np.ndarray
    labelled_hashes: np.ndarray
    scale: float  # the model's reference q50: curation's unit of distance


def score_pool(pool: Pool, checkpoint: Path, labelled_images: list[Path], imgsz: int, work: Path) -> Scored:
    """Run the agent's detector and triggers over the pool, a camera's frames in order."""
    from edge_agent.budget import dhash
    from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig
    from edge_agent.triggers import TriggersConfig, UncertaintyScorer
    from flows.training.trainer import export_onnx
    from server.curation.selection import primary_class
    from server.registry.prepare import prepare_model

    raw = export_onnx(checkpoint, work / "model-raw.onnx", imgsz=imgsz)
    release = work / "model.onnx"
    prepare_model(raw, release, labelled_images)
    detector = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=release))
    ref = detector.reference
    scorer = UncertaintyScorer(TriggersConfig.model_validate({"random": {"enabled": False}}), seed=0)
    scores, keeps, embeddings, hashes, classes = [], [], [], [], []
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
        classes.append(primary_class([d.class_name for d in out.detections], [d.confidence for d in out.detections]))
    lab_emb, lab_hash = [], []
    for path in labelled_images:
        image = cv2.imread(str(path))
        lab_emb.append(ref.project(detector.detect_all(image).embedding))
        lab_hash.append(dhash(image))
    return Scored(
        np.array(scores), np.array(keeps), np.stack(embeddings), np.array(hashes, np.uint64), classes,
        np.stack(lab_emb), np.array(lab_hash, np.uint64), ref.q50,
    )  # fmt: skip


Selector = Callable[[Pool, set[int], int, np.random.Generator, Callable[[], Scored]], list[int]]


def select_random(pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, _: Callable) -> list[int]:
    free = [i for i in range(len(pool.frames)) if i not in labelled]
    return sorted(rng.choice(free, size=min(k, len(free)), replace=False).tolist())


def _candidates(pool: Pool, labelled: set[int], scored: Scored, k: int) -> list[int]:
    """What the agent would have uploaded (kept), topped up by score when that is fewer than ``k``."""
    free = [i for i in range(len(pool.frames)) if i not in labelled]
    kept = [i for i in free if scored.keep[i]]
    if len(kept) < k:
        rest = sorted((i for i in free if not scored.keep[i]), key=lambda i: -scored.score[i])
        kept += rest[: k - len(kept)]
    return kept


def select_top_score(pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, score: Callable) -> list[int]:
    scored = score()
    cands = _candidates(pool, labelled, scored, k)
    return sorted(sorted(cands, key=lambda i: -scored.score[i])[:k])


def select_edgeloop(pool: Pool, labelled: set[int], k: int, rng: np.random.Generator, score: Callable) -> list[int]:
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
    candidates = CurationPool(
        FrameSet(scored.embedding[cands], scored.hashes[cands]),
        scored.score[cands],
        [pool.frames[i].camera for i in cands],
        [scored.classes[i] for i in cands],
    )
    done = sorted(labelled)
    training = FrameSet(
        np.concatenate([scored.labelled_embedding, scored.embedding[done]]),
        np.concatenate([scored.labelled_hashes, scored.hashes[done]]),
    )
    rule = NearDuplicateRule(cfg.near_duplicates.distance * scored.scale, cfg.near_duplicates.hash_bits)
    params = SelectionParams(size=k, class_cap=cfg.class_cap, rule=rule, scale=scored.scale)
    picked = [cands[i] for i in select_batch(candidates, {"training set": training}, params).picked]
    if len(picked) < k:
        rest = sorted((i for i in cands if i not in set(picked)), key=lambda i: -scored.score[i])
        picked += rest[: k - len(picked)]
    return sorted(picked)


SELECTORS: dict[str, Selector] = {
    "edgeloop": select_edgeloop,
    "edgeloop-no-diversity": select_top_score,
    "random": select_random,
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
        model = train_round(data, model, rdir / "train", epochs=s.epochs, imgsz=s.imgsz, seed=seed)
        m50, m = evaluate(model, data, s.imgsz)
        run.labels.append(len(seed_images) + len(labelled))
        run.map50.append(m50)
        run.map50_95.append(m)
        run.selected_worlds.append(worlds)
        print(f"[bench] {pool.name} {strategy} seed {seed} round {r}: {run.labels[-1]} labels, mAP50-95 {m:.3f} "
              f"(picked {worlds})", file=sys.stderr, flush=True)  # fmt: skip
    run.seconds = time.monotonic() - t0
    return run


def labels_to_reach(target: float, labels: list[int], maps: list[float]) -> float | None:
    """Labels at which a curve first reaches ``target`` (linear between rounds); None if it never does."""
    for (l0, m0), (l1, m1) in zip(zip(labels, maps, strict=True), zip(labels[1:], maps[1:], strict=True), strict=False):
        if m0 >= target:
            return float(l0)
        if m1 >= target:
            return l0 + (target - m0) / (m1 - m0) * (l1 - l0) if m1 != m0 else float(l1)
    return None


def summarise(runs: list[Run]) -> dict:
    out: dict = {}
    for pool in sorted({r.pool for r in runs}):
        by = {st: [r for r in runs if r.pool == pool and r.strategy == st] for st in STRATEGIES}
        mean = {st: np.mean([r.map50_95 for r in rs], axis=0).tolist() for st, rs in by.items() if rs}
        labels = next(rs for rs in by.values() if rs)[0].labels
        entry = {"labels": labels, "mean_map50_95": mean}
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
    parser.add_argument("--pool", choices=["camera", "iid", "both"], default="both")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".edgeloop" / "bench-active-learning")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run, not a result.")
    parser.add_argument("--markdown", action="store_true", help="Print --out's results as markdown and exit.")
    args = parser.parse_args()
    if args.markdown:
        result = json.loads(args.out.read_text())
        argv = [a for a in sys.argv[1:] if a != "--markdown"]
        print(markdown(result, result.get("command") or " ".join(["python bench/active_learning.py", *argv])))
        return

    s = Settings.quick() if args.quick else Settings()
    for name in ("seeds", "rounds", "per_round", "epochs", "imgsz", "seed_labels", "seed_epochs", "keep_share"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    strategies = args.strategies.split(",")
    from edgeloop.offline import offline_environment

    os.environ.update(offline_environment(args.workdir / "ultralytics-state"))
    runs: list[Run] = []
    t_all = time.monotonic()
    for seed in range(s.seeds):
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
