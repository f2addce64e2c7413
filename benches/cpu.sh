#!/usr/bin/env bash
# Server CPU per workload for one build of our `serve` example (fs store): the
# before/after measure for a code change when wall-clock time is too noisy to trust.
# See benches/README.md ("Measuring a code change").
#
#   bash benches/cpu.sh [SERVE_BINARY]        # default: $CARGO_TARGET_DIR/release/examples/serve
#   WL="push pull" bash benches/cpu.sh OLD_BINARY    # pull reads what push stored
#
# Workloads (WL, default "push pull p1m man"): push = 8 x 64 MiB at concurrency 4,
# pull = those 8 (so after push, same run) verified and raw at concurrency 1, p1m = 200 x 1 MiB pushes at 8,
# man = 400 manifest PUTs at 4. Prints one line per workload: the server's CPU
# (utime + stime from /proc/PID/stat) and load's throughput. Loopback only; stops
# exactly the PID it started.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
LOAD=$TARGET_DIR/release/load
SERVE=${1:-$TARGET_DIR/release/examples/serve}
CLK_TCK=$(getconf CLK_TCK)
DATA=$(mktemp -d "${TMPDIR:-/tmp}/registry-cpu.XXXXXX")
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
RUST_LOG=error "$SERVE" --addr "127.0.0.1:$PORT" --data-dir "$DATA" --storage fs >/dev/null 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT
"$LOAD" --workload wait-ready --url "http://127.0.0.1:$PORT" --max-seconds 30 >/dev/null

ticks() {
    local s
    s=$(cat "/proc/$PID/stat")
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $((${12} + ${13}))
}
run() {
    local name=$1 c0 c1 out
    shift
    c0=$(ticks)
    out=$("$LOAD" --url "http://127.0.0.1:$PORT" --max-seconds 120 --request-timeout 120 "$@")
    c1=$(ticks)
    echo "$name server_cpu_ms=$(((c1 - c0) * 1000 / CLK_TCK)) $(grep -o '"mb_per_s":[0-9.]*\|"ops_per_s":[0-9.]*\|"errors":[0-9]*' <<<"$out" | tr '\n' ' ')"
}
for w in ${WL:-push pull p1m man}; do
    case $w in
        push) run push-64m-c4 --workload push-mono --size 64M --count 8 --concurrency 4 --seed 13 --repo b/p ;;
        pull)
            run pull-64m-c1 --workload pull --size 64M --count 8 --concurrency 1 --seed 13 --repo b/p
            run pull-64m-c1-raw --workload pull --size 64M --count 8 --concurrency 1 --seed 13 --repo b/p --no-verify
            ;;
        p1m) run push-1m-c8 --workload push-mono --size 1M --count 200 --concurrency 8 --seed 11 --repo b/q ;;
        man) run manifest-put --workload manifest-put --count 400 --concurrency 4 --seed 21 --repo b/m ;;
        *) echo "unknown workload $w" >&2; exit 2 ;;
    esac
done
