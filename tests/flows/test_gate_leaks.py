"""The gate refuses a leaky comparison: a test split sharing images (identical, or near-duplicates) with
the candidate's training split is named in the gate's reason, and the candidate is registered rejected.

Real files and a real model: a data set written as a dataset version is exported, with a test image
planted in train as an identical copy and another as a re-encoded near-twin; the leak check embeds
every image with the session's prepared detector (the curation model's role) and the registry
records the decision."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeloop.synth.scenarios import get_scenario
from edgeloop.synth.scenes import write_dataset
from flows import pipeline
from flows.config import FlowsConfig
from flows.training.evaluate import evaluate_onnx
from server.curation.leaks import IDENTICAL, NEAR_DUPLICATE
from server.registry.store import ModelRegistry, RegistryConfig

pytestmark = pytest.mark.slow


def _data(root: Path, leaky: bool) -> Path:
    data_yaml = write_dataset(root, get_scenario("shapes"), n=40, seed=21, val_fraction=0.2, test_fraction=0.25)
    if leaky:
        tests = sorted((root / "images" / "test").iterdir())
        shutil.copy(tests[0], root / "images" / "train" / "leak-identical.jpg")
        image = cv2.imread(str(tests[1]))
        twin = np.clip(image.astype(np.int16) + 3, 0, 255).astype(np.uint8)  # a re-encoded, slightly brighter copy
        cv2.imwrite(str(root / "images" / "train" / "leak-near.jpg"), twin, [cv2.IMWRITE_JPEG_QUALITY, 80])
        for src, name in ((tests[0], "leak-identical"), (tests[1], "leak-near")):
            label = root / "labels" / "test" / f"{src.stem}.txt"
            shutil.copy(label, root / "labels" / "train" / f"{name}.txt")
    return data_yaml


def _gate_and_register(tmp_path: Path, data_yaml: Path, release) -> tuple:
    registry = ModelRegistry(RegistryConfig(root=tmp_path / "registry"))
    config = FlowsConfig.model_validate(
        {"work_dir": str(tmp_path / "runs"), "registry": {"root": str(tmp_path / "registry")},
         "gate": {"min_improvement": -1.0, "first_model_floor": 0.0}}  # only a leak can refuse here
    )  # fmt: skip
    files = pipeline.CandidateFiles(release.checkpoint, release.onnx, None, release.onnx, Path())
    candidate = evaluate_onnx(release.onnx, data_yaml, "test")
    evaluations = pipeline.Evaluations(candidate, None, None, None)
    leaks = pipeline.check_leaks(config, data_yaml, None, files)
    decision = pipeline.gate_candidate(config, evaluations, leaks)
    record = pipeline.register_candidate(
        registry, config, files, evaluations, decision, dataset_version="ds-0001", production=None, run_id="r"
    )
    return leaks, decision, record


def test_a_leaky_test_split_is_named_in_the_gates_reason_and_not_promoted(tmp_path, shapes_release):
    leaks, decision, record = _gate_and_register(tmp_path, _data(tmp_path / "leaky", True), shapes_release)
    kinds = {leak.train_frame_id: leak.kind for leak in leaks.leaks}
    assert kinds.get("leak-identical") == IDENTICAL and kinds.get("leak-near") == NEAR_DUPLICATE, leaks.leaks
    assert not decision.promote and decision.leaks == 2
    assert decision.reason.startswith("leaky test split: 2 of 10 test frames duplicate training frames")
    assert "1 identical, 1 near-duplicates" in decision.reason
    assert record.rejected.startswith("gate: leaky test split") and record.params["gate"]["leaks"] == 2


def test_the_same_data_without_the_planted_copies_is_clean_and_promoted(tmp_path, shapes_release):
    leaks, decision, record = _gate_and_register(tmp_path, _data(tmp_path / "clean", False), shapes_release)
    assert leaks.leaks == [] and leaks.near_checked and leaks.checked == {"train": 22, "test": 10}
    assert decision.promote and not record.rejected, decision.reason
