#!/usr/bin/env bash
# The demo: set up .venv (scripts/setup.sh), then run the whole active-learning loop on this machine:
# a first model trained on world A, two cameras watching a shifted world B, rounds of
# curate -> label (an oracle with the scenes' truth) -> approve -> retrain (Prefect) -> gate ->
# release canary-first -> swap, and a report of each round in .demo-report/.
#   bash scripts/demo.sh                  # the default demo (16.5 minutes on 2 cores after install)
#   bash scripts/demo.sh --quick          # what CI runs (~6 minutes)
#   bash scripts/demo.sh --open-app       # leave the FiftyOne App and the Prefect UI up at the end
#   bash scripts/demo.sh --data DATA.yaml # any YOLO data set with train and test splits
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SHARED=${EDGELOOP_SHARED:-../shared}
BASE=$SHARED/models/yolov8n_coco_dequant.pt
[ -f "$BASE" ] || { echo "demo: $BASE not found (put the shared data beside the checkout, or set EDGELOOP_SHARED)"; exit 2; }
export PATH="$PWD/.venv/bin:$PATH"
edgeloop demo --base-checkpoint "$BASE" --report .demo-report "$@"
