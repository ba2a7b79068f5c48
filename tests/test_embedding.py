"""Image embeddings and the reference statistics that travel in a model file (edgeloop.embedding)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeloop.embedding import (
    MAX_REFERENCE_VECTORS,
    REFERENCE_METADATA_KEY,
    ReferenceError,
    ReferenceStats,
    leave_one_out_distances,
    nearest_distance,
)


def _training(n: int = 300, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.01, 5.0, dim)  # values on very different scales, as pooled features are
    return (rng.normal(size=(n, dim)) * scales + 3.0).astype(np.float32)


def test_distances_are_euclidean_and_nearest() -> None:
    others = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]], np.float32)
    assert nearest_distance(np.array([3.0, 5.0], np.float32), others) == pytest.approx(1.0)
    assert nearest_distance(np.zeros(2, np.float32), others[:0]) == float("inf")
    assert leave_one_out_distances(others).tolist() == pytest.approx([5.0, 5.0, np.hypot(7, 4)])


def test_reference_standardises_so_every_value_counts_alike() -> None:
    raw = _training()
    ref = ReferenceStats.from_embeddings(raw, source="300 test vectors")
    projected = ref.project(raw)
    assert np.abs(projected.mean(axis=0)).max() < 1e-3
    assert projected.std(axis=0) == pytest.approx(np.ones(16), abs=1e-3)
    # a training vector is about q50 from its nearest neighbour; a shifted one is far past q99
    assert ref.q50 < ref.q99
    shifted = raw[0].copy()
    shifted[0] += 1.0  # 100 standard deviations of the smallest-scale value: invisible in raw distance
    assert ref.distance(ref.project(shifted)) > 3 * ref.q99
    assert float(np.linalg.norm(shifted - raw[0])) == pytest.approx(1.0)


def test_reference_keeps_a_sample_but_takes_quantiles_over_all() -> None:
    raw = _training(n=MAX_REFERENCE_VECTORS + 100)
    ref = ReferenceStats.from_embeddings(raw)
    full = leave_one_out_distances(ref.project(raw))
    assert ref.vectors.shape == (MAX_REFERENCE_VECTORS, 16)
    assert ref.q50 == pytest.approx(float(np.quantile(full, 0.5)), rel=1e-5)
    with pytest.raises(ReferenceError, match="at least 3"):
        ReferenceStats.from_embeddings(raw[:2])


def test_reference_round_trips_through_json_and_model_metadata() -> None:
    ref = ReferenceStats.from_embeddings(_training(), source="shapes/train")
    back = ReferenceStats.from_json(ref.to_json())
    assert back.vectors.tobytes() == ref.vectors.tobytes()  # float16-rounded before, so exact after
    assert back.mean.tobytes() == ref.mean.tobytes() and back.std.tobytes() == ref.std.tobytes()
    assert (back.q50, back.q99, back.source) == (ref.q50, ref.q99, "shapes/train")
    meta = {REFERENCE_METADATA_KEY: ref.to_json(), "names": "{0: 'a'}"}
    assert ReferenceStats.from_metadata(meta).q99 == ref.q99
    assert ReferenceStats.from_metadata({"names": "{0: 'a'}"}) is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=2),
        lambda d: d.update(dtype="float32"),
        lambda d: d.update(count=d["count"] + 1),
        lambda d: d.update(vectors="not base64!"),
        lambda d: d.pop("std"),
        lambda d: d.update(nn_distance={"q50": 2.0, "q99": 1.0}),
        lambda d: d.update(nn_distance={"q50": float("nan"), "q99": 1.0}),
    ],
)
def test_broken_reference_statistics_are_refused_with_a_reason(mutate) -> None:
    doc = json.loads(ReferenceStats.from_embeddings(_training()).to_json())
    mutate(doc)
    with pytest.raises(ReferenceError):
        ReferenceStats.from_json(json.dumps(doc))
    with pytest.raises(ReferenceError):
        ReferenceStats.from_json("{not json")
