"""``edgeloop flows`` (serve, deploy, run the Prefect flows) and ``edgeloop train`` (training helpers).

Prefect and ultralytics are imported inside the commands, so ``edgeloop --help`` stays fast and a
machine without them still has every other command. A failure prints ``error: ...`` on stderr and
exits with status 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeloop.config_base import ConfigError

#: Exit status of a command that failed for a reason it explains.
EXIT_ERROR = 2
#: Prefect's own telemetry off in every process these commands start, and room for the temporary server
#: Prefect starts when no PREFECT_API_URL is set (its 20 s default times out on 2 cores); an operator's value wins.
PREFECT_QUIET = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}

flows_app = typer.Typer(
    name="flows",
    help="Prefect flows: retrain, curate, trigger, tune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(
    name="train",
    help="Training helpers (augmentation preview).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="The flows' YAML config (default: built-in defaults).")
]
ApiOpt = Annotated[
    str | None,
    typer.Option("--api-url", help="Prefect API, e.g. http://127.0.0.1:4200/api (default: Prefect's PREFECT_API_URL)."),
]


class FlowName(StrEnum):
    retrain = "retrain"
    trigger = "trigger"
    curate = "curate"
    tune = "tune"


@contextmanager
def _errors() -> Iterator[None]:
    from flows.client import FlowStartError
    from flows.curation import CurationConfigError, DatasetVersionError

    try:
        yield
    except (ConfigError, FlowStartError, CurationConfigError, DatasetVersionError, ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_ERROR) from err


def _prefect_env(api_url: str | None) -> None:
    for key, value in PREFECT_QUIET.items():
        os.environ.setdefault(key, value)
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url


def _config(path: Path | None) -> Any:
    from flows.config import load_flows_config

    return load_flows_config(path)


@flows_app.command("serve")
def serve_command(config: ConfigOpt = None, api_url: ApiOpt = None) -> None:
    """Run every deployment, with the curate and trigger schedules, in this process (Ctrl-C stops)."""
    _prefect_env(api_url)
    with _errors():
        from flows.deployments import serve

        serve(_config(config), config)


@flows_app.command("deploy")
def deploy_command(
    config: ConfigOpt = None,
    api_url: ApiOpt = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Container image with edgeloop installed (Docker/Kubernetes pools).")
    ] = None,
) -> None:
    """Register the deployments on their work pools (creating missing pools); workers then run them."""
    _prefect_env(api_url)
    with _errors():
        from flows.deployments import deploy

        cfg = _config(config)
        for name in deploy(cfg, config, image=image):
            typer.echo(f"deployed {name}")
        typer.echo(
            f"start workers: prefect worker start --pool {cfg.pools.gpu}  and  prefect worker start --pool "
            f"{cfg.pools.light}"
        )


@flows_app.command("run")
def run_command(
    flow: Annotated[FlowName, typer.Argument(help="The flow to run.")],
    dataset_version: Annotated[
        str | None, typer.Option("--dataset-version", help="Dataset version (retrain and tune need one).")
    ] = None,
    config: ConfigOpt = None,
    api_url: ApiOpt = None,
    deployment: Annotated[
        bool,
        typer.Option("--deployment", help="Start the served/deployed deployment instead of running here."),
    ] = False,
    wait: Annotated[
        float, typer.Option(help="With --deployment: seconds to wait for the run (0: return at once).")
    ] = 0,
) -> None:
    """Run one flow now: here, in this process (recorded on the Prefect server), or through its deployment."""
    _prefect_env(api_url)
    if flow in (FlowName.retrain, FlowName.tune) and not dataset_version:
        typer.echo(f"error: {flow.value} needs --dataset-version", err=True)
        raise typer.Exit(EXIT_ERROR)
    parameters: dict[str, Any] = {}
    if config is not None:
        parameters["config"] = str(config.resolve())
    if dataset_version is not None:
        parameters["dataset_version"] = dataset_version
    with _errors():
        if deployment:
            from flows.client import start_deployment, wait_for_run

            run_id = start_deployment(f"{flow.value}/{flow.value}", parameters)
            typer.echo(f"started {flow.value}: flow run {run_id}")
            if wait > 0:
                outcome = wait_for_run(run_id, wait)
                typer.echo(f"{flow.value}: {outcome.state}" + (f" ({outcome.message})" if outcome.message else ""))
                if outcome.state != "Completed":
                    raise typer.Exit(EXIT_ERROR)
            return
        import importlib

        fn = getattr(importlib.import_module(f"flows.{flow.value}"), flow.value)
        result = fn(**parameters)
        typer.echo(json.dumps(result, indent=2, default=str))


@train_app.command("preview-augmentation")
def preview_command(
    data: Annotated[Path, typer.Argument(help="A YOLO data.yaml (its train split is sampled).")],
    out: Annotated[Path, typer.Argument(help="Folder for the augmented images.")],
    preset: Annotated[str | None, typer.Option("--preset", help="Augmentation preset (default: the config's).")] = None,
    config: ConfigOpt = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Images to write.")] = 16,
    imgsz: Annotated[int | None, typer.Option("--imgsz", help="Image size (default: the config's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
) -> None:
    """Write augmented training samples as images, boxes drawn, to see what training will see."""
    from pydantic import ValidationError

    from flows.training.augment_preview import PreviewError, preview_augmentation

    with _errors():
        training = _config(config).training
        try:
            if preset is not None:
                training.augmentation = {"preset": preset}  # validated on assignment: the preset alone
            if imgsz is not None:
                training.imgsz = imgsz
        except ValidationError as err:
            raise ValueError(f"invalid augmentation: {err}") from err
        try:
            written = preview_augmentation(data, out, training, count=count, seed=seed)
        except PreviewError as err:
            raise ValueError(str(err)) from err
        typer.echo(f"wrote {len(written)} augmented images (preset {training.augmentation.preset}) to {out}")
