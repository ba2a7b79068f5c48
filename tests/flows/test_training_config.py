"""Training and augmentation config: wrong keys and values fail naming the field; presets give their
documented ultralytics arguments, which ultralytics itself accepts; the preview writes images."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
from pydantic import ValidationError

from edgeloop.config_base import ConfigError
from flows.config import load_flows_config
from flows.training.config import (
    AUGMENTATION_KEYS,
    AUGMENTATION_PRESETS,
    AugmentationConfig,
    TrainingConfig,
    augmentation_preset,
)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"augmentation": {"degrees": 400}}, "augmentation.degrees"),
        ({"augmentation": {"flipud": 1.5}}, "augmentation.flipud"),
        ({"augmentation": {"perspective": 0.01}}, "augmentation.perspective"),
        ({"augmentation": {"hsv": 0.1}}, "augmentation.hsv"),
        ({"augmentation": {"preset": "underwater"}}, "augmentation.preset"),
        ({"augmentation": "upside-down"}, "augmentation.preset"),
        ({"imgsz": 300}, "imgsz"),
        ({"epochs": 0}, "epochs"),
        ({"lr0": 0}, "lr0"),
        ({"optimizer": "auto"}, "optimizer"),
        ({"device": "gpu"}, "device"),
        ({"init": "pretrained"}, "init"),
        ({"epoch": 10}, "epoch"),
    ],
)
def test_invalid_values_fail_naming_the_field(data, field):
    with pytest.raises(ValidationError) as info:
        TrainingConfig.model_validate(data)
    locations = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert any(loc == field or loc.startswith(field + ".") for loc in locations), (field, locations)


def test_a_config_file_error_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "flows.yaml"
    path.write_text("training:\n  augmentation:\n    preset: vehicles\n    flipud: 2\n")
    with pytest.raises(ConfigError) as info:
        load_flows_config(path)
    assert str(path) in str(info.value) and "training.augmentation.flipud" in str(info.value)


@pytest.mark.parametrize("name", sorted(AUGMENTATION_PRESETS))
def test_each_preset_yields_its_documented_ultralytics_arguments(name):
    args = augmentation_preset(name).ultralytics_args()
    assert args == {key: float(AUGMENTATION_PRESETS[name][key]) for key in AUGMENTATION_KEYS}
    # ultralytics itself accepts every argument and value (its own name and range checks).
    ultralytics_cfg = pytest.importorskip("ultralytics.cfg")
    merged = ultralytics_cfg.get_cfg(ultralytics_cfg.DEFAULT_CFG, TrainingConfig(augmentation=name).ultralytics_args())
    assert all(getattr(merged, key) == value for key, value in args.items())


def test_presets_keep_examples_like_the_real_scene():
    """The reasons in flows.training.config's docstring, as numbers."""
    fixed = augmentation_preset("fixed-camera").ultralytics_args()
    assert fixed["degrees"] == fixed["shear"] == fixed["perspective"] == fixed["flipud"] == 0.0
    assert fixed["hsv_v"] >= AUGMENTATION_PRESETS["default"]["hsv_v"]  # lighting is what changes
    vehicles = augmentation_preset("vehicles").ultralytics_args()
    assert vehicles["flipud"] == 0.0 and vehicles["degrees"] == 0.0 and vehicles["fliplr"] > 0
    assert augmentation_preset("aerial").ultralytics_args()["flipud"] > 0
    assert set(augmentation_preset("none").ultralytics_args().values()) == {0.0}


def test_an_explicit_knob_wins_over_its_preset():
    aug = AugmentationConfig.model_validate({"preset": "vehicles", "degrees": 5})
    assert aug.degrees == 5 and aug.perspective == AUGMENTATION_PRESETS["vehicles"]["perspective"]
    assert TrainingConfig.model_validate({"augmentation": "fixed-camera"}).augmentation.translate == 0.05


def test_ultralytics_args_carry_the_schedule_and_device():
    args = TrainingConfig(epochs=6, close_mosaic=10, freeze=10, device="cpu", optimizer="AdamW").ultralytics_args()
    assert args["close_mosaic"] == 2  # a third of a short run, so mosaic is not off from the start
    assert (args["freeze"], args["device"], args["optimizer"], args["epochs"]) == (10, "cpu", "AdamW", 6)
    assert "freeze" not in TrainingConfig().ultralytics_args()
    assert TrainingConfig(device="auto").resolved_device() in {"cpu", "0"}


def test_preview_writes_augmented_images(tmp_path, ultralytics_offline):
    from edgeloop.synth.scenarios import get_scenario
    from edgeloop.synth.scenes import write_dataset
    from flows.training.augment_preview import preview_augmentation

    data = write_dataset(tmp_path / "data", get_scenario("shapes").updated(width=160, height=120), n=8, seed=0)
    written = preview_augmentation(
        data, tmp_path / "preview", TrainingConfig(imgsz=128, augmentation="vehicles"), count=5
    )
    assert [p.name for p in written] == [f"augmented-{i:03d}.jpg" for i in range(5)]
    for path in written:
        image = cv2.imread(str(path))
        assert image is not None and image.shape == (128, 128, 3)
    # Augmentation is random but seeded: the same seed gives the same images.
    again = preview_augmentation(data, tmp_path / "again", TrainingConfig(imgsz=128, augmentation="vehicles"), count=5)
    assert all(Path(a).read_bytes() == Path(b).read_bytes() for a, b in zip(written, again, strict=True))


def test_preview_cli_names_a_bad_preset(tmp_path):
    from typer.testing import CliRunner

    from edgeloop.cli import app

    result = CliRunner().invoke(app, ["train", "preview-augmentation", "x.yaml", str(tmp_path), "--preset", "wobbly"])
    assert result.exit_code == 2 and "augmentation.preset" in result.output
