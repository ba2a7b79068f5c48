"""The flows' configuration: one YAML file (``edgeloop flows serve --config flows.yaml``) plus
environment overrides with the prefix ``EDGELOOP_FLOWS`` (``EDGELOOP_FLOWS__TRAINING__EPOCHS=30``).

Every section is defined beside the code it configures (training, gate, rollout, curation); this
module assembles them and adds the flows' own knobs: where they work, when the scheduled flows
run, which work pools the deployments go to. Relative paths in the file are taken from its folder.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from edgeloop.config_base import StrictModel, load_config
from flows.curation import CurationConfig
from flows.training.config import TrainingConfig
from flows.training.gate import GateConfig
from server.registry.rollout import RolloutPolicy
from server.registry.store import RegistryConfig

ENV_PREFIX = "EDGELOOP_FLOWS"


class ExportConfig(StrictModel):
    """What the retrain flow ships."""

    int8: bool = Field(
        False,
        description="Ship an ONNX Runtime static int8 model (CPU devices; TensorRT devices need float): it is what "
        "the gate evaluates and what ships.",
    )
    calibration_images: int = Field(
        200, ge=1, le=5000, description="Training images the int8 quantization is calibrated on (at most)."
    )


class EvaluationConfig(StrictModel):
    """How candidate and production are measured."""

    train_images: int = Field(
        200,
        ge=0,
        description="Training images evaluated to read the train/val gap (0: skip; the report then "
        "cannot separate bias from variance).",
    )
    target_map50_95: float = Field(
        0.5, ge=0.0, le=1.0, description="The mAP50-95 the report reads avoidable bias against."
    )
    threads: int | None = Field(None, ge=1, description="ONNX Runtime threads during evaluation (None: all cores).")


class CurateConfig(StrictModel):
    """The scheduled ``curate`` flow."""

    min_new_frames: int = Field(30, ge=1, description="New inbox frames that make a review batch worthwhile.")
    interval_s: int = Field(900, ge=60, description="How often it runs when served or deployed.")


class TriggerConfig(StrictModel):
    """The scheduled ``trigger`` flow."""

    min_new_samples: int = Field(
        30, ge=1, description="Samples the production model was not trained on that justify a retraining."
    )
    interval_s: int = Field(3600, ge=60, description="How often it runs when served or deployed.")


class TuneConfig(StrictModel):
    """The on-demand ``tune`` flow: random search on a log scale."""

    trials: int = Field(4, ge=1, le=100, description="Trainings to run.")
    epochs: int | None = Field(None, ge=1, description="Epochs per trial (default: training.epochs).")
    lr0_range: tuple[float, float] = Field((1e-4, 1e-1), description="Learning rate range, sampled log-uniformly.")
    momentum_range: tuple[float, float] = Field(
        (0.8, 0.99), description="Momentum range; 1 - momentum is sampled log-uniformly (0.9 to 0.99 matters)."
    )
    seed: int = Field(0, ge=0, description="Seed of the search.")


class PoolsConfig(StrictModel):
    """Prefect work pools of ``edgeloop flows deploy``."""

    gpu: str = Field("edgeloop-gpu", description="Work pool of retrain and tune (training needs a GPU worker).")
    light: str = Field("edgeloop-light", description="Work pool of curate and trigger (CPU, little memory).")
    type: str = Field("process", description="Pool type created when a pool is missing: process, docker, kubernetes.")


class FlowsConfig(StrictModel):
    """Everything the flows need to know."""

    work_dir: Path = Field(Path(".edgeloop/flows"), description="Where runs keep datasets, checkpoints and exports.")
    server_data_dir: Path = Field(
        Path(".edgeloop/server"), description="The server's data_dir: the canary watch reads heartbeats there."
    )
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="The model registry.")
    curation: CurationConfig = Field(default_factory=CurationConfig, description="Where dataset versions come from.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="How candidates are trained.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="What ships.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="How models are measured.")
    gate: GateConfig = Field(default_factory=GateConfig, description="When a candidate may replace production.")
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy, description="Canary first, then stable.")
    curate: CurateConfig = Field(default_factory=CurateConfig, description="The curate flow.")
    trigger: TriggerConfig = Field(default_factory=TriggerConfig, description="The trigger flow.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="The tune flow.")
    pools: PoolsConfig = Field(default_factory=PoolsConfig, description="Work pools for `edgeloop flows deploy`.")


def load_flows_config(path: str | Path | None) -> FlowsConfig:
    """The flows' config from ``path`` (None: defaults) plus ``EDGELOOP_FLOWS__...`` overrides.

    Raises:
        edgeloop.config_base.ConfigError: unreadable file or an invalid field (named in the message).
    """
    config = load_config(FlowsConfig, path, env_prefix=ENV_PREFIX)
    root = config.curation.options.get("root")
    if path is not None and isinstance(root, str) and not Path(root).is_absolute():
        # Like every path in the file, the directory provider's root means "next to this file".
        config.curation.options["root"] = str(Path(path).resolve().parent / root)
    return config


__all__ = ["ENV_PREFIX", "ExportConfig", "FlowsConfig", "load_flows_config"]
