"""The README's demo: `edgeloop demo` runs server, registry, FiftyOne and an agent on one machine."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "yolov8n_int8.onnx"

needs_shared = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} missing (../shared beside the checkout)")


def _demo(workdir: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "edgeloop.cli", "demo", "--workdir", str(workdir), "--model", str(MODEL)]
    return cmd + ["--source", str(SHARED / "data/coco8/images/train"), *extra]


@pytest.mark.slow
@needs_shared
def test_demo_runs_the_loop_end_to_end(tmp_path):
    cmd = _demo(tmp_path / "demo", "--no-app")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    m = re.search(r"camera: (\d+) frames read, (\d+) kept as uncertain, (\d+) uploaded \(model (\S+)\)", out)
    assert m, out
    read, kept, uploaded, version = int(m[1]), int(m[2]), int(m[3]), m[4]
    assert read == 4 and 1 <= kept <= read and uploaded == kept
    assert version == "v1"  # the agent runs the release it fetched and verified, not its configured file
    inbox = re.search(r"inbox: (\d+) samples", out)
    assert inbox and int(inbox[1]) == uploaded
    # The commands it prints inspect what it made, as printed.
    commands = re.findall(r"^  (edgeloop .+)$", out, re.MULTILINE)
    assert len(commands) == 2, out
    listed = subprocess.run([sys.executable, "-m", "edgeloop.cli", *shlex.split(commands[0])[1:]],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert re.search(r"^v1 .* stable$", listed, re.MULTILINE), listed
    fleet = subprocess.run([sys.executable, "-m", "edgeloop.cli", *shlex.split(commands[1])[1:]],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert re.search(r"^demo-cam\s+v1\s+stable", fleet, re.MULTILINE), fleet
    # A second run reuses the workdir and its release, and starts a fresh inbox (it says so).
    out2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    again = re.search(r"(\d+) uploaded \(model v1\)", out2)
    assert again, out2  # the agent's random share differs between runs: compare with this run's own count
    assert f"inbox: {again[1]} samples" in out2
    assert f"the previous run's {uploaded} were removed" in out2
    assert not list((tmp_path / "demo").rglob("mongod.lock")) or _mongod_stopped(tmp_path / "demo")


def _mongod_stopped(workdir: Path) -> bool:
    lock = next(workdir.rglob("mongod.lock"))
    return lock.stat().st_size == 0  # mongod empties its lock file on a clean shutdown


@needs_shared
@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--model", "README.md", "--model README.md: README.md is not a loadable ONNX model"),
        ("--model", "missing.onnx", "model missing.onnx not found"),
        ("--source", "/no/such/camera", "--source: source '/no/such/camera' is neither a folder"),
    ],
)
def test_demo_checks_its_inputs_before_starting_anything(tmp_path, option, value, says):
    cmd = _demo(tmp_path / "demo", "--no-app")
    cmd[cmd.index(option) + 1] = value
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {run.stderr.strip()[7:]}"]  # one line, no traceback
    assert says in run.stderr
    assert not (tmp_path / "demo").exists()  # nothing started, nothing written


@pytest.mark.slow
@needs_shared
def test_demo_serve_prints_what_it_made_and_how_to_stop_before_serving(tmp_path):
    proc = subprocess.Popen(_demo(tmp_path / "demo", "--no-app", "--serve"), stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "press Ctrl-C to stop" in line:
                break
        assert any(ln.startswith("inbox: ") for ln in lines), lines
        assert "press Ctrl-C to stop" in lines[-1]
        assert proc.poll() is None  # still serving
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    assert proc.returncode == 0
