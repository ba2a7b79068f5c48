"""Training reports: learning curves, an overfitting flag, and the bias/variance reading of the metrics.

A training run leaves ultralytics' ``results.csv`` (one row per epoch: train and val losses, val
metrics). :func:`read_results` reads it; :func:`training_report` turns it, with the final
evaluations of the exported model, into what a person deciding about the model needs:

* **Loss per epoch** (train and val, each the sum of box, class and DFL losses) and the val
  metrics, also drawn as PNG plots (:func:`plot_curves`, :func:`plot_confusion`; matplotlib,
  headless, its own bundled font: nothing is fetched).
* **Overfitting**: flagged when the val loss has risen for the last epochs (by more than
  :data:`OVERFIT_RISE` over its minimum) while the train loss kept falling over the same epochs:
  the model is memorising the training set. The remedy: more (varied) data, stronger
  augmentation, early stopping at the minimum, freezing more layers.
* **Bias and variance** from the gaps between a target mAP50-95, the train split, the val split
  and the test split (the reading of Andrew Ng's "Nuts and bolts of deep learning"):
  ``target - train`` is avoidable bias (underfitting: a bigger model, longer training, larger
  images, less regularisation), ``train - val`` variance (overfitting: more data, augmentation,
  regularisation, early stopping), ``val - test`` a val/test mismatch (the splits come from
  different distributions, or the model was selected on a val split too small to trust). The
  largest gap names the problem to work on first.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flows.training.evaluate import Evaluation

logger = logging.getLogger(__name__)

#: Relative rise of the val loss over its minimum that, with a falling train loss, flags overfitting.
OVERFIT_RISE = 0.05
#: Epochs over which "rising val loss while train loss falls" must hold.
OVERFIT_WINDOW = 3
#: A gap (in mAP50-95) below this is not worth acting on.
GAP_NOISE = 0.02
#: The mAP50-95 a detector is measured against when no target is given (a good YOLOv8n on COCO: ~0.37).
DEFAULT_TARGET_MAP = 0.5


class ReportError(Exception):
    """The training results cannot be read (missing or malformed results.csv)."""


@dataclass(frozen=True)
class EpochRow:
    """One epoch of ``results.csv``: losses are sums of box, class and DFL loss."""

    epoch: int
    time: float
    train_loss: float
    val_loss: float
    precision: float
    recall: float
    map50: float
    map50_95: float
    lr: float


def _number(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key, "nan") or "nan")
    except ValueError:
        return math.nan


def read_results(path: Path) -> list[EpochRow]:
    """Read ultralytics' ``results.csv``.

    Raises:
        ReportError: the file is missing or has none of the expected columns.
    """
    try:
        with Path(path).open(newline="") as fh:
            rows = [{k.strip(): v.strip() for k, v in r.items() if k} for r in csv.DictReader(fh)]
    except OSError as err:
        raise ReportError(f"cannot read training results {path}: {err}") from err
    if rows and "train/box_loss" not in rows[0]:
        raise ReportError(f"{path} is not an ultralytics results.csv (columns: {', '.join(rows[0])})")
    out = []
    for r in rows:
        losses = ("box_loss", "cls_loss", "dfl_loss")
        out.append(
            EpochRow(
                epoch=int(_number(r, "epoch")),
                time=_number(r, "time"),
                train_loss=sum(_number(r, f"train/{k}") for k in losses),
                val_loss=sum(_number(r, f"val/{k}") for k in losses),
                precision=_number(r, "metrics/precision(B)"),
                recall=_number(r, "metrics/recall(B)"),
                map50=_number(r, "metrics/mAP50(B)"),
                map50_95=_number(r, "metrics/mAP50-95(B)"),
                lr=_number(r, "lr/pg0"),
            )
        )
    return out


@dataclass(frozen=True)
class Overfitting:
    """Whether the curves show overfitting, and from which epoch."""

    flagged: bool
    since_epoch: int | None
    detail: str


def detect_overfitting(
    epochs: Sequence[EpochRow], *, rise: float = OVERFIT_RISE, window: int = OVERFIT_WINDOW
) -> Overfitting:
    """Flag overfitting: the val loss ended more than ``rise`` above its minimum, rising over the last
    ``window`` epochs, while the train loss fell over the same epochs."""
    rows = [e for e in epochs if math.isfinite(e.val_loss) and math.isfinite(e.train_loss)]
    if len(rows) < window + 1:
        return Overfitting(False, None, f"too few epochs ({len(rows)}) to judge overfitting")
    best = min(range(len(rows)), key=lambda i: rows[i].val_loss)
    last, first = rows[-1], rows[-1 - window]
    val_up = last.val_loss > rows[best].val_loss * (1 + rise) and last.val_loss > first.val_loss
    train_down = last.train_loss < first.train_loss
    if val_up and train_down:
        return Overfitting(
            True,
            rows[best].epoch,
            f"val loss rose from {rows[best].val_loss:.3f} (epoch {rows[best].epoch}) to {last.val_loss:.3f} while "
            f"train loss fell from {first.train_loss:.3f} to {last.train_loss:.3f} over the last {window} epochs: "
            "the model memorises the training set. Remedies: more varied data, stronger augmentation, early "
            "stopping (patience), freezing more layers.",
        )
    return Overfitting(False, None, "no overfitting: the val loss did not rise while the train loss fell")


@dataclass(frozen=True)
class Diagnosis:
    """The bias/variance reading of train, val and test mAP50-95 against a target."""

    target: float
    train: float | None
    val: float | None
    test: float | None
    avoidable_bias: float | None
    variance: float | None
    mismatch: float | None
    problem: str
    remedy: str


_REMEDIES = {
    "bias": "high avoidable bias (underfitting): train longer, use a bigger model or larger images, "
    "start from pretrained weights, reduce regularisation and augmentation",
    "variance": "high variance (overfitting): add training data (curate more frames), strengthen "
    "augmentation, regularise, stop early, freeze more layers",
    "mismatch": "val/test mismatch: the val split does not represent the test split (or is too small to "
    "select on); make both come from the same distribution, or grow the val split",
    "bias-or-variance": "far from the target, but without a train-split evaluation bias and variance cannot be "
    "told apart: evaluate the training split too (evaluation.train_images)",
    "none": "no gap worth acting on: the model is as good as the target on every split",
}


def diagnose(train: float | None, val: float | None, test: float | None, target: float) -> Diagnosis:
    """Read the gaps between ``target``, ``train``, ``val`` and ``test`` mAP50-95 as bias, variance or mismatch."""

    def gap(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    gaps = {"bias": gap(target, train), "variance": gap(train, val), "mismatch": gap(val, test)}
    known = {k: v for k, v in gaps.items() if v is not None and v > GAP_NOISE}
    if train is None and (combined := gap(target, val)) is not None and combined > GAP_NOISE:
        known["bias-or-variance"] = combined
    problem = max(known, key=lambda k: known[k]) if known else "none"
    return Diagnosis(
        target=target,
        train=train,
        val=val,
        test=test,
        avoidable_bias=gaps["bias"],
        variance=gaps["variance"],
        mismatch=gaps["mismatch"],
        problem=problem,
        remedy=_REMEDIES[problem],
    )


@dataclass(frozen=True)
class TrainingReport:
    """Everything the report says about one training run."""

    epochs: list[EpochRow]
    overfitting: Overfitting
    diagnosis: Diagnosis
    plots: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["plots"] = [str(p) for p in self.plots]
        return data

    def markdown(self) -> str:
        d = self.diagnosis

        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        overfit = f"yes, from epoch {self.overfitting.since_epoch}" if self.overfitting.flagged else "no"
        lines = [
            "## Training",
            "",
            "| epoch | train loss | val loss | val mAP50 | val mAP50-95 |",
            "|---:|---:|---:|---:|---:|",
            *(
                f"| {e.epoch} | {e.train_loss:.3f} | {e.val_loss:.3f} | {e.map50:.3f} | {e.map50_95:.3f} |"
                for e in self.epochs
            ),
            "",
            f"**Overfitting:** {overfit} ({self.overfitting.detail})",
            "",
            "| target | train | val | test | avoidable bias | variance | val/test mismatch |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {num(d.target)} | {num(d.train)} | {num(d.val)} | {num(d.test)} | {num(d.avoidable_bias)} | "
            f"{num(d.variance)} | {num(d.mismatch)} |",
            "",
            f"**Reading:** {d.remedy}.",
        ]
        return "\n".join(lines)


def training_report(
    results_csv: Path,
    *,
    train: Evaluation | None,
    val: Evaluation | None,
    test: Evaluation | None,
    target: float = DEFAULT_TARGET_MAP,
    plots_dir: Path | None = None,
) -> TrainingReport:
    """Build the report of a run from its ``results.csv`` and the exported model's evaluations.

    With ``plots_dir``, the learning curves (and the test confusion matrix) are drawn there as PNGs.
    """
    epochs = read_results(results_csv)
    report = TrainingReport(
        epochs=epochs,
        overfitting=detect_overfitting(epochs),
        diagnosis=diagnose(
            train.map50_95 if train else None,
            val.map50_95 if val else None,
            test.map50_95 if test else None,
            target,
        ),
    )
    if plots_dir is not None:
        plots = [plot_curves(epochs, plots_dir / "training-curves.png")]
        if test is not None:
            plots.append(plot_confusion(test, plots_dir / "confusion-matrix.png"))
        report = TrainingReport(report.epochs, report.overfitting, report.diagnosis, plots)
    return report


@contextmanager
def _figure(out: Path, figsize: tuple[float, float], ncols: int = 1) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure (headless; its bundled DejaVu font, nothing fetched) saved to ``out`` as PNG and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, axes
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=80)
    finally:
        plt.close(fig)


def plot_curves(epochs: Sequence[EpochRow], out: Path) -> Path:
    """Train and val loss, and val mAP, per epoch, as a PNG."""
    x = [e.epoch for e in epochs]
    with _figure(out, (10, 4), ncols=2) as (_fig, (ax_loss, ax_map)):
        ax_loss.plot(x, [e.train_loss for e in epochs], marker="o", label="train loss")
        ax_loss.plot(x, [e.val_loss for e in epochs], marker="o", label="val loss")
        ax_loss.set(xlabel="epoch", ylabel="loss (box + cls + dfl)", title="Loss")
        ax_loss.legend()
        ax_map.plot(x, [e.map50 for e in epochs], marker="o", label="val mAP50")
        ax_map.plot(x, [e.map50_95 for e in epochs], marker="o", label="val mAP50-95")
        ax_map.set(xlabel="epoch", ylabel="mAP", title="Validation", ylim=(0, 1))
        ax_map.legend()
    return out


def plot_confusion(evaluation: Evaluation, out: Path) -> Path:
    """The confusion matrix (predicted rows, true columns, background last) as a PNG heat map."""
    import numpy as np

    names = [*evaluation.class_names, "background"]
    matrix = np.array(evaluation.confusion, dtype=float)
    side = 1.0 + 0.6 * len(names)
    with _figure(out, (side + 0.2, side)) as (_fig, ax):
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set(xlabel="true", ylabel="predicted", title=f"Confusion matrix ({evaluation.split})")
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=8)
    return out


__all__ = [
    "Diagnosis",
    "EpochRow",
    "Overfitting",
    "ReportError",
    "TrainingReport",
    "detect_overfitting",
    "diagnose",
    "plot_confusion",
    "plot_curves",
    "read_results",
    "training_report",
]
