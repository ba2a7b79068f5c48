"""The ``trigger`` flow (scheduled and on demand): run ``retrain`` when a dataset version holds enough
samples the production model was not trained on (see :func:`flows.decisions.retrain_decision`).

Served or deployed, it starts the ``retrain`` deployment, so training runs where that deployment
runs (the GPU work pool) and shows as its own run; called outside a deployment, it runs ``retrain``
as a subflow in this process.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment

from flows.client import RETRAIN_DEPLOYMENT
from flows.config import load_flows_config
from flows.curation import load_curation
from flows.decisions import retrain_decision
from flows.pipeline import open_registry


@flow(name="trigger", log_prints=True)
def trigger(config: str | None = None, dataset_version: str | None = None) -> dict[str, Any]:
    """Retrain on ``dataset_version`` (default: the newest) if it has ``trigger.min_new_samples`` new samples."""
    cfg = load_flows_config(config)
    log = get_run_logger()
    decision = retrain_decision(
        load_curation(cfg.curation),
        open_registry(cfg),
        min_new_samples=cfg.trigger.min_new_samples,
        stable_channel=cfg.rollout.stable_channel,
        dataset_version=dataset_version,
    )
    log.info("%s: %s", "retraining" if decision.retrain else "not retraining", decision.reason)
    result: dict[str, Any] = {"retrain": decision.retrain, "reason": decision.reason}
    if not decision.retrain:
        return result
    create_markdown_artifact(key="retrain-trigger", markdown=f"# Retraining\n\n{decision.reason}")
    parameters = {"dataset_version": decision.dataset_version, "config": config}
    if deployment.get_id():
        from prefect.deployments import run_deployment

        run = run_deployment(RETRAIN_DEPLOYMENT, parameters=parameters, timeout=0)
        log.info("started %s: flow run %s", RETRAIN_DEPLOYMENT, run.id)
        result["flow_run_id"] = str(run.id)
    else:
        from flows.retrain import retrain

        result["run"] = retrain(**parameters)
    return result


__all__ = ["trigger"]
