"""``edgeloop demo``: run the whole loop on this machine and report each round."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

SHARED = Path("../shared")


def demo(
    rounds: Annotated[int | None, typer.Option(min=1, max=20, help="Rounds of curate -> retrain -> release.")] = None,
    quick: Annotated[bool, typer.Option(help="Smaller world, batches and trainings (what CI runs; ~6 min).")] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write report.json, report.md and map.png here after each round.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Any YOLO data set (data.yaml with train and test splits) instead of the synthetic worlds."),
    ] = None,
    open_app: Annotated[
        bool, typer.Option("--open-app", help="Leave the FiftyOne App and the Prefect UI running at the end.")
    ] = False,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps everything (cleared at start).")] = Path(".demo"),
    base_checkpoint: Annotated[
        Path, typer.Option(help="The pretrained checkpoint the first model is fine-tuned from.")
    ] = SHARED / "models" / "yolov8n_coco_dequant.pt",
) -> None:
    """The whole active-learning loop on one machine, round by round.

    Cameras keep what their model is unsure of, an oracle curator labels review batches, Prefect
    flows retrain, gate and release, the cameras swap models; each round is scored and reported."""
    from rich.console import Console

    from edgeloop.logs import setup_logging

    setup_logging("WARNING")
    console = Console(highlight=False, soft_wrap=True)  # progress lines stay whole in a log file
    # An error is one line, whatever the terminal's width: a user greps it, a test reads it.
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if not base_checkpoint.is_file():
        err.print(f"error: base checkpoint {base_checkpoint} not found (pass --base-checkpoint PATH to a YOLO .pt)")
        raise typer.Exit(2)
    if data is not None:
        from edgeloop.yolo_dataset import DatasetError, load_yolo_dataset

        try:
            dataset = load_yolo_dataset(data)
            dataset.split("test")
        except DatasetError as e:
            err.print(f"error: --data {data}: {e}")
            raise typer.Exit(2) from e
    from loop.demo import DemoError, DemoOptions, run_demo

    options = DemoOptions(
        workdir=workdir.resolve(), rounds=rounds or (2 if quick else 3), quick=quick,
        report_dir=report.resolve() if report else None, data=data, open_app=open_app,
        base_checkpoint=base_checkpoint.resolve(),
    )  # fmt: skip
    start = time.monotonic()

    def say(message: str) -> None:
        console.print(f"[dim]{time.monotonic() - start:6.0f}s[/dim]  {message}")

    try:
        loop = run_demo(options, say)
    except DemoError as e:
        err.print(f"error: {e}")
        raise typer.Exit(1) from e
    except KeyboardInterrupt:
        err.print("interrupted: stopped everything")
        raise typer.Exit(130) from None
    result = loop.report
    first, last = result.rounds[0], result.rounds[-1]
    console.print(
        f"\nmAP50-95 on world B's test split: {first.map50_95:.3f} (round 0) -> {last.map50_95:.3f} "
        f"(round {last.round}), {last.labels_total - first.labels_total} curated labels; "
        f"the curator was {result.curator}"
    )
    if options.report_dir:
        console.print(f"report: {options.report_dir / 'report.md'} (and report.json, map.png)")
    console.print("inspect what the demo made:")
    console.print(f"  edgeloop models list --registry {options.workdir / 'server' / 'registry'}")
    console.print(f"  edgeloop curate versions --config {options.workdir / 'server.yaml'}")
    if open_app:
        for name, url in result.urls.items():
            console.print(f"{name}: {url}")
        console.print("serving the App and the Prefect UI; press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            loop.stack.stop_services()
