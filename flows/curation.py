"""The seam between the flows and curation: what the flows need from dataset versions and review batches.

The flows never reach into curation's storage; they call a :class:`Curation` object chosen by
config (``curation.provider``: ``"directory"`` or an import path ``"package.module:factory"``, the
factory called with ``curation.options`` as keyword arguments):

* ``export(dataset_version, out_dir) -> Path``: write the immutable dataset version as a YOLO data
  set under ``out_dir`` and return its ``data.yaml``, which must name ``train``, ``val`` and the
  frozen ``test`` split. Raises :class:`DatasetVersionError` for an unknown version.
* ``latest_version() -> str | None``: the newest dataset version, None before the first.
* ``unconsumed_samples(dataset_version, trained_on) -> int``: samples of ``dataset_version`` the
  production model did not learn from; ``trained_on`` is the dataset version the production
  model was trained on (its registry lineage), None when there is no production model (then
  every sample counts).
* ``next_batch(min_new) -> str | None``: create a review batch when at least ``min_new`` new inbox
  frames wait, tell the curators where they look (log, FiftyOne dataset info), and return the
  batch's name; None when there are too few.

:class:`DirectoryCuration` is the built-in provider: dataset versions already exported as YOLO
folders, ``<root>/<version>/data.yaml``, newest by name (``ds-0003`` after ``ds-0002``; use
sortable names). It has no inbox, so it never makes review batches. The FiftyOne-backed provider of
``server.curation`` plugs in through the same four calls.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml
from pydantic import Field

from edgeloop.config_base import StrictModel

logger = logging.getLogger(__name__)

#: Splits a dataset version must provide (the test split is frozen: the gate compares on it).
REQUIRED_SPLITS = ("train", "val", "test")


class DatasetVersionError(Exception):
    """A dataset version is unknown, or its export lacks a split the flows need."""


class CurationConfigError(Exception):
    """``curation.provider`` does not name a usable provider."""


@runtime_checkable
class Curation(Protocol):
    """What the flows need from curation (see the module docstring for each call's contract)."""

    def export(self, dataset_version: str, out_dir: Path) -> Path: ...

    def latest_version(self) -> str | None: ...

    def unconsumed_samples(self, dataset_version: str, trained_on: str | None) -> int: ...

    def next_batch(self, min_new: int) -> str | None: ...


class CurationConfig(StrictModel):
    """Which curation provider the flows use."""

    provider: str = Field(
        "directory",
        description="'directory' (exported YOLO folders under options.root) or 'package.module:factory'.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the provider's factory (e.g. root: for directory)."
    )


def _images(data_yaml: Path, split: str) -> set[str]:
    from flows.training.evaluate import EvaluationError, split_images

    try:
        return {p.name for p in split_images(data_yaml, split)}
    except EvaluationError:
        return set()


class DirectoryCuration:
    """Dataset versions as exported YOLO folders under ``root`` (``<root>/<version>/data.yaml``).

    Samples are identified by image file name: a version's samples the production model was not
    trained on are its train and val images whose names the ``trained_on`` version does not have.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _yaml(self, dataset_version: str) -> Path:
        if "/" in dataset_version or dataset_version in {"", ".", ".."}:
            raise DatasetVersionError(f"invalid dataset version {dataset_version!r}")
        path = self.root / dataset_version / "data.yaml"
        if not path.is_file():
            raise DatasetVersionError(f"unknown dataset version {dataset_version!r} (no {path})")
        return path

    def export(self, dataset_version: str, out_dir: Path) -> Path:
        source = self._yaml(dataset_version)
        doc = yaml.safe_load(source.read_text()) or {}
        root = Path(doc.get("path") or ".")
        doc["path"] = str(root if root.is_absolute() else (source.parent / root).resolve())
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / "data.yaml"
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        return out

    def latest_version(self) -> str | None:
        versions = sorted(p.parent.name for p in self.root.glob("*/data.yaml"))
        return versions[-1] if versions else None

    def unconsumed_samples(self, dataset_version: str, trained_on: str | None) -> int:
        current = self._yaml(dataset_version)
        mine = _images(current, "train") | _images(current, "val")
        if trained_on is None:
            return len(mine)
        try:
            before = self._yaml(trained_on)
        except DatasetVersionError:
            logger.warning("production's dataset version %s is gone; counting every sample as new", trained_on)
            return len(mine)
        return len(mine - (_images(before, "train") | _images(before, "val")))

    def next_batch(self, min_new: int) -> str | None:
        logger.info("the directory curation provider has no inbox: no review batch to make")
        return None


_BUILTIN: dict[str, Callable[..., Curation]] = {"directory": DirectoryCuration}


def load_curation(config: CurationConfig) -> Curation:
    """Build the configured provider.

    Raises:
        CurationConfigError: unknown name, an import path that does not import, or a factory that fails.
    """
    factory = _BUILTIN.get(config.provider)
    if factory is None:
        module_name, sep, attr = config.provider.partition(":")
        if not sep:
            raise CurationConfigError(
                f"curation.provider {config.provider!r} is neither {', '.join(_BUILTIN)} nor 'package.module:factory'"
            )
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise CurationConfigError(f"curation.provider {config.provider!r} cannot be loaded: {err}") from err
    try:
        provider = factory(**config.options)
    except (TypeError, ValueError, OSError) as err:
        raise CurationConfigError(f"curation.provider {config.provider!r} failed to start: {err}") from err
    if not isinstance(provider, Curation):
        raise CurationConfigError(f"curation.provider {config.provider!r} lacks export/latest_version/...")
    return provider


def check_export(data_yaml: Path) -> Path:
    """Check that an exported dataset version has every split the flows need; return ``data_yaml``.

    Raises:
        DatasetVersionError: a split is missing or empty.
    """
    from flows.training.evaluate import EvaluationError, split_images

    for split in REQUIRED_SPLITS:
        try:
            split_images(data_yaml, split)
        except EvaluationError as err:
            raise DatasetVersionError(f"the exported dataset version is unusable: {err}") from err
    return data_yaml


__all__ = [
    "Curation",
    "CurationConfig",
    "CurationConfigError",
    "DatasetVersionError",
    "DirectoryCuration",
    "check_export",
    "load_curation",
]
