#!/usr/bin/env bash
# The 2020 benchmark, Carina and the Python peer one after the other on this machine, same ONNX
# model, same 27 X-rays, same load generator (../shared/bench/loadgen.py: 8 clients x 27 images).
#   PY=/path/to/venv/bin/python bash bench/run_side_by_side.sh [models/cxr-resnet-small]
# PY must have the peer's and loadgen's requirements (../shared/peer/requirements.txt,
# ../shared/bench/requirements.txt). Appends JSON lines to bench/results/load-$(date +%F).jsonl.
# The ResNet-18 package (11 M parameters): bench/make_bench_models.sh, then pass
# /tmp/bench-models/resnet18. Env: IMAGES (folder; default the 512 px CXR JPEGs), PATHS,
# ROUNDS, SERVERS ("carina peer"), TAG (stored in each line, e.g. the settings tried);
# CARINA_* settings (e.g. CARINA_CPU_WORKERS) reach Carina from the environment; CARINA_BIN
# (a built binary) skips the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=${1:-models/cxr-resnet-small}
SHARED=${SHARED:-../shared}
PY=${PY:-python3}
IMAGES=${IMAGES:-$SHARED/data/cxr/val}
OUT=${OUT:-bench/results/load-$(date +%F).jsonl}
PATHS=${PATHS:-"/covid19/api/v1/predict/heatmap /covid19/api/v1/predict/"}
mkdir -p bench/results
rss_mib() { # resident memory of a process and its children, MiB
  ps -o rss= -p "$1" --ppid "$1" 2>/dev/null | awk '{s += $1} END {printf "%.0f", s / 1024}'
}
run_load() { # name pid port path
  local line rss
  line=$("$PY" "$SHARED/bench/loadgen.py" --base-url "http://127.0.0.1:$3" --path "$4" --images "$IMAGES" \
      --limit 27 --clients "${CLIENTS:-8}" --rounds "${ROUNDS:-1}" --cpu-pid "$2" --wait-quiet "${WAIT_QUIET:-120}" --json)
  rss=$(rss_mib "$2")  # after the load
  echo "$line" | "$PY" -c "import json,sys; d=json.loads(sys.stdin.read()); d.update(server='$1', path='$4', rounds=${ROUNDS:-1}, clients=${CLIENTS:-8}, model='$(basename "$PKG")', images='$IMAGES', tag='${TAG:-}', rss_mib_after=$rss); print(json.dumps(d))" \
    | tee -a "$OUT"
}
wait_up() { for _ in $(seq 1 240); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "server did not start" >&2; return 1; }

tmp=$(mktemp -d)
SERVERS=${SERVERS:-"carina peer"}

if [[ " $SERVERS " == *" carina "* ]]; then
# Carina (release build), models folder holding only this package
mkdir -p "$tmp/models"; cp -r "$PKG" "$tmp/models/"
if [ -z "${CARINA_BIN:-}" ]; then cargo build --release --quiet; fi
"${CARINA_BIN:-./target/release/carina}" serve --http 127.0.0.1:8081 --models "$tmp/models" --data-dir "$tmp/data" >"$tmp/carina.log" 2>&1 &
pid=$!; trap 'kill $pid 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:8081/readyz
for p in $PATHS; do run_load carina "$pid" 8081 "$p"; done
kill "$pid"; wait "$pid" 2>/dev/null || true
fi

if [[ " $SERVERS " == *" peer "* ]]; then
# the Python peer (2 uvicorn workers), same ONNX file through its JSON manifest
"$PY" "$SHARED/peer/serve.py" --manifest "$PKG/peer-manifest.json" --workers 2 --port 8056 \
    --static-dir "$tmp/peer-static" >"$tmp/peer.log" 2>&1 &
pid=$!; trap 'kill $pid 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:8056/covid19/api/v1/healthcheck; sleep 3
for p in $PATHS; do run_load peer "$pid" 8056 "$p"; done
kill "$pid"; wait "$pid" 2>/dev/null || true
fi
rm -rf "$tmp"
