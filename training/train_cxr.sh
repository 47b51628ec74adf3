#!/usr/bin/env sh
# Retrain the demo chest X-ray classifier (models/cxr-resnet-small) from ../shared/data.
# Usage: training/train_cxr.sh [extra train_cxr.py args]   (VENV=/path/to/venv to override)
set -eu
cd "$(dirname "$0")/.."
VENV="${VENV:-/work/venv-train}"
exec nice -n 10 "$VENV/bin/python" training/train_cxr.py "$@"
