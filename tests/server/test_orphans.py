"""Orphaned media files (an image whose sample was never written): found, set aside, re-checked,
removed; files with a sample, young files and files adopted during the sweep are kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from edgeloop.domain import AckStatus
from server.ingest.base import AllowAllDevices, Identity
from server.ingest.core import IngestCore
from server.ingest.validation import ValidationConfig
from server.metrics import ServerMetrics
from server.store.inbox import Inbox
from server.store.media import LocalMediaStore
from server.store.orphans import QUARANTINE, sweep_orphans
from tests.server.test_validation import make_record, payload_of

REPO = Path(__file__).resolve().parents[2]
DAY = 24 * 3600


def _aged(path: Path, seconds: float) -> Path:
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def _store(tmp_path: Path) -> tuple[LocalMediaStore, dict[str, Path]]:
    media = LocalMediaStore(tmp_path / "media")
    files = {
        name: media.write_new(f"{name}-{'0' * 10}", name.encode(), "jpg") for name in ("kept", "old", "young", "late")
    }
    for name in ("kept", "old", "late"):
        _aged(files[name], 2 * DAY)
    return media, files


def _jpgs(media: LocalMediaStore, keep: Callable[[str], bool]) -> Callable[[Iterable[str]], dict[str, str]]:
    """A ``sample_files`` for ids that ``keep`` says have a sample, each pointing at its .jpg."""
    return lambda ids: {i: str(media.path_for(i, "jpg")) for i in ids if keep(i)}


def test_sweep_removes_only_old_files_without_a_sample(tmp_path: Path) -> None:
    media, files = _store(tmp_path)
    calls: list[list[str]] = []

    def sample_files(ids: Iterable[str]) -> dict[str, str]:
        ids = list(ids)
        calls.append(ids)
        # "late" gets its sample while the sweep waits (a resend adopted the file just before).
        kept = [i for i in ids if i.startswith("kept") or (len(calls) > 1 and i.startswith("late"))]
        return {i: str(media.path_for(i, "jpg")) for i in kept}

    result = sweep_orphans(media, sample_files, min_age_s=DAY, grace_s=0)
    assert result.orphans == [files["old"]] and result.adopted == [files["late"]] and result.scanned == 3
    assert not files["old"].exists()
    assert files["kept"].read_bytes() == b"kept" and files["young"].exists() and files["late"].read_bytes() == b"late"
    assert list((media.root / QUARANTINE).iterdir()) == []


def test_dry_run_moves_nothing(tmp_path: Path) -> None:
    media, files = _store(tmp_path)
    result = sweep_orphans(media, _jpgs(media, lambda i: i.startswith("kept")), min_age_s=DAY, dry_run=True)
    assert sorted(result.orphans) == sorted([files["old"], files["late"]])
    assert all(p.exists() for p in files.values())


def test_an_interrupted_sweep_is_finished_by_the_next(tmp_path: Path) -> None:
    media, files = _store(tmp_path)
    quarantine = media.root / QUARANTINE
    quarantine.mkdir()
    os.replace(files["old"], quarantine / files["old"].name)  # set aside, then the sweep died
    os.replace(files["late"], quarantine / files["late"].name)
    result = sweep_orphans(media, _jpgs(media, lambda i: not i.startswith("old")), min_age_s=DAY, grace_s=0)
    assert result.orphans == [files["old"]] and files["late"].read_bytes() == b"late"
    assert list(quarantine.iterdir()) == []


def test_cli_sweeps_a_real_inbox(tmp_path: Path, fiftyone_env: str, inbox: Inbox) -> None:
    """Frames stored through the ingest core keep their images; an image left by a failed insert
    is removed by `edgeloop server media sweep`."""
    media = LocalMediaStore(tmp_path / "media")
    with IngestCore(media, inbox, AllowAllDevices(), ValidationConfig(), ServerMetrics()) as core:
        stored = [make_record() for _ in range(3)]
        for record in stored:
            assert core.submit(payload_of(record), Identity("grpc", None)).result(20).status == AckStatus.STORED
    orphan = make_record()
    orphan_path = media.write_new(orphan.frame_id, orphan.image, "jpg")
    for path in [*(media.path_for(r.frame_id, "jpg") for r in stored), orphan_path]:
        _aged(path, 2 * DAY)
    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "mongo": {"uri": fiftyone_env},
                "inbox": {"dataset": inbox.name},
                "media": {"root": str(media.root)},
            }
        )
    )
    run = [sys.executable, "-m", "edgeloop.cli", "server", "media", "sweep", "--config", str(config), "--grace-s", "0"]
    dry = subprocess.run([*run, "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {orphan_path}" in dry.stdout and orphan_path.exists()
    done = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 files old enough, 1 without a sample removed" in done.stdout
    assert not orphan_path.exists()
    assert all(Path(inbox.sample_for(r.frame_id).filepath).read_bytes() == r.image for r in stored)


def test_a_foreign_file_in_quarantine_is_left_alone(tmp_path: Path) -> None:
    media, files = _store(tmp_path)
    (media.root / QUARANTINE).mkdir()
    foreign = media.root / QUARANTINE / "notes.txt.bak~"
    foreign.write_text("someone's")
    result = sweep_orphans(media, lambda ids: {}, min_age_s=DAY, grace_s=0)
    assert sorted(result.orphans) == sorted([files["kept"], files["old"], files["late"]])
    assert foreign.read_text() == "someone's"


def test_a_file_of_a_stored_frame_under_another_extension_is_swept(tmp_path: Path) -> None:
    """The sweep compares each file with the file its sample points at, not only the frame id: a
    .png left beside a stored frame's .jpg (a resend with another media type) is an orphan."""
    media, files = _store(tmp_path)
    stray = _aged(media.write_new(f"kept-{'0' * 10}", b"png", "png"), 2 * DAY)
    result = sweep_orphans(media, _jpgs(media, lambda i: not i.startswith("old")), min_age_s=DAY, grace_s=0)
    assert sorted(result.orphans) == sorted([files["old"], stray])
    assert files["kept"].read_bytes() == b"kept" and not stray.exists()
