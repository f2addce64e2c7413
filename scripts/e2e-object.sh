#!/usr/bin/env bash
# Two serve processes on one bucket, with a real client: for S3 (moto) and Azure Blob
# (Azurite), both emulators on 127.0.0.1, started and stopped here (by PID); and for
# S3 with the metadata in PostgreSQL (a cluster created in the work dir).
#
#   scripts/e2e-object.sh            # every backend: s3, az, s3+pg
#   E2E_BACKENDS=s3 scripts/e2e-object.sh
#
#   SERVE        the serve binary; unset: built here first (cargo build --release
#                --example serve, with cargo's progress)
#   E2E_COUNTS   a file to write `PASSED FAILED` into at the end (scripts/test.sh reads it)
#
# Per backend: skopeo pushes an image (umoci-built, three layers) through process A and
# copies it back through process B, comparing every blob; tags pushed through B are
# listed through A; a chunked upload is started on A, continued on B and finished on A;
# a delete through A is seen by B; on s3 and az, a process R with --redirect-blobs answers
# blob GETs with 307 to presigned bucket URLs, which skopeo follows and curl checks (the
# bytes, and no redirect for HEAD, Range or a repository without the blob). Then three
# processes with authentication: a token issued by one is accepted by another reading
# the same --token-key-file and refused by one with its own key. The last line is `N passed, M failed`.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# s3, az: metadata in the bucket's log; s3+pg: metadata in PostgreSQL, blobs on S3.
E2E_BACKENDS=${E2E_BACKENDS:-s3 az s3+pg}

scripts/install-test-deps.sh apt python azurite || { echo "installing test dependencies failed" >&2; exit 2; }
DEPS=$ROOT/.test-deps
PYTHON=$DEPS/venv/bin/python

WORK=$(mktemp -d "${TMPDIR:-/tmp}/e2e-object.XXXXXX")
PIDS=()
cleanup() {
    local pid
    # Azurite ignores SIGTERM; every process here is ours and holds nothing to flush.
    for pid in "${PIDS[@]}"; do
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

# ---------------------------------------------------------------- emulators
MOTO_PORT=$(free_port)
"$DEPS/venv/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
AZ_PORT=$(free_port)
"$DEPS/azurite/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$AZ_PORT" \
    --inMemoryPersistence --skipApiVersionCheck --silent >"$WORK/azurite.log" 2>&1 &
PIDS+=($!)
wait_port "$MOTO_PORT" moto "$WORK/moto.log"
wait_port "$AZ_PORT" azurite "$WORK/azurite.log"

# PostgreSQL (Debian's package): a cluster in the work dir.
init_postgres "$WORK"
start_postgres
PIDS+=("$PG_PID")
create_database e2e

AZ_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
curl -sf -X PUT "http://127.0.0.1:$MOTO_PORT/e2e" >/dev/null || { echo "creating the S3 bucket failed" >&2; exit 2; }
# An Azure container, with one request signed with the emulator's public development key.
"$PYTHON" - "$AZ_PORT" "$AZ_KEY" <<'EOF' || { echo "creating the Azure container failed" >&2; exit 2; }
import base64, hashlib, hmac, sys, urllib.request
from email.utils import formatdate
port, key = sys.argv[1], sys.argv[2]
date, version, account = formatdate(usegmt=True), "2021-08-06", "devstoreaccount1"
to_sign = ("PUT\n" + "\n" * 11 + f"x-ms-date:{date}\nx-ms-version:{version}\n"
           f"/{account}/{account}/e2e\nrestype:container")
sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest())
req = urllib.request.Request(f"http://127.0.0.1:{port}/{account}/e2e?restype=container", method="PUT",
    headers={"x-ms-date": date, "x-ms-version": version,
             "Authorization": f"SharedKey {account}:{sig.decode()}", "Content-Length": "0"})
assert urllib.request.urlopen(req).status == 201
EOF

# ---------------------------------------------------------------- checks (check: lib.sh)

POLICY=$WORK/policy.json
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$POLICY"
export REGISTRY_AUTH_FILE=$WORK/auth.json
echo '{"auths":{}}' >"$REGISTRY_AUTH_FILE"

# An image with three layers, built once.
IMG=$WORK/image
mkdir -p "$WORK/files"
head -c 3000000 /dev/urandom >"$WORK/files/a.bin"
head -c 700000 /dev/urandom >"$WORK/files/b.bin"
echo "small file" >"$WORK/files/c.txt"
umoci init --layout "$IMG" >/dev/null
umoci new --image "$IMG:v1" >/dev/null
for f in a.bin b.bin c.txt; do
    umoci insert --image "$IMG:v1" "$WORK/files/$f" "/$f" >/dev/null
done
# Each insert leaves the previous manifest and config behind: only v1's blobs stay, so
# that the layout's blobs are exactly what a copy of v1 holds.
umoci gc --layout "$IMG"

# start_serve NAME STORAGE [FLAGS...]: starts a serve process; sets ${NAME}_URL.
start_serve() {
    local port name=$1 storage=$2
    shift 2
    port=$(free_port)
    "$SERVE" --addr "127.0.0.1:$port" --storage "$storage" "${SERVE_FLAGS[@]}" "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port" "serve $name" "$WORK/$name.log"
    printf -v "${name}_URL" '%s' "127.0.0.1:$port"
}

layout_blobs() { # layout_blobs LAYOUT: every blob digest of the layout, sorted
    (cd "$1/blobs/sha256" && ls | sort)
}

push_a_pull_b() {
    skopeo copy --quiet --policy "$POLICY" --dest-tls-verify=false \
        "oci:$IMG:v1" "docker://$A_URL/e2e/app:v1"
    rm -rf "$WORK/back"
    skopeo copy --quiet --policy "$POLICY" --src-tls-verify=false \
        "docker://$B_URL/e2e/app:v1" "oci:$WORK/back:v1"
    local want got
    want=$(umoci stat --image "$IMG:v1" --json | jq -r '.history | length')
    [ "$want" -ge 3 ] || fail "the image should have three layers"
    diff <(layout_blobs "$IMG") <(layout_blobs "$WORK/back") || fail "blobs differ"
    got=$(skopeo inspect --raw --tls-verify=false "docker://$B_URL/e2e/app:v1" | sha256sum | cut -d' ' -f1)
    want=$(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"]=="v1") | .digest' \
        "$IMG/index.json")
    [ "sha256:$got" = "$want" ] || fail "manifest through B is $got, pushed $want"
}

tags_b_seen_by_a() {
    skopeo copy --quiet --policy "$POLICY" --src-tls-verify=false --dest-tls-verify=false \
        "docker://$B_URL/e2e/app:v1" "docker://$B_URL/e2e/app:v2"
    local tags
    tags=$(skopeo list-tags --tls-verify=false "docker://$A_URL/e2e/app" | jq -c '.Tags')
    [ "$tags" = '["v1","v2"]' ] || fail "tags through A: $tags"
}

chunked_across_processes() {
    local data=$WORK/chunked.bin loc digest
    head -c 2500000 /dev/urandom >"$data"
    digest="sha256:$(sha256sum "$data" | cut -d' ' -f1)"
    head -c 1000000 "$data" >"$WORK/part1"
    tail -c +1000001 "$data" >"$WORK/part2"
    loc=$(curl -sSf -o /dev/null -D - -X POST "http://$A_URL/v2/e2e/chunked/blobs/uploads/" |
        tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
    [ -n "$loc" ] || fail "no upload location from A"
    # The first chunk through B, the second through A, finished through B.
    loc=$(curl -sSf -o /dev/null -D - -X PATCH -H 'Content-Type: application/octet-stream' \
        -H 'Content-Range: 0-999999' --data-binary @"$WORK/part1" "http://$B_URL$loc" |
        tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
    loc=$(curl -sSf -o /dev/null -D - -X PATCH -H 'Content-Type: application/octet-stream' \
        -H 'Content-Range: 1000000-2499999' --data-binary @"$WORK/part2" "http://$A_URL$loc" |
        tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
    case "$loc" in *\?*) loc="$loc&digest=$digest" ;; *) loc="$loc?digest=$digest" ;; esac
    [ "$(curl -sS -o /dev/null -w '%{http_code}' -X PUT "http://$B_URL$loc")" = 201 ] ||
        fail "finishing the upload through B"
    [ "$(curl -sSf "http://$A_URL/v2/e2e/chunked/blobs/$digest" | sha256sum | cut -d' ' -f1)" = "${digest#sha256:}" ] ||
        fail "the blob read through A differs"
}

delete_a_seen_by_b() {
    local code
    # The tag only (v1 points at the same manifest, and R pulls it next): skopeo delete
    # would delete the manifest by digest.
    code=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "http://$A_URL/v2/e2e/app/manifests/v2")
    [ "$code" = 202 ] || fail "the tag delete through A answered $code"
    code=$(curl -s -o /dev/null -w '%{http_code}' \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$B_URL/v2/e2e/app/manifests/v2")
    [ "$code" = 404 ] || fail "B still serves a manifest deleted through A ($code)"
}

redirected_pull() { # R serves the bucket with --redirect-blobs
    rm -rf "$WORK/redirected"
    # skopeo follows the 307s to the bucket for every blob.
    skopeo copy --quiet --policy "$POLICY" --src-tls-verify=false \
        "docker://$R_URL/e2e/app:v1" "oci:$WORK/redirected:v1"
    diff <(layout_blobs "$IMG") <(layout_blobs "$WORK/redirected") || fail "blobs differ"
    local layer headers location code
    layer=$(cd "$IMG/blobs/sha256" && ls -S | head -1)
    headers=$(curl -sS -o /dev/null -D - "http://$R_URL/v2/e2e/app/blobs/sha256:$layer" | tr -d '\r')
    echo "$headers" | head -1 | grep -q ' 307' || fail "no 307: $headers"
    location=$(echo "$headers" | awk 'tolower($1)=="location:" {print $2}')
    [ -n "$location" ] || fail "no Location: $headers"
    [ "$(curl -sSf "$location" | sha256sum | cut -d' ' -f1)" = "$layer" ] ||
        fail "the presigned URL served other bytes"
    # HEAD and Range are answered by the registry; a repository without the blob gets 404.
    code=$(curl -s -o /dev/null -w '%{http_code}' -I "http://$R_URL/v2/e2e/app/blobs/sha256:$layer")
    [ "$code" = 200 ] || fail "HEAD answered $code"
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Range: bytes=0-9' "http://$R_URL/v2/e2e/app/blobs/sha256:$layer")
    [ "$code" = 206 ] || fail "a Range GET answered $code"
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://$R_URL/v2/e2e/chunked/blobs/sha256:$layer")
    [ "$code" = 404 ] || fail "a repository without the blob answered $code"
}

tokens_shared_by_key_file() { # C and D share --token-key-file; E signs with its own key
    local token code
    token=$(curl -sf -u ci:ci-pass "http://$C_URL/token?service=registry&scope=repository:e2e/app:pull" |
        jq -r .token)
    [ -n "$token" ] && [ "$token" != null ] || fail "no token from C"
    # /v2/ answers 200 to any valid credential (D's memory store has no e2e/app).
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "http://$D_URL/v2/")
    [ "$code" = 200 ] || fail "D refused C's token: $code"
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "http://$E_URL/v2/")
    [ "$code" = 401 ] || fail "E, with another key, answered $code to C's token"
}

bucket_check_is_clean() { # serve check on the bucket while both processes run
    "$SERVE" check --storage "$STORAGE" --verify-digests >"$WORK/check.txt" 2>&1 ||
        fail "serve check failed: $(tail -3 "$WORK/check.txt")"
    grep -q '^check: .*, 0 problems$' "$WORK/check.txt" ||
        fail "serve check found problems: $(cat "$WORK/check.txt")"
    grep -q '^check: [1-9][0-9]* blobs' "$WORK/check.txt" ||
        fail "serve check saw no blobs: $(tail -1 "$WORK/check.txt")"
}

for backend in $E2E_BACKENDS; do
    case "$backend" in
    s3)
        export AWS_ENDPOINT=http://127.0.0.1:$MOTO_PORT AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
            AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
        STORAGE=s3://e2e/registry
        ;;
    az)
        export AZURE_STORAGE_USE_EMULATOR=true AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:$AZ_PORT
        STORAGE=az://e2e/registry
        ;;
    s3+pg)
        export AWS_ENDPOINT=http://127.0.0.1:$MOTO_PORT AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
            AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
        STORAGE=s3://e2e/registry-pg
        ;;
    *) echo "unknown backend $backend" >&2; exit 2 ;;
    esac
    SERVE_FLAGS=()
    if [ "$backend" = s3+pg ]; then
        SERVE_FLAGS=(--metadata "postgres://registry@127.0.0.1:$PG_PORT/e2e")
    fi
    start_serve A "$STORAGE"
    start_serve B "$STORAGE"
    echo "# $backend: $STORAGE through A ($A_URL) and B ($B_URL)"
    check "$backend: skopeo pushes through A, copies back through B" push_a_pull_b
    check "$backend: a tag pushed through B is listed through A" tags_b_seen_by_a
    check "$backend: a chunked upload moves between processes" chunked_across_processes
    check "$backend: a delete through A is seen by B" delete_a_seen_by_b
    if [ "$backend" != s3+pg ]; then
        start_serve R "$STORAGE" --redirect-blobs=5m
        check "$backend: blob GETs through R redirect to presigned bucket URLs" redirected_pull
    fi
    if [ "$backend" != s3+pg ]; then
        # The bucket's own metadata log; with --metadata the bucket holds only blobs.
        check "$backend: serve check reports the shared bucket clean" bucket_check_is_clean
    fi
done

# Tokens across processes: a token issued by one process is accepted by another that
# reads the same --token-key-file, and refused by one with its own random key.
"$SERVE" token-key --token-key-file "$WORK/token.key" --cert "$WORK/token.crt" >/dev/null
export CI_PASS=ci-pass
SERVE_FLAGS=(--auth-user ci:env:CI_PASS)
start_serve C memory --token-key-file "$WORK/token.key"
start_serve D memory --token-key-file "$WORK/token.key"
start_serve E memory
check "tokens: one issued by C is accepted by D (same --token-key-file), refused by E" tokens_shared_by_key_file

finish_checks
