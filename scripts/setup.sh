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

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "[setup] installing mosquitto (Debian)"
  as_root apt-get update -qq || true
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi
# The Debian package starts a broker on port 1883; edgeloop never uses it (tests start their own).

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch/torchvision first, pinned to the builds that lie on the CI machines' disk (a plain
# 'torch' requirement would pull a multi-GB build from PyPI); pyproject's ranges admit them.
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch 2.14.1 / torchvision 0.29.1"
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing edgeloop[dev]"
"$VENV/bin/python" -m pip install -q -e '.[dev]'
echo "[setup] done: $VENV"
