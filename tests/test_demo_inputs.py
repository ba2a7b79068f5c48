"""`edgeloop demo` checks what it is given before it starts anything: one clear line, exit 2.

Cheap: each case fails before the stack (MongoDB, Mosquitto, Prefect) would start, so a missing
check shows as a slow test that ends in a traceback instead of these lines.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edgeloop.cli", "demo", "--workdir", str(tmp_path / "work"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _one_clear_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr + run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), run.stderr
    return run.stderr


def test_a_missing_base_checkpoint_says_which_option_fixes_it(tmp_path: Path) -> None:
    err = _one_clear_line(_demo(tmp_path, "--base-checkpoint", str(tmp_path / "nope.pt")))
    assert "nope.pt" in err and "--base-checkpoint" in err
    assert not (tmp_path / "work").exists()  # nothing was started or cleared


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (None, "cannot read"),
        ("just a string", "not a YAML mapping"),
        ("train: images/train\nnames: [a]\n", "no 'test' split"),
    ],
)
def test_a_bad_data_set_is_named_with_what_is_wrong(tmp_path: Path, yaml_text: str | None, expected: str) -> None:
    base = tmp_path / "base.pt"
    base.write_bytes(b"not looked at before --data is checked")
    data = tmp_path / "data.yaml"
    if yaml_text is not None:
        data.write_text(yaml_text)
        (tmp_path / "images" / "train").mkdir(parents=True)
    err = _one_clear_line(_demo(tmp_path, "--base-checkpoint", str(base), "--data", str(data)))
    assert f"--data {data}" in err and expected in err, err
    assert not (tmp_path / "work").exists()
