"""``edgeloop server ...``: run the server, manage device credentials."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from server.devices_cli import devices_app

if TYPE_CHECKING:
    from server.config import ServerConfig

logger = logging.getLogger(__name__)

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(devices_app, name="devices", help="Issue, list and revoke device credentials.")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _load_config(config: Path | None) -> ServerConfig:
    """The server's config, or exit with a one-line error that says how to fix it."""
    from edgeloop.config_base import ConfigError
    from server.config import load_server_config

    try:
        return load_server_config(config)
    except ConfigError as err:
        raise _fail(f"{err}\n(fix the file, or print the schema: edgeloop server config-schema)") from err


@app.command("run")
def run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="The server's YAML config (see server.example.yaml).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the server: gRPC ingest + registry, the MQTT bridge, the FiftyOne inbox (and App)."""
    from edgeloop.logs import setup_logging

    setup_logging(log_level)
    cfg = _load_config(config)
    from server.app import Server

    server = Server(cfg)

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        server.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server.start()
    except Exception as err:
        server.stop()
        raise _fail(f"the server could not start: {err}") from err
    typer.echo(f"edgeloop server ready: gRPC {cfg.grpc.host}:{server.grpc_port}", err=True)
    server.wait()


@app.command("config-schema")
def config_schema() -> None:
    """Print the JSON schema of the server's YAML config (every field with its description)."""
    from server.config import ServerConfig

    typer.echo(json.dumps(ServerConfig.model_json_schema(), indent=2))


@app.command("db")
def db(
    action: Annotated[str, typer.Argument(help="status or stop (the bundled MongoDB outlives the server).")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="The server's YAML config.")] = None,
) -> None:
    """Show or stop the bundled MongoDB."""
    from server.store.mongo import MongoManager

    cfg = _load_config(config)
    manager = MongoManager(cfg.mongo)
    if action == "status":
        pid = manager.running_pid()
        typer.echo(f"bundled mongod: {'running, pid ' + str(pid) if pid else 'not running'} ({cfg.mongo.db_dir})")
    elif action == "stop":
        typer.echo("stopped" if manager.stop() else "nothing was running")
    else:
        raise _fail(f"unknown action {action!r}: use status or stop")


@app.command("fleet")
def fleet(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="The server's YAML config.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object by device id instead of a table.")] = False,
) -> None:
    """Show what every device last reported: its running model, channel, outbox, last error."""
    import dataclasses
    import time

    from edgeloop.tables import format_table
    from server.ingest.heartbeats import read_fleet

    cfg = _load_config(config)
    entries = read_fleet(cfg.data_dir)
    if as_json:
        doc = {
            device_id: {**dataclasses.asdict(e.status), "received_at": e.received_at}
            for device_id, e in sorted(entries.items())
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    if not entries:
        typer.echo(f"No heartbeats in {cfg.data_dir} yet.")
        return
    now = time.time()
    rows = []
    for device_id, e in sorted(entries.items()):
        s = e.status
        rows.append(
            (
                device_id,
                s.model_version or "-",
                s.channel or "-",
                f"{s.outbox_depth} ({s.outbox_bytes / 1e6:.1f} MB)",
                f"{max(0.0, now - e.received_at):.0f} s ago",
                s.last_error[:60] or "-",
            )
        )
    typer.echo(format_table(("DEVICE", "MODEL", "CHANNEL", "OUTBOX", "LAST SEEN", "LAST ERROR"), rows))


media_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(media_app, name="media", help="Maintain the media store.")


@media_app.command("sweep")
def media_sweep(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="The server's YAML config.")] = None,
    min_age_hours: Annotated[
        float, typer.Option(min=0.0, help="Only files written longer ago than this are considered.")
    ] = 24.0,
    grace_s: Annotated[
        float, typer.Option(min=0.0, help="Seconds between setting candidates aside and checking them again.")
    ] = 30.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
) -> None:
    """Remove images no sample points at, whatever their extension (left by crashes or by frames never
    resent); safe while the server runs."""
    from pymongo.errors import PyMongoError

    from server.store.mongo import MongoManager, configure_fiftyone
    from server.store.orphans import sweep_orphans

    cfg = _load_config(config)
    from server.store.media import LocalMediaStore

    if not cfg.media.root.is_dir():
        raise _fail(f"no media store at {cfg.media.root}: check media.root in the config")
    uri = MongoManager(cfg.mongo).ensure_running()
    configure_fiftyone(uri, cfg.fiftyone_dir)
    from server.store.inbox import Inbox

    inbox = Inbox(cfg.inbox)
    try:
        result = sweep_orphans(
            LocalMediaStore(cfg.media.root),
            inbox.sample_files,
            min_age_s=min_age_hours * 3600,
            grace_s=grace_s,
            dry_run=dry_run,
        )
    except PyMongoError as err:
        raise _fail(f"the database is unreachable ({err}); nothing was removed, run the sweep again later") from err
    verb = "would remove" if dry_run else "removed"
    for path in result.orphans:
        typer.echo(f"{verb} {path}")
    typer.echo(
        f"{result.scanned} files old enough, {len(result.orphans)} without a sample {verb}, "
        f"{len(result.adopted)} adopted by a resend during the sweep"
    )
