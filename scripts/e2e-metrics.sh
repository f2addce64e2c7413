#!/usr/bin/env bash
# End-to-end test of the metrics, the health endpoints, the access log and the audit
# log: our `serve` (release build) with `--metrics-addr`, scraped every second by a real
# Prometheus server (Debian's `prometheus` package, installed by
# scripts/install-test-deps.sh), while skopeo and curl push, pull, mount, delete, hit an
# immutable tag and fail to authenticate. Then, through Prometheus's HTTP API
# (`/api/v1/query`), it checks that each metric moved as expected and that every query
# of the shipped Grafana dashboard (docs/grafana-dashboard.json, with `$__rate_interval`
# and the like replaced by `1m`, `$instance` by `.*`) returns data; and that
# `promtool check metrics` accepts the exposition. A second serve scrubs its fs store
# every 2 s: a blob file changed on disk is found, counted (`registry_scrub_*`) and
# refused before any byte, and an upload of its bytes repairs it.
#
#   scripts/e2e-metrics.sh
#
# Environment:
#   SERVE        our serve binary; unset: built here first (cargo build --release
#                --example serve)
#   E2E_KEEP=1   keep the temp dir (serve, Prometheus and audit logs) for inspection
#   E2E_COUNTS   a file to write `PASSED FAILED` into at the end (scripts/test.sh reads
#                it); not written when serve or Prometheus could not be started
#   E2E_METRICS_DEADLINE  seconds the whole run may take (default 420); checks left
#                when it passes fail without running
#
# Only 127.0.0.1 is used; the script stops what it started (by PID) and nothing else.
# Each check prints `ok - NAME` or `not ok - NAME` with the reason; the last line is
# `N passed, M failed`, and the exit status is non-zero if a check failed (2 if serve or
# Prometheus could not be started).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

DEADLINE=$((SECONDS + ${E2E_METRICS_DEADLINE:-420}))
DASHBOARD=$ROOT/docs/grafana-dashboard.json

scripts/install-test-deps.sh apt || {
    echo "installing test dependencies failed (scripts/install-test-deps.sh apt)" >&2
    exit 2
}
for tool in prometheus promtool skopeo umoci curl jq; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/e2e-metrics.XXXXXX")
PIDS=()
cleanup() {
    local pid i
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || continue
        for ((i = 0; i < 50; i++)); do # up to 5 s, then SIGKILL
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ "${E2E_KEEP:-0}" = 1 ]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for URL CODE SECONDS PID: polls URL until it answers CODE; fails if PID exits.
wait_for() {
    local url=$1 code=$2 secs=$3 pid=$4 i
    for ((i = 0; i < secs * 5; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url")" = "$code" ] && return 0
        sleep 0.2
    done
    return 1
}

# ---------------------------------------------------------------- serve
if [ -z "${SERVE:-}" ]; then
    echo "building the serve example (release): cargo build --release --example serve"
    cargo build --release --locked -p registry-examples --example serve || { echo "build failed" >&2; exit 2; }
    SERVE=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/serve
fi
[ -x "$SERVE" ] || { echo "no serve binary at $SERVE" >&2; exit 2; }

REG=127.0.0.1:$(free_port)
MET=127.0.0.1:$(free_port)
PROM=127.0.0.1:$(free_port)
PASS=e2e-$RANDOM-secret
export PASS # serve reads it from the environment, never from its command line
AUDIT=$WORK/audit.jsonl
QUOTA=50000000
mkdir -p "$WORK/data"
# GC every 2 s with a 1 s protection window: a blob pushed without a manifest is
# collected within seconds. NO_COLOR: plain access log lines.
NO_COLOR=1 "$SERVE" --addr "$REG" --metrics-addr "$MET" --storage fs --data-dir "$WORK/data" \
    --auth-user ci:env:PASS --anonymous-read --gc-interval 2 --gc-window 1 \
    --quota "e2e/quota=$QUOTA" --immutable-tags 'e2e/app:release-*' \
    --audit-log "$AUDIT" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
PIDS+=("$SERVE_PID")
if ! wait_for "http://$MET/readyz" 200 30 "$SERVE_PID"; then
    echo "serve did not become ready:" >&2
    cat "$WORK/serve.log" >&2
    exit 2
fi
echo "serve: registry at http://$REG, metrics at http://$MET/metrics (pid $SERVE_PID)"

# ---------------------------------------------------------------- prometheus
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: registry
    static_configs:
      - targets: ['$MET']
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null || { echo "bad Prometheus config" >&2; exit 2; }
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prom" \
    --web.listen-address="$PROM" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
PIDS+=("$PROM_PID")
if ! wait_for "http://$PROM/-/ready" 200 60 "$PROM_PID"; then
    echo "Prometheus did not become ready:" >&2
    cat "$WORK/prometheus.log" >&2
    exit 2
fi
echo "prometheus: http://$PROM (pid $PROM_PID), $(prometheus --version 2>&1 | head -n 1)"

# ---------------------------------------------------------------- check harness
PASSED=0
FAILED=0
FAILED_NAMES=()
check() { # check NAME COMMAND...
    local name=$1 out=$WORK/check.out rc
    shift
    if ((SECONDS > DEADLINE)); then
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        echo "not ok - $name"
        echo "    # the run's deadline (E2E_METRICS_DEADLINE) has passed"
        return
    fi
    (
        set -euo pipefail
        "$@"
    ) >"$out" 2>&1
    rc=$?
    if [ "$rc" = 0 ]; then
        PASSED=$((PASSED + 1))
        echo "ok - $name"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        echo "not ok - $name"
        sed 's/^/    # /' "$out" | head -n 40
    fi
}
fail() {
    echo "FAILED: $*" >&2
    return 1
}
run() { # run COMMAND...: a client command; on failure its output
    local out rc
    out=$(timeout 180 "$@" 2>&1)
    rc=$?
    if [ "$rc" != 0 ]; then
        echo "command failed (exit $rc): $*" >&2
        echo "$out" | tail -n 30 >&2
        return 1
    fi
}
status_of() { # status_of CURL_ARGS...: the HTTP status of one request
    curl -s -o /dev/null -w '%{http_code}' --max-time 30 "$@"
}
sha() { echo "sha256:$(sha256sum "$1" | cut -d' ' -f1)"; }

# promql EXPR: the JSON result vector of an instant query.
promql() {
    curl -s --max-time 10 --fail "http://$PROM/api/v1/query" --data-urlencode "query=$1" |
        jq -ce 'select(.status == "success") | .data.result'
}
# expect EXPR: waits (up to 40 s: scrapes, storage refresh, rate windows) until the
# query returns at least one series.
expect() {
    local expr=$1 i result
    for ((i = 0; i < 80; i++)); do
        result=$(promql "$expr") || result=
        if [ -n "$result" ] && [ "$result" != "[]" ]; then
            return 0
        fi
        sleep 0.5
    done
    fail "no data for: $expr (last answer: ${result:-none})"
}

# ---------------------------------------------------------------- traffic
SKOPEO_POLICY=$WORK/policy.json
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$SKOPEO_POLICY"
export REGISTRY_AUTH_FILE=$WORK/auth.json
echo '{"auths":{}}' >"$REGISTRY_AUTH_FILE"
LAYOUT=$WORK/layout
sk() { run skopeo --policy "$SKOPEO_POLICY" "$@"; }

traffic_images() {
    mkdir -p "$WORK/files"
    head -c 300000 /dev/urandom >"$WORK/files/one.bin"
    head -c 200000 /dev/urandom >"$WORK/files/two.bin"
    run umoci init --layout "$LAYOUT"
    run umoci new --image "$LAYOUT:base"
    run umoci insert --image "$LAYOUT:base" --tag v1 "$WORK/files/one.bin" /one.bin
    run umoci insert --image "$LAYOUT:base" --tag v2 "$WORK/files/two.bin" /two.bin
}
traffic_push() {
    local tag
    for tag in v1 v2; do
        sk copy --quiet --dest-tls-verify=false --dest-creds "ci:$PASS" "oci:$LAYOUT:$tag" "docker://$REG/e2e/app:$tag"
    done
    sk copy --quiet --dest-tls-verify=false --dest-creds "ci:$PASS" "oci:$LAYOUT:v1" "docker://$REG/e2e/quota/img:v1"
    sk copy --quiet --dest-tls-verify=false --dest-creds "ci:$PASS" "oci:$LAYOUT:v1" "docker://$REG/e2e/app:release-1"
}
traffic_pull() {
    # Anonymous (--anonymous-read), then with credentials.
    sk copy --quiet --src-tls-verify=false "docker://$REG/e2e/app:v1" "oci:$WORK/back:v1"
    sk copy --quiet --src-tls-verify=false --src-creds "ci:$PASS" "docker://$REG/e2e/app:v2" "oci:$WORK/back:v2"
}
traffic_mount() {
    local layer code
    layer=$(jq -r '.layers[0].digest' "$LAYOUT/blobs/sha256/$(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == "v1") | .digest' "$LAYOUT/index.json" | cut -d: -f2)")
    code=$(status_of -u "ci:$PASS" -X POST "http://$REG/v2/e2e/mounted/blobs/uploads/?mount=$layer&from=e2e/app")
    [ "$code" = 201 ] || fail "mount answered $code, not 201"
}
traffic_immutable() {
    # release-1 holds v1: pushing v2 there is refused by the immutable-tag policy.
    if sk copy --quiet --dest-tls-verify=false --dest-creds "ci:$PASS" "oci:$LAYOUT:v2" "docker://$REG/e2e/app:release-1" 2>/dev/null; then
        fail "an immutable tag was moved"
    fi
}
traffic_delete() {
    local digest code
    sk copy --quiet --dest-tls-verify=false --dest-creds "ci:$PASS" "oci:$LAYOUT:v2" "docker://$REG/e2e/todelete:v2"
    digest=$(curl -s -u "ci:$PASS" -I "http://$REG/v2/e2e/todelete/manifests/v2" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' | tr -d '\r' |
        awk -F': ' 'tolower($1) == "docker-content-digest" {print $2}')
    [ -n "$digest" ] || fail "no digest for e2e/todelete:v2"
    code=$(status_of -u "ci:$PASS" -X DELETE "http://$REG/v2/e2e/todelete/manifests/$digest")
    [ "$code" = 202 ] || fail "delete answered $code, not 202"
}
traffic_orphan() {
    # A blob no manifest references: the collector removes it after the window.
    head -c 4096 /dev/urandom >"$WORK/orphan.bin"
    local code
    code=$(status_of -u "ci:$PASS" -X POST --data-binary "@$WORK/orphan.bin" \
        -H 'Content-Type: application/octet-stream' \
        "http://$REG/v2/e2e/orphan/blobs/uploads/?digest=$(sha "$WORK/orphan.bin")")
    [ "$code" = 201 ] || fail "orphan blob push answered $code"
}
traffic_bad_credentials() {
    local i code
    for i in 1 2 3; do
        code=$(status_of -u "ci:wrong-$i" "http://$REG/v2/e2e/app/tags/list")
        [ "$code" = 401 ] || fail "wrong password answered $code, not 401"
    done
    code=$(status_of -H 'Authorization: Bearer forged' "http://$REG/v2/e2e/app/tags/list")
    [ "$code" = 401 ] || fail "forged token answered $code, not 401"
    if sk copy --quiet --dest-tls-verify=false --dest-creds "ci:wrong" "oci:$LAYOUT:v1" "docker://$REG/e2e/app:nope" 2>/dev/null; then
        fail "skopeo pushed with a wrong password"
    fi
    # Anonymous writes get a challenge.
    code=$(status_of -X POST "http://$REG/v2/e2e/app/blobs/uploads/")
    [ "$code" = 401 ] || fail "anonymous push answered $code, not 401"
}

echo "# traffic"
check "traffic: build two images with umoci" traffic_images
check "traffic: skopeo pushes with credentials (e2e/app v1 v2 release-1, e2e/quota/img)" traffic_push
check "traffic: skopeo pulls, anonymous and with credentials" traffic_pull
check "traffic: a cross-repository mount" traffic_mount
check "traffic: an immutable tag refuses another manifest" traffic_immutable
check "traffic: push then delete a manifest" traffic_delete
check "traffic: a blob without a manifest, for the collector" traffic_orphan
check "traffic: wrong passwords, a forged token, skopeo with a wrong password, an anonymous push" traffic_bad_credentials

# ---------------------------------------------------------------- endpoints
endpoints() {
    local where path
    for where in "$REG" "$MET"; do
        for path in /healthz /readyz; do
            [ "$(status_of "http://$where$path")" = 200 ] || fail "$where$path is not 200"
        done
    done
    # Metrics only on their own listener (no credentials needed there).
    [ "$(status_of "http://$MET/metrics")" = 200 ] || fail "no /metrics on the metrics listener"
    [ "$(status_of "http://$REG/metrics")" = 404 ] || fail "/metrics served on the registry listener"
    [ "$(status_of -H 'X-Request-Id: e2e-trace-1' -D "$WORK/h" "http://$REG/v2/")" = 401 ]
    grep -qi '^x-request-id: e2e-trace-1' "$WORK/h" || fail "X-Request-Id not echoed: $(cat "$WORK/h")"
}
promtool_check() {
    curl -s --max-time 10 "http://$MET/metrics" >"$WORK/exposition.txt"
    grep -q '^registry_pushes_total' "$WORK/exposition.txt" || fail "exposition without registry_pushes_total"
    promtool check metrics <"$WORK/exposition.txt"
}
echo "# endpoints"
check "health endpoints on both listeners, /metrics only on its own, X-Request-Id echoed" endpoints
check "promtool check metrics accepts the exposition" promtool_check

# ---------------------------------------------------------------- metrics moved
echo "# metrics, through Prometheus"
m() { # m NAME EXPR: a check that EXPR (a comparison) returns data
    check "metric: $1" expect "$2"
}
m "Prometheus scrapes serve" 'up{job="registry"} == 1'
m "requests by route template" 'registry_http_requests_total{route="/v2/{name}/manifests/{reference}",method="PUT",status="2xx"} >= 5'
m "route labels are templates, never paths" 'absent(registry_http_requests_total{route=~".*e2e.*"}) and on() count(count by (route) (registry_http_requests_total)) <= 13'
m "latency histogram" 'registry_http_request_duration_seconds_count{route="/v2/{name}/blobs/{digest}",method="GET"} > 0'
m "bytes received" 'sum(registry_http_request_bytes_total) > 500000'
m "bytes sent" 'sum(registry_http_response_bytes_total) > 500000'
m "connections accepted, open connections" 'registry_http_connections_accepted_total > 0 and on() registry_http_open_connections >= 0'
m "manifest pushes" 'registry_pushes_total{kind="manifest"} >= 5'
m "blob pushes" 'registry_pushes_total{kind="blob"} >= 4'
m "manifest and blob pulls" 'registry_pulls_total{kind="manifest"} >= 2 and on() registry_pulls_total{kind="blob"} >= 2'
m "mounts" 'registry_mounts_total{result="mounted"} >= 1'
m "deletes" 'registry_deletes_total{kind="manifest"} >= 1'
m "immutable-tag refusals" 'registry_refusals_total{reason="immutable_tag"} >= 1'
m "refused credentials" 'registry_auth_requests_total{result="invalid_credentials"} >= 5'
m "verified credentials" 'registry_auth_requests_total{result="success"} > 0'
m "challenges" 'registry_auth_requests_total{result="challenge"} > 0'
# Manifests: e2e/app v1 and v2 (release-1 is v1), e2e/quota/img. Repositories: those
# two for sure; e2e/mounted, e2e/todelete and e2e/orphan hold only unreferenced blobs,
# which the collector (1 s window) removes, sooner or later.
m "stored blobs, manifests, repositories" 'registry_storage_blobs > 0 and on() registry_storage_manifests >= 3 and on() registry_storage_repositories >= 2'
m "quota usage of the configured prefix" 'registry_quota_usage_bytes{prefix="e2e/quota"} > 0 and on() registry_quota_limit_bytes{prefix="e2e/quota"} == '"$QUOTA"
m "open upload sessions" 'registry_upload_sessions_open >= 0'
# New manifests in a repository: app v1, app v2, quota/img v1, todelete v2.
m "store latency per operation" 'registry_storage_operation_duration_seconds_count{store="metadata",operation="put_manifest"} >= 4 and on() registry_storage_operation_duration_seconds_count{store="blob",operation="read"} > 0'
m "collector runs" 'registry_gc_runs_total{result="ok"} >= 2 and on() registry_gc_duration_seconds_count >= 2'
m "collector removals and bytes freed" 'registry_gc_removed_total{kind="links"} >= 1 and on() registry_gc_removed_total{kind="blobs"} >= 1 and on() registry_gc_bytes_freed_total >= 4096'
m "process metrics" 'process_cpu_seconds_total > 0 and on() process_resident_memory_bytes > 0 and on() process_open_fds > 0 and on() process_start_time_seconds > 1600000000'

# ---------------------------------------------------------------- the dashboard
echo "# the dashboard's queries ($(jq '[.. | objects | select(has("expr"))] | length' "$DASHBOARD") in docs/grafana-dashboard.json)"
dashboard_query() { # dashboard_query EXPR
    local expr=$1
    expr=${expr//\$__rate_interval/1m}
    expr=${expr//\$__interval/1m}
    expr=${expr//\$__range/1m}
    expr=${expr//\$\{instance\}/.*}
    expr=${expr//\$instance/.*}
    case "$expr" in *'$'*) fail "an unreplaced variable in: $expr" ;; esac
    expect "$expr"
}
check "dashboard: parses, and has queries" jq -e '[.. | objects | select(has("expr"))] | length > 10' "$DASHBOARD"
while IFS=$'\t' read -r title legend expr; do
    check "dashboard: $title ($legend)" dashboard_query "$expr"
done < <(jq -r '.panels[] | .title as $t | (.targets // [])[] | [$t, .legendFormat, .expr] | @tsv' "$DASHBOARD")

# ---------------------------------------------------------------- logs
audit_log() {
    local event
    for event in manifest_push blob_upload blob_mount manifest_delete auth_failure gc_link_removed blob_bytes_deleted; do
        jq -se --arg e "$event" 'any(.[]; .event == $e)' "$AUDIT" >/dev/null || fail "no $event line in the audit log"
    done
    # Each line is one JSON object with the common fields.
    jq -se 'all(.[]; has("time") and has("event") and has("identity") and has("source") and has("request_id"))' "$AUDIT" >/dev/null ||
        fail "an audit line without the common fields"
    # Pushes are attributed; refused credentials name the claimed user, never a password.
    jq -se '[.[] | select(.event == "manifest_push")] | all(.identity == "ci" and (.source | startswith("127.0.0.1:")))' "$AUDIT" >/dev/null ||
        fail "a manifest_push line without identity or source"
    [ "$(jq -s '[.[] | select(.event == "manifest_push" and .repository == "e2e/app")] | length' "$AUDIT")" -ge 3 ] ||
        fail "fewer than 3 manifest pushes to e2e/app in the audit log"
    if grep -q "wrong-1\|$PASS" "$AUDIT"; then fail "a password in the audit log"; fi
}
access_log() {
    grep 'registry_http::access' "$WORK/serve.log" >"$WORK/access.log" || fail "no access log lines"
    grep -q 'request_id=e2e-trace-1' "$WORK/access.log" || fail "the client's request id is not in the access log"
    grep -q 'route=/v2/{name}/manifests/{reference}.*identity=ci' "$WORK/access.log" || fail "no access line with route and identity"
}
echo "# logs"
check "audit log: every kind of change and refused credentials, with identity and source, no secrets" audit_log
check "access log: a line per request with route, request id and identity" access_log

# ---------------------------------------------------------------- background scrub
# A second serve on its own fs store, scrubbing every 2 s: a blob file changed on disk
# behind its back (same length, same inode: what rot looks like) is found by a pass,
# counted in the metrics, and refused before any byte (500, where a verified read would
# only fail at the end of a 200); an upload of the same bytes repairs it.
SCRUB_REG=127.0.0.1:$(free_port)
SCRUB_MET=127.0.0.1:$(free_port)
mkdir -p "$WORK/scrub-data"
"$SERVE" --addr "$SCRUB_REG" --metrics-addr "$SCRUB_MET" --storage fs --data-dir "$WORK/scrub-data" \
    --no-access-log --scrub-every 2s --scrub-rate 64MiB >"$WORK/scrub-serve.log" 2>&1 &
SCRUB_PID=$!
PIDS+=("$SCRUB_PID")
wait_for "http://$SCRUB_MET/readyz" 200 30 "$SCRUB_PID" || { cat "$WORK/scrub-serve.log" >&2; exit 2; }
head -c 300000 /dev/urandom >"$WORK/scrub-blob"
SCRUB_DIGEST=$(sha "$WORK/scrub-blob")
SCRUB_HEX=${SCRUB_DIGEST#sha256:}
SCRUB_FILE=$WORK/scrub-data/blobs/sha256/${SCRUB_HEX:0:2}/$SCRUB_HEX

scrub_metric() { # scrub_metric NAME: its value in the exposition
    curl -s --max-time 10 "http://$SCRUB_MET/metrics" | awk -v n="$1" '$1 == n { print $2 }'
}
wait_scrub_metric() { # wait_scrub_metric NAME AWK_CONDITION: up to 20 s
    local v i
    for ((i = 0; i < 100; i++)); do
        v=$(scrub_metric "$1")
        [ -n "$v" ] && awk -v v="$v" "BEGIN { exit !($2) }" && return 0
        sleep 0.2
    done
    fail "$1 is ${v:-absent}, not $2"
}
upload_scrub_blob() {
    local code
    code=$(status_of -X POST -H 'Content-Type: application/octet-stream' --data-binary "@$WORK/scrub-blob" \
        "http://$SCRUB_REG/v2/e2e/scrub/blobs/uploads/?digest=$SCRUB_DIGEST")
    [ "$code" = 201 ] || fail "monolithic upload answered $code"
}

scrub_finds_and_refuses() {
    upload_scrub_blob
    [ -f "$SCRUB_FILE" ] || fail "no blob file at $SCRUB_FILE"
    local passes
    passes=$(scrub_metric registry_scrub_passes_total)
    wait_scrub_metric registry_scrub_passes_total "v > ${passes:-0}"
    wait_scrub_metric registry_scrub_files_total "v >= 1"
    [ "$(scrub_metric registry_scrub_corrupt_files)" = 0 ] || fail "a good file counted corrupt"
    # One byte changed in place: same length, same inode.
    python3 -c 'import sys; f = open(sys.argv[1], "r+b"); f.seek(1000); b = f.read(1); f.seek(1000); f.write(bytes([b[0] ^ 0xff]))' "$SCRUB_FILE"
    wait_scrub_metric registry_scrub_corrupt_files "v == 1"
    local code
    code=$(status_of "http://$SCRUB_REG/v2/e2e/scrub/blobs/$SCRUB_DIGEST")
    [ "$code" = 500 ] || fail "GET of the corrupt blob answered $code, not 500 before any byte"
    code=$(status_of -H 'Range: bytes=0-99' "http://$SCRUB_REG/v2/e2e/scrub/blobs/$SCRUB_DIGEST")
    [ "$code" = 500 ] || fail "a range GET of the corrupt blob answered $code"
    grep -q "scrub:.*1 corrupt" "$WORK/scrub-serve.log" || fail "no scrub report with 1 corrupt in the log"
    echo "found corrupt by a pass, GET and range GET refused with 500"
}
scrub_repaired_by_upload() {
    upload_scrub_blob
    local got
    got=$(curl -s --max-time 30 "http://$SCRUB_REG/v2/e2e/scrub/blobs/$SCRUB_DIGEST" | sha256sum | cut -d' ' -f1)
    [ "sha256:$got" = "$SCRUB_DIGEST" ] || fail "after the upload the blob reads as sha256:$got"
    wait_scrub_metric registry_scrub_corrupt_files "v == 0"
    curl -s --max-time 10 "http://$SCRUB_MET/metrics" | promtool check metrics >/dev/null ||
        fail "promtool refuses the exposition with the scrub's metrics"
    echo "the upload replaced the file; the next pass counts 0 corrupt"
}
check "scrub: a blob file changed on disk is found by a pass and refused before any byte" scrub_finds_and_refuses
check "scrub: an upload of its bytes repairs it; metrics accepted by promtool" scrub_repaired_by_upload

if kill -0 "$SERVE_PID" 2>/dev/null; then
    PASSED=$((PASSED + 1))
    echo "ok - serve is still running after the run"
else
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("serve is still running after the run")
    echo "not ok - serve is still running after the run"
fi
if ((FAILED)); then
    echo "# serve log (last 20 lines):"
    grep -v 'registry_http::access' "$WORK/serve.log" | tail -n 20 | sed 's/^/#   /'
    echo "# failed checks:"
    printf '#   not ok - %s\n' "${FAILED_NAMES[@]}"
fi
[ -z "${E2E_COUNTS:-}" ] || echo "$PASSED $FAILED" >"$E2E_COUNTS"
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
