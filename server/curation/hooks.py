"""Where curation hands over to retraining: the one call the App's "Start retraining" button makes.

:func:`start_retraining` asks the Prefect server (``PREFECT_API_URL`` in the App's environment) to
run the ``retrain`` deployment on an approved dataset version, and returns the flow run's id for
the curator to follow in the Prefect UI. The deployment runs wherever it is served or worked
(``edgeloop flows serve``, or a worker of the GPU pool). Without the flows extra or a reachable
server it raises :class:`RetrainingUnavailable`, whose message the plugin shows as it is.
"""

from __future__ import annotations


class RetrainingUnavailable(RuntimeError):
    """Retraining cannot be started from here: the flows are not installed, or no Prefect server answers."""


def start_retraining(dataset_version: str) -> str:
    """Start retraining on ``dataset_version`` (``ds-0003``); returns the flow run's id.

    Raises:
        RetrainingUnavailable: the flows extra is missing, or the Prefect server or its ``retrain``
            deployment cannot be reached (the message says which and what to do).
    """
    try:
        from flows.client import FlowStartError, start_retrain
    except ImportError as err:
        raise RetrainingUnavailable(
            f"retraining on {dataset_version} cannot start: the flows are not installed here "
            f"(pip install 'edgeloop[flows]'): {err}"
        ) from err
    try:
        return start_retrain(dataset_version)
    except FlowStartError as err:
        raise RetrainingUnavailable(
            f"retraining on {dataset_version} cannot start: {err}. Serve the flows (`edgeloop flows serve`) "
            "and give the App PREFECT_API_URL"
        ) from err
