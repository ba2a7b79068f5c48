"""The demo's child processes: started with a log file, waited for until ready, stopped as a group.

Every part of the stack runs as it would in production, in its own process (``edgeloop server
run``, ``edgeloop flows serve``, ``edgeloop agent run``, ``prefect server start``); each gets its own
process group, so stopping it also stops what it started (the App's workers, uvicorn), and its
output goes to a log file the demo points at when something fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class ProcessError(RuntimeError):
    """A child process exited early or was not ready in time; the message carries its log's tail."""


def edgeloop_command(*args: str) -> list[str]:
    """``edgeloop ARGS`` with this interpreter (works from a checkout or a venv alike)."""
    return [sys.executable, "-m", "edgeloop.cli", *args]


class ManagedProcess:
    """One child process with its log file."""

    def __init__(self, name: str, command: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.command = list(command)
        self.log = log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def start(self) -> ManagedProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self._log_start = out.tell()
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def output(self) -> str:
        """What this run wrote to the log so far."""
        try:
            with self.log.open("rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until true; raise with the log's tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running:
                code = None if self.proc is None else self.proc.returncode
                raise ProcessError(f"{self.name} exited ({code}) before {what}; its log ({self.log}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name}: no {what} within {timeout:g} s; its log ({self.log}):\n{self.tail()}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Signal the process group, wait, then SIGKILL what is left."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
