#!/usr/bin/env bash
# Installs what the real-client tests drive, on a Debian machine that has only the Rust
# toolchain and Python 3 with pip, as root, non-interactively:
#   - Debian packages (versions as Debian 12 ships them): skopeo, umoci, buildah,
#     docker-registry (CNCF Distribution 2.8.2, the reference registry), curl, jq;
#     python3-venv only when the python3 on PATH cannot create a venv;
#   - the oras Python client and moto (the S3 emulator), pinned, in a venv at
#     target/test-deps/venv;
#   - Azurite (the Azure Blob emulator), pinned, from npm into target/test-deps/azurite
#     (nodejs and npm from Debian if the machine has no npm).
# Quick when everything is already there: it checks before installing and runs
# `apt-get update` at most once.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

ORAS_VERSION=0.2.43
REQUESTS_VERSION=2.32.3
MOTO_VERSION=5.2.5
AZURITE_VERSION=3.35.0
VENV=target/test-deps/venv
AZURITE_DIR=target/test-deps/azurite

# Debian package -> a command it provides.
declare -A PROVIDES=(
    [skopeo]=skopeo
    [umoci]=umoci
    [buildah]=buildah
    [podman]=podman
    [docker-registry]=docker-registry
    [curl]=curl
    [jq]=jq
)
missing=()
for pkg in skopeo umoci buildah podman docker-registry curl jq; do
    command -v "${PROVIDES[$pkg]}" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)

# A python3 that can make a venv with pip in it.
PYTHON=python3
venv_ok() { "$1" -c 'import venv, ensurepip' >/dev/null 2>&1; }
if ! command -v "$PYTHON" >/dev/null 2>&1 || ! venv_ok "$PYTHON"; then
    PYTHON=/usr/bin/python3
    venv_ok "$PYTHON" || missing+=(python3-venv)
fi

if ((${#missing[@]})); then
    echo "installing (apt): ${missing[*]}"
    # Debian's docker-registry package starts a registry service on :5000 (all
    # interfaces). The tests start their own on 127.0.0.1: keep the packaged one from
    # starting while installing, and disable it where systemd runs.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
        echo "  disabled the packaged docker-registry service (tests start their own)"
    fi
    for pkg in "${missing[@]}"; do
        echo "  $pkg $(dpkg-query -W -f='${Version}' "$pkg")"
    done
fi

py_version() {
    "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null
}
have_venv() {
    [ -x "$VENV/bin/python" ] && [ "$(py_version oras)" = "$ORAS_VERSION" ] &&
        [ "$(py_version moto)" = "$MOTO_VERSION" ] && [ -x "$VENV/bin/moto_server" ]
}
if ! have_venv; then
    echo "installing (pip, in $VENV): oras==$ORAS_VERSION moto[server]==$MOTO_VERSION"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        "oras==$ORAS_VERSION" "requests==$REQUESTS_VERSION" "moto[server]==$MOTO_VERSION"
    have_venv || { echo "oras/moto did not install into $VENV" >&2; exit 1; }
fi

if [ ! -x "$AZURITE_DIR/node_modules/.bin/azurite-blob" ] ||
    [ "$(node -p "require('./$AZURITE_DIR/node_modules/azurite/package.json').version" 2>/dev/null)" != "$AZURITE_VERSION" ]; then
    echo "installing (npm, in $AZURITE_DIR): azurite@$AZURITE_VERSION"
    mkdir -p "$AZURITE_DIR"
    npm install --prefix "$AZURITE_DIR" --no-audit --no-fund --loglevel=error \
        "azurite@$AZURITE_VERSION" >/dev/null
    [ -x "$AZURITE_DIR/node_modules/.bin/azurite-blob" ] ||
        { echo "azurite did not install into $AZURITE_DIR" >&2; exit 1; }
fi

echo "test dependencies: skopeo $(skopeo --version | awk '{print $3}')," \
    "umoci $(umoci --version | awk '{print $3}')," \
    "buildah $(buildah --version | awk '{print $3}')," \
    "distribution $(dpkg-query -W -f='${Version}' docker-registry)," \
    "oras $ORAS_VERSION, moto $MOTO_VERSION ($VENV)," \
    "azurite $AZURITE_VERSION ($AZURITE_DIR)"
