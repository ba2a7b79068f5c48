"""The import graph's layers: the core package (``edgeloop/``, what an edge device installs) loads
none of the parts above it at import time, the agent none of the server's, and nothing imports
back into the CLI root (``edgeloop.cli`` assembles the parts' command lines, lazily)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import edgeloop

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("server", "edge_agent", "flows", "loop")
HEAVY = ("torch", "ultralytics", "fiftyone", "prefect")


def _loaded_after_import(module: str) -> list[str]:
    """Top-level packages among PARTS + HEAVY that ``import module`` loads in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(PARTS + HEAVY)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_core_module_imports_a_part_or_a_heavy_library_at_import_time():
    modules = [m.name for m in pkgutil.walk_packages(edgeloop.__path__, "edgeloop.")]
    assert "edgeloop.cli" in modules and "edgeloop.synth.scenes" in modules  # the walk sees the package
    offenders = {m: loaded for m in modules if (loaded := _loaded_after_import(m))}
    assert offenders == {}, f"core modules that load parts or heavy libraries when imported: {offenders}"


def test_the_agent_does_not_load_the_server_or_training_libraries():
    loaded = _loaded_after_import("edge_agent.cli")
    assert set(loaded) <= {"edge_agent"}, loaded


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_nothing_imports_back_into_the_cli_root():
    sources = [p for part in ("edgeloop", *PARTS) for p in (ROOT / part).rglob("*.py")]
    assert len(sources) > 50
    back = [
        str(p.relative_to(ROOT)) for p in sources if p != ROOT / "edgeloop" / "cli.py" and "edgeloop.cli" in _imports(p)
    ]
    assert back == [], f"modules importing the CLI root: {back}"


def test_the_command_line_still_has_every_part():
    out = subprocess.run(
        [sys.executable, "-m", "edgeloop.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in ("agent", "synth", "server", "models", "curate", "demo", "flows", "train"):
        assert f" {command} " in out.stdout, command
