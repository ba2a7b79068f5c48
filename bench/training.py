"""Benchmark: what transfer learning and int8 quantization do on real photos.

    .venv/bin/python bench/training.py [--epochs 20] [--imgsz 320] [--batch 16] [--only transfer,int8]
                                       [--workdir .bench-training] [--json out.json] [--write docs/benchmarks.md]

Data: ``../shared/data/aquarium`` (Roboflow "Aquarium", CC BY 4.0: 224 train / 64 val / 32 test
photos, 7 classes), copied into ``--workdir`` so ultralytics' label caches land there and not in
``../shared``.

* ``transfer`` (the seeds' lecture table, on real photos): three YOLOv8n trainings with the same
  epochs, data, image size, batch, optimizer (SGD, lr0 0.01), augmentation (ultralytics' defaults)
  and seed, no early stopping: from scratch (``yolov8n.yaml``, random weights), from the COCO
  checkpoint with the backbone frozen (``freeze: 10``: only neck and head learn), and fully
  fine-tuned from the COCO checkpoint. Each best.pt (by val fitness) is exported to ONNX and
  scored on the test split by :func:`flows.training.evaluate.evaluate_onnx` (the edge agent's own
  detector code). Seconds per epoch are ultralytics' own (train + val).
* ``int8``: the fine-tuned model's float export against its ONNX Runtime static int8 quantization
  (:func:`flows.training.quantize.quantize_int8`, calibrated on the training photos), both
  prepared as a release is (embedding output and reference statistics): test mAP of each, and
  CPU latency through the edge agent's detector, batch 1, end to end (letterbox, ``session.run``,
  decode and NMS) and ``session.run`` alone, median over alternating rounds on the test photos.

Offline: ultralytics runs with :func:`edgeloop.offline.offline_environment`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from edgeloop.offline import offline_environment  # noqa: E402

SHARED = ROOT.parent / "shared"
AQUARIUM = SHARED / "data" / "aquarium"
BASE_PT = SHARED / "models" / "yolov8n_coco_dequant.pt"
RUNS = {
    "scratch": {"init": "scratch", "freeze": 0, "what": "from scratch (yolov8n.yaml, random weights)"},
    "frozen": {"init": "base", "freeze": 10, "what": "COCO checkpoint, backbone frozen (freeze 10)"},
    "finetune": {"init": "base", "freeze": 0, "what": "COCO checkpoint, fully fine-tuned"},
}
#: Latency rounds per model (alternating), each over every test photo.
LATENCY_ROUNDS = 5


def copy_aquarium(src: Path, dst: Path) -> Path:
    """A private copy of the aquarium photos and a data.yaml with an absolute path; returns the yaml."""
    import yaml

    for split in ("train", "valid", "test"):
        if not (dst / split).is_dir():
            shutil.copytree(src / split, dst / split)
    names = yaml.safe_load((src / "data.yaml").read_text())["names"]
    doc = {"path": str(dst), "train": "train/images", "val": "valid/images", "test": "test/images", "names": names}
    (dst / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst / "data.yaml"


def run_transfer(name: str, data_yaml: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from flows.training.config import TrainingConfig
    from flows.training.evaluate import evaluate_onnx
    from flows.training.report import read_results
    from flows.training.trainer import export_onnx, train_with_config

    cached = work / f"{name}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    spec = RUNS[name]
    config = TrainingConfig(
        init=spec["init"],
        base_checkpoint=BASE_PT,
        freeze=spec["freeze"],
        epochs=args.epochs,
        patience=0,
        imgsz=args.imgsz,
        batch=args.batch,
        device="cpu",
        seed=0,
    )
    t0 = time.monotonic()
    result = train_with_config(data_yaml, work / f"run-{name}", config, state_dir=work / "state")
    wall = time.monotonic() - t0
    onnx = export_onnx(result.best, work / f"{name}.onnx", imgsz=args.imgsz, state_dir=work / "state")
    test = evaluate_onnx(onnx, data_yaml, "test")
    epochs = read_results(result.results_csv)
    times = [e.time for e in epochs]
    per_epoch = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    out = {
        "run": name,
        "what": spec["what"],
        "epochs": len(epochs),
        "s_per_epoch": statistics.median(per_epoch) if per_epoch else 0.0,
        "wall_s": wall,
        "best_val_map50_95": max((e.map50_95 for e in epochs), default=0.0),
        "test_map50": test.map50,
        "test_map50_95": test.map50_95,
        "onnx": str(onnx),
    }
    cached.write_text(json.dumps(out, indent=2))
    return out


def latency(model: Path, images: list[Any]) -> tuple[float, float]:
    """(median end-to-end ms, median session.run ms) over ``images``, after a warm-up."""
    from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig

    detector = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=model))
    try:
        tensors = [detector.preprocess(image)[0] for image in images]
        for image in images[:3]:
            detector.detect_all(image)  # warm-up: arenas, first-run kernels
        e2e, infer = [], []
        for image, tensor in zip(images, tensors, strict=True):
            t0 = time.perf_counter()
            detector.detect_all(image)
            t1 = time.perf_counter()
            detector.infer_all(tensor)
            infer.append(time.perf_counter() - t1)
            e2e.append(t1 - t0)
    finally:
        detector.close()
    return statistics.median(e2e) * 1e3, statistics.median(infer) * 1e3


def run_int8(data_yaml: Path, work: Path, float_onnx: Path) -> dict[str, Any]:
    import cv2

    from flows.training.evaluate import evaluate_onnx, split_images
    from flows.training.quantize import calibration_images, quantize_int8
    from server.registry.prepare import prepare_model

    train_images = [data_yaml.parent / "train" / "images"]
    float_release = work / "float-release.onnx"
    prepare_model(float_onnx, float_release, train_images)
    t0 = time.monotonic()
    calibration = calibration_images(train_images)
    int8_raw = quantize_int8(float_onnx, work / "int8-raw.onnx", calibration)
    quant_s = time.monotonic() - t0
    int8_release = work / "int8-release.onnx"
    prepare_model(int8_raw, int8_release, train_images)
    images = [cv2.imread(str(p)) for p in split_images(data_yaml, "test")]
    rounds: dict[str, list[tuple[float, float]]] = {"float": [], "int8": []}
    for _ in range(LATENCY_ROUNDS):  # alternate, so load on the shared machine hits both alike
        rounds["float"].append(latency(float_release, images))
        rounds["int8"].append(latency(int8_release, images))
    rows = {}
    for name, model in (("float", float_release), ("int8", int8_release)):
        test = evaluate_onnx(model, data_yaml, "test")
        rows[name] = {
            "size_mb": model.stat().st_size / 1e6,
            "test_map50": test.map50,
            "test_map50_95": test.map50_95,
            "e2e_ms": statistics.median(r[0] for r in rounds[name]),
            "infer_ms": statistics.median(r[1] for r in rounds[name]),
        }
    return {"calibration_images": len(calibration), "quantize_s": quant_s, "models": rows}


def markdown(args: argparse.Namespace, transfer: list[dict[str, Any]], int8: dict[str, Any] | None) -> str:
    import onnxruntime
    import torch
    import ultralytics

    today = time.strftime("%Y-%m-%d")
    command = f"`bench/training.py --epochs {args.epochs} --imgsz {args.imgsz} --batch {args.batch}"
    command += f" --only {args.only}`" if args.only != "transfer,int8" else "`"
    lines = [
        f"### Transfer learning and int8 on real photos ({today})",
        "",
        f"{command}: {platform.machine()}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, "
        f"torch {torch.__version__}, ultralytics {ultralytics.__version__}, onnxruntime {onnxruntime.__version__}. "
        f"Aquarium photos (Roboflow, CC BY 4.0): 224 train / 64 val / 32 test, 7 classes. YOLOv8n, imgsz "
        f"{args.imgsz}, batch {args.batch}, {args.epochs} epochs, SGD lr0 0.01, default augmentation, seed 0, "
        "no early stopping; test metrics of the best-val checkpoint's ONNX export through the edge agent's detector.",
        "",
    ]
    if transfer:
        lines += [
            "| start | epochs | s/epoch | best val mAP50-95 | test mAP50 | test mAP50-95 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in transfer:
            lines.append(
                f"| {r['what']} | {r['epochs']} | {r['s_per_epoch']:.1f} | {r['best_val_map50_95']:.3f} | "
                f"{r['test_map50']:.3f} | {r['test_map50_95']:.3f} |"
            )
        lines.append("")
    if int8:
        f, q = int8["models"]["float"], int8["models"]["int8"]
        lines += [
            f"int8: ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations, MinMax "
            f"calibration on {int8['calibration_images']} training photos, {int8['quantize_s']:.0f} s; the head's "
            "decoding left in float) of the fine-tuned model. Both prepared as releases (embedding output, reference "
            f"statistics). Latency: the edge agent's ONNX Runtime detector, batch 1, ORT's default threads, median "
            f"of {LATENCY_ROUNDS} alternating rounds over the 32 test photos.",
            "",
            "| model | size MB | end-to-end ms | session.run ms | test mAP50 | test mAP50-95 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, row in (("float32", f), ("int8", q)):
            lines.append(
                f"| {name} | {row['size_mb']:.1f} | {row['e2e_ms']:.1f} | {row['infer_ms']:.1f} | "
                f"{row['test_map50']:.3f} | {row['test_map50_95']:.3f} |"
            )
        lines += [
            "",
            f"int8 vs float: {f['e2e_ms'] / q['e2e_ms']:.2f}x end to end, {f['infer_ms'] / q['infer_ms']:.2f}x "
            f"session.run; mAP50-95 {q['test_map50_95'] - f['test_map50_95']:+.3f}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--only", default="transfer,int8", help="Comma-separated: transfer, int8.")
    parser.add_argument("--data", type=Path, default=AQUARIUM)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench-training")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="Append the markdown table to this file.")
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(offline_environment(work / "state"))
    data_yaml = copy_aquarium(args.data, work / "data")

    transfer = [run_transfer(name, data_yaml, work, args) for name in RUNS] if "transfer" in only else []
    int8 = None
    if "int8" in only:
        finetune = run_transfer("finetune", data_yaml, work, args)
        int8 = run_int8(data_yaml, work, Path(finetune["onnx"]))
    if args.json:
        args.json.write_text(json.dumps({"transfer": transfer, "int8": int8}, indent=2))
    emit(markdown(args, transfer, int8), args.write)


if __name__ == "__main__":
    main()
