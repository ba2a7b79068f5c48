"""The FiftyOne App beside the server: where curators review the inbox.

Runs FiftyOne's own App server (``python -m fiftyone.server.main``) as a child process pointed
at the server's database, in its own process group so that stopping it also stops the workers it
spawns (they outlive a killed parent otherwise). Binds loopback unless configured otherwise: the
open-source App has no authentication, so put a reverse proxy with auth in front of it to expose it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from server.store.mongo import fiftyone_environment

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # the App imports FiftyOne and its web stack: ~20-30 s on 2 cores


class AppStartError(Exception):
    """The App did not start listening in time; the message has the tail of its log."""


class CurationApp:
    """A running FiftyOne App process."""

    def __init__(self, uri: str, state_dir: Path, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = state_dir / "app.log"
        env = {**os.environ, **fiftyone_environment(uri, state_dir)}
        self._log = self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fiftyone.server.main", "--address", host, "--port", str(port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise AppStartError(f"the FiftyOne App exited ({self._proc.returncode}):\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    logger.info("FiftyOne App at %s", self.url)
                    return
            except OSError:
                time.sleep(0.5)
        raise AppStartError(f"the FiftyOne App did not listen on {self.url} within {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout)
            except ProcessLookupError:
                pass
        self._log.close()
