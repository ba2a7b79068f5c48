"""A curation provider in memory, for the flows' decisions until the real one (server.curation) is wired.

It implements :class:`flows.curation.Curation`: dataset versions map to already-written YOLO
``data.yaml`` files and to the sample ids they hold; ``next_batch`` hands out a batch when the test
has put enough new inbox frames in ``inbox``.
"""

from __future__ import annotations

from pathlib import Path

from flows.curation import DatasetVersionError


class FakeCuration:
    """Dataset versions (name -> data.yaml, sample ids) and an inbox of new frame ids."""

    def __init__(self) -> None:
        self.versions: dict[str, tuple[Path | None, set[str]]] = {}
        self.inbox: list[str] = []
        self.batches: list[list[str]] = []
        self.exports: list[tuple[str, Path]] = []

    def add_version(self, name: str, samples: set[str], data_yaml: Path | None = None) -> None:
        self.versions[name] = (data_yaml, set(samples))

    def export(self, dataset_version: str, out_dir: Path) -> Path:
        if dataset_version not in self.versions or self.versions[dataset_version][0] is None:
            raise DatasetVersionError(f"unknown dataset version {dataset_version!r}")
        self.exports.append((dataset_version, out_dir))
        return self.versions[dataset_version][0]  # type: ignore[return-value]

    def latest_version(self) -> str | None:
        return max(self.versions) if self.versions else None

    def unconsumed_samples(self, dataset_version: str, trained_on: str | None) -> int:
        mine = self.versions[dataset_version][1]
        before = self.versions[trained_on][1] if trained_on in self.versions else set()
        return len(mine - before)

    def next_batch(self, min_new: int) -> str | None:
        if len(self.inbox) < min_new:
            return None
        self.batches.append(self.inbox[:])
        self.inbox.clear()
        return f"batch-{len(self.batches):03d}"
