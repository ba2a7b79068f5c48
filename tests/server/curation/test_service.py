"""Curation against a real FiftyOne database, frames stored straight into an inbox: atomic approval
across a crash at either side of its commit point, the untagged rule, near-duplicates of the
training set, and the CLI's errors. (tests/test_curation.py runs the whole path from edge agents.)"""

from __future__ import annotations

import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeloop.domain import Detection, FrameRecord
from edgeloop.synth.scenarios import get_scenario
from edgeloop.synth.scenes import iter_scenes
from server.curation.config import CurationConfig
from server.curation.service import OTHER_BATCHES, TRAINING_SET, Curation
from server.curation.store import BatchStatus, CurationError, CurationStore
from server.curation.versions import VersionStore

pytestmark = pytest.mark.slow
CLASSES = ["circle", "square", "triangle"]


def records(tmp_path, n: int, seed: int, device: str = "cam-1"):
    """``n`` distinct still scenes as stored frames, predictions = truth, no edge embedding."""
    out = []
    for i, (image, labels) in enumerate(iter_scenes(get_scenario("shapes"), seed, n)):
        path = tmp_path / f"{seed}-{i}.jpg"
        cv2.imwrite(str(path), image)
        h, w = image.shape[:2]
        detections = [
            Detection(box=lab.to_xyxy(w, h), class_id=lab.class_id, class_name=CLASSES[lab.class_id], confidence=0.5)
            for lab in labels
        ]
        record = FrameRecord(
            frame_id=uuid.uuid4().hex,
            device_id=device,
            capture_time=1.8e9 + i,
            sequence=i,
            model_version="some-other-model",
            image=path.read_bytes(),
            media_type="image/jpeg",
            width=w,
            height=h,
            detections=detections,
            uncertainty=float(np.random.default_rng(i).uniform(0.2, 1.0)),
            class_names=CLASSES,
        )
        out.append((record, path))
    return out


@pytest.fixture
def curation(inbox, tmp_path, shapes_release):
    import fiftyone as fo

    inbox.add_records(records(tmp_path, 12, seed=5))
    config = CurationConfig(
        root=tmp_path / "curation",
        training_dataset=f"test-train-{uuid.uuid4().hex[:8]}",
        model={"path": shapes_release.onnx},
    )
    yield Curation(config, inbox_dataset=inbox.name)
    if fo.dataset_exists(config.training_dataset):
        fo.load_dataset(config.training_dataset).delete()


def state(curation: Curation) -> tuple:
    import fiftyone as fo

    store = CurationStore(curation.config.root)
    name = curation.config.training_dataset
    train = sorted(fo.load_dataset(name).values("frame_id")) if fo.dataset_exists(name) else []
    return [b.model_dump() for b in store.batches()], store.versions.ids(), train


def approve_all(curation: Curation, name: str) -> None:
    for sample in curation.inbox.load_saved_view(name):
        sample.tags.append("approved")
        sample.save()


def test_a_crash_before_the_version_record_changes_nothing(curation, monkeypatch):
    name = curation.next_batch(6, any_size=True).batch.name
    approve_all(curation, name)
    before = state(curation)

    def crash(self, record):
        raise OSError("disk gone")

    monkeypatch.setattr(VersionStore, "write", crash)
    with pytest.raises(OSError, match="disk gone"):
        curation.approve(name)
    assert state(curation) == before
    monkeypatch.undo()
    result = curation.approve(name)
    assert result.version.id == "ds-0001" and len(result.version.added) == 6


def test_a_crash_after_the_version_record_is_finished_by_the_next_call(curation, monkeypatch):
    name = curation.next_batch(6, any_size=True).batch.name
    approve_all(curation, name)
    real_save = CurationStore.save_batch

    def crash_when_approving(self, record):
        if record.status == BatchStatus.APPROVED:
            raise OSError("power cut")
        real_save(self, record)

    monkeypatch.setattr(CurationStore, "save_batch", crash_when_approving)
    with pytest.raises(OSError, match="power cut"):
        curation.approve(name)
    monkeypatch.undo()
    _, versions, train = state(curation)
    assert versions == ["ds-0001"]  # the approval happened: its version is recorded
    fresh = Curation(curation.config, inbox_dataset=curation.inbox_name, space=curation.space)
    fresh.repair()
    batches, versions, train = state(fresh)
    assert batches[0]["status"] == "approved" and batches[0]["version"] == "ds-0001"
    assert len(train) == 6 and fresh.approve(name).already


def test_a_dry_run_says_what_the_batch_would_be_and_takes_nothing(curation):
    before = state(curation)
    preview = curation.next_batch(6, any_size=True, dry_run=True)
    assert state(curation) == before and curation.unbatched_count() == 12
    assert preview.batch.name not in curation.inbox.list_saved_views()
    batch = curation.next_batch(6, any_size=True).batch
    assert (batch.name, batch.sample_ids) == (preview.batch.name, preview.batch.sample_ids)
    assert curation.unbatched_count() == 6 and batch.name in curation.inbox.list_saved_views()


def test_untagged_frames_follow_the_configured_rule(curation):
    name = curation.next_batch(6, any_size=True).batch.name
    samples = list(curation.inbox.load_saved_view(name))
    samples[0].tags.append("reject")
    samples[0].save()
    taken = Curation(
        curation.config.model_copy(update={"untagged": "approve"}),
        inbox_dataset=curation.inbox_name,
        space=curation.space,
    ).approve(name)
    assert len(taken.version.added) == 5 and taken.batch.rejected == [samples[0].frame_id]


def test_a_copy_of_a_training_frame_is_never_offered_again(curation, inbox, tmp_path):
    name = curation.next_batch(12, any_size=True).batch.name
    approve_all(curation, name)
    curation.approve(name)
    # The same scenes again from another camera, and a few new ones.
    (tmp_path / "again").mkdir()
    copies = records(tmp_path / "again", 4, seed=5, device="cam-2")
    (tmp_path / "new").mkdir()
    new = records(tmp_path / "new", 3, seed=77, device="cam-2")
    inbox.add_records(copies + new)
    result = curation.next_batch(10, any_size=True)
    assert result.skipped[TRAINING_SET] == 4 and result.skipped[OTHER_BATCHES] == 0
    picked = set(result.batch.frame_ids)
    assert not picked & {r.frame_id for r, _ in copies}
    assert {r.frame_id for r, _ in new} <= picked


def test_cli_errors_are_one_line_with_exit_status_2(curation, tmp_path):
    from typer.testing import CliRunner

    from edgeloop.cli import app

    config = tmp_path / "server.yaml"
    config.write_text(f"data_dir: {tmp_path / 'srv'}\ncuration: {{root: {curation.config.root}}}\n")
    runner = CliRunner()
    out = runner.invoke(app, ["curate", "export", "ds-0001", str(tmp_path / "x"), "--config", str(config)])
    assert out.exit_code == 2 and "unknown dataset version ds-0001" in out.output
    out = runner.invoke(app, ["curate", "versions", "--config", str(config)])
    assert out.exit_code == 0 and "No dataset versions yet" in out.output
    with pytest.raises(CurationError, match="outside 30-50"):
        curation.next_batch(12)


def _frame_ids(items) -> set[str]:
    import hashlib

    return {"import-" + hashlib.sha256(i.image.read_bytes()).hexdigest()[:24] for i in items}


def _server_yaml(curation: Curation, tmp_path, uri: str):
    path = tmp_path / "server.yaml"
    cfg = curation.config
    path.write_text(
        f"data_dir: {tmp_path / 'srv'}\nmongo: {{uri: '{uri}'}}\ninbox: {{dataset: {curation.inbox_name}}}\n"
        f"curation: {{root: {cfg.root}, training_dataset: {cfg.training_dataset}, model: {{path: {cfg.model.path}}}}}\n"
    )
    return path


def test_import_keeps_a_data_sets_own_splits_frame_by_frame_and_twice_adds_nothing(curation, fiftyone_env, tmp_path):
    """`edgeloop curate import` of a train/val/test data set: every image in the split it is declared in."""
    from typer.testing import CliRunner

    from edgeloop.cli import app
    from edgeloop.synth.scenes import write_dataset
    from edgeloop.yolo_dataset import load_yolo_dataset

    data_yaml = write_dataset(tmp_path / "seed", get_scenario("shapes"), n=40, seed=9, val_fraction=0.2,
                              test_fraction=0.25)  # fmt: skip
    source = load_yolo_dataset(data_yaml)
    declared = {split: _frame_ids(items) for split, items in source.splits.items()}
    assert {k: len(v) for k, v in declared.items()} == {"train": 22, "val": 8, "test": 10}
    config = _server_yaml(curation, tmp_path, fiftyone_env)
    runner = CliRunner()
    first = runner.invoke(app, ["curate", "import", str(data_yaml), "--config", str(config), "--json"])
    assert first.exit_code == 0, first.output
    version = curation.version("ds-0001")
    assert {k: set(v) for k, v in version.splits.items()} == declared  # by frame id, not only by count
    assert version.splits_from == "declared" and list(version.classes) == CLASSES
    # the labels survive the trip: export the version and read the same boxes back (as sets per image)
    exported = load_yolo_dataset(curation.export(version.id, tmp_path / "export"))

    def boxes(items):
        return sorted(
            tuple(round(v, 4) for v in (lab.class_id, lab.cx, lab.cy, lab.w, lab.h))
            for it in items
            for lab in it.labels()
        )

    for split in ("train", "val", "test"):
        assert boxes(exported.splits[split]) == boxes(source.splits[split]), split
    # importing the same images again adds nothing and writes no version; the splits stay as declared
    again = runner.invoke(app, ["curate", "import", str(data_yaml), "--config", str(config), "--json"])
    assert again.exit_code == 0, again.output
    assert [v.id for v in curation.versions()] == ["ds-0001"]
    assert {k: set(v) for k, v in curation.version("ds-0001").splits.items()} == declared
    assert "keeps them" in runner.invoke(app, ["curate", "import", "--help"]).output


def test_import_refuses_splits_that_disagree_with_the_training_sets(curation, tmp_path):
    """An image the training set holds in train, declared test elsewhere, would leak: refused, nothing written."""
    import shutil

    import yaml

    from edgeloop.synth.scenes import write_dataset

    data_yaml = write_dataset(tmp_path / "a", get_scenario("shapes"), n=20, seed=3, val_fraction=0.2,
                              test_fraction=0.2)  # fmt: skip
    curation.import_labelled(data_yaml)
    other = tmp_path / "b"
    shutil.copytree(tmp_path / "a", other)
    moved = sorted((other / "images" / "train").iterdir())[0]
    shutil.move(moved, other / "images" / "test" / moved.name)
    shutil.move(other / "labels" / "train" / (moved.stem + ".txt"), other / "labels" / "test" / (moved.stem + ".txt"))
    doc = yaml.safe_load((other / "data.yaml").read_text())
    doc["path"] = str(other)
    (other / "data.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(CurationError, match="another split than the training set holds them"):
        curation.import_labelled(other / "data.yaml")
    assert [v.id for v in curation.versions()] == ["ds-0001"]


def test_a_data_set_without_splits_is_split_by_the_policy_by_episode(curation, tmp_path):
    """Train only (val: points at the train images, as ultralytics needs): the policy splits it."""
    from edgeloop.synth.scenes import write_dataset

    data_yaml = write_dataset(tmp_path / "seed", get_scenario("shapes"), n=60, seed=9, val_fraction=0.0)
    version = curation.import_labelled(data_yaml)
    assert version.splits_from == "episodes" and version.size == 60
    assert version.counts["test"] >= 1 and version.counts["val"] >= 1 and version.counts["train"] >= 40
    assert curation.import_labelled(data_yaml).id == version.id


def test_the_flows_see_curation_through_the_server_provider(curation, fiftyone_env, tmp_path):
    """flows.curation's four calls over the server's curation state (server.curation.flows_provider)."""
    import yaml

    from edgeloop.synth.scenes import write_dataset
    from flows.curation import Curation as FlowsCuration
    from flows.curation import DatasetVersionError
    from server.curation.flows_provider import factory

    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "server"),
                "mongo": {"uri": fiftyone_env},
                "inbox": {"dataset": curation.inbox_name},
                "curation": {
                    "root": str(curation.config.root),
                    "training_dataset": curation.config.training_dataset,
                    "model": {"path": str(curation.config.model.path)},
                },
            }
        )
    )
    provider = factory(str(config))
    assert isinstance(provider, FlowsCuration)
    assert provider.latest_version() is None
    first = curation.import_labelled(
        write_dataset(tmp_path / "a", get_scenario("shapes"), n=20, seed=3, test_fraction=0.2)
    )
    assert provider.latest_version() == first.id
    assert provider.unconsumed_samples(first.id, None) == 20
    assert provider.unconsumed_samples(first.id, first.id) == 0
    data_yaml = provider.export(first.id, tmp_path / "export")
    assert set(yaml.safe_load(data_yaml.read_text())) >= {"train", "val", "test", "names"}
    with pytest.raises(DatasetVersionError):
        provider.export("ds-0099", tmp_path / "nowhere")
    # a batch only once enough frames wait (the fixture's inbox holds 12)
    assert provider.next_batch(min_new=13) is None
    name = provider.next_batch(min_new=12)
    assert name == "batch-001" and name in curation.inbox.list_saved_views()
    assert provider.next_batch(min_new=1) != name  # batch-001 is never handed out again


def stream_records(tmp_path, scenes: int, per_scene: int, seed: int, device: str):
    """Camera-like frames: ``per_scene`` jittered frames of each scene 0.2 s apart, scenes a minute apart."""
    from edgeloop.synth.photo_stream import jitter
    from edgeloop.yolo_dataset import YoloLabel

    rng = np.random.default_rng(seed)
    out, scene_of = [], {}
    for s, (image, labels) in enumerate(iter_scenes(get_scenario("shapes"), seed, scenes)):
        h, w = image.shape[:2]
        yolo = [YoloLabel(lab.class_id, lab.cx, lab.cy, lab.w, lab.h) for lab in labels]
        for k in range(per_scene):
            frame = image if k == 0 else jitter(image, yolo, rng)[0]
            path = tmp_path / f"{device}-{s:03d}-{k}.jpg"
            cv2.imwrite(str(path), frame)
            record = FrameRecord(
                frame_id=uuid.uuid4().hex, device_id=device, capture_time=1.9e9 + 60 * s + 0.2 * k, sequence=k,
                model_version="some-other-model", image=path.read_bytes(), media_type="image/jpeg", width=w,
                height=h, uncertainty=float(rng.uniform(0.2, 1.0)), class_names=CLASSES, source_id="0",
                detections=[Detection(box=lab.to_xyxy(w, h), class_id=lab.class_id,
                                      class_name=CLASSES[lab.class_id], confidence=0.5) for lab in labels],
            )  # fmt: skip
            scene_of[record.frame_id] = (device, s)
            out.append((record, path))
    return out, scene_of


def test_a_stream_approved_in_batches_keeps_every_episode_in_one_split(curation, inbox, tmp_path):
    """Frames of one scene (same camera, 0.2 s apart) never land in two splits, batch after batch."""
    from server.curation.config import SplitConfig

    # high val/test shares so that this small stream exercises every split
    curation = Curation(
        curation.config.model_copy(update={"splits": SplitConfig(val_fraction=0.25, test_fraction=0.3)}),
        inbox_dataset=curation.inbox_name,
        space=curation.space,
    )
    scene_of = {}
    for device, seed in (("cam-1", 31), ("cam-2", 32)):
        (tmp_path / device).mkdir()
        items, scenes = stream_records(tmp_path / device, 15, 6, seed, device)
        inbox.add_records(items)
        scene_of.update(scenes)
    for _ in range(3):
        name = curation.next_batch(30).batch.name
        approve_all(curation, name)
        curation.approve(name)
    version = curation.latest_version()
    split_of = {f: split for split, ids in version.splits.items() for f in ids}
    by_scene: dict[tuple, set[str]] = {}
    for frame, scene in scene_of.items():
        if frame in split_of:
            by_scene.setdefault(scene, set()).add(split_of[frame])
    several = [s for s in by_scene if sum(1 for f, x in scene_of.items() if x == s and f in split_of) > 1]
    assert len(several) >= 5, "too few scenes with more than one approved frame: the test would prove nothing"
    assert all(len(splits) == 1 for splits in by_scene.values()), by_scene
    assert {s for splits in by_scene.values() for s in splits} == {"train", "val", "test"}
    assert curation.check_leaks().leaks == []  # and by the near-duplicate rule, none across splits


def test_check_leaks_finds_planted_identical_and_near_duplicate_leaks_and_exits_non_zero(
    curation, fiftyone_env, tmp_path
):
    import shutil

    import yaml
    from typer.testing import CliRunner

    from edgeloop.cli import app
    from edgeloop.synth.scenes import write_dataset
    from server.curation.review import Approved

    config = _server_yaml(curation, tmp_path, fiftyone_env)
    runner = CliRunner()
    data_yaml = write_dataset(tmp_path / "a", get_scenario("shapes"), n=30, seed=13, val_fraction=0.2,
                              test_fraction=0.2)  # fmt: skip
    curation.import_labelled(data_yaml)
    clean = runner.invoke(app, ["curate", "check-leaks", "--config", str(config)])
    assert clean.exit_code == 0 and "ds-0001: no leaks" in clean.output, clean.output
    tests = sorted((tmp_path / "a" / "images" / "test").iterdir())

    def twin_set(name: str, photo: Path, val_scene: int | None) -> Path:
        """A data set whose train split is a near-twin of ``photo`` (re-encoded, a little brighter)."""
        root = tmp_path / name
        splits = {"train": [np.clip(cv2.imread(str(photo)).astype(np.int16) + 3, 0, 255).astype(np.uint8)]}
        if val_scene is not None:
            splits["val"] = [next(iter_scenes(get_scenario("shapes"), val_scene, 1))[0]]
        for split, images in splits.items():
            (root / "images" / split).mkdir(parents=True)
            (root / "labels" / split).mkdir(parents=True)
            for k, image in enumerate(images):
                cv2.imwrite(str(root / "images" / split / f"{name}-{k}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 80])
                shutil.copy(tmp_path / "a" / "labels" / "test" / f"{photo.stem}.txt",
                            root / "labels" / split / f"{name}-{k}.txt")  # fmt: skip
        doc = {"path": str(root), **{k: f"images/{k}" for k in splits}, "names": dict(enumerate(CLASSES))}
        (root / "data.yaml").write_text(yaml.safe_dump(doc))
        return root / "data.yaml"

    # Split by the policy, a near-twin of a test photo joins that photo's episode: test, not train.
    joined = curation.import_labelled(twin_set("b", tests[0], None))
    assert [s.split for s in joined.added] == ["test"]
    # Declared train by a data set's own splits, a near-twin of another test photo is a leak...
    curation.import_labelled(twin_set("c", tests[2], 991))
    # ...and the same bytes as another test photo under another frame id, in train: what a per-frame split of
    # older versions could do (planted as such a version: today's episodes put identical bytes together).
    copy = Approved("", "planted-copy", str(tests[1]), 320, 240, "", ())
    with curation.store.lock():
        version = curation._new_version("import:planted:old", [copy], CLASSES, declared={"planted-copy": "train"})
        curation.store.versions.write(version)
        curation._follow_versions()
    leaky = runner.invoke(app, ["curate", "check-leaks", "--config", str(config)])
    assert leaky.exit_code == 1, leaky.output
    assert "2 of 7 test frames duplicate training frames (1 identical, 1 near-duplicates" in leaky.output
    assert "identical of  train planted-copy" in leaky.output and "near-duplicate of  train import-" in leaky.output
    view = curation.training.load_saved_view("leaks")
    assert len(view) == 4 and all(s["leaks"] for s in view)  # both sides of both pairs
    assert "leaks between splits" in " ".join(curation.report().warnings)


def test_a_pool_where_every_frame_holds_one_dominant_class_fills_its_batches(inbox, tmp_path, shapes_release,
                                                                              fiftyone_env):  # fmt: skip
    """Traffic, crowds, shelves: every frame holds the dominant class. The class cap yields instead of
    leaving the batch short (it used to stop at 40% of 30 = 12 frames); `curate next-batch` through the CLI."""
    import json

    import fiftyone as fo
    from typer.testing import CliRunner

    from edgeloop.cli import app

    rows = records(tmp_path, 90, seed=21)
    for i, (record, _) in enumerate(rows):
        w, h = record.width, record.height
        # Every frame: a "circle" (the dominant class) with a confidence that varies, so frames differ in need.
        record.detections.append(Detection(box=(2.0, 2.0, w / 4, h / 4), class_id=0, class_name="circle",
                                           confidence=0.3 + 0.6 * ((i * 37) % 90) / 90))  # fmt: skip
    inbox.add_records(rows)
    config = CurationConfig(
        root=tmp_path / "curation",
        training_dataset=f"test-train-{uuid.uuid4().hex[:8]}",
        model={"path": shapes_release.onnx},
    )
    curation = Curation(config, inbox_dataset=inbox.name)
    try:
        server_yaml = _server_yaml(curation, tmp_path, fiftyone_env)
        runner = CliRunner()
        sizes = []
        for _ in range(2):
            out = runner.invoke(app, ["curate", "next-batch", "--size", "30", "--config", str(server_yaml), "--json"])
            assert out.exit_code == 0, out.output
            batch = json.loads(out.output[out.output.index("{") :])
            sizes.append(len(batch["sample_ids"]))
            assert batch["selection"]["short_reason"] == "" and batch["selection"]["cap_yielded"] > 0
        assert sizes == [30, 30], "a dominant class in every frame must not leave the batches short"
        picked = curation.inbox.load_saved_view("batch-001")
        labels = [{d.label for d in s.predictions.detections} for s in picked]
        assert len(labels) == 30 and all("circle" in lab for lab in labels)
        assert all(s.picked_because.startswith("score ") for s in picked)
    finally:
        if fo.dataset_exists(config.training_dataset):
            fo.load_dataset(config.training_dataset).delete()
