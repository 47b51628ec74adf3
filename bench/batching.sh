#!/usr/bin/env bash
# Dynamic batching on this machine: Carina's /covid19/api/v1/predict/heatmap under
# ../shared/bench/loadgen.py for each max_batch x max_wait_us x clients, one Carina per setting.
#   PY=/path/to/venv/bin/python bash bench/batching.sh [/tmp/bench-models/resnet18]
# Env: BATCHES ("1 4 8"), WAITS_US ("0 2000 10000"), CLIENTS_LIST ("1 8"), ROUNDS (1), IMAGES,
# plus any CARINA_* setting. Lines go to bench/results/load-DATE.jsonl (tag "batching ...") and
# a Markdown table to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=${1:-/tmp/bench-models/resnet18}
PY=${PY:-python3}
OUT=${OUT:-bench/results/load-$(date +%F).jsonl}
start_line=$(( $( (cat "$OUT" 2>/dev/null || true) | wc -l) + 1 ))
for b in ${BATCHES:-1 4 8}; do
  for w in ${WAITS_US:-0 2000 10000}; do
    [ "$b" = 1 ] && [ "$w" != 0 ] && continue  # a batch of one never waits
    for c in ${CLIENTS_LIST:-1 8}; do
      CARINA_MAX_BATCH=$b CARINA_MAX_WAIT_US=$w CLIENTS=$c SERVERS=carina OUT=$OUT \
        PATHS=/covid19/api/v1/predict/heatmap TAG="batching max_batch=$b max_wait_us=$w" \
        PY=$PY bash bench/run_side_by_side.sh "$PKG" >/dev/null
    done
  done
done
tail -n "+$start_line" "$OUT" | "$PY" -c '
import json, sys
print("| max_batch | max_wait_us | clients | req/s | p50 ms | p99 ms | infer ms (mean, Server-Timing) |")
print("|---|---|---|---|---|---|---|")
for l in sys.stdin:
    r = json.loads(l)
    t = dict(kv.split("=") for kv in r["tag"].split()[1:])
    lat, st = r["latency_ms"], r["server_timing_mean_ms"]
    row = [t["max_batch"], t["max_wait_us"], r["clients"], "%.1f" % r["throughput_rps"],
           lat["p50"], lat["p99"], st.get("infer", "-")]
    print("| " + " | ".join(str(v) for v in row) + " |")
'
