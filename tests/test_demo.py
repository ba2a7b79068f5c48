"""The README's demo: `edgeloop demo` runs server, registry, FiftyOne and an agent on one machine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "yolov8n_int8.onnx"


@pytest.mark.slow
@pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} missing (../shared beside the checkout)")
def test_demo_runs_the_loop_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "edgeloop.cli", "demo", "--workdir", str(tmp_path / "demo"), "--model", str(MODEL)]
    cmd += ["--source", str(SHARED / "data/coco8/images/train"), "--no-app"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    m = re.search(r"camera: (\d+) frames read, (\d+) kept as uncertain, (\d+) uploaded \(model (\S+)\)", out)
    assert m, out
    read, kept, uploaded, version = int(m[1]), int(m[2]), int(m[3]), m[4]
    assert read == 4 and 1 <= kept <= read and uploaded == kept
    assert version == "v1"  # the agent runs the release it fetched and verified, not its configured file
    inbox = re.search(r"inbox: (\d+) samples", out)
    assert inbox and int(inbox[1]) == uploaded
    # A second run reuses the workdir: same release, more frames in the same inbox.
    out2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    assert f"inbox: {2 * uploaded} samples" in out2
    assert not list((tmp_path / "demo").rglob("mongod.lock")) or _mongod_stopped(tmp_path / "demo")


def _mongod_stopped(workdir: Path) -> bool:
    lock = next(workdir.rglob("mongod.lock"))
    return lock.stat().st_size == 0  # mongod empties its lock file on a clean shutdown
