"""An MQTT broker the server starts itself: Mosquitto on loopback, with edgeloop's device files.

For one machine (the demo, a small site), so nobody has to configure a broker by hand: the
broker's password file and ACL are the ones :class:`~server.devices.DeviceRegistry` writes (each
device confined to its own topics, the bridge and the announcer as service users), with the
per-client limits of :class:`~server.devices.BrokerLimits`, persistence on, and a pid file the
registry signals to reload after a revocation. Production sites run their own (clustered)
broker and point ``mqtt.host`` at it (see deploy/README.md).

Mosquitto started as root drops to the ``mosquitto`` user, which cannot read files under another
user's private directories; as root the config says ``user root`` (Mosquitto warns, and runs).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from pydantic import Field

from edgeloop.config_base import StrictModel

#: Seconds to wait for the broker to accept connections, and for it to exit on SIGTERM.
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """Mosquitto is not installed, or did not start; the message has the fix or its log."""


class EmbeddedBrokerConfig(StrictModel):
    """A Mosquitto the server runs on this machine."""

    host: str = Field(default="127.0.0.1", description="Address to listen on (loopback unless you mean otherwise).")
    port: int = Field(default=1883, ge=1, le=65535, description="Port to listen on.")
    workdir: Path = Field(default=Path(".edgeloop/server/mosquitto"), description="Config, persistence and log.")
    binary: str = Field(default="mosquitto", description="The mosquitto executable (a name on PATH or a path).")


def find_mosquitto(binary: str = "mosquitto") -> str | None:
    """The broker's executable, or None when Mosquitto is not installed."""
    if "/" in binary:
        return binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else None
    # Debian installs it in /usr/sbin, which is not on an ordinary user's PATH.
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin:/sbin")


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """One Mosquitto process configured from the device registry's files."""

    def __init__(self, config: EmbeddedBrokerConfig, device_conf: str) -> None:
        """``device_conf``: the lines :meth:`MosquittoFiles.conf_lines` gives (password file, ACL, limits)."""
        self.config = config
        self._device_conf = device_conf
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid_file = config.workdir / "mosquitto.pid"
        self.log_path = config.workdir / "mosquitto.log"

    @property
    def address(self) -> tuple[str, int]:
        return self.config.host, self.config.port

    def write_config(self) -> Path:
        work = self.config.workdir.resolve()
        (work / "data").mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.config.port} {self.config.host}",
            "persistence true",
            f"persistence_location {work / 'data'}/",
            f"pid_file {self.pid_file.resolve()}",
            "log_dest stderr",  # to log_path, unbuffered
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # see the module docstring
        conf = work / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n" + self._device_conf)
        return conf

    def start(self, timeout: float = START_TIMEOUT_S) -> EmbeddedBroker:
        """Start Mosquitto and return once it accepts connections.

        Raises:
            BrokerError: not installed (with the command that installs it), or it exited or did not listen.
        """
        binary = find_mosquitto(self.config.binary)
        if binary is None:
            raise BrokerError("Mosquitto is not installed: apt-get install mosquitto (or use gRPC only)")
        conf = self.write_config()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self._proc.returncode}:\n{self.log_tail()}")
            if _accepts(*self.address):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.address} within {timeout:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (Mosquitto writes its persistence file on the way out), SIGKILL if it does not go."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
