#!/usr/bin/env bash
# Webhooks from the outbox, end to end: `serve --notify` processes POST every
# acknowledged change to a real HTTP receiver (scripts/e2e/receiver.py, which checks
# each request's HMAC signature and its Distribution envelope or CloudEvent shape),
# through three disruptions. Everything on 127.0.0.1, started and stopped here by PID.
#
#   scripts/e2e-notify.sh
#
#   SERVE        the serve binary; unset: built here first
#   E2E_COUNTS   a file to write `PASSED FAILED` into at the end (scripts/test.sh reads it)
#   DOWN_SECONDS how long the receiver is down in the second part (default 30)
#
# 1. kill -9 of serve (fs storage) in the middle of a burst of pushes, then a restart:
#    every push acknowledged before or after the kill is delivered, to a Distribution
#    endpoint and to a CloudEvents endpoint (duplicates allowed, none missing).
# 2. The receiver down for DOWN_SECONDS while pushes go on: the backlog is delivered once
#    it is back, in order within each repository.
# 3. Two serve processes on one S3 bucket (moto; metadata in the bucket's log), pushes
#    through both: every change is delivered once per endpoint (by either process;
#    one holds the endpoint's lease at a time).
# The last line is `N passed, M failed`.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DOWN_SECONDS=${DOWN_SECONDS:-30}

scripts/install-test-deps.sh apt python || { echo "installing test dependencies failed" >&2; exit 2; }
DEPS=$ROOT/.test-deps
PYTHON=$DEPS/venv/bin/python

WORK=$(mktemp -d "${TMPDIR:-/tmp}/e2e-notify.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}" ${RECV_PID:-} ${S1_PID:-} ${S2_PID:-} ${S3_PID:-}; do
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


# ---------------------------------------------------------------- the receiver
SECRET=$WORK/secret
head -c 32 /dev/urandom | base64 >"$SECRET"
RECV_PORT=$(free_port)
RECEIVED=$WORK/received.jsonl
start_receiver() {
    "$PYTHON" scripts/e2e/receiver.py --port "$RECV_PORT" --out "$RECEIVED" \
        --secret-file "$SECRET" >>"$WORK/receiver.log" 2>&1 &
    RECV_PID=$!
    wait_port "$RECV_PORT" receiver "$WORK/receiver.log"
}
stop_receiver() {
    kill "$RECV_PID" 2>/dev/null
    wait "$RECV_PID" 2>/dev/null
    RECV_PID=
}
start_receiver
HOOK=http://127.0.0.1:$RECV_PORT/hook
CE_HOOK=http://127.0.0.1:$RECV_PORT/ce
NOTIFY=(--notify "$HOOK" --notify "$CE_HOOK,format=cloudevents" --notify-secret-file "$SECRET"
    --notify-poll 500ms --no-access-log)

start_serve() { # start_serve NAME PORT FLAGS...: sets NAME_PID
    local name=$1 port=$2
    shift 2
    "$SERVE" --addr "127.0.0.1:$port" "$@" >>"$WORK/$name.log" 2>&1 &
    printf -v "${name}_PID" '%s' "$!"
    wait_port "$port" "serve $name" "$WORK/$name.log"
}
verify() { # verify ACKED PATH FORMAT [--order]
    "$PYTHON" scripts/e2e/notify.py verify --acked "$1" --received "$RECEIVED" --path "$2" \
        --format "$3" --wait 90 "${@:4}"
}

# ---------------------------------------------------------------- 1. kill -9 mid-burst
S1_PORT=$(free_port) METRICS_PORT=$(free_port)
DATA=$WORK/data
start_serve S1 "$S1_PORT" --data-dir "$DATA" "${NOTIFY[@]}" --metrics-addr "127.0.0.1:$METRICS_PORT"
ACKED1=$WORK/acked-kill.jsonl
"$PYTHON" scripts/e2e/notify.py push --targets "127.0.0.1:$S1_PORT" --seconds 8 --threads 4 \
    --prefix kill/app --acked "$ACKED1" >"$WORK/push1.out" 2>&1 &
PUSHER=$!
PIDS+=($PUSHER)
sleep 3
kill -9 "$S1_PID"
wait "$S1_PID" 2>/dev/null
echo "# serve killed (SIGKILL) during the burst; restarting"
sleep 1
start_serve S1 "$S1_PORT" --data-dir "$DATA" "${NOTIFY[@]}" --metrics-addr "127.0.0.1:$METRICS_PORT"
wait "$PUSHER"
PUSH1_RC=$?

burst_went_on() {
    cat "$WORK/push1.out"
    [ "$PUSH1_RC" = 0 ] || { echo "the pusher failed"; return 1; }
    grep -q '"abandoned": [1-9]' "$WORK/push1.out" || { echo "no push was cut by the kill"; return 1; }
}
check "kill -9: pushes went on around the kill (some cut, none wrong)" burst_went_on
check "kill -9: every acknowledged push is delivered to the Distribution endpoint, signed" \
    verify "$ACKED1" /hook distribution
check "kill -9: every acknowledged push is delivered to the CloudEvents endpoint, signed" \
    verify "$ACKED1" /ce cloudevents

# ---------------------------------------------------------------- 2. receiver down
stop_receiver
echo "# receiver down for ${DOWN_SECONDS}s while pushes go on"
ACKED2=$WORK/acked-down.jsonl
"$PYTHON" scripts/e2e/notify.py push --targets "127.0.0.1:$S1_PORT" --seconds 6 --threads 4 \
    --prefix down/app --acked "$ACKED2" >"$WORK/push2.out" 2>&1
PUSH2_RC=$?
sleep "$DOWN_SECONDS"
start_receiver
echo "# receiver back"
pushes_while_down() {
    cat "$WORK/push2.out"
    [ "$PUSH2_RC" = 0 ]
}
check "receiver down: pushes are acknowledged while the receiver is down" pushes_while_down
check "receiver down: the backlog is delivered, in order within each repository" \
    verify "$ACKED2" /hook distribution --order
check "receiver down: the CloudEvents endpoint gets the backlog too, in order" \
    verify "$ACKED2" /ce cloudevents --order
delivery_metrics() {
    local text=$WORK/metrics.txt delivered failed lag i
    # The lag gauge is the delivering task's view: give it a moment to reach zero.
    for ((i = 0; i < 20; i++)); do
        curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" >"$text"
        grep -q "^registry_notify_lag_events{endpoint=\"$HOOK\"} 0\$" "$text" && break
        sleep 0.5
    done
    promtool check metrics <"$text"
    delivered=$(awk -v u="$HOOK" '$1 == "registry_notify_delivered_events_total{endpoint=\"" u "\"}" {print $2}' "$text")
    failed=$(awk -v u="$HOOK" '$1 == "registry_notify_requests_total{endpoint=\"" u "\",result=\"failed\"}" {print $2}' "$text")
    lag=$(awk -v u="$HOOK" '$1 == "registry_notify_lag_events{endpoint=\"" u "\"}" {print $2}' "$text")
    echo "delivered events: ${delivered:-none}, failed requests: ${failed:-none}, lag: ${lag:-none}"
    [ "${delivered:-0}" -gt 0 ] || { grep registry_notify "$text"; return 1; }
    [ "${failed:-0}" -gt 0 ] || { echo "no failed request counted while the receiver was down"; return 1; }
    [ "${lag:-1}" = 0 ] || { echo "lag $lag after the backlog was delivered"; return 1; }
}
check "receiver down: delivery metrics (delivered, failed while down, no lag left; promtool accepts them)" \
    delivery_metrics
kill -INT "$S1_PID" 2>/dev/null
wait "$S1_PID" 2>/dev/null
S1_PID=

# ---------------------------------------------------------------- 3. two processes
MOTO_PORT=$(free_port)
"$DEPS/venv/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
wait_port "$MOTO_PORT" moto "$WORK/moto.log"
curl -sf -X PUT "http://127.0.0.1:$MOTO_PORT/hooks" >/dev/null || { echo "creating the S3 bucket failed" >&2; exit 2; }
export AWS_ENDPOINT=http://127.0.0.1:$MOTO_PORT AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
S2_PORT=$(free_port) S3_PORT=$(free_port)
start_serve S2 "$S2_PORT" --storage s3://hooks/registry "${NOTIFY[@]}"
start_serve S3 "$S3_PORT" --storage s3://hooks/registry "${NOTIFY[@]}"
ACKED3=$WORK/acked-two.jsonl
"$PYTHON" scripts/e2e/notify.py push --targets "127.0.0.1:$S2_PORT,127.0.0.1:$S3_PORT" \
    --seconds 6 --threads 4 --prefix two/app --acked "$ACKED3" >"$WORK/push3.out" 2>&1
PUSH3_RC=$?
two_pushed() {
    cat "$WORK/push3.out"
    [ "$PUSH3_RC" = 0 ]
}
check "two processes: pushes through both are acknowledged" two_pushed
check "two processes on one bucket: every change is delivered (by either process)" \
    verify "$ACKED3" /hook distribution --order
check "two processes on one bucket: the CloudEvents endpoint gets every change too" \
    verify "$ACKED3" /ce cloudevents --order

finish_checks
