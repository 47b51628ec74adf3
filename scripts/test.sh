#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need (ONNX Runtime from
# PyPI into .deps/, the FHIR validators into .venv/ and tests/fhir/node_modules), then runs
# every Rust test (unit, router, golden Grad-CAM, CLI + external FHIR validation). Benches are
# compiled by `cargo clippy --all-targets` in CI and run with `cargo bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
source scripts/env.sh
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cargo test --lib --bins --tests "$@"
