#!/usr/bin/env bash
# Usage: scripts/install-frontend.sh DATA_DIR
#
# Puts the stock ComfyUI frontend (comfyui-frontend-package from PyPI, pinned) into
# DATA_DIR/frontend/<version>/, which is where `comfyume serve` serves it from.
# Source maps (*.map, about 26 MB) are left out. Idempotent: skips the copy when the target
# already holds the same number of files; otherwise copies into a temporary folder beside the
# target and renames it into place, so a half-done copy is never served.
set -euo pipefail

FRONTEND_VERSION="${FRONTEND_VERSION:-1.37.11}"
PYTHON="${PYTHON:-python3}"

log() { printf '[install-frontend] %s\n' "$*"; }
die() { printf '[install-frontend] error: %s\n' "$*" >&2; exit 1; }

[ "$#" -eq 1 ] && [ -n "$1" ] || die "usage: $0 DATA_DIR"
DATA_DIR="$1"
DEST="$DATA_DIR/frontend/$FRONTEND_VERSION"

installed_version() {
    "$PYTHON" -c 'from importlib.metadata import version, PackageNotFoundError
try:
    print(version("comfyui-frontend-package"))
except PackageNotFoundError:
    pass'
}

have="$(installed_version)"
if [ "$have" != "$FRONTEND_VERSION" ]; then
    log "comfyui-frontend-package ${have:-not installed}; pip install comfyui-frontend-package==$FRONTEND_VERSION"
    pip_flags=(--disable-pip-version-check --no-input -q --root-user-action=ignore)
    # Debian's own python3 refuses system-wide pip installs (PEP 668); pyenv and venvs do not.
    if "$PYTHON" -c 'import sys, sysconfig, os; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
        pip_flags+=(--break-system-packages)
    fi
    "$PYTHON" -m pip install "${pip_flags[@]}" "comfyui-frontend-package==$FRONTEND_VERSION"
fi

SRC="$("$PYTHON" -c 'import comfyui_frontend_package, os; print(os.path.join(os.path.dirname(comfyui_frontend_package.__file__), "static"))')"
[ -f "$SRC/index.html" ] || die "no index.html in $SRC"

# Our own .br/.gz copies and marker files (comfyume frontend precompress) are not the package's.
count_files() { find "$1" -type f ! -name '*.map' ! -name '*.br' ! -name '*.gz' ! -name '.*' | wc -l; }
want="$(count_files "$SRC")"

if [ -d "$DEST" ] && [ "$(count_files "$DEST")" -eq "$want" ] && [ -f "$DEST/index.html" ]; then
    log "frontend $FRONTEND_VERSION already in $DEST ($want files)"
    exit 0
fi

mkdir -p "$DATA_DIR/frontend"
TMP="$(mktemp -d "$DATA_DIR/frontend/.$FRONTEND_VERSION.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
log "copying $SRC -> $DEST ($want files, without *.map)"
tar -C "$SRC" --exclude='*.map' -cf - . | tar -C "$TMP" -xf -
chmod 755 "$TMP"
got="$(count_files "$TMP")"
[ "$got" -eq "$want" ] || die "copied $got files, expected $want"

if [ -e "$DEST" ]; then
    log "replacing incomplete $DEST"
    rm -rf "$DEST"
fi
mv "$TMP" "$DEST"
trap - EXIT
log "installed frontend $FRONTEND_VERSION in $DEST ($(du -sh "$DEST" | cut -f1))"
