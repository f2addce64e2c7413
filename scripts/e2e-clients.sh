#!/usr/bin/env bash
# End-to-end tests with real OCI clients against a registry on 127.0.0.1:
# skopeo (with images built by umoci), oras (Python), buildah, podman, and raw HTTP with curl.
#
#   scripts/e2e-clients.sh                            # our `serve` example (release build)
#   REGISTRY_CMD=distribution scripts/e2e-clients.sh  # CNCF Distribution 2.8.2, for comparison
#
# Environment:
#   REGISTRY_CMD      ours (default) | distribution
#   SERVE             our serve binary; unset: built here first (cargo build --release
#                     --example serve, with cargo's progress)
#   REGISTRY_STORAGE  storage of our serve example: fs (default) | memory
#   E2E_ONLY          space-separated scenario names to run (skopeo oras buildah podman raw auth
#                     reads);
#                     all by default
#   E2E_KEEP=1        keep the temp dir (logs, layouts) for inspection
#   E2E_COUNTS        a file to write `PASSED FAILED` into at the end (scripts/test.sh
#                     reads it); not written when the registry could not be started
#
# Each check prints `ok - NAME` or `not ok - NAME` followed by the failing command's
# output; the last line is `N passed, M failed`, and the exit status is non-zero if any
# check failed (2 if the registry under test could not be started). A summary per
# scenario and the names of the failed checks come before the last line. Distribution
# has no referrers API (and no tag pagination), so those checks fail against it; that
# is expected.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

REGISTRY_CMD=${REGISTRY_CMD:-ours}
REGISTRY_STORAGE=${REGISTRY_STORAGE:-fs}
E2E_ONLY=${E2E_ONLY:-skopeo oras buildah podman raw auth reads connections}

scripts/install-test-deps.sh apt python || { echo "installing test dependencies failed" >&2; exit 2; }
PYTHON=$ROOT/.test-deps/venv/bin/python

WORK=$(mktemp -d "${TMPDIR:-/tmp}/e2e-clients.XXXXXX")
PIDS=()
# Servers started inside a check run in its subshell, where PIDS does not reach back:
# they write their PIDs here, and cleanup stops them too.
EXTRA_PIDS=$WORK/extra.pids
cleanup() {
    local pid i
    [ -f "$EXTRA_PIDS" ] && mapfile -t -O "${#PIDS[@]}" PIDS <"$EXTRA_PIDS"
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

# ---------------------------------------------------------------- the registry under test
PORT=$(free_port)
HOST=127.0.0.1:$PORT
BASE=http://$HOST
LOG=$WORK/registry.log

case "$REGISTRY_CMD" in
ours)
    if [ -z "${SERVE:-}" ]; then
        echo "building the serve example (release): cargo build --release --example serve"
        cargo build --release --locked -p registry-examples --example serve || { echo "build failed" >&2; exit 2; }
        SERVE=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/serve
    fi
    [ -x "$SERVE" ] || { echo "no serve binary at $SERVE" >&2; exit 2; }
    mkdir -p "$WORK/data"
    "$SERVE" --addr "$HOST" --storage "$REGISTRY_STORAGE" \
        --data-dir "$WORK/data" >"$LOG" 2>&1 &
    PIDS+=($!)
    ;;
distribution)
    mkdir -p "$WORK/data"
    cat >"$WORK/distribution.yml" <<EOF
version: 0.1
log:
  accesslog:
    disabled: true
  level: error
storage:
  filesystem:
    rootdirectory: $WORK/data
  delete:
    enabled: true
http:
  addr: $HOST
EOF
    docker-registry serve "$WORK/distribution.yml" >"$LOG" 2>&1 &
    PIDS+=($!)
    ;;
*)
    echo "REGISTRY_CMD must be ours or distribution, not '$REGISTRY_CMD'" >&2
    exit 2
    ;;
esac

ready=0
for ((i = 0; i < 150; i++)); do # up to 30 s
    if ! kill -0 "${PIDS[0]}" 2>/dev/null; then
        echo "the registry exited early:" >&2
        cat "$LOG" >&2
        exit 2
    fi
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$BASE/v2/")" = 200 ]; then
        ready=1
        break
    fi
    sleep 0.2
done
if [ "$ready" != 1 ]; then
    echo "the registry did not answer GET /v2/ within 30 s:" >&2
    cat "$LOG" >&2
    exit 2
fi
echo "registry under test: $REGISTRY_CMD at $BASE (pid ${PIDS[0]})"

# ---------------------------------------------------------------- check harness
PASSED=0
FAILED=0
FAILED_NAMES=()

# check NAME COMMAND...: runs COMMAND in a subshell with `set -e`; reports ok / not ok.
check() {
    local name=$1 out=$WORK/check.out rc
    shift
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
        sed 's/^/    # /' "$out" | head -n 80
    fi
}

# run COMMAND...: runs a client command; on failure prints the command and its output.
run() {
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    if [ "$rc" != 0 ]; then
        {
            echo "command failed (exit $rc): $*"
            echo "$out" | tail -n 40
        } >&2
        return 1
    fi
    [ -z "$out" ] || printf '%s\n' "$out"
}

fail() {
    echo "FAILED: $*" >&2
    return 1
}

# req METHOD URL [curl args...]: one HTTP request; sets STATUS, RH (headers file),
# RB (body file) and LAST (a description of the request).
RH=$WORK/resp.headers
RB=$WORK/resp.body
STATUS=
LAST=
req() {
    local method=$1 url=$2
    shift 2
    case "$url" in
    http://* | https://*) ;;
    *) url=$BASE$url ;;
    esac
    LAST="$method $url $*"
    # HEAD: curl --head reads no body (and would write the headers to -o).
    local how=(-X "$method") out=$RB rc=0
    [ "$method" = HEAD ] && how=(--head) && out=/dev/null && : >"$RB"
    STATUS=$(curl -sS --max-time 60 -o "$out" -D "$RH" -w '%{http_code}' "${how[@]}" "$@" "$url") || rc=$?
    [ "$rc" = 0 ] || { show; fail "curl exited with $rc (a malformed response?)"; }
}

# show: the last request and its response, for failure messages.
show() {
    exec 3>&1 1>&2
    echo "request: $LAST"
    echo "response: $STATUS"
    tr -d '\r' <"$RH" | sed 's/^/  < /'
    if [ -s "$RB" ]; then
        head -c 1500 "$RB" | LC_ALL=C tr -c '[:print:]\n' '.'
        echo
    fi
    exec 1>&3 3>&-
}

expect() { # expect STATUS
    [ "$STATUS" = "$1" ] || { show; fail "expected status $1, got $STATUS"; }
}

header() { # header NAME: the value of the last such response header ("" if none)
    tr -d '\r' <"$RH" | awk -v n="$(echo "$1" | tr 'A-Z' 'a-z')" '
        { i = index($0, ":"); if (i && tolower(substr($0, 1, i - 1)) == n) { v = substr($0, i + 1); sub(/^[ \t]+/, "", v); last = v } }
        END { print last }'
}

expect_header() { # expect_header NAME VALUE
    local got
    got=$(header "$1")
    [ "$got" = "$2" ] || { show; fail "expected header $1: '$2', got '$got'"; }
}

# location: the Location header of the last response, made absolute.
location() {
    local loc
    loc=$(header Location)
    [ -n "$loc" ] || { show; fail "no Location header"; }
    case "$loc" in
    http://* | https://*) echo "$loc" ;;
    /*) echo "$BASE$loc" ;;
    *) fail "relative Location without a leading slash: $loc" ;;
    esac
}

with_query() { # with_query URL KEY=VALUE: appends a query parameter
    case "$1" in
    *\?*) echo "$1&$2" ;;
    *) echo "$1?$2" ;;
    esac
}

sha() { echo "sha256:$(sha256sum "$1" | cut -d' ' -f1)"; }

error_code() { jq -r '.errors[0].code // empty' "$RB" 2>/dev/null; }

SKOPEO_POLICY=$WORK/policy.json
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$SKOPEO_POLICY"
export REGISTRY_AUTH_FILE=$WORK/auth.json
echo '{"auths":{}}' >"$REGISTRY_AUTH_FILE"

# ================================================================ skopeo (+ umoci)
SK=$WORK/skopeo
LAYOUT=$SK/layout
SREPO=e2e/skopeo/img
SCOPY=e2e/skopeo/copy

# Index of a tag in an OCI layout: the manifest digest.
layout_digest() { # layout_digest LAYOUT TAG
    jq -r --arg t "$2" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$1/index.json"
}
layout_blob() { # layout_blob LAYOUT DIGEST: path of a blob file
    echo "$1/blobs/${2%%:*}/${2#*:}"
}

skopeo_build() {
    mkdir -p "$SK/files"
    head -c 200000 /dev/urandom >"$SK/files/base.bin"
    head -c 300000 /dev/urandom >"$SK/files/one.bin"
    head -c 150000 /dev/urandom >"$SK/files/two.bin"
    mkdir -p "$SK/files/dir"
    for i in 1 2 3; do head -c 5000 /dev/urandom >"$SK/files/dir/f$i"; done
    run umoci init --layout "$LAYOUT"
    run umoci new --image "$LAYOUT:base"
    run umoci insert --image "$LAYOUT:base" "$SK/files/base.bin" /base.bin
    # v1 and v2 both start from base: they share its layer.
    run umoci insert --image "$LAYOUT:base" --tag v1 "$SK/files/one.bin" /one.bin
    run umoci insert --image "$LAYOUT:v1" "$SK/files/dir" /dir
    run umoci insert --image "$LAYOUT:base" --tag v2 "$SK/files/two.bin" /two.bin
    local m1 m2 l1 l2
    m1=$(layout_blob "$LAYOUT" "$(layout_digest "$LAYOUT" v1)")
    m2=$(layout_blob "$LAYOUT" "$(layout_digest "$LAYOUT" v2)")
    l1=$(jq -r '.layers[0].digest' "$m1")
    l2=$(jq -r '.layers[0].digest' "$m2")
    [ "$(jq '.layers | length' "$m1")" = 3 ] || fail "v1 should have 3 layers: $(cat "$m1")"
    [ "$(jq '.layers | length' "$m2")" = 2 ] || fail "v2 should have 2 layers: $(cat "$m2")"
    [ "$l1" = "$l2" ] || fail "v1 and v2 do not share their base layer ($l1, $l2)"
}

skopeo_push() {
    local tag
    for tag in v1 v2; do
        run skopeo copy --quiet --policy "$SKOPEO_POLICY" --dest-tls-verify=false \
            "oci:$LAYOUT:$tag" "docker://$HOST/$SREPO:$tag"
    done
}

skopeo_inspect() {
    local tag out want_layers got_layers m
    for tag in v1 v2; do
        out=$(run skopeo inspect --tls-verify=false "docker://$HOST/$SREPO:$tag")
        m=$(layout_blob "$LAYOUT" "$(layout_digest "$LAYOUT" "$tag")")
        [ "$(jq -r .Digest <<<"$out")" = "$(layout_digest "$LAYOUT" "$tag")" ] ||
            fail "$tag: inspect digest $(jq -r .Digest <<<"$out") != pushed $(layout_digest "$LAYOUT" "$tag")"
        want_layers=$(jq -c '[.layers[].digest]' "$m")
        got_layers=$(jq -c '.Layers' <<<"$out")
        [ "$want_layers" = "$got_layers" ] || fail "$tag: layers $got_layers != $want_layers"
        # The raw manifest is served byte for byte.
        run skopeo inspect --raw --tls-verify=false "docker://$HOST/$SREPO:$tag" >"$SK/raw-$tag.json"
        # `run` adds a newline when printing; compare the JSON values instead of bytes.
        [ "$(jq -cS . "$SK/raw-$tag.json")" = "$(jq -cS . "$m")" ] || fail "$tag: raw manifest differs"
    done
}

skopeo_manifest_bytes() {
    local tag d
    for tag in v1 v2; do
        d=$(layout_digest "$LAYOUT" "$tag")
        req GET "/v2/$SREPO/manifests/$tag" -H "Accept: application/vnd.oci.image.manifest.v1+json"
        expect 200
        [ "$(sha "$RB")" = "$d" ] || { show; fail "$tag: body digest $(sha "$RB") != $d"; }
        expect_header Docker-Content-Digest "$d"
        expect_header Content-Type application/vnd.oci.image.manifest.v1+json
    done
}

skopeo_list_tags() {
    local out
    out=$(run skopeo list-tags --tls-verify=false "docker://$HOST/$SREPO")
    [ "$(jq -c '.Tags | sort' <<<"$out")" = '["v1","v2"]' ] || fail "tags: $out"
    [ "$(jq -r '.Repository' <<<"$out")" = "$HOST/$SREPO" ] || fail "repository: $out"
}

skopeo_copy_back() {
    local tag f name n=0
    for tag in v1 v2; do
        run skopeo copy --quiet --policy "$SKOPEO_POLICY" --src-tls-verify=false \
            "docker://$HOST/$SREPO:$tag" "oci:$SK/back:$tag"
        [ "$(layout_digest "$SK/back" "$tag")" = "$(layout_digest "$LAYOUT" "$tag")" ] ||
            fail "$tag: copied-back manifest digest $(layout_digest "$SK/back" "$tag") != $(layout_digest "$LAYOUT" "$tag")"
    done
    for f in "$SK"/back/blobs/sha256/*; do
        name=$(basename "$f")
        [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$name" ] || fail "blob $name has digest $(sha256sum "$f")"
        n=$((n + 1))
    done
    # 2 manifests + 2 configs + 4 distinct layers.
    [ "$n" = 8 ] || fail "expected 8 blobs in the copied-back layout, found $n: $(ls "$SK/back/blobs/sha256")"
    echo "$n blobs verified"
}

skopeo_registry_copy() {
    local out m d
    out=$(run skopeo copy --debug --policy "$SKOPEO_POLICY" --src-tls-verify=false --dest-tls-verify=false \
        "docker://$HOST/$SREPO:v1" "docker://$HOST/$SCOPY:v1")
    # skopeo reuses the source's blobs by cross-repository mount.
    grep -q "mount=.*from=\|from=.*mount=" <<<"$out" || {
        echo "$out" | tail -n 30
        fail "skopeo did not try a cross-repository mount"
    }
    # Every blob of the image is now in the target repository.
    m=$(layout_blob "$LAYOUT" "$(layout_digest "$LAYOUT" v1)")
    for d in $(jq -r '.config.digest, .layers[].digest' "$m"); do
        req HEAD "/v2/$SCOPY/blobs/$d"
        expect 200
        expect_header Docker-Content-Digest "$d"
    done
    req GET "/v2/$SCOPY/manifests/v1" -H "Accept: application/vnd.oci.image.manifest.v1+json"
    expect 200
    [ "$(sha "$RB")" = "$(layout_digest "$LAYOUT" v1)" ] || fail "copied manifest digest differs"
}

skopeo_mount_raw() {
    # The same mount, by hand: POST ?mount=&from= for a blob of the source is 201.
    local m d
    m=$(layout_blob "$LAYOUT" "$(layout_digest "$LAYOUT" v2)")
    d=$(jq -r '.layers[-1].digest' "$m")
    req HEAD "/v2/e2e/skopeo/mounted/blobs/$d"
    expect 404
    req POST "/v2/e2e/skopeo/mounted/blobs/uploads/?mount=$d&from=$SREPO" -H "Content-Length: 0"
    expect 201
    [ -n "$(header Location)" ] || { show; fail "no Location on the mount's 201"; }
    expect_header Docker-Content-Digest "$d"
    req HEAD "/v2/e2e/skopeo/mounted/blobs/$d"
    expect 200
}

skopeo_delete() {
    local d
    d=$(layout_digest "$LAYOUT" v1)
    run skopeo delete --tls-verify=false "docker://$HOST/$SCOPY:v1"
    req GET "/v2/$SCOPY/manifests/v1"
    expect 404
    [ "$(error_code)" = MANIFEST_UNKNOWN ] || { show; fail "expected MANIFEST_UNKNOWN"; }
    req GET "/v2/$SCOPY/manifests/$d"
    expect 404
    req HEAD "/v2/$SCOPY/manifests/$d"
    expect 404
    # The source repository is untouched.
    req HEAD "/v2/$SREPO/manifests/v1" -H "Accept: application/vnd.oci.image.manifest.v1+json"
    expect 200
    expect_header Docker-Content-Digest "$d"
}

scenario_skopeo() {
    check "skopeo: umoci builds two images sharing a base layer" skopeo_build
    check "skopeo: copy oci layout -> registry (v1, v2)" skopeo_push
    check "skopeo: inspect digest and layers" skopeo_inspect
    check "skopeo: manifests served byte for byte with headers" skopeo_manifest_bytes
    check "skopeo: list-tags" skopeo_list_tags
    check "skopeo: copy back to an oci layout, every blob digest verified" skopeo_copy_back
    check "skopeo: registry-to-registry copy mounts across repositories" skopeo_registry_copy
    check "http: cross-repository mount POST ?mount=&from= is 201" skopeo_mount_raw
    check "skopeo: delete, then the manifest is 404" skopeo_delete
}

# ================================================================ oras (Python)
OR=$WORK/oras
OREPO=e2e/oras/artifact
ORAS_OUT=$OR/result.json

oras_push_pull() {
    mkdir -p "$OR"
    run "$PYTHON" scripts/e2e/oras_e2e.py "$HOST" "$OREPO" "$OR/work" >"$OR/out"
    tail -n 1 "$OR/out" >"$ORAS_OUT"
    jq -e '.artifact and (.referrers | length == 2)' "$ORAS_OUT" >/dev/null || fail "no result: $(cat "$OR/out")"
    cat "$OR/out"
}

oras_manifest() {
    local a
    a=$(jq -r .artifact "$ORAS_OUT")
    req GET "/v2/$OREPO/manifests/$a" -H "Accept: application/vnd.oci.image.manifest.v1+json"
    expect 200
    [ "$(sha "$RB")" = "$a" ] || { show; fail "digest of served bytes differs"; }
    [ "$(jq -r .artifactType "$RB")" = application/vnd.e2e.artifact.v1 ] || { show; fail "artifactType"; }
    [ "$(jq -r .config.mediaType "$RB")" = application/vnd.oci.empty.v1+json ] || { show; fail "config"; }
    [ "$(jq '.layers | length' "$RB")" = 2 ] || { show; fail "layers"; }
}

oras_oci_subject() {
    local a
    a=$(jq -r .artifact "$ORAS_OUT")
    jq -e '.referrers | all(.status == 201)' "$ORAS_OUT" >/dev/null || fail "referrer PUT status: $(cat "$ORAS_OUT")"
    jq -e --arg a "$a" '.referrers | all(.oci_subject == $a)' "$ORAS_OUT" >/dev/null ||
        fail "OCI-Subject header on the referrer pushes: $(jq -c '[.referrers[].oci_subject]' "$ORAS_OUT"), want $a"
}

oras_referrers() {
    local a want got
    a=$(jq -r .artifact "$ORAS_OUT")
    req GET "/v2/$OREPO/referrers/$a"
    expect 200
    jq -e . "$RB" >/dev/null 2>&1 || { show; fail "not JSON"; }
    [ "$(jq -r .mediaType "$RB")" = application/vnd.oci.image.index.v1+json ] || { show; fail "not an image index"; }
    [ "$(jq -r .schemaVersion "$RB")" = 2 ] || { show; fail "schemaVersion"; }
    want=$(jq -c '[.referrers[] | {digest, artifactType: .artifact_type}] | sort_by(.digest)' "$ORAS_OUT")
    got=$(jq -c '[.manifests[] | {digest, artifactType}] | sort_by(.digest)' "$RB")
    [ "$want" = "$got" ] || { show; fail "referrers $got, want $want"; }
    jq -e '.manifests | all(.mediaType == "application/vnd.oci.image.manifest.v1+json" and (.size > 0)
        and (.annotations["org.example.kind"] != null))' "$RB" >/dev/null ||
        { show; fail "descriptors lack mediaType, size or the manifest annotations"; }
    # The descriptor sizes are those of the manifests.
    local d size
    jq -r '.manifests[] | "\(.digest) \(.size)"' "$RB" >"$OR/sizes"
    while read -r d size; do
        req HEAD "/v2/$OREPO/manifests/$d" -H "Accept: application/vnd.oci.image.manifest.v1+json"
        expect 200
        expect_header Content-Length "$size"
    done <"$OR/sizes"
}

oras_referrers_filtered() {
    local a t want
    a=$(jq -r .artifact "$ORAS_OUT")
    for t in application/vnd.e2e.signature.v1 application/vnd.e2e.sbom.v1; do
        want=$(jq -r --arg t "$t" '.referrers[] | select(.artifact_type == $t) | .digest' "$ORAS_OUT")
        req GET "/v2/$OREPO/referrers/$a?artifactType=$t"
        expect 200
        expect_header OCI-Filters-Applied artifactType
        [ "$(jq -c '[.manifests[].digest]' "$RB")" = "[\"$want\"]" ] || { show; fail "filter $t: want only $want"; }
    done
    req GET "/v2/$OREPO/referrers/$a?artifactType=application/vnd.e2e.none"
    expect 200
    expect_header OCI-Filters-Applied artifactType
    [ "$(jq -c .manifests "$RB")" = "[]" ] || { show; fail "filter with no match should give no manifests"; }
}

oras_referrers_none() {
    # A digest with no referrers (even an unknown one) is an empty index, never 404.
    req GET "/v2/$OREPO/referrers/sha256:$(printf 'nothing' | sha256sum | cut -d' ' -f1)"
    expect 200
    [ "$(jq -c .manifests "$RB")" = "[]" ] || { show; fail "expected an empty index"; }
    req GET "/v2/$OREPO/referrers/sha256:XYZ"
    expect 400
}

scenario_oras() {
    check "oras: push (chunked) an artifact with artifactType, pull back, attach referrers by digest" oras_push_pull
    check "oras: artifact manifest served with artifactType and empty config" oras_manifest
    check "oras: referrer pushes answer 201 with OCI-Subject" oras_oci_subject
    check "referrers: GET /v2/<name>/referrers/<digest> lists both referrers" oras_referrers
    check "referrers: ?artifactType= filters, with OCI-Filters-Applied" oras_referrers_filtered
    check "referrers: none is an empty index; a bad digest is 400" oras_referrers_none
}

# ================================================================ buildah
BU=$WORK/buildah
BREPO=e2e/buildah/img
buildah_() { buildah --storage-driver vfs --root "$BU/root" --runroot "$BU/runroot" "$@"; }

buildah_build_push() {
    local ctr
    mkdir -p "$BU"
    echo "hello from buildah $RANDOM" >"$BU/hello.txt"
    head -c 100000 /dev/urandom >"$BU/data.bin"
    ctr=$(run buildah_ from scratch)
    run buildah_ copy "$ctr" "$BU/hello.txt" /hello.txt >/dev/null
    run buildah_ copy "$ctr" "$BU/data.bin" /data.bin >/dev/null
    run buildah_ config --cmd /hello --label e2e=yes "$ctr"
    run buildah_ commit --quiet "$ctr" e2e-buildah:v1 >/dev/null
    run buildah_ rm "$ctr" >/dev/null
    run buildah_ push --quiet --tls-verify=false --digestfile "$BU/digest" \
        e2e-buildah:v1 "docker://$HOST/$BREPO:v1"
    req GET "/v2/$BREPO/manifests/v1" \
        -H "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    expect 200
    [ "$(sha "$RB")" = "$(cat "$BU/digest")" ] || { show; fail "digest $(sha "$RB") != buildah's $(cat "$BU/digest")"; }
}

buildah_pull() {
    local ctr dir id
    run buildah_ rmi --all --force >/dev/null
    id=$(run buildah_ pull --quiet --tls-verify=false "docker://$HOST/$BREPO:v1")
    [ -n "$id" ] || fail "no image id"
    ctr=$(run buildah_ from "$id")
    dir=$(run buildah_ mount "$ctr")
    cmp "$BU/hello.txt" "$dir/hello.txt" || fail "hello.txt differs"
    cmp "$BU/data.bin" "$dir/data.bin" || fail "data.bin differs"
    [ "$(run buildah_ inspect --format '{{index .OCIv1.Config.Labels "e2e"}}' "$ctr")" = yes ] || fail "label lost"
    run buildah_ umount "$ctr" >/dev/null
    run buildah_ rm "$ctr" >/dev/null
}

scenario_buildah() {
    check "buildah: build from scratch and push" buildah_build_push
    check "buildah: pull back, files identical" buildah_pull
    buildah_ rm --all >/dev/null 2>&1
    buildah_ rmi --all --force >/dev/null 2>&1
}

# ================================================================ podman
# Push and pull only: running containers does not work on these machines.
PM=$WORK/podman
PREPO=e2e/podman/img
podman_() { podman --storage-driver vfs --root "$PM/root" --runroot "$PM/runroot" "$@"; }

podman_push() {
    mkdir -p "$PM/src"
    echo "hello from podman $RANDOM" >"$PM/src/hello.txt"
    head -c 200000 /dev/urandom >"$PM/src/data.bin"
    tar -C "$PM/src" -cf "$PM/layer.tar" hello.txt data.bin
    run podman_ import --quiet "$PM/layer.tar" e2e-podman:v1 >/dev/null
    run podman_ push --quiet --tls-verify=false --digestfile "$PM/digest" \
        e2e-podman:v1 "docker://$HOST/$PREPO:v1"
    req GET "/v2/$PREPO/manifests/v1" \
        -H "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    expect 200
    [ "$(sha "$RB")" = "$(cat "$PM/digest")" ] || { show; fail "digest $(sha "$RB") != podman's $(cat "$PM/digest")"; }
}

podman_pull() {
    local dir
    run podman_ rmi --all --force >/dev/null
    run podman_ pull --quiet --tls-verify=false "$HOST/$PREPO:v1" >/dev/null
    [ "$(run podman_ image inspect --format '{{.Digest}}' "$HOST/$PREPO:v1")" = "$(cat "$PM/digest")" ] ||
        fail "pulled image has another digest"
    dir=$(run podman_ image mount "$HOST/$PREPO:v1")
    cmp "$PM/src/hello.txt" "$dir/hello.txt" || fail "hello.txt differs"
    cmp "$PM/src/data.bin" "$dir/data.bin" || fail "data.bin differs"
    run podman_ image umount "$HOST/$PREPO:v1" >/dev/null
}

podman_search() {
    run podman_ search --tls-verify=false --list-tags "$HOST/$PREPO" | grep -q "$HOST/$PREPO[[:space:]]*v1" ||
        fail "search --list-tags does not show v1"
    run podman_ search --tls-verify=false "$HOST/e2e/podman" | grep -q "$HOST/$PREPO" ||
        fail "search (catalog) does not show $PREPO"
}

scenario_podman() {
    check "podman: push an imported image" podman_push
    check "podman: pull back, digest and files identical" podman_pull
    check "podman: search lists the repository (catalog) and its tags" podman_search
    podman_ rmi --all --force >/dev/null 2>&1
}

# ================================================================ raw HTTP (curl)
RAW=$WORK/raw
RREPO=e2e/raw/upload

raw_single_post() {
    mkdir -p "$RAW"
    head -c 12345 /dev/urandom >"$RAW/single"
    local d
    d=$(sha "$RAW/single")
    req POST "/v2/$RREPO/blobs/uploads/?digest=$d" \
        -H "Content-Type: application/octet-stream" --data-binary "@$RAW/single"
    expect 201
    [ -n "$(header Location)" ] || { show; fail "no Location"; }
    expect_header Docker-Content-Digest "$d"
    req GET "/v2/$RREPO/blobs/$d"
    expect 200
    cmp "$RB" "$RAW/single" || fail "GET returned different bytes"
    expect_header Docker-Content-Digest "$d"
    expect_header Content-Length 12345
    req HEAD "/v2/$RREPO/blobs/$d"
    expect 200
    expect_header Content-Length 12345
    expect_header Docker-Content-Digest "$d"
}

raw_single_post_bad_digest() {
    head -c 1000 /dev/urandom >"$RAW/single-bad"
    local wrong
    wrong=sha256:$(printf 'other' | sha256sum | cut -d' ' -f1)
    req POST "/v2/$RREPO/blobs/uploads/?digest=$wrong" \
        -H "Content-Type: application/octet-stream" --data-binary "@$RAW/single-bad"
    expect 400
    [ "$(error_code)" = DIGEST_INVALID ] || { show; fail "expected DIGEST_INVALID"; }
    req HEAD "/v2/$RREPO/blobs/$wrong"
    expect 404
    req HEAD "/v2/$RREPO/blobs/$(sha "$RAW/single-bad")"
    expect 404
}

# Starts an upload session; sets LOC.
start_upload() {
    req POST "/v2/$RREPO/blobs/uploads/" -H "Content-Length: 0"
    expect 202
    LOC=$(location)
}

# patch_chunk FILE START END: PATCH bytes START..END (inclusive) of FILE to LOC.
patch_chunk() {
    dd if="$1" of="$RAW/chunk" bs=1 skip="$2" count=$(($3 - $2 + 1)) status=none
    req PATCH "$LOC" -H "Content-Type: application/octet-stream" \
        -H "Content-Range: $2-$3" --data-binary "@$RAW/chunk"
}

raw_chunked() {
    head -c 100000 /dev/urandom >"$RAW/chunked"
    local d
    d=$(sha "$RAW/chunked")
    start_upload
    patch_chunk "$RAW/chunked" 0 39999
    expect 202
    expect_header Range 0-39999
    LOC=$(location)
    patch_chunk "$RAW/chunked" 40000 99999
    expect 202
    expect_header Range 0-99999
    LOC=$(location)
    req PUT "$(with_query "$LOC" "digest=$d")" -H "Content-Length: 0"
    expect 201
    expect_header Docker-Content-Digest "$d"
    [ -n "$(header Location)" ] || { show; fail "no Location"; }
    req GET "/v2/$RREPO/blobs/$d"
    expect 200
    cmp "$RB" "$RAW/chunked" || fail "GET returned different bytes"
}

raw_chunked_last_chunk_in_put() {
    head -c 5000 /dev/urandom >"$RAW/lastput"
    local d
    d=$(sha "$RAW/lastput")
    start_upload
    patch_chunk "$RAW/lastput" 0 2999
    expect 202
    LOC=$(location)
    dd if="$RAW/lastput" of="$RAW/chunk" bs=1 skip=3000 status=none
    req PUT "$(with_query "$LOC" "digest=$d")" -H "Content-Type: application/octet-stream" \
        -H "Content-Range: 3000-4999" --data-binary "@$RAW/chunk"
    expect 201
    req GET "/v2/$RREPO/blobs/$d"
    expect 200
    cmp "$RB" "$RAW/lastput" || fail "GET returned different bytes"
}

raw_out_of_order() {
    head -c 3000 /dev/urandom >"$RAW/ooo"
    start_upload
    patch_chunk "$RAW/ooo" 0 999
    expect 202
    LOC=$(location)
    patch_chunk "$RAW/ooo" 2000 2999 # skips 1000..1999
    expect 416
    # The session is still usable and kept exactly the accepted bytes.
    req GET "$LOC"
    expect 204
    expect_header Range 0-999
}

raw_repeated_chunk() {
    head -c 3000 /dev/urandom >"$RAW/rep"
    local d
    d=$(sha "$RAW/rep")
    start_upload
    patch_chunk "$RAW/rep" 0 999
    expect 202
    LOC=$(location)
    patch_chunk "$RAW/rep" 1000 1999
    expect 202
    LOC=$(location)
    patch_chunk "$RAW/rep" 1000 1999 # the same chunk again
    expect 416
    patch_chunk "$RAW/rep" 0 999 # the first chunk again
    expect 416
    req GET "$LOC"
    expect 204
    expect_header Range 0-1999
    # Nothing was duplicated: finishing the upload gives the original bytes.
    patch_chunk "$RAW/rep" 2000 2999
    expect 202
    LOC=$(location)
    req PUT "$(with_query "$LOC" "digest=$d")" -H "Content-Length: 0"
    expect 201
    req GET "/v2/$RREPO/blobs/$d"
    expect 200
    cmp "$RB" "$RAW/rep" || fail "repeated chunk corrupted the blob"
}

raw_wrong_digest() {
    head -c 2000 /dev/urandom >"$RAW/wrong"
    local wrong
    wrong=sha256:$(printf 'not these bytes' | sha256sum | cut -d' ' -f1)
    start_upload
    patch_chunk "$RAW/wrong" 0 1999
    expect 202
    LOC=$(location)
    req PUT "$(with_query "$LOC" "digest=$wrong")" -H "Content-Length: 0"
    expect 400
    [ "$(error_code)" = DIGEST_INVALID ] || { show; fail "expected DIGEST_INVALID"; }
    req HEAD "/v2/$RREPO/blobs/$wrong"
    expect 404
}

raw_status_and_cancel() {
    head -c 1500 /dev/urandom >"$RAW/status"
    start_upload
    req GET "$LOC"
    expect 204
    [ -n "$(header Location)" ] || { show; fail "no Location on status"; }
    patch_chunk "$RAW/status" 0 1499
    expect 202
    LOC=$(location)
    req GET "$LOC"
    expect 204
    expect_header Range 0-1499
    [ -n "$(header Location)" ] || { show; fail "no Location on status"; }
    req DELETE "$LOC"
    expect 204
    req GET "$LOC"
    expect 404
    [ "$(error_code)" = BLOB_UPLOAD_UNKNOWN ] || { show; fail "expected BLOB_UPLOAD_UNKNOWN"; }
    patch_chunk "$RAW/status" 0 1499
    expect 404
}

raw_range_get() {
    head -c 10000 /dev/urandom >"$RAW/range"
    local d
    d=$(sha "$RAW/range")
    req POST "/v2/$RREPO/blobs/uploads/" -H "Content-Length: 0"
    expect 202
    req PUT "$(with_query "$(location)" "digest=$d")" \
        -H "Content-Type: application/octet-stream" --data-binary "@$RAW/range"
    expect 201
    req GET "/v2/$RREPO/blobs/$d" -H "Range: bytes=100-199"
    expect 206
    expect_header Content-Range "bytes 100-199/10000"
    expect_header Content-Length 100
    cmp "$RB" <(dd if="$RAW/range" bs=1 skip=100 count=100 status=none) || fail "bytes 100-199 differ"
    req GET "/v2/$RREPO/blobs/$d" -H "Range: bytes=9900-"
    expect 206
    cmp "$RB" <(tail -c 100 "$RAW/range") || fail "open range differs"
    req GET "/v2/$RREPO/blobs/$d" -H "Range: bytes=-50"
    expect 206
    expect_header Content-Range "bytes 9950-9999/10000"
    cmp "$RB" <(tail -c 50 "$RAW/range") || fail "suffix range differs"
    req GET "/v2/$RREPO/blobs/$d" -H "Range: bytes=20000-20010"
    expect 416
}

raw_tag_pagination() {
    local repo=e2e/raw/tags cd md t page next
    printf '{}' >"$RAW/cfg"
    cd=$(sha "$RAW/cfg")
    req POST "/v2/$repo/blobs/uploads/?digest=$cd" \
        -H "Content-Type: application/octet-stream" --data-binary "@$RAW/cfg"
    if [ "$STATUS" != 201 ]; then # a registry without single-POST uploads
        req POST "/v2/$repo/blobs/uploads/" -H "Content-Length: 0"
        expect 202
        req PUT "$(with_query "$(location)" "digest=$cd")" --data-binary "@$RAW/cfg" \
            -H "Content-Type: application/octet-stream"
        expect 201
    fi
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":2},"layers":[]}' "$cd" >"$RAW/manifest"
    md=$(sha "$RAW/manifest")
    for t in e a d c b; do
        req PUT "/v2/$repo/manifests/$t" -H "Content-Type: application/vnd.oci.image.manifest.v1+json" \
            --data-binary "@$RAW/manifest"
        expect 201
        expect_header Docker-Content-Digest "$md"
    done
    req GET "/v2/$repo/tags/list"
    expect 200
    [ "$(jq -c . "$RB")" = "{\"name\":\"$repo\",\"tags\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}" ] || { show; fail "full list"; }
    [ -z "$(header Link)" ] || { show; fail "Link on a complete list"; }
    next="/v2/$repo/tags/list?n=2"
    for page in '["a","b"]' '["c","d"]' '["e"]'; do # bounded: three pages
        req GET "$next"
        expect 200
        [ "$(jq -c .tags "$RB")" = "$page" ] || { show; fail "page: want $page"; }
        next=$(header Link | sed -n 's/^<\([^>]*\)>; *rel="\{0,1\}next"\{0,1\}$/\1/p')
        if [ "$page" = '["e"]' ]; then
            [ -z "$(header Link)" ] || { show; fail "Link on the last page"; }
        else
            [ -n "$next" ] || { show; fail "no Link: <...>; rel=\"next\" header"; }
        fi
    done
    req GET "/v2/$repo/tags/list?n=2&last=b"
    expect 200
    [ "$(jq -c .tags "$RB")" = '["c","d"]' ] || { show; fail "last=b is exclusive"; }
    req GET "/v2/$repo/tags/list?n=0"
    expect 200
    [ "$(jq -c '.tags // []' "$RB")" = '[]' ] || { show; fail "n=0 gives an empty list"; }
    [ -z "$(header Link)" ] || { show; fail "Link for n=0"; }
}

scenario_raw() {
    check "http: single-request POST ?digest= upload is 201, GET returns the bytes" raw_single_post
    check "http: single-request POST with a wrong digest is 400 DIGEST_INVALID" raw_single_post_bad_digest
    check "http: chunked upload POST, PATCH 0-N, PATCH, PUT ?digest= is 201" raw_chunked
    check "http: chunked upload with the last chunk in the PUT" raw_chunked_last_chunk_in_put
    check "http: out-of-order chunk is 416, session keeps its bytes" raw_out_of_order
    check "http: repeated already-accepted chunk is 416" raw_repeated_chunk
    check "http: wrong final digest is 400 DIGEST_INVALID" raw_wrong_digest
    check "http: upload status 204 with Range; DELETE 204, then 404" raw_status_and_cancel
    check "http: Range GET of a blob is 206 (closed, open, suffix), unsatisfiable 416" raw_range_get
    check "http: tag list sorted, paginated with n/last and Link" raw_tag_pagination
}

# ================================================================ auth (our serve flags)
# Two more serve processes (memory storage): `--auth-user ci:... --anonymous-read`, and
# `--auth-user` alone. Only for our registry: the flags are ours.
AU=$WORK/auth
AUTH_PASS=e2e-$RANDOM-secret
# serve reads passwords from the environment (or a file), never from its command line.
export AUTH_PASS OTHER_PASS=x$AUTH_PASS

# start_auth_serve NAME ARGS...: starts serve with ARGS on a free port; sets AHOST.
start_auth_serve() {
    local name=$1 port i
    shift
    port=$(free_port)
    AHOST=127.0.0.1:$port
    "$SERVE" --addr "$AHOST" --storage memory "$@" \
        >"$AU/$name.log" 2>&1 &
    echo $! >>"$EXTRA_PIDS"
    for ((i = 0; i < 100; i++)); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$AHOST/v2/")" = 401 ] && return 0
        sleep 0.1
    done
    cat "$AU/$name.log"
    fail "serve $* did not answer 401 on /v2/"
}

auth_layout() {
    mkdir -p "$AU"
    head -c 50000 /dev/urandom >"$AU/layer.bin"
    run umoci init --layout "$AU/layout"
    run umoci new --image "$AU/layout:v1"
    run umoci insert --image "$AU/layout:v1" "$AU/layer.bin" /layer.bin
}

auth_anonymous_read() {
    auth_layout
    start_auth_serve open-read --auth-user ci:env:AUTH_PASS --auth-user other:env:OTHER_PASS --anonymous-read
    echo "$AHOST" >"$AU/host"
    # The challenge points at the built-in token endpoint.
    req GET "http://$AHOST/v2/"
    expect 401
    header WWW-Authenticate | grep -q "^Bearer realm=\"http://$AHOST/token\",service=\"registry\"" ||
        { show; fail "no Bearer challenge"; }
    # Anonymous push refused, wrong password refused, nothing stored.
    ! run skopeo copy --quiet --dest-tls-verify=false "oci:$AU/layout:v1" "docker://$AHOST/ci/img:v1" ||
        fail "anonymous push accepted"
    ! run skopeo copy --quiet --dest-tls-verify=false --dest-creds "ci:wrong" \
        "oci:$AU/layout:v1" "docker://$AHOST/ci/img:v1" || fail "wrong password accepted"
    req GET "http://$AHOST/v2/ci/img/tags/list" -u "ci:$AUTH_PASS"
    expect 404
    # With credentials: push; anonymous clients pull it back (anonymous token).
    run skopeo copy --quiet --dest-tls-verify=false --dest-creds "ci:$AUTH_PASS" \
        "oci:$AU/layout:v1" "docker://$AHOST/ci/img:v1"
    run skopeo copy --quiet --src-tls-verify=false "docker://$AHOST/ci/img:v1" "oci:$AU/back:v1"
    run umoci unpack --rootless --image "$AU/back:v1" "$AU/unpacked" >/dev/null
    cmp "$AU/layer.bin" "$AU/unpacked/rootfs/layer.bin" || fail "pulled layer differs"
    # Anonymous deletes are refused even with reads open.
    req DELETE "http://$AHOST/v2/ci/img/manifests/v1"
    expect 401
}

auth_token_flow_curl() {
    local host token
    host=$(cat "$AU/host")
    # The token endpoint grants what the policy allows and no more.
    req GET "http://$host/token?service=registry&scope=repository:ci/img:pull,push" -u "ci:$AUTH_PASS"
    expect 200
    token=$(jq -r .token "$RB")
    [ "$(jq -r .access_token "$RB")" = "$token" ] || fail "token and access_token differ"
    req GET "http://$host/v2/ci/img/manifests/v1" -H "Authorization: Bearer $token" \
        -H "Accept: application/vnd.oci.image.manifest.v1+json"
    expect 200
    req GET "http://$host/v2/ci/img/manifests/v1" -H "Authorization: Bearer ${token}x"
    expect 401
    req GET "http://$host/token?service=registry&scope=repository:ci/img:pull" -u "ci:nope"
    expect 401
    # An anonymous token asking for push carries pull only: the push is refused.
    req GET "http://$host/token?service=registry&scope=repository:ci/img:pull,push"
    expect 200
    token=$(jq -r .token "$RB")
    req POST "http://$host/v2/ci/img/blobs/uploads/" -H "Authorization: Bearer $token"
    expect 401
    [ "$(error_code)" = UNAUTHORIZED ] || { show; fail "expected UNAUTHORIZED"; }
    # The log never contains the password.
    ! grep -q "$AUTH_PASS" "$AU/open-read.log" || fail "the password appears in the log"
}

auth_private() {
    start_auth_serve private --auth-user ci:env:AUTH_PASS
    run skopeo copy --quiet --dest-tls-verify=false --dest-creds "ci:$AUTH_PASS" \
        "oci:$AU/layout:v1" "docker://$AHOST/team/img:v1"
    run skopeo inspect --tls-verify=false --creds "ci:$AUTH_PASS" "docker://$AHOST/team/img:v1" >/dev/null
    # Without --anonymous-read, anonymous pulls are refused.
    ! run skopeo inspect --tls-verify=false "docker://$AHOST/team/img:v1" || fail "anonymous pull accepted"
    req GET "http://$AHOST/v2/_catalog"
    expect 401
    req GET "http://$AHOST/v2/_catalog" -u "ci:$AUTH_PASS"
    expect 200
    [ "$(jq -c .repositories "$RB")" = '["team/img"]' ] || { show; fail "catalog"; }
}

auth_podman_login() {
    start_auth_serve podman --auth-user ci:env:AUTH_PASS
    mkdir -p "$PM/src"
    echo "private $RANDOM" >"$PM/src/private.txt"
    tar -C "$PM/src" -cf "$PM/private.tar" private.txt
    run podman_ import --quiet "$PM/private.tar" e2e-private:v1 >/dev/null
    ! run podman_ push --quiet --tls-verify=false e2e-private:v1 "docker://$AHOST/team/private:v1" ||
        fail "push without login accepted"
    ! echo wrong | run podman_ login --tls-verify=false -u ci --password-stdin "$AHOST" ||
        fail "login with a wrong password accepted"
    echo "$AUTH_PASS" | run podman_ login --tls-verify=false -u ci --password-stdin "$AHOST" >/dev/null
    run podman_ push --quiet --tls-verify=false e2e-private:v1 "docker://$AHOST/team/private:v1"
    run podman_ rmi --all --force >/dev/null
    run podman_ pull --quiet --tls-verify=false "$AHOST/team/private:v1" >/dev/null
    run podman_ logout "$AHOST" >/dev/null
    run podman_ rmi --all --force >/dev/null
    ! run podman_ pull --quiet --tls-verify=false "$AHOST/team/private:v1" ||
        fail "pull after logout accepted"
}

scenario_auth() {
    if [ "$REGISTRY_CMD" != ours ]; then
        echo "# auth: skipped for $REGISTRY_CMD (the flags are our serve example's)"
        return
    fi
    check "auth: --auth-user --anonymous-read: skopeo pushes with creds, anonymous pulls, anonymous writes refused" auth_anonymous_read
    check "auth: token endpoint cuts scopes to the policy; bad tokens and passwords are 401" auth_token_flow_curl
    check "auth: --auth-user alone: anonymous pulls and catalog refused, users pull and list" auth_private
    check "auth: podman login, push and pull; refused before login and after logout" auth_podman_login
}

# ================================================================ verified reads (our serve flags)
# Two more serve processes on fs data dirs of their own, one with --no-verify-reads. A
# blob file altered on disk behind the registry's back (same size, 16 bytes changed)
# must fail the transfer by default and be served as it is with the flag.
VR=$WORK/reads

# serve_altered_blob NAME ARGS...: starts serve (fs, fresh data dir) with ARGS, pushes
# a blob, alters its file; sets VHOST, VD (its digest) and leaves the altered bytes in
# $VR/NAME/altered.
serve_altered_blob() {
    local name=$1 port i
    shift
    mkdir -p "$VR/$name"
    port=$(free_port)
    VHOST=127.0.0.1:$port
    "$SERVE" --addr "$VHOST" --storage fs \
        --data-dir "$VR/$name/data" "$@" >"$VR/$name.log" 2>&1 &
    echo $! >>"$EXTRA_PIDS"
    for ((i = 0; i < 100; i++)); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$VHOST/v2/")" = 200 ] && break
        sleep 0.1
    done
    head -c 300000 /dev/urandom >"$VR/$name/blob"
    VD=$(sha "$VR/$name/blob")
    req POST "http://$VHOST/v2/e2e/reads/blobs/uploads/?digest=$VD" \
        -H "Content-Type: application/octet-stream" --data-binary "@$VR/$name/blob"
    expect 201
    local hex=${VD#sha256:}
    local file=$VR/$name/data/blobs/sha256/${hex:0:2}/$hex
    [ -f "$file" ] || fail "no blob file at $file"
    printf 'altered on disk!' | dd of="$file" bs=1 seek=200000 conv=notrunc status=none
    cp "$file" "$VR/$name/altered"
    ! cmp -s "$VR/$name/altered" "$VR/$name/blob" || fail "the blob file did not change"
}

reads_verified_by_default() {
    serve_altered_blob checked
    local rc=0
    curl -sS --max-time 60 -o "$VR/checked/got" "http://$VHOST/v2/e2e/reads/blobs/$VD" || rc=$?
    [ "$rc" != 0 ] || fail "the altered blob was served as a complete transfer"
    ! cmp -s "$VR/checked/got" "$VR/checked/altered" || fail "the altered bytes were served whole"
}

reads_not_verified_with_flag() {
    serve_altered_blob unchecked --no-verify-reads
    req GET "http://$VHOST/v2/e2e/reads/blobs/$VD"
    expect 200
    cmp "$RB" "$VR/unchecked/altered" || fail "--no-verify-reads did not serve the file as it is"
}

scenario_reads() {
    if [ "$REGISTRY_CMD" != ours ]; then
        echo "# reads: skipped for $REGISTRY_CMD (the flag is our serve example's)"
        return
    fi
    check "reads: a blob file altered on disk fails the transfer (verified reads, the default)" reads_verified_by_default
    check "reads: --no-verify-reads serves an altered blob file as it is" reads_not_verified_with_flag
}

# ---------------------------------------------------------------- connections
# A serve process limited to 128 file descriptors, flooded with 150 idle sockets and
# 20 half-sent requests: a new client is still answered (the oldest connections are
# closed to make room) and the half-sent requests are cut off by the header timeout.
conn_flood() {
    local port pid
    port=$(free_port)
    (ulimit -n 128 && exec "$SERVE" --addr "127.0.0.1:$port" --storage memory \
        --max-connections 64 --header-read-timeout 1s) >"$WORK/conn.log" 2>&1 &
    pid=$!
    echo "$pid" >>"$EXTRA_PIDS"
    for ((i = 0; i < 100; i++)); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/v2/")" = 200 ] && break
        sleep 0.1
    done
    timeout 60 python3 "$ROOT/scripts/e2e/idle_flood.py" "127.0.0.1:$port" 150 20 10 ||
        fail "flooded serve: $(tail -5 "$WORK/conn.log")"
    kill -0 "$pid" || fail "serve died under the flood"
    grep -q "connection limit reached" "$WORK/conn.log" || fail "no eviction was logged"
}

scenario_connections() {
    if [ "$REGISTRY_CMD" != ours ]; then
        echo "# connections: skipped for $REGISTRY_CMD (the limits are our serve example's)"
        return
    fi
    check "connections: 150 idle and 20 slowloris sockets do not lock out a new client (128 fds)" conn_flood
}

# ================================================================ run
for s in $E2E_ONLY; do
    case "$s" in
    skopeo | oras | buildah | podman | raw | auth | reads | connections) ;;
    *) echo "unknown scenario '$s' (skopeo oras buildah podman raw auth reads connections)" >&2; exit 2 ;;
    esac
done
SCENARIO_LINES=()
for s in $E2E_ONLY; do
    p0=$PASSED f0=$FAILED t0=$SECONDS
    echo "# scenario $s"
    "scenario_$s"
    SCENARIO_LINES+=("$(printf '%-8s %3d passed, %d failed (%d s)' "$s" $((PASSED - p0)) $((FAILED - f0)) $((SECONDS - t0)))")
done

if kill -0 "${PIDS[0]}" 2>/dev/null; then
    PASSED=$((PASSED + 1))
    echo "ok - the registry is still running after the suite"
else
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("the registry is still running after the suite")
    echo "not ok - the registry is still running after the suite"
    sed 's/^/    # /' "$LOG" | tail -n 40
fi
if ((FAILED)) && [ -s "$LOG" ]; then
    echo "# registry log (last 20 lines):"
    tail -n 20 "$LOG" | sed 's/^/#   /'
fi
echo "# per scenario:"
printf '#   %s\n' "${SCENARIO_LINES[@]}"
if ((${#FAILED_NAMES[@]})); then
    echo "# failed checks:"
    printf '#   not ok - %s\n' "${FAILED_NAMES[@]}"
fi
[ -z "${E2E_COUNTS:-}" ] || echo "$PASSED $FAILED" >"$E2E_COUNTS"
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
