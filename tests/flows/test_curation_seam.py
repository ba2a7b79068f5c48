"""The seam to curation: the built-in directory provider, loading a provider by import path, and the
scheduled flows' decisions (retrain now? make a review batch?) over a fake curation and a real registry."""

from __future__ import annotations

import pytest
import yaml

from edgeloop.synth.scenarios import get_scenario
from edgeloop.synth.scenes import write_dataset
from flows.curation import (
    CurationConfig,
    CurationConfigError,
    DatasetVersionError,
    check_export,
    load_curation,
)
from flows.decisions import curate_decision, retrain_decision
from server.registry.store import ModelRegistry, RegistryConfig
from tests.fakes.curation import FakeCuration
from tests.server.test_registry import INT8_ONNX, with_metadata

SMALL = get_scenario("shapes").updated(width=64, height=48)


def test_directory_provider_exports_versions_and_counts_new_samples(tmp_path):
    root = tmp_path / "versions"
    write_dataset(root / "ds-0001", SMALL, n=10, seed=0, test_fraction=0.2)
    write_dataset(root / "ds-0002", SMALL, n=16, seed=0, test_fraction=0.2)  # the same first scenes, and more
    curation = load_curation(CurationConfig(provider="directory", options={"root": str(root)}))
    assert curation.latest_version() == "ds-0002"
    data = check_export(curation.export("ds-0002", tmp_path / "out"))
    doc = yaml.safe_load(data.read_text())
    assert doc["path"] == str(root / "ds-0002") and doc["test"] == "images/test"
    # ds-0001 holds images 0-7 in train/val; ds-0002 holds 0-12: five it did not have.
    assert curation.unconsumed_samples("ds-0002", "ds-0001") == 5
    assert curation.unconsumed_samples("ds-0002", None) == 13
    assert curation.next_batch(1) is None
    with pytest.raises(DatasetVersionError, match="unknown dataset version 'ds-9'"):
        curation.export("ds-9", tmp_path / "x")


def test_an_export_without_a_test_split_is_refused(tmp_path):
    data = write_dataset(tmp_path / "d", SMALL, n=6, seed=0)
    with pytest.raises(DatasetVersionError, match="no 'test' split"):
        check_export(data)


def test_a_provider_is_loaded_by_import_path_and_bad_ones_are_named():
    fake = load_curation(CurationConfig(provider="tests.fakes.curation:FakeCuration"))
    assert isinstance(fake, FakeCuration)
    for provider, message in [
        ("nowhere", "neither directory"),
        ("tests.fakes.nothing:X", "cannot be loaded"),
        ("tests.fakes.curation:Missing", "cannot be loaded"),
        ("builtins:dict", "lacks export"),
    ]:
        with pytest.raises(CurationConfigError, match=message):
            load_curation(CurationConfig(provider=provider))


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    if not INT8_ONNX.is_file():
        pytest.skip(f"{INT8_ONNX} (shared model) not found")
    return ModelRegistry(RegistryConfig(root=tmp_path / "registry"))


def test_retrain_when_enough_samples_are_new_to_production(registry, tmp_path):
    curation = FakeCuration()
    assert retrain_decision(curation, registry, min_new_samples=30).reason == "no dataset version yet"
    curation.add_version("ds-0001", {f"s{i}" for i in range(40)})
    first = retrain_decision(curation, registry, min_new_samples=30)
    assert first.retrain and first.dataset_version == "ds-0001" and first.new_samples == 40

    registry.publish(INT8_ONNX, dataset_version="ds-0001")
    registry.promote("v1", "stable")
    curation.add_version("ds-0002", {f"s{i}" for i in range(60)})  # 20 new since v1's data
    few = retrain_decision(curation, registry, min_new_samples=30)
    assert not few.retrain and few.new_samples == 20 and "30 needed" in few.reason
    curation.add_version("ds-0003", {f"s{i}" for i in range(75)})
    enough = retrain_decision(curation, registry, min_new_samples=30)
    assert enough.retrain and (enough.dataset_version, enough.new_samples) == ("ds-0003", 35)

    # A version a candidate was trained on (rejected or not) is not retried: it needs new data.
    registry.publish(with_metadata(INT8_ONNX, tmp_path / "v2.onnx", t="2"), dataset_version="ds-0003", rejected="x")
    again = retrain_decision(curation, registry, min_new_samples=30)
    assert not again.retrain and "already trained on (model v2)" in again.reason


def test_curate_makes_a_batch_once_enough_frames_wait():
    curation = FakeCuration()
    curation.inbox = [f"f{i}" for i in range(29)]
    assert curate_decision(curation, min_new_frames=30) is None
    curation.inbox.append("f29")
    assert curate_decision(curation, min_new_frames=30) == "batch-001" and len(curation.batches[0]) == 30
