"""``edgeloop agent ...``: run the agent, or dry-run detection and scoring to tune thresholds."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

logger = logging.getLogger(__name__)

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

_BACKEND_BY_SUFFIX = {".onnx": "onnxruntime", ".pt": "ultralytics"}


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="The agent's YAML config (see edge.example.yaml).")],
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the agent: read the source, keep uncertain frames, upload them."""
    from edge_agent.config import load_agent_config
    from edge_agent.detectors import DetectorError
    from edge_agent.sources import SourceError
    from edgeloop.config_base import ConfigError
    from edgeloop.logs import setup_logging

    setup_logging(log_level)
    try:
        cfg = load_agent_config(config)
    except ConfigError as err:
        raise _fail(f"{err}\n(fix the file, or print the schema: edgeloop agent config-schema)") from err
    from edge_agent.app import Agent
    from edge_agent.outbox import OutboxError

    try:
        agent = Agent(cfg)
    except DetectorError as err:
        raise _fail(f"cannot load the detector: {err}") from err
    except OutboxError as err:
        raise _fail(f"{err} (free space on that volume, or point outbox.path elsewhere)") from err

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping (frames in the outbox stay there)", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        counters = agent.run()
        waiting = agent.outbox.depth
    except SourceError as err:
        raise _fail(str(err)) from err
    finally:
        agent.close()
    logger.info("agent finished: %s", json.dumps(counters, sort_keys=True))
    if waiting and cfg.transport is not None:
        # A finite source ended before the outbox drained (receiver down, or too slow): say so, or
        # the user reads "finished" and thinks the frames arrived.
        logger.warning(
            "%d kept frame(s) were not uploaded (%d upload error(s)); they wait in the outbox %s and go out "
            "the next time the agent runs and reaches %s",
            waiting,
            counters.get("upload_errors", 0),
            cfg.outbox.path,
            _describe(cfg.transport),
        )


def _describe(transport: Any) -> str:
    target = getattr(transport, "target", None)
    return target if target else f"{getattr(transport, 'host', '?')}:{getattr(transport, 'port', '?')}"


@app.command("score")
def score(
    source: Annotated[str, typer.Argument(help="Image folder, video file, camera index or stream URL.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Model file: .onnx (ONNX Runtime) or .pt.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per frame on stdout.")] = False,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Agent YAML to take trigger thresholds from.")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="onnxruntime, tensorrt or ultralytics (default: from the file suffix).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random-share trigger.")] = 0,
    sequence: Annotated[
        bool,
        typer.Option(
            "--sequence/--stills",
            help="A folder's images are consecutive frames of one camera (default: unrelated stills; "
            "videos and cameras are always streams).",
        ),
    ] = False,
) -> None:
    """Dry run: detect and score every frame and print detections, score and reasons. Nothing is
    stored or uploaded; use it to tune the trigger thresholds."""
    from pydantic import TypeAdapter, ValidationError

    from edge_agent.config import load_agent_config
    from edge_agent.detectors import DetectorConfig, DetectorError, create_detector
    from edge_agent.sources import SourceConfig, SourceError, open_source
    from edge_agent.triggers import TriggersConfig, UncertaintyScorer
    from edgeloop.config_base import ConfigError
    from edgeloop.logs import setup_logging

    setup_logging("WARNING")
    triggers = TriggersConfig()
    if config is not None:
        try:
            triggers = load_agent_config(config).triggers
        except ConfigError as err:
            raise _fail(str(err)) from err
    kind = backend or _BACKEND_BY_SUFFIX.get(model.suffix.lower())
    if kind is None:
        raise _fail(f"cannot tell the backend from {model.name!r}: pass --backend onnxruntime|tensorrt|ultralytics")
    try:
        det_cfg = TypeAdapter(DetectorConfig).validate_python({"type": kind, "model": model})
        detector = create_detector(det_cfg)
    except ValidationError as err:
        raise _fail(f"bad detector settings: {err}") from err
    except DetectorError as err:
        raise _fail(f"cannot load {model}: {err}") from err
    scorer = UncertaintyScorer(triggers, seed=seed)
    try:
        frames = open_source(SourceConfig(uri=source, limit=limit, sequence=sequence))
    except SourceError as err:
        raise _fail(str(err)) from err
    seen = kept = 0
    fired: Counter[str] = Counter()
    with detector:
        for frame in frames:
            output = detector.detect_all(frame.image)
            detections = output.detections
            verdict = scorer.score(
                frame.source_id,
                detections,
                frame.capture_time,
                image_size=(frame.width, frame.height),
                class_names=detector.class_names,
                weak=output.weak,
                embedding=output.embedding,
                reference=detector.reference,
                stream=frame.stream,
            )
            seen += 1
            kept += verdict.keep
            fired.update(r.trigger for r in verdict.reasons)
            row = {
                "frame": frame.name,
                "index": frame.index,
                "width": frame.width,
                "height": frame.height,
                "model_version": detector.model_version,
                "detections": [
                    {
                        "class": d.class_name,
                        "class_id": d.class_id,
                        "confidence": round(float(d.confidence), 4),
                        "box": [round(float(v), 1) for v in d.box],
                    }
                    for d in detections
                ],
                "score": round(float(verdict.score), 4),
                "keep": verdict.keep,
                "reasons": [
                    {"trigger": r.trigger, "score": round(float(r.score), 4), "detail": r.detail}
                    for r in verdict.reasons
                ],
            }
            if json_out:
                sys.stdout.write(json.dumps(row) + "\n")
            else:
                names = ", ".join(f"{d['class']} {d['confidence']:.2f}" for d in row["detections"]) or "-"
                why = "; ".join(f"{r['trigger']}: {r['detail']}" for r in row["reasons"]) or "-"
                mark = "KEEP" if verdict.keep else "skip"
                typer.echo(f"{frame.name}: {mark} score={verdict.score:.3f} | {names} | {why}")
            sys.stdout.flush()
    per_trigger = ", ".join(f"{name} {n}" for name, n in fired.most_common()) or "none fired"
    summary = f"kept {kept} of {seen} frames; triggers fired: {per_trigger}"
    if json_out:
        sys.stderr.write(summary + "\n")  # stdout stays one JSON object per frame
    else:
        typer.echo(summary)


@app.command("config-schema")
def config_schema() -> None:
    """Print the JSON schema of the agent's YAML config (every field with its description)."""
    from edge_agent.config import AgentConfig

    typer.echo(json.dumps(AgentConfig.model_json_schema(), indent=2))
