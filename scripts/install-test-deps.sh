#!/usr/bin/env bash
# Installs what the tests drive, on a Debian machine that has only the Rust toolchain
# (rustup) and Python 3, as root, non-interactively. It first prints what is missing and
# what it will install (package, version, where), then installs only that:
#
#   apt     Debian packages, system-wide (versions as Debian 12 ships them): skopeo,
#           umoci, buildah, podman, docker-registry (CNCF Distribution 2.8.2, the
#           reference registry), prometheus (the server and promtool, for
#           scripts/e2e-metrics.sh), postgresql (the server binaries; the tests of
#           registry-store-postgres create their own cluster in a temp dir),
#           apache2-utils (`htpasswd -B`) and openssl (a test CA) for
#           scripts/e2e-auth.sh, curl, jq; nodejs and npm when there is no npm;
#           python3-venv only when the python3 on PATH cannot create a venv.
#   python  the oras Python client and moto (the S3 emulator), pinned, in a venv at
#           .test-deps/venv
#   azurite Azurite (the Azure Blob emulator), pinned, from npm into .test-deps/azurite
#   fuzz    a nightly Rust toolchain (rustup, minimal profile) and cargo-fuzz, pinned
#           (cargo install, into ~/.cargo/bin)
#
#   scripts/install-test-deps.sh               # everything
#   scripts/install-test-deps.sh fuzz          # only some groups (apt python azurite fuzz)
#   scripts/install-test-deps.sh --plan [...]  # only print what would be installed;
#                                              # exit 1 if anything is missing
#
# .test-deps/ is at the repository root, outside target/ (so `cargo clean` keeps it) and
# ignored by git; delete it to reinstall. Quick when everything is already there: it
# checks before installing and runs `apt-get update` at most once.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive

ORAS_VERSION=0.2.43
REQUESTS_VERSION=2.32.3
MOTO_VERSION=5.2.5
AZURITE_VERSION=3.35.0
CARGO_FUZZ_VERSION=0.13.2
DEPS=$ROOT/.test-deps
VENV=$DEPS/venv
AZURITE_DIR=$DEPS/azurite

plan_only=0
groups=()
for arg in "$@"; do
    case "$arg" in
    --plan) plan_only=1 ;;
    apt | python | azurite | fuzz) groups+=("$arg") ;;
    *) echo "usage: $0 [--plan] [apt] [python] [azurite] [fuzz]" >&2; exit 2 ;;
    esac
done
((${#groups[@]})) || groups=(apt python azurite fuzz)
want() { [[ " ${groups[*]} " == *" $1 "* ]]; }

# ---------------------------------------------------------------- what is missing
# Debian package -> a command it provides.
declare -A PROVIDES=(
    [skopeo]=skopeo
    [umoci]=umoci
    [buildah]=buildah
    [podman]=podman
    [docker-registry]=docker-registry
    [prometheus]=promtool
    [curl]=curl
    [jq]=jq
    [postgresql]=pg_lsclusters
    [apache2-utils]=htpasswd
    [openssl]=openssl
)
apt_missing=()
if want apt || want python || want azurite; then
    if want apt; then
        for pkg in skopeo umoci buildah podman docker-registry prometheus postgresql apache2-utils openssl curl jq; do
            command -v "${PROVIDES[$pkg]}" >/dev/null 2>&1 || apt_missing+=("$pkg")
        done
    fi
    if want azurite; then
        command -v npm >/dev/null 2>&1 || apt_missing+=(nodejs npm)
    fi
fi

# A python3 that can make a venv with pip in it.
PYTHON=python3
venv_ok() { "$1" -c 'import venv, ensurepip' >/dev/null 2>&1; }
if want python; then
    if ! command -v "$PYTHON" >/dev/null 2>&1 || ! venv_ok "$PYTHON"; then
        PYTHON=/usr/bin/python3
        venv_ok "$PYTHON" || apt_missing+=(python3-venv)
    fi
fi

py_version() {
    "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null
}
have_venv() {
    [ -x "$VENV/bin/python" ] && [ "$(py_version oras)" = "$ORAS_VERSION" ] &&
        [ "$(py_version moto)" = "$MOTO_VERSION" ] && [ -x "$VENV/bin/moto_server" ] &&
        [ -x "$(head -n 1 "$VENV/bin/moto_server" | sed 's/^#!//')" ] # a moved venv breaks this
}
need_venv=0
want python && ! have_venv && need_venv=1

have_azurite() {
    [ -x "$AZURITE_DIR/node_modules/.bin/azurite-blob" ] &&
        [ "$(node -p "require('$AZURITE_DIR/node_modules/azurite/package.json').version" 2>/dev/null)" = "$AZURITE_VERSION" ]
}
need_azurite=0
want azurite && ! have_azurite && need_azurite=1

need_nightly=0
need_cargo_fuzz=0
if want fuzz; then
    rustup run nightly rustc --version >/dev/null 2>&1 || need_nightly=1
    [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" = "$CARGO_FUZZ_VERSION" ] || need_cargo_fuzz=1
fi

# ---------------------------------------------------------------- the plan
# Candidate versions need package lists: refresh them first if there are none.
apt_updated=0
apt_update() {
    ((apt_updated)) && return 0
    echo "  (apt-get update)"
    apt-get update -qq
    apt_updated=1
}
apt_candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }

if ((${#apt_missing[@]})) && ((!plan_only)); then
    for pkg in "${apt_missing[@]}"; do
        case "$(apt_candidate "$pkg")" in "" | "(none)") apt_update; break ;; esac
    done
fi

nothing=1
if ((${#apt_missing[@]} || need_venv || need_azurite || need_nightly || need_cargo_fuzz)); then
    nothing=0
    if ((plan_only)); then echo "would install:"; else echo "will install:"; fi
    for pkg in "${apt_missing[@]}"; do
        v=$(apt_candidate "$pkg")
        printf '  %-16s %-24s apt-get, system-wide\n' "$pkg" "${v:-(version after apt-get update)}"
    done
    ((${#apt_missing[@]})) && echo "  (apt-get also installs what these depend on, --no-install-recommends)"
    if ((need_venv)); then
        printf '  %-16s %-24s pip, in %s\n' oras "$ORAS_VERSION" "${VENV#"$ROOT"/}"
        printf '  %-16s %-24s pip, in %s (with its dependencies)\n' "moto[server]" "$MOTO_VERSION" "${VENV#"$ROOT"/}"
        printf '  %-16s %-24s pip, in %s\n' requests "$REQUESTS_VERSION" "${VENV#"$ROOT"/}"
    fi
    if ((need_azurite)); then
        printf '  %-16s %-24s npm, in %s\n' azurite "$AZURITE_VERSION" "${AZURITE_DIR#"$ROOT"/}"
    fi
    if ((need_nightly)); then
        printf '  %-16s %-24s rustup, minimal profile, in %s\n' "rust nightly" latest "${RUSTUP_HOME:-$HOME/.rustup}"
    fi
    if ((need_cargo_fuzz)); then
        printf '  %-16s %-24s cargo install --locked, into %s/bin\n' cargo-fuzz "$CARGO_FUZZ_VERSION" "${CARGO_HOME:-$HOME/.cargo}"
    fi
fi
if ((plan_only)); then
    ((nothing)) && echo "nothing to install"
    exit $((1 - nothing))
fi

# ---------------------------------------------------------------- install
if ((${#apt_missing[@]})); then
    echo "installing (apt): ${apt_missing[*]}"
    # Debian's docker-registry package starts a registry service on :5000 (all
    # interfaces), its prometheus package one on :9090. The tests start their own on
    # 127.0.0.1: keep the packaged ones from starting while installing, and disable
    # them where systemd runs.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt_update
    apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
    if [[ " ${apt_missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
        echo "  disabled the packaged docker-registry service (tests start their own)"
    fi
    if [[ " ${apt_missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service prometheus-node-exporter.service >/dev/null 2>&1 || true
        echo "  disabled the packaged prometheus service (scripts/e2e-metrics.sh starts its own)"
    fi
    for pkg in "${apt_missing[@]}"; do
        echo "  installed $pkg $(dpkg-query -W -f='${Version}' "$pkg")"
    done
fi

if ((need_venv)); then
    echo "installing (pip, in ${VENV#"$ROOT"/}): oras==$ORAS_VERSION moto[server]==$MOTO_VERSION"
    rm -rf "$VENV"
    mkdir -p "$DEPS"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        "oras==$ORAS_VERSION" "requests==$REQUESTS_VERSION" "moto[server]==$MOTO_VERSION"
    have_venv || { echo "oras/moto did not install into $VENV" >&2; exit 1; }
fi

if ((need_azurite)); then
    echo "installing (npm, in ${AZURITE_DIR#"$ROOT"/}): azurite@$AZURITE_VERSION"
    mkdir -p "$AZURITE_DIR"
    npm install --prefix "$AZURITE_DIR" --no-audit --no-fund --loglevel=error \
        "azurite@$AZURITE_VERSION" >/dev/null
    have_azurite || { echo "azurite did not install into $AZURITE_DIR" >&2; exit 1; }
fi

if ((need_nightly)); then
    echo "installing (rustup): the nightly toolchain, minimal profile"
    rustup toolchain install nightly --profile minimal
fi
if ((need_cargo_fuzz)); then
    echo "installing (cargo install): cargo-fuzz $CARGO_FUZZ_VERSION (compiles it, about a minute)"
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi

# ---------------------------------------------------------------- what is there now
have=()
if want apt; then
    have+=("skopeo $(skopeo --version | awk '{print $3}')"
        "umoci $(umoci --version | awk '{print $3}')"
        "buildah $(buildah --version | awk '{print $3}')"
        "podman $(podman --version | awk '{print $3}')"
        "distribution $(dpkg-query -W -f='${Version}' docker-registry)"
        "prometheus $(dpkg-query -W -f='${Version}' prometheus)"
        "apache2-utils $(dpkg-query -W -f='${Version}' apache2-utils)")
fi
want python && have+=("oras $ORAS_VERSION, moto $MOTO_VERSION (in ${VENV#"$ROOT"/})")
want azurite && have+=("azurite $AZURITE_VERSION (in ${AZURITE_DIR#"$ROOT"/})")
want fuzz && have+=("$(cargo fuzz --version), $(rustup run nightly rustc --version | awk '{print $1, $2}')")
if ((nothing)); then echo "test dependencies (all present):"; else echo "test dependencies:"; fi
printf '  %s\n' "${have[@]}"
