"""Making a paho MQTT client the way every edgeloop MQTT user needs one: paho's callback API 2,
MQTT 5 or 3.1.1, the broker credentials and a TLS context. The agent's transport, the server's
ingest bridge and the release announcer each add their own callbacks and flow settings."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr


def new_client(
    client_id: str,
    *,
    mqttv5: bool = True,
    clean_session: bool = False,
    username: str | None = None,
    password: SecretStr | None = None,
    ssl_context: ssl.SSLContext | None = None,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A paho client, not yet connected. ``clean_session`` applies to MQTT 3.1.1 only (MQTT 5
    asks for a clean start, or not, when it connects)."""
    if mqttv5:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack
        )
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            manual_ack=manual_ack,
        )
    if username is not None:
        client.username_pw_set(username, password.get_secret_value() if password is not None else None)
    if ssl_context is not None:
        client.tls_set_context(ssl_context)
    return client
