# Shared by the e2e scripts and benches/scaleout.sh (sourced, not run): loopback
# ports, a throwaway PostgreSQL cluster, the serve binary and the check harness.
# Everything listens on 127.0.0.1.

# free_port: a free loopback port.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_port PORT NAME LOG: waits up to 30 s for PORT to accept; else prints LOG, exits 2.
wait_port() {
    local i
    for ((i = 0; i < 300; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$2 did not start on port $1:" >&2
    cat "$3" >&2
    exit 2
}

# init_postgres DIR: a new cluster (Debian's newest installed PostgreSQL, user
# `registry`, trust authentication on loopback, default durability) in DIR/pg; sets
# PG_PORT. As root the server runs as the `postgres` user, since PostgreSQL refuses
# root (DIR must then be searchable by it).
init_postgres() {
    PG_DIR=$1/pg
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    PG_PORT=$(free_port)
    mkdir -p "$PG_DIR"
    AS_PG=()
    if [ "$(id -u)" = 0 ]; then
        chmod o+x "$1"
        chown postgres:postgres "$PG_DIR"
        AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups)
    fi
    "${AS_PG[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U registry --auth=trust >"$PG_DIR/../initdb.log" 2>&1 ||
        { echo "initdb failed:" >&2; cat "$PG_DIR/../initdb.log" >&2; exit 2; }
}

# start_postgres: starts (or restarts) the cluster of init_postgres; sets PG_PID (setpriv
# execs, so it is the server's own PID: stop it with SIGQUIT for a crash, SIGTERM for a
# clean stop).
start_postgres() {
    "${AS_PG[@]}" "$PG_BIN/postgres" -D "$PG_DIR/data" -p "$PG_PORT" -k "$PG_DIR" \
        -c listen_addresses=127.0.0.1 >>"$PG_DIR/../postgres.log" 2>&1 &
    PG_PID=$!
    wait_port "$PG_PORT" postgres "$PG_DIR/../postgres.log"
}

# create_database NAME: waits for logins (the port opens a moment before), creates NAME.
create_database() {
    local i
    for ((i = 0; i < 100; i++)); do
        psql -h 127.0.0.1 -p "$PG_PORT" -U registry -d postgres -qc "CREATE DATABASE $1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "cannot create database $1 on port $PG_PORT" >&2
    exit 2
}

# serve_binary: sets SERVE to the serve binary: $SERVE if given (scripts/test.sh builds
# it once for every e2e script), else the release example, built here first.
serve_binary() {
    if [ -z "${SERVE:-}" ]; then
        echo "building the serve example (release): cargo build --release --example serve"
        cargo build --release --locked -p registry-examples --example serve || { echo "build failed" >&2; exit 2; }
        SERVE=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/serve
    fi
    [ -x "$SERVE" ] || { echo "no serve binary at $SERVE" >&2; exit 2; }
}

# The check harness (TAP-like lines). check NAME COMMAND...: runs COMMAND in a subshell
# with `set -euo pipefail`, counts it, prints `ok - NAME` with the first lines of its
# output (the figures a check reports) or `not ok - NAME` with up to 60. Needs $WORK.
PASSED=0
FAILED=0
check() {
    local name=$1 out=$WORK/check.out rc
    shift
    # Not as an `if` condition: bash ignores `set -e` there, and a check would pass
    # whenever its last command succeeded.
    (
        set -euo pipefail
        "$@"
    ) >"$out" 2>&1
    rc=$?
    if [ "$rc" = 0 ]; then
        PASSED=$((PASSED + 1))
        echo "ok - $name"
        sed 's/^/    # /' "$out" | head -n 5
    else
        FAILED=$((FAILED + 1))
        echo "not ok - $name"
        sed 's/^/    # /' "$out" | head -n 60
    fi
}
# fail MESSAGE: inside a check, fails it with MESSAGE.
fail() { echo "FAILED: $*" >&2; return 1; }
# finish_checks: writes `PASSED FAILED` to $E2E_COUNTS (if set; scripts/test.sh reads
# it), prints the last line `N passed, M failed`, and exits non-zero if any failed.
finish_checks() {
    [ -z "${E2E_COUNTS:-}" ] || echo "$PASSED $FAILED" >"$E2E_COUNTS"
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" = 0 ]
    exit
}
