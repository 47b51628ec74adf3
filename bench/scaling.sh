#!/usr/bin/env bash
# How cost grows with clients (issue 14 part 2): the 2020 benchmark's heatmap endpoint at 1, 2,
# 4, 8 and 32 concurrent clients, Carina and the Python peer, same model, same 27 X-rays:
# requests/s, p50/p99 and resident memory after each load.
#
#   PY=/tmp/peer-venv/bin/python bash bench/scaling.sh [PACKAGE]     # default models/cxr-resnet-small
#   PY=/tmp/peer-venv/bin/python bash bench/scaling.sh /tmp/bench-models/resnet18
#
# Each count is one bench/run_side_by_side.sh run (servers started fresh, every client posting
# the 27 images once: 27 x clients requests), tagged "scaling <run id>"; the lines go to
# bench/results/load-$(date +%F).jsonl and a Markdown table to stdout. Env: CLIENTS_LIST
# ("1 2 4 8 32"), PATHS (/covid19/api/v1/predict/heatmap), SERVERS ("carina peer"), CARINA_BIN,
# PY (with the peer's and loadgen's requirements).
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=${1:-models/cxr-resnet-small}
PY=${PY:-python3}
OUT=${OUT:-bench/results/load-$(date +%F).jsonl}
RUN="scaling $(date +%Y%m%dT%H%M%S)"
if [ -z "${CARINA_BIN:-}" ]; then cargo build --release --quiet; export CARINA_BIN=target/release/carina; fi
for c in ${CLIENTS_LIST:-1 2 4 8 32}; do
  echo "== $c client(s)" >&2
  CLIENTS=$c ROUNDS=1 TAG="$RUN" OUT="$OUT" PY="$PY" PATHS="${PATHS:-/covid19/api/v1/predict/heatmap}" \
    bash bench/run_side_by_side.sh "$PKG" >/dev/null
done
echo
echo "Scaling, $(basename "$PKG"), run \"$RUN\" (lines in $OUT)"
echo
"$PY" - "$OUT" "$RUN" <<'EOF'
import json, sys
out, run = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(out) if l.strip()]
rows = [r for r in rows if r.get("tag") == run]
servers = sorted({r["server"] for r in rows})
counts = sorted({r["clients"] for r in rows})
head = " | ".join(f"{s} req/s | {s} p50 / p99 ms | {s} RSS MiB" for s in servers)
print(f"| clients | {head} |")
print("|---|" + "---|---|---|" * len(servers))
for c in counts:
    cells = []
    for s in servers:
        r = next((r for r in rows if r["server"] == s and r["clients"] == c), None)
        if r is None:
            cells += ["–", "–", "–"]
            continue
        lat = r["latency_ms"]
        cells += [f"{r['throughput_rps']:.1f}", f"{lat['p50']:.0f} / {lat['p99']:.0f}", str(r["rss_mib_after"])]
    print(f"| {c} | " + " | ".join(cells) + " |")
EOF
