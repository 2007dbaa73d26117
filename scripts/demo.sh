#!/usr/bin/env bash
# Sets up and starts ComfyUMe on a fresh machine with embedded defaults:
# SQLite and files under ./data, the pinned ComfyUI frontend from PyPI, demo
# accounts (printed below), and the built-in simulator when no GPU backend is
# configured (COMFYUI_URLS / INFERENCE_MODE, see .env.example).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATA_DIR="${COMFYUME_DATA_DIR:-data}"
LISTEN="${COMFYUME_LISTEN:-127.0.0.1:8188}"
BIN=target/release/comfyume

echo "[demo] building (release)…"
cargo build --release --bin comfyume
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
exec "$BIN" --data-dir "$DATA_DIR" serve --listen "$LISTEN"
