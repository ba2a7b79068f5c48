#!/usr/bin/env bash
# The demo: set up .venv (scripts/setup.sh), then run the loop on this machine with the real
# pretrained detector and real COCO images from ../shared:
#   1. a dry run: what the edge agent would keep, and why (per image: detections, score, reasons);
#   2. `edgeloop demo`: a server (bundled MongoDB, FiftyOne inbox, gRPC ingest + model registry),
#      the detector published as release v1, and an edge agent that fetches v1 (signature and
#      sha256 checked), keeps the uncertain frames and uploads them into the FiftyOne inbox.
# `bash scripts/demo.sh --serve` keeps the FiftyOne App up for review (Ctrl-C to stop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SHARED=${EDGELOOP_SHARED:-../shared}
MODEL=$SHARED/models/yolov8n_int8.onnx
IMAGES=$SHARED/data/coco8/images
[ -f "$MODEL" ] || { echo "demo: $MODEL not found (put the shared data beside the checkout, or set EDGELOOP_SHARED)"; exit 2; }
export PATH="$PWD/.venv/bin:$PATH"

echo; echo "== 1. dry run: what the agent would keep, and why"
edgeloop agent score "$IMAGES/val" --model "$MODEL"

echo; echo "== 2. the loop: server + FiftyOne + registry + an edge agent on a camera"
app=--no-app
for arg in "$@"; do [ "$arg" = --serve ] && app=--app; done  # serving is for reviewing in the App
edgeloop demo --workdir .demo --model "$MODEL" --source "$IMAGES/train" "$app" "$@"
