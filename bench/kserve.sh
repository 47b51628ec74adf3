#!/usr/bin/env bash
# What a remote inference pool costs per request: the same package served by Carina's local
# ONNX Runtime and by Carina with `[backend] kind = "kserve-v2"` in front of MLServer (serving
# `carina export-serving`'s ONNX with onnxruntime, tests/kserve/ort_runtime.py), same machine,
# same load (../shared/bench/loadgen.py, /covid19/api/v1/predict/heatmap, the 27 validation
# X-rays), at 1 client (latency; Server-Timing "infer" is the call) and at 8 clients.
#   PY=/path/to/venv/bin/python bash bench/kserve.sh [/tmp/bench-models/resnet18]
# PY needs aiohttp (loadgen); MLServer comes from .deps/mlserver-venv (scripts/setup.sh --test).
# CARINA_BIN (a built binary) skips the release build.
# On one 2-core machine the pool competes with Carina for the cores and runs one inference at a
# time: the 8-client figure is the pool's capacity, not Carina's; the 1-client difference in
# Server-Timing "infer" is the protocol's overhead per request (REST: JSON tensors both ways;
# gRPC: protobuf).
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=${1:-/tmp/bench-models/resnet18}
PY=${PY:-python3}
SHARED=${SHARED:-../shared}
IMAGES=${IMAGES:-$SHARED/data/cxr/val}
OUT=${OUT:-bench/results/load-$(date +%F).jsonl}
MLSERVER=${MLSERVER:-.deps/mlserver-venv/bin/mlserver}
name=$(basename "$PKG")
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
wait_up() { for _ in $(seq 1 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
if [ -z "${CARINA_BIN:-}" ]; then cargo build --release --quiet; fi
BIN=${CARINA_BIN:-./target/release/carina}

# MLServer with the serving graph (1 worker process, onnxruntime on 1 intra-op thread, as
# each of Carina's local sessions; PROTOCOLS chooses the backends measured)
mkdir -p "$tmp/repo/$name"
cp tests/kserve/ort_runtime.py "$tmp/repo/"
"$BIN" export-serving "$PKG" --out "$tmp/repo/$name/model.onnx" >&2
echo "{\"name\": \"$name\", \"implementation\": \"ort_runtime.OnnxRuntimeModel\", \"parameters\": {\"uri\": \"./model.onnx\"}}" \
  > "$tmp/repo/$name/model-settings.json"
echo '{"host": "127.0.0.1", "http_port": 8095, "grpc_port": 8096, "metrics_port": 8097, "parallel_workers": 0}' \
  > "$tmp/repo/settings.json"

(cd "$tmp/repo" && exec "$OLDPWD/$MLSERVER" start . >"$tmp/mlserver.log" 2>&1) &
pids+=($!)
wait_up "http://127.0.0.1:8095/v2/models/$name/ready"

# Carina's packages: the same ONNX and manifest; local, or inference on the pool over REST or gRPC
package() { # folder [backend lines]
  mkdir -p "$1/$name"
  cp "$PKG/model.onnx" "$1/$name/"
  { cat "$PKG/model.toml"; printf '%b' "${2:-}"; } > "$1/$name/model.toml"
}
package "$tmp/models-local"
package "$tmp/models-rest" '\n[backend]\nkind = "kserve-v2"\nurl = "http://127.0.0.1:8095"\n'
package "$tmp/models-grpc" '\n[backend]\nkind = "kserve-v2"\nprotocol = "grpc"\nurl = "http://127.0.0.1:8096"\n'

run() { # label port clients
  "$PY" "$SHARED/bench/loadgen.py" --base-url "http://127.0.0.1:$2" --path /covid19/api/v1/predict/heatmap \
      --images "$IMAGES" --limit 27 --clients "$3" --rounds 1 --json \
    | "$PY" -c "import json,sys; d=json.load(sys.stdin); d.update(server='carina', backend='$1', model='$name', clients=$3, tag='kserve $1'); print(json.dumps(d))" \
    | tee -a "$OUT"
}
for backend in ${PROTOCOLS:-local rest grpc}; do
  "$BIN" serve --http 127.0.0.1:8094 --models "$tmp/models-$backend" --data-dir "$tmp/data-$backend" \
      >"$tmp/carina-$backend.log" 2>&1 &
  pids+=($!)
  wait_up http://127.0.0.1:8094/readyz
  for c in ${CLIENTS_LIST:-1 8}; do run "$backend" 8094 "$c"; done
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
done
