"""The ``retrain`` flow: a dataset version in, a better model on the fleet out (or production untouched).

Each step of :mod:`flows.pipeline` is a Prefect task, thin on purpose; only the steps that touch
storage other processes share (the dataset export, the registry) retry, since retrying a training
or an evaluation repeats the same work with the same result. The run publishes its metrics, the
per-class AP, the gate's decision and the training report with its plots as artifacts (see
:mod:`flows.artifacts`). A failing step fails the run with the step's error as its message, before
anything is registered or released.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import pipeline
from flows.artifacts import publish_artifacts
from flows.config import FlowsConfig, load_flows_config
from flows.curation import load_curation
from flows.training.gate import GateDecision
from flows.training.report import TrainingReport
from flows.training.trainer import TrainResult
from server.curation.leaks import LeakReport
from server.registry.store import RegistryLockedError

logger = logging.getLogger(__name__)

#: Retries of the steps that read or write shared storage (dataset export, registry), on transient errors only.
IO_RETRIES = 2
IO_RETRY_DELAY_S = 10


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O failures (a file system or network hiccup, the registry's lock held too long), not a wrong
    dataset version or a refused registration: those fail the same way every time."""
    error = state.data if isinstance(state.data, BaseException) else None
    return isinstance(error, OSError | RegistryLockedError)


_IO = {"retries": IO_RETRIES, "retry_delay_seconds": IO_RETRY_DELAY_S, "retry_condition_fn": transient}


@task(name="export-dataset", cache_policy=NO_CACHE, **_IO)
def export_dataset(config: FlowsConfig, dataset_version: str, work: Path) -> Path:
    return pipeline.export_dataset(load_curation(config.curation), dataset_version, work)


@task(name="find-production", cache_policy=NO_CACHE, **_IO)
def find_production(config: FlowsConfig) -> pipeline.Production | None:
    return pipeline.find_production(pipeline.open_registry(config), config.rollout.stable_channel)


@task(name="train", cache_policy=NO_CACHE)
def train(config: FlowsConfig, data_yaml: Path, work: Path, production: pipeline.Production | None) -> TrainResult:
    return pipeline.train_candidate(config, data_yaml, work, production)


@task(name="export-model", cache_policy=NO_CACHE)
def export_model(config: FlowsConfig, trained: TrainResult, data_yaml: Path, work: Path) -> pipeline.CandidateFiles:
    return pipeline.export_candidate(config, trained, data_yaml, work)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    config: FlowsConfig, files: pipeline.CandidateFiles, data_yaml: Path, production: pipeline.Production | None
) -> pipeline.Evaluations:
    return pipeline.evaluate_candidate(config, files, data_yaml, production)


@task(name="report", cache_policy=NO_CACHE)
def make_report(
    config: FlowsConfig, trained: TrainResult, evaluations: pipeline.Evaluations, work: Path
) -> TrainingReport | None:
    try:
        return pipeline.report(config, trained, evaluations, work)
    except Exception:  # a report that cannot be drawn must not cost the model: say so and go on
        get_run_logger().exception("the training report failed; continuing without it")
        return None


@task(name="check-leaks", cache_policy=NO_CACHE)
def check_leaks(
    config: FlowsConfig, data_yaml: Path, production: pipeline.Production | None, files: pipeline.CandidateFiles
) -> LeakReport:
    report = pipeline.check_leaks(config, data_yaml, production, files)
    get_run_logger().info("leaks between train and test: %s", report.summary())
    return report


@task(name="gate", cache_policy=NO_CACHE)
def gate(config: FlowsConfig, evaluations: pipeline.Evaluations, leaks: LeakReport) -> GateDecision:
    decision = pipeline.gate_candidate(config, evaluations, leaks)
    get_run_logger().info("gate: %s (%s)", "promote" if decision.promote else "reject", decision.reason)
    return decision


@task(name="register", cache_policy=NO_CACHE, **_IO)
def register(
    config: FlowsConfig,
    files: pipeline.CandidateFiles,
    evaluations: pipeline.Evaluations,
    decision: GateDecision,
    dataset_version: str,
    production: pipeline.Production | None,
    run_id: str,
) -> str:
    record = pipeline.register_candidate(
        pipeline.open_registry(config),
        config,
        files,
        evaluations,
        decision,
        dataset_version=dataset_version,
        production=production,
        run_id=run_id,
    )
    return record.version


@task(name="release", cache_policy=NO_CACHE)
def release(config: FlowsConfig, version: str) -> dict[str, Any]:
    result = pipeline.release_candidate(pipeline.open_registry(config), config, version)
    get_run_logger().info("release of %s: %s (%s)", version, result.outcome, result.reason)
    return {"outcome": result.outcome, "reason": result.reason}


@flow(name="retrain", log_prints=True)
def retrain(dataset_version: str, config: str | None = None) -> dict[str, Any]:
    """Export ``dataset_version``, train, evaluate what the edge runs, gate, register, release canary-first.

    Args:
        dataset_version: The curated dataset version to train on (all of it, frozen test split included).
        config: Path of the flows' YAML config (default: built-in defaults plus EDGELOOP_FLOWS__ overrides).

    Returns:
        ``version`` (None when nothing was registered), ``promoted``, ``reason`` and ``rollout``.
    """
    log = get_run_logger()
    cfg = load_flows_config(config)
    run_id = str(flow_run.get_id() or "local")
    work = pipeline.run_dir(cfg, run_id)
    log.info("retraining on dataset version %s (run %s, work %s)", dataset_version, run_id, work)

    data_yaml = export_dataset(cfg, dataset_version, work)
    production = find_production(cfg)
    log.info("production: %s", production.version if production else "none (a first model)")
    trained = train(cfg, data_yaml, work, production)
    files = export_model(cfg, trained, data_yaml, work)
    evaluations = evaluate(cfg, files, data_yaml, production)
    training_report = make_report(cfg, trained, evaluations, work)
    leaks = check_leaks(cfg, data_yaml, production, files)
    decision = gate(cfg, evaluations, leaks)
    version = register(cfg, files, evaluations, decision, dataset_version, production, run_id)
    publish_artifacts(evaluations, decision, training_report, version)
    summary: dict[str, Any] = {"version": version, "promoted": decision.promote, "reason": decision.reason}
    if decision.promote:
        summary["rollout"] = release(cfg, version)
    else:
        log.warning("%s registered as rejected: %s; production untouched", version, decision.reason)
    return summary


__all__ = ["retrain"]
