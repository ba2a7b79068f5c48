#!/bin/bash
# bench/ingest.py on a machine without MongoDB, Mosquitto or FiftyOne, from what bench/carry/pack.py put in .ib/.
# Arguments: one "FRAMES CLIENTS WORKERS [BATCH [CONNECTIONS]]" per configuration; results go to $OUT (or ./bench-out).
set -euo pipefail
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
IB=$PWD/.ib  # made by bench/carry/pack.py
mkdir -p /tmp/site && (tar -C /tmp/site -xJf $IB/py.tar.xz 2>/dev/null || true)  # entries outside site-packages (scripts) are refused: not needed
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $IB/whl/*.whl 2>&1 | grep -v WARNING || true
tar -C /tmp -xJf $IB/native.tar.xz
mkdir -p /tmp/site/fiftyone/db/bin
printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/native/lib exec /tmp/native/mongod "$@"\n' > /tmp/site/fiftyone/db/bin/mongod
printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/native/lib exec /tmp/native/mosquitto "$@"\n' > /tmp/mosq
chmod +x /tmp/site/fiftyone/db/bin/mongod /tmp/mosq
export PYTHONPATH=/tmp/site:$PWD MOSQUITTO_BIN=/tmp/mosq EDGELOOP_BENCH_IMAGES=$IB/coco8 PYTHONUNBUFFERED=1
/tmp/site/fiftyone/db/bin/mongod --version | head -1
/tmp/mosq -h | head -1 || true
nproc; free -g | head -2
python3 -c "import fiftyone, grpc, server.app, server.ingest.core, server.store.inbox, server.ingest.mqtt_bridge, edge_agent.transports.grpc, edge_agent.transports.mqtt, edge_agent.encoding; print(\"imports ok\", fiftyone.__version__, grpc.__version__)"
for cfg in "$@"; do
  set -- $cfg
  python3 bench/ingest.py --frames $1 --repeats 3 --clients $2 --workers $3 ${4:+--batch-size $4} ${5:+--connections $5} --write $OUT/ingest.md 2>&1 | grep -v -E "^20[0-9][0-9]-" | tee -a $OUT/ingest.log
done
