"""See what training sees: augmented training samples written as images, with their boxes drawn.

Before a long training run, look at what an augmentation config does to *your* images: a preset
that turns a parking lot upside down or washes out a night scene shows it here in seconds.
:func:`preview_augmentation` builds ultralytics' own training dataset with the config's
augmentation (the very transforms ``YOLO.train`` applies: mosaic, HSV, affine, flips, mixup) and
writes ``count`` samples as JPEGs, boxes and class names drawn on them.

``edgeloop train preview-augmentation DATA.yaml OUT --preset vehicles`` runs it from a shell.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from edgeloop.offline import offline_environment
from flows.training.config import TrainingConfig
from flows.training.evaluate import read_data_yaml

logger = logging.getLogger(__name__)

#: Most samples one preview writes.
MAX_PREVIEW_SAMPLES = 200


class PreviewError(Exception):
    """The preview cannot be made (no train split, unreadable data set, ultralytics missing)."""


def _colour(class_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(class_id + 7)
    return tuple(int(v) for v in rng.integers(60, 256, 3))  # type: ignore[return-value]


def preview_augmentation(
    data_yaml: Path,
    out_dir: Path,
    config: TrainingConfig,
    *,
    count: int = 16,
    seed: int = 0,
    state_dir: Path | None = None,
) -> list[Path]:
    """Write ``count`` augmented training samples of ``data_yaml`` under ``out_dir``; return their paths.

    Raises:
        PreviewError: the data set has no train split, or ultralytics is not installed.
        ValueError: ``count`` is outside 1..:data:`MAX_PREVIEW_SAMPLES`.
    """
    if not 1 <= count <= MAX_PREVIEW_SAMPLES:
        raise ValueError(f"count must lie in 1..{MAX_PREVIEW_SAMPLES}, got {count}")
    spec = read_data_yaml(data_yaml)
    if "train" not in spec.splits:
        raise PreviewError(f"{data_yaml} has no train split")
    for key, value in offline_environment(state_dir or out_dir / ".ultralytics-state").items():
        os.environ.setdefault(key, value)
    try:
        import cv2
        from ultralytics.cfg import get_cfg
        from ultralytics.data.build import build_yolo_dataset
        from ultralytics.utils import DEFAULT_CFG
    except ImportError as err:
        raise PreviewError("the augmentation preview needs ultralytics: pip install 'edgeloop[train]'") from err

    import random

    import torch

    random.seed(seed)  # ultralytics' transforms draw from Python's, numpy's and torch's generators
    np.random.seed(seed)
    torch.manual_seed(seed)
    hyp = get_cfg(DEFAULT_CFG, {**config.augmentation.ultralytics_args(), "imgsz": config.imgsz})
    data = {"names": dict(enumerate(spec.names)), "nc": len(spec.names), "channels": 3}
    dataset = build_yolo_dataset(hyp, [str(p) for p in spec.splits["train"]], 1, data, mode="train")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        sample = dataset[i % len(dataset)]
        image = sample["img"].numpy().transpose(1, 2, 0)[:, :, ::-1].copy()  # RGB CHW tensor -> BGR HWC
        h, w = image.shape[:2]
        for box, cls in zip(sample["bboxes"].numpy(), sample["cls"].numpy().reshape(-1), strict=True):
            cx, cy, bw, bh = box * np.array([w, h, w, h])
            p1, p2 = (int(cx - bw / 2), int(cy - bh / 2)), (int(cx + bw / 2), int(cy + bh / 2))
            colour = _colour(int(cls))
            cv2.rectangle(image, p1, p2, colour, 1)
            name = spec.names[int(cls)] if int(cls) < len(spec.names) else str(int(cls))
            cv2.putText(image, name, (p1[0], max(p1[1] - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1)
        path = out_dir / f"augmented-{i:03d}.jpg"
        if not cv2.imwrite(str(path), image):
            raise PreviewError(f"cannot write {path}")
        written.append(path)
    logger.info("wrote %d augmented samples (preset %s) to %s", len(written), config.augmentation.preset, out_dir)
    return written


__all__ = ["MAX_PREVIEW_SAMPLES", "PreviewError", "preview_augmentation"]
