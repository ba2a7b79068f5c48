"""The flows' deployments, defined apart from the flows: names, schedules, parameters, work pools.

========  =====================  ===========  ===========================================
flow      deployment             pool         schedule
========  =====================  ===========  ===========================================
retrain   ``retrain/retrain``    gpu          on demand (trigger, the FiftyOne operator, CLI)
tune      ``tune/tune``          gpu          on demand
curate    ``curate/curate``      light        every ``curate.interval_s``
trigger   ``trigger/trigger``    light        every ``trigger.interval_s``, and on demand
========  =====================  ===========  ===========================================

Two ways to run them (both need a Prefect server: schedules are refused by Prefect's ephemeral one):

* :func:`serve`: one long-running process runs every deployment and its schedules
  (``edgeloop flows serve``): a single machine, or a lab.
* :func:`deploy`: register them on work pools (``edgeloop flows deploy``); workers of each pool
  (``prefect worker start --pool edgeloop-gpu``) run the runs, where the pool's infrastructure is
  (process, Docker, Kubernetes: see ``deploy/prefect/``). Deployments name their flows by module
  path (``flows.retrain.retrain``), so a worker needs edgeloop installed, not a copy of the source.

Every deployment gets the flows' config file as its ``config`` parameter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import FlowsConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: its flow (``module:attribute``), name, pool role and schedule."""

    flow: str
    name: str
    pool: str  # "gpu" or "light": a field of PoolsConfig
    interval_s: int | None
    description: str


def specs(config: FlowsConfig) -> list[DeploymentSpec]:
    """The four deployments, with the schedules ``config`` sets."""
    return [
        DeploymentSpec("flows.retrain:retrain", "retrain", "gpu", None, "Train, evaluate, gate, register, release."),
        DeploymentSpec("flows.tune:tune", "tune", "gpu", None, "Random search for lr0 and momentum."),
        DeploymentSpec(
            "flows.curate:curate", "curate", "light", config.curate.interval_s, "Start a review batch when due."
        ),
        DeploymentSpec(
            "flows.trigger:trigger", "trigger", "light", config.trigger.interval_s, "Retrain when enough is new."
        ),
    ]


def _flow(ref: str) -> Any:
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _runner_deployments(config: FlowsConfig, config_path: Path | None, *, pools: bool) -> list[Any]:
    from prefect.deployments.runner import EntrypointType

    parameters = {"config": str(Path(config_path).resolve())} if config_path else {}
    out = []
    for spec in specs(config):
        kwargs: dict[str, Any] = {
            "name": spec.name,
            "parameters": parameters,
            "description": spec.description,
            "tags": ["edgeloop", spec.pool],
        }
        if spec.interval_s:
            kwargs["interval"] = spec.interval_s
        if pools:
            kwargs["work_pool_name"] = getattr(config.pools, spec.pool)
            kwargs["entrypoint_type"] = EntrypointType.MODULE_PATH
        out.append(_flow(spec.flow).to_deployment(**kwargs))
    return out


def serve(config: FlowsConfig, config_path: Path | None, *, limit: int | None = None) -> None:
    """Run every deployment with its schedule in this process until interrupted (needs PREFECT_API_URL)."""
    from prefect import serve as prefect_serve

    prefect_serve(*_runner_deployments(config, config_path, pools=False), limit=limit)


def ensure_pools(config: FlowsConfig) -> list[str]:
    """Create the gpu and light work pools (of ``pools.type``) where missing; return the ones created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in dict.fromkeys([config.pools.gpu, config.pools.light]):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=config.pools.type))
                created.append(name)
                logger.info("created work pool %s (%s)", name, config.pools.type)
    return created


def deploy(config: FlowsConfig, config_path: Path | None, *, image: str | None = None) -> list[str]:
    """Register every deployment on its work pool (creating missing pools); return ``flow/deployment`` names.

    ``image`` is the container image Docker and Kubernetes pools run (edgeloop installed in it);
    process pools take none.
    """
    ensure_pools(config)
    names = []
    for deployment in _runner_deployments(config, config_path, pools=True):
        deployment.apply(work_pool_name=deployment.work_pool_name, image=image)
        names.append(f"{deployment.flow_name}/{deployment.name}")
    return names


__all__ = ["DeploymentSpec", "deploy", "ensure_pools", "serve", "specs"]
