"""``edgeloop demo``: the whole active-learning loop on one machine, round by round.

The story (synthetic by default; ``--data`` plays any YOLO data set the same way):

0. The first model (``v1``) is fine-tuned from the pretrained base checkpoint on world A's labelled
   images, imported into the training set as its first dataset version; it is trained by the
   ``retrain`` flow on the local Prefect server, gated, registered, signed and released. The
   cameras start: they watch world B, a domain shift the first model has never seen.
1. Each round: the agents keep the frames they are unsure of and upload them; curation picks a
   review batch of 30-50 (uncertainty x diversity, class balance, every camera); the **oracle**
   labels it from the scenes' known truth (in the demo no person labels: the report says so);
   the batch is approved into a new dataset version; the ``retrain`` flow fine-tunes the
   production model on the whole version, evaluates the ONNX the edge will run, gates it, and
   releases it canary-first; the canary camera swaps, its heartbeats say it is healthy, the
   version goes to stable and the other camera swaps too.
2. After each round the production model is scored on B's frozen test split, and the round goes
   into the report (``--report DIR``: report.json, report.md, map.png).

Everything runs as it would for a user: ``edgeloop server run``, ``edgeloop flows serve``,
``edgeloop agent run`` as processes with their own configs and logs under the work directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loop.oracle import Oracle
from loop.report import DemoReport, Gate, RoundReport
from loop.stack import Stack, StackSettings, clear_workdir
from loop.world import World, WorldSize, data_world, synthetic_world

logger = logging.getLogger(__name__)

#: How long one stage may take before the demo gives up with the part's log (2 cores, busy).
COLLECT_TIMEOUT_S = 600.0
RETRAIN_TIMEOUT_S = 1800.0
SWAP_TIMEOUT_S = 300.0
#: Unbatched frames to wait for per frame of the batch (near-duplicates of a scene are skipped).
CANDIDATES_PER_PICK = 3
#: After that, how long to let the cameras show more while the selection would still come up short
#: of a full batch (the class cap, near-duplicates: photo streams of a few common classes); then
#: the demo goes on with the shorter batch and says why.
FILL_TIMEOUT_S = 240.0
#: The counters of the agents' heartbeats the report sums per round.
COUNTERS = {
    "frames_seen": "frames_read",
    "frames_kept": "frames_kept",
    "frames_uploaded": "frames_uploaded",
    "bytes_uploaded": "bytes_uploaded",
}


class DemoError(RuntimeError):
    """The demo could not go on; the message says which part failed and where its log is."""


#: The gate's floor for the demo's first model on its own world (it reaches ~0.1 there).
FIRST_FLOOR = 0.05
#: With ``--data``: a first model from a fifth of a small data set's photos, in the demo's few CPU
#: epochs, scores near zero on photos it never saw (aquarium: 0.0019 mAP50-95 from 44 photos);
#: the floor only refuses a model that finds nothing, and every later round must beat the last.
FIRST_FLOOR_DATA = 0.001


@dataclass(frozen=True)
class DemoOptions:
    """What the user asked for (``edgeloop demo --help``)."""

    workdir: Path
    rounds: int
    quick: bool
    report_dir: Path | None
    data: Path | None
    open_app: bool
    base_checkpoint: Path

    def world_size(self) -> WorldSize:
        if self.quick:
            return WorldSize(train_a=80, frames_per_camera=400, test_b=40)
        return WorldSize()

    def stack_settings(self) -> StackSettings:
        floor = FIRST_FLOOR_DATA if self.data else FIRST_FLOOR
        if self.quick:
            return StackSettings(batch_size=30, epochs=8, first_epochs=12, healthy_for_s=6, app=self.open_app,
                                 first_floor=floor, base_checkpoint=self.base_checkpoint)  # fmt: skip
        # 10 epochs a round on up to 320 images at 320 px keep 3 rounds under 20 minutes on 2 cores (docs/benchmarks.md)
        return StackSettings(batch_size=40, epochs=10, first_epochs=16, healthy_for_s=10, app=True,
                             first_floor=floor, base_checkpoint=self.base_checkpoint)  # fmt: skip


Say = Callable[[str], None]


def _wait(cond: Callable[[], Any], timeout: float, what: str, poll: float = 1.0, *, required: bool = True) -> Any:
    """``cond()``'s first true value; at the deadline a DemoError, or the last value if not ``required``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            if not required:
                return value
            raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


class Loop:
    """The running demo: its stack, the curation and registry it drives, the report it writes."""

    def __init__(self, options: DemoOptions, say: Say) -> None:
        self.options = options
        self.say = say
        self.report: DemoReport | None = None
        self.stack: Stack | None = None
        self._totals: dict[str, int] = {}
        self._device_totals: dict[tuple[str, str], int] = {}

    # -- setup -------------------------------------------------------------------------------

    def _world(self) -> World:
        o = self.options
        root = o.workdir / "world"
        if o.data is not None:
            return data_world(o.data, root, o.world_size())
        return synthetic_world(root, o.world_size())

    def _connect(self) -> None:
        """This process's view of the server's state: FiftyOne on its database, curation, registry."""
        from server.config import load_server_config
        from server.curation.service import Curation
        from server.registry.store import ModelRegistry
        from server.store.mongo import MongoManager, configure_fiftyone

        cfg = load_server_config(self.stack.server_config)
        configure_fiftyone(MongoManager(cfg.mongo).ensure_running(), cfg.fiftyone_dir)
        self.server_cfg = cfg
        self.curation = Curation.from_server_config(cfg)
        self.registry = ModelRegistry(cfg.registry)

    # -- the rounds ------------------------------------------------------------------------------

    def run(self) -> DemoReport:
        o = self.options
        clear_workdir(o.workdir)
        t0 = time.monotonic()
        self.say(f"writing the world the cameras watch ({'--data ' + str(o.data) if o.data else 'synthetic'})")
        world = self._world()
        self.report = DemoReport(
            world=world.description,
            curator="an oracle that labels every frame from the scenes' known truth (no person labelled these)",
        )
        self.say(f"world ready in {time.monotonic() - t0:.0f} s: {world.description}")
        self.stack = Stack(o.workdir, world, o.stack_settings())
        try:
            t = time.monotonic()
            self.say("starting the stack: MQTT broker, edgeloop server (MongoDB, FiftyOne, gRPC, registry), "
                     "Prefect server, flows runner")  # fmt: skip
            self.stack.start_services()
            for note in self.stack.notes:
                self.say(f"note: {note}")
            self._connect()
            self.say(f"stack up in {time.monotonic() - t:.0f} s (Prefect UI {self.stack.prefect.url})")
            self._round_zero(world)
            for r in range(1, o.rounds + 1):
                self._round(r, world)
            self._finish()
            return self.report
        except BaseException:
            if self.stack is not None:
                self.stack.stop()
            raise

    def _write(self) -> None:
        if self.options.report_dir is not None and self.report is not None:
            self.report.write(self.options.report_dir)

    def _retrain(self, dataset_version: str, config: Path | None) -> tuple[str, Any]:
        from flows.client import start_retrain, wait_for_run

        run_id = start_retrain(dataset_version, config=str(config) if config else None)
        outcome = wait_for_run(run_id, RETRAIN_TIMEOUT_S)
        if not outcome.final or outcome.state != "Completed":
            flows = self.stack.processes["flows"]
            raise DemoError(
                f"the retrain run {run_id} on {dataset_version} ended {outcome.state}: {outcome.message}\n"
                f"flows runner log ({flows.log}):\n{flows.tail()}"
            )
        versions = [v for v in self.registry.list() if v.flow_run_id == run_id]
        if not versions:
            raise DemoError(f"the retrain run {run_id} completed but registered no version")
        return run_id, versions[-1]

    def _evaluate(self, version: str, world: World) -> Any:
        from flows.training.evaluate import evaluate_onnx

        return evaluate_onnx(self.registry.artifact_path(version), world.test_b, "test")

    def _counters(self) -> dict:
        """The round's share of the agents' cumulative counters (from their latest heartbeats), and
        each camera's keep share over the round (frames kept / frames scored)."""
        from server.ingest.heartbeats import read_fleet

        fleet = read_fleet(self.server_cfg.data_dir)
        per_device = {
            (dev, c): int(e.status.counters.get(c, 0))
            for dev, e in fleet.items()
            for c in ("frames_scored", "frames_kept")
        }
        now = {key: sum(int(e.status.counters.get(c, 0)) for e in fleet.values()) for key, c in COUNTERS.items()}
        delta = {k: max(0, v - self._totals.get(k, 0)) for k, v in now.items()}
        step = {k: max(0, v - self._device_totals.get(k, 0)) for k, v in per_device.items()}
        self._totals, self._device_totals = now, per_device
        keep = {
            dev: step[(dev, "frames_kept")] / step[(dev, "frames_scored")]
            for dev in fleet
            if step[(dev, "frames_scored")]
        }
        return {**delta, "keep_share": keep}

    def _edge_versions(self) -> dict[str, str]:
        from server.ingest.heartbeats import read_fleet

        fleet = read_fleet(self.server_cfg.data_dir)
        return {cam: fleet[cam].status.model_version for cam in self.stack.cameras if cam in fleet}

    def _wait_for_edge(self, version: str) -> dict[str, str]:
        def all_on_it() -> dict[str, str] | None:
            seen = self._edge_versions()
            return seen if len(seen) == len(self.stack.cameras) and set(seen.values()) == {version} else None

        try:
            return _wait(all_on_it, SWAP_TIMEOUT_S, f"every camera to report {version}", poll=1.0)
        except DemoError as err:
            logs = "\n".join(f"{p.name}: {p.log}" for n, p in self.stack.processes.items() if n.startswith("agent-"))
            raise DemoError(f"{err} (they report {self._edge_versions()}); agents' logs:\n{logs}") from err

    def _round_zero(self, world: World) -> None:
        from edgeloop.releases import public_key_pem

        seconds: dict[str, float] = {}
        t = time.monotonic()
        first = self.curation.import_labelled(world.first_training, name="world-a")
        seconds["import"] = time.monotonic() - t
        splits = ", ".join(f"{k} {n}" for k, n in first.counts.items())
        self.say(f"round 0: {first.id} = {first.size} labelled images of world A ({splits}; the model trains on "
                 f"the {first.counts.get('train', 0)} of train); training the first model (flow run `retrain` on "
                 "the Prefect server)")  # fmt: skip
        t = time.monotonic()
        run_id, v1 = self._retrain(first.id, self.stack.first_flows_config)
        seconds["retrain"] = time.monotonic() - t
        if v1.rejected:
            raise DemoError(f"the first model {v1.version} did not pass the gate: {v1.rejected}")
        self.registry.promote(v1.version, "canary")  # the canary camera starts on it too
        key = self.options.workdir / "release_key.pub.pem"
        key.write_bytes(public_key_pem(self.registry.public_key()))
        t = time.monotonic()
        self.stack.start_agents(self.registry.artifact_path(v1.version), key)
        edge = self._wait_for_edge(v1.version)
        seconds["cameras"] = time.monotonic() - t
        t = time.monotonic()
        score = self._evaluate(v1.version, world)
        seconds["evaluate"] = time.monotonic() - t
        self.report.rounds.append(
            RoundReport(
                round=0, batch_size=0, labels_total=first.size, dataset_version=first.id, model_version=v1.version,
                gate=Gate(True, "the first model clears the floor"), edge_model_version=edge, map50=score.map50,
                map50_95=score.map50_95, flow_run_id=run_id, seconds=seconds, **self._counters(),
            )
        )  # fmt: skip
        self._write()
        self.say(f"round 0: {v1.version} on every camera; world B test mAP50-95 {score.map50_95:.3f} "
                 f"(mAP50 {score.map50:.3f})")  # fmt: skip

    def _batch_fills(self, size: int) -> bool:
        """Whether the selection would fill a batch of ``size`` now (asked as a dry run)."""
        from server.curation.store import CurationError

        try:
            return len(self.curation.next_batch(size, dry_run=True).batch.sample_ids) >= size
        except CurationError:  # nothing to pick yet
            return False

    def _round(self, r: int, world: World) -> None:
        seconds: dict[str, float] = {}
        size = self.stack.settings.batch_size
        t = time.monotonic()
        # Consecutive frames of a scene are near-duplicates that curation skips: collect a margin.
        wanted = CANDIDATES_PER_PICK * size
        _wait(lambda: self.curation.unbatched_count() >= wanted, COLLECT_TIMEOUT_S, f"{wanted} uploaded frames", poll=2)
        _wait(lambda: self._batch_fills(size), FILL_TIMEOUT_S, "a full batch", poll=10, required=False)
        seconds["collect"] = time.monotonic() - t
        t = time.monotonic()
        result = self.curation.next_batch(size)
        batch = result.batch
        seconds["curate"] = time.monotonic() - t
        short = f" ({'; '.join(result.warnings)})" if result.warnings else ""
        self.say(f"round {r}: {batch.name} with {len(batch.sample_ids)} frames for review{short}")
        t = time.monotonic()
        labelled = label_batch(self.curation, batch.name, world.oracle, world.names)
        approval = self.curation.approve(batch.name)
        approved = approval.version
        seconds["label+approve"] = time.monotonic() - t
        held = f", {len(approval.held_out)} held out: their episode is in a full split" if approval.held_out else ""
        self.say(f"round {r}: the oracle labelled {labelled} frames ({len(approved.added)} added{held}) -> "
                 f"{approved.id} ({approved.size} images); retraining")  # fmt: skip
        t = time.monotonic()
        run_id, candidate = self._retrain(approved.id, None)
        seconds["retrain+rollout"] = time.monotonic() - t
        passed = not candidate.rejected
        t = time.monotonic()
        production = self.registry.current("stable")
        edge = self._wait_for_edge(production) if passed else self._edge_versions()
        seconds["swap"] = time.monotonic() - t
        t = time.monotonic()
        score = self._evaluate(production, world)
        seconds["evaluate"] = time.monotonic() - t
        self.report.rounds.append(
            RoundReport(
                round=r, batch_size=len(batch.sample_ids), labels_total=approved.size, dataset_version=approved.id,
                model_version=candidate.version,
                gate=Gate(passed, candidate.rejected or "beats production on the frozen test split"),
                edge_model_version=edge, map50=score.map50, map50_95=score.map50_95, flow_run_id=run_id,
                seconds=seconds, **self._counters(),
            )
        )  # fmt: skip
        self._write()
        verdict = f"{candidate.version} passed the gate, on every camera" if passed else (
            f"{candidate.version} rejected ({candidate.rejected}); {production} stays"
        )  # fmt: skip
        self.say(f"round {r}: {verdict}; world B test mAP50-95 {score.map50_95:.3f} (mAP50 {score.map50:.3f})")

    def _finish(self) -> None:
        stack = self.stack
        urls = {"Prefect UI": stack.prefect.url}
        if stack.app_url:
            urls["FiftyOne App"] = f"{stack.app_url}/datasets/edgeloop-demo-inbox"
        self.report.urls = urls
        self._write()
        stack.stop(keep_ui=self.options.open_app)


def label_batch(curation: Any, batch: str, oracle: Oracle, names: list[str]) -> int:
    """Play the curator: replace each frame's ``ground_truth`` by its truth, tag it approved; returns how many."""
    import fiftyone as fo

    from server.curation.review import APPROVED_TAG, GROUND_TRUTH

    view = curation.inbox.load_saved_view(batch)
    n = 0
    for sample in view.iter_samples(autosave=True):
        labels = oracle.labels(sample["source_id"], sample["source_name"])
        sample[GROUND_TRUTH] = fo.Detections(
            detections=[
                fo.Detection(
                    label=names[lab.class_id], bounding_box=[lab.cx - lab.w / 2, lab.cy - lab.h / 2, lab.w, lab.h]
                )
                for lab in labels
            ]
        )
        if APPROVED_TAG not in sample.tags:
            sample.tags.append(APPROVED_TAG)
        n += 1
    return n


def run_demo(options: DemoOptions, say: Say) -> Loop:
    """Run the demo; returns the finished loop: its ``report`` (also written to ``options.report_dir``),
    and with ``open_app`` its ``stack`` still serving the App and the Prefect UI (stop it with
    ``loop.stack.stop_services()``)."""
    loop = Loop(options, say)
    loop.run()
    return loop
