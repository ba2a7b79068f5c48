"""The server's configuration: one YAML file (``edgeloop server run --config server.yaml``) plus
environment overrides with the prefix ``EDGELOOP_SERVER`` (``EDGELOOP_SERVER__GRPC__PORT=50052``).

Every section is defined beside the code it configures; this module assembles them. Paths that a
file leaves unset live under ``data_dir`` (media, database, registry, devices, FiftyOne state), so
one directory holds a whole single-machine deployment. ``edgeloop server config-schema`` prints the
JSON schema with every field's description.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from edgeloop.config_base import StrictModel, load_config
from server.curation.config import CurationConfig
from server.devices import DevicesConfig
from server.ingest.grpc_service import GrpcServerConfig
from server.ingest.mqtt_bridge import MqttBridgeConfig
from server.ingest.validation import ValidationConfig
from server.registry.announce import ReleaseAnnouncerConfig
from server.registry.store import RegistryConfig
from server.store.inbox import InboxConfig
from server.store.media import MediaConfig
from server.store.mongo import MongoConfig

ENV_PREFIX = "EDGELOOP_SERVER"

#: (section, field, folder under data_dir) for every path that defaults into data_dir.
_DATA_PATHS = (
    ("media", "root", "media"),
    ("mongo", "db_dir", "mongodb"),
    ("registry", "root", "registry"),
    ("devices", "root", "devices"),
    ("curation", "root", "curation"),
)


class FiftyOneAppConfig(StrictModel):
    """The FiftyOne App, where curators review the inbox."""

    enabled: bool = Field(default=False, description="Start the FiftyOne App with the server.")
    host: str = Field(default="127.0.0.1", description="Address the App binds (loopback unless you mean otherwise).")
    port: int = Field(default=5151, ge=1, le=65535, description="The App's port.")


class ServerMetricsConfig(StrictModel):
    enabled: bool = Field(default=True, description="Serve Prometheus metrics over HTTP.")
    host: str = Field(default="127.0.0.1", description="Address to bind (loopback unless you mean otherwise).")
    port: int = Field(default=9109, ge=0, le=65535, description="Port; 0 picks a free one.")


class ServerConfig(StrictModel):
    """Everything an edgeloop server needs to know."""

    data_dir: Path = Field(default=Path(".edgeloop/server"), description="Home of every path left unset below.")
    grpc: GrpcServerConfig = Field(default_factory=GrpcServerConfig, description="gRPC ingest and registry.")
    mqtt: MqttBridgeConfig = Field(default_factory=MqttBridgeConfig, description="The MQTT ingest bridge.")
    announce: ReleaseAnnouncerConfig | None = Field(
        default=None, description="Announce releases as retained MQTT messages on this broker (None: gRPC only)."
    )
    mongo: MongoConfig = Field(default_factory=MongoConfig, description="The MongoDB behind FiftyOne.")
    media: MediaConfig = Field(default_factory=MediaConfig, description="The media store for frame images.")
    inbox: InboxConfig = Field(default_factory=InboxConfig, description="The FiftyOne dataset frames land in.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Checks on every frame.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="The model registry.")
    devices: DevicesConfig = Field(default_factory=DevicesConfig, description="Device identities and credentials.")
    app: FiftyOneAppConfig = Field(default_factory=FiftyOneAppConfig, description="The FiftyOne App.")
    curation: CurationConfig = Field(
        default_factory=CurationConfig, description="Review batches, the training set and its versions."
    )
    metrics: ServerMetricsConfig = Field(default_factory=ServerMetricsConfig, description="Prometheus metrics.")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Ingest processes on this machine (server.workers): each has its own GIL, so storing scales past "
            "one core. They share the gRPC port (SO_REUSEPORT) and the MQTT shared-subscription group; "
            "metrics.port serves the sum of all of them."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _paths_under_data_dir(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        base = Path(data.get("data_dir") or cls.model_fields["data_dir"].default)
        for section, field, folder in _DATA_PATHS:
            value = data.get(section)
            if isinstance(value, StrictModel):
                continue  # already built (validate_assignment re-runs this with the built sections)
            value = dict(value or {})
            value.setdefault(field, base / folder)
            data[section] = value
        return data

    @property
    def fiftyone_dir(self) -> Path:
        """FiftyOne's own state (config files, plugins, default dataset dir)."""
        return self.data_dir / "fiftyone"


def load_server_config(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Load and validate the server's config; relative paths in it are taken from the file's folder."""
    return load_config(ServerConfig, path, env=env, env_prefix=ENV_PREFIX, overrides=overrides)
