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


@pytest.mark.slow
def test_the_bench_trains_on_a_data_set_in_the_standard_layout(al, tmp_path) -> None:
    """images/train/x.jpg + labels/train/x.txt (ultralytics' own layout): the seed training used to die
    with "No labels found" (labels looked for beside the images folder). Pools, training set, one epoch."""
    from edgeloop.synth.scenarios import get_scenario
    from edgeloop.synth.scenes import write_dataset
    from edgeloop.yolo_dataset import label_path, load_yolo_dataset

    data_yaml = write_dataset(tmp_path / "data", get_scenario("shapes").updated(width=96, height=96), n=24, seed=3,
                              val_fraction=0.1, test_fraction=0.2)  # fmt: skip
    data = load_yolo_dataset(data_yaml)
    assert data.split("train")[0].image.parent.parts[-2:] == ("images", "train")
    settings = al.Settings(seed_labels=6, imgsz=64)
    camera, iid, test_yaml, seed_images = al.real_data(data, tmp_path / "work", settings, seed=0)
    assert len(seed_images) == 6 and len(camera.frames) > 0 and len(iid.frames) == len(data.split("train")) - 6
    train_yaml = al._training_set(tmp_path / "seed-data", seed_images, test_yaml)
    linked = sorted((tmp_path / "seed-data" / "images").iterdir())
    assert len(linked) == 6 and all(label_path(p).is_file() for p in linked), "every image has its labels"
    checkpoint = al.train_round(train_yaml, al.BASE_PT, tmp_path / "run", epochs=1, imgsz=64, seed=0)
    assert checkpoint.is_file()


def _pool(al, n: int, worlds=None):
    worlds = worlds or {}
    frames = [
        al.PoolFrame(Path(f"f{i}.jpg"), Path(f"f{i}.txt"), f"cam-{i % 2}", i // 2, worlds.get(i, "shapes"))
        for i in range(n)
    ]
    return al.Pool("camera", frames, True)


def _scored(al, vectors, hashes):
    import numpy as np

    n = len(vectors)
    return al.Scored(np.zeros(n), np.ones(n, bool), np.asarray(vectors, np.float32), np.asarray(hashes, np.uint64),
                     [frozenset({"a"})] * n, np.zeros((0, vectors.shape[1]), np.float32), np.zeros(0, np.uint64),
                     1.0, [{}] * n, np.arange(n)[::-1].copy())  # fmt: skip


def test_every_nth_spreads_over_the_stream_and_skips_the_labelled(al) -> None:
    import numpy as np

    picked = al.select_every_nth(_pool(al, 100), {0, 1, 2}, 10, np.random.default_rng(0), None)
    assert len(picked) == 10 and not {0, 1, 2} & set(picked)
    assert max(np.diff(picked)) <= 11, "one frame every ~10 of the stream"


def test_random_dedup_never_takes_two_near_duplicates_and_oracles_know_what_they_know(al) -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    clip = np.repeat(np.arange(10), 10)  # ten scenes of ten near-identical frames
    vectors = rng.normal(0, 10, (10, 4))[clip] + rng.normal(0, 0.01, (100, 4))
    scored = _scored(al, vectors, clip.astype(np.uint64) << np.uint64(20))
    picked = al.select_random_dedup(_pool(al, 100), set(), 8, rng, lambda: scored)
    assert len(picked) == 8 and len(set(clip[picked])) == 8
    # The error oracle: most errors first (frame 0 has the most), one frame per scene.
    best = al.select_error_oracle(_pool(al, 100), set(), 3, rng, lambda: scored)
    assert sorted(clip[best]) == [0, 1, 2]
    shifted = {i: "shapes-night" for i in range(90, 100)}
    world = al.select_world_oracle(_pool(al, 100, shifted), set(), 12, rng, None)
    assert set(range(90, 100)) <= set(world) and len(world) == 12


def test_detection_errors_count_misses_and_false_positives(al, tmp_path) -> None:
    from edgeloop.domain import Detection

    label = tmp_path / "x.txt"
    label.write_text("0 0.25 0.25 0.2 0.2\n1 0.75 0.75 0.2 0.2\n")  # two objects in a 100x100 image
    hit = Detection(box=(15.0, 15.0, 35.0, 35.0), class_id=0, class_name="a", confidence=0.9)
    wrong_class = Detection(box=(65.0, 65.0, 85.0, 85.0), class_id=0, class_name="a", confidence=0.8)
    assert al.detection_errors([hit], label, 100, 100) == 1  # one miss
    assert al.detection_errors([hit, wrong_class], label, 100, 100) == 2  # a miss and a false positive
    assert al.detection_errors([], tmp_path / "none.txt", 100, 100) == 0


def test_the_area_and_its_paired_interval(al) -> None:
    assert al.curve_area([40, 70, 100], [0.1, 0.3, 0.5]) == pytest.approx(0.3)
    interval = al.paired_interval([0.02, 0.03, 0.025, 0.02, 0.03])
    assert interval["low"] > 0 and interval["high"] < 0.04 and interval["seeds"] == 5
    assert al.paired_interval([0.1])["low"] is None
    runs = _runs(al, "camera", {"edgeloop": [[0.1, 0.3, 0.4, 0.5]] * 3, "every-nth": [[0.1, 0.2, 0.25, 0.3]] * 3})
    versus = al.summarise(runs)["camera"]["versus"]["every-nth"]
    assert versus["edgeloop_labels_to_reach_it"] == pytest.approx(70.0)
    assert versus["area_difference"]["mean"] > 0
