"""`edgeloop demo --quick --data DATA.yaml` never trains on what it scores: no image of the data set's
test split (what every round is scored on) is in any split of any dataset version the demo made,
checked by content hash through the real curation store after a real run of the loop."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml

from edgeloop.synth.scenarios import get_scenario
from edgeloop.synth.scenes import format_labels, iter_scenes

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT.parent / "shared" / "models" / "yolov8n_coco_dequant.pt"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BASE.exists(), reason=f"{BASE} missing (../shared beside the checkout)"),
]


def _photo_set(root: Path, counts: dict[str, int]) -> Path:
    """A small data set in the standard Ultralytics layout (images/<split>, labels/<split>)."""
    params = get_scenario("shapes").updated(width=320, height=240)
    for split, n in counts.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k, scene in enumerate(iter_scenes(params, 500 + len(split), n)):
            cv2.imwrite(str(root / "images" / split / f"{split}-{k:03d}.jpg"), scene.image)
            (root / "labels" / split / f"{split}-{k:03d}.txt").write_text(format_labels(scene.labels))
    doc = {"path": str(root), **{s: f"images/{s}" for s in counts}, "names": dict(params.names)}
    (root / "data.yaml").write_text(yaml.safe_dump(doc))
    return root / "data.yaml"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(1500)
def test_the_demo_on_a_data_set_never_trains_on_the_images_it_scores(tmp_path: Path) -> None:
    from server.curation.versions import VersionStore

    data = _photo_set(tmp_path / "set", {"train": 150, "val": 8, "test": 10})
    work, report = tmp_path / "work", tmp_path / "report"
    cmd = [sys.executable, "-m", "edgeloop.cli", "demo", "--quick", "--rounds", "1", "--data", str(data),
           "--workdir", str(work), "--report", str(report), "--base-checkpoint", str(BASE)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1400)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    scored = {_sha(p) for p in (tmp_path / "set" / "images" / "test").iterdir()}
    assert len(scored) == 10
    store = VersionStore(work / "server" / "curation")
    ids = store.ids()
    assert len(ids) >= 2  # world A's import, then the approved round
    for vid in ids:
        samples = store.samples(vid)
        assert samples and not {s.image_sha256 for s in samples} & scored, vid
        # and the hashes recorded are the stored images' own
        assert all(_sha(store.image_path(s)) == s.image_sha256 for s in samples)
    first = store.load(ids[0])
    assert first.splits_from == "declared" and first.counts["test"] > 0  # A's own held-out photos, not the set's
    doc = json.loads((report / "report.json").read_text())
    assert "never trained on" in doc["world"]
    assert f"{first.id} = {first.size} labelled images of world A (train {first.counts['train']}" in run.stdout
