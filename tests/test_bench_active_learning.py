"""The arithmetic of bench/active_learning.py's summary: what "labels to reach random's final
mAP" means, and the markdown it writes for docs/benchmarks.md (the benchmark itself runs by hand)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def al():
    spec = importlib.util.spec_from_file_location("bench_active_learning", ROOT / "bench" / "active_learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_labels_to_reach_interpolates_between_rounds(al) -> None:
    labels = [40, 70, 100, 130]
    assert al.labels_to_reach(0.30, labels, [0.10, 0.20, 0.40, 0.50]) == pytest.approx(85.0)
    assert al.labels_to_reach(0.10, labels, [0.10, 0.20, 0.40, 0.50]) == 40.0  # the seed already reaches it
    assert al.labels_to_reach(0.60, labels, [0.10, 0.20, 0.40, 0.50]) is None  # never within the rounds
    assert al.labels_to_reach(0.20, labels, [0.10, 0.20, 0.20, 0.20]) == pytest.approx(70.0)


def _runs(al, pool: str, curves: dict[str, list[list[float]]]) -> list:
    return [
        al.Run(pool, strategy, seed, [40, 70, 100, 130], [m + 0.1 for m in curve], curve)
        for strategy, per_seed in curves.items()
        for seed, curve in enumerate(per_seed)
    ]


def test_summary_reports_the_share_of_random_labels_edgeloop_needs(al) -> None:
    runs = _runs(
        al,
        "camera",
        {
            "edgeloop": [[0.1, 0.3, 0.4, 0.5], [0.1, 0.3, 0.4, 0.5]],
            "edgeloop-no-diversity": [[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]],
            "random": [[0.1, 0.2, 0.25, 0.3], [0.1, 0.2, 0.25, 0.3]],
        },
    )
    summary = al.summarise(runs)["camera"]
    assert summary["random_final_map50_95"] == pytest.approx(0.3)
    assert summary["edgeloop_labels_to_reach_it"] == pytest.approx(70.0)
    assert summary["edgeloop_share_of_random_labels"] == pytest.approx(70 / 130)
    assert summary["edgeloop_share_of_random_added_labels"] == pytest.approx(30 / 90)
    assert summary["mean_map50_95"]["edgeloop-no-diversity"] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_summary_says_when_edgeloop_never_reaches_random(al) -> None:
    runs = _runs(al, "iid", {"edgeloop": [[0.1, 0.15, 0.2, 0.25]], "random": [[0.1, 0.2, 0.3, 0.4]]})
    summary = al.summarise(runs)["iid"]
    assert summary["edgeloop_labels_to_reach_it"] is None and summary["edgeloop_share_of_random_labels"] is None
    text = al.markdown(_result(al, runs), "python bench/active_learning.py --data x")
    assert "edgeloop does not reach it within the rounds" in text


def _result(al, runs: list) -> dict:
    from dataclasses import asdict

    return {
        "settings": asdict(al.Settings()),
        "machine": "x86_64, 3.11",
        "seconds": 600.0,
        "runs": [asdict(r) for r in runs],
    }


def test_markdown_has_a_row_per_strategy_with_mean_and_spread_and_the_verdict(al) -> None:
    runs = _runs(
        al,
        "camera",
        {"edgeloop": [[0.1, 0.3, 0.4, 0.5], [0.1, 0.5, 0.6, 0.7]], "random": [[0.1, 0.2, 0.25, 0.3]] * 2},
    )
    text = al.markdown(_result(al, runs), "python bench/active_learning.py --data synthetic")
    rows = [line for line in text.splitlines() if line.startswith("| edgeloop |") or line.startswith("| random |")]
    assert len(rows) == 2  # edgeloop mean [0.1, 0.4, 0.5, 0.6]: reaches 0.3 at 40 + 30 * 0.2 / 0.3 = 60 labels
    assert "0.600 ± 0.100" in rows[0]  # mean and standard deviation over the two seeds, final round
    assert "**60 labels (46% of random's 130; 22% of the 90 labels added after the seed)**" in text
    assert "`python bench/active_learning.py --data synthetic` (x86_64, 3.11, 10 min)" in text
