"""Tests of the synthetic scene generator: determinism, exact labels, domain shifts, data sets, video, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from edgeloop.offline import offline_environment
from edgeloop.synth import (
    SCENARIOS,
    SceneParams,
    SynthError,
    UnknownScenarioError,
    YoloLabel,
    get_scenario,
    iter_scenes,
    iter_video_frames,
    render_scene,
    scenario_names,
    write_dataset,
)
from edgeloop.synth import scenes as scenes_mod
from edgeloop.synth.cli import synth_command

# Small frames keep the suite fast; the renderer has no special case for any size.
SMALL = {"width": 320, "height": 240}


def small(name: str = "shapes", **changes: object) -> SceneParams:
    return get_scenario(name).updated(**{**SMALL, **changes})


def clean(**changes: object) -> SceneParams:
    """Baseline without camera effects, so object pixels can be found exactly."""
    return small(blur_sigma=0.0, noise_sigma=0.0, brightness_gain=1.0, brightness_offset=0.0, **changes)


def object_diff(params: SceneParams, seed: int, index: int) -> tuple[np.ndarray, list[YoloLabel]]:
    """Where the scene differs from the same scene without objects (same background and clutter)."""
    scene = render_scene(params, seed, index)
    empty = render_scene(params.updated(objects_per_image=(0, 0)), seed, index)
    diff = np.abs(scene.image.astype(np.int16) - empty.image.astype(np.int16)).max(axis=2)
    return diff, scene.labels


def pixel_boxes(labels: list[YoloLabel], p: SceneParams) -> list[tuple[int, int, int, int]]:
    return [tuple(round(v) for v in lab.to_xyxy(p.width, p.height)) for lab in labels]  # type: ignore[misc]


def laplacian_var(image: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())


def high_freq(image: np.ndarray) -> float:
    f = image.astype(np.float32)
    return float(np.abs(f - cv2.GaussianBlur(f, (0, 0), 1.5)).mean())


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_images_and_labels():
    p = small()
    a, b = render_scene(p, 7, 3), render_scene(p, 7, 3)
    assert a.image.dtype == np.uint8 and a.image.shape == (240, 320, 3)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.labels == b.labels


def test_different_seed_or_index_gives_different_images():
    p = small()
    base = render_scene(p, 1, 0).image
    assert not np.array_equal(base, render_scene(p, 2, 0).image)
    assert not np.array_equal(base, render_scene(p, 1, 1).image)


def test_each_index_is_independent_of_the_ones_before():
    p = small()
    seq = list(iter_scenes(p, seed=5, n=4))
    assert len(seq) == 4
    assert np.array_equal(seq[3].image, render_scene(p, 5, 3).image)
    assert np.array_equal(next(iter_scenes(p, seed=5, start=2)).image, seq[2].image)


def test_camera_effects_keep_the_layout():
    # Paired images: lighting / blur / noise change the look, never where the objects are.
    p = small()
    assert render_scene(p, 3, 0).labels == render_scene(p.updated(blur_sigma=2, noise_sigma=9), 3, 0).labels


def test_negative_seed_is_rejected():
    with pytest.raises(ValueError, match="seed"):
        render_scene(small(), -1)


# ---------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize("name", scenario_names())
def test_labels_are_valid_yolo(name):
    p = small(name)
    n_labels = 0
    for image, labels in iter_scenes(p, seed=11, n=15):
        assert image.shape == (p.height, p.width, 3)
        for lab in labels:
            n_labels += 1
            assert 0 <= lab.class_id < len(p.classes)
            assert 0 < lab.w <= 1 and 0 < lab.h <= 1
            assert lab.w * p.width >= p.min_box_px and lab.h * p.height >= p.min_box_px
            x1, y1, x2, y2 = lab.to_xyxy(1, 1)
            assert -1e-9 <= x1 < x2 <= 1 + 1e-9 and -1e-9 <= y1 < y2 <= 1 + 1e-9
            assert lab.to_line().count(" ") == 4
    assert n_labels > 0


def test_boxes_are_tight_around_object_pixels():
    p = clean(objects_per_image=(2, 8))
    checked = 0
    for index in range(12):
        diff, labels = object_diff(p, seed=4, index=index)
        changed = diff > 0
        inside = np.zeros_like(changed)
        for x1, y1, x2, y2 in pixel_boxes(labels, p):
            box = changed[y1:y2, x1:x2]
            # Each box holds object pixels, and its outer rows and columns touch them (tight box).
            assert box.mean() > 0.25
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            inside[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1] = True
            checked += 1
        # Nothing changes outside the boxes but the faint anti-aliased rim of a shape.
        assert np.count_nonzero(changed & ~inside) <= 0.002 * changed.size
        assert diff[~inside].max(initial=0) < 128
    assert checked > 20


def test_objects_partly_outside_the_frame_are_clipped():
    p = clean(objects_per_image=(6, 10), object_scale=(0.3, 0.4))
    edges = 0
    for _, labels in iter_scenes(p, seed=2, n=20):
        for x1, y1, x2, y2 in (lab.to_xyxy(1, 1) for lab in labels):
            edges += min(x1, y1) < 1e-6 or max(x2, y2) > 1 - 1e-6
    assert edges > 0


def test_crowded_scenes_keep_every_labelled_object_mostly_visible():
    p = small("shapes-crowded", noise_sigma=0.0)
    counts = [len(labels) for _, labels in iter_scenes(p, seed=0, n=5)]
    assert min(counts) >= 6  # crowded means crowded, even after placement rejections


# ---------------------------------------------------------------------------------------------
# Domain shifts: each knob moves image statistics the expected way, on paired images


def test_lower_gain_is_darker():
    base, dark = small(), small(brightness_gain=0.4, brightness_offset=-5)
    for i in range(3):
        assert render_scene(dark, 1, i).image.mean() < 0.5 * render_scene(base, 1, i).image.mean()


def test_blur_reduces_laplacian_variance():
    sharp, blurred = small(), small(blur_sigma=2.0)
    for i in range(3):
        assert laplacian_var(render_scene(blurred, 1, i).image) < 0.3 * laplacian_var(render_scene(sharp, 1, i).image)


def test_noise_adds_high_frequency_energy():
    quiet, noisy = small(), small(noise_sigma=12.0)
    for i in range(3):
        assert high_freq(render_scene(noisy, 1, i).image) > 2 * high_freq(render_scene(quiet, 1, i).image)


def test_named_scenarios_shift_in_the_expected_direction():
    def mean_stat(name, stat):
        return np.mean([stat(img) for img, _ in iter_scenes(small(name), seed=9, n=6)])

    assert mean_stat("shapes-night", np.mean) < 0.4 * mean_stat("shapes", np.mean)
    assert mean_stat("shapes-blur", laplacian_var) < 0.3 * mean_stat("shapes", laplacian_var)
    assert mean_stat("shapes-night", high_freq) > mean_stat("shapes", high_freq)  # sensor noise

    def boxes(name):
        return [lab for _, labels in iter_scenes(small(name), seed=9, n=20) for lab in labels]

    base, shifted, crowded = boxes("shapes"), boxes("shapes-shifted"), boxes("shapes-crowded")
    area = lambda labs: np.mean([lab.w * lab.h for lab in labs])  # noqa: E731
    assert area(shifted) < 0.5 * area(base)
    assert len(crowded) > 2 * len(base)


def test_outline_appearance_covers_less_of_its_box_than_filled():
    def fill_ratio(p):
        ratios = []
        for i in range(6):
            diff, labels = object_diff(p, seed=3, index=i)
            for x1, y1, x2, y2 in pixel_boxes(labels, p):
                ratios.append(np.mean(diff[y1:y2, x1:x2] > 0))
        return np.mean(ratios)

    filled = fill_ratio(clean(objects_per_image=(1, 1)))
    hollow = fill_ratio(clean(objects_per_image=(1, 1), appearances=["outline"]))
    assert hollow < 0.75 * filled


def test_textured_appearance_adds_texture_inside_objects():
    def inner_std(p):
        stds = []
        for i in range(6):
            scene = render_scene(p, 3, i)
            for x1, y1, x2, y2 in pixel_boxes(scene.labels, p):
                cx, cy, q = (x1 + x2) // 2, (y1 + y2) // 2, max(2, (x2 - x1) // 8)
                patch = scene.image[cy - q : cy + q, cx - q : cx + q].reshape(-1, 3).astype(np.float32)
                stds.append(patch.std(axis=0).mean())  # spatial spread, per channel
        return np.mean(stds)

    p = clean(objects_per_image=(1, 1), object_scale=(0.3, 0.4))
    assert inner_std(p.updated(appearances=["textured"])) > 3 * inner_std(p)


def test_palette_shift_moves_object_colors():
    # Hue 120 degrees is green: objects drawn from a narrow green palette are green where they differ.
    p = clean(hue_range=(110.0, 130.0), saturation_range=(0.9, 1.0), value_range=(0.8, 1.0))
    scene = render_scene(p, 2, 0)
    diff, _ = object_diff(p, 2, 0)
    obj = scene.image[diff > 64].astype(np.float32)
    assert obj.size and obj[:, 1].mean() > obj[:, 0].mean() + 60 and obj[:, 1].mean() > obj[:, 2].mean() + 60


def test_appearance_classes_limit_the_new_look_to_those_classes():
    p = clean(appearances=["outline"], appearance_classes=["square"], objects_per_image=(6, 6))
    rng = np.random.default_rng(0)
    looks = [scenes_mod._sample_object(rng, p, 0, 0) for _ in range(60)]
    assert {(o.shape, o.appearance) for o in looks} <= {
        ("square", "outline"),
        ("circle", "filled"),
        ("triangle", "filled"),
    }


# ---------------------------------------------------------------------------------------------
# Parameters and scenarios


def test_scene_params_reject_bad_values():
    with pytest.raises(ValidationError):
        SceneParams(objects_per_image=(5, 2))
    with pytest.raises(ValidationError):
        SceneParams(colour="red")  # typo: extra keys are errors
    with pytest.raises(ValidationError):
        SceneParams(classes=["circle", "blob"])
    with pytest.raises(ValidationError):
        SceneParams(classes=["circle"], appearance_classes=["square"])
    with pytest.raises(ValidationError):
        SceneParams().updated(blur_sigma=-1)


def test_scene_params_round_trip_through_json():
    p = get_scenario("shapes-shifted")
    assert SceneParams.model_validate(p.model_dump(mode="json")) == p
    assert all(f.description for f in SceneParams.model_fields.values())


def test_get_scenario_returns_copies_and_names_the_known_ones():
    assert scenario_names()[0] == "shapes"
    assert {"shapes", "shapes-night", "shapes-blur", "shapes-shifted", "shapes-crowded"} <= set(scenario_names())
    p = get_scenario("shapes")
    p.blur_sigma = 5.0
    assert SCENARIOS["shapes"].blur_sigma == 0.0
    with pytest.raises(UnknownScenarioError, match="shapes-night"):
        get_scenario("nope")


# ---------------------------------------------------------------------------------------------
# Data sets on disk


def read_labels(path: Path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines()]


def test_write_dataset_layout_and_data_yaml(tmp_path):
    p = small()
    data_yaml = write_dataset(tmp_path / "ds", p, n=10, seed=3, val_fraction=0.2)
    root = tmp_path / "ds"
    assert data_yaml == root / "data.yaml"
    data = yaml.safe_load(data_yaml.read_text())
    assert Path(data["path"]).is_absolute() and Path(data["path"]) == root.resolve()
    assert (data["train"], data["val"]) == ("images/train", "images/val")
    assert data["names"] == {0: "circle", 1: "square", 2: "triangle"}
    for split, count in (("train", 8), ("val", 2)):
        images = sorted((root / "images" / split).iterdir())
        labels = sorted((root / "labels" / split).iterdir())
        assert len(images) == len(labels) == count
        assert [i.stem for i in images] == [lab.stem for lab in labels]
        for image_path, label_path in zip(images, labels, strict=True):
            image = cv2.imread(str(image_path))
            assert image.shape == (240, 320, 3)
            for row in read_labels(label_path):
                assert len(row) == 5 and row[0] in (0, 1, 2) and all(0 <= v <= 1 for v in row[1:])
    # The provenance block reproduces the data set.
    info = data["edgeloop_synth"]
    assert SceneParams.model_validate(info["params"]) == p
    assert (info["seed"], info["n"], info["train"], info["val"]) == (3, 10, 8, 2)
    written = read_labels(root / "labels" / "train" / "000000.txt")
    expected = [list(lab) for lab in render_scene(p, 3, 0).labels]
    assert len(written) == len(expected) > 0
    assert np.allclose(written, expected, atol=1e-6)


def test_write_dataset_is_byte_identical_for_a_seed(tmp_path):
    p = small()
    write_dataset(tmp_path / "a", p, n=5, seed=1)
    write_dataset(tmp_path / "b", p, n=5, seed=1)
    write_dataset(tmp_path / "c", p, n=5, seed=2)
    files = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a").rglob("*") if f.is_file())
    files.remove(Path("data.yaml"))  # holds its own absolute path
    assert len(files) == 10
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_write_dataset_refuses_to_mix_with_an_existing_one(tmp_path):
    p = small()
    write_dataset(tmp_path, p, n=10, seed=0)
    with pytest.raises(SynthError, match="overwrite"):
        write_dataset(tmp_path, p, n=4, seed=0)
    write_dataset(tmp_path, p, n=4, seed=0, overwrite=True)
    assert len(list((tmp_path / "images").rglob("*.jpg"))) == 4  # no stale images from the first run


def test_write_dataset_without_val_points_val_at_train(tmp_path):
    data = yaml.safe_load(
        write_dataset(tmp_path, small(), n=3, seed=0, val_fraction=0.0, image_format="png").read_text()
    )
    assert data["val"] == "images/train"
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 3


# ---------------------------------------------------------------------------------------------
# Video


def test_video_frames_are_temporally_coherent():
    p = small(objects_per_image=(4, 6))
    frames = list(iter_video_frames(p, 40, seed=1))
    assert len(frames) == 40
    step = np.mean(
        [np.abs(a.image.astype(np.int16) - b.image).mean() for a, b in zip(frames, frames[1:], strict=False)]
    )
    jump = np.abs(render_scene(p, 1, 0).image.astype(np.int16) - render_scene(p, 1, 1).image).mean()
    assert step < 0.2 * jump
    # Most objects reappear next frame, same class, a few pixels away: a tracker can follow them.
    matched = total = 0
    max_move = p.motion[1] * min(p.width, p.height) + 6
    for a, b in zip(frames, frames[1:], strict=False):
        for la in a.labels:
            total += 1
            matched += any(
                lb.class_id == la.class_id
                and abs(lb.cx - la.cx) * p.width <= max_move
                and abs(lb.cy - la.cy) * p.height <= max_move
                for lb in b.labels
            )
    assert total > 100 and matched / total > 0.9


def test_video_is_deterministic_and_objects_keep_coming():
    p = small(objects_per_image=(3, 3), motion=(0.03, 0.05))  # fast, so objects leave and new ones enter
    a = list(iter_video_frames(p, 60, seed=4))
    b = list(iter_video_frames(p, 60, seed=4))
    assert all(np.array_equal(x.image, y.image) and x.labels == y.labels for x, y in zip(a, b, strict=True))
    assert sum(len(f.labels) for f in a[-10:]) > 0


def test_write_dataset_with_video(tmp_path):
    p = small()
    data_yaml = write_dataset(tmp_path, p, n=12, seed=0, video=True, fps=10)
    info = yaml.safe_load(data_yaml.read_text())["edgeloop_synth"]
    video = tmp_path / info["video"]
    assert video.name == "video.mp4" and video.exists()
    cap = cv2.VideoCapture(str(video))
    try:
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    assert len(frames) == 12 and frames[0].shape == (240, 320, 3)
    assert len(list((tmp_path / "video_labels").glob("*.txt"))) == 12


def test_video_falls_back_to_mjpg_when_mp4v_is_missing(tmp_path, monkeypatch, caplog):
    real_writer, mp4v = cv2.VideoWriter, cv2.VideoWriter_fourcc(*"mp4v")

    def writer(path, fourcc, *args):
        # Like an OpenCV build without the mp4v encoder: that writer does not open.
        return _Closed() if fourcc == mp4v else real_writer(path, fourcc, *args)

    class _Closed:
        def isOpened(self):  # noqa: N802 - OpenCV's name
            return False

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoWriter", writer)
    path = scenes_mod.write_video(tmp_path / "video.mp4", small(), 5, seed=0)
    assert path.suffix == ".avi" and "MJPG" in caplog.text
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    cap.release()


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def cli():
    app = typer.Typer()
    app.command()(synth_command)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_cli_writes_a_dataset(cli, tmp_path):
    out = tmp_path / "ds"
    result = cli(out, "--scenario", "shapes-night", "--n", 6, "--seed", 2, "--imgsz", "96x64", "--video")
    assert result.exit_code == 0, result.output
    assert "data.yaml" in result.output and "video" in result.output
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["edgeloop_synth"]["scenario"] == "shapes-night"
    assert cv2.imread(str(next((out / "images" / "train").iterdir()))).shape == (64, 96, 3)
    assert (out / "video.mp4").exists()


def test_cli_rejects_unknown_scenario_and_lists_names(cli, tmp_path):
    result = cli(tmp_path, "--scenario", "mars")
    assert result.exit_code == 2
    assert "mars" in result.output and "shapes-crowded" in result.output


def test_cli_rejects_bad_imgsz_and_existing_output(cli, tmp_path):
    assert cli(tmp_path, "--imgsz", "big").exit_code == 2
    assert cli(tmp_path, "--n", 2).exit_code == 0
    again = cli(tmp_path, "--n", 2)
    assert again.exit_code == 1 and "overwrite" in again.output
    assert cli(tmp_path, "--n", 2, "--overwrite").exit_code == 0


def test_cli_help_names_scenarios(cli):
    result = cli("--help")
    assert result.exit_code == 0 and "shapes-shifted" in result.output


# ---------------------------------------------------------------------------------------------
# ultralytics accepts the format


@pytest.mark.slow
def test_ultralytics_trains_one_epoch_on_a_generated_set(tmp_path):
    pytest.importorskip("ultralytics")
    data_yaml = write_dataset(tmp_path / "ds", small(width=128, height=96), n=16, seed=0, val_fraction=0.25)
    env = {**os.environ, **offline_environment(tmp_path / "state")}
    # A fresh process: ultralytics reads its settings directory once, at import.
    script = textwrap.dedent(f"""
        from ultralytics import YOLO
        model = YOLO("yolov8n.yaml")
        model.train(data={str(data_yaml)!r}, imgsz=64, epochs=1, batch=8, workers=0, device="cpu",
                    plots=False, project={str(tmp_path / "runs")!r}, name="t", exist_ok=True, verbose=False)
        print("METRICS", sorted(model.trainer.metrics))
    """)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "METRICS" in result.stdout
    assert (tmp_path / "runs" / "t" / "weights" / "last.pt").exists()
    # ultralytics found every image and a valid label file for each (none corrupt, none empty).
    log = result.stdout + result.stderr
    assert "12 images, 0 backgrounds, 0 corrupt" in log and "4 images, 0 backgrounds, 0 corrupt" in log
