#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (idempotent), then
# formats-check, lints, builds the tests once and runs them all (unit,
# property, conformance, HTTP/WebSocket integration, and the headless Chromium
# story against the real frontend).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The build and the tests' temp folders need a few GB: say what there is, so a run that
# runs out of space says so at once.
disk() { df -h --output=avail,target "$PWD" "${TMPDIR:-/tmp}" | tail -n +2 | sort -u | sed "s/^/[test] disk free $1: /"; }
disk "at start"

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
echo "[test] fuzzing (bounded, FUZZ_SECONDS=${FUZZ_SECONDS:-20} per target)"
scripts/fuzz.sh
# Once, before the tests: otherwise the first `serve` they start compresses it in the
# background while the others run.
target/debug/comfyume frontend precompress --frontend-dir "$COMFYUME_TEST_FRONTEND_DIR"
echo "[test] running tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee "$log"
status="${PIPESTATUS[0]}"
set -e
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
disk "at the end"
exit "$status"
