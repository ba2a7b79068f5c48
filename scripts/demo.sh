#!/usr/bin/env bash
# The demo: set up .venv (see scripts/setup.sh), then show the edge agent at work on real COCO
# images with a real pretrained detector (../shared/models/yolov8n_int8.onnx):
#   1. a dry run that prints, per image, the detections, the uncertainty score and the reasons;
#   2. a full agent run that keeps the uncertain frames in its durable outbox.
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

echo; echo "== 2. an agent run (no receiver configured: kept frames wait in the outbox)"
mkdir -p .demo
cat > .demo/edge.yaml <<YAML
device_id: demo-cam
source: {uri: $(realpath "$IMAGES/train")}
detector: {type: onnxruntime, model: $(realpath "$MODEL")}
outbox: {path: outbox.sqlite3}
metrics: {enabled: false}
YAML
rm -f .demo/outbox.sqlite3*
edgeloop agent run --config .demo/edge.yaml
.venv/bin/python - <<'PY'
from edge_agent.outbox import Outbox, OutboxConfig
from edgeloop.convert import parse_frame
with Outbox(OutboxConfig(path=".demo/outbox.sqlite3")) as ob:
    print(f"outbox: {ob.depth} frame(s), {ob.size_bytes} bytes, highest score first:")
    for p in ob.peek(10):
        rec = parse_frame(p.payload)
        print(f"  {rec.frame_id[:8]} score={rec.uncertainty:.2f} reasons={[r.trigger for r in rec.reasons]}")
PY
