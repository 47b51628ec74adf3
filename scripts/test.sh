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
# 1. everything, on the embedded SQLite store
cargo test --lib --bins --tests "$@"
# 2. the store-backed suites again on PostgreSQL (a fresh database per test, dropped here next
#    time); the scale-out and fault tests in tests/durability.rs use it in step 1 already
PG_URL=${CARINA_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}
if command -v psql >/dev/null 2>&1; then
  psql "$PG_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'carina_test_%'" 2>/dev/null |
    while read -r db; do psql "$PG_URL" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; done
fi
CARINA_TEST_DATABASE_URL=$PG_URL cargo test --test api --test auth --test dicom --test dimse --test fhir \
  --test jobs --test peers "$@"
