#!/usr/bin/env bash
# Installs what the integration and browser tests need on Debian bookworm, as root:
#   - Debian: redis-server, chromium (+ fonts so screenshots have readable text), nginx (the
#             reverse-proxy test starts its own on a free port), prometheus (prometheus and
#             promtool) and prometheus-alertmanager (amtool): the monitoring tests check
#             deploy/monitoring/ with them; nodejs/npm if absent
#   - PyPI:   comfyui-frontend-package (the frontend we serve), moto[server] (local S3 server),
#             PyYAML (the monitoring tests read deploy/monitoring/'s YAML with it)
#   - npm:    tests/browser/node_modules from package-lock.json (playwright-core, no browser download)
#   - crates.io: cargo-fuzz (the bounded fuzz run; `--sanitizer none` works on stable Rust)
# Idempotent: every step checks first, so a rerun on a prepared machine takes a few seconds.
# Only Debian's, PyPI's and npm's registries are used.
set -euo pipefail

FRONTEND_VERSION="${FRONTEND_VERSION:-1.37.11}"
MOTO_VERSION="${MOTO_VERSION:-5.2.1}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BROWSER_DIR="$REPO_ROOT/tests/browser"
PYTHON="${PYTHON:-python3}"

log() { printf '[install-test-deps] %s\n' "$*"; }
die() { printf '[install-test-deps] error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    die "run as root (apt-get needs it)"
fi

# --- Debian packages ---------------------------------------------------------
apt_missing=()
want_apt() {
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            apt_missing+=("$pkg")
        fi
    done
}
want_apt redis-server chromium fonts-dejavu-core ca-certificates nginx
want_apt prometheus prometheus-alertmanager
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    want_apt nodejs npm
fi
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    want_apt python3 python3-pip
fi

if [ "${#apt_missing[@]}" -gt 0 ]; then
    # Update the package lists only when one of the wanted packages has no install candidate
    # (fresh machine, or lists too old to know it).
    need_update=0
    for pkg in "${apt_missing[@]}"; do
        cand="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
        if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
            need_update=1
        fi
    done
    if [ "$need_update" -eq 1 ]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get update -qq
    fi
    log "apt-get install --no-install-recommends ${apt_missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"
else
    log "Debian packages already installed (redis-server, chromium, fonts, nginx, prometheus, node, pip)"
fi

# --- Python packages ---------------------------------------------------------
pip_flags=(--disable-pip-version-check --no-input -q --root-user-action=ignore)
# Debian's own python3 refuses system-wide pip installs (PEP 668); pyenv and venvs do not.
if "$PYTHON" -c 'import sys, sysconfig, os; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
    pip_flags+=(--break-system-packages)
fi

installed_version() {
    "$PYTHON" -c 'import sys
from importlib.metadata import version, PackageNotFoundError
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass' "$1"
}

if [ "$(installed_version comfyui-frontend-package)" = "$FRONTEND_VERSION" ]; then
    log "comfyui-frontend-package $FRONTEND_VERSION already installed"
else
    log "pip install comfyui-frontend-package==$FRONTEND_VERSION"
    "$PYTHON" -m pip install "${pip_flags[@]}" "comfyui-frontend-package==$FRONTEND_VERSION"
fi

# moto's server mode also needs its [server] extras (flask, flask-cors, ...).
if [ "$(installed_version moto)" = "$MOTO_VERSION" ] \
    && "$PYTHON" -c 'import moto.server, flask, flask_cors' >/dev/null 2>&1; then
    log "moto[server] $MOTO_VERSION already installed"
else
    log "pip install moto[server]==$MOTO_VERSION"
    "$PYTHON" -m pip install "${pip_flags[@]}" "moto[server]==$MOTO_VERSION"
fi

# The monitoring tests read deploy/monitoring/'s YAML files (moto usually brings PyYAML along).
if "$PYTHON" -c 'import yaml' >/dev/null 2>&1; then
    log "PyYAML already installed"
else
    log "pip install PyYAML"
    "$PYTHON" -m pip install "${pip_flags[@]}" "PyYAML>=6,<7"
fi

# --- npm packages for the browser story ----------------------------------------
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || die "Node.js >= 20 needed by playwright-core, found $(node --version)"

[ -f "$BROWSER_DIR/package-lock.json" ] || die "missing $BROWSER_DIR/package-lock.json"
want_pw="$(node -p "require('$BROWSER_DIR/package-lock.json').packages['node_modules/playwright-core'].version")"
have_pw="$(node -p "try { require('$BROWSER_DIR/node_modules/playwright-core/package.json').version } catch { '' }")"
if [ "$have_pw" = "$want_pw" ]; then
    log "playwright-core $want_pw already in tests/browser/node_modules"
else
    log "npm ci in tests/browser (playwright-core $want_pw)"
    (cd "$BROWSER_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi

# --- cargo-fuzz for the bounded fuzz run (scripts/fuzz.sh) ----------------------
CARGO_FUZZ_VERSION="${CARGO_FUZZ_VERSION:-0.13.2}"
if cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    log "cargo-fuzz $CARGO_FUZZ_VERSION already installed"
else
    log "cargo install cargo-fuzz@$CARGO_FUZZ_VERSION"
    cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

log "ok: redis-server $(redis-server --version | awk '{print $3}'), $(chromium --version 2>/dev/null | head -1), $(/usr/sbin/nginx -v 2>&1), $(prometheus --version 2>&1 | head -1 | cut -d' ' -f1-3), node $(node --version), frontend $FRONTEND_VERSION, moto $MOTO_VERSION, playwright-core $want_pw"
