"""Start flows from elsewhere: what the FiftyOne plugin's "Start retraining" operator and the CLI call.

:func:`start_retrain` asks the Prefect server (``PREFECT_API_URL``) to run the ``retrain``
deployment and returns at once with the flow run's id; whoever serves or works the deployment
picks it up. :func:`wait_for_run` follows a run to its end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

#: The retrain deployment's name on the Prefect server (see flows.deployments).
RETRAIN_DEPLOYMENT = "retrain/retrain"
#: How often a waiting caller asks the server about a run.
POLL_S = 2.0


class FlowStartError(Exception):
    """The Prefect server cannot be reached, or it has no such deployment."""


@dataclass(frozen=True)
class RunOutcome:
    """A finished (or still running, after a timeout) flow run."""

    flow_run_id: str
    state: str
    message: str
    final: bool


def _require_server() -> None:
    """Refuse before Prefect's client would start a temporary in-process server of its own.

    Without ``PREFECT_API_URL`` Prefect 3 quietly starts an ephemeral server: it has none of our
    deployments and no worker serves it, so a run started there would never run.
    """
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise FlowStartError(
            "no Prefect server is configured (PREFECT_API_URL is not set): start one (`prefect server start`, "
            "or `edgeloop demo`) and set PREFECT_API_URL=http://HOST:PORT/api"
        )


def start_deployment(deployment: str, parameters: dict[str, Any]) -> str:
    """Create a run of ``deployment`` with ``parameters``; return its id (it runs wherever the deployment is served).

    Raises:
        FlowStartError: no server, or no such deployment.
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    _require_server()
    try:
        run = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False)
    except ObjectNotFound as err:
        raise FlowStartError(
            f"the Prefect server has no deployment {deployment!r}: run `edgeloop flows serve`"
        ) from err
    except Exception as err:  # httpx connection errors and Prefect's own: one message for the operator
        raise FlowStartError(f"cannot start {deployment}: {err}") from err
    return str(run.id)


def start_retrain(dataset_version: str, *, config: str | None = None, deployment: str = RETRAIN_DEPLOYMENT) -> str:
    """Start ``retrain`` on ``dataset_version`` through the Prefect server; return the flow run id.

    ``config`` overrides the deployment's own config parameter (leave None to keep it).
    """
    parameters: dict[str, Any] = {"dataset_version": dataset_version}
    if config is not None:
        parameters["config"] = config
    return start_deployment(deployment, parameters)


def wait_for_run(flow_run_id: str, timeout_s: float) -> RunOutcome:
    """Poll the run until it ends or ``timeout_s`` passes."""
    from prefect.client.orchestration import get_client

    _require_server()
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            final = bool(state and state.is_final())
            if final or time.monotonic() > deadline:
                name = state.name if state else "UNKNOWN"
                return RunOutcome(flow_run_id, name, (state.message or "") if state else "", final)
            time.sleep(POLL_S)


__all__ = ["FlowStartError", "RETRAIN_DEPLOYMENT", "RunOutcome", "start_deployment", "start_retrain", "wait_for_run"]
