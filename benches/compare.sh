#!/usr/bin/env bash
# Side-by-side load benchmark: our `serve` example against CNCF Distribution 2.8.2
# (Debian's docker-registry). See benches/README.md.
#
#   bash benches/compare.sh              # default: 3 rounds each, about 10-20 minutes
#   QUICK=1 bash benches/compare.sh      # smoke run: 2 rounds each, small counts
#   FLAT=1 bash benches/compare.sh       # flatness: manifest PUT/GET at 1k and 100k stored
#
# Environment: ROUNDS (rounds per server, default 3, QUICK 2), SERVERS ("ours dist",
# or one of them; "ours base dist" with BASE_SERVE=PATH also runs our serve built from
# another commit, for a before/after table), OURS_STORAGE (fs|memory, default fs), OURS_ARGS (extra flags for
# our serve, e.g. --no-verify-reads), BASE_ARGS (flags for base, default OURS_ARGS:
# BASE_SERVE=the same binary with other flags compares two settings), ONLY (a regex:
# only the workloads whose name matches), OUT (default target/bench), BIG=1 (add a 4 GiB
# push and pull), FLAT=1 (only the store-growth workloads; with FLAT_TARGET,
# FLAT_FILL_SECONDS, FLAT_PUTS, FLAT_GETS), STARTS (starts per server and round for the
# startup figure, default 20; 0 skips it), SERVER_CPUS (a `taskset -c` list: every
# server, ours and Distribution, runs on those CPUs only; `load` is not pinned; the
# startup figure is not pinned either).
# Each round starts a fresh server with a fresh temp data dir on 127.0.0.1, records
# its PID, samples its CPU time and RSS from /proc around every workload and stops
# exactly that PID. Raw JSON lines: $OUT/raw-*.jsonl (latest: $OUT/raw.jsonl);
# the table: $OUT/summary.md.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
QUICK=${QUICK:-0}
FLAT=${FLAT:-0}
if [ "$FLAT" = 1 ]; then
    ROUNDS=${ROUNDS:-1}
elif [ "$QUICK" = 1 ]; then
    ROUNDS=${ROUNDS:-2}
else
    ROUNDS=${ROUNDS:-3}
fi
# FLAT=1: the store-growth workloads instead of the others (see run_flat_round).
FLAT_TARGET=${FLAT_TARGET:-100000}
FLAT_FILL_SECONDS=${FLAT_FILL_SECONDS:-240}
FLAT_PUTS=${FLAT_PUTS:-1000}
FLAT_GETS=${FLAT_GETS:-5000}
SERVERS=${SERVERS:-ours dist}
OURS_STORAGE=${OURS_STORAGE:-fs}
# Extra flags for our serve example, split on spaces (e.g. --no-verify-reads).
read -r -a OURS_ARGS <<<"${OURS_ARGS:-}"
read -r -a BASE_ARGS <<<"${BASE_ARGS-${OURS_ARGS[*]}}"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET_DIR/bench}
LOAD=$TARGET_DIR/release/load
SERVE=$TARGET_DIR/release/examples/serve
CLK_TCK=$(getconf CLK_TCK)
mkdir -p "$OUT"
RAW=$OUT/raw-$(date +%Y%m%d-%H%M%S).jsonl
: >"$RAW"

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- setup
if ! command -v docker-registry >/dev/null 2>&1; then
    log "installing CNCF Distribution (Debian docker-registry)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry
fi
DIST_VERSION=$(docker-registry --version 2>/dev/null || echo unknown)
case $DIST_VERSION in *2.8.2*) ;; *) log "warning: expected Distribution 2.8.2, have: $DIST_VERSION" ;; esac

log "building load and ready (release)"
cargo build --release -p registry-benches --bin load --bin ready
READY=$TARGET_DIR/release/ready
STARTS=${STARTS:-20}
if [[ " $SERVERS " == *" base "* ]] && [ ! -x "${BASE_SERVE:-}" ]; then
    log "SERVERS names base: set BASE_SERVE to a serve binary built from the commit to compare with"
    exit 2
fi
if [[ " $SERVERS " == *" ours "* ]]; then
    log "building the serve example (release)"
    cargo build --release -p registry-examples --example serve
fi

# ---------------------------------------------------------------- workloads
# name|load arguments. Push and pull of the same blobs share --seed/--size/--count/--repo.
if [ "$QUICK" = 1 ]; then
    N1=100 N64=4 NCH=2 NMAN=200 NTAGS=100 NCI=50 TCP=256M
else
    N1=500 N64=16 NCH=8 NMAN=1000 NTAGS=500 NCI=50 TCP=1G
fi
WORKLOADS=(
    "push-1m-c1|--workload push-mono --size 1M --count $N1 --concurrency 1 --seed 11 --repo bench/p1m"
    "push-1m-c8|--workload push-mono --size 1M --count $N1 --concurrency 8 --seed 12 --repo bench/p1m8"
    "push-64m-c4|--workload push-mono --size 64M --count $N64 --concurrency 4 --seed 13 --repo bench/p64m"
    "push-chunked-64m|--workload push-chunked --size 64M --chunk 8M --count $NCH --concurrency 1 --seed 14 --repo bench/chunked"
    "pull-1m-c1|--workload pull --size 1M --count $N1 --concurrency 1 --seed 11 --repo bench/p1m"
    "pull-1m-c8|--workload pull --size 1M --count $N1 --concurrency 8 --seed 11 --repo bench/p1m"
    "pull-64m-c1|--workload pull --size 64M --count $N64 --concurrency 1 --seed 13 --repo bench/p64m"
    "pull-64m-c4|--workload pull --size 64M --count $N64 --concurrency 4 --seed 13 --repo bench/p64m"
    "pull-64m-c1-raw|--workload pull --size 64M --count $N64 --concurrency 1 --seed 13 --repo bench/p64m --no-verify"
    "pull-64m-c4-raw|--workload pull --size 64M --count $N64 --concurrency 4 --seed 13 --repo bench/p64m --no-verify"
    "pull-chunked-64m|--workload pull --size 64M --count $NCH --concurrency 1 --seed 14 --repo bench/chunked"
    "manifest-put|--workload manifest-put --count $NMAN --concurrency 4 --seed 21 --repo bench/manifests"
    "manifest-get-tag|--workload manifest-get-tag --count $NMAN --concurrency 4 --seed 21 --repo bench/manifests"
    "manifest-get-digest|--workload manifest-get-digest --count $NMAN --concurrency 4 --seed 21 --repo bench/manifests"
    "manifest-head|--workload manifest-head --count $NMAN --concurrency 4 --seed 21 --repo bench/manifests"
    "tag-list|--workload tag-list --count $NTAGS --tags $NMAN --concurrency 4 --repo bench/manifests"
    "ci-mix|--workload ci-mix --count $NCI --repos 10 --concurrency 4 --seed 31 --repo ci"
)
# BIG=1 adds one 4 GiB blob pushed and pulled (issue 7's memory target), generated
# while sent: about +1 minute per round and 4 GiB of temp disk. They run first, on the
# fresh server, so that the peak RSS is theirs and not memory kept from earlier work.
if [ "${BIG:-0}" = 1 ]; then
    WORKLOADS=(
        "push-4g|--workload push-mono --size 4G --count 1 --concurrency 1 --seed 41 --repo bench/big"
        "pull-4g|--workload pull --size 4G --count 1 --concurrency 1 --seed 41 --repo bench/big"
        "${WORKLOADS[@]}"
    )
fi
if [ -n "${ONLY:-}" ]; then
    selected=()
    for spec in "${WORKLOADS[@]}"; do
        [[ "${spec%%|*}" =~ $ONLY ]] && selected+=("$spec")
    done
    WORKLOADS=("${selected[@]}")
    [ "${#WORKLOADS[@]}" -gt 0 ] || { echo "ONLY=$ONLY matches no workload" >&2; exit 2; }
fi
# Every load invocation is bounded in time: no new operation after 240 s, and one
# request (with its body) gives up after 300 s.
LOAD_LIMITS=(--max-seconds 240 --request-timeout 300)

# ---------------------------------------------------------------- servers
PID=""
WORK=""
PORT=""

# The state letter of $PID ("" when gone); a zombie counts as gone.
pid_state() {
    local s
    s=$(cat "/proc/$PID/stat" 2>/dev/null) || return 0
    s=${s##*) }
    printf '%s' "${s%% *}"
}
alive() {
    [ -n "$PID" ] || return 1
    local st
    st=$(pid_state)
    [ -n "$st" ] && [ "$st" != Z ]
}

# utime + stime of $PID in clock ticks.
cpu_ticks() {
    local s
    s=$(cat "/proc/$PID/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $((${12} + ${13}))
}
status_kb() { awk -v k="$1:" '$1 == k { print $2; found = 1 } END { if (!found) print 0 }' "/proc/$PID/status" 2>/dev/null || echo 0; }

stop_server() {
    [ -n "$PID" ] || return 0
    kill -TERM "$PID" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do
        alive || break
        sleep 0.05
    done
    if alive; then kill -KILL "$PID" 2>/dev/null || true; fi
    wait "$PID" 2>/dev/null || true
    PID=""
}

cleanup() {
    stop_server
    if [ -n "$WORK" ]; then rm -rf "$WORK"; fi
    WORK=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# dist_config FILE ROOT ADDR: Distribution's configuration, as every run here uses it.
dist_config() {
    cat >"$1" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $2
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $3
EOF
}

# start_server KIND: fresh data dir and port; sets PID, PORT, WORK; the ready JSON
# goes to $WORK/ready.json. Not to be called in a subshell (PID must be ours).
start_server() {
    local kind=$1 t0
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/registry-bench-$kind.XXXXXX")
    mkdir -p "$WORK/data"
    PORT=$(free_port)
    local cmd
    case $kind in
        dist)
            dist_config "$WORK/config.yml" "$WORK/data" "127.0.0.1:$PORT"
            cmd=(docker-registry serve "$WORK/config.yml")
            ;;
        ours)
            cmd=("$SERVE" --addr "127.0.0.1:$PORT" --data-dir "$WORK/data" --storage "$OURS_STORAGE" "${OURS_ARGS[@]}")
            ;;
        base)
            # Our serve built from another commit (BASE_SERVE), with BASE_ARGS (default: the
            # same flags): a before/after comparison of a change in one run.
            cmd=("$BASE_SERVE" --addr "127.0.0.1:$PORT" --data-dir "$WORK/data" --storage "$OURS_STORAGE" "${BASE_ARGS[@]}")
            ;;
        *) log "unknown server $kind"; return 1 ;;
    esac
    # taskset execs the server: $! is still the server's PID.
    [ -z "${SERVER_CPUS:-}" ] || cmd=(taskset -c "$SERVER_CPUS" "${cmd[@]}")
    t0=$EPOCHREALTIME
    RUST_LOG=error "${cmd[@]}" >"$WORK/server.log" 2>&1 &
    PID=$!
    if ! "$LOAD" --workload wait-ready --url "http://127.0.0.1:$PORT" --since "$t0" --max-seconds 30 >"$WORK/ready.json"; then
        log "$kind did not answer GET /v2/ within 30 s; its log:"
        tail -20 "$WORK/server.log" >&2 || true
        return 1
    fi
}

# measure KIND ROUND NAME EXTRA_JSON LOAD_ARGS...: runs one `load` workload against
# the server ($PID, $PORT), sampling its CPU time and memory around it, and appends
# one JSON line to $RAW (EXTRA_JSON: more fields, `,"k":v` or empty). The load JSON
# goes to $WORK/last.json.
measure() {
    local kind=$1 round=$2 name=$3 extra=$4 out rc c0 c1 r0 r1 hwm
    shift 4
    if ! alive; then
        log "  $kind (pid $PID) is gone; its log:"
        tail -20 "$WORK/server.log" >&2 || true
        echo "{\"server\":\"$kind\",\"round\":$round,\"name\":\"$name\",\"server_died\":true,\"load\":null}" >>"$RAW"
        echo null >"$WORK/last.json"
        return 0
    fi
    echo 5 >"/proc/$PID/clear_refs" 2>/dev/null || true # reset VmHWM
    c0=$(cpu_ticks)
    r0=$(status_kb VmRSS)
    rc=0
    out=$("$LOAD" --url "http://127.0.0.1:$PORT" --name "$name" "$@" 2>>"$WORK/load.err") || rc=$?
    c1=$(cpu_ticks)
    hwm=$(status_kb VmHWM)
    r1=$(status_kb VmRSS)
    [ -n "$out" ] || out=null
    echo "$out" >"$WORK/last.json"
    echo "{\"server\":\"$kind\",\"round\":$round,\"name\":\"$name\",\"cpu_ticks\":$((c1 - c0)),\"clk_tck\":$CLK_TCK,\"rss_kb_before\":$r0,\"hwm_kb\":$hwm,\"rss_kb_after\":$r1,\"rc\":$rc$extra,\"load\":$out}" >>"$RAW"
    log "  $name: $(grep -o '"mb_per_s":[0-9.]*\|"ops_per_s":[0-9.]*\|"errors":[0-9]*' <<<"$out" | tr '\n' ' ')cpu $(((c1 - c0) * 1000 / CLK_TCK)) ms, HWM ${hwm} kB"
    if [ "$rc" != 0 ]; then
        log "  load failed (rc $rc):"
        tail -5 "$WORK/load.err" >&2 || true
    fi
}

# startup KIND ROUND: $STARTS starts of a fresh server on a fresh data dir, each timed
# by `ready` from the new process's exec to its first 200 on GET /v2/ (fork, exec and
# the poller's own start excluded: the process's own startup, issue 25's figure).
startup() {
    local kind=$1 round=$2 out dir cmd=() env=()
    [ "$STARTS" -gt 0 ] || return 0
    # What the previous round wrote (Distribution does not fsync) is flushed first:
    # otherwise our store's first fsyncs (creating meta.redb) wait behind that
    # write-back, and the figure measures the disk's backlog, not the process.
    timeout 300 sync || true
    dir=$(mktemp -d "${TMPDIR:-/tmp}/registry-bench-start.XXXXXX")
    case $kind in
        dist)
            # The address and root come from the environment, new for every start.
            dist_config "$dir/config.yml" /nonexistent 127.0.0.1:1
            env=(--env 'REGISTRY_HTTP_ADDR=127.0.0.1:{port}' --env 'REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY={dir}')
            cmd=(docker-registry serve "$dir/config.yml")
            ;;
        ours) cmd=("$SERVE" --addr '127.0.0.1:{port}' --data-dir '{dir}/data' --storage "$OURS_STORAGE" "${OURS_ARGS[@]}") ;;
        base) cmd=("$BASE_SERVE" --addr '127.0.0.1:{port}' --data-dir '{dir}/data' --storage "$OURS_STORAGE" "${BASE_ARGS[@]}") ;;
    esac
    if out=$(RUST_LOG=error "$READY" --runs "$STARTS" "${env[@]}" -- "${cmd[@]}"); then
        echo "{\"server\":\"$kind\",\"round\":$round,\"name\":\"startup\",\"load\":$out}" >>"$RAW"
        log "  startup ($STARTS starts): $out"
    else
        log "  startup of $kind failed"
    fi
    rm -rf "$dir"
}

# start_round KIND ROUND: a fresh server and its ready record; non-zero if it failed.
start_round() {
    local kind=$1 round=$2 ready idle t0
    # Distribution does not fsync, so what its round wrote is still being written back
    # (and a removed data dir discarded) when the next round starts: flush it first, so
    # that no round pays for the one before (our fsyncs would wait behind it).
    t0=$(date +%s)
    timeout 300 sync || true
    log "round $round: $kind (fresh server; sync took $(($(date +%s) - t0)) s)"
    if ! start_server "$kind"; then
        echo "{\"server\":\"$kind\",\"round\":$round,\"name\":\"ready\",\"failed\":true}" >>"$RAW"
        cleanup
        return 1
    fi
    ready=$(cat "$WORK/ready.json")
    sleep 1
    idle=$(status_kb VmRSS)
    echo "{\"server\":\"$kind\",\"round\":$round,\"name\":\"ready\",\"pid\":$PID,\"idle_rss_kb\":$idle,\"ready\":$ready}" >>"$RAW"
    log "  ready: $ready; idle RSS ${idle} kB"
}

end_round() {
    local kind=$1 round=$2
    if [ -s "$WORK/load.err" ]; then cp "$WORK/load.err" "$OUT/load-$kind-$round.err"; fi
    if [ -s "$WORK/server.log" ]; then cp "$WORK/server.log" "$OUT/server-$kind-$round.log"; fi
    cleanup
}

# run_round KIND ROUND
run_round() {
    local kind=$1 round=$2 spec name args
    start_round "$kind" "$round" || return 0
    for spec in "${WORKLOADS[@]}"; do
        name=${spec%%|*}
        args=${spec#*|}
        # shellcheck disable=SC2086
        measure "$kind" "$round" "$name" "" "${LOAD_LIMITS[@]}" $args
    done
    end_round "$kind" "$round"
}

# run_flat_round KIND ROUND (FLAT=1): manifest PUT and GET with about 1k manifests
# stored, a fill up to $FLAT_TARGET manifests (bounded by $FLAT_FILL_SECONDS), then
# the same PUT and GET again. All manifests go to one repository, tagged t00000...;
# GETs pick manifests at random among all those stored. Every record carries
# "stored": the manifests in the store when the workload started.
run_flat_round() {
    local kind=$1 round=$2 repo=bench/flat seed=51 stored filled
    local m=(--max-seconds 120 --request-timeout 60 --repo "$repo" --seed "$seed")
    start_round "$kind" "$round" || return 0
    measure "$kind" "$round" flat-seed ',"stored":0' "${m[@]}" \
        --workload manifest-put --count 1000 --offset 0 --concurrency 4
    stored=1000
    flat_phase "$kind" "$round" 1k "$stored" 1000
    stored=$((stored + FLAT_PUTS))
    measure "$kind" "$round" flat-fill ",\"stored\":$stored" --max-seconds "$FLAT_FILL_SECONDS" \
        --request-timeout 60 --repo "$repo" --seed "$seed" \
        --workload manifest-put --count $((FLAT_TARGET - stored)) --offset "$stored" --concurrency 16
    # The fill takes indices in order and only stops starting new ones at its
    # deadline: what it stored is the prefix of the indices it got to.
    filled=$(python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print((v or {}).get("ops", 0) + (v or {}).get("errors", 0))' "$WORK/last.json" 2>/dev/null || echo 0)
    stored=$((stored + filled))
    log "  $kind holds about $stored manifests; data dir $(du -sh "$WORK/data" 2>/dev/null | cut -f1)"
    # The fill is set-up, not a measurement: what it left to write back (Distribution
    # does not fsync) is flushed first, or the PUTs at 100k would pay for it (seen: our
    # PUTs at 0.55 of 1k with the fill's write-back under way, 1.1 after a sync).
    timeout 300 sync || true
    flat_phase "$kind" "$round" 100k "$stored" "$FLAT_TARGET"
    end_round "$kind" "$round"
}

# flat_phase KIND ROUND LABEL STORED PUT_OFFSET: PUT $FLAT_PUTS new manifests from
# index PUT_OFFSET, then $FLAT_GETS GETs by tag and by digest spread over 0..STORED.
flat_phase() {
    local kind=$1 round=$2 label=$3 stored=$4 offset=$5
    local m=(--max-seconds 120 --request-timeout 60 --repo bench/flat --seed 51 --concurrency 4)
    measure "$kind" "$round" "flat-put-$label" ",\"stored\":$stored" "${m[@]}" \
        --workload manifest-put --count "$FLAT_PUTS" --offset "$offset"
    measure "$kind" "$round" "flat-get-tag-$label" ",\"stored\":$((stored + FLAT_PUTS))" "${m[@]}" \
        --workload manifest-get-tag --count "$FLAT_GETS" --offset 0 --spread "$stored"
    measure "$kind" "$round" "flat-get-digest-$label" ",\"stored\":$((stored + FLAT_PUTS))" "${m[@]}" \
        --workload manifest-get-digest --count "$FLAT_GETS" --offset 0 --spread "$stored"
}

# ---------------------------------------------------------------- run
START=$(date +%s)
log "rounds: $ROUNDS each of: $SERVERS (ours: --storage $OURS_STORAGE ${OURS_ARGS[*]}); raw: $RAW"
for round in $(seq 1 "$ROUNDS"); do
    for mode in raw sha256; do
        [ "$FLAT" = 1 ] && break
        flag=()
        [ "$mode" = raw ] && flag=(--no-verify)
        out=$("$LOAD" --workload tcp-baseline --size "$TCP" --name "tcp-baseline-$mode" "${flag[@]}" --max-seconds 60) || out=null
        echo "{\"server\":\"none\",\"round\":$round,\"name\":\"tcp-baseline-$mode\",\"load\":$out}" >>"$RAW"
        log "tcp-baseline-$mode: $(grep -o '"mb_per_s":[0-9.]*' <<<"$out")"
    done
    for kind in $SERVERS; do
        if [ "$FLAT" = 1 ]; then
            run_flat_round "$kind" "$round"
        else
            startup "$kind" "$round"
            run_round "$kind" "$round"
        fi
    done
done
cp "$RAW" "$OUT/raw.jsonl"
{
    echo "# Load benchmark: ours vs CNCF Distribution"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "Servers: ours = serve --storage $OURS_STORAGE${OURS_ARGS[*]:+ ${OURS_ARGS[*]}}; dist = $DIST_VERSION. Rounds: $ROUNDS each, alternating; QUICK=$QUICK BIG=${BIG:-0} FLAT=$FLAT${SERVER_CPUS:+ SERVER_CPUS=$SERVER_CPUS}; run took $(($(date +%s) - START)) s."
    echo
    python3 "$ROOT/benches/summarize.py" "$RAW"
} >"$OUT/summary.md"
cat "$OUT/summary.md"
log "summary: $OUT/summary.md; raw: $RAW"
