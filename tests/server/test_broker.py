"""The broker the server can start itself (server.broker): Mosquitto with the registry's device files."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from server.broker import BrokerError, EmbeddedBroker, EmbeddedBrokerConfig, find_mosquitto
from server.devices import DeviceRegistry, DevicesConfig
from tests.fixtures.mosquitto import _free_port

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (scripts/setup.sh)")


def _connect(port: int, user: str, password: str) -> int:
    """The CONNACK reason code (0: accepted)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{user}", protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)
    result: list[int] = []
    client.on_connect = lambda c, u, f, rc, p: result.append(rc.value)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for _ in range(100):
            if result:
                break
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    return result[0] if result else -1


def test_the_embedded_broker_admits_registered_devices_only(tmp_path) -> None:
    devices = DeviceRegistry(DevicesConfig(root=tmp_path / "devices"))
    cam = devices.add("cam-1")
    broker = EmbeddedBroker(
        EmbeddedBrokerConfig(port=_free_port(), workdir=tmp_path / "mosquitto"),
        devices.write_mosquitto_files().conf_lines(),
    ).start()
    try:
        assert _connect(broker.config.port, "cam-1", cam.mqtt_password) == 0
        assert _connect(broker.config.port, "cam-1", "wrong") != 0
        assert "max_packet_size" in (tmp_path / "mosquitto" / "mosquitto.conf").read_text()  # the per-client limits
        assert broker.pid_file.is_file()  # what the registry signals after a revocation
    finally:
        broker.stop()
    assert not broker.pid_file.exists() or broker.pid_file.read_text().strip() == ""


def test_a_missing_mosquitto_says_how_to_install_it(tmp_path) -> None:
    config = EmbeddedBrokerConfig(port=_free_port(), workdir=tmp_path, binary="/nonexistent/mosquitto")
    with pytest.raises(BrokerError, match="apt-get install mosquitto"):
        EmbeddedBroker(config, "").start()
