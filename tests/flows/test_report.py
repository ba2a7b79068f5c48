"""Training report: curves from results.csv, the overfitting flag, the bias/variance reading, PNG plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.training.evaluate import ClassMetrics, Evaluation
from flows.training.report import ReportError, detect_overfitting, diagnose, read_results, training_report

HEADER = (
    "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/precision(B),metrics/recall(B),"
    "metrics/mAP50(B),metrics/mAP50-95(B),val/box_loss,val/cls_loss,val/dfl_loss,lr/pg0,lr/pg1,lr/pg2"
)


def results_csv(tmp_path: Path, train: list[float], val: list[float]) -> Path:
    rows = [HEADER]
    for i, (t, v) in enumerate(zip(train, val, strict=True), start=1):
        # ultralytics pads its columns with spaces; the reader must not care.
        train_losses, val_losses = f"{t / 3}, {t / 3}, {t / 3}", f"{v / 3}, {v / 3}, {v / 3}"
        rows.append(f"  {i}, {i * 10.0}, {train_losses}, 0.5, 0.4, 0.6, 0.3, {val_losses}, 0.01, 0.01, 0.01")
    path = tmp_path / "results.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_overfitting_is_flagged_when_val_loss_rises_while_train_loss_falls(tmp_path):
    epochs = read_results(results_csv(tmp_path, [5, 4, 3, 2.5, 2, 1.5, 1], [5, 4, 3.5, 3.4, 3.6, 3.9, 4.3]))
    assert [e.epoch for e in epochs] == list(range(1, 8)) and epochs[0].train_loss == pytest.approx(5)
    flag = detect_overfitting(epochs)
    assert flag.flagged and flag.since_epoch == 4 and "memorises" in flag.detail


def test_no_overfitting_when_both_fall_or_both_rise(tmp_path):
    falling = read_results(results_csv(tmp_path, [5, 4, 3, 2, 1], [5, 4.5, 4, 3.5, 3]))
    assert not detect_overfitting(falling).flagged
    diverging = read_results(results_csv(tmp_path, [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]))
    assert not detect_overfitting(diverging).flagged  # training itself went wrong: not overfitting
    assert not detect_overfitting(diverging[:2]).flagged


@pytest.mark.parametrize(
    ("train", "val", "test", "problem"),
    [
        (0.2, 0.18, 0.17, "bias"),
        (0.85, 0.4, 0.38, "variance"),
        (0.85, 0.8, 0.5, "mismatch"),
        (0.9, 0.89, 0.88, "none"),
        (None, 0.4, 0.38, "bias-or-variance"),
    ],
)
def test_the_gaps_read_as_bias_variance_or_mismatch(train, val, test, problem):
    d = diagnose(train, val, test, target=0.85)
    assert d.problem == problem
    starts = {
        "bias": "high avoidable bias",
        "variance": "high variance",
        "mismatch": "val/test mismatch",
        "bias-or-variance": "far from the target",
        "none": "no gap",
    }
    assert d.remedy.startswith(starts[problem])


def test_report_draws_plots_and_writes_markdown(tmp_path):
    csv = results_csv(tmp_path, [5, 4, 3, 2], [5, 4, 3, 2.5])
    ev = Evaluation("m", "test", 3, 6, 0.6, 0.4, 0.7, 0.6, [ClassMetrics("a", 6, 0.6, 0.4)], [[4, 1], [2, 0]])
    report = training_report(csv, train=ev, val=ev, test=ev, target=0.5, plots_dir=tmp_path / "plots")
    assert [p.name for p in report.plots] == ["training-curves.png", "confusion-matrix.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in report.plots)
    text = report.markdown()
    assert "| 4 | 2.000 | 2.500 | 0.600 | 0.300 |" in text
    assert "Overfitting:** no" in text and "Reading:** high avoidable bias" in text


def test_a_file_that_is_not_results_csv_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="not an ultralytics results.csv"):
        read_results(tmp_path / "x.csv")
    with pytest.raises(ReportError, match="cannot read"):
        read_results(tmp_path / "missing.csv")
