"""The edge agent's transports: how kept frames reach the receiver.

Importing this package registers the gRPC and MQTT transports. An agent's configuration holds a
:data:`TransportConfig` (the ``type`` key picks the model) and the agent calls
``create_transport(config, device_id)``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from edge_agent.transports.base import TLSConfig, Transport, TransportError, create_transport
from edge_agent.transports.grpc import GrpcTransport, GrpcTransportConfig
from edge_agent.transports.mqtt import MqttTransport, MqttTransportConfig

#: Any transport's configuration, told apart by its ``type`` field ("grpc" or "mqtt").
TransportConfig = Annotated[GrpcTransportConfig | MqttTransportConfig, Field(discriminator="type")]

__all__ = [
    "GrpcTransport",
    "GrpcTransportConfig",
    "MqttTransport",
    "MqttTransportConfig",
    "TLSConfig",
    "Transport",
    "TransportConfig",
    "TransportError",
    "create_transport",
]
