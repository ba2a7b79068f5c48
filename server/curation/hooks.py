"""Where curation hands over to retraining: the one call the App's "Start retraining" button makes.

The retraining flows (a later milestone) fill :func:`start_retraining`: given an approved dataset
version it schedules the retraining run (export with :func:`server.curation.versions.export_yolo`,
train, evaluate on the frozen test split, gate, publish) and returns something a curator can
follow (a run id or URL). Until then it raises :class:`RetrainingUnavailable`, whose message the
plugin shows as it is.
"""

from __future__ import annotations


class RetrainingUnavailable(RuntimeError):
    """Retraining cannot be started from here: the retraining flows are not installed or configured."""


def start_retraining(dataset_version: str) -> str:
    """Start retraining on ``dataset_version`` (``ds-0003``); returns a handle to follow the run.

    Raises:
        RetrainingUnavailable: always, until the retraining flows are installed.
    """
    raise RetrainingUnavailable(
        f"retraining on {dataset_version} cannot start: the retraining flows are not installed or configured "
        "on this server yet. Export the version (`edgeloop curate export "
        f"{dataset_version} OUT`) and train from OUT/data.yaml by hand meanwhile."
    )
