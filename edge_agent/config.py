"""The agent's configuration: one YAML file (``edgeloop agent run --config edge.yaml``) plus
environment overrides with the prefix ``EDGELOOP_AGENT`` (``EDGELOOP_AGENT__DEVICE_ID=cam-7``).

Every section is a pydantic model that rejects unknown keys; ``edgeloop agent config-schema``
prints the JSON schema with each field's description.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from edge_agent.budget import BudgetConfig
from edge_agent.detectors import DetectorConfig
from edge_agent.metrics import MetricsConfig
from edge_agent.outbox import OutboxConfig
from edge_agent.sources import SourceConfig
from edge_agent.transports import TransportConfig
from edge_agent.triggers import TriggersConfig
from edge_agent.updater import UpdateConfig
from edge_agent.uploader import UploadConfig
from edgeloop.config_base import StrictModel, load_config

ENV_PREFIX = "EDGELOOP_AGENT"

#: Device ids appear in MQTT topics and file names: no '/', '+', '#' or spaces.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AgentConfig(StrictModel):
    """Everything an edge agent needs to know."""

    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="This device's unique id.")
    source: SourceConfig
    detector: DetectorConfig
    triggers: TriggersConfig = Field(default_factory=TriggersConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    transport: TransportConfig | None = Field(
        default=None, description="Where kept frames go; without one they stay in the outbox."
    )
    upload: UploadConfig = Field(default_factory=UploadConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    update: UpdateConfig = Field(default_factory=UpdateConfig, description="Following model releases.")
    queue_size: int = Field(
        default=8, gt=0, description="Frames buffered between the detector and the scoring/encoding worker."
    )
    drain_on_exit_s: float = Field(
        default=0.0, ge=0, description="When a finite source ends, keep uploading this long before exiting."
    )
    seed: int | None = Field(default=None, description="Seed of the random-share trigger (None: random).")


def load_agent_config(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Load and validate the agent's config; relative paths in it are taken from the file's folder."""
    return load_config(AgentConfig, path, env=env, env_prefix=ENV_PREFIX, overrides=overrides)
