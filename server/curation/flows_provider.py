"""Curation as the retraining flows see it: the provider behind ``flows.curation``'s four calls.

Configure the flows with::

    curation:
      provider: server.curation.flows_provider:factory
      options: {server_config: /etc/edgeloop/server.yaml}

``export``, ``latest_version`` and ``unconsumed_samples`` read only the version files (no
database); ``next_batch`` connects to the server's MongoDB (started if bundled) and asks
:meth:`Curation.next_batch <server.curation.service.Curation.next_batch>` for a batch once enough
unbatched frames wait in the inbox. The batch shows up in the App as a saved view; the inbox's
dataset info says which batch waits for review.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

from server.curation.versions import VersionError, VersionStore, export_yolo

logger = logging.getLogger(__name__)


class ServerCuration:
    """The flows' curation seam over the server's curation state (see the module docstring)."""

    def __init__(self, server_config: str | Path) -> None:
        from server.config import load_server_config

        self.config_path = Path(server_config)
        self.server = load_server_config(self.config_path)

    @property
    def versions(self) -> VersionStore:
        return VersionStore(self.server.curation.root)

    def export(self, dataset_version: str, out_dir: Path) -> Path:
        from flows.curation import DatasetVersionError

        try:
            return export_yolo(self.versions, dataset_version, out_dir)
        except VersionError as err:
            raise DatasetVersionError(str(err)) from err

    def latest_version(self) -> str | None:
        latest = self.versions.latest()
        return latest.id if latest else None

    def unconsumed_samples(self, dataset_version: str, trained_on: str | None) -> int:
        """Frames of ``dataset_version`` (any split) that ``trained_on`` did not hold."""
        have = {f for ids in self.versions.splits(dataset_version).values() for f in ids}
        if trained_on is None:
            return len(have)
        seen = {f for ids in self.versions.splits(trained_on).values() for f in ids}
        return len(have - seen)

    @cached_property
    def _curation(self):  # noqa: ANN202 - a server.curation.service.Curation, imported lazily
        from server.curation.service import Curation
        from server.store.mongo import MongoManager, configure_fiftyone

        configure_fiftyone(MongoManager(self.server.mongo).ensure_running(), self.server.fiftyone_dir)
        return Curation.from_server_config(self.server)

    def next_batch(self, min_new: int) -> str | None:
        curation = self._curation
        waiting = curation.unbatched_count()
        if waiting < min_new:
            logger.info("curate: %d unbatched frames in the inbox, fewer than %d: no batch yet", waiting, min_new)
            return None
        result = curation.next_batch()
        name = result.batch.name
        info = curation.inbox.info
        info["edgeloop_waiting_for_review"] = name
        curation.inbox.save()
        frames = len(result.batch.sample_ids)
        logger.info("curate: %s is ready for review in the FiftyOne App (%d frames)", name, frames)
        return name


def factory(server_config: str) -> ServerCuration:
    """The provider ``flows.curation`` builds from ``curation.options``."""
    return ServerCuration(server_config)
