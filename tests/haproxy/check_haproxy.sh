#!/usr/bin/env bash
# Runs Debian's haproxy on docker/haproxy.cfg, unchanged, in front of small Python HTTP servers
# found through tests/haproxy/dns_stub.py, and checks what the scaled-out deployment relies on:
#   1. DNS discovery: both addresses of carina.test become servers; requests alternate.
#   2. Headers: X-Request-ID kept when sent, generated when absent; X-Forwarded-For added.
#   3. Readiness: a server whose /readyz answers 503 gets no traffic; it returns when ready.
#   4. Failover: after SIGKILL of one server every request still succeeds (no client-visible
#      error), and haproxy marks it DOWN within ~1-2 s.
#   5. Scale change through DNS: a new address in the answers gets traffic, a removed one none.
#   6. No server left: the load balancer answers 503 (and /haproxy/healthz 503).
# Needs haproxy (apt-get install haproxy), python3 and curl. Uses 127.0.0.2-127.0.0.4 (Linux
# routes all of 127.0.0.0/8 to loopback). Exit status 0 when every check passed.
# Usage: tests/haproxy/check_haproxy.sh [-v]   (-v: print the haproxy log at the end)
#        HAPROXY_CFG=other.cfg tests/haproxy/check_haproxy.sh   (check another file)
set -euo pipefail
cd "$(dirname "$0")/../.."
cfg=${HAPROXY_CFG:-docker/haproxy.cfg}
verbose=0; [ "${1:-}" = "-v" ] && verbose=1

for cmd in haproxy python3 curl; do
  command -v "$cmd" >/dev/null || { echo "check_haproxy: '$cmd' not found (apt-get install -y haproxy curl)" >&2; exit 2; }
done

work=$(mktemp -d -t carina-haproxy.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
  echo "FAIL: $*" >&2
  echo "--- haproxy log (last 40 lines)" >&2
  tail -n 40 "$work/haproxy.log" >&2 2>/dev/null || true
  exit 1
}
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

# --- the replicas: / answers their own address, /readyz 200 (503 while $work/notready-ADDR exists)
cat >"$work/backend.py" <<'PY'
import http.server, os, sys
host, port, flagdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/readyz":
            ready = not os.path.exists(os.path.join(flagdir, "notready-" + host))
            code, body = (200, b"ready") if ready else (503, b"not ready")
        else:
            code, body = 200, host.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Seen-Request-ID", self.headers.get("X-Request-ID", ""))
        self.send_header("X-Seen-Forwarded-For", self.headers.get("X-Forwarded-For", ""))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer((host, port), H)
print("PORT", srv.server_address[1], flush=True)
srv.serve_forever()
PY

backend_pid=()   # by address suffix: backend_pid[2] is 127.0.0.2
bound_port=""
start_backend() { # ADDR PORT -> sets bound_port; fails when it cannot bind
  local addr=$1 port=$2 out="$work/backend-$1.out" i pid
  python3 "$work/backend.py" "$addr" "$port" "$work" >"$out" 2>"$work/backend-$addr.err" &
  pid=$!
  pids+=("$pid"); backend_pid[${addr##*.}]=$pid
  for i in $(seq 50); do
    if grep -qs '^PORT ' "$out"; then bound_port=$(awk '/^PORT /{print $2; exit}' "$out"); return 0; fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}
kill_backend() { # ADDR... : SIGKILL, reaped quietly
  local a
  for a in "$@"; do kill -KILL "${backend_pid[${a##*.}]}" 2>/dev/null || true; done
  for a in "$@"; do { wait "${backend_pid[${a##*.}]}"; } 2>/dev/null || true; done
}

# Same port P on 127.0.0.2 and 127.0.0.3 (one DNS name, one port, like compose replicas).
P=""
for attempt in 1 2 3 4 5; do
  start_backend 127.0.0.2 0 || fail "cannot start the server on 127.0.0.2"
  if start_backend 127.0.0.3 "$bound_port"; then P=$bound_port; break; fi
  kill_backend 127.0.0.2
done
[ -n "$P" ] || fail "no port free on both 127.0.0.2 and 127.0.0.3"

python3 tests/haproxy/dns_stub.py --port 0 --answer 127.0.0.2 --answer 127.0.0.3 \
  --answers-file "$work/answers" >"$work/dns.out" 2>"$work/dns.err" &
pids+=("$!")
for _ in $(seq 50); do grep -qs '^PORT ' "$work/dns.out" && break; sleep 0.05; done
DNS_PORT=$(awk '/^PORT /{print $2; exit}' "$work/dns.out")
[ -n "$DNS_PORT" ] || fail "dns_stub did not start: $(cat "$work/dns.err")"

LB_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export CARINA_LB_BIND="127.0.0.1:$LB_PORT" CARINA_DNS="127.0.0.1:$DNS_PORT" CARINA_UPSTREAM="carina.test:$P"
LB="http://127.0.0.1:$LB_PORT"
echo "backends 127.0.0.2:$P 127.0.0.3:$P, dns_stub 127.0.0.1:$DNS_PORT, haproxy $CARINA_LB_BIND"

haproxy -c -q -f "$cfg" || fail "haproxy -c rejected $cfg"
t_start=$(now)
haproxy -f "$cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=("$!")

# One request: prints "<http status> <body>" (status 000 when curl got no answer).
req() { curl -s -m 5 -o "$work/body" -w '%{http_code}' "$@" "$LB/" 2>/dev/null | tr -d '\n' || true; echo " $(cat "$work/body" 2>/dev/null)"; rm -f "$work/body"; }
# Sends requests until the body satisfies the predicate function $1 (or $2 seconds pass).
until_body() {
  local pred=$1 limit=$2 t0 r
  t0=$(now)
  while :; do
    r=$(req); "$pred" "${r#* }" && return 0
    awk -v a="$t0" -v b="$EPOCHREALTIME" -v l="$limit" 'BEGIN { exit !(b - a > l) }' && return 1
    sleep 0.05
  done
}

# --- 1. discovery and round robin ----------------------------------------------------------
seen2=0; seen3=0; t0=$(now)
while [ $((seen2 * seen3)) = 0 ]; do
  case "$(req)" in "200 127.0.0.2") seen2=1 ;; "200 127.0.0.3") seen3=1 ;; esac
  awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { exit !(b - a > 10) }' && fail "both servers not reachable through haproxy within 10 s"
  sleep 0.05
done
echo "ok 1a: both servers in rotation $(since "$t_start") s after haproxy started (DNS + first checks)"
seq_out=""; prev=""
for i in $(seq 10); do
  r=$(req); [ "${r%% *}" = 200 ] || fail "request $i answered '$r'"
  b=${r#* }; [ "$b" != "$prev" ] || fail "round robin: two answers in a row from $b (sequence: $seq_out $b)"
  prev=$b; seq_out="$seq_out ${b##*.}"
done
echo "ok 1b: 10 requests alternate between the servers (last octets:$seq_out)"

# --- 2. headers ------------------------------------------------------------------------------
h=$(curl -s -m 5 -D - -o /dev/null -H 'X-Request-ID: test-req-42' "$LB/")
grep -qi '^X-Seen-Request-ID: test-req-42' <<<"$h" || fail "X-Request-ID not passed through: $h"
grep -qi '^X-Seen-Forwarded-For: 127.0.0.1' <<<"$h" || fail "X-Forwarded-For not added: $h"
h=$(curl -s -m 5 -D - -o /dev/null "$LB/")
gen=$(grep -i '^X-Seen-Request-ID:' <<<"$h" | tr -d '\r' | awk '{print $2}')
[ -n "$gen" ] || fail "no X-Request-ID generated for a request without one: $h"
echo "ok 2: X-Request-ID kept (test-req-42) or generated ($gen); X-Forwarded-For: 127.0.0.1"

# --- 3. readiness ------------------------------------------------------------------------------
touch "$work/notready-127.0.0.3"; t0=$(now)
# Out of rotation once 8 answers in a row come from .2.
n=0; total=0; t_last3="0.00"; while [ $n -lt 8 ]; do
  r=$(req); total=$((total + 1)); [ "${r%% *}" = 200 ] || fail "request answered '$r' while 127.0.0.3 was not ready"
  if [ "${r#* }" = 127.0.0.2 ]; then n=$((n + 1)); else n=0; t_last3=$(since "$t0"); fi
  awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { exit !(b - a > 5) }' && fail "127.0.0.3 still served 5 s after /readyz turned 503"
done
rm -f "$work/notready-127.0.0.3"; t0=$(now)
is3() { [ "$1" = 127.0.0.3 ]; }
until_body is3 5 || fail "127.0.0.3 not back 5 s after /readyz turned 200"
echo "ok 3: /readyz 503 took 127.0.0.3 out of rotation (its last request ${t_last3} s after; $total/$total requests 200); back $(since "$t0") s after /readyz answered 200 again"

# --- 4. failover after SIGKILL -----------------------------------------------------------------
down_before=$(grep -cs 'is DOWN' "$work/haproxy.log" || true)
kill_backend 127.0.0.3; t_kill=$(now)
total=0; bad=0; from3=0; t_down=""; last3=""
while awk -v a="$t_kill" -v b="$EPOCHREALTIME" 'BEGIN { exit !(b - a < 3) }'; do
  r=$(req); total=$((total + 1))
  case "$r" in
    "200 127.0.0.2") ;;
    "200 127.0.0.3") from3=$((from3 + 1)); last3=$(since "$t_kill") ;;
    *) bad=$((bad + 1)); echo "  request $total after the kill answered '$r'" ;;
  esac
  if [ -z "$t_down" ] && [ "$(grep -cs 'is DOWN' "$work/haproxy.log" || true)" -gt "$down_before" ]; then
    t_down=$(since "$t_kill")
  fi
done
[ "$from3" = 0 ] || fail "$from3 answers from the killed server (last at ${last3} s)"
[ "$bad" = 0 ] || fail "$bad of $total requests failed after one server was killed"
[ -n "$t_down" ] || fail "haproxy did not mark the killed server DOWN within 3 s"
awk -v d="$t_down" 'BEGIN { exit !(d <= 2.0) }' || fail "the killed server was marked DOWN only after ${t_down} s"
echo "ok 4: killed 127.0.0.3; $total/$total requests in the next 3 s answered 200 by 127.0.0.2; marked DOWN after ~${t_down} s"

# --- 5. scale change through DNS ----------------------------------------------------------------
start_backend 127.0.0.4 "$P" || fail "cannot start the server on 127.0.0.4:$P"
printf '127.0.0.2\n127.0.0.4\n' >"$work/answers.tmp" && mv "$work/answers.tmp" "$work/answers"
t0=$(now)
is4() { [ "$1" = 127.0.0.4 ]; }
until_body is4 10 || fail "127.0.0.4 got no traffic 10 s after it appeared in DNS"
t_new=$(since "$t0")
seq_out=""; for i in $(seq 6); do r=$(req); [ "${r%% *}" = 200 ] || fail "answer '$r'"; seq_out="$seq_out ${r##*.}"; done
[[ "$seq_out" == *2* && "$seq_out" == *4* && "$seq_out" != *3* ]] || fail "after the DNS change: last octets$seq_out"
echo "ok 5: DNS answer changed to .2+.4: 127.0.0.4 served after ${t_new} s; then alternating (last octets:$seq_out)"

# --- 6. no server left ---------------------------------------------------------------------------
kill_backend 127.0.0.2 127.0.0.4; t0=$(now)
code=""
for _ in $(seq 100); do
  code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$LB/haproxy/healthz" || true)
  [ "$code" = 503 ] && break; sleep 0.05
done
[ "$code" = 503 ] || fail "/haproxy/healthz answered $code with no server alive"
r=$(req); [ "${r%% *}" = 503 ] || fail "with no server alive, / answered '$r' instead of 503"
echo "ok 6: all servers killed: / and /haproxy/healthz answer 503 (after $(since "$t0") s)"

if [ "$verbose" = 1 ]; then echo "--- haproxy log"; cat "$work/haproxy.log"; fi
echo "PASS: $cfg (haproxy $(haproxy -v | awk 'NR==1{print $3}'))"
