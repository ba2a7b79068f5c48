"""The world the demo's cameras watch, and the truth behind it.

Two worlds: **A**, which the first model is trained on, and **B**, which the cameras show: the
same classes after a domain shift (new backgrounds, looks and sizes, or lighting). From the
synthetic scenes (default) the demo writes A's labelled stills, one recorded video per camera of B
(a new scene every few seconds, as a patrolling camera sees) with a label file per frame (the
oracle's truth), and a labelled still set of B: the test set every round's model is scored on.
With ``--data DATA.yaml`` (any YOLO data set with train and test splits) A is a small random share
of the training photos (its val and test from the data set's val split), the cameras play
camera-like streams made from the other training photos (:mod:`edgeloop.synth.photo_stream`), and
every round is scored on the data set's own test split, which nothing in the loop trains on.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from edgeloop.synth.photo_stream import write_photo_stream
from edgeloop.synth.scenarios import get_scenario
from edgeloop.synth.scenes import format_labels, iter_scenes, write_video
from edgeloop.yolo_dataset import YoloItem, load_yolo_dataset
from loop.oracle import CameraTruth, Oracle

#: The synthetic worlds: what the first model learns, and what the cameras show.
WORLD_A = "shapes"
WORLD_B = "shapes-shifted"
#: With --data, fewest photos that make world A's val and test splits (two each).
MIN_HELD_OUT = 4
#: Thumbnail distance (mean absolute difference of 32x32 colour thumbnails, grey levels) below which
#: two dHash-close photos are twins. Measured: the aquarium's four dHash-close train/test pairs (shots
#: of one tank seconds apart) lie 9.5-26 apart, unrelated pairs at least 16 (median 59); dHash-close
#: synthetic scenes (plain backgrounds) 38 or more.
TWIN_THUMBNAIL_MAD = 30.0


@dataclass(frozen=True)
class Camera:
    """One demo camera: what it plays, and whether that is a stream of consecutive frames."""

    source_id: str
    uri: str
    sequence: bool
    fps: float


@dataclass(frozen=True)
class World:
    """Everything the demo needs to play and judge its world."""

    description: str
    names: list[str]
    imgsz: int
    first_training: Path  # data.yaml of A's labelled data (train/val/test)
    test_b: Path  # data.yaml whose test split is B's frozen test set
    cameras: list[Camera]
    oracle: Oracle


@dataclass(frozen=True)
class WorldSize:
    """How much of each the demo writes (``--quick`` is smaller)."""

    train_a: int = 160
    frames_per_camera: int = 600
    scene_length: int = 10  # the camera cuts to a new scene every this many frames
    test_b: int = 60
    width: int = 320
    height: int = 240
    imgsz: int = 320
    fps: float = 5.0
    first_share: float = 0.2  # with --data: the share of training photos labelled for the first model


def _data_yaml(path: Path, names: list[str], **splits: Path) -> Path:
    doc = {"path": str(path.parent), **{k: str(v) for k, v in splits.items()}, "names": dict(enumerate(names))}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _stills(out: Path, params, n: int, seed: int) -> Path:
    """``n`` labelled stills of one world under ``out/images`` and ``out/labels``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    import cv2

    for i, scene in enumerate(iter_scenes(params, seed, n)):
        cv2.imwrite(str(out / "images" / f"{i:06d}.jpg"), scene.image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        (out / "labels" / f"{i:06d}.txt").write_text(format_labels(scene.labels))
    return out / "images"


def synthetic_world(root: Path, size: WorldSize, cameras: int = 2, seed: int = 0) -> World:
    """World A = ``shapes``, B = ``shapes-shifted``, at ``size``'s resolution."""
    if root.exists():
        shutil.rmtree(root)
    a = get_scenario(WORLD_A).updated(width=size.width, height=size.height)
    b = get_scenario(WORLD_B).updated(width=size.width, height=size.height)
    names = [a.names[i] for i in range(len(a.names))]
    n_val = max(4, size.train_a // 8)
    first = _data_yaml(
        root / "a" / "data.yaml",
        names,
        train=_stills(root / "a" / "train", a, size.train_a, seed),
        val=_stills(root / "a" / "val", a, n_val, seed + 1),
        test=_stills(root / "a" / "test", a, n_val, seed + 2),
    )
    test_b = _stills(root / "b-test", b, size.test_b, seed + 3)
    cams, truth = [], {}
    (root / "cameras").mkdir(parents=True)
    for i in range(cameras):
        source_id = f"cam-{i + 1}"
        video = write_video(
            root / "cameras" / f"{source_id}.mp4", b, size.frames_per_camera, seed + 10 + i, fps=size.fps,
            labels_dir=root / "cameras" / f"{source_id}-labels", scene_length=size.scene_length,
        )  # fmt: skip
        cams.append(Camera(source_id, str(video), sequence=True, fps=size.fps))
        truth[source_id] = CameraTruth(root / "cameras" / f"{source_id}-labels", size.frames_per_camera)
    return World(
        description=f"synthetic: first model on '{WORLD_A}', cameras watch '{WORLD_B}'",
        names=names,
        imgsz=size.imgsz,
        first_training=first,
        test_b=_data_yaml(root / "b-test.yaml", names, train=test_b, val=test_b, test=test_b),
        cameras=cams,
        oracle=Oracle(truth),
    )


def _without_twins(items: list[YoloItem], others: list[YoloItem]) -> tuple[list[YoloItem], list[YoloItem]]:
    """``items`` split into those with no near-twin among ``others`` and those with one.

    A twin: dHash within the near-duplicate rule's bits *and* 32x32 colour thumbnails less than
    :data:`TWIN_THUMBNAIL_MAD` grey levels apart on average (no model is at hand when the world is
    written, so the curation embedding cannot be the second half of the rule here).
    """
    import cv2

    from edge_agent.budget import dhash
    from server.curation.config import NearDuplicateConfig
    from server.curation.duplicates import hamming

    def read(group: list[YoloItem]) -> tuple[np.ndarray, np.ndarray]:
        hashes, thumbs = [], []
        for item in group:
            image = cv2.imread(str(item.image), cv2.IMREAD_COLOR)
            if image is None:
                image = np.zeros((32, 32, 3), np.uint8)
            hashes.append(dhash(image))
            thumbs.append(cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32))
        return np.array(hashes, dtype=np.uint64), np.stack(thumbs)

    if not items or not others:
        return list(items), []
    (ha, ta), (hb, tb) = read(items), read(others)
    twin = hamming(ha, hb) <= NearDuplicateConfig().hash_bits
    for i, j in zip(*np.nonzero(twin), strict=True):
        twin[i, j] = np.abs(ta[i] - tb[j]).mean() < TWIN_THUMBNAIL_MAD
    near = twin.any(axis=1)
    return [i for i, n in zip(items, near, strict=True) if not n], [i for i, n in zip(items, near, strict=True) if n]


def data_world(data_yaml: Path, root: Path, size: WorldSize, cameras: int = 2, seed: int = 0) -> World:
    """World from a YOLO data set: A = a random share of its training photos, B = the rest, as camera streams.

    The data set's own test split is what every round is scored on, so no image of it goes into A
    or onto a camera: A's val and test splits are the data set's val split, halved (or, without one,
    a few more training photos the cameras never show). The first dataset version then holds only
    images the demo never scores on.
    """
    data = load_yolo_dataset(data_yaml)
    test = data.split("test")
    if root.exists():
        shutil.rmtree(root)
    # Photo data sets hold shots of one scene seconds apart; a training photo that near-twins a test
    # photo (dHash alone: it errs towards leaving more out) never plays, so no score is memory.
    train, twins = _without_twins(list(data.split("train")), test)
    order = np.random.default_rng(seed).permutation(len(train))
    n_first = max(8, int(len(train) * size.first_share))
    held = list(data.splits.get("val", []))
    if len(held) < MIN_HELD_OUT:  # no usable val split: hold out training photos the cameras never show
        n_held = max(MIN_HELD_OUT, n_first // 4)
        held = [train[i] for i in order[:n_held]]
        order = order[n_held:]
    # A's train keeps clear of its own val and test (the gate refuses a leaky first model).
    pool = [train[i] for i in order]
    clear, _ = _without_twins(pool, held)
    first_items = clear[:n_first]
    taken = {id(item) for item in first_items}
    rest = [item for item in pool if id(item) not in taken]
    held = [held[i] for i in np.random.default_rng(seed + 1).permutation(len(held))]
    a_dir = root / "a"
    a_splits = {"train": first_items, "val": held[: len(held) // 2], "test": held[len(held) // 2 :]}
    for split, items in a_splits.items():
        (a_dir / split / "images").mkdir(parents=True)
        (a_dir / split / "labels").mkdir(parents=True)
        for item in items:
            (a_dir / split / "images" / item.image.name).symlink_to(item.image.resolve())
            if item.label_file.is_file():
                (a_dir / split / "labels" / (item.image.stem + ".txt")).symlink_to(item.label_file.resolve())
    first = _data_yaml(a_dir / "data.yaml", data.names, **{k: a_dir / k / "images" for k in a_splits})
    test_images = test[0].image.parent
    cams, truth = [], {}
    for i in range(cameras):
        source_id = f"cam-{i + 1}"
        out = root / "cameras" / source_id
        frames = write_photo_stream(rest[i::cameras], out, num_classes=len(data.names), seed=seed + i)
        cams.append(Camera(source_id, str(out / "images"), sequence=True, fps=size.fps))
        truth[source_id] = CameraTruth(out / "labels", len(frames))
    counts = {k: len(v) for k, v in a_splits.items()}
    return World(
        description=f"{data_yaml}: world A is {counts['train']} training photos (val {counts['val']}, test "
        f"{counts['test']} held out), the cameras play streams of the other {len(rest)} training photos, every "
        f"round is scored on the data set's test split ({len(test)} photos, never trained on; {len(twins)} training "
        "photos left out as near-twins of them)",
        names=data.names,
        imgsz=size.imgsz,
        first_training=first,
        test_b=_data_yaml(root / "b-test.yaml", data.names, train=test_images, val=test_images, test=test_images),
        cameras=cams,
        oracle=Oracle(truth),
    )
