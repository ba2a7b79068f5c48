"""The scheduled ``curate`` flow: start a review batch once enough new inbox frames wait, and say so.

The batch itself is curation's business (the seam's ``next_batch``, which also marks it where
curators look, e.g. the FiftyOne dataset's info); the flow logs the outcome and leaves a markdown
artifact on its run, so the Prefect UI shows when batches were made.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.config import load_flows_config
from flows.curation import load_curation
from flows.decisions import curate_decision


@flow(name="curate", log_prints=True)
def curate(config: str | None = None) -> str | None:
    """Create a review batch when at least ``curate.min_new_frames`` new inbox frames wait; return its name."""
    cfg = load_flows_config(config)
    batch = curate_decision(load_curation(cfg.curation), min_new_frames=cfg.curate.min_new_frames)
    log = get_run_logger()
    if batch is None:
        log.info("fewer than %d new inbox frames: no review batch", cfg.curate.min_new_frames)
        return None
    log.info("review batch %s created: curators, it waits for you in the FiftyOne App", batch)
    create_markdown_artifact(
        key="curation-batch",
        markdown=f"# Review batch `{batch}`\n\nReady for the curators in the FiftyOne App.",
        description=f"review batch {batch}",
    )
    return batch


__all__ = ["curate"]
