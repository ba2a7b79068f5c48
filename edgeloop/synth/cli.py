"""The ``edgeloop synth`` command: write a synthetic YOLO data set (and optionally a video) to a folder.

:func:`synth_command` is a plain function with typer annotations; the root CLI registers it, e.g.
``app.command("synth")(synth_command)``.
"""

import re
from pathlib import Path
from typing import Annotated

import typer
import yaml

from edgeloop.synth.scenarios import UnknownScenarioError, get_scenario, scenario_names
from edgeloop.synth.scenes import SynthError, write_dataset


def _parse_imgsz(text: str) -> tuple[int, int]:
    """``"320"`` -> (320, 320); ``"640x480"`` or ``"640,480"`` -> (640, 480) as (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x,X]\s*(\d+)\s*)?", text)
    if not m:
        raise typer.BadParameter(f"{text!r} is not N or WxH, e.g. 320 or 640x480", param_hint="--imgsz")
    w = int(m.group(1))
    return w, int(m.group(2)) if m.group(2) else w


def synth_command(
    out: Annotated[Path, typer.Argument(help="Folder to write the data set to (created if missing).")],
    scenario: Annotated[str, typer.Option(help=f"Named scenario: {', '.join(scenario_names())}.")] = "shapes",
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Number of still images (and video frames).")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="Random seed; the same seed writes the same bytes.")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.95, help="Share of the images in the val split.")] = 0.2,
    test_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.95, help="Share of the images in a test split (0: none).")
    ] = 0.0,
    video: Annotated[
        bool, typer.Option(help="Also write video.mp4: a moving camera-like sequence of n frames.")
    ] = False,
    fps: Annotated[float, typer.Option(min=0.1, help="Frame rate of the video.")] = 10.0,
    imgsz: Annotated[
        str | None, typer.Option(help="Override the scenario's image size: N (square) or WxH, e.g. 640x480.")
    ] = None,
    image_format: Annotated[str, typer.Option("--format", help="Image file format: jpg or png.")] = "jpg",
    overwrite: Annotated[bool, typer.Option(help="Replace a data set already in OUT.")] = False,
) -> None:
    """Write a synthetic object-detection data set in the YOLO / ultralytics layout.

    OUT gets images/{train,val}, labels/{train,val} and data.yaml, ready for `yolo train data=OUT/data.yaml`.
    """
    try:
        params = get_scenario(scenario)
    except UnknownScenarioError as err:
        raise typer.BadParameter(str(err), param_hint="--scenario") from err
    if imgsz is not None:
        width, height = _parse_imgsz(imgsz)
        try:
            params = params.updated(width=width, height=height)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--imgsz") from err
    if image_format not in ("jpg", "png"):
        raise typer.BadParameter(f"{image_format!r} is not jpg or png", param_hint="--format")
    try:
        data_yaml = write_dataset(
            out,
            params,
            n,
            seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            video=video,
            fps=fps,
            image_format=image_format,  # type: ignore[arg-type]  # checked just above
            overwrite=overwrite,
            scenario=scenario,
        )
    except (SynthError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err

    root = data_yaml.parent
    info = _read_info(data_yaml)
    typer.echo(
        f"scenario {scenario!r}, seed {seed}, {params.width}x{params.height}: "
        f"{info['train']} train + {info['val']} val"
        + (f" + {info['test']} test" if info.get("test") else "")
        + f" images in {root / 'images'}, labels in {root / 'labels'}"
    )
    if info.get("video"):
        video_path = root / info["video"]
        note = " (this OpenCV cannot write mp4v: MJPG .avi instead)" if video_path.suffix == ".avi" else ""
        typer.echo(f"video: {video_path} ({n} frames at {fps:g} fps){note}, labels in {root / 'video_labels'}")
    typer.echo(f"data set: {data_yaml}")


def _read_info(data_yaml: Path) -> dict:
    return yaml.safe_load(data_yaml.read_text())["edgeloop_synth"]
