"""Curation's configuration: the ``curation:`` section of the server's YAML (``server.example.yaml``).

Every limit curation applies is here, with its reason in the field's description; the defaults are
the seeds' policy (batches of 30-50, val and test 10% each capped at 100, a frozen test split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edgeloop.config_base import StrictModel

#: The batch sizes the seeds recommend. Fewer frames and each retraining round adds too little to
#: move the model (and the class cap and device quotas have nothing to balance); more and a curator
#: can no longer review a batch in one sitting (~20-30 s a frame: 40 frames is 15-20 minutes), so
#: attention, and with it label quality, drops at the end of the batch.
MIN_BATCH = 30
MAX_BATCH = 50
WHY_30_TO_50 = (
    f"the seeds recommend {MIN_BATCH}-{MAX_BATCH} frames a batch: fewer add too little per retraining round "
    "for the class cap and device quotas to balance anything, more cannot be reviewed in one sitting "
    "(15-20 minutes), and label quality drops at the end of a long batch"
)


class CurationModelConfig(StrictModel):
    """The curation model: the one model whose embedding space curation compares frames in.

    Embeddings of different model versions are not comparable, so frames from devices running other
    versions get their embedding computed on the server with this model (and cached on the sample).
    """

    path: Path | None = Field(
        None,
        description="An ONNX model prepared with `edgeloop models prepare` (it has the `embedding` output). "
        "Unset: the registry's current release on `channel`.",
    )
    channel: str = Field("stable", min_length=1, description="Registry channel whose current release is used.")
    intra_op_threads: int = Field(
        1, ge=1, le=64, description="ONNX Runtime threads for server-side embeddings (leave cores to ingest)."
    )


class NearDuplicateConfig(StrictModel):
    """When two frames count as near-duplicates: both conditions must hold (see server.curation.duplicates)."""

    distance: float = Field(
        0.75,
        gt=0,
        le=10,
        description="Embedding distance below this many units of the curation model's reference q50 "
        "(the median distance between a training image and its nearest other training image).",
    )
    hash_bits: int = Field(
        12, ge=0, le=64, description="And 64-bit dHash of the two images differing in at most this many bits."
    )


class SplitConfig(StrictModel):
    """How approved samples are split: by episode, drawn at random per episode, reproducible from its id."""

    val_fraction: float = Field(0.1, ge=0, le=0.5, description="Share of new samples drawn for val.")
    test_fraction: float = Field(0.1, ge=0, le=0.5, description="Share of new samples drawn for test.")
    val_cap: int = Field(100, ge=0, description="Most samples in val; once full, new samples go to train.")
    test_cap: int = Field(
        100,
        ge=0,
        description="Most samples in test. Once full the test split is frozen: every later model version is "
        "scored on the same test set.",
    )
    seed: int = Field(0, ge=0, description="Seed of the per-episode draw (changing it changes future draws only).")
    episode_gap_s: float = Field(
        3.0,
        ge=0,
        le=3600,
        description="Frames of one camera captured at most this many seconds apart are one episode and share "
        "a split (as do near-duplicates and identical images): a scene seen a second apart in train and in "
        "test would score memory, not generalisation. 3 s joins the frames an agent keeps of one moment; "
        "0 links by near-duplicates and identical bytes only.",
    )

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave a share for train (sum below 1)")
        return self


class CurationConfig(StrictModel):
    """Review batches, approval into the training set, and dataset versions."""

    root: Path = Field(
        Path(".edgeloop/server/curation"),
        description="Curation's state: batch records, dataset versions, the approved images (content-addressed).",
    )
    training_dataset: str = Field(
        "edgeloop-train", min_length=1, description="The persistent FiftyOne dataset approved samples are copied to."
    )
    batch_size: int = Field(
        40, ge=MIN_BATCH, le=MAX_BATCH, description=f"Frames a batch; {MIN_BATCH}-{MAX_BATCH} as the seeds say."
    )
    class_cap: float = Field(
        0.4,
        gt=0,
        le=1,
        description="Share of a batch after which a predicted class stops earning a frame its place: a frame "
        "whose every class already fills this share waits for frames of other classes, and is taken when none "
        "is left (so a data set where every frame holds one dominant class still fills its batches).",
    )
    rare_class_bonus: float = Field(
        0.5,
        ge=0,
        le=10,
        description="How much more a frame whose rarest predicted class is the pool's rarest is worth than an "
        "equally uncertain frame of common classes only (1 + bonus; linear in between).",
    )
    device_share_cap: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Largest share of a batch one camera gets while others have candidates (shares follow need: "
        "each camera's frames among the pool's most uncertain).",
    )
    candidates_per_slot: float = Field(
        3.0,
        ge=1,
        le=100,
        description="Candidates per frame of a camera's share, by calibrated score: the set the batch then covers "
        "(more: more spread, less uncertainty).",
    )
    near_duplicates: NearDuplicateConfig = Field(
        default_factory=NearDuplicateConfig, description="Which frames are skipped as near-duplicates."
    )
    splits: SplitConfig = Field(default_factory=SplitConfig, description="Train/val/test policy.")
    untagged: Literal["exclude", "approve"] = Field(
        "exclude",
        description="What approving a batch does with samples tagged neither `approved` nor `reject`: "
        "`exclude` leaves them out of the training set (nothing enters without a curator's explicit "
        "approval), `approve` takes them in as reviewed.",
    )
    classes: list[str] | None = Field(
        None,
        description="Classes of the training set, in class-id order. Unset: the curation model's class names.",
    )
    model: CurationModelConfig = Field(
        default_factory=CurationModelConfig, description="Whose embedding space curation works in."
    )
