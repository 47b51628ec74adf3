#!/usr/bin/env bash
# Starts Carina with embedded defaults (SQLite in ./data, the bundled models in ./models,
# HTTP on 127.0.0.1:8080: without [auth] Carina listens on loopback only), after installing ONNX Runtime from PyPI into .deps/ if needed.
# Extra arguments go to `carina serve` (e.g. --http 127.0.0.1:9000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec cargo run --release --bin carina -- serve "$@"
