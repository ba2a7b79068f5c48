"""The retrain pipeline's steps as plain functions: what the ``retrain`` flow's tasks call.

Callable and testable without Prefect; each step takes what it needs and returns a small value the
next step takes. In order:

1. :func:`export_dataset`: the curation seam writes the dataset version as YOLO (train, val and the
   frozen test split).
2. :func:`find_production`: what runs on stable now (its ONNX, its training checkpoint, its lineage).
3. :func:`train_candidate`: fine-tune the production checkpoint on the *whole* dataset version
   (a project's first model, or one whose classes changed, starts from the base checkpoint; from
   scratch only when configured).
4. :func:`export_candidate`: ONNX export, optional int8, each prepared as a release (embedding output,
   reference statistics): the file that would ship.
5. :func:`evaluate_candidate`: that file, and production's, through the edge agent's detector on the
   same test split; train and val splits too for the report's bias/variance reading.
6. :func:`check_leaks`, :func:`gate_candidate` then :func:`register_candidate`: registered with
   lineage and signed, marked rejected with the gate's reason when it did not pass (a test split
   that shares images with the training split never passes).
7. :func:`release_candidate`: canary, then stable once the canary devices' heartbeats confirm it.

A failure anywhere before step 6 registers nothing and releases nothing: production is untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import FlowsConfig
from flows.curation import Curation, check_export
from flows.training.evaluate import Evaluation, evaluate_onnx, read_data_yaml
from flows.training.gate import GateDecision, decide
from flows.training.report import TrainingReport, training_report
from flows.training.trainer import TrainResult, export_onnx, starting_point, train_with_config
from server.curation.leaks import LeakReport, leaks_in_export
from server.registry.rollout import FleetEntryLike, RolloutResult, release_to_canary, watch_canary
from server.registry.store import ModelRegistry, ModelVersion, UnknownVersionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Production:
    """The model on the stable channel now."""

    version: str
    onnx: Path
    checkpoint: Path | None
    class_names: list[str]
    dataset_version: str


@dataclass(frozen=True)
class CandidateFiles:
    """A trained candidate's files: the checkpoint and the release ONNX(s); ``shipped`` is what would ship."""

    checkpoint: Path
    float_onnx: Path
    int8_onnx: Path | None
    shipped: Path
    start: Path


@dataclass(frozen=True)
class Evaluations:
    """The candidate's and production's results on the test split, and the candidate's on train and val."""

    candidate: Evaluation
    production: Evaluation | None
    train: Evaluation | None
    val: Evaluation | None


def open_registry(config: FlowsConfig) -> ModelRegistry:
    return ModelRegistry(config.registry)


def run_dir(config: FlowsConfig, run_id: str) -> Path:
    """This run's working folder under ``work_dir``."""
    path = Path(config.work_dir) / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def export_dataset(curation: Curation, dataset_version: str, work: Path) -> Path:
    """Export ``dataset_version`` through the curation seam and check its splits; return its data.yaml.

    Raises:
        flows.curation.DatasetVersionError: unknown version, or a split is missing.
    """
    data_yaml = curation.export(dataset_version, work / "dataset")
    return check_export(Path(data_yaml))


def find_production(registry: ModelRegistry, channel: str) -> Production | None:
    """The version ``channel`` serves, with its artifact and (when stored) its training checkpoint."""
    version = registry.current(channel)
    if version is None:
        return None
    record = registry.get(version)
    try:
        checkpoint: Path | None = registry.checkpoint_path(version)
    except UnknownVersionError:
        checkpoint = None
    return Production(
        version=version,
        onnx=registry.artifact_path(version),
        checkpoint=checkpoint,
        class_names=list(record.class_names),
        dataset_version=record.dataset_version,
    )


def start_for(config: FlowsConfig, data_yaml: Path, production: Production | None) -> Path:
    """Where training starts: production's checkpoint when its classes are the data set's (:func:`starting_point`)."""
    names = read_data_yaml(data_yaml).names
    checkpoint = None
    if production is not None and production.checkpoint is not None:
        if production.class_names == names:
            checkpoint = production.checkpoint
        else:
            logger.warning(
                "production %s has classes %s, the data set %s: starting from the base checkpoint",
                production.version,
                production.class_names,
                names,
            )
    return starting_point(config.training, checkpoint)


def train_candidate(config: FlowsConfig, data_yaml: Path, work: Path, production: Production | None) -> TrainResult:
    """Train on the whole dataset version, from :func:`start_for`.

    Raises:
        flows.training.trainer.TrainingError: training failed.
    """
    start = start_for(config, data_yaml, production)
    logger.info("training a candidate from %s", start)
    return train_with_config(data_yaml, work / "train", config.training, start=start, state_dir=work / "state")


def export_candidate(config: FlowsConfig, trained: TrainResult, data_yaml: Path, work: Path) -> CandidateFiles:
    """Export the best checkpoint to ONNX (and int8 when configured), each prepared as a release."""
    from server.registry.prepare import prepare_model

    spec = read_data_yaml(data_yaml)
    train_images = spec.splits["train"]
    raw = export_onnx(trained.best, work / "export" / "float-raw.onnx", imgsz=config.training.imgsz)
    float_onnx = work / "export" / "model.onnx"
    prepare_model(raw, float_onnx, train_images)
    int8_onnx = None
    if config.export.int8:
        from flows.training.quantize import calibration_images, quantize_int8

        images = calibration_images(train_images, config.export.calibration_images)
        int8_raw = quantize_int8(raw, work / "export" / "int8-raw.onnx", images)
        int8_onnx = work / "export" / "model-int8.onnx"
        prepare_model(int8_raw, int8_onnx, train_images)  # reference statistics of the model that ships
    return CandidateFiles(
        checkpoint=trained.best,
        float_onnx=float_onnx,
        int8_onnx=int8_onnx,
        shipped=int8_onnx or float_onnx,
        start=trained.start or Path(),
    )


def evaluate_candidate(
    config: FlowsConfig, files: CandidateFiles, data_yaml: Path, production: Production | None
) -> Evaluations:
    """The shipped candidate and production on the frozen test split; the candidate on val and (part of) train."""
    threads = config.evaluation.threads
    candidate = evaluate_onnx(files.shipped, data_yaml, "test", threads=threads)
    prod = evaluate_onnx(production.onnx, data_yaml, "test", threads=threads) if production else None
    val = evaluate_onnx(files.shipped, data_yaml, "val", threads=threads)
    train = None
    if config.evaluation.train_images:
        train = evaluate_onnx(
            files.shipped, data_yaml, "train", threads=threads, max_images=config.evaluation.train_images
        )
    return Evaluations(candidate=candidate, production=prod, train=train, val=val)


def check_leaks(
    config: FlowsConfig, data_yaml: Path, production: Production | None, files: CandidateFiles
) -> LeakReport:
    """Leaks between the train and test splits the candidate learnt from and is scored on.

    Near-duplicates are judged in production's embedding space (the curation model, which split the
    version's episodes), or the candidate's for a project's first model.
    """
    model = production.onnx if production is not None else files.shipped
    return leaks_in_export(data_yaml, model, config.gate.near_duplicates)


def gate_candidate(config: FlowsConfig, evaluations: Evaluations, leaks: LeakReport | None = None) -> GateDecision:
    return decide(evaluations.candidate, evaluations.production, config.gate, leaks)


def report(config: FlowsConfig, trained: TrainResult, evaluations: Evaluations, work: Path) -> TrainingReport:
    """The training report (curves, overfitting, bias/variance) with its plots under ``work/report``."""
    return training_report(
        trained.results_csv,
        train=evaluations.train,
        val=evaluations.val,
        test=evaluations.candidate,
        target=config.evaluation.target_map50_95,
        plots_dir=work / "report",
    )


def register_candidate(
    registry: ModelRegistry,
    config: FlowsConfig,
    files: CandidateFiles,
    evaluations: Evaluations,
    decision: GateDecision,
    *,
    dataset_version: str,
    production: Production | None,
    run_id: str,
) -> ModelVersion:
    """Publish the shipped ONNX with its checkpoint and lineage; rejected (with the reason) when the gate said no."""
    metrics = evaluations.candidate.metrics()
    if evaluations.production is not None:
        metrics["production_map50_95"] = evaluations.production.map50_95
    params: dict[str, Any] = {
        "training": config.training.lineage(),
        "started_from": str(files.start),
        "int8": files.int8_onnx is not None,
        "gate": decision.to_dict(),
    }
    return registry.publish(
        files.shipped,
        parent=production.version if production else None,
        dataset_version=dataset_version,
        params=params,
        metrics=metrics,
        notes=f"gate: {decision.reason}",
        checkpoint=files.checkpoint,
        flow_run_id=run_id,
        rejected="" if decision.promote else f"gate: {decision.reason}",
    )


def release_candidate(
    registry: ModelRegistry,
    config: FlowsConfig,
    version: str,
    *,
    fleet: Callable[[], Mapping[str, FleetEntryLike]] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> RolloutResult:
    """Release to canary (or straight to stable), then follow the canary devices until stable, rollback or timeout.

    ``fleet`` reads every device's latest heartbeat; default :func:`server.ingest.heartbeats.read_fleet`
    over ``server_data_dir``.
    """
    policy = config.rollout
    channel = release_to_canary(registry, version, policy)
    if channel == policy.stable_channel:
        return RolloutResult(version, "stable", "released straight to stable (rollout.straight_to_stable)")
    if fleet is None:
        from server.ingest.heartbeats import read_fleet

        data_dir = Path(config.server_data_dir)

        def fleet() -> Mapping[str, FleetEntryLike]:
            return read_fleet(data_dir)

    kwargs: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
    return watch_canary(registry, version, policy, fleet, **kwargs)


@dataclass(frozen=True)
class RetrainOutcome:
    """What one retraining did: the version registered, the gate's decision, the rollout (when promoted)."""

    version: str
    decision: GateDecision
    evaluations: Evaluations
    report: TrainingReport | None
    rollout: RolloutResult | None


def run_retrain(
    config: FlowsConfig,
    curation: Curation,
    dataset_version: str,
    *,
    run_id: str,
    fleet: Callable[[], Mapping[str, FleetEntryLike]] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> RetrainOutcome:
    """Every step in order, without an orchestrator (the ``retrain`` flow runs the same steps as tasks)."""
    work = run_dir(config, run_id)
    registry = open_registry(config)
    data_yaml = export_dataset(curation, dataset_version, work)
    production = find_production(registry, config.rollout.stable_channel)
    trained = train_candidate(config, data_yaml, work, production)
    files = export_candidate(config, trained, data_yaml, work)
    evaluations = evaluate_candidate(config, files, data_yaml, production)
    training = report(config, trained, evaluations, work)
    decision = gate_candidate(config, evaluations, check_leaks(config, data_yaml, production, files))
    record = register_candidate(
        registry,
        config,
        files,
        evaluations,
        decision,
        dataset_version=dataset_version,
        production=production,
        run_id=run_id,
    )
    rollout = None
    if decision.promote:
        rollout = release_candidate(registry, config, record.version, fleet=fleet, sleep=sleep)
    return RetrainOutcome(record.version, decision, evaluations, training, rollout)


__all__ = [
    "CandidateFiles",
    "RetrainOutcome",
    "Evaluations",
    "Production",
    "check_leaks",
    "evaluate_candidate",
    "export_candidate",
    "export_dataset",
    "find_production",
    "gate_candidate",
    "register_candidate",
    "release_candidate",
    "report",
    "run_retrain",
    "start_for",
    "train_candidate",
]
