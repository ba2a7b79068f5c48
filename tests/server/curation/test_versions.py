"""Dataset versions as files: immutable, hash-chained, exported byte for byte the same."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from server.curation.splits import SPLITS
from server.curation.versions import (
    Box,
    DatasetVersion,
    ExportError,
    VersionError,
    VersionSample,
    VersionStore,
    chain_hash,
    export_yolo,
    grow_splits,
    tally,
)

CLASSES = ("circle", "square", "triangle")


def image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return path


def add_version(store: VersionStore, tmp: Path, n: int, start: int, splits=("train", "val", "test")) -> DatasetVersion:
    parent = store.latest()
    added = []
    for i in range(start, start + n):
        rel, sha = store.keep_image(image(tmp / f"src{i}.jpg", i))
        added.append(
            VersionSample(
                frame_id=f"frame-{i:04d}",
                split=splits[i % len(splits)],
                image=rel,
                image_sha256=sha,
                width=64,
                height=48,
                device_id="cam",
                batch=f"batch-{start:03d}",
                boxes=(Box(label=CLASSES[i % 3], box=(0.1, 0.2, 0.3 + i / 1000, 0.4)),),
            )
        )
    everything = (store.samples(parent.id) if parent else []) + added
    counts, class_counts = tally(everything, CLASSES)
    splits = grow_splits(parent.splits if parent else {}, added)
    version = DatasetVersion(
        id=store.next_id(),
        parent=parent.id if parent else None,
        created="2026-12-02T00:00:00Z",
        batch=f"batch-{start:03d}",
        classes=CLASSES,
        added=tuple(added),
        splits=splits,
        counts=counts,
        class_counts=class_counts,
        test_frozen=False,
        labels_sha256=chain_hash(parent.labels_sha256 if parent else "", CLASSES, added),
    )
    store.write(version)
    return version


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path) -> VersionStore:
    store = VersionStore(tmp_path / "curation")
    add_version(store, tmp_path, 6, 0)
    add_version(store, tmp_path, 3, 100, splits=("train",))
    return store


def test_versions_chain_and_list_every_sample(store):
    assert store.ids() == ["ds-0001", "ds-0002"]
    v2 = store.load("ds-0002")
    assert v2.parent == "ds-0001" and v2.counts == {"train": 5, "val": 2, "test": 2}
    assert len(store.samples("ds-0002")) == 9 and len(store.samples("ds-0001")) == 6
    assert store.splits("ds-0001") == {
        "train": ["frame-0000", "frame-0003"],
        "val": ["frame-0001", "frame-0004"],
        "test": ["frame-0002", "frame-0005"],
    }
    assert store.next_id() == "ds-0003"


def test_a_version_is_never_rewritten_and_its_file_is_read_only(store):
    with pytest.raises(VersionError, match="never rewritten"):
        store.write(store.load("ds-0002"))
    assert not os.access(store.dir / "ds-0001.json", os.W_OK) or os.geteuid() == 0
    assert (store.dir / "ds-0001.json").stat().st_mode & 0o222 == 0


def test_an_altered_record_is_refused(store, tmp_path):
    path = store.dir / "ds-0001.json"
    doc = json.loads(path.read_text())
    doc["added"][0]["boxes"][0]["label"] = "square"
    path.chmod(0o644)
    path.write_text(json.dumps(doc))
    with pytest.raises(VersionError, match="labels_sha256"):
        VersionStore(store.root).load("ds-0002")  # the child checks its ancestors too
    doc["added"][0]["boxes"][0]["label"] = "circle"  # back as it was: the hash holds again
    doc["splits"]["train"].append("frame-9999")  # a sample the record never added
    path.write_text(json.dumps(doc))
    with pytest.raises(VersionError, match="splits are not"):
        VersionStore(store.root).load("ds-0001")
    with pytest.raises(VersionError, match="unknown dataset version ds-0009"):
        store.load("ds-0009")
    with pytest.raises(VersionError, match="not a dataset version id"):
        store.load("v1")


def test_export_is_yolo_and_byte_identical_twice(store, tmp_path):
    first = export_yolo(store, "ds-0002", tmp_path / "a")
    second = export_yolo(store, "ds-0002", tmp_path / "elsewhere" / "b")
    assert tree(first.parent) == tree(second.parent)
    data = yaml.safe_load(first.read_text())
    assert "path" not in data and data["names"] == dict(enumerate(CLASSES))
    assert (data["train"], data["val"], data["test"]) == tuple(f"images/{s}" for s in SPLITS)
    labels = sorted((first.parent / "labels").rglob("*.txt"))
    assert len(labels) == 9 and len(list((first.parent / "images").rglob("*.jpg"))) == 9
    line = (first.parent / "labels" / "train" / "frame-0000.txt").read_text()
    assert line == "0 0.250000 0.400000 0.300000 0.400000\n"
    lineage = json.loads((first.parent / "edgeloop-version.json").read_text())
    assert lineage["id"] == "ds-0002" and lineage["labels_sha256"] == store.load("ds-0002").labels_sha256


def test_export_without_val_points_val_at_train(tmp_path):
    store = VersionStore(tmp_path / "c")
    add_version(store, tmp_path, 2, 0, splits=("train",))
    data = yaml.safe_load(export_yolo(store, "ds-0001", tmp_path / "out").read_text())
    assert data["val"] == "images/train" and "test" not in data


def test_export_refuses_a_non_empty_target_and_a_changed_image(store, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_yolo(store, "ds-0001", tmp_path / "full")
    victim = store.image_path(store.samples("ds-0001")[0])
    victim.chmod(0o644)
    victim.write_bytes(b"not the image")
    with pytest.raises(ExportError, match="changed since ds-0001"):
        export_yolo(store, "ds-0001", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))


def test_the_export_is_a_data_set_ultralytics_reads(store, tmp_path, ultralytics_offline):
    from ultralytics.data.utils import check_det_dataset

    data_yaml = export_yolo(store, "ds-0002", tmp_path / "yolo")
    info = check_det_dataset(str(data_yaml))
    assert Path(info["train"]) == (tmp_path / "yolo" / "images" / "train").resolve()
    assert info["nc"] == 3 and Path(info["test"]).is_dir()
