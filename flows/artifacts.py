"""What a retrain run shows in the Prefect UI: metrics, per-class AP, the gate's decision, the training
report and its plots, as Prefect artifacts of the flow run.

Keys (lowercase, digits and dashes, as Prefect requires) are stable, so the Artifacts page keeps a
history per key across runs: ``retrain-metrics`` (table), ``retrain-per-class`` (table),
``retrain-gate`` (markdown), ``training-report`` (markdown), ``training-curves`` and
``confusion-matrix`` (images, embedded as ``data:`` URLs: the UI shows them without a file server).
"""

from __future__ import annotations

import base64
from pathlib import Path

from flows.pipeline import Evaluations
from flows.training.gate import GateDecision
from flows.training.report import TrainingReport

#: Plots larger than this are linked by path instead of embedded (the artifact lives in Prefect's database).
MAX_EMBEDDED_PLOT_BYTES = 512 * 1024


def metrics_rows(evaluations: Evaluations) -> list[dict[str, object]]:
    """One row per model and split: mAP50, mAP50-95, precision, recall."""
    rows = []
    named = [
        ("candidate", evaluations.candidate),
        ("production", evaluations.production),
        ("candidate", evaluations.val),
        ("candidate", evaluations.train),
    ]
    for model, ev in named:
        if ev is None:
            continue
        rows.append(
            {
                "model": model,
                "split": ev.split,
                "images": ev.images,
                "mAP50": round(ev.map50, 4),
                "mAP50-95": round(ev.map50_95, 4),
                "precision": round(ev.precision, 4),
                "recall": round(ev.recall, 4),
            }
        )
    return rows


def per_class_rows(evaluations: Evaluations) -> list[dict[str, object]]:
    """Per class on the test split: instances, candidate AP50 and AP50-95, production's AP50-95 and the change."""
    prod = evaluations.production.class_ap() if evaluations.production else {}
    rows = []
    for c in evaluations.candidate.per_class:
        row: dict[str, object] = {
            "class": c.name,
            "instances": c.instances,
            "AP50": round(c.ap50, 4),
            "AP50-95": round(c.ap50_95, 4),
        }
        if c.name in prod:
            row["production AP50-95"] = round(prod[c.name], 4)
            row["change"] = round(c.ap50_95 - prod[c.name], 4)
        rows.append(row)
    return rows


def gate_markdown(decision: GateDecision, version: str | None) -> str:
    verdict = "**promoted**" if decision.promote else "**rejected**"
    lines = [f"# Gate: {verdict}", "", decision.reason, ""]
    if version:
        lines.append(f"Registered as `{version}`" + ("" if decision.promote else " (rejected, never released)") + ".")
    if decision.class_drops:
        lines += ["", "| class | AP50-95 drop |", "|---|---:|"]
        lines += [f"| {name} | {drop:.4f} |" for name, drop in sorted(decision.class_drops.items())]
    return "\n".join(lines)


def image_url(path: Path) -> str:
    """A ``data:`` URL of a PNG (small plots), else its ``file://`` path."""
    data = path.read_bytes()
    if len(data) > MAX_EMBEDDED_PLOT_BYTES:
        return path.resolve().as_uri()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def publish_artifacts(
    evaluations: Evaluations, decision: GateDecision, report: TrainingReport | None, version: str | None
) -> None:
    """Create the run's Prefect artifacts (call from inside a flow or task run)."""
    from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

    create_table_artifact(
        key="retrain-metrics", table=metrics_rows(evaluations), description="Candidate and production metrics."
    )
    create_table_artifact(
        key="retrain-per-class", table=per_class_rows(evaluations), description="Per-class AP on the test split."
    )
    create_markdown_artifact(key="retrain-gate", markdown=gate_markdown(decision, version), description="The gate.")
    if report is None:
        return
    create_markdown_artifact(key="training-report", markdown=report.markdown(), description="Training report.")
    for plot in report.plots:
        create_image_artifact(image_url=image_url(plot), key=plot.stem, description=plot.stem.replace("-", " "))


__all__ = ["gate_markdown", "metrics_rows", "per_class_rows", "publish_artifacts"]
