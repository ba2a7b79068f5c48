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
from flows.training.config import TrainingConfig

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
    """Where a training run left its outputs.

    Attributes:
        best: The checkpoint of the epoch with the best val fitness (ultralytics' ``best.pt``).
        run_dir: ultralytics' run directory (``results.csv``, ``args.yaml``, ``weights/``).
        start: What the run started from (a checkpoint, or a model .yaml for from-scratch).
    """

    best: Path
    run_dir: Path
    start: Path | None = None

    @property
    def results_csv(self) -> Path:
        """Per-epoch losses and val metrics, as ultralytics writes them."""
        return self.run_dir / "results.csv"


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
    Deterministic for a given seed on CPU (``workers=0``). The flows use :func:`train_with_config`,
    which validates every argument first.

    Raises:
        TrainingError: the checkpoint is missing, or ultralytics failed.
    """
    args: dict[str, Any] = {
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "workers": 0,
        "device": device,
        "seed": seed,
        "deterministic": True,
        # close_mosaic >= epochs would switch mosaic off from the first epoch of a short run.
        "close_mosaic": min(10, max(epochs // 3, 0)),
    }
    args.update(overrides)
    return _run(data_yaml, out_dir, base, args, state_dir)


def train_with_config(
    data_yaml: Path,
    out_dir: Path,
    config: TrainingConfig,
    *,
    start: Path | None = None,
    state_dir: Path | None = None,
) -> TrainResult:
    """Train as ``config`` says, from ``start`` (default: :func:`starting_point` without a production model).

    Raises:
        TrainingError: the starting checkpoint is missing, or ultralytics failed.
    """
    if start is None:
        start = starting_point(config, None)
    amp_model = config.base_checkpoint if config.base_checkpoint.is_file() else None
    return _run(data_yaml, out_dir, start, config.ultralytics_args(), state_dir, amp_model=amp_model)


def starting_point(config: TrainingConfig, production_checkpoint: Path | None) -> Path:
    """What a run starts from: the production model's checkpoint, the base checkpoint, or the architecture.

    ``init: production`` falls back to the base checkpoint when there is no production checkpoint
    (a project's first model, or one whose classes changed: the caller passes None then).
    """
    if config.init == "scratch":
        return Path(config.architecture)
    if config.init == "production" and production_checkpoint is not None:
        return production_checkpoint
    return config.base_checkpoint


def _run(
    data_yaml: Path,
    out_dir: Path,
    start: Path,
    args: dict[str, Any],
    state_dir: Path | None,
    *,
    amp_model: Path | None = None,
) -> TrainResult:
    ul = _ultralytics(state_dir or out_dir / "ultralytics-state")
    if start.suffix == ".pt" and not start.is_file():
        raise TrainingError(f"checkpoint {start} not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = start
    if start.suffix == ".pt":
        # ultralytics writes beside its input (and may touch it): train from a private copy.
        model_file = out_dir / f"start-{start.name}"
        shutil.copy(start, model_file)
        amp_model = model_file
    if str(args.get("device", "cpu")) not in ("cpu", "mps"):
        if amp_model is not None:
            _place_amp_check_model(amp_model)
        else:  # the check would download its model: train in full precision instead
            args = {**args, "amp": False}
    full: dict[str, Any] = {
        "data": str(data_yaml),
        "project": str(out_dir),
        "name": "train",
        "exist_ok": True,
        "plots": False,  # edgeloop draws its own (flows.training.report): no fonts, no network
        "verbose": False,
        **args,
    }
    logger.info("training from %s on %s: %s", start, data_yaml, {k: v for k, v in args.items()})
    try:
        model = ul.YOLO(str(model_file))
        model.train(**full)
    except Exception as err:  # ultralytics raises anything from its data checks to torch errors
        raise TrainingError(f"training failed: {err}") from err
    run_dir = out_dir / "train"
    best = run_dir / "weights" / "best.pt"
    if not best.is_file():
        raise TrainingError(f"training wrote no {best}")
    return TrainResult(best=best, run_dir=run_dir, start=start)


def _place_amp_check_model(checkpoint: Path) -> None:
    """Put a detection checkpoint where ultralytics' AMP check looks for ``yolo26n.pt``.

    Before CUDA training with AMP, ultralytics runs ``YOLO(WEIGHTS_DIR / "yolo26n.pt")`` in FP32 and
    under autocast and compares the boxes, downloading the file when it is missing; any detect
    checkpoint serves the comparison, so the one training starts from is used and nothing is downloaded.
    """
    from ultralytics.utils import WEIGHTS_DIR

    target = Path(WEIGHTS_DIR) / "yolo26n.pt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(checkpoint, target)


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
