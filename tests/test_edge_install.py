"""`pip install edgeloop[edge]` in a clean venv: no torch, ultralytics, FiftyOne or Prefect, and
the agent's CLI works there (including a real dry run with ONNX Runtime)."""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FORBIDDEN = {"torch", "torchvision", "ultralytics", "fiftyone", "prefect"}


@pytest.mark.slow
def test_edge_extra_installs_only_what_a_device_needs(tmp_path):
    env_dir = tmp_path / "edge-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # Build from a clean copy: an in-tree build/ left by an earlier install could carry stale modules.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", ".edgeloop", ".demo", "__pycache__"),
    )
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-cache-dir", f"{src}[edge]"],
        check=True,
        timeout=900,
    )
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True
    ).stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert installed & FORBIDDEN == set(), f"the edge extra pulled in {installed & FORBIDDEN}"
    assert {"onnxruntime", "grpcio", "paho-mqtt", "edgeloop"} <= installed

    exe = env_dir / "bin" / "edgeloop"
    out = subprocess.run([str(exe), "agent", "--help"], check=True, capture_output=True, text=True).stdout
    assert "run" in out and "score" in out
    # The agent's modules import without the heavy stacks, and nothing drags them in.
    probe = (
        "import sys, edge_agent.app, edge_agent.cli, edge_agent.detectors, edge_agent.transports;"
        f"bad = {sorted(FORBIDDEN)!r};"
        "print([m for m in bad if m in sys.modules])"
    )
    loaded = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True).stdout
    assert loaded.strip() == "[]"

    model = SHARED / "models" / "yolov8n_int8.onnx"
    images = SHARED / "data" / "coco8" / "images" / "val"
    if not model.exists():
        pytest.skip(f"{model} missing: the dry run needs ../shared")
    res = subprocess.run(
        [str(exe), "agent", "score", str(images), "--model", str(model), "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 4 and any(r["detections"] for r in rows)
