"""``edgeloop curate report``: class balance per split and per version, and the seeds' warnings.

Pure functions over version records (and, when the curation model is at hand, a near-duplicate
count of the latest version). Warnings look at the latest version's **train** split, what the next
model learns from:

- a class with fewer than :data:`MIN_EXAMPLES` boxes (too few to learn it at all);
- a class with under :data:`MIN_SHARE_OF_LARGEST` of the largest class's boxes (the model will
  learn to ignore it);
- more than :data:`MAX_NEAR_DUPLICATE_SHARE` of the samples with a near-duplicate among the
  others (consecutive video frames: they add count, not information);
- any **leak**: a val or test sample identical to, or a near-duplicate of, a training sample
  (:mod:`server.curation.leaks`): the gate would score memory.

It also says, per version, how its new samples were split: by the policy, episode by episode, or as
an imported data set declared them (and which approved frames were held out, and why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeloop.tables import format_table
from server.curation.leaks import LeakReport
from server.curation.splits import SPLITS, TRAIN
from server.curation.versions import DatasetVersion

MIN_EXAMPLES = 10
MIN_SHARE_OF_LARGEST = 0.2
MAX_NEAR_DUPLICATE_SHARE = 0.1


@dataclass(frozen=True)
class NearDuplicateCount:
    """Samples of a version that have a near-duplicate among its other samples."""

    duplicated: int
    total: int

    @property
    def share(self) -> float:
        return self.duplicated / self.total if self.total else 0.0


@dataclass
class Report:
    """Balance per version and split, and warnings about the latest version."""

    versions: list[DatasetVersion]
    near_duplicates: NearDuplicateCount | None = None
    near_duplicates_note: str = ""
    warnings: list[str] = field(default_factory=list)
    leaks: LeakReport | None = None

    def to_json(self) -> dict:
        nd = self.near_duplicates
        return {
            "versions": [
                {
                    "id": v.id,
                    "parent": v.parent,
                    "batch": v.batch,
                    "samples": v.counts,
                    "boxes": v.class_counts,
                    "test_frozen": v.test_frozen,
                    "splits_from": split_origin(v),
                    "held_out": v.held_out,
                }
                for v in self.versions
            ],
            "near_duplicates": None if nd is None else {"duplicated": nd.duplicated, "total": nd.total},
            "leaks": None if self.leaks is None else self.leaks.to_json(),
            "warnings": self.warnings,
        }


def class_warnings(classes: Sequence[str], boxes: dict[str, int], where: str) -> list[str]:
    """The seeds' class-balance warnings for one split's box counts."""
    out = []
    largest = max((boxes.get(c, 0) for c in classes), default=0)
    for c in classes:
        n = boxes.get(c, 0)
        if n < MIN_EXAMPLES:
            out.append(f"{where}: class {c!r} has {n} example(s), fewer than {MIN_EXAMPLES}")
        elif largest and n < MIN_SHARE_OF_LARGEST * largest:
            out.append(
                f"{where}: class {c!r} has {n} examples, under a fifth of the largest class ({largest}); "
                "look for frames of it (or lower class_cap)"
            )
    return out


def split_origin(version: DatasetVersion) -> str:
    """How a version's new samples were split, in words."""
    return {
        "declared": "the imported data set's own splits",
        "episodes": "the policy, episode by episode",
    }.get(version.splits_from, "the policy, frame by frame (before episodes)")


def build_report(
    versions: list[DatasetVersion],
    near_duplicates: NearDuplicateCount | None = None,
    leaks: LeakReport | None = None,
) -> Report:
    """The report over ``versions`` (oldest first); warnings are about the last one."""
    report = Report(versions, near_duplicates, leaks=leaks)
    if not versions:
        report.warnings.append("no dataset version yet: approve a batch first")
        return report
    latest = versions[-1]
    report.warnings += class_warnings(latest.classes, latest.class_counts.get(TRAIN, {}), f"{latest.id} train")
    if near_duplicates is not None and near_duplicates.share > MAX_NEAR_DUPLICATE_SHARE:
        report.warnings.append(
            f"{latest.id}: {near_duplicates.duplicated} of {near_duplicates.total} samples "
            f"({near_duplicates.share:.0%}) have a near-identical sample in the set (more than "
            f"{MAX_NEAR_DUPLICATE_SHARE:.0%}): they add count, not information"
        )
    if leaks is not None and leaks.leaks:
        report.warnings.append(
            f"{latest.id} leaks between splits: {leaks.summary()}; a model is scored on what it trained on "
            "(the gate refuses to promote on a leaky test split): see the `leaks` view in the App"
        )
    return report


def format_report(report: Report) -> str:
    """The report as text tables for the command line."""
    if not report.versions:
        return "\n".join(f"warning: {w}" for w in report.warnings)
    classes = list(report.versions[-1].classes)
    rows = []
    for v in report.versions:
        for split in SPLITS:
            boxes = v.class_counts.get(split, {})
            rows.append(
                (v.id, split, str(v.counts.get(split, 0)), *(str(boxes.get(c, 0)) for c in classes))
                + (("frozen" if v.test_frozen and split == "test" else ""),)
            )
    lines = [
        "boxes per class (samples per split) by version:",
        format_table(("VERSION", "SPLIT", "SAMPLES", *classes, ""), rows),
    ]
    lines += [
        f"{v.id}: split by {split_origin(v)}"
        + (f"; {len(v.held_out)} approved frame(s) held out ({next(iter(v.held_out.values()))})" if v.held_out else "")
        for v in report.versions
    ]
    if report.leaks is not None:
        lines.append(f"leaks between train and val/test in {report.versions[-1].id}: {report.leaks.summary()}")
    nd = report.near_duplicates
    if nd is not None:
        lines.append(f"near-identical samples in {report.versions[-1].id}: {nd.duplicated} of {nd.total}")
    elif report.near_duplicates_note:
        lines.append(f"near-identical samples: not checked ({report.near_duplicates_note})")
    lines += [f"warning: {w}" for w in report.warnings] or ["no warnings"]
    return "\n".join(lines)
