"""Train and export a detector with ultralytics, offline: the plain functions the flows, the
benchmarks and the tests share.

Fine-tuning from a pretrained checkpoint is the default everywhere (the offline stand-in for
ultralytics' ``yolov8n.pt`` is ``../shared/models/yolov8n_coco_dequant.pt``): from scratch,
small label budgets learn nothing. ``ultralytics`` is imported lazily, after
:func:`edgeloop.offline.offline_environment` is in force.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeloop.offline import offline_environment

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training or export failed (bad data set, missing checkpoint, ultralytics error)."""


def _ultralytics(state_dir: Path) -> Any:
    # ultralytics reads its environment once, at import: set it before the first import.
    for key, value in offline_environment(state_dir).items():
        os.environ.setdefault(key, value)
    try:
        import ultralytics
    except ImportError as err:
        raise TrainingError("training needs ultralytics: pip install 'edgeloop[train]'") from err
    return ultralytics


@dataclass(frozen=True)
class TrainResult:
    """Where a training run left its outputs."""

    best: Path
    run_dir: Path


def train(
    data_yaml: Path,
    out_dir: Path,
    *,
    base: Path,
    epochs: int,
    imgsz: int,
    batch: int = 16,
    seed: int = 0,
    device: str = "cpu",
    state_dir: Path | None = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``base`` (a .pt checkpoint, or a model .yaml for from-scratch) on ``data_yaml``.

    ``overrides`` go to ``YOLO.train`` as they are (augmentation, optimizer, patience...).
    Deterministic for a given seed on CPU (``workers=0``).

    Raises:
        TrainingError: the checkpoint is missing, or ultralytics failed.
    """
    ul = _ultralytics(state_dir or out_dir / "ultralytics-state")
    if base.suffix == ".pt" and not base.is_file():
        raise TrainingError(f"base checkpoint {base} not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = base
    if base.suffix == ".pt":
        # ultralytics writes beside its input (and may touch it): train from a private copy.
        start = out_dir / f"base-{base.name}"
        shutil.copy(base, start)
    args: dict[str, Any] = {
        "data": str(data_yaml),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "workers": 0,
        "device": device,
        "seed": seed,
        "deterministic": True,
        "project": str(out_dir),
        "name": "train",
        "exist_ok": True,
        "plots": False,
        "verbose": False,
        # close_mosaic >= epochs would switch mosaic off from the first epoch of a short run.
        "close_mosaic": min(10, max(epochs // 3, 0)),
    }
    args.update(overrides)
    try:
        model = ul.YOLO(str(start))
        model.train(**args)
    except Exception as err:  # ultralytics raises anything from its data checks to torch errors
        raise TrainingError(f"training failed: {err}") from err
    run_dir = out_dir / "train"
    best = run_dir / "weights" / "best.pt"
    if not best.is_file():
        raise TrainingError(f"training wrote no {best}")
    return TrainResult(best=best, run_dir=run_dir)


def export_onnx(checkpoint: Path, out: Path, *, imgsz: int, state_dir: Path | None = None) -> Path:
    """Export ``checkpoint`` to a float ONNX detect model at ``out`` (no NMS inside, as the edge expects)."""
    ul = _ultralytics(state_dir or out.parent / "ultralytics-state")
    work = out.parent / f".export-{checkpoint.stem}"
    work.mkdir(parents=True, exist_ok=True)
    local = work / checkpoint.name  # export writes beside its input
    shutil.copy(checkpoint, local)
    try:
        exported = Path(ul.YOLO(str(local)).export(format="onnx", imgsz=imgsz, device="cpu", simplify=True))
    except Exception as err:
        raise TrainingError(f"ONNX export of {checkpoint} failed: {err}") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(exported), out)
    shutil.rmtree(work, ignore_errors=True)
    return out
