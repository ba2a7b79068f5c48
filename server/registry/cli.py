"""``edgeloop models``: publish, list, promote, pin and roll back model versions from a shell.

Works on the registry directory directly (``--registry``), under the same file lock as a running
server, which notices the change and re-announces the releases. Every command prints a readable
table, or JSON with ``--json``; a failure prints ``error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeloop.releases import ReleaseKeyError, ReleaseVerificationError, key_fingerprint, public_key_pem
from edgeloop.tables import format_table
from server.registry.store import CHECKPOINT_NAME, ModelRegistry, ModelVersion, RegistryConfig, RegistryError

#: The registry directory when --registry is not given (relative to the working directory).
DEFAULT_REGISTRY = Path(".edgeloop/server/registry")
#: Exit status of a command that failed for a reason it explains (typer uses 2 for usage errors too).
EXIT_ERROR = 2

models_app = typer.Typer(
    name="models",
    help="Model registry: publish versions, promote them to channels, pin devices, roll back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RegistryOpt = Annotated[
    Path,
    typer.Option("--registry", help="Registry directory (registry.json, artifacts, release key).", show_default=True),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ChannelOpt = Annotated[str, typer.Option("--channel", "-c", help="Release channel.")]
GroupOpt = Annotated[str | None, typer.Option("--group", "-g", help="Target only this device group.")]
DeviceArg = Annotated[str, typer.Argument(help="Device id.")]


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the registry's errors into one line on stderr and exit status 2, never a traceback."""
    try:
        yield
    except (RegistryError, ReleaseKeyError, ReleaseVerificationError, ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_ERROR) from err


def _open(registry: Path, signing_key: Path | None = None) -> ModelRegistry:
    return ModelRegistry(RegistryConfig(root=registry, signing_key=signing_key))


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def _report(as_json: bool, data: dict[str, Any], text: str) -> None:
    """What a command that changes the registry prints: ``data`` with ``--json``, else ``text``."""
    if as_json:
        _echo_json(data)
    else:
        typer.echo(text)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ") if seconds else "-"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


def _pairs(values: list[str] | None, what: str, parse: Callable[[str, str], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RegistryError(f"{what} {item!r} must look like name=value")
        out[key.strip()] = parse(key.strip(), raw.strip())
    return out


def _metric(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise RegistryError(f"metric {key}={raw!r} is not a number") from None


def _param(key: str, raw: str) -> Any:
    try:  # numbers, booleans, lists stay typed; anything else is a string
        return json.loads(raw)
    except ValueError:
        return raw


def _serving(registry: ModelRegistry) -> dict[str, list[str]]:
    """version -> where it is served: ``stable``, ``canary@lobby``, ``pin:cam-1``."""
    out: dict[str, list[str]] = {}
    state = registry.state()
    for channel in registry.channels:
        channel_state = state.channels.get(channel)
        if channel_state is None:
            continue
        if channel_state.release.current:
            out.setdefault(channel_state.release.current, []).append(channel)
        for group, target in channel_state.groups.items():
            if target.current:
                out.setdefault(target.current, []).append(f"{channel}@{group}")
    for device, pin in state.pins.items():
        out.setdefault(pin.version, []).append(f"pin:{device}")
    return out


def _version_json(v: ModelVersion, registry: ModelRegistry) -> dict[str, Any]:
    data = v.model_dump(mode="json")
    data["serving"] = _serving(registry).get(v.version, [])
    return data


def _metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items()) or "-"


@models_app.command("list")
def list_command(registry: RegistryOpt = DEFAULT_REGISTRY, as_json: JsonOpt = False) -> None:
    """List versions, what each channel serves, pins and group assignments."""
    with _errors():
        reg = _open(registry)
        state = reg.state()
        if as_json:
            _echo_json(
                {
                    "versions": [_version_json(v, reg) for v in reg.list()],
                    "channels": {
                        c: state.channels[c].model_dump(mode="json") for c in reg.channels if c in state.channels
                    },
                    "pins": {d: p.version for d, p in state.pins.items()},
                    "assignments": dict(state.assignments),
                }
            )
            return
        versions = reg.list()
        if not versions:
            typer.echo(f"no versions in {registry}; publish one with: edgeloop models publish MODEL.onnx")
            return
        serving = _serving(reg)
        rows = [
            [
                v.version + (" (pruned)" if v.pruned else " (rejected)" if v.rejected else ""),
                _when(v.created),
                v.parent_version or "-",
                v.dataset_version or "-",
                str(len(v.class_names)),
                str(v.imgsz),
                _size(v.artifact_size),
                v.artifact_sha256[:12],
                _metrics_text(v.metrics),
                ", ".join(serving.get(v.version, [])) or "-",
            ]
            for v in versions
        ]
        headers = ["VERSION", "CREATED", "PARENT", "DATASET", "CLASSES", "IMGSZ", "SIZE", "SHA256", "METRICS"]
        typer.echo(format_table([*headers, "SERVING"], rows))
        targets = []
        for channel in reg.channels:
            cs = state.channels.get(channel)
            entries = [(channel, cs.release if cs else None)] + [
                (f"{channel}@{g}", t) for g, t in (cs.groups.items() if cs else [])
            ]
            for name, target in entries:
                history = " ".join(h.version for h in reversed(target.history)) if target else ""
                current = target.current if target and target.current else "-"
                targets.append([name, current, _when(target.since) if target else "-", history or "-"])
        typer.echo("\n" + format_table(["CHANNEL", "CURRENT", "SINCE", "ROLLBACK TO (newest first)"], targets))
        if state.pins:
            pins = [[d, p.version, _when(p.since)] for d, p in state.pins.items()]
            typer.echo("\n" + format_table(["PINNED DEVICE", "VERSION", "SINCE"], pins))
        if state.assignments:
            groups = [[d, g] for d, g in state.assignments.items()]
            typer.echo("\n" + format_table(["DEVICE", "GROUP"], groups))


@models_app.command("show")
def show_command(
    version: Annotated[str, typer.Argument(help="The version to show.")],
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Show one version's facts, lineage and whether its signature and artifact check out."""
    with _errors():
        reg = _open(registry)
        v = reg.get(version)
        try:
            reg.verify(version)
            verified, problem = True, ""
        except (ReleaseVerificationError, ReleaseKeyError, RegistryError) as err:
            verified, problem = False, str(err)
        artifact = "" if v.pruned else str(reg.root / "artifacts" / v.version / "model.onnx")
        has_checkpoint = v.checkpoint_size and not v.pruned
        checkpoint = str(reg.root / "artifacts" / v.version / CHECKPOINT_NAME) if has_checkpoint else ""
        if as_json:
            _echo_json(
                {
                    **_version_json(v, reg),
                    "status": v.status,
                    "artifact": artifact,
                    "checkpoint": checkpoint,
                    "verified": verified,
                    "problem": problem,
                }
            )
            return
        lineage = []
        parent = v.parent_version
        while parent and parent not in lineage:
            lineage.append(parent)
            try:
                parent = reg.get(parent).parent_version
            except RegistryError:
                break
        lines = [
            ("version", v.version + (" (artifact pruned)" if v.pruned else "")),
            ("status", f"REJECTED: {v.rejected}" if v.rejected else "pruned" if v.pruned else "ok"),
            ("created", _when(v.created)),
            ("lineage", " <- ".join([v.version, *lineage])),
            ("dataset", v.dataset_version or "-"),
            (
                "classes",
                f"{len(v.class_names)}: {', '.join(v.class_names[:10])}{' ...' if len(v.class_names) > 10 else ''}",
            ),
            ("imgsz", str(v.imgsz)),
            ("artifact", f"{artifact or '-'} ({v.artifact_size} bytes)"),
            ("sha256", v.artifact_sha256),
            (
                "weights",
                f"{checkpoint} (training checkpoint, {v.checkpoint_size} bytes; never sent to devices)"
                if checkpoint
                else "-",
            ),
            ("signed by", v.key_id or "-"),
            ("signature", "valid" if verified else f"NOT VALID: {problem}"),
            ("metrics", _metrics_text(v.metrics)),
            ("params", json.dumps(v.params, sort_keys=True) if v.params else "-"),
            ("serving", ", ".join(_serving(reg).get(v.version, [])) or "-"),
            ("source", v.source or "-"),
            ("flow run", v.flow_run_id or "-"),
            ("notes", v.notes or "-"),
        ]
        width = max(len(k) for k, _ in lines)
        typer.echo("\n".join(f"{k.ljust(width)}  {val}" for k, val in lines))


@models_app.command("prepare")
def prepare_command(
    model: Annotated[Path, typer.Argument(help="An ultralytics ONNX detect export.")],
    out: Annotated[Path, typer.Argument(help="Where to write the prepared model (may be MODEL itself).")],
    reference_images: Annotated[
        list[Path] | None,
        typer.Option(
            "--reference-images",
            "-r",
            help="The images the model was trained on (folders or files, repeatable): their statistics travel "
            "in the model so devices can tell frames unlike them.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add the image-embedding output (and reference statistics) to a model before publishing it."""
    from server.registry.prepare import PrepareError, prepare_model

    try:
        stats = prepare_model(model, out, reference_images or [])
    except (PrepareError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_ERROR) from err
    data: dict[str, Any] = {"model": str(out), "embedding": True}
    if stats is not None:
        data["reference"] = {"images": stats.source, "vectors": len(stats.vectors), "q50": stats.q50, "q99": stats.q99}
    text = f"wrote {out} with an image-embedding output"
    if stats is not None:
        text += f" and reference statistics ({stats.source}; nearest-neighbour distance q50 {stats.q50:.2f}, "
        text += f"q99 {stats.q99:.2f})"
    _report(as_json, data, text)


@models_app.command("publish")
def publish_command(
    onnx: Annotated[Path, typer.Argument(help="An ultralytics YOLO detect export (.onnx).")],
    version: Annotated[str | None, typer.Option("--version", help="Version name (default: the next vN).")] = None,
    parent: Annotated[str | None, typer.Option("--parent", help="The version it was trained from.")] = None,
    dataset_version: Annotated[str, typer.Option("--dataset-version", help="Dataset version it was trained on.")] = "",
    metric: Annotated[
        list[str] | None, typer.Option("--metric", help="name=number, repeatable (e.g. mAP50=0.61).")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="name=value training parameter, repeatable.")
    ] = None,
    notes: Annotated[str, typer.Option("--notes", help="Free text.")] = "",
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint", help="The training checkpoint (.pt) it was exported from (never sent to devices)."
        ),
    ] = None,
    signing_key: Annotated[
        Path | None, typer.Option("--signing-key", help="Release key (default <registry>/release_key.pem).")
    ] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Copy an ONNX export into the registry, sign it and record it as a new version."""
    with _errors():
        reg = _open(registry, signing_key)
        v = reg.publish(
            onnx,
            version=version,
            parent=parent,
            dataset_version=dataset_version,
            params=_pairs(param, "parameter", _param),
            metrics=_pairs(metric, "metric", _metric),
            notes=notes,
            checkpoint=checkpoint,
        )
        if as_json:
            _echo_json(_version_json(v, reg))
            return
        typer.echo(
            f"published {v.version}: {len(v.class_names)} classes, imgsz {v.imgsz}, {_size(v.artifact_size)}, "
            f"sha256 {v.artifact_sha256[:12]}, signed by {v.key_id}"
        )


@models_app.command("promote")
def promote_command(
    version: Annotated[str, typer.Argument(help="The version to release.")],
    channel: ChannelOpt = "stable",
    group: GroupOpt = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Make VERSION the current release of a channel (or of one device group on it)."""
    with _errors():
        previous = _open(registry).promote(version, channel, group=group)
        where = channel if group is None else f"{channel} for group {group}"
        data = {"channel": channel, "group": group, "version": version, "previous": previous}
        _report(as_json, data, f"{where}: {previous or 'nothing'} -> {version}")


@models_app.command("rollback")
def rollback_command(
    channel: ChannelOpt = "stable",
    group: GroupOpt = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Return a channel (or a device group on it) to the release it served before."""
    with _errors():
        reg = _open(registry)
        replaced = reg.current(channel, group)
        version = reg.rollback(channel, group=group)
        where = channel if group is None else f"{channel} for group {group}"
        data = {"channel": channel, "group": group, "version": version, "replaced": replaced}
        _report(as_json, data, f"{where}: rolled back {replaced} -> {version}")


@models_app.command("pin")
def pin_command(
    device: DeviceArg,
    version: Annotated[str, typer.Argument(help="The version the device must run.")],
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Pin a device to a version, whatever its channel or group serves."""
    with _errors():
        previous = _open(registry).pin(device, version)
        text = f"pinned {device} to {version}" + (f" (was {previous})" if previous else "")
        _report(as_json, {"device": device, "version": version, "previous": previous}, text)


@models_app.command("unpin")
def unpin_command(
    device: DeviceArg,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Remove a device's pin: it follows its channel (and group) again."""
    with _errors():
        previous = _open(registry).unpin(device)
        text = f"unpinned {device} (was {previous})" if previous else f"{device} was not pinned"
        _report(as_json, {"device": device, "previous": previous}, text)


@models_app.command("assign")
def assign_command(
    device: DeviceArg,
    group: Annotated[str, typer.Argument(help="Device group (targets of `promote --group`).")],
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Put a device in a group; the group's releases then win over its channel's."""
    with _errors():
        previous = _open(registry).assign(device, group)
        text = f"{device} is in group {group}" + (f" (was {previous})" if previous else "")
        _report(as_json, {"device": device, "group": group, "previous": previous}, text)


@models_app.command("unassign")
def unassign_command(
    device: DeviceArg,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Take a device out of its group."""
    with _errors():
        previous = _open(registry).assign(device, None)
        text = f"{device} left group {previous}" if previous else f"{device} was in no group"
        _report(as_json, {"device": device, "previous": previous}, text)


@models_app.command("public-key")
def public_key_command(
    signing_key: Annotated[
        Path | None, typer.Option("--signing-key", help="Release key (default <registry>/release_key.pem).")
    ] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
) -> None:
    """Print the release key's public half (PEM) for the devices' config; creates the key if there is none."""
    with _errors():
        key = _open(registry, signing_key).signing_key()
        typer.echo(public_key_pem(key).decode("ascii"), nl=False)
        typer.echo(f"# {key_fingerprint(key)}", err=True)
