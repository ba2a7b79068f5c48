"""The ``edgeloop`` command line. Subcommands live beside the code they drive and are imported
lazily, so ``edgeloop agent --help`` on a device never imports the server's dependencies."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from edgeloop.logs import setup_logging

app = typer.Typer(
    name="edgeloop",
    help="Edge-to-cloud active learning for object detection.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from edge_agent.cli import app as agent_app
    from edgeloop.synth.cli import synth_command

    app.add_typer(agent_app, name="agent", help="Run the edge agent or dry-run its uncertainty scoring.")
    app.command("synth", help="Write a synthetic YOLO dataset (and optionally a video) of a scenario.")(synth_command)
    try:  # the server's commands exist where the server extra is installed; a device has only the agent
        from server.cli import app as server_app
        from server.curation.cli import curate_app
        from server.registry.cli import models_app
    except ImportError as err:
        logging.getLogger(__name__).debug("server commands unavailable: %s", err)
        return
    app.add_typer(server_app, name="server", help="Run the server; manage device credentials.")
    app.add_typer(models_app, name="models", help="Publish, promote, pin and roll back model versions.")
    app.add_typer(curate_app, name="curate", help="Review batches in FiftyOne; approve them into dataset versions.")
    app.command("demo")(demo)
    try:  # the flows' commands need the server extra too; Prefect and ultralytics load inside the commands
        from flows.cli import flows_app, train_app
    except ImportError as err:
        logging.getLogger(__name__).debug("flows commands unavailable: %s", err)
        return
    app.add_typer(flows_app, name="flows", help="Prefect flows: serve, deploy, run retrain/curate/trigger/tune.")
    app.add_typer(train_app, name="train", help="Training helpers: preview augmentation.")


def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps everything.")] = Path(".demo"),
    model: Annotated[Path, typer.Option(help="The detector to publish as v1 (an ultralytics ONNX export).")] = Path(
        "../shared/models/yolov8n_int8.onnx"
    ),
    source: Annotated[str, typer.Option(help="The camera: image folder, video file, camera index or URL.")] = (
        "../shared/data/coco8/images/train"
    ),
    limit: Annotated[int | None, typer.Option(help="Stop the camera after this many frames.")] = None,
    app_enabled: Annotated[bool, typer.Option("--app/--no-app", help="Start the FiftyOne App.")] = True,
    app_port: Annotated[int, typer.Option(help="Port of the FiftyOne App.")] = 5151,
    serve: Annotated[bool, typer.Option(help="Keep the server and App running until Ctrl-C.")] = False,
) -> None:
    """Run the loop on this machine: server + FiftyOne + registry + an edge agent on a camera."""
    from edgeloop.demo import DemoInputError, DemoResult, check_inputs, run_demo

    setup_logging("WARNING")
    try:
        check_inputs(model, source)  # before anything starts: one line, not a traceback from deep inside
    except DemoInputError as err:
        typer.secho(f"error: {err}", err=True)
        raise typer.Exit(2) from err

    def report(result: DemoResult) -> None:
        c = result.counters
        typer.echo(
            f"camera: {c['frames_read']} frames read, {c['frames_kept']} kept as uncertain, "
            f"{c['frames_uploaded']} uploaded (model {result.model_version})"
        )
        fresh = f" (a fresh inbox: the previous run's {result.replaced_samples} were removed)"
        typer.echo(
            f"inbox: {result.samples} samples in FiftyOne dataset '{result.dataset}' ({result.workdir})"
            + (fresh if result.replaced_samples else "")
        )
        typer.echo("inspect what the demo made:")
        typer.echo(f"  edgeloop models list --registry {result.registry}")
        typer.echo(f"  edgeloop server fleet --config {result.server_config}")
        if serve:
            if result.app_url:
                typer.echo(f"review them, most uncertain first: {result.app_url}")
            typer.echo("serving (gRPC ingest and registry" + (", the FiftyOne App" if result.app_url else "") + ")")
            typer.echo("press Ctrl-C to stop")

    result = run_demo(
        workdir, model, source, limit=limit, app=app_enabled, app_port=app_port, serve=serve, on_ready=report
    )
    if not serve:
        report(result)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
