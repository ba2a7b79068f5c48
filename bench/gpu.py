"""Benchmark: ultralytics training and inference on a GPU, against a CPU baseline measured in the same
run on the same machine.

    python3 bench/gpu.py [--epochs 20] [--cpu-epochs 1] [--imgsz 640] [--json PATH] [--write docs/benchmarks.md]

Hand-run on a machine with CUDA; inputs default to the folder ``.gpu/`` inside the repo (copies of
``../shared/data/aquarium``, ``../shared/models/yolov8n_coco_dequant.pt`` and
``../shared/models/yolov8n_int8.onnx``), because the GPU machine gets only the repo.

* Training: transfer learning from the COCO YOLOv8n weights on the aquarium photos (train 224 /
  val 64), batch 16, 8 workers, ``plots=False``, validation after every epoch (ultralytics'
  default). GPU: ``--epochs`` epochs; CPU: the same settings for ``--cpu-epochs`` epochs on
  ``device='cpu'``. Seconds per epoch are wall time from the start of an epoch to the end of its
  validation and checkpoint; the first epoch carries the warm-up (workers, cuDNN, allocator), so
  the GPU figure is the median of the later ones. ultralytics switches mosaic off for the last
  ``--close-mosaic`` epochs, which changes the data-loading cost, so the GPU-vs-CPU ratio compares
  epochs in the same mosaic state. mAP is ultralytics' final validation of best.pt on the val split.
* Inference, on the decoded val+test photos in memory (no disk, no JPEG decode in the timing):
  ultralytics + PyTorch on the GPU (``YOLO(pt).predict``: letterbox, model, NMS, boxes copied back
  to the host) at batch 1 in fp32 and fp16 and at batch 16 in fp16, against raw ONNX Runtime on
  the CPU with the int8 export of the same network at batch 1 (letterbox, ``session.run``, decode
  and class-aware NMS in numpy/OpenCV, as the edge agent does; ORT's default CPU threads).

Offline: ultralytics' environment comes from ``edgeloop.offline`` and is set before
ultralytics is imported; settings and weights live in a temporary state dir. The AMP check that
ultralytics runs before CUDA training loads ``yolo26n.pt`` from its weights dir and downloads it
when missing; this script puts the local COCO YOLOv8n checkpoint there under that name, so the
check runs for real (FP32 vs autocast predictions on ultralytics' bundled bus.jpg) with no
download. The CPU run passes ``amp=False`` (ultralytics never uses AMP on CPU). Any network use
that still happens is refused and counted (``network attempts`` in the report).

Needs no server code (no FiftyOne, MongoDB, pydantic). Where polars is not installed (ultralytics
imports it only to copy results.csv into each checkpoint, inside a try), a stand-in module makes
that copy fail softly; the checkpoint then has no results table, nothing else changes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from edgeloop.offline import offline_environment  # noqa: E402

TRAIN_BATCH = 16
TRAIN_WORKERS = 8
INFER_IMGSZ = 640
CONF, IOU, MAX_DET = 0.25, 0.7, 300  # ultralytics' predict defaults, used by both runtimes
PAD_VALUE = 114
MAP_KEYS = ("metrics/mAP50-95(B)", "metrics/mAP50(B)")

NETWORK_ATTEMPTS: list[str] = []
DOWNLOAD_ATTEMPTS: list[str] = []


# ---------------------------------------------------------------- offline guards


def guard_network() -> None:
    """Refuse (and record) every connection or name lookup that leaves the machine."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    local = {"localhost", "127.0.0.1", "::1", "", None}

    def getaddrinfo(host: Any, *a: Any, **k: Any) -> Any:
        if host not in local:
            NETWORK_ATTEMPTS.append(f"getaddrinfo {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"bench/gpu.py runs offline: lookup of {host} refused")
        return real_getaddrinfo(host, *a, **k)

    def allowed(sock: socket.socket, address: Any) -> bool:
        if sock.family == getattr(socket, "AF_UNIX", None):
            return True
        host = address[0] if isinstance(address, tuple) and address else address
        return host in local or str(host).startswith("127.")

    def connect(self: socket.socket, address: Any) -> Any:
        if not allowed(self, address):
            NETWORK_ATTEMPTS.append(f"connect {address}")
            raise ConnectionRefusedError(f"bench/gpu.py runs offline: connection to {address} refused")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        if not allowed(self, address):
            NETWORK_ATTEMPTS.append(f"connect {address}")
            raise ConnectionRefusedError(f"bench/gpu.py runs offline: connection to {address} refused")
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]


def stand_in_polars() -> bool:
    """Install a stand-in ``polars`` where the real one is missing; True if it was needed.

    ultralytics 8.4 imports polars at training time only in ``BaseTrainer.read_results_csv`` (to put
    results.csv into each checkpoint, inside ``try/except Exception``) and in plotting / W&B code that
    this benchmark does not reach (plots=False). Any use of the stand-in raises ModuleNotFoundError.
    """
    try:
        importlib.import_module("polars")
        return False
    except ImportError:
        pass
    mod = types.ModuleType("polars")
    mod.__doc__ = "Stand-in from bench/gpu.py: polars is not installed."

    def missing(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(f"polars is not installed (bench/gpu.py stand-in; polars.{name} used)")

    mod.__getattr__ = missing  # type: ignore[attr-defined]
    sys.modules["polars"] = mod
    return True


def prepare_ultralytics(state: Path, weights: Path) -> dict[str, Any]:
    """Offline environment, settings in ``state``, the AMP-check model in place; then import ultralytics."""
    env = offline_environment(state)
    os.environ.update(env)
    settings_dir = Path(env["YOLO_CONFIG_DIR"]) / "Ultralytics"
    settings_dir.mkdir(parents=True, exist_ok=True)
    weights_dir = state / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    # The AMP check (CUDA training with amp=True) runs YOLO(WEIGHTS_DIR / "yolo26n.pt") in FP32 and under
    # autocast and compares the boxes; any detection checkpoint serves. Without the file it would download it.
    amp_model = weights_dir / "yolo26n.pt"
    if not amp_model.exists():
        shutil.copy(weights, amp_model)
    # Settings file written before import, so WEIGHTS_DIR (read once, at import) points into the state dir
    # and nothing lands in the repo or ~/.config. Every key of the 0.0.8 schema, so no migration warning.
    import hashlib
    import uuid

    settings = {
        "settings_version": "0.0.8",
        "datasets_dir": str(state / "datasets"),
        "weights_dir": str(weights_dir),
        "runs_dir": str(state / "runs"),
        "uuid": hashlib.sha256(str(uuid.getnode()).encode()).hexdigest(),
        "sync": False,
        "api_key": "",
        "openai_api_key": "",
        "clearml": False,
        "comet": False,
        "dvc": False,
        "mlflow": False,
        "raytune": False,
        "tensorboard": False,
        "wandb": False,
        "vscode_msg": False,
        "openvino_msg": False,
    }
    (settings_dir / "settings.json").write_text(json.dumps(settings, indent=2))
    polars_stand_in = stand_in_polars()

    import ultralytics
    import ultralytics.utils.downloads as downloads

    real_safe_download = downloads.safe_download

    def safe_download(url: Any, *a: Any, **k: Any) -> Any:
        if "://" not in str(url) and Path(str(url)).is_file():
            return real_safe_download(url, *a, **k)
        DOWNLOAD_ATTEMPTS.append(str(url))
        raise ConnectionError(f"bench/gpu.py runs offline: download of {url} refused")

    downloads.safe_download = safe_download  # attempt_download_asset calls it through the module
    from ultralytics.utils import WEIGHTS_DIR

    return {
        "ultralytics": ultralytics.__version__,
        "polars_stand_in": polars_stand_in,
        "weights_dir": str(WEIGHTS_DIR),
        "amp_check_model_in_place": (Path(WEIGHTS_DIR) / "yolo26n.pt").is_file(),
    }


# ---------------------------------------------------------------- data


def staged_dataset(data: Path, work: Path) -> Path:
    """A data yaml with an absolute path, over per-file links to the photos and labels.

    ultralytics writes its label caches beside the labels; the links keep those caches in ``work``
    (the source folder may be read-only, and the copy in ``.gpu/`` should stay as shipped).
    """
    import yaml

    meta = yaml.safe_load((data / "data.yaml").read_text())
    root = work / "aquarium"
    for split in ("train", "valid", "test"):
        for kind in ("images", "labels"):
            src = data / split / kind
            if not src.is_dir():
                continue
            dst = root / split / kind
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted(src.iterdir()):
                target = dst / f.name
                if target.exists():
                    continue
                try:
                    target.symlink_to(f.resolve())
                except OSError:
                    shutil.copy(f, target)
    names = meta["names"]
    cfg = {
        "path": str(root),
        "train": "train/images",
        "val": "valid/images",
        "test": "test/images",
        "nc": len(names),
        "names": list(names.values()) if isinstance(names, dict) else list(names),
    }
    out = work / "aquarium.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def inference_images(data: Path) -> list[Any]:
    import cv2

    files = [p for split in ("valid", "test") for p in sorted((data / split / "images").iterdir())]
    images = [cv2.imread(str(p)) for p in files if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"}]
    return [im for im in images if im is not None]


# ---------------------------------------------------------------- training


def train(
    weights: Path,
    data_yaml: Path,
    device: str,
    epochs: int,
    args: argparse.Namespace,
    project: Path,
    name: str,
    amp: bool | str,
    workers: int = TRAIN_WORKERS,
) -> dict[str, Any]:
    import torch
    from ultralytics import YOLO

    model = YOLO(str(weights))
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    threads: list[int] = []

    def on_epoch_start(tr: Any) -> None:
        starts[tr.epoch] = time.perf_counter()  # an epoch restarted after OOM/NaN recovery starts again
        threads.append(torch.get_num_threads())  # ultralytics sets min(8, cores - 1) for CPU training

    def on_fit_epoch_end(tr: Any) -> None:
        # after validation and checkpoint; final_eval calls this again with epoch + 1 (no start: ignored)
        if tr.epoch in starts and tr.epoch not in ends:
            ends[tr.epoch] = time.perf_counter()

    model.add_callback("on_train_epoch_start", on_epoch_start)
    model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model.train(
        data=str(data_yaml),
        epochs=epochs,
        imgsz=args.imgsz,
        batch=TRAIN_BATCH,
        workers=workers,
        device=device,
        plots=False,
        amp=amp,
        fraction=args.fraction,
        close_mosaic=args.close_mosaic,
        project=str(project),
        name=name,
        exist_ok=True,
        verbose=False,
    )
    wall = time.perf_counter() - t0
    tr = model.trainer
    per_epoch = [ends[e] - starts[e] for e in sorted(ends)]
    metrics = dict(tr.metrics or {})
    mosaic_off_from = max(0, epochs - args.close_mosaic) if args.close_mosaic else epochs
    steady = per_epoch[1:] or per_epoch  # after the warm-up epoch (only epoch when there is one)
    no_mosaic = [t for e, t in enumerate(per_epoch) if e >= mosaic_off_from and (e > 0 or len(per_epoch) == 1)]
    mosaic = [t for e, t in enumerate(per_epoch) if e < mosaic_off_from and (e > 0 or len(per_epoch) == 1)]
    return {
        "device": device,
        "epochs": epochs,
        "imgsz": args.imgsz,
        "batch": TRAIN_BATCH,
        "workers_requested": workers,
        "workers": tr.train_loader.num_workers if getattr(tr, "train_loader", None) else None,
        "torch_threads": threads[-1] if threads else None,
        "gpu_peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "fraction": args.fraction,
        "train_images": len(tr.train_loader.dataset) if getattr(tr, "train_loader", None) else None,
        "amp_requested": amp,
        "amp_used": bool(tr.amp),
        "seconds_per_epoch": per_epoch,
        "first_epoch_s": per_epoch[0] if per_epoch else None,
        "median_epoch_s": statistics.median(steady) if steady else None,
        "mosaic_off_from_epoch": mosaic_off_from,
        "median_epoch_s_mosaic": statistics.median(mosaic) if mosaic else None,
        "median_epoch_s_no_mosaic": statistics.median(no_mosaic) if no_mosaic else None,
        "wall_s": wall,
        "map50_95": metrics.get(MAP_KEYS[0]),
        "map50": metrics.get(MAP_KEYS[1]),
        "best": str(tr.best) if Path(tr.best).exists() else None,
    }


# ---------------------------------------------------------------- inference


def timed(call: Any, batches: list[list[Any]], seconds: float, warmup: int, sync: Any) -> dict[str, Any]:
    """Run ``call`` over ``batches`` (cycling) for about ``seconds`` after ``warmup`` calls."""
    for b in (batches * warmup)[:warmup]:
        call(b)
    sync()
    lat: list[float] = []
    images = dets = 0
    i = 0
    t0 = time.perf_counter()
    while True:
        b = batches[i % len(batches)]
        t = time.perf_counter()
        dets += call(b)
        sync()  # per call: the boxes are on the host anyway, this only makes each latency honest
        lat.append(time.perf_counter() - t)
        images += len(b)
        i += 1
        if time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    return {
        "images": images,
        "calls": i,
        "seconds": elapsed,
        "images_per_s": images / elapsed,
        "ms_per_image": 1000 * elapsed / images,
        "p50_ms_per_call": 1000 * statistics.median(lat),
        "detections_per_image": dets / images,
    }


def torch_inference(
    weights: Path, images: list[Any], device: str, batch: int, fp16: bool, seconds: float
) -> dict[str, Any]:
    import torch
    from ultralytics import YOLO

    model = YOLO(str(weights))  # a fresh model per setting: precision is fixed at the predictor's setup
    quantize = 16 if fp16 else None

    def call(b: list[Any]) -> int:
        res = model.predict(b, imgsz=INFER_IMGSZ, device=device, quantize=quantize, batch=len(b), verbose=False)
        return sum(len(r.boxes.data.cpu()) for r in res)

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    out = timed(call, batches, seconds, warmup=3, sync=sync)
    backend = model.predictor.model
    out.update(
        runtime="ultralytics + PyTorch",
        device=device,
        batch=batch,
        precision="fp16" if getattr(backend, "fp16", False) else "fp32",
        weights=weights.name,
    )
    return out


def letterbox(image: Any, size: tuple[int, int]) -> tuple[Any, float, tuple[float, float]]:
    """ultralytics' LetterBox (no auto, centred, gray 114) to a (1, 3, H, W) float32 RGB tensor in 0..1."""
    import cv2
    import numpy as np

    h, w = image.shape[:2]
    r = min(size[0] / h, size[1] / w)
    nw, nh = round(w * r), round(h * r)
    dw, dh = (size[1] - nw) / 2, (size[0] - nh) / 2
    if (w, h) != (nw, nh):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    x = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
    return x, r, (left, top)


def decode(out: Any, gain: float, pad: tuple[float, float], shape: tuple[int, int]) -> Any:
    """(4 + nc, N) raw head output to (k, 6) boxes x1 y1 x2 y2 conf cls in frame pixels, class-aware NMS."""
    import cv2
    import numpy as np

    p = out.T
    scores = p[:, 4:]
    cls = scores.argmax(1)
    conf = scores[np.arange(len(p)), cls]
    keep = conf > CONF
    p, cls, conf = p[keep], cls[keep], conf[keep]
    if not len(p):
        return np.zeros((0, 6), np.float32)
    xywh = p[:, :4].copy()
    xywh[:, :2] -= xywh[:, 2:] / 2  # top-left corner, as NMSBoxes wants
    idx = cv2.dnn.NMSBoxesBatched(xywh.tolist(), conf.tolist(), cls.tolist(), CONF, IOU, top_k=MAX_DET)
    idx = np.asarray(idx, dtype=int).reshape(-1)[:MAX_DET]
    b = xywh[idx]
    xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)
    xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - pad[0]) / gain).clip(0, shape[1])
    xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - pad[1]) / gain).clip(0, shape[0])
    return np.concatenate([xyxy, conf[idx, None], cls[idx, None]], 1)


def ort_inference(onnx_path: Path, images: list[Any], seconds: float) -> dict[str, Any]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = (int(inp.shape[2]), int(inp.shape[3]))

    def call(b: list[Any]) -> int:
        n = 0
        for im in b:
            x, gain, pad = letterbox(im, size)
            out = sess.run(None, {inp.name: x})[0]
            n += len(decode(out[0], gain, pad, im.shape[:2]))
        return n

    out = timed(call, [[im] for im in images], seconds, warmup=3, sync=lambda: None)
    out.update(
        runtime="ONNX Runtime (raw: letterbox, session.run, numpy decode + OpenCV NMS)",
        device="cpu",
        batch=1,
        precision="int8",
        weights=onnx_path.name,
        ort_threads="default (intra-op = physical cores)",
        ort_version=ort.__version__,
    )
    return out


# ---------------------------------------------------------------- report


def machine_facts(device: str) -> dict[str, Any]:
    import cv2
    import numpy as np
    import onnxruntime
    import torch

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_available": cuda,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "device_arg": device,
        "dev_shm_gib": shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").is_dir() else None,
    }


def fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def render(res: dict[str, Any], args: argparse.Namespace) -> str:
    m = res["machine"]
    gpu_desc = f"{m['gpu']} (CUDA {m['torch_cuda']}, cuDNN {m['cudnn']})" if m["gpu"] else "no CUDA device"
    lines = [
        f"### GPU vs CPU: ultralytics training and inference ({time.strftime('%Y-%m-%d')})",
        "",
        f"`bench/gpu.py --epochs {args.epochs} --cpu-epochs {args.cpu_epochs} --imgsz {args.imgsz}"
        + (f" --fraction {args.fraction}" if args.fraction != 1.0 else "")
        + (f" --device {args.device}" if args.device != "0" else "")
        + (f" --amp {args.amp}" if args.amp != "fp16" else "")
        + f"`: {gpu_desc}; CPU {m['cpu']}, {m['cpu_count']} logical cores; "
        f"Python {m['python']}, torch {m['torch']}, ultralytics {res['ultralytics']['ultralytics']}, "
        f"onnxruntime {m['onnxruntime']}, numpy {m['numpy']}. Aquarium photos (Roboflow, CC BY 4.0), "
        "YOLOv8n COCO weights; offline "
        f"(network attempts: {len(res['network_attempts'])}, download attempts: {len(res['download_attempts'])}).",
        "",
    ]
    tr = res.get("training", {})
    rows = [(k, tr[k]) for k in ("gpu", "cpu") if isinstance(tr.get(k), dict)]
    if rows:
        lines += [
            f"Training: transfer learning from yolov8n_coco_dequant.pt, batch {TRAIN_BATCH}, workers "
            f"{TRAIN_WORKERS}, validation after each epoch, plots off, close_mosaic {args.close_mosaic}. "
            "An epoch is train + val + checkpoint, wall clock. `later` = median of the epochs after the first.",
            "",
            "| run | device | epochs | train images | AMP | loader workers | torch threads | first epoch s "
            "| later epochs s (median) | with mosaic s | without mosaic s | total wall s | mAP50-95 | mAP50 |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, r in rows:
            dev = m["gpu"] if key == "gpu" and r["device"] != "cpu" and m["gpu"] else r["device"]
            lines.append(
                f"| {key.upper()} | {dev} | {r['epochs']} | {r['train_images']} | {'on' if r['amp_used'] else 'off'} "
                f"| {r['workers']} | {r['torch_threads']} "
                f"| {fmt(r['first_epoch_s'])} | {fmt(r['median_epoch_s'] if r['epochs'] > 1 else None)} "
                f"| {fmt(r['median_epoch_s_mosaic'])} | {fmt(r['median_epoch_s_no_mosaic'])} "
                f"| {fmt(r['wall_s'], '.1f')} "
                f"| {fmt(r['map50_95'], '.3f')} | {fmt(r['map50'], '.3f')} |"
            )
        ratio = tr.get("ratio")
        if ratio:
            lines += ["", ratio["text"]]
        g = tr.get("gpu")
        extra = []
        if isinstance(g, dict) and g.get("gpu_peak_mem_gib") is not None:
            extra.append(f"GPU run peak memory allocated by torch: {g['gpu_peak_mem_gib']:.1f} GiB.")
        if isinstance(tr.get("cpu"), dict):
            extra.append(
                "The CPU run uses ultralytics' CPU defaults: it sets dataloader workers to 0 and torch threads "
                "to min(8, cores - 1)."
            )
        for e in tr.get("errors", []):
            extra.append(f"Error: {e}")
        if tr.get("skipped"):
            extra.append(f"Training: {tr['skipped']}")
        if extra:
            lines += ["", " ".join(extra)]
        lines.append("")
    elif tr.get("skipped"):
        lines += [f"Training: {tr['skipped']}", ""]
    inf = res.get("inference", {})
    rows_i = inf.get("rows", [])
    if rows_i:
        base = next((r for r in rows_i if r["runtime"].startswith("ONNX Runtime")), None)
        lines += [
            f"Inference: {inf['images']} decoded val+test photos in memory, input {INFER_IMGSZ}, conf {CONF}, "
            f"IoU {IOU}, end to end (letterbox, model, NMS, boxes on the host); about {args.infer_seconds:g} s "
            "per row after 3 warm-up calls. ultralytics letterboxes minimally (rect), the static ONNX input is "
            f"{INFER_IMGSZ}x{INFER_IMGSZ}.",
            "",
            "| runtime | device | model | precision | batch | images/s | ms/image | p50 ms/call | detections/image "
            "| ratio to ORT CPU |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows_i:
            dev = m["gpu"] if r["device"] != "cpu" and m["gpu"] else r["device"]
            ratio = fmt(r["images_per_s"] / base["images_per_s"], ".1f") + "x" if base else "-"
            lines.append(
                f"| {r['runtime']} | {dev} | {r['weights']} | {r['precision']} | {r['batch']} "
                f"| {fmt(r['images_per_s'], '.1f')} | {fmt(r['ms_per_image'])} | {fmt(r['p50_ms_per_call'])} "
                f"| {fmt(r['detections_per_image'], '.1f')} | {ratio} |"
            )
        lines.append("")
    if inf.get("skipped"):
        lines += [f"Inference (PyTorch): {inf['skipped']}", ""]
    notes = res.get("notes", [])
    if notes:
        lines += ["Notes: " + " ".join(notes), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(".gpu/aquarium"), help="YOLO data folder (data.yaml, splits)")
    ap.add_argument("--weights", type=Path, default=Path(".gpu/yolov8n_coco_dequant.pt"))
    ap.add_argument("--onnx", type=Path, default=Path(".gpu/yolov8n_int8.onnx"))
    ap.add_argument("--epochs", type=int, default=20, help="GPU training epochs")
    ap.add_argument("--cpu-epochs", type=int, default=1, help="CPU baseline epochs (0: skip the CPU baseline)")
    ap.add_argument("--imgsz", type=int, default=640, help="training image size")
    ap.add_argument("--fraction", type=float, default=1.0, help="share of the train split used (ultralytics fraction=)")
    ap.add_argument("--close-mosaic", type=int, default=10, help="ultralytics close_mosaic (its default: 10)")
    ap.add_argument(
        "--device",
        default="0",
        help="device of the accelerated runs (ultralytics syntax, default CUDA 0); 'cpu' runs them on the "
        "CPU, to test this script on a machine without a GPU",
    )
    ap.add_argument(
        "--amp",
        default="fp16",
        choices=["fp16", "bf16", "fp32"],
        help="GPU training precision: fp16 = ultralytics' default AMP with its AMP check (run offline, see "
        "above), bf16 = autocast bf16 (no check), fp32 = AMP off",
    )
    ap.add_argument(
        "--infer-weights",
        choices=["base", "trained"],
        default="base",
        help="PyTorch inference model: the COCO weights (same network as the ONNX) or the GPU run's best.pt",
    )
    ap.add_argument("--infer-seconds", type=float, default=6.0, help="timed seconds per inference row")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-inference", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="runs and state (default: a temporary dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="dump the raw numbers here")
    ap.add_argument("--write", type=Path, default=None, help="Append the result section to this markdown file.")
    args = ap.parse_args()

    data, weights, onnx_path = (
        p if p.is_absolute() else (Path.cwd() / p) for p in (args.data, args.weights, args.onnx)
    )
    data, weights, onnx_path = data.resolve(), weights.resolve(), onnx_path.resolve()
    for p in (data / "data.yaml", weights, onnx_path):
        if not p.exists():
            sys.exit(f"{p} not found (copy ../shared/data/aquarium and ../shared/models/* into .gpu/, see --help)")

    guard_network()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgeloop-gpu-bench-")
        work = Path(tmp.name)
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, data, weights, onnx_path, work)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run(args: argparse.Namespace, data: Path, weights: Path, onnx_path: Path, work: Path) -> None:
    res: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "network_attempts": NETWORK_ATTEMPTS,
        "download_attempts": DOWNLOAD_ATTEMPTS,
        "notes": [],
    }

    def dump() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2, default=str))

    res["ultralytics"] = prepare_ultralytics(work / "state", weights)
    import torch

    res["machine"] = machine_facts(args.device)
    accel = args.device != "cpu"
    have_accel = not accel or torch.cuda.is_available()
    msg = ""
    if not have_accel:
        msg = f"skipped: --device {args.device} asks for CUDA, but torch.cuda.is_available() is False on this machine."
        print(f"GPU part {msg}", flush=True)
    if res["ultralytics"]["polars_stand_in"]:
        res["notes"].append("polars is not installed: stand-in module (checkpoints carry no results table).")
    amp_arg: bool | str = {"fp16": True, "bf16": "bf16", "fp32": False}[args.amp]
    dump()

    best: Path | None = None
    if not args.skip_training:
        data_yaml = staged_dataset(data, work)
        training: dict[str, Any] = {}
        res["training"] = training
        if have_accel:
            training["errors"] = []
            for workers in (TRAIN_WORKERS, 0):  # 0: a retry where worker processes failed (e.g. a small /dev/shm)
                print(
                    f"== training on {args.device}: {args.epochs} epochs at {args.imgsz}, {workers} workers", flush=True
                )
                try:
                    training["gpu"] = train(
                        weights,
                        data_yaml,
                        args.device,
                        args.epochs,
                        args,
                        work / "runs",
                        f"gpu-w{workers}",
                        amp_arg,
                        workers,
                    )
                    break
                except Exception as e:  # keep going: the CPU baseline and inference still give numbers
                    traceback.print_exc()
                    training["errors"].append(f"GPU training with {workers} workers failed: {type(e).__name__}: {e}")
                    dump()
            if training.get("gpu", {}).get("best"):
                best = Path(training["gpu"]["best"])
            if "gpu" in training and accel and args.amp == "fp16":
                res["notes"].append(
                    "AMP: ultralytics' AMP check ran offline on the local COCO YOLOv8n checkpoint placed as "
                    "yolo26n.pt in its weights dir (FP32 vs autocast on bus.jpg); the AMP column shows its verdict."
                )
            dump()
        else:
            training["skipped"] = f"GPU run {msg}"
        if args.cpu_epochs > 0:
            print(f"== training on cpu: {args.cpu_epochs} epoch(s) at {args.imgsz}", flush=True)
            try:
                training["cpu"] = train(weights, data_yaml, "cpu", args.cpu_epochs, args, work / "runs", "cpu", False)
            except Exception as e:
                traceback.print_exc()
                training.setdefault("errors", []).append(f"CPU training failed: {type(e).__name__}: {e}")
            dump()
        g, c = training.get("gpu"), training.get("cpu")
        if g and c:
            # like for like: the CPU epochs' mosaic state decides which GPU epochs it is compared with
            cpu_mosaic = c["median_epoch_s_mosaic"] is not None
            cpu_s = c["median_epoch_s_mosaic"] if cpu_mosaic else c["median_epoch_s_no_mosaic"]
            gpu_s = g["median_epoch_s_mosaic"] if cpu_mosaic else g["median_epoch_s_no_mosaic"]
            if gpu_s is None:
                gpu_s = g["median_epoch_s"]
            phase = "with mosaic" if cpu_mosaic else "without mosaic"
            first = " (the CPU figure is its only epoch, warm-up included)" if c["epochs"] == 1 else ""
            training["ratio"] = {
                "cpu_epoch_s": cpu_s,
                "gpu_epoch_s": gpu_s,
                "speedup": cpu_s / gpu_s,
                "first_epoch_speedup": c["first_epoch_s"] / g["first_epoch_s"],
                "text": (
                    f"GPU epoch speed vs CPU: **{cpu_s / gpu_s:.1f}x** ({gpu_s:.2f} s vs {cpu_s:.2f} s per epoch, "
                    f"epochs {phase}, GPU epochs after the first{first}); first epoch vs first epoch: "
                    f"{c['first_epoch_s'] / g['first_epoch_s']:.1f}x."
                ),
            }
        dump()

    if not args.skip_inference:
        # training left torch in deterministic mode (ultralytics' deterministic=True): back to torch's defaults,
        # as a process that only predicts would run
        from ultralytics.utils.torch_utils import unset_deterministic

        unset_deterministic()
        images = inference_images(data)
        inf: dict[str, Any] = {"images": len(images), "rows": []}
        res["inference"] = inf
        if have_accel:
            model_w = best if (args.infer_weights == "trained" and best) else weights
            settings = [(1, False), (1, True), (16, True)]
            for batch, fp16 in settings:
                print(
                    f"== inference: PyTorch on {args.device}, batch {batch}, {'fp16' if fp16 else 'fp32'}", flush=True
                )
                try:
                    inf["rows"].append(torch_inference(model_w, images, args.device, batch, fp16, args.infer_seconds))
                except Exception as e:
                    traceback.print_exc()
                    res["notes"].append(f"Inference batch {batch} fp16={fp16} failed: {type(e).__name__}: {e}.")
                dump()
        else:
            inf["skipped"] = msg
        print("== inference: ONNX Runtime int8 on cpu, batch 1", flush=True)
        try:
            inf["rows"].append(ort_inference(onnx_path, images, args.infer_seconds))
        except Exception as e:
            traceback.print_exc()
            res["notes"].append(f"ONNX Runtime inference failed: {type(e).__name__}: {e}.")
        dump()

    if NETWORK_ATTEMPTS or DOWNLOAD_ATTEMPTS:
        res["notes"].append(f"refused: {NETWORK_ATTEMPTS + DOWNLOAD_ATTEMPTS}.")
    dump()
    emit(render(res, args), args.write)


if __name__ == "__main__":
    main()
