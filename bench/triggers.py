"""Benchmark: do the edge agent's triggers find the frames where its model is wrong?

    .venv/bin/python bench/triggers.py [--clips 12] [--clip-frames 50] [--epochs 15] [--json out.json]
                                       [--write docs/benchmarks.md]

A detector is fine-tuned (from ../shared/models/yolov8n_coco_dequant.pt) on the synthetic
``shapes`` scenario, exported to ONNX with its image embedding and reference statistics, as a
release would be (cached in ``--workdir``). Then synthetic camera streams with known truth are
played through the agent's own detector and scorer (``stream=True``, default trigger settings):

* one stream per scenario: the training world (``shapes``), each shifted world, and ``blind``
  (a shift so strong that the model detects almost nothing);
* camera-like mixed streams: the training world with episodes of one shifted world (about one clip
  in eight), what a fleet camera shows when its world changes now and then.

A stream is ``--clips`` clips of ``--clip-frames`` frames, each clip a fixed camera watching objects
move (the frames of all cameras are ranked together, as the server sees a fleet). A frame holds a
detection error when a prediction (confidence at or above the confidence band's low edge, the
operating point) has no same-class ground-truth box at IoU 0.5 (false positive), or a labelled
object has no prediction (miss).

Reported per stream: share of frames with an error; recall of the error frames when the agent
keeps the top 5% by score (the upload budget), against the 5% that random selection keeps, and
the best any ranking could do at 5% (``ceiling``); precision of those 5%; the ranking's ROC-AUC
for "frame has an error". Per trigger: how often it fires on error frames and on clean ones, and
which error kinds the frames it fires on hold. The cost of the new evidence (weak candidates,
embedding) is timed beside inference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig  # noqa: E402
from edge_agent.triggers import Trigger, TriggersConfig, UncertaintyScorer  # noqa: E402
from edgeloop.matching import frame_errors  # noqa: E402
from edgeloop.synth.scenarios import get_scenario  # noqa: E402
from edgeloop.synth.scenes import SceneParams, iter_video_frames, write_dataset  # noqa: E402

SHARED = ROOT.parent / "shared"
BASE_PT = SHARED / "models" / "yolov8n_coco_dequant.pt"
BUDGET = 0.05
TRAIN_SCENARIO = "shapes"
SHIFTED = ["shapes-night", "shapes-blur", "shapes-shifted", "shapes-crowded"]
BLIND = "blind"


def blind_scenario() -> SceneParams:
    """A world the model was not trained for at all: dark, hollow or striped shapes, small, on stripes."""
    return get_scenario("shapes-shifted").updated(
        backgrounds=["stripes", "dark"],
        appearances=["outline"],
        object_scale=(0.04, 0.09),
        brightness_gain=0.5,
        noise_sigma=8.0,
    )


def scenario(name: str) -> SceneParams:
    return blind_scenario() if name == BLIND else get_scenario(name)


# ------------------------------------------------------------------------------------- the model


def build_model(workdir: Path, *, epochs: int, imgsz: int, n_train: int, seed: int) -> Path:
    """The release the camera runs: fine-tuned on ``shapes``, ONNX with embedding and reference (cached)."""
    from flows.training.trainer import export_onnx, train
    from server.registry.prepare import prepare_model

    tag = f"shapes-n{n_train}-e{epochs}-s{imgsz}-seed{seed}"
    release = workdir / f"{tag}.onnx"
    if release.is_file():
        return release
    data = workdir / f"data-{tag}"
    if not (data / "data.yaml").is_file():
        write_dataset(data, get_scenario(TRAIN_SCENARIO), n=n_train, seed=seed, val_fraction=0.2)
    result = train(data / "data.yaml", workdir / f"run-{tag}", base=BASE_PT, epochs=epochs, imgsz=imgsz, seed=seed)
    raw = export_onnx(result.best, workdir / f"{tag}-raw.onnx", imgsz=imgsz)
    prepare_model(raw, release, [data / "images" / "train"])
    return release


# ----------------------------------------------------------------------------------- the streams


def stream_clips(kind: str, clips: int, seed: int) -> list[tuple[str, int]]:
    """``(scenario, clip seed)`` per clip: one scenario, or ``mixed:<shift>`` (every 8th clip shifted)."""
    if kind.startswith("mixed:"):
        shift = kind.split(":", 1)[1]
        return [(shift if i % 8 == 5 else TRAIN_SCENARIO, seed * 1000 + i) for i in range(clips)]
    return [(kind, seed * 1000 + i) for i in range(clips)]


@dataclass
class FrameResult:
    scenario: str
    error: bool
    kinds: set[str]
    score: float
    triggers: dict[str, float]
    kept: bool  # the agent's own keep decision (min_score), before any upload budget
    predictions: int


@dataclass
class Timing:
    """Seconds per frame: the streams' detect_all and scoring, and the cost comparison of measure_costs."""

    detect_all: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    costs: dict[str, list[float]] = field(default_factory=dict)


def play(
    kind: str,
    detector: OnnxRuntimeDetector,
    config: TriggersConfig,
    *,
    clips: int,
    clip_frames: int,
    seed: int,
    timing: Timing,
) -> list[FrameResult]:
    scorer = UncertaintyScorer(config, seed=seed)
    low = config.confidence_band.low
    results: list[FrameResult] = []
    t = 0.0
    for clip, (name, clip_seed) in enumerate(stream_clips(kind, clips, seed)):
        params = scenario(name)
        camera = f"cam-{clip}"  # each clip is its own fixed camera: no cut inside one camera's stream
        for scene in iter_video_frames(params, clip_frames, clip_seed):
            image = scene.image
            h, w = image.shape[:2]
            t0 = time.perf_counter()
            out = detector.detect_all(image)
            t1 = time.perf_counter()
            timing.detect_all.append(t1 - t0)
            verdict = scorer.score(
                camera,
                out.detections,
                t,
                image_size=(w, h),
                class_names=detector.class_names,
                weak=out.weak,
                embedding=out.embedding,
                reference=detector.reference,
                stream=True,
            )
            timing.score.append(time.perf_counter() - t1)
            t += 0.1
            truth = [(lab.class_id, lab.to_xyxy(w, h)) for lab in scene.labels]
            preds = [d for d in out.detections if d.confidence >= low]
            kinds = frame_errors(preds, truth)
            reasons = {r.trigger: r.score for r in verdict.reasons if r.trigger != Trigger.RANDOM}
            results.append(FrameResult(name, bool(kinds), kinds, verdict.score, reasons, verdict.keep, len(preds)))
    return results


def measure_costs(release: Path, frames: list[np.ndarray], timing: Timing, rounds: int = 3) -> None:
    """What the new evidence costs per frame, on the same frames, variants alternating (noise hits all).

    * ``detect``: the export without the embedding output, weak candidates off (what the agent did before);
    * ``+ weak candidates``: the same model, weak candidates on;
    * ``+ embedding``: the release (embedding output), weak candidates on: what the agent runs now;
    * ``image_novelty``: that trigger alone on the release's embeddings; ``all triggers``: every trigger.
    """
    raw = release.with_name(release.stem + "-raw.onnx")
    plain = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=raw if raw.is_file() else release, weak_threshold=0))
    weak = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=raw if raw.is_file() else release))
    full = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=release))
    only_image = TriggersConfig.model_validate({t.value: {"enabled": t == Trigger.IMAGE_NOVELTY} for t in Trigger})
    everything = TriggersConfig.model_validate({"random": {"enabled": False}})
    outputs = [full.detect_all(f) for f in frames]
    costs = timing.costs
    for _ in range(rounds):
        for name, run in (
            ("detect", lambda f: plain.detect(f)),
            ("+ weak candidates", lambda f: weak.detect_all(f)),
            ("+ embedding", lambda f: full.detect_all(f)),
        ):
            for f in frames:
                t0 = time.perf_counter()
                run(f)
                costs.setdefault(name, []).append(time.perf_counter() - t0)
        for name, config in (("image_novelty", only_image), ("all triggers", everything)):
            scorer = UncertaintyScorer(config, seed=0)
            for i, out in enumerate(outputs):
                t0 = time.perf_counter()
                scorer.score(
                    "cam", out.detections, i * 0.1, image_size=(frames[i].shape[1], frames[i].shape[0]),
                    weak=out.weak, embedding=out.embedding, reference=full.reference,
                )  # fmt: skip
                costs.setdefault(name, []).append(time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ statistics


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """Mann-Whitney AUC with ties counted half; None when one class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def top_share(results: list[FrameResult], budget: float) -> list[FrameResult]:
    """The ``budget`` share of frames with the highest scores (ties broken by stream order, as a queue would)."""
    k = max(1, round(budget * len(results)))
    order = sorted(range(len(results)), key=lambda i: (-results[i].score, i))
    return [results[i] for i in order[:k]]


def summarise(results: list[FrameResult]) -> dict:
    errors = [r for r in results if r.error]
    kept = top_share(results, BUDGET)
    k = len(kept)
    caught = sum(r.error for r in kept)
    # R-precision: recall when the budget equals the error share (what a perfect ranking fills exactly).
    r_top = top_share(results, len(errors) / len(results)) if errors else []
    blind_errors = [r for r in errors if r.predictions == 0]
    per_trigger: dict[str, dict] = {}
    names = sorted({t for r in results for t in r.triggers})
    for name in names:
        fired = [r for r in results if name in r.triggers]
        kinds = Counter(k for r in fired for k in r.kinds)
        per_trigger[name] = {
            "fires_on_error_frames": sum(r.error for r in fired) / max(len(errors), 1),
            "fires_on_clean_frames": sum(not r.error for r in fired) / max(len(results) - len(errors), 1),
            "precision": sum(r.error for r in fired) / max(len(fired), 1),
            "fired": len(fired),
            "error_kinds": dict(kinds),
            "auc": roc_auc([r.triggers.get(name, 0.0) for r in results], [r.error for r in results]),
        }
    return {
        "frames": len(results),
        "error_frames": len(errors),
        "error_share": len(errors) / len(results),
        "kept": k,
        "recall_at_budget": caught / max(len(errors), 1),
        "random_recall": k / len(results),
        "ceiling": min(1.0, k / max(len(errors), 1)),
        "precision_at_budget": caught / k,
        "auc": roc_auc([r.score for r in results], [r.error for r in results]),
        "r_precision": sum(r.error for r in r_top) / max(len(errors), 1),
        "error_frames_kept": sum(r.kept for r in errors) / max(len(errors), 1),
        "clean_frames_kept": sum(r.kept for r in results if not r.error) / max(len(results) - len(errors), 1),
        "zero_detection_error_frames": len(blind_errors),
        "zero_detection_error_frames_kept": sum(r.kept for r in blind_errors) / max(len(blind_errors), 1),
        "triggers": per_trigger,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render(summaries: dict[str, dict], timing: Timing, args: argparse.Namespace, model: Path) -> str:
    lines = [
        f"### Trigger recall on synthetic streams ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python bench/triggers.py --clips {args.clips} --clip-frames {args.clip_frames} --epochs {args.epochs}` "
        f"on {platform.machine()}, {platform.python_version()}. Model: YOLOv8n fine-tuned on `shapes` "
        f"({args.n_train} images, {args.epochs} epochs, imgsz {args.imgsz}), with embedding and reference "
        f"statistics (`{model.name}`). Default trigger settings; budget = top {BUDGET:.0%} of frames by score. "
        "Random selection's expected recall equals the budget share.",
        "",
        "| stream | frames | error frames | recall @5% | random | ceiling | precision @5% | "
        "R-precision | ROC-AUC | kept: error / clean frames | zero-detection error frames kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {s['frames']} | {s['error_frames']} ({_pct(s['error_share'])}) | "
            f"**{_pct(s['recall_at_budget'])}** | {_pct(s['random_recall'])} | {_pct(s['ceiling'])} | "
            f"{_pct(s['precision_at_budget'])} | {_pct(s['r_precision'])} | {_f(s['auc'])} | "
            f"{_pct(s['error_frames_kept'])} / {_pct(s['clean_frames_kept'])} | "
            f"{_pct(s['zero_detection_error_frames_kept'])} of {s['zero_detection_error_frames']} |"
        )
    lines += [
        "",
        "Per trigger, over all streams (share of error frames / clean frames it fires on; precision; "
        "AUC of its own score; error kinds of the frames it fires on):",
        "",
        "| trigger | fires on error frames | fires on clean frames | precision | AUC | fp / miss |",
        "|---|---|---|---|---|---|",
    ]
    everything = summaries.get("_all", {}).get("triggers", {})
    for name, t in everything.items():
        kinds = t["error_kinds"]
        lines.append(
            f"| {name} | {_pct(t['fires_on_error_frames'])} | {_pct(t['fires_on_clean_frames'])} | "
            f"{_pct(t['precision'])} | {_f(t['auc'])} | {kinds.get('fp', 0)} / {kinds.get('miss', 0)} |"
        )
    cost = {k: statistics.median(v) * 1000 for k, v in timing.costs.items()}
    base = cost.get("detect", float("nan"))
    lines += [
        "",
        "Cost per frame on the same 60 frames, variants alternating, 3 rounds (median, ms; ratio to detect):",
        "",
        "| step | ms | vs detect |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} | {v / base:.3f} |" for k, v in cost.items()]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".edgeloop" / "bench-triggers")
    parser.add_argument("--model", type=Path, help="Use this release (ONNX with embedding) instead of training one.")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--clip-frames", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--streams", nargs="*", help="Only these streams (default: all).")
    parser.add_argument("--json", type=Path, help="Write every number (and per-frame results) here.")
    parser.add_argument("--write", type=Path, help="Append the markdown table to this file (docs/benchmarks.md).")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(args.workdir, epochs=args.epochs, imgsz=args.imgsz, n_train=args.n_train, seed=0)
    detector = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=model))
    config = TriggersConfig.model_validate({"random": {"enabled": False}})
    kinds = args.streams or [TRAIN_SCENARIO, *SHIFTED, BLIND, *(f"mixed:{s}" for s in [*SHIFTED, BLIND])]
    timing = Timing()
    per_stream: dict[str, list[FrameResult]] = {}
    for kind in kinds:
        t0 = time.monotonic()
        per_stream[kind] = play(
            kind, detector, config, clips=args.clips, clip_frames=args.clip_frames, seed=args.seed, timing=timing
        )
        print(f"[bench] {kind}: {len(per_stream[kind])} frames in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    sample = [s.image for name in ("shapes", "shapes-crowded") for s in iter_video_frames(scenario(name), 30, 1)]
    measure_costs(model, sample, timing)
    summaries = {name: summarise(res) for name, res in per_stream.items()}
    summaries["_all"] = summarise([r for res in per_stream.values() for r in res])
    table = render(
        {k: v for k, v in summaries.items() if k != "_all"} | {"_all": summaries["_all"]}, timing, args, model
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "summaries": summaries,
                    "frames": {
                        k: [
                            {
                                "scenario": r.scenario,
                                "error": r.error,
                                "kinds": sorted(r.kinds),
                                "score": r.score,
                                "triggers": r.triggers,
                            }
                            for r in v
                        ]
                        for k, v in per_stream.items()
                    },
                },
                indent=1,
            )
        )
    emit(table, args.write)


if __name__ == "__main__":
    main()
