"""``edgeloop server devices ...``: issue, list and revoke device credentials (see ``server/devices.py``).

Every command takes ``--root`` (the registry folder) or ``--config`` (a YAML file holding the
devices settings, either at the top level or under a ``devices:`` key). Errors are one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeloop.tables import format_table

devices_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Issue, list and revoke device credentials (client certificates, MQTT users and ACL).",
)

RootOpt = Annotated[
    Path | None,
    typer.Option("--root", help="Registry folder (default .edgeloop/server/devices, or the config's root)."),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML with the devices settings (top level or under 'devices:')."),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _registry(root: Path | None, config: Path | None):
    from edgeloop.config_base import ConfigError, load_config
    from server.devices import DeviceRegistry, DevicesConfig

    overrides: dict[str, Any] = {"root": root} if root is not None else {}
    try:
        if config is not None:
            # A whole server config holds the settings under "devices:"; load just that part.
            import yaml

            try:
                data = yaml.safe_load(config.read_text()) or {}
            except OSError as err:
                raise ConfigError(f"cannot read {config}: {err}") from err
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {config} is not valid YAML: {err}") from err
            if isinstance(data, dict) and isinstance(data.get("devices"), dict):
                data = data["devices"]
            if not isinstance(data, dict):
                raise ConfigError(f"config file {config} must hold a mapping")
            cfg = load_config(DevicesConfig, None, overrides={**data, **overrides})
        else:
            cfg = load_config(DevicesConfig, None, overrides=overrides)
    except ConfigError as err:
        raise _fail(str(err)) from err
    if config is not None and root is None and not cfg.root.is_absolute():
        cfg.root = config.resolve().parent / cfg.root  # relative to the config file, like the agent's paths
    return DeviceRegistry(cfg)


def _reload_note(reloaded: bool, has_pid_file: bool) -> None:
    if reloaded:
        typer.echo("The broker was told to reload its password and ACL files.")
    elif has_pid_file:
        typer.secho(
            "warning: the broker could not be signalled (see the log); reload it yourself (kill -HUP <pid>).",
            fg=typer.colors.YELLOW,
            err=True,
        )
    else:
        typer.echo("No mosquitto_pid_file configured: reload the broker yourself (kill -HUP <pid>) to apply.")


@devices_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The device id (letters, digits, '.', '_', '-').")],
    group: Annotated[str | None, typer.Option("--group", "-g", help="A group label, e.g. a site or channel.")] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Register a device: client certificate, MQTT password, ACL entries and a bundle to copy to it."""
    from server.devices import DeviceError

    registry = _registry(root, config)
    try:
        creds = registry.add(name, group=group)
    except DeviceError as err:
        raise _fail(str(err)) from err
    except OSError as err:
        raise _fail(f"cannot write under {registry.root}: {err}") from err
    info = creds.device
    typer.echo(f"Added device {name} (certificate serial {info.cert_serial:x}, expires {info.cert_expires:%Y-%m-%d}).")
    typer.echo(f"Bundle: {creds.bundle_dir}")
    typer.echo(f"  ca.pem, device.pem, device.key; agent settings: {creds.grpc_config.name}, {creds.mqtt_config.name}")
    typer.echo(f"MQTT user: {creds.mqtt_username}")
    typer.echo(f"MQTT password: {creds.mqtt_password}")
    typer.echo(
        "The password is shown only now (the registry keeps a hash). Copy the bundle to the device, then delete it."
    )
    _reload_note(creds.broker_reloaded, registry.config.mosquitto_pid_file is not None)


@devices_app.command("list")
def list_devices(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array instead of a table.")] = False,
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show every device, active and revoked."""
    from server.devices import DeviceError

    registry = _registry(root, config)
    try:
        devices = registry.list()
    except DeviceError as err:
        raise _fail(str(err)) from err
    if as_json:
        typer.echo(json.dumps([d.to_json() for d in devices], indent=2))
        return
    if not devices:
        typer.echo(f"No devices in {registry.root}.")
        return
    rows = []
    for d in devices:
        status = "active" if d.active else f"revoked {d.revoked:%Y-%m-%d %H:%M}"
        rows.append(
            (
                d.device_id,
                d.group or "-",
                status,
                f"{d.created:%Y-%m-%d %H:%M}",
                f"{d.cert_serial:x}"[:16],
                f"{d.cert_expires:%Y-%m-%d}",
            )
        )
    typer.echo(format_table(("ID", "GROUP", "STATUS", "CREATED", "CERT SERIAL", "CERT EXPIRES"), rows))


@devices_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The device id.")],
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Take back a device's credentials: the receiver refuses it at once, the broker after reloading."""
    from server.devices import DeviceError

    registry = _registry(root, config)
    try:
        result = registry.revoke(name)
    except DeviceError as err:
        raise _fail(str(err)) from err
    except OSError as err:
        raise _fail(f"cannot write under {registry.root}: {err}") from err
    typer.echo(f"Revoked device {name} (certificate serial {result.device.cert_serial:x}).")
    _reload_note(result.broker_reloaded, registry.config.mosquitto_pid_file is not None)


@devices_app.command("server-cert")
def server_cert(root: RootOpt = None, config: ConfigOpt = None) -> None:
    """Print the paths of the server's certificate, key and CA (creating them on first use)."""
    from server.devices import DeviceError

    registry = _registry(root, config)
    try:
        creds = registry.server_credentials()
    except DeviceError as err:
        raise _fail(str(err)) from err
    except OSError as err:
        raise _fail(f"cannot write under {registry.root}: {err}") from err
    typer.echo(f"ca_file: {creds.ca_file}")
    typer.echo(f"cert_file: {creds.cert_file}")
    typer.echo(f"key_file: {creds.key_file}")
    typer.echo(f"names: {', '.join(registry.config.server_names)}")


@devices_app.command("mosquitto-files")
def mosquitto_files(root: RootOpt = None, config: ConfigOpt = None) -> None:
    """Write the broker's password and ACL files from the registry and print the mosquitto.conf lines."""
    from server.devices import DeviceError

    registry = _registry(root, config)
    try:
        files = registry.write_mosquitto_files()
    except DeviceError as err:
        raise _fail(str(err)) from err
    except OSError as err:
        raise _fail(f"cannot write under {registry.root}: {err}") from err
    typer.echo(files.conf_lines(), nl=False)
