#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (idempotent), then
# formats-check, lints, builds the tests once and runs them all (unit,
# property, conformance, HTTP/WebSocket integration, and the headless Chromium
# story against the real frontend).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-test-deps.sh

# The browser test serves the real frontend from here (installed once).
export COMFYUME_TEST_FRONTEND_DIR="${COMFYUME_TEST_FRONTEND_DIR:-$PWD/target/test-data/frontend/1.37.11}"
scripts/install-frontend.sh "$PWD/target/test-data"

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "[test] building tests"
cargo test --workspace --locked --no-run
echo "[test] running tests"
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
