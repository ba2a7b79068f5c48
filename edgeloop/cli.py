"""The ``edgeloop`` command line. Subcommands live beside the code they drive and are imported
lazily, so ``edgeloop agent --help`` on a device never imports the server's dependencies.

This is the top of the import graph: it imports the parts' CLIs when the command line is built
(``main()``, or the first use of ``edgeloop.cli.app``), never at import time, and nothing imports
it back (``tests/test_layering.py``)."""

from __future__ import annotations

import logging

import typer

_app = typer.Typer(
    name="edgeloop",
    help="Edge-to-cloud active learning for object detection.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    app = _app
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
    from loop.cli import demo

    app.command("demo")(demo)
    try:  # the flows' commands need the server extra too; Prefect and ultralytics load inside the commands
        from flows.cli import flows_app, train_app
    except ImportError as err:
        logging.getLogger(__name__).debug("flows commands unavailable: %s", err)
        return
    app.add_typer(flows_app, name="flows", help="Prefect flows: serve, deploy, run retrain/curate/trigger/tune.")
    app.add_typer(train_app, name="train", help="Training helpers: preview augmentation.")


def get_app() -> typer.Typer:
    """The command line with every subcommand this install has."""
    _register()
    return _app


def __getattr__(name: str) -> typer.Typer:  # ``from edgeloop.cli import app`` (tests, typer's CliRunner)
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    get_app()()


if __name__ == "__main__":
    main()
