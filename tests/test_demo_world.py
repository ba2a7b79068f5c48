"""The demo's worlds (loop/world.py): with ``--data`` any YOLO data set becomes world A (a share of
its training photos, linked, not copied), camera streams of the other training photos with their
truth for the oracle, and its own test split as the frozen test set; the synthetic world writes
videos whose every frame the oracle can label."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

from edgeloop.synth.scenarios import get_scenario
from edgeloop.synth.scenes import format_labels, iter_scenes
from edgeloop.yolo_dataset import load_yolo_dataset, read_labels
from loop.world import WorldSize, data_world, synthetic_world


def _yolo_set(root: Path, counts: dict[str, int]) -> Path:
    params = get_scenario("shapes").updated(width=160, height=120)
    for split, n in counts.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for k, scene in enumerate(iter_scenes(params, 100 + len(split), n)):
            cv2.imwrite(str(root / split / "images" / f"{split}-{k:03d}.jpg"), scene.image)
            (root / split / "labels" / f"{split}-{k:03d}.txt").write_text(format_labels(scene.labels))
    doc = {"path": ".", **{s: f"{s}/images" for s in counts}, "names": dict(params.names)}
    (root / "data.yaml").write_text(yaml.safe_dump(doc))
    return root / "data.yaml"


def test_a_yolo_data_set_becomes_world_a_camera_streams_and_the_frozen_test_split(tmp_path: Path) -> None:
    data = _yolo_set(tmp_path / "set", {"train": 40, "val": 6, "test": 5})
    world = data_world(data, tmp_path / "world", WorldSize(first_share=0.2), cameras=2, seed=3)

    first = load_yolo_dataset(world.first_training)
    assert len(first.split("train")) == 8  # max(8, 20% of 40)
    # A's val and test are the data set's val split halved: the set's own test split is only scored on
    assert len(first.split("val")) == 3 and len(first.split("test")) == 3
    val_photos = {(tmp_path / "set" / "val" / "images" / f"val-{k:03d}.jpg").resolve() for k in range(6)}
    assert {i.image.resolve() for i in first.split("val") + first.split("test")} == val_photos
    assert all(item.image.is_symlink() for item in first.split("train"))
    first_photos = {item.image.resolve() for split in first.splits.values() for item in split}
    test_photos = {(tmp_path / "set" / "test" / "images" / f"test-{k:03d}.jpg").resolve() for k in range(5)}
    assert not first_photos & test_photos

    test = load_yolo_dataset(world.test_b).split("test")
    assert sorted(i.image.name for i in test) == [f"test-{k:03d}.jpg" for k in range(5)]

    assert [c.source_id for c in world.cameras] == ["cam-1", "cam-2"] and all(c.sequence for c in world.cameras)
    frames = sorted(p for c in world.cameras for p in Path(c.uri).iterdir())
    # the 32 other photos, each a clip of one or more frames, less those that near-twin a test photo
    left_out = int(world.description.split(" training photos left out")[0].rsplit(" ", 1)[1])
    assert 0 <= left_out <= 8 and len(frames) >= 32 - left_out
    # Each camera frame is labelled by the oracle from its file name, and a clip's first frame is
    # its photo as it is: same labels as the data set's.
    originals = {p.stem: read_labels(tmp_path / "set" / "train" / "labels" / f"{p.stem}.txt")
                 for p in (tmp_path / "set" / "train" / "images").iterdir()}  # fmt: skip
    labelled_first_frames = 0
    for camera in world.cameras:
        for frame in sorted(Path(camera.uri).iterdir()):
            labels = world.oracle.labels(camera.source_id, frame.name)
            image = cv2.imread(str(frame))
            assert image is not None
            if frame.stem.endswith("-00"):
                labelled_first_frames += 1
                assert labels in list(originals.values())
    assert labelled_first_frames == 32 - left_out  # every other photo plays once on one camera
    assert not first_photos & {p.resolve() for p in frames}


def test_the_synthetic_world_records_videos_the_oracle_can_label_frame_by_frame(tmp_path: Path) -> None:
    size = WorldSize(train_a=8, frames_per_camera=12, test_b=4, width=160, height=120)
    world = synthetic_world(tmp_path / "world", size, cameras=2, seed=0)
    assert len(load_yolo_dataset(world.first_training).split("train")) == 8
    assert len(load_yolo_dataset(world.test_b).split("test")) == 4
    for camera in world.cameras:
        video = cv2.VideoCapture(camera.uri)
        n = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
        video.release()
        assert n == 12
        labels = [world.oracle.labels(camera.source_id, f"{camera.source_id}#{i}") for i in range(n)]
        assert sum(len(x) for x in labels) > 0
        assert world.oracle.labels(camera.source_id, f"{camera.source_id}#{n}") == labels[0]  # a loop wraps
    assert np.unique([c.uri for c in world.cameras]).size == 2
