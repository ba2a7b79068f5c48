"""A local Prefect server: ``prefect server start`` on a loopback port, in its own PREFECT_HOME.

Schedules need a real server (the ephemeral one refuses them), so whatever runs the flows on one
machine starts one: the demo (``edgeloop demo``) and the tests. A fresh SQLite database runs its
migrations on first start (tens of seconds on 2 cores); one server per PREFECT_HOME, never several
writers on one database ("database is locked"). Nothing leaves the machine: analytics off, the UI
told the API's real address (``PREFECT_UI_API_URL``) instead of its default port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

#: A fresh database runs its migrations on first start: tens of seconds on 2 cores, more under load.
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310 - loopback only
            return response.status == 200
    except OSError:
        return False


@dataclass
class PrefectServer:
    """A running ``prefect server start`` and the environment that talks to it."""

    home: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The UI's address."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def env(self) -> dict[str, str]:
        """Variables for a process that must use this server (and nothing else)."""
        return {
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }

    def start(self) -> None:
        env = {**os.environ, **self.env}
        env.pop("PREFECT_API_URL")  # the server itself serves the API
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its uvicorn workers stop with it
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(self.api_url):
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prefect server not healthy within {START_TIMEOUT_S:g} s:\n{self.tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
