"""``edgeloop curate ...``: review batches, approve them into dataset versions, export and report.

Every command reads the server's YAML (``--config``, as ``edgeloop server ...`` does) for the
database, the inbox and the ``curation:`` section. ``versions`` and ``export`` read only files and
work without the database.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from server.cli import _fail, _load_config

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.curation.service import Curation

curate_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="The server's YAML config (see server.example.yaml).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _connected(config: Path | None) -> tuple[ServerConfig, Curation]:
    """The server config and a Curation connected to its database (started if bundled)."""
    from server.curation.service import Curation
    from server.store.mongo import MongoError, MongoManager, configure_fiftyone

    cfg = _load_config(config)
    try:
        uri = MongoManager(cfg.mongo).ensure_running()
    except MongoError as err:
        raise _fail(str(err)) from err
    configure_fiftyone(uri, cfg.fiftyone_dir)
    return cfg, Curation.from_server_config(cfg)


def _offline(config: Path | None) -> Curation:
    """A Curation for the commands that read only files (no database)."""
    from server.curation.service import Curation

    cfg = _load_config(config)
    return Curation(cfg.curation, inbox_dataset=cfg.inbox.dataset)


def _run(action):
    """Run ``action``; a curation error becomes a one-line message and exit status 2."""
    from server.curation.store import CurationError
    from server.curation.versions import VersionError

    try:
        return action()
    except (CurationError, VersionError) as err:
        raise _fail(str(err)) from err


def _echo_json(doc: object) -> None:
    typer.echo(json.dumps(doc, indent=2, sort_keys=True))


@curate_app.command("next-batch")
def next_batch(
    config: ConfigOption = None,
    size: Annotated[int | None, typer.Option(help="Frames in the batch (30-50; default curation.batch_size).")] = None,
    any_size: Annotated[
        bool, typer.Option("--any-size", help="Allow a size outside 30-50 (with a warning saying why not).")
    ] = False,
    as_json: JsonOption = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what the batch would be: nothing is saved or shown.")
    ] = False,
) -> None:
    """Pick the next batch of uncertain, diverse, balanced frames and show it in the App as a saved view."""
    from server.store.inbox import review_url

    cfg, curation = _connected(config)
    result = _run(lambda: curation.next_batch(size, any_size=any_size, dry_run=dry_run))
    for warning in result.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    b = result.batch
    url = review_url(f"http://{cfg.app.host}:{cfg.app.port}", cfg.inbox.dataset, b.name)
    if as_json:
        doc = {**b.model_dump(mode="json"), "pool": result.pool, "warnings": result.warnings, "dry_run": dry_run}
        _echo_json(doc if dry_run else {**doc, "url": url})
        return
    skipped = ", ".join(f"{k} {v}" for k, v in result.skipped.items())
    quotas = ", ".join(f"{k} {v}" for k, v in b.selection.get("device_quotas", {}).items())
    head = f"{b.name} would have" if dry_run else f"{b.name}:"
    typer.echo(f"{head} {len(b.sample_ids)} frames to review (pool {result.pool})")
    typer.echo(f"near-duplicates skipped: {skipped}")
    typer.echo(f"device quotas: {quotas}")
    if dry_run:
        typer.echo("dry run: nothing saved; run it without --dry-run to make the batch")
        return
    typer.echo(f"review in the App: {url}")
    typer.echo(f"then: edgeloop curate approve {b.name}" + (f" --config {config}" if config else ""))


@curate_app.command("batches")
def batches(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List every batch with its status."""
    from edgeloop.tables import format_table

    records = _run(lambda: _offline(config).batches())
    if as_json:
        _echo_json([r.model_dump(mode="json") for r in records])
        return
    if not records:
        typer.echo("No batches yet: edgeloop curate next-batch")
        return
    rows = [(r.name, str(r.status), str(len(r.sample_ids)), r.created, r.version or "-") for r in records]
    typer.echo(format_table(("BATCH", "STATUS", "FRAMES", "CREATED", "VERSION"), rows))


@curate_app.command("status")
def status(
    batch: Annotated[str, typer.Argument(help="The batch (batch-001).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a batch's status and its review so far (tags and corrected boxes in the App)."""
    _, curation = _connected(config)
    report = _run(lambda: curation.status(batch))
    doc = {
        "batch": report.batch.name,
        "status": str(report.batch.status),
        "frames": len(report.batch.sample_ids),
        "tagged_approved": report.tagged_approved,
        "tagged_reject": report.tagged_reject,
        "untagged": report.untagged,
        "edited": report.edited,
        "version": report.batch.version,
    }
    if as_json:
        _echo_json(doc)
        return
    typer.echo(
        f"{doc['batch']}: {doc['status']}, {doc['frames']} frames: {doc['tagged_approved']} tagged approved, "
        f"{doc['tagged_reject']} reject, {doc['untagged']} untagged; {doc['edited']} with corrected boxes"
        + (f"; version {doc['version']}" if doc["version"] else "")
    )


@curate_app.command("approve")
def approve(
    batch: Annotated[str, typer.Argument(help="The batch (batch-001).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move a batch's approved frames with their corrected labels into the training set (a new version)."""
    _, curation = _connected(config)
    result = _run(lambda: curation.approve(batch))
    v, b = result.version, result.batch
    if as_json:
        _echo_json({"version": v.id, "already": result.already, "batch": b.model_dump(mode="json")})
        return
    if result.already:
        typer.echo(f"{batch} was approved before, into {v.id}: nothing changed")
        return
    typer.echo(
        f"{batch} approved into {v.id} (parent {v.parent or 'none'}): {len(b.approved)} frames taken, "
        f"{len(b.rejected)} rejected, {len(b.excluded)} untagged left out"
    )
    splits = ", ".join(f"{k} {n}" for k, n in v.counts.items())
    typer.echo(f"training set: {splits}; labels sha256 {v.labels_sha256[:12]}")


@curate_app.command("import")
def import_labelled(
    data: Annotated[Path, typer.Argument(help="A labelled YOLO data set's data.yaml (train, and val/test if any).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Seed the training set with an existing labelled data set (a project's first model starts from it).

    A data set with val or test splits keeps them: each image joins the split it is declared in, so
    your held-out test photos are never trained on (an image in two splits joins the stricter one).
    It is refused when it declares an image in another split than the training set holds it, or new
    test images while the training set's test split is frozen. A data set with a train split only is
    split by the policy (val and test 10% each, at most 100), episode by episode. Importing the same
    images again adds nothing.
    """
    from edgeloop.yolo_dataset import DatasetError

    _, curation = _connected(config)
    try:
        v = _run(lambda: curation.import_labelled(data))
    except DatasetError as err:
        raise _fail(str(err)) from err
    if as_json:
        _echo_json({"version": v.id, "counts": v.counts, "added": len(v.added)})
        return
    splits = ", ".join(f"{k} {n}" for k, n in v.counts.items())
    how = "its own splits kept" if v.splits_from == "declared" else "split by the policy, by episode"
    typer.echo(
        f"{data}: {v.id} (parent {v.parent or 'none'}), {len(v.added)} images added ({how}); training set: {splits}"
    )


@curate_app.command("check-leaks")
def check_leaks(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Find val/test samples identical to, or near-duplicates of, training samples (exit 1 when any).

    Checks the latest dataset version: identical images by content hash, near-duplicates by the rule
    review batches use (curation-model embedding distance and dHash). Marks every sample of a leaking
    pair in the training dataset (field `leaks`) and saves the `leaks` view in the App.
    """
    _, curation = _connected(config)
    result = _run(curation.check_leaks)
    latest = curation.latest_version()
    if as_json:
        _echo_json({"version": latest.id if latest else None, **result.to_json()})
    elif latest is None:
        typer.echo("No dataset versions yet: nothing to check")
    else:
        typer.echo(f"{latest.id}: {result.summary()}")
        for leak in result.leaks:
            typer.echo(f"  {leak.split} {leak.frame_id}  {leak.kind} of  train {leak.train_frame_id}")
        if result.leaks:
            typer.echo(f"see them in the App: dataset {curation.config.training_dataset}, saved view `leaks`")
    if result.leaks:
        raise typer.Exit(1)


@curate_app.command("reject")
def reject(batch: Annotated[str, typer.Argument(help="The batch (batch-001).")], config: ConfigOption = None) -> None:
    """Reject a whole batch: none of its frames enters the training set or a later batch."""
    _, curation = _connected(config)
    record = _run(lambda: curation.reject(batch))
    typer.echo(f"{record.name}: rejected")


@curate_app.command("versions")
def versions(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List the dataset versions."""
    from edgeloop.tables import format_table

    records = _run(lambda: _offline(config).versions())
    if as_json:
        _echo_json([{**v.model_dump(mode="json", exclude={"added"}), "added": len(v.added)} for v in records])
        return
    if not records:
        typer.echo("No dataset versions yet: approve a batch (edgeloop curate approve batch-001)")
        return
    rows = [
        (
            v.id,
            v.parent or "-",
            v.batch,
            v.created,
            " / ".join(str(v.counts.get(s, 0)) for s in ("train", "val", "test")) + (" (test frozen)" * v.test_frozen),
            v.labels_sha256[:12],
        )
        for v in records
    ]
    typer.echo(format_table(("VERSION", "PARENT", "BATCH", "CREATED", "TRAIN / VAL / TEST", "LABELS"), rows))


@curate_app.command("export")
def export(
    version: Annotated[str, typer.Argument(help="The dataset version (ds-0001).")],
    out: Annotated[Path, typer.Argument(help="A new (or empty) directory.")],
    config: ConfigOption = None,
) -> None:
    """Write a dataset version as a YOLO directory (images, labels, data.yaml); the same bytes every time."""
    data_yaml = _run(lambda: _offline(config).export(version, out))
    typer.echo(f"{version}: {data_yaml}")


@curate_app.command("report")
def report(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Class balance per split and per version, and the seeds' warnings."""
    from server.curation.report import format_report

    _, curation = _connected(config)
    result = _run(curation.report)
    if as_json:
        _echo_json(result.to_json())
    else:
        typer.echo(format_report(result))


@curate_app.command("install-plugin")
def install_plugin(
    config: ConfigOption = None,
    plugins_dir: Annotated[
        Path | None, typer.Option(help="FiftyOne's plugins directory (default: the server's, under data_dir).")
    ] = None,
) -> None:
    """Install the FiftyOne plugin (Next batch, Batch status, Approve batch, Start retraining) for the App."""
    from server.curation.plugin import PLUGIN_NAME, install_plugin

    cfg = _load_config(config)
    target = plugins_dir or cfg.fiftyone_dir / "plugins"
    installed = install_plugin(target, config)
    typer.echo(f"installed {PLUGIN_NAME} in {installed}; restart the App (edgeloop server run) to load it")
