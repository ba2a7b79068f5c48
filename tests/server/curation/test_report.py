"""The report's warnings: too few examples, a class under a fifth of the largest, many near-identical samples."""

from __future__ import annotations

from server.curation.report import NearDuplicateCount, build_report, class_warnings, format_report
from server.curation.versions import DatasetVersion

CLASSES = ("circle", "square", "triangle")


def version(vid: str, train: dict[str, int]) -> DatasetVersion:
    return DatasetVersion(
        id=vid,
        parent=None,
        created="2026-12-02T00:00:00Z",
        batch="batch-001",
        classes=CLASSES,
        added=(),
        splits={"train": [], "val": [], "test": []},
        counts={"train": 30, "val": 3, "test": 3},
        class_counts={"train": train, "val": dict.fromkeys(CLASSES, 1), "test": dict.fromkeys(CLASSES, 1)},
        test_frozen=False,
        labels_sha256="0" * 64,
    )


def test_class_warnings():
    warnings = class_warnings(CLASSES, {"circle": 100, "square": 15, "triangle": 4}, "ds-0001 train")
    assert len(warnings) == 2
    assert "'square' has 15 examples, under a fifth of the largest class (100)" in warnings[0]
    assert "'triangle' has 4 example(s), fewer than 10" in warnings[1]
    assert class_warnings(CLASSES, {"circle": 50, "square": 20, "triangle": 10}, "x") == []


def test_report_warns_about_the_latest_version_only_and_about_near_duplicates():
    old = version("ds-0001", {"circle": 3, "square": 3, "triangle": 3})
    new = version("ds-0002", {"circle": 40, "square": 30, "triangle": 20})
    report = build_report([old, new], NearDuplicateCount(duplicated=12, total=90))
    assert len(report.warnings) == 1 and "12 of 90 samples (13%) have a near-identical sample" in report.warnings[0]
    text = format_report(report)
    assert "ds-0001  train  30" in text and "near-identical samples in ds-0002: 12 of 90" in text
    assert build_report([new], NearDuplicateCount(5, 90)).warnings == []
    assert build_report([]).warnings == ["no dataset version yet: approve a batch first"]
    assert report.to_json()["versions"][1]["boxes"]["train"]["triangle"] == 20
