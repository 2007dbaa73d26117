#!/usr/bin/env bash
# Sets up and starts ComfyUMe on a fresh machine with embedded defaults:
# SQLite and files under ./data, the pinned ComfyUI frontend from PyPI, demo
# accounts (printed below), and the built-in simulator when no GPU backend is
# configured (COMFYUI_URLS / INFERENCE_MODE, see .env.example).
#
# `scripts/demo.sh --serverless` (or DEMO_SERVERLESS=1) shows the serverless path on
# a laptop instead: INFERENCE_MODE=serverless against the provider emulator
# (comfyume-provider), which starts comfyume-worker replicas (each in front of a
# simulator) on demand, with a cold start of DEMO_COLD_START_MS (default 20000) and
# the endpoints h200-spot (active) and h200-on-demand (failover). The instructor's
# /admin/api/serverless shows the endpoints; the emulator's /_emulator/evict evicts a
# spot replica mid-job.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATA_DIR="${COMFYUME_DATA_DIR:-data}"
LISTEN="${COMFYUME_LISTEN:-127.0.0.1:8188}"
BIN=target/release/comfyume
SERVERLESS="${DEMO_SERVERLESS:-0}"
[ "${1:-}" = "--serverless" ] && SERVERLESS=1

echo "[demo] building (release)…"
if [ "$SERVERLESS" = 1 ]; then
    cargo build --release --bin comfyume --bin comfyume-provider --bin comfyume-worker --bin comfyume-sim
else
    cargo build --release --bin comfyume
fi
scripts/install-frontend.sh "$DATA_DIR"

CREDS="$DATA_DIR/demo-credentials.csv"
if [ ! -s "$CREDS" ]; then
    echo "[demo] creating demo accounts"
    tmp="$(mktemp)"
    "$BIN" --data-dir "$DATA_DIR" users create-workshop --count 3 --csv "$tmp" > /dev/null
    pw="$("$BIN" --data-dir "$DATA_DIR" users add instructor --admin | awk '/^password:/ {print $2}')"
    { cat "$tmp"; echo "instructor,$pw,/ (instructor: opens any /userNNN/; API under /admin/api/)"; } > "$CREDS"
    chmod 600 "$CREDS"
    rm -f "$tmp"
fi

echo
echo "  ComfyUMe demo — open http://$LISTEN/ and sign in with one of these:"
echo
column -s, -t < "$CREDS" | sed 's/^/    /'
echo
echo "  (kept in $CREDS; stop with Ctrl-C)"
echo
if [ "$SERVERLESS" != 1 ]; then
    exec "$BIN" --data-dir "$DATA_DIR" serve --listen "$LISTEN"
fi

# --- serverless: the provider emulator in front of worker replicas ---
PROVIDER_LISTEN="${PROVIDER_LISTEN:-127.0.0.1:8900}"
COLD_MS="${DEMO_COLD_START_MS:-20000}"
# serve never asks a serverless endpoint for node definitions at start: import the
# simulator's once (a real workshop imports its ComfyUI's, or warms up first).
if [ ! -s "$DATA_DIR/object_info.json" ]; then
    sim_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    target/release/comfyume-sim --listen "127.0.0.1:$sim_port" > /dev/null 2>&1 &
    sim_pid=$!
    for _ in $(seq 50); do
        curl -sf "http://127.0.0.1:$sim_port/object_info" -o "$DATA_DIR/object_info.json" && break
        sleep 0.2
    done
    kill "$sim_pid" 2>/dev/null || true
    wait "$sim_pid" 2>/dev/null || true
fi
"$BIN" --data-dir "$DATA_DIR" object-info import "$DATA_DIR/object_info.json" > /dev/null

echo "[demo] provider emulator on http://$PROVIDER_LISTEN (cold start ${COLD_MS} ms, up to 3 replicas)"
setsid target/release/comfyume-provider --listen "$PROVIDER_LISTEN" \
    --deployment "h200-spot:spot=true,cold_start_ms=$COLD_MS" \
    --deployment "h200-on-demand:cold_start_ms=$COLD_MS" \
    --max-replicas 3 --scale-down-delay-ms 120000 \
    --worker-bin target/release/comfyume-worker --sim-bin target/release/comfyume-sim \
    > /dev/null &
provider_pid=$!
# The emulator and its replicas share a process group: stop them all on exit.
trap 'kill -TERM -- "-$provider_pid" 2>/dev/null || true' EXIT
echo "  evict the spot replica mid-job:  curl -X POST http://$PROVIDER_LISTEN/_emulator/evict -H 'content-type: application/json' -d '{\"deployment\":\"h200-spot\"}'"
echo

INFERENCE_MODE=serverless \
SERVERLESS_ENDPOINT_H200_SPOT="http://$PROVIDER_LISTEN/h200-spot" \
SERVERLESS_ENDPOINT_H200_ON_DEMAND="http://$PROVIDER_LISTEN/h200-on-demand" \
SERVERLESS_ACTIVE=h200-spot SERVERLESS_FAILOVER=h200-on-demand \
VERDA_API_URL="http://$PROVIDER_LISTEN/v1" VERDA_CLIENT_ID=emulator-client VERDA_CLIENT_SECRET=emulator-secret \
SERVERLESS_POLL_SECS=5 SERVERLESS_COLD_START_AFTER_SECS=3 SERVERLESS_COLD_START_ESTIMATE_SECS=$((COLD_MS / 1000 + 5)) \
    "$BIN" --data-dir "$DATA_DIR" serve --listen "$LISTEN"
