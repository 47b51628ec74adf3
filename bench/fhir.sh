#!/usr/bin/env bash
# FHIR throughput (issue 14 part 2): Synthea transaction bundles/s on SQLite and PostgreSQL, how
# the rate holds as the store grows to 100 000+ resources, search latency on that store, and
# bundles/s at several client counts.
#
#   bash bench/fhir.sh                                  # the full measurement (~100 000 resources per database)
#   COPIES=10 DBS=sqlite SCALING="1 4" bash bench/fhir.sh    # a quick check
#
# Data: COPIES (137) copies of each of the 4 Synthea bundles in ../shared/data/fhir/bundles (734
# resources per set: Observations, Claims, Encounters, ...), every UUID replaced per copy, so
# each copy is a new patient (bench/fhir.py gen). 137 copies = 548 bundles = 100 558 resources.
# For each database in DBS ("sqlite postgres"): Carina starts fresh (an empty data folder; for
# PostgreSQL a freshly created database carina_fhir_bench on PG_URL), then
#   1. load: every bundle POSTed as a transaction by CLIENTS (4) concurrent clients; bundles/s,
#      resources/s (whole load, and its first and last fifth: does the rate hold as the store
#      grows), p50/p99 per bundle, 503 retries (the backlog limit), server CPU s, RSS and peak;
#   2. search: each query of bench/fhir.py's list REPS (30) times, one client, a random loaded
#      patient each time: p50/p95 ms and the median match count;
#   3. scaling: for each count in SCALING ("1 2 4 8 32"), SCALE_BUNDLES (40) more bundles posted
#      by that many clients into the same (large) store.
# Lines go to OUT (bench/results/fhir-$(date +%F).jsonl); a Markdown table to stdout.
# The ICU-risk jobs the lab Observations trigger run in the background as in production (the
# local risk model); the load measures what a client sees. Env: CARINA_BIN
# (target/release/carina), PY (python3), SRC, PG_URL (postgres://postgres@127.0.0.1:5432),
# KEEP=1 keeps the temporary folder; CARINA_* settings reach Carina and are recorded.
set -euo pipefail
cd "$(dirname "$0")/.."

COPIES=${COPIES:-137}
CLIENTS=${CLIENTS:-4}
REPS=${REPS:-30}
SCALING=${SCALING:-"1 2 4 8 32"}
SCALE_BUNDLES=${SCALE_BUNDLES:-40}
DBS=${DBS:-"sqlite postgres"}
PY=${PY:-python3}
CARINA_BIN=${CARINA_BIN:-target/release/carina}
SRC=${SRC:-../shared/data/fhir/bundles}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
OUT=${OUT:-bench/results/fhir-$(date +%F).jsonl}
RUN_ID=${RUN_ID:-fhir-$(date +%Y%m%dT%H%M%S)-$$}
H="$PY bench/fhir.py"

[ -x "$CARINA_BIN" ] || { echo "fhir.sh: $CARINA_BIN missing (cargo build --release)" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/carina-fhir.XXXXXX")
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== $COPIES copies of the Synthea bundles -> $WORK/bundles" >&2
$H gen --src "$SRC" --copies "$COPIES" --out "$WORK/bundles" >&2
echo "== scaling set -> $WORK/scale" >&2
n_scale_copies=$(( ($(echo $SCALING | wc -w) * SCALE_BUNDLES + 3) / 4 ))
$H gen --src "$SRC" --copies "$n_scale_copies" --out "$WORK/scale" >&2

carina_env=$(env | grep '^CARINA_' | grep -v DATABASE_URL | sort | tr '\n' ' ' || true)
port=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
base="http://127.0.0.1:$port/fhir"

for db in $DBS; do
  run="$WORK/$db"; mkdir -p "$run"
  if [ "$db" = postgres ]; then
    psql "$PG_URL/postgres" -qc "DROP DATABASE IF EXISTS carina_fhir_bench" -c "CREATE DATABASE carina_fhir_bench" >/dev/null
    export CARINA_DATABASE_URL="$PG_URL/carina_fhir_bench"
  else
    unset CARINA_DATABASE_URL
  fi
  "$CARINA_BIN" serve --http "127.0.0.1:$port" --data-dir "$run/data" >"$run/carina.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  common=(--base "$base" --pid "$pid" --out "$OUT" --run-id "$RUN_ID" --db "$db" --env "$carina_env")
  echo "== $db: load $(ls "$WORK/bundles" | wc -l) bundles, $CLIENTS clients" >&2
  $H load "${common[@]}" --files "$WORK/bundles" --clients "$CLIENTS" --patients "$run/patients.txt" >&2
  last_resources() { tail -1 "$OUT" | $PY -c "import json,sys; print(json.load(sys.stdin)['resources'])"; }
  stored=$(last_resources)
  echo "== $db: search on $stored resources" >&2
  $H search "${common[@]}" --patients "$run/patients.txt" --reps "$REPS" --store-resources "$stored" >&2
  skip=0
  for c in $SCALING; do
    echo "== $db: $SCALE_BUNDLES bundles, $c clients" >&2
    $H load "${common[@]}" --files "$WORK/scale" --skip "$skip" --limit "$SCALE_BUNDLES" --clients "$c" \
      --store-before "$stored" >&2
    skip=$((skip + SCALE_BUNDLES))
    stored=$((stored + $(last_resources)))
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  [ "${KEEP:-0}" = 1 ] || rm -rf "$run/data"
  if [ "$db" = postgres ] && [ "${KEEP:-0}" != 1 ]; then
    psql "$PG_URL/postgres" -qc "DROP DATABASE IF EXISTS carina_fhir_bench" >/dev/null || true
  fi
done

echo
echo "FHIR, run $RUN_ID, $(nproc) cores (lines in $OUT)"
echo
$H table --out "$OUT" --run-id "$RUN_ID"
