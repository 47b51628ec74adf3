#!/usr/bin/env bash
# DICOM ingest throughput, Carina vs Orthanc (issue 14 part 2): STOW-RS and DIMSE C-STORE,
# instances/s and MB/s, on the same files, same machine, same clients, Carina with analysis off
# and on; plus this disk's durable-write (fsync) rate, the ceiling for durable ingest.
#
#   bash bench/ingest.sh                       # the full measurement (N=300, 4 STOW clients, 1 and 4 associations)
#   N=20 STOW_CLIENTS=2 ASSOCS="1 2" bash bench/ingest.sh    # a quick check
#
# Files: N copies of ../shared/data/dicom/derived_DX_covid_hannover.dcm (DX chest, Explicit VR
# LE, 419x512, 215.6 KB) with fresh UIDs, PER_STUDY (30) instances per study.
# Servers, each started fresh (empty data folder) for every measurement, on loopback:
#   carina   target/release/carina serve --dimse ... (AE CARINA). Analysis "on" = the default
#            routing (DX/CR chest -> cxr-resnet-small, run by the background job workers);
#            "off" = a [[dicom.routes]] rule no instance matches, so instances are stored
#            durably exactly as with analysis on, but no analysis job is enqueued.
#   orthanc  Debian Orthanc + DICOMweb plugin, SQLite index, SyncStorageArea on
#            (bench/orthanc-ingest.json, modelled on tests/orthanc/orthanc.py's config).
# Clients: STOW-RS = STOW_CLIENTS processes with CLIENT (dicomweb-client; or raw: multipart
# bodies prebuilt from the files' bytes, posted with http.client over one keep-alive
# connection, far cheaper per request), each posting its contiguous share, BATCH (1)
# instance(s) per request, to <base>/studies (Carina: /dicomweb, Orthanc:
# /dicom-web); C-STORE = dcmtk storescu, one process = one association per share, for each
# count in ASSOCS. The clock runs from the first request to the last acknowledgement; with
# analysis on, "all analysed" runs from the same start until no analysis job is queued or
# running (polling /metrics every 0.1 s).
# PRELOAD (0): before each measurement, that many single-instance studies (fresh UIDs, same
#   file) are stored into the fresh server over 4 associations, so the measured N arrive at a
#   store already holding PRELOAD studies (their own lines: run_id <RUN_ID>-preload); needs
#   ANALYSIS=off for Carina. `PRELOAD=10000 N=300 ANALYSIS=off bash bench/ingest.sh`.
# Env: N (300), STOW_CLIENTS (4), ASSOCS ("1 4"), BATCH (1), CLIENT (dicomweb-client), PER_STUDY (30),
#   SERVERS ("carina orthanc"), MODES ("stow cstore"), ANALYSIS ("off on", Carina only),
#   FSYNC_SECONDS (3), PY (.venv/bin/python), CARINA_BIN (target/release/carina),
#   MODELS (models), SRC (the DX file), OUT (bench/results/ingest-$(date +%F).jsonl),
#   KEEP=1 keeps the temporary folder (logs, data). CARINA_* settings reach Carina from the
#   environment and are recorded in each Carina line.
# Output: one JSON line per measurement (and one for the fsync rate) appended to OUT, then a
# Markdown table and the fsync line on stdout. MB = 10^6 bytes of Part 10 files sent; "stored"
# is counted on the server afterwards (Carina: QIDO Modality=DX; Orthanc: /statistics).
# The clients run on the same 2 cores as the server (same for both servers); the lines record
# the 1-min load average before each measurement and the server's CPU seconds during it.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-300}
STOW_CLIENTS=${STOW_CLIENTS:-4}
ASSOCS=${ASSOCS:-"1 4"}
BATCH=${BATCH:-1}
CLIENT=${CLIENT:-dicomweb-client}
PER_STUDY=${PER_STUDY:-30}
SERVERS=${SERVERS:-"carina orthanc"}
MODES=${MODES:-"stow cstore"}
ANALYSIS=${ANALYSIS:-"off on"}
FSYNC_SECONDS=${FSYNC_SECONDS:-3}
PY=${PY:-.venv/bin/python}
CARINA_BIN=${CARINA_BIN:-target/release/carina}
MODELS=${MODELS:-models}
SRC=${SRC:-../shared/data/dicom/derived_DX_covid_hannover.dcm}
OUT=${OUT:-bench/results/ingest-$(date +%F).jsonl}
RUN_ID=${RUN_ID:-ingest-$(date +%Y%m%dT%H%M%S)-$$}
H="$PY bench/ingest.py"
PRELOAD=${PRELOAD:-0}
if [ "$PRELOAD" -gt 0 ] && [[ " $ANALYSIS " == *" on "* ]]; then
  echo "ingest.sh: PRELOAD needs ANALYSIS=off (the preloaded studies would be analysed first)" >&2; exit 1
fi

for tool in storescu Orthanc curl; do
  command -v "$tool" >/dev/null || { echo "ingest.sh: $tool not found" >&2; exit 1; }
done
if [[ " $SERVERS " == *" carina "* ]] && [ ! -x "$CARINA_BIN" ]; then
  echo "ingest.sh: $CARINA_BIN missing (cargo build --release)" >&2; exit 1
fi
mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/carina-ingest.XXXXXX")
carina_pid=""
orthanc_dir=""
cleanup() {
  if [ -n "$carina_pid" ]; then kill "$carina_pid" 2>/dev/null || true; wait "$carina_pid" 2>/dev/null || true; fi
  if [ -n "$orthanc_dir" ]; then $PY tests/orthanc/orthanc.py stop --kill --dir "$orthanc_dir" >/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== $N instances from $SRC -> $WORK/files" >&2
$H gen --src "$SRC" --out "$WORK/files" --n "$N" --per-study "$PER_STUDY" >&2
if [ "$PRELOAD" -gt 0 ]; then
  echo "== $PRELOAD single-instance studies to preload -> $WORK/preload" >&2
  $H gen --src "$SRC" --out "$WORK/preload" --n "$PRELOAD" --per-study 1 >&2
fi

# the disk's durable-write rate, on the filesystem the servers' data folders are on
writers=$(printf '%s\n' 1 "$STOW_CLIENTS" $ASSOCS | sort -nu | tr '\n' ' ')
fs=$($H fsync --dir "$WORK" --seconds "$FSYNC_SECONDS" --writers $writers)
fs=$(echo "$fs" | $PY -c "import json,sys; d=json.load(sys.stdin); d.update(run_id='$RUN_ID', server='disk', time='$(date +%FT%T%z)'); print(json.dumps(d))")
echo "$fs" >>"$OUT"

carina_env=$(env | grep '^CARINA_' | sort | tr '\n' ' ' || true)
carina_version="$("$CARINA_BIN" --version 2>/dev/null | head -1 || true) (git $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- src 2>/dev/null || echo '+dirty src'))"
orthanc_version=$(Orthanc --version 2>/dev/null | head -1 || true)  # head may close the pipe first (SIGPIPE under pipefail)

wait_carina() { # port dimse_port
  for _ in $(seq 1 600); do
    if ! kill -0 "$carina_pid" 2>/dev/null; then echo "carina exited; log:" >&2; tail -20 "$run/carina.log" >&2; return 1; fi
    if curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "carina did not become ready; log: $run/carina.log" >&2; return 1
}

measure() { # server mode clients analysis http dicomweb dicom_port aec pid version
  stored_before=0
  if [ "$PRELOAD" -gt 0 ]; then
    echo "   preloading $PRELOAD studies (C-STORE, 4 associations)" >&2
    $H run --server "$1" --mode cstore --clients 4 --analysis "$4" --files "$WORK/preload" \
      --http "$5" --dicomweb "$6" --dicom-port "$7" --aec "$8" --pid "$9" --version "${10}" \
      --logdir "$WORK" --out "$OUT" --run-id "$RUN_ID-preload" ${11:+--env "${11}"} >&2
    stored_before=$(tail -1 "$OUT" | $PY -c "import json,sys; print(json.load(sys.stdin)['stored'])")
  fi
  $H run --stored-before "$stored_before" --server "$1" --mode "$2" --clients "$3" --analysis "$4" --files "$WORK/files" \
    --http "$5" --dicomweb "$6" --dicom-port "$7" --aec "$8" --pid "$9" --version "${10}" \
    --batch "$BATCH" --client "$CLIENT" --logdir "$WORK" --out "$OUT" --run-id "$RUN_ID" \
    ${11:+--env "${11}"} >&2
}

k=0
for server in $SERVERS; do
  for mode in $MODES; do
    if [ "$mode" = stow ]; then counts=$STOW_CLIENTS; else counts=$ASSOCS; fi
    for clients in $counts; do
      if [ "$server" = carina ]; then analyses=$ANALYSIS; else analyses=none; fi
      for analysis in $analyses; do
        k=$((k + 1)); run="$WORK/run-$k"; mkdir -p "$run"
        echo "== $server $mode x$clients analysis=$analysis" >&2
        if [ "$server" = carina ]; then
          port=$($H freeport); dport=$($H freeport)
          if [ "$analysis" = off ]; then
            printf '%s\n' "# analysis off: stored, never routed to a model (no analysis job)" \
              "[[dicom.routes]]" 'model = "cxr-resnet-small"' 'modality = ["NO-SUCH-MODALITY"]' >"$run/carina.toml"
          else
            printf '%s\n' "# analysis on: default routing (CR/DX chest -> the first image model)" >"$run/carina.toml"
          fi
          "$CARINA_BIN" serve --config "$run/carina.toml" --http "127.0.0.1:$port" \
            --data-dir "$run/data" --models "$MODELS" --dimse "127.0.0.1:$dport" >"$run/carina.log" 2>&1 &
          carina_pid=$!
          wait_carina "$port" "$dport"
          measure carina "$mode" "$clients" "$analysis" "http://127.0.0.1:$port" \
            "http://127.0.0.1:$port/dicomweb" "$dport" CARINA "$carina_pid" "$carina_version" "$carina_env"
          kill "$carina_pid"; wait "$carina_pid" 2>/dev/null || true; carina_pid=""
        else
          orthanc_dir="$run/orthanc"
          info=$($H orthanc-start --dir "$orthanc_dir")
          read -r ohttp odicom opid < <(echo "$info" | $PY -c "import json,sys; d=json.load(sys.stdin); print(d['http'], d['dicom_port'], d['pid'])")
          measure orthanc "$mode" "$clients" none "$ohttp" "$ohttp/dicom-web" "$odicom" ORTHANC "$opid" "$orthanc_version"
          $PY tests/orthanc/orthanc.py stop --dir "$orthanc_dir" >/dev/null; orthanc_dir=""
        fi
        [ "${KEEP:-0}" = 1 ] || rm -rf "$run/data" "$run/orthanc/storage"
      done
    done
  done
done

echo
echo "Ingest, $N DX instances of $(( $(du -cb "$WORK"/files/*.dcm | tail -1 | cut -f1) / N / 1000 )) KB, $(nproc) cores, run $RUN_ID (lines in $OUT)"
echo
$H table --out "$OUT" --run-id "$RUN_ID"
echo
echo "$fs" | $PY -c "
import json, sys
d = json.load(sys.stdin)
w = ', '.join(f'{k} writer(s) {v}/s' for k, v in d['writers'].items())
print(f\"fsync limit ({d.get('device', '?')} {d.get('fstype', '')}, {d['bytes_per_write']} B write + fsync + rename + folder fsync): {w}\")"
