#!/usr/bin/env bash
# Three serve processes on one PostgreSQL (metadata) and one S3 bucket (moto, blobs),
# under concurrent pushes and reads, while one process is killed with SIGKILL and
# restarted and PostgreSQL itself crashes (SIGQUIT: immediate shutdown, recovery on
# restart) and comes back. Everything on 127.0.0.1, started and stopped here by PID.
#
#   scripts/e2e-scaleout.sh
#
#   SERVE        the serve binary; unset: built here first
#   E2E_COUNTS   a file to write `PASSED FAILED` into at the end (scripts/test.sh reads it)
#   SECONDS_RUN  how long the pushers run (default 40)
#
# The pushers (scripts/e2e/scaleout.py) start each layer upload on one process, send its
# chunks through others and finish it on a third; process A also runs the collector
# every 2 s, and every fifth image is deleted again so it has work. Checks: no answer
# was wrong (every failure a 5xx, a 429 or a refused connection; no 404 for an
# acknowledged tag, no other bytes), the outages were seen, every acknowledged image
# verifies from every process afterwards, the collector removed something, and the
# database outage was answered with 5xx. The last line is `N passed, M failed`.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SECONDS_RUN=${SECONDS_RUN:-40}

scripts/install-test-deps.sh apt python || { echo "installing test dependencies failed" >&2; exit 2; }
DEPS=$ROOT/.test-deps
PYTHON=$DEPS/venv/bin/python

WORK=$(mktemp -d "${TMPDIR:-/tmp}/e2e-scaleout.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}" ${PG_PID:-} ${A_PID:-} ${B_PID:-} ${C_PID:-}; do
        kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port, wait_port, init_postgres, start_postgres, create_database, serve_binary,
# check, fail, finish_checks
source "$ROOT/scripts/e2e/lib.sh"

serve_binary

# ---------------------------------------------------------------- moto and PostgreSQL
MOTO_PORT=$(free_port)
"$DEPS/venv/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
wait_port "$MOTO_PORT" moto "$WORK/moto.log"
curl -sf -X PUT "http://127.0.0.1:$MOTO_PORT/scale" >/dev/null || { echo "creating the S3 bucket failed" >&2; exit 2; }
export AWS_ENDPOINT=http://127.0.0.1:$MOTO_PORT AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test

# Debian's PostgreSQL, a cluster in the work dir, with its default durability (every
# commit flushed): the crash below must not lose an acknowledged change.
init_postgres "$WORK"
start_postgres
create_database scale
METADATA=postgres://registry@127.0.0.1:$PG_PORT/scale

# ---------------------------------------------------------------- three processes
A_PORT=$(free_port) B_PORT=$(free_port) C_PORT=$(free_port) METRICS_PORT=$(free_port)
start_serve() { # start_serve NAME PORT [FLAGS...]: sets NAME_PID
    local name=$1 port=$2
    shift 2
    "$SERVE" --addr "127.0.0.1:$port" --storage s3://scale/registry --metadata "$METADATA" \
        --no-access-log "$@" >>"$WORK/$name.log" 2>&1 &
    printf -v "${name}_PID" '%s' "$!"
    wait_port "$port" "serve $name" "$WORK/$name.log"
}
start_serve A "$A_PORT" --gc-interval 2 --gc-window 20 --metrics-addr "127.0.0.1:$METRICS_PORT"
start_serve B "$B_PORT"
start_serve C "$C_PORT"
TARGETS=127.0.0.1:$A_PORT,127.0.0.1:$B_PORT,127.0.0.1:$C_PORT
echo "# serve A (collector), B, C on s3://scale (moto) + PostgreSQL on port $PG_PORT"

# ---------------------------------------------------------------- the run
ACKED=$WORK/acked.jsonl
REPORT=$WORK/report.json
"$PYTHON" scripts/e2e/scaleout.py run --targets "$TARGETS" --seconds "$SECONDS_RUN" \
    --acked "$ACKED" --report "$REPORT" >"$WORK/driver.out" 2>&1 &
DRIVER=$!
PIDS+=($DRIVER)

# Timeline: B is killed at 8 s and back at 12 s; PostgreSQL crashes at 18 s and is back
# at 23 s; while it is down, a manifest GET must be a 5xx (never a 404 or a 200 with
# stale data: there is no cache to serve it from).
OUTAGE_CODES=$WORK/outage-codes
sleep 8
kill -9 "$B_PID"
wait "$B_PID" 2>/dev/null
echo "# t=8s: serve B killed (SIGKILL)"
sleep 4
start_serve B "$B_PORT"
echo "# t=12s: serve B restarted"
sleep 6
kill -QUIT "$PG_PID"
wait "$PG_PID" 2>/dev/null
echo "# t=18s: PostgreSQL crashed (immediate shutdown)"
for ((i = 0; i < 6; i++)); do
    for port in "$A_PORT" "$C_PORT"; do
        curl -s -o /dev/null -w '%{http_code}\n' --max-time 10 \
            -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
            "http://127.0.0.1:$port/v2/scale/app0/manifests/p0-1" >>"$OUTAGE_CODES"
    done
    sleep 0.5
done
sleep 1
start_postgres
echo "# t=23s: PostgreSQL restarted (crash recovery)"
wait "$DRIVER"
DRIVER_RC=$?
cat "$WORK/driver.out"
[ -z "${KEEP_REPORT:-}" ] || cp "$REPORT" "$KEEP_REPORT"

# ---------------------------------------------------------------- checks
count() { jq -r ".counts.$1 // 0" "$REPORT"; }

driver_finished() {
    [ "$DRIVER_RC" = 0 ] || fail "the driver exited with $DRIVER_RC: $(tail -5 "$WORK/driver.out")"
    [ -s "$REPORT" ] || fail "no report"
}
no_wrong_answers() {
    local wrong
    wrong=$(count wrong_answers)
    [ "$wrong" = 0 ] || fail "$wrong wrong answers: $(jq -c .wrong "$REPORT")"
}
# Pushes were acknowledged in each phase of the timeline: before the kill, between B's
# restart and the database crash, and after the database came back. By phase, not by a
# total, which would depend on how fast (and how busy) the machine is.
pushes_went_on() {
    local acked before between after
    acked=$(count pushes_acknowledged)
    before=$(jq -s '[.[] | select(.t < 8)] | length' "$ACKED")
    between=$(jq -s '[.[] | select(.t >= 12 and .t < 18)] | length' "$ACKED")
    after=$(jq -s '[.[] | select(.t >= 24)] | length' "$ACKED")
    echo "acknowledged pushes: $acked (kept: $before before the kill, $between between B's restart and the database crash, $after after it came back), abandoned: $(count pushes_abandoned), reads: $(count reads_ok), deletes: $(count deletes)"
    [ "$before" -ge 1 ] || fail "no push acknowledged before the kill"
    [ "$between" -ge 1 ] || fail "no push acknowledged between B's restart and the database crash"
    [ "$after" -ge 1 ] || fail "no push acknowledged after the database came back"
}
outages_were_seen() {
    local clean
    clean=$(count clean_errors)
    [ "$clean" -ge 1 ] || fail "no failed request: the outages did not happen?"
    jq -r '.clean_samples[]' "$REPORT" | head -5
}
database_outage_is_5xx() {
    local codes
    codes=$(sort "$OUTAGE_CODES" | uniq -c | tr '\n' ' ')
    echo "manifest GET during the outage: $codes"
    [ -s "$OUTAGE_CODES" ] || fail "no request during the outage"
    ! grep -qv '^5[0-9][0-9]$' "$OUTAGE_CODES" || fail "answers other than 5xx while the database was down: $codes"
}
every_ack_verifies_everywhere() {
    "$PYTHON" scripts/e2e/scaleout.py verify --targets "$TARGETS" --acked "$ACKED"
}
collector_removed_something() {
    local removed
    removed=$(curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" |
        awk '/^registry_gc_removed_total/ {s += $2} END {print s + 0}')
    echo "collector removals: $removed"
    [ "$removed" -gt 0 ] || fail "the collector removed nothing"
}
processes_ready() {
    for port in "$A_PORT" "$B_PORT" "$C_PORT"; do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" = 200 ] ||
            fail "127.0.0.1:$port is not ready after the database came back"
    done
}

check "scale-out: the driver ran to its end" driver_finished
check "scale-out: no wrong answer from any process (failures are 5xx, 429 or refused connections)" no_wrong_answers
check "scale-out: pushes through three processes went on around the outages" pushes_went_on
check "scale-out: the killed process and the database outage were seen as clean failures" outages_were_seen
check "scale-out: while PostgreSQL is down, reads answer 5xx" database_outage_is_5xx
check "scale-out: all three processes are ready again after PostgreSQL's restart" processes_ready
check "scale-out: every acknowledged image verifies from every process" every_ack_verifies_everywhere
check "scale-out: the collector in A removed deleted images' content" collector_removed_something

finish_checks
