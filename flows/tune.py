"""The on-demand ``tune`` flow: a few short trainings with learning rate and momentum drawn on a log
scale (:mod:`flows.training.tune`), best by val mAP50-95, reported as a table artifact.

It registers nothing: put the winning values in the flows' config (``training.lr0``,
``training.momentum``) for the next ``retrain``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import pipeline
from flows.config import load_flows_config
from flows.curation import load_curation
from flows.training.config import TrainingConfig
from flows.training.tune import Trial, best_trial, run_trial, sample_trials


@task(name="trial", cache_policy=NO_CACHE)
def trial(
    index: int, data_yaml: Path, work: Path, base: TrainingConfig, lr0: float, momentum: float, start: Path
) -> Trial:
    return run_trial(index, data_yaml, work, base, lr0, momentum, start)


@flow(name="tune", log_prints=True)
def tune(dataset_version: str, config: str | None = None, trials: int | None = None) -> dict[str, Any]:
    """Random search for lr0 and momentum on ``dataset_version``; returns the best values and every trial."""
    cfg = load_flows_config(config)
    log = get_run_logger()
    work = pipeline.run_dir(cfg, str(flow_run.get_id() or "local"))
    data_yaml = pipeline.export_dataset(load_curation(cfg.curation), dataset_version, work)
    production = pipeline.find_production(pipeline.open_registry(cfg), cfg.rollout.stable_channel)
    start = pipeline.start_for(cfg, data_yaml, production)
    base = cfg.training.model_copy(update={"epochs": cfg.tune.epochs or cfg.training.epochs})
    pairs = sample_trials(trials or cfg.tune.trials, cfg.tune.lr0_range, cfg.tune.momentum_range, cfg.tune.seed)
    results = [trial(i, data_yaml, work, base, lr0, m, start) for i, (lr0, m) in enumerate(pairs)]
    best = best_trial(results)
    create_table_artifact(
        key="tune-trials",
        table=[
            {
                "trial": t.index,
                "lr0": f"{t.lr0:.2e}",
                "momentum": round(t.momentum, 4),
                "val mAP50-95": round(t.val_map50_95, 4),
            }
            for t in results
        ],
        description=f"best: trial {best.index} (lr0 {best.lr0:.2e}, momentum {best.momentum:.4f})",
    )
    log.info("best: lr0 %.2e momentum %.4f (val mAP50-95 %.4f)", best.lr0, best.momentum, best.val_map50_95)
    return {
        "lr0": best.lr0,
        "momentum": best.momentum,
        "val_map50_95": best.val_map50_95,
        "trials": [{"lr0": t.lr0, "momentum": t.momentum, "val_map50_95": t.val_map50_95} for t in results],
    }


__all__ = ["tune"]
