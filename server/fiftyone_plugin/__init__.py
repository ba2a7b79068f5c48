"""edgeloop's FiftyOne plugin: curation from inside the App.

Four operators (in the App's operator browser, and as buttons above the sample grid):

- **Next batch** (``next_batch``): picks the next review batch and opens its saved view;
- **Batch status** (``batch_status``): every batch with its status and, for the open batch (or
  the one named), how many frames are tagged ``approved`` / ``reject``, untagged, edited;
- **Approve batch** (``approve_batch``): approves the open batch (or the one named) into a new
  dataset version;
- **Start retraining** (``start_retraining``): hands the latest (or a named) dataset version to
  :func:`server.curation.hooks.start_retraining`; until the retraining flows exist it says so.

Installed by ``edgeloop curate install-plugin`` (:mod:`server.curation.plugin`), which writes
``settings.json`` beside this file naming the server config; the operators run in the App's
process, whose FiftyOne already points at the server's database. The work itself is
:class:`server.curation.service.Curation`'s; this module only translates.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import fiftyone.operators as foo
import fiftyone.operators.types as types

logger = logging.getLogger(__name__)

SETTINGS = Path(__file__).resolve().parent / "settings.json"


def _curation():
    """The server's Curation, from the config ``settings.json`` names (defaults when it names none)."""
    from server.config import load_server_config
    from server.curation.service import Curation

    try:
        settings = json.loads(SETTINGS.read_text())
    except (OSError, ValueError):
        settings = {}
    return Curation.from_server_config(load_server_config(settings.get("server_config")))


def _batch_name(ctx) -> str | None:
    """The batch the operator is about: the ``batch`` parameter, else the open saved view if it is one."""
    name = ctx.params.get("batch")
    if name:
        return name
    view_name = ctx.request_params.get("view_name") or getattr(ctx.view, "name", None)
    return view_name if view_name and str(view_name).startswith("batch-") else None


class _CurationOperator(foo.Operator):
    """One curation action: a button above the sample grid, inputs, and a ``message`` as its output."""

    NAME = LABEL = DESCRIPTION = ICON = ""

    @property
    def config(self):
        return foo.OperatorConfig(name=self.NAME, label=self.LABEL, description=self.DESCRIPTION, dynamic=True)

    def resolve_placement(self, ctx):
        return types.Placement(
            types.Places.SAMPLES_GRID_SECONDARY_ACTIONS, types.Button(label=self.LABEL, icon=self.ICON)
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        self.inputs(inputs, ctx)
        return types.Property(inputs, view=types.View(label=self.LABEL))

    def inputs(self, inputs: types.Object, ctx) -> None:
        """Declare the operator's inputs on ``inputs``."""

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("message", label=self.LABEL, view=types.MarkdownView())
        return types.Property(outputs)


class NextBatch(_CurationOperator):
    NAME, LABEL, ICON = "next_batch", "Next batch", "playlist_add"
    DESCRIPTION = "Pick the next frames to review"

    def inputs(self, inputs, ctx):
        inputs.int("size", default=None, label="Frames", description="30-50 (empty: the configured size)")
        inputs.bool("any_size", default=False, label="Allow a size outside 30-50")

    def execute(self, ctx):
        result = _curation().next_batch(ctx.params.get("size"), any_size=bool(ctx.params.get("any_size")))
        name = result.batch.name
        for warning in result.warnings:
            ctx.ops.notify(warning, variant="warning")
        ctx.ops.set_view(name=name)
        return {
            "batch": name,
            "frames": len(result.batch.sample_ids),
            "pool": result.pool,
            "skipped": result.skipped,
            "warnings": result.warnings,
            "message": f"{name}: {len(result.batch.sample_ids)} frames to review (pool {result.pool})",
        }


class BatchStatus(_CurationOperator):
    NAME, LABEL, ICON = "batch_status", "Batch status", "fact_check"
    DESCRIPTION = "Where every review batch stands"

    def inputs(self, inputs, ctx):
        inputs.str("batch", default=_batch_name(ctx), label="Batch", description="Details of this batch (optional)")

    def execute(self, ctx):
        curation = _curation()
        batches = [
            {"name": b.name, "status": str(b.status), "frames": len(b.sample_ids), "version": b.version}
            for b in curation.batches()
        ]
        lines = ["| batch | status | frames | version |", "|---|---|---|---|"]
        lines += [f"| {b['name']} | {b['status']} | {b['frames']} | {b['version'] or ''} |" for b in batches]
        out = {"batches": batches}
        name = _batch_name(ctx)
        if name:
            report = curation.status(name)
            out["current"] = {
                "name": name,
                "status": str(report.batch.status),
                "approved": report.tagged_approved,
                "reject": report.tagged_reject,
                "untagged": report.untagged,
                "edited": report.edited,
            }
            lines.append(
                f"\n**{name}**: {report.tagged_approved} tagged approved, {report.tagged_reject} reject, "
                f"{report.untagged} untagged, {report.edited} with corrected boxes"
            )
        out["message"] = "\n".join(lines)
        return out


class ApproveBatch(_CurationOperator):
    NAME, LABEL, ICON = "approve_batch", "Approve batch", "task_alt"
    DESCRIPTION = "Move the approved frames into a new training-set version"

    def inputs(self, inputs, ctx):
        default = _batch_name(ctx)
        inputs.str(
            "batch",
            default=default,
            required=default is None,
            label="Batch to approve",
            description="A batch name (batch-001); the open batch view by default",
        )

    def execute(self, ctx):
        name = _batch_name(ctx)
        if not name:
            raise ValueError("name the batch to approve (batch-001), or open its saved view")
        result = _curation().approve(name)
        b, v = result.batch, result.version
        message = (
            f"{name} was approved before, into {v.id}: nothing changed"
            if result.already
            else f"{name} approved into {v.id}: {len(b.approved)} frames taken, {len(b.rejected)} rejected, "
            f"{len(b.excluded)} untagged left out, {len(b.held_out)} held out (their episode is in a full split); "
            f"the training set has {v.size} samples"
        )
        ctx.ops.notify(message, variant="success")
        return {
            "version": v.id,
            "approved": len(b.approved),
            "rejected": len(b.rejected),
            "excluded": len(b.excluded),
            "held_out": len(b.held_out),
            "already": result.already,
            "message": message,
        }


class StartRetraining(_CurationOperator):
    NAME, LABEL, ICON = "start_retraining", "Start retraining", "model_training"
    DESCRIPTION = "Retrain the model on a dataset version"

    def inputs(self, inputs, ctx):
        inputs.str("version", default=None, label="Dataset version", description="ds-0003 (empty: the latest)")

    def execute(self, ctx):
        from server.curation.hooks import RetrainingUnavailable, start_retraining

        version = ctx.params.get("version")
        if not version:
            latest = _curation().latest_version()
            if latest is None:
                raise ValueError("no dataset version yet: approve a batch first")
            version = latest.id
        try:
            handle = start_retraining(version)
        except RetrainingUnavailable as err:
            ctx.ops.notify(str(err), variant="warning")
            return {"started": False, "version": version, "message": str(err)}
        message = f"retraining on {version} started: {handle}"
        ctx.ops.notify(message, variant="success")
        return {"started": True, "version": version, "handle": handle, "message": message}


def register(p):
    p.register(NextBatch)
    p.register(BatchStatus)
    p.register(ApproveBatch)
    p.register(StartRetraining)
