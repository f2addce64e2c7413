#!/usr/bin/env bash
# Pull-through caching, mirroring and sync between registries, end to end, with real
# clients (skopeo, podman, curl) and two real upstreams. Everything on 127.0.0.1,
# started and stopped here by PID.
#
#   scripts/e2e-proxy.sh
#
#   SERVE       the serve binary; unset: built here first
#   E2E_COUNTS  a file to write `PASSED FAILED` into at the end (scripts/test.sh reads it)
#   E2E_KEEP=1  keep the temp dir (logs, layouts, data) for inspection
#   BIG_MIB     size of the big random layers (default 64)
#
# Upstreams, seeded with `skopeo copy --preserve-digests` from OCI layouts made here
# (scripts/e2e/proxy_oci.py; random content, D's and U's share no blob): single-platform
# images, a linux/amd64 + linux/arm64 index with different layers, and images with a
# BIG_MIB random layer:
#   D  CNCF Distribution 2.8 (Debian's docker-registry), htpasswd (bcrypt) auth, deletes
#      on, access log on: every upstream request is counted from its log, by digest;
#   U  our serve with token auth (--auth-user; clients follow the Bearer challenge) and
#      --access-log: its requests are counted by route and repository.
# The proxy P: `serve --proxy dist=D --proxy ours=U --proxy flaky=RELAY` (no auth on P).
#
# 1. skopeo and podman pull through P from both upstreams; the manifest digests are the
#    upstreams'. Second pulls (a new skopeo dir, a fresh podman storage) make no
#    upstream blob request at all. Pushes under a proxy prefix are refused; tag lists
#    come from the upstream; a tag moved upstream is seen after the ttl.
# 2. Multi-arch: skopeo --override-arch arm64 pulls the index through P: the amd64
#    manifest and blobs are never requested upstream (D's log, U's log) and are not in
#    P's storage (a plain serve on P's data dir answers 404; the arm64 ones 200).
# 3. Upstream killed mid-blob: a relay (scripts/e2e/proxy_relay.py) in front of D dies
#    after half of a BIG_MIB blob: the pull fails, nothing partial is stored in P; with
#    the relay back, the next pull succeeds and verifies.
# 4. 20 concurrent GETs of one uncached big blob through P: exactly one upstream GET,
#    and all 20 bodies hash to the digest.
# 5. Upstream down (D stopped, ttl=1s): the cached tag still pulls, an uncached one fails
#    quickly (no hang).
# 6. Figures (not asserted): direct pull from D against the first and a cached pull
#    through P of a BIG_MIB image; P's proxy metrics if it has them.
# 7. Mirroring: a serve S with `--mirror prod=D,deletes --mirror prod=U,remote=copy/prod`
#    gets a burst of pushes, is killed (-9) in the middle and restarted: both remotes
#    end up with every acknowledged image (digests compared, some pulled by skopeo); a
#    manifest deleted by digest, and a tag, in S are deleted in D (deletes) and kept in
#    U (no deletes); pushes after the deletes are still mirrored.
# 8. `serve sync`: D -> a stopped fs store, served and pulled; then the store -> U.
#
# The last line is `N passed, M failed` (exit status non-zero if a check failed, 2 if a
# server could not be started); figures are printed as `figure: ...` lines.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIG_MIB=${BIG_MIB:-64}

scripts/install-test-deps.sh apt python || { echo "installing test dependencies failed" >&2; exit 2; }
for tool in skopeo podman docker-registry htpasswd curl jq; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
PYTHON=$ROOT/.test-deps/venv/bin/python
OCI=(scripts/e2e/proxy_oci.py)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/e2e-proxy.XXXXXX")
# Processes started inside a check's subshell write their PIDs here.
EXTRA_PIDS=$WORK/extra.pids
PIDS=()
cleanup() {
    local pid
    [ -f "$EXTRA_PIDS" ] && mapfile -t -O "${#PIDS[@]}" PIDS <"$EXTRA_PIDS"
    for pid in "${PIDS[@]}" ${D_PID:-} ${U_PID:-} ${P_PID:-} ${X_PID:-} ${S_PID:-} ${RELAY_PID:-} ${PUSHER_PID:-}; do
        kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ "${E2E_KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port, wait_port, serve_binary, check, fail, finish_checks
source "$ROOT/scripts/e2e/lib.sh"
serve_binary

# Clients keep logins here, not in the user's files; podman stores images here.
export REGISTRY_AUTH_FILE=$WORK/auth.json
echo '{}' >"$REGISTRY_AUTH_FILE"
PM=$WORK/podman
podman_() {
    local r=${PODMAN_ROOT:-root}
    timeout 120 podman --storage-driver vfs --root "$PM/$r" --runroot "$PM/run-$r" "$@"
}

# scripts/e2e/lib.sh's check runs each check in a subshell that is an `if` condition,
# where bash ignores `set -e`: a failing command would not end the check. So here `fail`
# and `run` end the check themselves (exit from its subshell, or from the `$(...)` they
# are in, which then yields nothing and fails the comparison around it).
fail() { echo "FAILED: $*" >&2; exit 1; }
# run COMMAND...: runs it (two minutes at most), showing its output only when it fails;
# a failure ends the check.
run() {
    local out rc
    if declare -F "$1" >/dev/null; then out=$("$@" 2>&1); else out=$(timeout 120 "$@" 2>&1); fi
    rc=$?
    [ "$rc" = 0 ] && return 0
    printf 'command failed (exit %s): %s\n%s\n' "$rc" "$*" "$(echo "$out" | tail -n 20)" >&2
    exit 1
}
# fails COMMAND...: succeeds if COMMAND fails (within two minutes), printing the reason.
fails() {
    local out rc
    out=$(timeout 120 "$@" 2>&1)
    rc=$?
    if [ "$rc" = 0 ]; then
        echo "unexpectedly succeeded: $*" >&2
        return 1
    fi
    echo "failed as expected (exit $rc): $(echo "$out" | tail -n 1 | cut -c1-300)"
}

# stop PID: SIGTERM, up to 10 s, then SIGKILL; reaps it (a child of this shell).
stop() {
    local i
    [ -n "$1" ] || return 0
    kill "$1" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        # Gone, or exited and not reaped yet (a zombie).
        ps -o stat= -p "$1" 2>/dev/null | grep -qv Z || break
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true # gone already, usually
    wait "$1" 2>/dev/null || true    # its status is the signal's
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# ---------------------------------------------------------------- fixtures
mkdir -p "$PM" "$WORK/d" # not $WORK/p-spool: serve creates it
D_PASS=d-$RANDOM$RANDOM
U_PASS=u-$RANDOM$RANDOM
printf '%s\n' "$D_PASS" | htpasswd -c -i -B "$WORK/d.htpasswd" dist 2>/dev/null
printf 'dist:%s\n' "$D_PASS" >"$WORK/dist.creds"
printf '%s\n' "$U_PASS" >"$WORK/u.pass"
printf 'ci:%s\n' "$U_PASS" >"$WORK/ours.creds"
chmod 600 "$WORK"/*.creds "$WORK/u.pass"

# Two layouts of random images: D's and U's share no blob, so that a pull of ours/...
# cannot be answered with what P fetched from D.
echo "# building the test images (OCI layouts, ${BIG_MIB} MiB random layers)"
if ! "$PYTHON" "${OCI[@]}" layout "$WORK/layout-d" --big-mib "$BIG_MIB" >"$WORK/layout-d.json" ||
    ! "$PYTHON" "${OCI[@]}" layout "$WORK/layout-u" --big-mib "$BIG_MIB" --big big-v1 >"$WORK/layout-u.json"; then
    echo "building the layouts failed" >&2
    exit 2
fi
# img d|u REF FIELD: a digest from D's or U's layout summary (a jq path below REF).
img() { jq -r --arg r "$2" ".[\$r] | $3" "$WORK/layout-$1.json"; }

D_PORT=$(free_port) U_PORT=$(free_port) P_PORT=$(free_port) X_PORT=$(free_port)
RELAY_PORT=$(free_port) S_PORT=$(free_port) PM_PORT=$(free_port) SM_PORT=$(free_port)
D=127.0.0.1:$D_PORT U=127.0.0.1:$U_PORT P=127.0.0.1:$P_PORT X=127.0.0.1:$X_PORT

cat >"$WORK/distribution.yml" <<EOF
version: 0.1
log:
  accesslog:
    disabled: false
  level: error
storage:
  filesystem:
    rootdirectory: $WORK/d
  delete:
    enabled: true
http:
  addr: $D
auth:
  htpasswd:
    realm: e2e
    path: $WORK/d.htpasswd
EOF
start_d() {
    # Distribution reads REGISTRY_* variables as configuration: not REGISTRY_AUTH_FILE.
    env -u REGISTRY_AUTH_FILE docker-registry serve "$WORK/distribution.yml" >>"$WORK/d.log" 2>&1 &
    D_PID=$!
    wait_port "$D_PORT" Distribution "$WORK/d.log"
}
start_u() {
    "$SERVE" --addr "$U" --data-dir "$WORK/u" --auth-user "ci:file:$WORK/u.pass" \
        --auth-max-failures 100000 --auth-max-failures-per-address 100000 \
        --access-log "$WORK/u-access.log" >>"$WORK/u.log" 2>&1 &
    U_PID=$!
    wait_port "$U_PORT" "serve U" "$WORK/u.log"
}
PROXIES=(--proxy "dist=http://$D,credentials=file:$WORK/dist.creds,ttl=1s"
    --proxy "ours=http://$U,credentials=file:$WORK/ours.creds"
    --proxy "flaky=http://127.0.0.1:$RELAY_PORT,credentials=file:$WORK/dist.creds")
start_p() {
    "$SERVE" --addr "$P" --data-dir "$WORK/p" "${PROXIES[@]}" --proxy-spool "$WORK/p-spool" \
        --metrics-addr "127.0.0.1:$PM_PORT" --access-log "$WORK/p-access.log" >>"$WORK/p.log" 2>&1 &
    P_PID=$!
    wait_port "$P_PORT" "serve P (proxy)" "$WORK/p.log"
}
# A plain serve (no --proxy) on P's data dir, P stopped: what P stored, and only that.
start_plain() {
    stop "$P_PID"
    P_PID=
    "$SERVE" --addr "$X" --data-dir "$WORK/p" --no-access-log >>"$WORK/plain.log" 2>&1 &
    X_PID=$!
    wait_port "$X_PORT" "plain serve on P's data" "$WORK/plain.log"
}
stop_plain() {
    stop "$X_PID"
    X_PID=
    start_p
}
# The relay in front of D; with an argument, it dies in the middle of that blob.
start_relay() {
    "$PYTHON" scripts/e2e/proxy_relay.py --port "$RELAY_PORT" --upstream "$D" \
        --log "$WORK/relay-requests.log" ${1:+--die-on-blob "$1"} >>"$WORK/relay.log" 2>&1 &
    RELAY_PID=$!
    wait_port "$RELAY_PORT" relay "$WORK/relay.log"
}

start_d
start_u
echo "# [${SECONDS}s] Distribution D at $D (htpasswd), serve U at $U (tokens)"

# ---------------------------------------------------------------- helpers
# D's requests (combined log format on its stdout: `"METHOD PATH HTTP/1.1" STATUS`,
# digests included) and U's (its access log: method, route and repository, no digests).
# A mark is a log's line count; *_since MARK prints the lines written after it.
d_mark() { wc -l <"$WORK/d.log"; }
u_mark() { wc -l <"$WORK/u-access.log"; }
d_since() { tail -n +"$(($1 + 1))" "$WORK/d.log" | grep -E '^127\.0\.0\.1 - .*"[A-Z]+ /v2/' || true; }
u_since() { tail -n +"$(($1 + 1))" "$WORK/u-access.log"; }
d_blob_reqs() { grep -cE '"(GET|HEAD) /v2/[^ ]+/blobs/sha256:[0-9a-f]+ ' "$WORK/d.log" || true; }
u_blob_reqs() { grep -c 'route=/v2/{name}/blobs/{digest}' "$WORK/u-access.log" || true; }

# digest_at HOST REPO REF [curl auth args]: the Docker-Content-Digest a registry answers.
digest_at() {
    local host=$1 repo=$2 ref=$3
    shift 3
    curl -sf --max-time 30 -I "$@" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json' \
        "http://$host/v2/$repo/manifests/$ref" | tr -d '\r' |
        awk 'tolower($1) == "docker-content-digest:" { print $2 }'
}
d_digest() { digest_at "$D" "$1" "$2" -u "dist:$D_PASS"; }
u_digest() { digest_at "$U" "$1" "$2" -u "ci:$U_PASS"; }
# status_at METHOD URL [curl args]: the status of a request, accepting OCI manifests
# and indexes (Distribution answers 404 for an OCI manifest not accepted).
status_at() {
    local m=$1 url=$2
    shift 2
    local how=(-X "$m")
    [ "$m" = HEAD ] && how=(--head)
    curl -s -o /dev/null -w '%{http_code}' --max-time 60 "${how[@]}" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json' \
        "$@" "$url"
}
sha_of() { echo "sha256:$(sha256sum "$1" | cut -d' ' -f1)"; }
# pull_dir REF DIR [skopeo copy options]: skopeo copy from P into a dir: (it verifies
# every blob's digest); prints the manifest's digest.
pull_dir() {
    local ref=$1 dir=$2
    shift 2
    rm -rf "$dir"
    run skopeo copy --quiet --src-tls-verify=false "$@" "docker://$P/$ref" "dir:$dir"
    sha_of "$dir/manifest.json"
}

# ---------------------------------------------------------------- seeding
seed_to() { # seed_to HOST CREDS LAYOUT
    local pair ref dest
    for pair in "app-v1 library/app:v1" "app-v2 library/app:v2" "app-v2 library/tool:v1" \
        "multi-v1 library/multi:v1" "big-v1 library/big:v1"; do
        read -r ref dest <<<"$pair"
        run skopeo copy --quiet --all --preserve-digests --dest-tls-verify=false \
            --dest-creds "$2" "oci:$3:$ref" "docker://$1/$dest"
    done
}
seed() {
    seed_to "$D" "dist:$D_PASS" "$WORK/layout-d"
    seed_to "$U" "ci:$U_PASS" "$WORK/layout-u"
    # Only on D: the image the relay cuts, and the one timed.
    run skopeo copy --quiet --preserve-digests --dest-tls-verify=false --dest-creds "dist:$D_PASS" \
        "oci:$WORK/layout-d:flaky-v1" "docker://$D/library/crash:v1"
    run skopeo copy --quiet --preserve-digests --dest-tls-verify=false --dest-creds "dist:$D_PASS" \
        "oci:$WORK/layout-d:bench-v1" "docker://$D/library/bench:v1"
    [ "$(d_digest library/multi v1)" = "$(img d multi-v1 .digest)" ] || fail "D's index digest differs"
    [ "$(u_digest library/multi v1)" = "$(img u multi-v1 .digest)" ] || fail "U's index digest differs"
    [ "$(u_digest library/big v1)" = "$(img u big-v1 .digest)" ] || fail "U's big image digest differs"
    echo "seeded D and U: app:v1, app:v2, tool:v1, a two-platform index, a ${BIG_MIB} MiB image"
}
check "seed: skopeo pushes the images to D (htpasswd) and U (tokens), digests preserved" seed

start_relay "$(img d flaky-v1 '.layers[0]')"
start_p
echo "# [${SECONDS}s] proxy P at $P: dist -> D, ours -> U, flaky -> relay -> D"

# ---------------------------------------------------------------- 1. pulls through P
# side dist|ours: the layout that prefix's upstream was seeded from; up_digest dist|ours
# REPO TAG: what that upstream answers for REPO:TAG.
side() { if [ "$1" = dist ]; then echo d; else echo u; fi; }
up_digest() { if [ "$1" = dist ]; then d_digest "$2" "$3"; else u_digest "$2" "$3"; fi; }
# u_blob_gets MARK REPO: blob GETs U answered 200 in REPO since MARK.
u_blob_gets() {
    u_since "$1" | grep -F "method=GET route=/v2/{name}/blobs/{digest} repository=$2 " | grep -c 'status=200' || true
}

skopeo_through() {
    local up digest want um n
    um=$(u_mark)
    for up in dist ours; do
        want=$(up_digest "$up" library/app v1)
        [ "$want" = "$(img "$(side "$up")" app-v1 .digest)" ] || fail "$up's upstream answers $want"
        digest=$(pull_dir "$up/library/app:v1" "$WORK/sk-$up")
        [ "$digest" = "$want" ] || fail "$up: pulled manifest $digest, the upstream's is $want"
        [ "$(digest_at "$P" "$up/library/app" v1)" = "$want" ] || fail "P answers another digest for $up/library/app:v1"
        echo "$up/library/app:v1 -> $digest"
    done
    n=$(u_blob_gets "$um" library/app)
    [ "$n" -ge 2 ] || fail "U served $n blobs of library/app: ours/ did not come from U"
}
check "skopeo pulls dist/ and ours/ through P; manifest digests are D's and U's" skopeo_through

podman_through() {
    local up ref got want
    for up in dist ours; do
        ref=$P/$up/library/tool:v1
        want=$(up_digest "$up" library/tool v1)
        [ "$want" = "$(img "$(side "$up")" app-v2 .digest)" ] || fail "$up's upstream answers $want"
        run podman_ pull --quiet --tls-verify=false "$ref"
        got=$(podman_ image inspect --format '{{.Digest}}' "$ref")
        [ "$got" = "$want" ] || fail "podman: $ref has digest $got, the upstream's is $want"
        echo "podman $ref -> $got"
    done
}
check "podman pulls dist/ and ours/ through P (first pulls); image digests are the upstreams'" podman_through

second_pulls() {
    local d0 u0 d1 u1 up
    d0=$(d_blob_reqs) u0=$(u_blob_reqs)
    for up in dist ours; do
        [ "$(pull_dir "$up/library/app:v1" "$WORK/sk2-$up")" = "$(img "$(side "$up")" app-v1 .digest)" ] ||
            fail "$up: digest"
    done
    PODMAN_ROOT=root2 # a fresh podman storage: every layer is fetched again
    for up in dist ours; do
        run podman_ pull --quiet --tls-verify=false "$P/$up/library/app:v1"
        run podman_ pull --quiet --tls-verify=false "$P/$up/library/tool:v1"
    done
    sleep 0.5 # D writes its log line once a response is done
    d1=$(d_blob_reqs) u1=$(u_blob_reqs)
    echo "upstream blob requests: D $d0 -> $d1, U $u0 -> $u1"
    [ "$d1" = "$d0" ] && [ "$u1" = "$u0" ] || fail "second pulls reached the upstreams' blobs"
}
check "second pulls (new skopeo dir, fresh podman storage) make no upstream blob request" second_pulls

no_pushes() {
    local code body=$WORK/push.body
    code=$(curl -s -o "$body" -w '%{http_code}' --max-time 30 -X POST "http://$P/v2/dist/library/app/blobs/uploads/")
    [ "$code" = 403 ] && jq -e '.errors[0].code == "DENIED"' "$body" >/dev/null ||
        fail "POST upload under dist/: $code $(cat "$body")"
    fails skopeo copy --quiet --dest-tls-verify=false "oci:$WORK/layout-d:app-v1" "docker://$P/ours/library/pushed:v1" ||
        fail "skopeo pushed under ours/"
    echo "upload under dist/: $code DENIED; skopeo push under ours/ refused"
}
check "pushes under a proxy prefix are refused (403 DENIED)" no_pushes

listing_and_unknowns() {
    local tags code
    tags=$(timeout 60 skopeo list-tags --tls-verify=false "docker://$P/dist/library/app" | jq -c '.Tags | sort')
    [ "$tags" = '["v1","v2"]' ] || fail "tags of dist/library/app through P: $tags"
    code=$(status_at GET "http://$P/v2/dist/library/nothing/manifests/v1")
    [ "$code" = 404 ] || fail "an image D does not have: $code through P"
    code=$(status_at GET "http://$P/v2/ours/library/app/manifests/nothing")
    [ "$code" = 404 ] || fail "a tag U does not have: $code through P"
    echo "skopeo list-tags through P: $tags (from D); unknown image and tag: 404"
}
check "tag listing through P comes from the upstream; what it lacks is 404" listing_and_unknowns

# dist has ttl=1s: a tag moved upstream is seen through P once the ttl has passed.
tag_moves() {
    local before after
    run skopeo copy --quiet --preserve-digests --dest-tls-verify=false --dest-creds "dist:$D_PASS" \
        "oci:$WORK/layout-d:app-v1" "docker://$D/library/moving:latest"
    before=$(pull_dir dist/library/moving:latest "$WORK/moving")
    [ "$before" = "$(img d app-v1 .digest)" ] || fail "first pull: $before"
    run skopeo copy --quiet --preserve-digests --dest-tls-verify=false --dest-creds "dist:$D_PASS" \
        "oci:$WORK/layout-d:app-v2" "docker://$D/library/moving:latest"
    sleep 1.5
    after=$(pull_dir dist/library/moving:latest "$WORK/moving")
    [ "$after" = "$(img d app-v2 .digest)" ] || fail "after the tag moved upstream and 1.5 s: $after"
    echo "dist/library/moving:latest: ${before:7:12} -> ${after:7:12} after the tag moved in D (ttl 1s)"
}
check "ttl: a tag moved upstream is served moved through P after the ttl" tag_moves

# ---------------------------------------------------------------- 2. multi-arch
multi_arm64() {
    local up s digest n dm um
    dm=$(d_mark) um=$(u_mark)
    for up in dist ours; do
        s=$(side "$up")
        digest=$(pull_dir "$up/library/multi:v1" "$WORK/arm-$up" --override-arch arm64 --override-os linux)
        [ "$digest" = "$(img "$s" multi-v1 .arm64.digest)" ] ||
            fail "$up: pulled $digest, the arm64 manifest is $(img "$s" multi-v1 .arm64.digest)"
    done
    sleep 0.5
    # D logs digests: nothing of amd64 was asked for, by any method; arm64's were.
    for digest in $(img d multi-v1 '.amd64.digest, .amd64.config, .amd64.layers[]'); do
        n=$(d_since "$dm" | grep -c "${digest#sha256:}" || true)
        [ "$n" = 0 ] || fail "D was asked for the amd64 $digest ($n requests)"
    done
    for digest in $(img d multi-v1 '.arm64.digest, .arm64.layers[]'); do
        d_since "$dm" | grep -q "\"GET /v2/library/multi/[a-z]*/$digest " || fail "D was never asked for the arm64 $digest"
    done
    # U logs routes, not digests: the arm64 image's two blobs were fetched, no more.
    n=$(u_blob_gets "$um" library/multi)
    echo "arm64 pulled through P from both; D never saw an amd64 digest; U served $n blobs of library/multi"
    [ "$n" = 2 ] || fail "U served $n blobs of library/multi, the arm64 image has 2"
}
check "multi-arch: --override-arch arm64 through P asks neither upstream for amd64" multi_arm64

start_plain
stored_arm64_only() {
    local up s repo c d base=http://$X/v2
    for up in dist ours; do
        s=$(side "$up")
        repo=$up/library/multi
        [ "$(digest_at "$X" "$repo" v1)" = "$(img "$s" multi-v1 .digest)" ] || fail "$repo:v1 (the index) not stored"
        c=$(status_at HEAD "$base/$repo/manifests/$(img "$s" multi-v1 .arm64.digest)")
        [ "$c" = 200 ] || fail "$repo: arm64 manifest $c"
        for d in $(img "$s" multi-v1 '.arm64.config, .arm64.layers[]'); do
            c=$(status_at HEAD "$base/$repo/blobs/$d")
            [ "$c" = 200 ] || fail "$repo: arm64 blob $d $c"
        done
        c=$(status_at HEAD "$base/$repo/manifests/$(img "$s" multi-v1 .amd64.digest)")
        [ "$c" = 404 ] || fail "$repo: amd64 manifest stored ($c)"
        for d in $(img "$s" multi-v1 '.amd64.config, .amd64.layers[]'); do
            c=$(status_at HEAD "$base/$repo/blobs/$d")
            [ "$c" = 404 ] || fail "$repo: amd64 blob $d stored ($c)"
        done
    done
    echo "P's storage: the index, the arm64 manifest and blobs (200); nothing of amd64 (404)"
}
check "multi-arch: P stored the index and arm64 only (plain serve on P's data: 200 / 404)" stored_arm64_only
stop_plain

# ---------------------------------------------------------------- 3. upstream killed mid-blob
FLAKY_LAYER=$(img d flaky-v1 '.layers[0]')
killed_mid_blob() {
    fails skopeo copy --quiet --src-tls-verify=false "docker://$P/flaky/library/crash:v1" "dir:$WORK/crash" ||
        fail "the pull succeeded although the upstream died mid-blob"
    grep -q "/blobs/$FLAKY_LAYER 200 [0-9]* DIED" "$WORK/relay-requests.log" ||
        fail "the relay did not die in the blob: $(tail -3 "$WORK/relay-requests.log")"
    echo "relay: $(grep -c . "$WORK/relay-requests.log") requests, died after $(awk '/DIED/ {print $4}' "$WORK/relay-requests.log") bytes of the blob; the pull failed"
}
check "upstream killed mid-blob: the pull through P fails" killed_mid_blob
stop "$RELAY_PID" # dead already, unless the check failed
RELAY_PID=

start_plain
nothing_partial() {
    local c
    c=$(status_at HEAD "http://$X/v2/flaky/library/crash/blobs/$FLAKY_LAYER")
    [ "$c" = 404 ] || fail "HEAD of the cut blob in flaky/library/crash: $c"
    c=$(status_at GET "http://$X/v2/flaky/library/crash/blobs/$FLAKY_LAYER")
    [ "$c" = 404 ] || fail "GET of the cut blob in flaky/library/crash: $c"
    echo "the cut blob is not stored (404); spool: $(du -sk "$WORK/p-spool" 2>/dev/null | cut -f1) KiB"
}
check "upstream killed mid-blob: nothing partial stored (plain serve on P's data: 404)" nothing_partial
stop_plain

start_relay # not dying this time
after_restart() {
    local digest
    digest=$(pull_dir flaky/library/crash:v1 "$WORK/crash")
    [ "$digest" = "$(img d flaky-v1 .digest)" ] || fail "pulled $digest"
    [ "$(sha_of "$WORK/crash/${FLAKY_LAYER#sha256:}")" = "$FLAKY_LAYER" ] || fail "the big layer differs"
    echo "pulled and verified: $digest, the ${BIG_MIB} MiB layer hashes to its digest"
}
check "upstream back: the next pull through P succeeds and verifies" after_restart

# ---------------------------------------------------------------- 4. concurrent pulls
BIG_LAYER=$(img d big-v1 '.layers[0]')
concurrent() {
    local i n dir=$WORK/concurrent t0 codes dm
    mkdir -p "$dir"
    dm=$(d_mark)
    t0=$(now)
    for ((i = 1; i <= 20; i++)); do
        curl -s --max-time 300 -o "$dir/$i" -w '%{http_code}\n' \
            "http://$P/v2/dist/library/big/blobs/$BIG_LAYER" >"$dir/$i.code" &
    done
    wait
    echo "20 downloads in $(since "$t0") s"
    codes=$(cat "$dir"/*.code | sort | uniq -c | tr -s ' \n' ' ')
    for ((i = 1; i <= 20; i++)); do
        [ "$(cat "$dir/$i.code")" = 200 ] || fail "download $i: status $(cat "$dir/$i.code") (all: $codes)"
        [ "$(sha_of "$dir/$i")" = "$BIG_LAYER" ] || fail "download $i hashes to $(sha_of "$dir/$i")"
    done
    # D logs a request once it is answered: give the one fetch a moment.
    gets() { d_since "$dm" | grep -F "\"GET /v2/library/big/blobs/$BIG_LAYER " || true; }
    for ((i = 0; i < 50; i++)); do
        gets | grep -q . && break
        sleep 0.1
    done
    sleep 0.5
    n=$(gets | grep -vc '" 401 ' || true)
    echo "D answered $n GET(s) of the blob with content (and $(gets | grep -c '" 401 ' || true) with 401 first)"
    [ "$n" = 1 ] || fail "$n upstream GETs of the blob, expected exactly one: $(gets)"
    rm -rf "$dir"
}
check "20 concurrent GETs of an uncached ${BIG_MIB} MiB blob: one upstream GET, 20 good bodies" concurrent

big_from_ours() {
    [ "$(pull_dir ours/library/big:v1 "$WORK/big-ours")" = "$(img u big-v1 .digest)" ] || fail "digest"
    echo "ours/library/big:v1 pulled through P with tokens"
}
check "the ${BIG_MIB} MiB image from U (token auth) through P" big_from_ours

# ---------------------------------------------------------------- 5. upstream down
stop "$D_PID"
D_PID=
echo "# [${SECONDS}s] D stopped"
sleep 1.5 # past dist's ttl=1s
upstream_down() {
    local t0 took code
    t0=$(now)
    [ "$(pull_dir dist/library/app:v1 "$WORK/down")" = "$(img d app-v1 .digest)" ] || fail "digest"
    echo "D down: the cached dist/library/app:v1 pulled in $(since "$t0") s"
    t0=$(now)
    fails skopeo copy --quiet --src-tls-verify=false "docker://$P/dist/library/app:v2" "dir:$WORK/down2" ||
        fail "an uncached tag pulled with D down"
    took=$(since "$t0")
    code=$(status_at GET "http://$P/v2/dist/library/app/manifests/v2")
    echo "the uncached dist/library/app:v2 failed after $took s; GET of its manifest: $code"
    awk -v t="$took" 'BEGIN { exit !(t < 30) }' || fail "the failure took $took s"
    [ "$code" != 200 ] || fail "the manifest answered 200"
}
check "upstream down (ttl 1s): the cached tag still pulls; an uncached one fails in seconds" upstream_down
start_d

# ---------------------------------------------------------------- 6. figures
figures() {
    local t0 direct first cached
    t0=$(now)
    run skopeo copy --quiet --src-tls-verify=false --src-creds "dist:$D_PASS" \
        "docker://$D/library/bench:v1" "dir:$WORK/bench-direct"
    direct=$(since "$t0")
    t0=$(now)
    [ "$(pull_dir dist/library/bench:v1 "$WORK/bench-p1")" = "$(img d bench-v1 .digest)" ] || fail "digest"
    first=$(since "$t0")
    t0=$(now)
    [ "$(pull_dir dist/library/bench:v1 "$WORK/bench-p2")" = "$(img d bench-v1 .digest)" ] || fail "digest"
    cached=$(since "$t0")
    echo "direct ${direct}s, through P uncached ${first}s, cached ${cached}s"
    {
        echo "figure: ${BIG_MIB} MiB image, skopeo copy to dir: direct from D ${direct}s," \
            "first (uncached) through P ${first}s, cached through P ${cached}s"
        awk -v d="$direct" -v f="$first" -v c="$cached" 'BEGIN {
            printf "figure: uncached through P / direct = %.2f; cached through P / direct = %.2f\n", f / d, c / d }'
    } >"$WORK/figures.txt"
    rm -rf "$WORK"/bench-*
}
check "figures: a ${BIG_MIB} MiB pull direct from D, through P uncached and cached" figures
[ -f "$WORK/figures.txt" ] && cat "$WORK/figures.txt"
if curl -sf --max-time 10 "http://127.0.0.1:$PM_PORT/metrics" >"$WORK/p-metrics.txt" 2>/dev/null; then
    grep '^registry_proxy_' "$WORK/p-metrics.txt" | head -n 20 | sed 's/^/figure: P metric /'
fi
stop "$P_PID"
P_PID=
stop "$RELAY_PID"
RELAY_PID=

# ---------------------------------------------------------------- 7. mirroring
MIRRORS=(--mirror "prod=http://$D,credentials=file:$WORK/dist.creds,deletes"
    --mirror "prod=http://$U,credentials=file:$WORK/ours.creds,remote=copy/prod")
start_s() {
    "$SERVE" --addr "127.0.0.1:$S_PORT" --data-dir "$WORK/s" "${MIRRORS[@]}" \
        --metrics-addr "127.0.0.1:$SM_PORT" --no-access-log >>"$WORK/s.log" 2>&1 &
    S_PID=$!
    wait_port "$S_PORT" "serve S (mirror source)" "$WORK/s.log"
}
ACKED=$WORK/acked.jsonl
start_s
echo "# [${SECONDS}s] mirror source S at 127.0.0.1:$S_PORT: prod/ -> D, prod/ -> U as copy/prod/"
"$PYTHON" "${OCI[@]}" burst --target "127.0.0.1:$S_PORT" --prefix prod/app --threads 2 \
    --seconds 6 --acked "$ACKED" >"$WORK/burst1.out" 2>&1 &
PUSHER_PID=$!
sleep 2.5
kill -9 "$S_PID"
wait "$S_PID" 2>/dev/null
echo "# [${SECONDS}s] S killed (SIGKILL) in the middle of the burst; restarting it"
sleep 1
start_s
wait "$PUSHER_PID"
BURST1_RC=$?
PUSHER_PID=
"$PYTHON" "${OCI[@]}" burst --target "127.0.0.1:$S_PORT" --prefix prod/app --threads 2 \
    --seconds 2 --acked "$ACKED" >"$WORK/burst2.out" 2>&1
BURST2_RC=$?

burst_went_on() {
    echo "before and across the kill: $(tail -1 "$WORK/burst1.out"); after: $(tail -1 "$WORK/burst2.out")"
    [ "$BURST1_RC" = 0 ] && [ "$BURST2_RC" = 0 ] || { cat "$WORK/burst1.out" "$WORK/burst2.out"; fail "a burst failed"; }
}
check "mirror: pushes to S around a kill -9 (acknowledged ones recorded)" burst_went_on

mirrored() {
    "$PYTHON" "${OCI[@]}" mirrored --acked "$ACKED" --wait 120 \
        --remote "http://$D" "$WORK/dist.creds" prod prod \
        --remote "http://$U" "$WORK/ours.creds" prod copy/prod
}
check "mirror: every acknowledged image reaches D (same name) and U (copy/prod/...), same digests" mirrored

mirrored_pull() {
    local line repo tag digest dir=$WORK/mirrored
    for line in 1 $(($(wc -l <"$ACKED") / 2)) "$(wc -l <"$ACKED")"; do
        read -r repo tag digest < <(sed -n "${line}p" "$ACKED" | jq -r '"\(.repo) \(.tag) \(.digest)"')
        rm -rf "$dir"
        run skopeo copy --quiet --src-tls-verify=false --src-creds "dist:$D_PASS" \
            "docker://$D/$repo:$tag" "dir:$dir"
        [ "$(sha_of "$dir/manifest.json")" = "$digest" ] || fail "D: $repo:$tag"
        rm -rf "$dir"
        run skopeo copy --quiet --src-tls-verify=false --src-creds "ci:$U_PASS" \
            "docker://$U/copy/$repo:$tag" "dir:$dir"
        [ "$(sha_of "$dir/manifest.json")" = "$digest" ] || fail "U: copy/$repo:$tag"
        echo "skopeo pulled $repo:$tag from D and copy/$repo:$tag from U"
    done
}
check "mirror: skopeo pulls mirrored images from D and U (blobs verified)" mirrored_pull

# gone_from_d PATH: polls D (60 s at most) until GET PATH answers 404; prints the seconds.
gone_from_d() {
    local i code
    for ((i = 0; i < 120; i++)); do
        code=$(status_at GET "http://$D$1" -u "dist:$D_PASS")
        [ "$code" = 404 ] && { echo $((i / 2)); return 0; }
        sleep 0.5
    done
    echo "D still answers $code for $1 after 60 s" >&2
    return 1
}
acked_image() { sed -n "$1p" "$ACKED" | jq -r '"\(.repo) \(.tag) \(.digest)"'; } # acked_image LINE

mirrored_manifest_delete() {
    local repo tag digest code took
    read -r repo tag digest < <(acked_image 1)
    code=$(status_at DELETE "http://127.0.0.1:$S_PORT/v2/$repo/manifests/$digest")
    [ "$code" = 202 ] || fail "DELETE of $repo@$digest in S: $code"
    took=$(gone_from_d "/v2/$repo/manifests/$digest") || fail "the manifest was not deleted in D"
    code=$(status_at GET "http://$D/v2/$repo/manifests/$tag" -u "dist:$D_PASS")
    [ "$code" = 404 ] || fail "$repo:$tag answers $code in D"
    code=$(status_at GET "http://$U/v2/copy/$repo/manifests/$tag" -u "ci:$U_PASS")
    [ "$code" = 200 ] || fail "copy/$repo:$tag answers $code in U (no deletes there)"
    echo "deleted $repo@$digest in S: gone from D (and its tag) after ~$took s, kept in U"
}
check "mirror: a manifest deleted by digest in S is deleted in D (deletes), kept in U (no deletes)" \
    mirrored_manifest_delete

mirrored_tag_delete() {
    local repo tag digest code took
    read -r repo tag digest < <(acked_image 2)
    code=$(status_at DELETE "http://127.0.0.1:$S_PORT/v2/$repo/manifests/$tag")
    [ "$code" = 202 ] || fail "DELETE of the tag $repo:$tag in S: $code"
    took=$(gone_from_d "/v2/$repo/manifests/$tag") || fail "the tag was not deleted in D"
    code=$(status_at GET "http://$U/v2/copy/$repo/manifests/$tag" -u "ci:$U_PASS")
    [ "$code" = 200 ] || fail "copy/$repo:$tag answers $code in U (no deletes there)"
    echo "deleted the tag $repo:$tag in S: gone from D after ~$took s, kept in U"
}
check "mirror: a tag deleted in S is deleted in D (deletes), kept in U (no deletes)" mirrored_tag_delete

# Deletes come before later pushes in the outbox: a delete the remote refuses must not
# hold up what follows.
mirrored_after_deletes() {
    local acked=$WORK/acked-after.jsonl
    "$PYTHON" "${OCI[@]}" burst --target "127.0.0.1:$S_PORT" --prefix prod/after --threads 1 \
        --seconds 0.5 --acked "$acked"
    "$PYTHON" "${OCI[@]}" mirrored --acked "$acked" --wait 60 \
        --remote "http://$D" "$WORK/dist.creds" prod prod \
        --remote "http://$U" "$WORK/ours.creds" prod copy/prod
}
check "mirror: images pushed after the deletes still reach D and U" mirrored_after_deletes
if curl -sf --max-time 10 "http://127.0.0.1:$SM_PORT/metrics" >"$WORK/s-metrics.txt" 2>/dev/null; then
    grep '^registry_mirror_' "$WORK/s-metrics.txt" | head -n 20 | sed 's/^/figure: S metric /'
fi
stop "$S_PID"
S_PID=

# ---------------------------------------------------------------- 8. serve sync
SYNC=$WORK/sync
echo "# [${SECONDS}s] serve sync"
sync_in() {
    local out=$WORK/sync-in.out t y port pid
    "$SERVE" sync --data-dir "$SYNC" --from "http://$D/library/app" --to local/app \
        --from-credentials "file:$WORK/dist.creds" >"$out" 2>&1 || { tail -20 "$out"; fail "sync failed"; }
    tail -1 "$out" | grep -q '^sync:' || fail "last line: $(tail -1 "$out")"
    echo "first: $(tail -1 "$out")"
    "$SERVE" sync --data-dir "$SYNC" --from "http://$D/library/app" --to local/app \
        --from-credentials "file:$WORK/dist.creds" >"$out" 2>&1 # again: nothing new
    tail -1 "$out" | grep -q '^sync:' || fail "last line: $(tail -1 "$out")"
    echo "again: $(tail -1 "$out")"
    run "$SERVE" sync --data-dir "$SYNC" --from "http://$D/library/multi" --to local/multi \
        --from-credentials "file:$WORK/dist.creds"
    port=$(free_port)
    "$SERVE" --addr "127.0.0.1:$port" --data-dir "$SYNC" --no-access-log >"$WORK/sync-serve.log" 2>&1 &
    pid=$!
    echo "$pid" >>"$EXTRA_PIDS"
    wait_port "$port" "serve on the synced store" "$WORK/sync-serve.log"
    for t in v1 v2; do
        rm -rf "$WORK/synced"
        run skopeo copy --quiet --src-tls-verify=false "docker://127.0.0.1:$port/local/app:$t" "dir:$WORK/synced"
        y=$(sha_of "$WORK/synced/manifest.json")
        [ "$y" = "$(d_digest library/app "$t")" ] || fail "local/app:$t is $y, D has $(d_digest library/app "$t")"
    done
    rm -rf "$WORK/synced"
    run skopeo copy --quiet --src-tls-verify=false --all "docker://127.0.0.1:$port/local/multi:v1" "dir:$WORK/synced"
    [ "$(sha_of "$WORK/synced/manifest.json")" = "$(img d multi-v1 .digest)" ] || fail "local/multi:v1 differs"
    stop "$pid"
    echo "served and pulled: local/app:v1, local/app:v2, local/multi:v1 (both platforms)"
}
check "serve sync: D -> a stopped fs store (tags of library/app, the index), served, pulled" sync_in

sync_out() {
    local out=$WORK/sync-out.out t
    "$SERVE" sync --data-dir "$SYNC" --from local/app --to "http://$U/synced/app" \
        --to-credentials "file:$WORK/ours.creds" >"$out" 2>&1 || { tail -20 "$out"; fail "sync failed"; }
    tail -1 "$out" | grep -q '^sync:' || fail "last line: $(tail -1 "$out")"
    tail -1 "$out"
    for t in v1 v2; do
        [ "$(u_digest synced/app "$t")" = "$(d_digest library/app "$t")" ] || fail "synced/app:$t in U differs"
    done
    rm -rf "$WORK/synced"
    run skopeo copy --quiet --src-tls-verify=false --src-creds "ci:$U_PASS" \
        "docker://$U/synced/app:v1" "dir:$WORK/synced"
}
check "serve sync: the fs store -> U (token auth), same digests, pulled by skopeo" sync_out

echo "figure: the whole run took ${SECONDS}s"
finish_checks
