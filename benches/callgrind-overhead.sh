#!/usr/bin/env bash
# What metrics and logs cost, in instructions: the `serve` example (memory storage) under
# callgrind in three configurations, driven by the same fixed request mix from `load`:
#   off: --no-access-log, no metrics, no audit log;
#   on:  metrics (--metrics-addr) and the audit log (--audit-log), RUST_LOG=error (so
#        the access log, on by default, is filtered out);
#   log: as on, plus the access log written (RUST_LOG=info; a line per request to
#        stdout, redirected to a file): everything on, issue 18's target.
#   notify: as off, plus a webhook (--notify) to a receiver started here (a Python
#        server answering 204, its own process, so not counted): what delivering the
#        outbox's events costs the server (issue 19).
# Instruction counts, unlike time, do not move with other work on a shared machine (they
# still move a little with thread scheduling and malloc: hence rounds and medians).
#
# Each configuration is also run once with no workload (start, one GET /v2/, stop): its
# total is subtracted, so the figures are the requests' own instructions (without
# process start and shutdown, which differ between the configurations).
#
# Usage: bash benches/callgrind-overhead.sh            (both mixes, about 5 minutes)
#        MIXES=small ROUNDS=5 bash benches/callgrind-overhead.sh
#        MODES="off log" SERVE=/tmp/serve.before SKIP_BUILD=1 bash benches/callgrind-overhead.sh
# Mixes: small (manifest PUTs by tag, then GETs by tag), blob (monolithic pushes of
# BLOB_SIZE blobs, then their pulls), image (compare.sh's ci-mix: IMAGES images of 5
# layers and a config over IMAGE_REPOS repositories, each blob HEAD-checked, mounted or
# uploaded, then the manifest PUT by tag: what a CI pushing images sends).
# Variables: MIXES (small blob), MODES (off on log notify; off is always run, first in
# each round; the others are compared with it; default "on log"), STORAGE (memory, or
# fs: a fresh data directory per run; its fsyncs are system time, which callgrind
# does not count), ROUNDS (3; the modes alternate, the medians
# are compared), PUTS (300), GETS (1500), BLOBS (200), BLOB_SIZE (64K), IMAGES (50),
# IMAGE_REPOS (10), CONCURRENCY (2),
# SERVE (the binary; default the release example, built first), OUT
# (target/bench/callgrind), STEP_TIMEOUT (300 s, per run of load and per server stop),
# SKIP_BUILD (0), NOTIFY_LINGER_MS (25: serve's default). TOKIO_WORKER_THREADS=1
# passes through to serve and makes rounds closer to each other.
set -euo pipefail
cd "$(dirname "$0")/.."

MIXES=${MIXES:-small blob}
PUTS=${PUTS:-300}
GETS=${GETS:-1500}
BLOBS=${BLOBS:-200}
BLOB_SIZE=${BLOB_SIZE:-64K}
IMAGES=${IMAGES:-50}
IMAGE_REPOS=${IMAGE_REPOS:-10}
CONCURRENCY=${CONCURRENCY:-2}
ROUNDS=${ROUNDS:-3}
MODES="off $(tr ' ' '\n' <<<"${MODES:-on log}" | { grep -v '^off$' || true; } | tr '\n' ' ')"
OUT=${OUT:-target/bench/callgrind}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
SKIP_BUILD=${SKIP_BUILD:-0}
STORAGE=${STORAGE:-memory}
# The notify mode's --notify-linger, in milliseconds. Under callgrind a server runs 8 (fs) to 25
# (memory) times slower, so a 25 ms linger gathers fewer pushes per webhook request
# than it does natively; a longer one here gives native-sized batches (see
# benches/README.md).
NOTIFY_LINGER_MS=${NOTIFY_LINGER_MS:-25}
POSTS=0

command -v valgrind >/dev/null || {
    echo "valgrind is missing: apt-get install -y valgrind" >&2
    exit 1
}
if [ "$SKIP_BUILD" != 1 ]; then
    cargo build --release --locked --example serve
    cargo build --release --locked -p registry-benches --bin load
fi
SERVE=${SERVE:-${CARGO_TARGET_DIR:-target}/release/examples/serve}
LOAD=${CARGO_TARGET_DIR:-target}/release/load
mkdir -p "$OUT"

RECEIVER_PID=
RECEIVER_URL=
# A webhook receiver for the notify mode: answers every POST with 204; a GET answers
# how many requests it took so far (the batching the server achieved).
start_receiver() {
    python3 -u - "$OUT/receiver.port" <<'PY' >"$OUT/receiver.log" 2>&1 &
import http.server, sys
posts = 0
class Hook(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        global posts
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        posts += 1
        self.send_response(204)
        self.end_headers()
    def do_GET(self):
        body = str(posts).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
with open(sys.argv[1], "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
PY
    RECEIVER_PID=$!
    for _ in $(seq 1 100); do
        [ -s "$OUT/receiver.port" ] && break
        sleep 0.1
    done
    [ -s "$OUT/receiver.port" ] || { echo "the webhook receiver did not start (see $OUT/receiver.log)" >&2; exit 1; }
    RECEIVER_URL="http://127.0.0.1:$(cat "$OUT/receiver.port")/hook"
}

SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -INT "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 "$STEP_TIMEOUT"); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "serve (pid $SERVER_PID) did not stop: killed, its totals are lost" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
stop_all() {
    stop_server
    if [ -n "$RECEIVER_PID" ]; then
        kill "$RECEIVER_PID" 2>/dev/null || true
        wait "$RECEIVER_PID" 2>/dev/null || true
    fi
}
trap stop_all EXIT
case " $MODES " in
    *" notify "*) rm -f "$OUT/receiver.port" "$OUT/requests.txt"; start_receiver ;;
esac

load() {
    timeout "$STEP_TIMEOUT" "$LOAD" --url "$URL" --max-seconds "$STEP_TIMEOUT" "$@" >>"$LOG.load" \
        || { echo "load $* failed (see $LOG.load, $LOG.err)" >&2; exit 1; }
}

# run MIX MODE ROUND: one server under callgrind, one mix; sets TOTAL to the
# program's total.
run() {
    local mix=$1 mode=$2
    LOG=$OUT/$mix-$mode-$3
    rm -f "$LOG".*
    local args=(--storage "$STORAGE" --addr 127.0.0.1:0)
    if [ "$STORAGE" = fs ]; then
        rm -rf "$LOG.data"
        args+=(--data-dir "$LOG.data")
    fi
    local rust_log=error
    case $mode in
        off) args+=(--no-access-log) ;;
        notify) args+=(--no-access-log --notify "$RECEIVER_URL" --notify-linger "${NOTIFY_LINGER_MS}ms") ;;
        on) args+=(--metrics-addr 127.0.0.1:0 --audit-log "$LOG.audit") ;;
        log)
            args+=(--metrics-addr 127.0.0.1:0 --audit-log "$LOG.audit")
            rust_log=info
            ;;
        *) echo "unknown mode $mode (off, on, log, notify)" >&2; exit 1 ;;
    esac
    # Created here: the redirection below happens in the background job, maybe after
    # the first look for the address.
    : >"$LOG.stdout"
    RUST_LOG=$rust_log valgrind --tool=callgrind --callgrind-out-file="$LOG.callgrind" \
        "$SERVE" "${args[@]}" >"$LOG.stdout" 2>"$LOG.err" &
    SERVER_PID=$!
    URL=
    for _ in $(seq 1 $((STEP_TIMEOUT * 10))); do
        URL=$(sed -n 's/^listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$LOG.stdout")
        [ -n "$URL" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$URL" ] || { echo "serve did not start (see $LOG.err)" >&2; exit 1; }
    load --workload wait-ready
    local c=$CONCURRENCY
    case $mix in
        idle) ;;
        small)
            load --workload manifest-put --repo bench/small --count "$PUTS" --concurrency "$c"
            load --workload manifest-get-tag --repo bench/small --count "$GETS" --spread "$PUTS" --concurrency "$c"
            ;;
        blob)
            load --workload push-mono --repo bench/blob --size "$BLOB_SIZE" --count "$BLOBS" --concurrency "$c"
            load --workload pull --repo bench/blob --size "$BLOB_SIZE" --count "$BLOBS" --concurrency "$c"
            ;;
        image)
            load --workload ci-mix --repo bench/ci --count "$IMAGES" --repos "$IMAGE_REPOS" --concurrency "$c"
            ;;
        *) echo "unknown mix $mix (small, blob, image)" >&2; exit 1 ;;
    esac
    # Time for the webhook's last batch (the notify mode); every mode waits the same.
    sleep "$(awk -v l="$NOTIFY_LINGER_MS" 'BEGIN { print 1 + l / 1000 }')"
    stop_server
    if [ "$mode" = notify ]; then
        local posts
        posts=$(curl -s "${RECEIVER_URL%/hook}/")
        echo "$mix round $3: $((posts - POSTS)) webhook requests" >>"$OUT/requests.txt"
        POSTS=$posts
    fi
    rm -rf "$LOG.data"
    if grep -q '"errors":[1-9]' "$LOG.load"; then
        echo "load reported errors (see $LOG.load)" >&2
        exit 1
    fi
    # callgrind's "totals:" line: the instructions of the whole process, all threads.
    local total
    total=$(sed -n 's/^totals: \([0-9]*\).*/\1/p' "$LOG.callgrind")
    [ -n "$total" ] || { echo "no totals in $LOG.callgrind" >&2; exit 1; }
    TOTAL=$total
}

median() {
    tr ' ' '\n' <<<"$*" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

declare -A IDLE
printf '%-6s %-4s %-5s %16s %16s\n' mix mode round "PROGRAM TOTALS" "minus idle"
for mode in $MODES; do
    run idle "$mode" 1
    IDLE[$mode]=$TOTAL
    printf '%-6s %-4s %-5s %16s %16s\n' idle "$mode" 1 "$TOTAL" 0
done
declare -A NET
for mix in $MIXES; do
    for round in $(seq 1 "$ROUNDS"); do
        for mode in $MODES; do
            run "$mix" "$mode" "$round"
            net=$((TOTAL - IDLE[$mode]))
            NET[$mix-$mode]="${NET[$mix-$mode]:-} $net"
            printf '%-6s %-4s %-5s %16s %16s\n' "$mix" "$mode" "$round" "$TOTAL" "$net"
        done
    done
done
echo
for mix in $MIXES; do
    off=$(median ${NET[$mix-off]})
    for mode in $MODES; do
        [ "$mode" = off ] && continue
        on=$(median ${NET[$mix-$mode]})
        awk -v m="$mix" -v mode="$mode" -v on="$on" -v off="$off" -v r="$ROUNDS" 'BEGIN {
            printf "%s (medians of %d rounds, minus idle): %s %.0f, off %.0f, %s/off = %.4f (%+.2f%%)\n",
                m, r, mode, on, off, mode, on / off, (on / off - 1) * 100
        }'
    done
done
[ -s "$OUT/requests.txt" ] && cat "$OUT/requests.txt"
echo "callgrind files: $OUT/*.callgrind (callgrind_annotate FILE)"
