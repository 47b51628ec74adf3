#!/usr/bin/env bash
# Installs what Carina needs, into folders of this checkout (idempotent; only --test may use apt):
#   .deps/onnxruntime/   libonnxruntime.so from PyPI's onnxruntime wheel (ort's own download
#                        cannot reach its host here); found automatically by `carina`.
#   .deps/cmake/         cmake from PyPI when the system has none: building the CharLS (JPEG-LS)
#                        codec needs it; scripts put .deps/cmake/bin on PATH (see scripts/env.sh).
#   .venv/               (with --test) Python tools the tests call: FHIR R4 validators, DICOM
#                        clients, reference decoders.
#   tests/fhir/node_modules  (with --test) the official FHIR R4 JSON schema validator.
#   tests/auth/node_modules  (with --test) oidc-provider + jose: the OAuth2 authorization server
#                        and JWT tools of the auth tests.
#   haproxy              (with --test) Debian's HAProxy, for the scale-out test (apt-get).
#   dcmtk                (with --test) Debian's dcmtk (storescu/echoscu), a real DIMSE peer for
#                        the tests; installed with apt-get (needs root or sudo) when missing.
# Usage: scripts/setup.sh [--test] [--gpu]
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=${ORT_VERSION:-1.31.1}
PY=${PYTHON:-python3}
want_test=0; want_gpu=0
for a in "$@"; do
  case "$a" in
    --test) want_test=1 ;;
    --gpu) want_gpu=1 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

extract_ort() { # wheel -> .deps/<dir>/ (libonnxruntime*.so*, kept together)
  "$PY" - "$1" "$2" <<'PYEOF'
import os, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        base = os.path.basename(n)
        if n.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            with z.open(n) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
PYEOF
}

if ! ls .deps/onnxruntime/libonnxruntime.so.* >/dev/null 2>&1; then
  echo "setup: fetching onnxruntime==$ORT_VERSION (CPU) from PyPI" >&2
  rm -rf .deps/wheels && mkdir -p .deps/wheels
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .deps/wheels "onnxruntime==$ORT_VERSION"
  extract_ort .deps/wheels/onnxruntime-*.whl .deps/onnxruntime
  rm -rf .deps/wheels
fi

if ! command -v cmake >/dev/null 2>&1 && [ ! -x .deps/cmake/bin/cmake ]; then
  echo "setup: installing cmake from PyPI into .deps/cmake (needed to build the JPEG-LS codec)" >&2
  "$PY" -m venv .deps/cmake
  .deps/cmake/bin/pip install -q "cmake>=3.20,<4"
fi

if [ "$want_gpu" = 1 ] && ! ls .deps/onnxruntime-gpu/libonnxruntime_providers_cuda.so >/dev/null 2>&1; then
  # CUDA provider + CUDA 13 / cuDNN 9 runtime libraries, all as PyPI wheels, into a venv.
  echo "setup: installing onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION into .deps/gpu-venv" >&2
  "$PY" -m venv .deps/gpu-venv
  .deps/gpu-venv/bin/pip install -q "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
  site=$(.deps/gpu-venv/bin/python -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))')
  mkdir -p .deps/onnxruntime-gpu && cp -a "$site"/capi/libonnxruntime* .deps/onnxruntime-gpu/
fi

if [ "$want_test" = 1 ]; then
  if ! command -v storescu >/dev/null 2>&1; then
    echo "setup: installing dcmtk (apt-get)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q dcmtk >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dcmtk >/dev/null; }
  fi
  # --- Orthanc PACS (+ DICOMweb plugin) for tests/orthanc/orthanc.py -------------------------
  # Tests start their own instances on free loopback ports, so the Debian service that the
  # package may auto-start is stopped and disabled.
  if ! command -v Orthanc >/dev/null 2>&1; then
    echo "setup: installing orthanc + orthanc-dicomweb (apt-get)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q orthanc orthanc-dicomweb >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q orthanc orthanc-dicomweb >/dev/null; }
    $SUDO service orthanc stop >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
    $SUDO update-rc.d orthanc disable >/dev/null 2>&1 || true
  fi
  # --- end Orthanc ---------------------------------------------------------------------------
  # --- rsyslog (tests/audit.rs: a real syslog collector for the audit feed) ------------------
  if ! command -v rsyslogd >/dev/null 2>&1; then
    echo "setup: installing rsyslog (apt-get)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q rsyslog >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q rsyslog >/dev/null; }
    $SUDO service rsyslog stop >/dev/null 2>&1 || true
  fi
  # --- HAProxy (tests/durability.rs runs replicas behind it with docker/haproxy.cfg) ---------
  if ! command -v haproxy >/dev/null 2>&1; then
    echo "setup: installing haproxy (apt-get)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q haproxy >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q haproxy >/dev/null; }
    $SUDO service haproxy stop >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then $SUDO systemctl disable --now haproxy >/dev/null 2>&1 || true; fi
    $SUDO update-rc.d haproxy disable >/dev/null 2>&1 || true
  fi
  if [ ! -x .venv/bin/python ] || ! cmp -s tests/requirements.txt .venv/.requirements 2>/dev/null; then
    echo "setup: creating .venv with tests/requirements.txt" >&2
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -r tests/requirements.txt
    cp tests/requirements.txt .venv/.requirements
  fi
  # MLServer (tests/kserve.rs: a real Open Inference Protocol server) needs pydantic 2, the
  # test tools above pydantic 1: a venv of its own.
  if [ ! -x .deps/mlserver-venv/bin/mlserver ] || ! cmp -s tests/kserve/requirements.txt .deps/mlserver-venv/.requirements 2>/dev/null; then
    echo "setup: creating .deps/mlserver-venv with tests/kserve/requirements.txt" >&2
    "$PY" -m venv .deps/mlserver-venv
    .deps/mlserver-venv/bin/pip install -q -r tests/kserve/requirements.txt
    cp tests/kserve/requirements.txt .deps/mlserver-venv/.requirements
  fi
  if [ -f tests/fhir/package.json ] && [ ! -d tests/fhir/node_modules ]; then
    echo "setup: npm install in tests/fhir" >&2
    (cd tests/fhir && npm install --no-audit --no-fund --silent)
  fi
  if [ -f tests/auth/package.json ] && [ ! -d tests/auth/node_modules ]; then
    echo "setup: npm ci in tests/auth (oidc-provider authorization server for the auth tests)" >&2
    (cd tests/auth && { npm ci --no-audit --no-fund --silent || npm install --no-audit --no-fund --silent; })
  fi
fi
