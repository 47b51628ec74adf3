#!/usr/bin/env bash
# Images/s with heatmaps on the CUDA execution provider, for the model sizes hospitals deploy
# (ResNet-18, DenseNet-121; random weights, built without downloads), at max_batch 1/8/32/64,
# next to raw ONNX Runtime on the same EP at the same batch (the ceiling), with GPU utilisation.
#
#   bash bench/gpu.sh                 # on a machine with an NVIDIA GPU (about 10 minutes)
#   QUICK=1 bash bench/gpu.sh         # CPU dry run: same steps, small load; Carina's CUDA
#                                     # request falls back to CPU and the report says so
#
# Steps: scripts/setup.sh (--gpu when nvidia-smi sees a GPU), a release build (skipped when
# CARINA_BIN points at a built binary), bench/make_bench_models.sh, then per model and batch:
# Carina alone with only that package, ../shared/bench/loadgen.py posting the 27 validation
# X-rays to /covid19/api/v1/predict/heatmap with 2 x batch clients (at least 8), nvidia-smi
# sampled every 200 ms; then bench/ort_ceiling.py on the same EP. JSON lines go to
# bench/results/gpu-DATE.jsonl, a Markdown table to stdout.
# Env: MODELS ("resnet18 densenet121"), BATCHES ("1 8 32 64"), MAX_WAIT_US (2000), ROUNDS,
# IMAGES, SHARED (../shared), PY (a Python with onnx, numpy and aiohttp; default .deps/bench-venv,
# created from PyPI), GPU_PY (Python with onnxruntime-gpu; default .deps/gpu-venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
IMAGES=${IMAGES:-$SHARED/data/cxr/val}
OUT=${OUT:-bench/results/gpu-$(date +%F).jsonl}
MODELS=${MODELS:-"resnet18 densenet121"}
MAX_WAIT_US=${MAX_WAIT_US:-2000}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  BATCHES=${BATCHES:-"1 8"}; ROUNDS=${ROUNDS:-1}; SECONDS_PER_BATCH=2
else
  BATCHES=${BATCHES:-"1 8 32 64"}; ROUNDS=${ROUNDS:-2}; SECONDS_PER_BATCH=5
fi
log() { echo "gpu.sh: $*" >&2; }
started=$(date +%s)

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  has_gpu=1
  nvidia-smi -L >&2
else
  log "no NVIDIA GPU visible: the CUDA requests below fall back to CPU (a dry run)"
fi

# 1. ONNX Runtime (with the CUDA provider when there is a GPU) and the Python tools.
if [ "$has_gpu" = 1 ]; then bash scripts/setup.sh --gpu >&2; else bash scripts/setup.sh >&2; fi
# shellcheck source=/dev/null
source scripts/env.sh
PY=${PY:-.deps/bench-venv/bin/python}
if [ ! -x "$PY" ]; then
  log "creating .deps/bench-venv (onnx, numpy, aiohttp, onnxruntime)"
  python3 -m venv .deps/bench-venv
  .deps/bench-venv/bin/pip install -q onnx==1.23.2 numpy==2.4.6 aiohttp==3.14.5 onnxruntime==1.32.0
fi
GPU_PY=${GPU_PY:-.deps/gpu-venv/bin/python}
[ -x "$GPU_PY" ] || GPU_PY=$PY  # no GPU venv: the ceiling runs on CPU, and says so
carina_env=(CARINA_EXECUTION_PROVIDER=cuda CARINA_MAX_WAIT_US="$MAX_WAIT_US")
if [ -d .deps/gpu-venv ]; then
  nv=$(echo .deps/gpu-venv/lib/python3*/site-packages/nvidia/*/lib | tr ' ' :)
  carina_env+=(CARINA_ORT_GPU=1 LD_LIBRARY_PATH="$nv:${LD_LIBRARY_PATH:-}")
  export LD_LIBRARY_PATH="$nv:${LD_LIBRARY_PATH:-}"  # for GPU_PY's onnxruntime too
fi

# 2. Carina, release build.
CARINA_BIN=${CARINA_BIN:-}
if [ -z "$CARINA_BIN" ]; then
  cargo build --release --quiet
  CARINA_BIN=target/release/carina
fi

# 3. Model packages.
MODEL_DIR=${MODEL_DIR:-/tmp/bench-models}
for m in $MODELS; do
  [ -f "$MODEL_DIR/$m/model.onnx" ] || { PY=$PY bash bench/make_bench_models.sh "$MODEL_DIR" >&2; break; }
done

mkdir -p bench/results
tmp=$(mktemp -d)
pid=""; smi=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; [ -n "$smi" ] && kill "$smi" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
wait_up() { for _ in $(seq 1 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }

for m in $MODELS; do
  pkg=$MODEL_DIR/$m
  # Raw ONNX Runtime on the same EP, every batch size: the ceiling.
  ceiling=$("$GPU_PY" bench/ort_ceiling.py "$pkg" --provider cuda --batches $BATCHES \
      --seconds "$SECONDS_PER_BATCH")
  echo "$ceiling" | "$PY" -c "import json,sys; d=json.load(sys.stdin); d.update(kind='ort-ceiling', gpu=$has_gpu); print(json.dumps(d))" >> "$OUT"
  for b in $BATCHES; do
    clients=$(( b * 2 > 8 ? b * 2 : 8 ))
    rm -rf "$tmp/models" "$tmp/data"; mkdir -p "$tmp/models"; cp -r "$pkg" "$tmp/models/"
    env "${carina_env[@]}" CARINA_MAX_BATCH="$b" "$CARINA_BIN" serve --http 127.0.0.1:8091 \
        --models "$tmp/models" --data-dir "$tmp/data" >"$tmp/carina.log" 2>&1 &
    pid=$!
    wait_up http://127.0.0.1:8091/readyz || { cat "$tmp/carina.log" >&2; exit 1; }
    provider=$(grep -o '"provider":"[A-Za-z]*"' "$tmp/carina.log" | head -1 | cut -d'"' -f4)
    if [ "$has_gpu" = 1 ]; then
      nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
          > "$tmp/smi.csv" &
      smi=$!
    fi
    line=$("$PY" "$SHARED/bench/loadgen.py" --base-url http://127.0.0.1:8091 \
        --path /covid19/api/v1/predict/heatmap --images "$IMAGES" --limit 27 \
        --clients "$clients" --rounds "$ROUNDS" --cpu-pid "$pid" --json)
    util="None"; mem="None"
    if [ -n "$smi" ]; then
      kill "$smi" 2>/dev/null || true; wait "$smi" 2>/dev/null || true; smi=""
      util=$(awk -F', *' '$1 > 0 {s += $1; n++} END {printf "%.0f", n ? s / n : 0}' "$tmp/smi.csv")
      mem=$(awk -F', *' '{if ($2 > m) m = $2} END {printf "%.0f", m}' "$tmp/smi.csv")
    fi
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    echo "$line" | "$PY" -c "import json,sys; d=json.load(sys.stdin); d.update(kind='carina', model='$m', max_batch=$b, max_wait_us=$MAX_WAIT_US, clients=$clients, provider='$provider', gpu=$has_gpu, gpu_util_busy_pct=$util, gpu_mem_mib_max=$mem); print(json.dumps(d))" >> "$OUT"
    log "$m batch $b on $provider: done ($(( $(date +%s) - started )) s so far)"
  done
done

# 4. The table: this run's lines only.
tail -n "$(( $(echo "$MODELS" | wc -w) * ($(echo "$BATCHES" | wc -w) + 1) ))" "$OUT" | "$PY" -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin]
ceil = {r["model"]: r for r in rows if r.get("kind") == "ort-ceiling"}
print("| model | max_batch | clients | Carina EP | Carina img/s (heatmaps) | p50 ms | p99 ms | raw ORT img/s (EP) | Carina / raw | GPU busy % |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r.get("kind") != "carina":
        continue
    c = ceil.get(r["model"], {})
    raw = c.get("runs", {}).get(str(r["max_batch"]), {}).get("images_per_s")
    tput = r.get("throughput_rps")
    ratio = "%.2f" % (tput / raw) if raw and tput else "-"
    lat = r.get("latency_ms", {})
    row = [r["model"], r["max_batch"], r["clients"], r["provider"], tput, lat.get("p50"),
           lat.get("p99"), "%s (%s)" % (raw, c.get("provider", "?")), ratio,
           r["gpu_util_busy_pct"]]
    print("| " + " | ".join(str(v) for v in row) + " |")
'
log "total $(( $(date +%s) - started )) s; lines in $OUT"
