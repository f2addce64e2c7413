#!/usr/bin/env bash
# Installs what the tests drive, on a Debian machine that has only the Rust toolchain
# and Python: skopeo and umoci (Debian), and the oras Python client in a venv under
# target/test-deps. Quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

ORAS_VERSION=0.2.43
missing=()
for tool in skopeo umoci; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]} (apt)"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv=target/test-deps/venv
if ! "$venv/bin/python" -c "import oras, requests" 2>/dev/null \
    || [ "$("$venv/bin/pip" show oras 2>/dev/null | sed -n 's/^Version: //p')" != "$ORAS_VERSION" ]; then
    echo "installing oras==$ORAS_VERSION (pip, in $venv)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "oras==$ORAS_VERSION" requests
fi
echo "test dependencies: $(skopeo --version), $(umoci --version), oras $ORAS_VERSION"
