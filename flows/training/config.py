"""Training configuration: one validated pydantic model for a training run and its augmentation.

:class:`TrainingConfig` holds what decides a run (where it starts from, schedule, optimizer,
device, image size) and :class:`AugmentationConfig` the image augmentations, both mapped onto
ultralytics' ``YOLO.train`` arguments by :meth:`TrainingConfig.ultralytics_args`. A wrong key or
an out-of-range value fails at validation with a message naming the field, long before a GPU is
booked.

Augmentation presets (:data:`AUGMENTATION_PRESETS`) are named starting points; a config names one
with ``preset:`` and may override single knobs beside it. The rule behind every preset: an
augmentation must produce images the camera could really have taken. A fixed camera never rolls,
never sees its scene upside down and never changes its perspective; cars never drive on the
ceiling. Augmentations that make examples unlike the real scene spend the model's capacity on
images it will never see.

==================  ==============================================================================
preset              for
==================  ==============================================================================
``default``         ultralytics' own defaults (HSV jitter, translate 0.1, scale 0.5, left-right
                    flips, mosaic); a generic starting point.
``fixed-camera``    a camera bolted to a wall: no rotation, shear, perspective or vertical flips;
                    small translation and scale (objects appear at known distances); strong
                    brightness jitter (day, night, clouds are what changes).
``vehicles``        road and parking cameras: no vertical flips and no rotation (vehicles stay
                    upright on a level road), mirror images allowed (traffic in both directions),
                    scale 0.5 (near and far lanes), a touch of perspective (camera heights differ).
``aerial``          top-down drones and satellites: any orientation is real, so vertical flips and
                    full rotation are on.
``none``            no augmentation at all: debugging, and comparisons where augmentation would
                    blur the effect under study.
==================  ==============================================================================
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgeloop.config_base import StrictModel

#: The offline stand-in for ultralytics' yolov8n.pt (COCO-pretrained), relative to the repository root.
DEFAULT_BASE_CHECKPOINT = Path("../shared/models/yolov8n_coco_dequant.pt")
#: The architecture a from-scratch run builds (bundled with ultralytics: nothing is downloaded).
DEFAULT_ARCHITECTURE = "yolov8n.yaml"
#: Layers 0-9 of a YOLOv8 are its backbone: ``freeze: 10`` trains the neck and head only.
YOLOV8_BACKBONE_LAYERS = 10
#: ultralytics' stride: the input size must be a multiple of it.
STRIDE = 32

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda|cuda:\d+|\d+(,\d+)*)$")

#: The ultralytics arguments of each augmentation field (same names; listed to keep the mapping explicit).
AUGMENTATION_KEYS = (
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "degrees",
    "translate",
    "scale",
    "shear",
    "perspective",
    "flipud",
    "fliplr",
    "mosaic",
    "mixup",
)

#: Named augmentation presets (see the module docstring for the reasoning behind each).
AUGMENTATION_PRESETS: dict[str, dict[str, float]] = {
    "default": {
        "hsv_h": 0.015,
        "hsv_s": 0.7,
        "hsv_v": 0.4,
        "degrees": 0.0,
        "translate": 0.1,
        "scale": 0.5,
        "shear": 0.0,
        "perspective": 0.0,
        "flipud": 0.0,
        "fliplr": 0.5,
        "mosaic": 1.0,
        "mixup": 0.0,
    },
    "fixed-camera": {
        "hsv_h": 0.01,
        "hsv_s": 0.5,
        "hsv_v": 0.5,
        "degrees": 0.0,
        "translate": 0.05,
        "scale": 0.25,
        "shear": 0.0,
        "perspective": 0.0,
        "flipud": 0.0,
        "fliplr": 0.5,
        "mosaic": 1.0,
        "mixup": 0.0,
    },
    "vehicles": {
        "hsv_h": 0.015,
        "hsv_s": 0.6,
        "hsv_v": 0.45,
        "degrees": 0.0,
        "translate": 0.1,
        "scale": 0.5,
        "shear": 0.0,
        "perspective": 0.0002,
        "flipud": 0.0,
        "fliplr": 0.5,
        "mosaic": 1.0,
        "mixup": 0.05,
    },
    "aerial": {
        "hsv_h": 0.015,
        "hsv_s": 0.7,
        "hsv_v": 0.4,
        "degrees": 180.0,
        "translate": 0.1,
        "scale": 0.5,
        "shear": 0.0,
        "perspective": 0.0,
        "flipud": 0.5,
        "fliplr": 0.5,
        "mosaic": 1.0,
        "mixup": 0.0,
    },
    "none": {key: 0.0 for key in AUGMENTATION_KEYS},
}

PresetName = Literal["default", "fixed-camera", "vehicles", "aerial", "none"]


class AugmentationConfig(StrictModel):
    """Image augmentation during training, as ultralytics applies it to images and boxes.

    ``preset`` fills every knob not set explicitly; an explicit value wins over the preset's.
    """

    preset: PresetName = Field("default", description="Named starting point; see flows.training.config.")
    hsv_h: float = Field(0.015, ge=0.0, le=1.0, description="Hue jitter, fraction of the hue circle.")
    hsv_s: float = Field(0.7, ge=0.0, le=1.0, description="Saturation jitter, fraction.")
    hsv_v: float = Field(0.4, ge=0.0, le=1.0, description="Brightness (value) jitter, fraction.")
    degrees: float = Field(0.0, ge=0.0, le=180.0, description="Rotation, +/- degrees.")
    translate: float = Field(0.1, ge=0.0, le=1.0, description="Translation, +/- fraction of the image size.")
    scale: float = Field(0.5, ge=0.0, le=1.0, description="Scale gain, +/- (0.5: 50% to 150%).")
    shear: float = Field(0.0, ge=0.0, le=90.0, description="Shear, +/- degrees.")
    perspective: float = Field(
        0.0, ge=0.0, le=0.001, description="Perspective warp fraction (ultralytics: 0-0.001 is the useful range)."
    )
    flipud: float = Field(0.0, ge=0.0, le=1.0, description="Probability of an upside-down flip.")
    fliplr: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a left-right mirror.")
    mosaic: float = Field(1.0, ge=0.0, le=1.0, description="Probability of a 4-image mosaic.")
    mixup: float = Field(0.0, ge=0.0, le=1.0, description="Probability of blending two images (MixUp).")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, str):  # `augmentation: vehicles` names a preset alone
            data = {"preset": data}
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "default")
        values = AUGMENTATION_PRESETS.get(preset) if isinstance(preset, str) else None
        if values is None:
            return data  # the Literal on `preset` reports the unknown name
        return {**values, **data}

    def ultralytics_args(self) -> dict[str, float]:
        """The ``YOLO.train`` keyword arguments of this augmentation."""
        return {key: float(getattr(self, key)) for key in AUGMENTATION_KEYS}


def augmentation_preset(name: str) -> AugmentationConfig:
    """The named preset as a config (raises pydantic's ValidationError naming ``preset`` for an unknown name)."""
    return AugmentationConfig(preset=name)  # type: ignore[arg-type]


Optimizer = Literal["SGD", "Adam", "AdamW", "NAdam", "RAdam", "RMSProp"]


class TrainingConfig(StrictModel):
    """How to train a candidate model: where from, how long, how, on what device."""

    init: Literal["production", "base", "scratch"] = Field(
        "production",
        description="Where training starts: 'production' fine-tunes the production model's checkpoint "
        "(falls back to 'base' for a project's first model or when the classes changed), 'base' the "
        "pretrained base checkpoint (head rebuilt for the project's classes), 'scratch' random weights.",
    )
    base_checkpoint: Path = Field(
        DEFAULT_BASE_CHECKPOINT,
        description="Pretrained ultralytics checkpoint (.pt) a project's first model starts from.",
    )
    architecture: str = Field(
        DEFAULT_ARCHITECTURE,
        description="Model definition for init 'scratch' (an ultralytics model .yaml: bundled, never downloaded).",
    )
    freeze: int = Field(
        0,
        ge=0,
        le=24,
        description=f"Freeze the first N layers (0: train everything; {YOLOV8_BACKBONE_LAYERS}: a YOLOv8's backbone).",
    )
    epochs: int = Field(50, ge=1, le=10_000, description="Most epochs to train.")
    patience: int = Field(
        10, ge=0, description="Stop after this many epochs without a better val fitness (0: never stop early)."
    )
    imgsz: int = Field(640, ge=STRIDE, le=4096, description=f"Training and export input size, a multiple of {STRIDE}.")
    batch: int = Field(16, ge=1, le=1024, description="Images per batch.")
    optimizer: Optimizer = Field(
        "SGD", description="Optimizer; named explicitly because ultralytics' 'auto' ignores lr0 and momentum."
    )
    lr0: float = Field(0.01, gt=0.0, le=1.0, description="Initial learning rate.")
    lrf: float = Field(0.01, gt=0.0, le=1.0, description="Final learning rate as a fraction of lr0.")
    momentum: float = Field(0.937, ge=0.0, lt=1.0, description="SGD momentum / Adam beta1.")
    weight_decay: float = Field(0.0005, ge=0.0, le=0.1, description="L2 weight decay.")
    warmup_epochs: float = Field(3.0, ge=0.0, le=100.0, description="Epochs of learning-rate warm-up.")
    close_mosaic: int = Field(
        10,
        ge=0,
        description="Turn mosaic off for the last N epochs (capped at a third of the epochs, so a short run keeps it).",
    )
    device: str = Field(
        "auto", description="'auto' (the first GPU when there is one, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'N'."
    )
    workers: int = Field(
        0, ge=0, le=64, description="Data-loading processes (0: in the training process, reproducible)."
    )
    seed: int = Field(0, ge=0, description="Random seed.")
    deterministic: bool = Field(True, description="Deterministic algorithms (reproducible on CPU; slower on GPU).")
    augmentation: AugmentationConfig = Field(
        default_factory=AugmentationConfig, description="Image augmentation (a preset name, or preset plus knobs)."
    )

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_stride(cls, value: int) -> int:
        if value % STRIDE:
            raise ValueError(
                f"imgsz must be a multiple of {STRIDE}, got {value} (try {round(value / STRIDE) * STRIDE})"
            )
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, mps, cuda, cuda:N or N[,N...], got {value!r}")
        return value

    def resolved_device(self) -> str:
        """The device ultralytics gets: ``auto`` becomes ``0`` when torch sees a GPU, else ``cpu``."""
        if self.device != "auto":
            return self.device.removeprefix("cuda:") if self.device.startswith("cuda:") else self.device
        try:
            import torch
        except ImportError:
            return "cpu"
        return "0" if torch.cuda.is_available() else "cpu"

    def ultralytics_args(self) -> dict[str, Any]:
        """``YOLO.train`` keyword arguments (less data, project and name, which the trainer sets)."""
        args: dict[str, Any] = {
            "epochs": self.epochs,
            "patience": self.patience,  # ultralytics reads 0 as "never stop early"
            "imgsz": self.imgsz,
            "batch": self.batch,
            "optimizer": self.optimizer,
            "lr0": self.lr0,
            "lrf": self.lrf,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            # close_mosaic >= epochs would switch mosaic off from the first epoch of a short run.
            "close_mosaic": min(self.close_mosaic, self.epochs // 3),
            "device": self.resolved_device(),
            "workers": self.workers,
            "seed": self.seed,
            "deterministic": self.deterministic,
            **self.augmentation.ultralytics_args(),
        }
        if self.freeze:
            args["freeze"] = self.freeze
        return args

    def lineage(self) -> dict[str, Any]:
        """The config as JSON values, for the registry's training parameters."""
        return self.model_dump(mode="json")


__all__ = [
    "AUGMENTATION_KEYS",
    "AUGMENTATION_PRESETS",
    "AugmentationConfig",
    "DEFAULT_BASE_CHECKPOINT",
    "TrainingConfig",
    "YOLOV8_BACKBONE_LAYERS",
    "augmentation_preset",
]
