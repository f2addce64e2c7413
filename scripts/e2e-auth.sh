#!/usr/bin/env bash
# End-to-end test of authentication with real clients and real registries, all on
# 127.0.0.1:
#
#   token server  our serve (T) issuing ES256 JWTs for htpasswd users (`htpasswd -B`,
#                 Debian's apache2-utils), with per-user rules from a TOML file;
#   external      a second serve (R) that only trusts T (--token-realm, --token-issuer,
#                 --token-root-cert-bundle: T's self-signed certificate from
#                 `serve token-key`), and a third (U) with a key nobody trusts;
#   Distribution  CNCF Distribution 2.8 (Debian's docker-registry) with auth.token
#                 trusting T's certificate: our tokens work there too;
#   htpasswd      a serve (H) with an htpasswd file, used by skopeo, podman and oras,
#                 and changed while it runs;
#   throttling    a serve (Z) with low limits: wrong passwords get 429 + Retry-After,
#                 seen in the audit log and the metrics;
#   TLS           a serve (S) with a certificate from a CA made here with openssl,
#                 verified by skopeo (--tls-verify=true) and curl, renewed while it runs.
#
#   scripts/e2e-auth.sh
#
# Environment:
#   SERVE       our serve binary; unset: built here first (cargo build --release
#               --example serve)
#   E2E_KEEP=1  keep the temp dir (logs, keys, configs) for inspection
#   E2E_COUNTS  a file to write `PASSED FAILED` into at the end (scripts/test.sh reads
#               it); not written when a server could not be started
#
# Only 127.0.0.1 is used; the script stops what it started (by PID) and nothing else.
# Each check prints `ok - NAME` or `not ok - NAME` with the reason; the last line is
# `N passed, M failed`, and the exit status is non-zero if a check failed (2 if a
# server could not be started).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

scripts/install-test-deps.sh apt python || {
    echo "installing test dependencies failed (scripts/install-test-deps.sh apt python)" >&2
    exit 2
}
for tool in skopeo podman umoci docker-registry htpasswd openssl curl jq; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
PYTHON=$ROOT/.test-deps/venv/bin/python

WORK=$(mktemp -d "${TMPDIR:-/tmp}/e2e-auth.XXXXXX")
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

# Clients keep their logins here, not in the user's files.
export REGISTRY_AUTH_FILE=$WORK/auth.json
PM=$WORK/podman
PODMAN=(podman --storage-driver vfs --root "$PM/root" --runroot "$PM/runroot")

if [ -z "${SERVE:-}" ]; then
    echo "building the serve example (release): cargo build --release --example serve"
    cargo build --release --locked -p registry-examples --example serve || { echo "build failed" >&2; exit 2; }
    SERVE=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/serve
fi
[ -x "$SERVE" ] || { echo "no serve binary at $SERVE" >&2; exit 2; }

# start NAME URL_CHECK ARGS...: starts serve with ARGS (logging to NAME.log) and waits
# until GET /v2/ answers 401 (every server here requires authentication); sets
# <NAME>_PID and <NAME>_HOST. Exits 2 if it does not come up.
start() {
    local name=$1 scheme=$2 port host i code
    shift 2
    port=$(free_port)
    host=127.0.0.1:$port
    "$SERVE" --addr "$host" --storage memory "$@" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    printf -v "${name}_PID" %s "$pid"
    printf -v "${name}_HOST" %s "$host"
    local tls=()
    [ "$scheme" = https ] && tls=(--cacert "$WORK/ca/ca.crt")
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "${tls[@]}" "$scheme://$host/v2/")
        [ "$code" = 401 ] && return 0
        sleep 0.2
    done
    echo "serve $name did not come up:" >&2
    cat "$WORK/$name.log" >&2
    exit 2
}

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
        sed 's/^/    /' "$out" | tail -n 30
    fi
}

fail() {
    echo "FAILED: $*" >&2
    return 1
}

# run COMMAND...: runs it (for five minutes at most), showing its output only when it
# fails.
run() {
    local out rc
    out=$(timeout 300 "$@" 2>&1)
    rc=$?
    if [ "$rc" != 0 ]; then
        printf 'command failed (exit %s): %s\n%s\n' "$rc" "$*" "$(echo "$out" | tail -n 20)" >&2
        return 1
    fi
}

# b64url_decode: standard input, base64url without padding, decoded.
b64url_decode() {
    local s
    s=$(tr '_-' '/+')
    while [ $((${#s} % 4)) != 0 ]; do s="$s="; done
    printf '%s' "$s" | base64 -d
}

# code URL [curl args...]: the HTTP status of a GET.
code() {
    local url=$1
    shift
    curl -s -o /dev/null -w '%{http_code}' --max-time 30 "$@" "$url"
}

# ---------------------------------------------------------------- fixtures
mkdir -p "$WORK/ca" "$PM"
# Passwords: random, and only ever in files, environment variables or stdin.
ALICE_PASS=alice-$RANDOM$RANDOM
CI_PASS=ci-$RANDOM$RANDOM
printf '%s\n' "$ALICE_PASS" | htpasswd -c -i -B "$WORK/htpasswd" alice 2>/dev/null
printf '%s\n' "$CI_PASS" | htpasswd -i -B "$WORK/htpasswd" ci 2>/dev/null
cat >"$WORK/rules.toml" <<'EOF'
# alice pushes to team-a/*, ci pushes everywhere, anonymous clients pull public/*.
[groups]
admins = ["ci"]

[[allow]]
who = ["alice"]
prefix = "team-a/*"
actions = ["pull", "push", "list"]

[[allow]]
who = ["group:admins"]
prefix = "*"
actions = ["*"]

[[allow]]
who = ["anyone"]
prefix = "public"
actions = ["pull", "list"]
EOF

# An image to push: one random layer.
head -c 60000 /dev/urandom >"$WORK/layer.bin"
umoci init --layout "$WORK/layout" >/dev/null
umoci new --image "$WORK/layout:v1" >/dev/null
umoci insert --image "$WORK/layout:v1" "$WORK/layer.bin" /layer.bin >/dev/null

# same_layer LAYOUT:TAG: the layer of an image copied back equals the one pushed.
same_layer() {
    local dir=$WORK/unpack-$RANDOM
    run umoci unpack --rootless --image "$1" "$dir"
    cmp -s "$WORK/layer.bin" "$dir/rootfs/layer.bin" || fail "the layer pulled back from $1 differs"
}

# ---------------------------------------------------------------- token server T
"$SERVE" token-key --token-key-file "$WORK/token.key" --cert "$WORK/token.crt" \
    >"$WORK/token-key.out" 2>&1 || { cat "$WORK/token-key.out"; exit 2; }
start T http --token-key-file "$WORK/token.key" --token-issuer e2e-issuer \
    --htpasswd "$WORK/htpasswd" --auth-rules "$WORK/rules.toml" --auth-max-failures 1000 \
    --auth-max-failures-per-address 1000
start R http --token-realm "http://$T_HOST/token" --token-issuer e2e-issuer \
    --token-root-cert-bundle "$WORK/token.crt" --auth-rules "$WORK/rules.toml" \
    --auth-max-failures 1000 --auth-max-failures-per-address 1000
start U http --htpasswd "$WORK/htpasswd" --token-issuer e2e-issuer --auth-max-failures 1000 \
    --auth-max-failures-per-address 1000
echo "token server T at $T_HOST, R trusting it at $R_HOST, U (its own key) at $U_HOST"

key_id_is_libtrusts() {
    # The kid printed is libtrust's: base32 of the first 240 bits of the SHA-256 of the
    # certificate's DER public key, in groups of four.
    local printed expected
    printed=$(awk '/^token-key: kid /{print $3}' "$WORK/token-key.out")
    expected=$(openssl x509 -in "$WORK/token.crt" -pubkey -noout | openssl pkey -pubin -outform DER |
        python3 -c 'import sys, hashlib, base64
d = base64.b32encode(hashlib.sha256(sys.stdin.buffer.read()).digest()[:30]).decode()
print(":".join(d[i:i + 4] for i in range(0, len(d), 4)))')
    [ -n "$printed" ] && [ "$printed" = "$expected" ] || fail "kid $printed, expected $expected"
    # The token header names it, and the key file is private.
    local token
    token=$(curl -sf --max-time 30 -u "alice:$ALICE_PASS" "http://$T_HOST/token?service=registry&scope=repository:team-a/x:pull" | jq -r .token)
    printf '%s' "${token%%.*}" | b64url_decode | jq -e --arg k "$expected" '.alg == "ES256" and .kid == $k' >/dev/null ||
        fail "the token header does not carry alg ES256 and the kid"
    [ "$(stat -c %a "$WORK/token.key")" = 600 ] || fail "the key file is not 0600"
}

external_challenge() {
    local h
    h=$(curl -s --max-time 30 -D - -o /dev/null "http://$R_HOST/v2/" | tr -d '\r' | awk 'tolower($1)=="www-authenticate:"{$1=""; print substr($0,2)}')
    [ "$h" = "Bearer realm=\"http://$T_HOST/token\",service=\"registry\"" ] || fail "R's challenge: $h"
    [ "$(code "http://$R_HOST/token")" = 404 ] || fail "R serves a token endpoint of its own"
}

external_skopeo() {
    run skopeo copy --quiet --dest-tls-verify=false --dest-creds "alice:$ALICE_PASS" \
        "oci:$WORK/layout:v1" "docker://$R_HOST/team-a/app:v1"
    run skopeo copy --quiet --src-tls-verify=false --src-creds "alice:$ALICE_PASS" \
        "docker://$R_HOST/team-a/app:v1" "oci:$WORK/back-r:v1"
    same_layer "$WORK/back-r:v1"
    # T's rules decide what the tokens carry: not team-b for alice.
    ! run skopeo copy --quiet --dest-tls-verify=false --dest-creds "alice:$ALICE_PASS" \
        "oci:$WORK/layout:v1" "docker://$R_HOST/team-b/app:v1" || fail "alice pushed to team-b"
    run skopeo copy --quiet --dest-tls-verify=false --dest-creds "ci:$CI_PASS" \
        "oci:$WORK/layout:v1" "docker://$R_HOST/public/app:v1"
    # Anonymous clients pull public/* with an anonymous token, and nothing else.
    run skopeo inspect --tls-verify=false --no-creds "docker://$R_HOST/public/app:v1" >/dev/null
    ! run skopeo inspect --tls-verify=false --no-creds "docker://$R_HOST/team-a/app:v1" ||
        fail "anonymous pull of team-a accepted"
}

external_foreign_tokens() {
    local good foreign
    good=$(curl -sf --max-time 30 -u "ci:$CI_PASS" "http://$T_HOST/token?service=registry&scope=repository:team-a/app:pull" | jq -r .token)
    [ "$(code "http://$R_HOST/v2/team-a/app/tags/list" -H "Authorization: Bearer $good")" = 200 ] ||
        fail "R refused T's token"
    # U signs with a key R does not trust, under the same issuer and service names.
    foreign=$(curl -sf --max-time 30 -u "ci:$CI_PASS" "http://$U_HOST/token?service=registry&scope=repository:team-a/app:pull" | jq -r .token)
    [ "$(code "http://$R_HOST/v2/team-a/app/tags/list" -H "Authorization: Bearer $foreign")" = 401 ] ||
        fail "R accepted a token signed by another key"
    # A token rewritten to claim more, keeping the signature.
    local h p s forged
    IFS=. read -r h p s <<<"$good"
    forged=$(printf '%s' "$p" | b64url_decode | jq -c '.access[0].actions = ["pull","push","delete"]' |
        base64 -w0 | tr '/+' '_-' | tr -d '=')
    [ "$(code "http://$R_HOST/v2/team-a/app/tags/list" -H "Authorization: Bearer $h.$forged.$s")" = 401 ] ||
        fail "R accepted a forged token"
}

# podman_image: a local image e2e-auth:v1 to push (each podman check removes them all).
podman_image() {
    mkdir -p "$PM/src"
    echo "pushed by podman $RANDOM" >"$PM/src/hello.txt"
    tar -C "$PM/src" -cf "$PM/layer.tar" hello.txt
    run "${PODMAN[@]}" import --quiet "$PM/layer.tar" e2e-auth:v1
}

external_podman() {
    podman_image
    ! echo wrong | run "${PODMAN[@]}" login --tls-verify=false -u alice --password-stdin "$R_HOST" ||
        fail "login with a wrong password accepted"
    printf '%s\n' "$ALICE_PASS" | run "${PODMAN[@]}" login --tls-verify=false -u alice --password-stdin "$R_HOST"
    run "${PODMAN[@]}" push --quiet --tls-verify=false e2e-auth:v1 "docker://$R_HOST/team-a/podman:v1"
    run "${PODMAN[@]}" rmi --all --force
    run "${PODMAN[@]}" pull --quiet --tls-verify=false "$R_HOST/team-a/podman:v1"
    run "${PODMAN[@]}" logout "$R_HOST"
}

check "token-key: the key id is libtrust's fingerprint of the certificate's key; tokens carry it" key_id_is_libtrusts
check "external token server: R challenges with T's realm and has no token endpoint" external_challenge
check "external token server: skopeo pushes and pulls through R with T's tokens; T's rules apply" external_skopeo
check "external token server: tokens signed by another key, or forged, are refused by R" external_foreign_tokens
check "external token server: podman logs in to R (through T), pushes and pulls" external_podman

# ---------------------------------------------------------------- Distribution D trusting T
D_PORT=$(free_port)
D_HOST=127.0.0.1:$D_PORT
mkdir -p "$WORK/dist"
cat >"$WORK/distribution.yml" <<EOF
version: 0.1
log:
  accesslog:
    disabled: true
  level: info
storage:
  filesystem:
    rootdirectory: $WORK/dist
  delete:
    enabled: true
http:
  addr: $D_HOST
auth:
  token:
    realm: http://$T_HOST/token
    service: registry
    issuer: e2e-issuer
    rootcertbundle: $WORK/token.crt
EOF
# Distribution reads REGISTRY_* variables as configuration: REGISTRY_AUTH_FILE would
# become auth.file.
env -u REGISTRY_AUTH_FILE docker-registry serve "$WORK/distribution.yml" >"$WORK/distribution.log" 2>&1 &
PIDS+=($!)
for ((i = 0; i < 150; i++)); do
    [ "$(code "http://$D_HOST/v2/")" = 401 ] && break
    sleep 0.2
done
[ "$(code "http://$D_HOST/v2/")" = 401 ] || { cat "$WORK/distribution.log" >&2; exit 2; }
echo "Distribution at $D_HOST, trusting T's certificate"

distribution_skopeo() {
    run skopeo copy --quiet --dest-tls-verify=false --dest-creds "alice:$ALICE_PASS" \
        "oci:$WORK/layout:v1" "docker://$D_HOST/team-a/app:v1"
    run skopeo copy --quiet --src-tls-verify=false --src-creds "alice:$ALICE_PASS" \
        "docker://$D_HOST/team-a/app:v1" "oci:$WORK/back-d:v1"
    same_layer "$WORK/back-d:v1"
    grep -q 'auth.user.name=alice' "$WORK/distribution.log" || fail "Distribution did not see alice"
    ! run skopeo copy --quiet --dest-tls-verify=false --dest-creds "alice:$ALICE_PASS" \
        "oci:$WORK/layout:v1" "docker://$D_HOST/team-b/app:v1" || fail "alice pushed to team-b"
}

distribution_both_ways() {
    # Registry to registry, each side authenticating through T.
    run skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false \
        --src-creds "ci:$CI_PASS" --dest-creds "ci:$CI_PASS" \
        "docker://$D_HOST/team-a/app:v1" "docker://$R_HOST/team-a/from-d:v1"
    run skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false \
        --src-creds "ci:$CI_PASS" --dest-creds "ci:$CI_PASS" \
        "docker://$R_HOST/team-a/from-d:v1" "docker://$D_HOST/team-a/round-trip:v1"
    local a b
    a=$(skopeo inspect --tls-verify=false --creds "ci:$CI_PASS" "docker://$D_HOST/team-a/app:v1" | jq -r .Digest)
    b=$(skopeo inspect --tls-verify=false --creds "ci:$CI_PASS" "docker://$D_HOST/team-a/round-trip:v1" | jq -r .Digest)
    [ -n "$a" ] && [ "$a" = "$b" ] || fail "digests differ after the round trip: $a $b"
}

distribution_refuses_foreign() {
    local foreign
    foreign=$(curl -sf --max-time 30 -u "ci:$CI_PASS" "http://$U_HOST/token?service=registry&scope=repository:team-a/app:pull" | jq -r .token)
    [ "$(code "http://$D_HOST/v2/team-a/app/tags/list" -H "Authorization: Bearer $foreign")" = 401 ] ||
        fail "Distribution accepted a token signed by another key"
}

distribution_podman() {
    podman_image
    printf '%s\n' "$CI_PASS" | run "${PODMAN[@]}" login --tls-verify=false -u ci --password-stdin "$D_HOST"
    run "${PODMAN[@]}" push --quiet --tls-verify=false e2e-auth:v1 "docker://$D_HOST/anything/podman:v1"
    run "${PODMAN[@]}" rmi --all --force
    run "${PODMAN[@]}" pull --quiet --tls-verify=false "$D_HOST/anything/podman:v1"
    run "${PODMAN[@]}" logout "$D_HOST"
}

check "Distribution with auth.token trusting our token endpoint: skopeo pushes and pulls; rules apply" distribution_skopeo
check "Distribution and R: skopeo copies D -> R -> D, both through T's tokens, same digest" distribution_both_ways
check "Distribution refuses tokens signed by another key" distribution_refuses_foreign
check "Distribution: podman logs in through T, pushes and pulls" distribution_podman

# ---------------------------------------------------------------- htpasswd H
export E2E_CI_PASS=$CI_PASS
start H http --htpasswd "$WORK/htpasswd" --auth-rules "$WORK/rules.toml" \
    --auth-max-failures 1000 --auth-max-failures-per-address 1000 --audit-log "$WORK/h-audit.jsonl"

htpasswd_skopeo() {
    run skopeo copy --quiet --dest-tls-verify=false --dest-creds "alice:$ALICE_PASS" \
        "oci:$WORK/layout:v1" "docker://$H_HOST/team-a/app:v1"
    run skopeo copy --quiet --src-tls-verify=false --src-creds "alice:$ALICE_PASS" \
        "docker://$H_HOST/team-a/app:v1" "oci:$WORK/back-h:v1"
    same_layer "$WORK/back-h:v1"
    ! run skopeo inspect --tls-verify=false --creds "alice:wrong" "docker://$H_HOST/team-a/app:v1" ||
        fail "a wrong password was accepted"
    [ "$(code "http://$H_HOST/v2/" -u "alice:$ALICE_PASS")" = 200 ] || fail "Basic credentials refused"
}

htpasswd_podman() {
    podman_image
    printf '%s\n' "$ALICE_PASS" | run "${PODMAN[@]}" login --tls-verify=false -u alice --password-stdin "$H_HOST"
    run "${PODMAN[@]}" push --quiet --tls-verify=false e2e-auth:v1 "docker://$H_HOST/team-a/podman:v1"
    ! run "${PODMAN[@]}" push --quiet --tls-verify=false e2e-auth:v1 "docker://$H_HOST/team-b/podman:v1" ||
        fail "alice pushed to team-b"
    run "${PODMAN[@]}" rmi --all --force
    run "${PODMAN[@]}" pull --quiet --tls-verify=false "$H_HOST/team-a/podman:v1"
    run "${PODMAN[@]}" logout "$H_HOST"
}

htpasswd_oras() {
    # oras_auth.py pushes to auth/*: ci may (rules: everywhere), alice may not.
    mkdir -p "$WORK/oras"
    run "$PYTHON" scripts/e2e/oras_auth.py "$H_HOST" ci "$E2E_CI_PASS" "$WORK/oras"
}

htpasswd_reloaded() {
    local new=new-$RANDOM$RANDOM i ok=0
    printf '%s\n' "$new" | htpasswd -i -B "$WORK/htpasswd" alice 2>/dev/null
    printf '%s\n' "$new" | htpasswd -i -B "$WORK/htpasswd" dave 2>/dev/null
    # The file is looked at once a second at most: poll, bounded.
    for ((i = 0; i < 50; i++)); do
        if [ "$(code "http://$H_HOST/v2/" -u "alice:$new")" = 200 ]; then ok=1; break; fi
        sleep 0.2
    done
    [ "$ok" = 1 ] || fail "the new password was not picked up"
    [ "$(code "http://$H_HOST/v2/" -u "alice:$ALICE_PASS")" = 401 ] || fail "the old password still works"
    [ "$(code "http://$H_HOST/v2/" -u "dave:$new")" = 200 ] || fail "the new user dave was not picked up"
    # Removing a user removes its access.
    htpasswd -D "$WORK/htpasswd" dave 2>/dev/null
    ok=0
    for ((i = 0; i < 50; i++)); do
        if [ "$(code "http://$H_HOST/v2/" -u "dave:$new")" = 401 ]; then ok=1; break; fi
        sleep 0.2
    done
    [ "$ok" = 1 ] || fail "a removed user still authenticates"
    grep -q 'htpasswd file reloaded' "$WORK/H.log" || fail "no reload in the log"
    ! grep -q "$new" "$WORK/H.log" "$WORK/h-audit.jsonl" || fail "a password appears in a log"
}

check "htpasswd -B: skopeo pushes and pulls; a wrong password is refused" htpasswd_skopeo
check "htpasswd -B: podman logs in, pushes (not outside its rules) and pulls" htpasswd_podman
check "htpasswd -B: oras pushes and pulls with the token and the basic backends" htpasswd_oras
check "htpasswd: a changed password, an added and a removed user take effect without a restart" htpasswd_reloaded

# ---------------------------------------------------------------- throttling Z
Z_METRICS_HOST=127.0.0.1:$(free_port)
Z_METRICS=http://$Z_METRICS_HOST/metrics
start Z http --htpasswd "$WORK/htpasswd" --auth-max-failures 3 --auth-max-failures-per-address 1000 \
    --auth-lockout 60s --audit-log "$WORK/z-audit.jsonl" --metrics-addr "$Z_METRICS_HOST"

throttled() {
    local i c
    for i in 1 2 3; do
        c=$(code "http://$Z_HOST/v2/" -u "ci:guess-$i")
        [ "$c" = 401 ] || fail "guess $i answered $c"
    done
    # Locked now: even the right password waits, and is told how long.
    curl -s --max-time 30 -D "$WORK/z.headers" -o "$WORK/z.body" -u "ci:$CI_PASS" "http://$Z_HOST/v2/" >/dev/null
    head -1 "$WORK/z.headers" | grep -q ' 429' || fail "no 429: $(head -1 "$WORK/z.headers")"
    local retry
    retry=$(tr -d '\r' <"$WORK/z.headers" | awk 'tolower($1)=="retry-after:"{print $2}')
    [ -n "$retry" ] && [ "$retry" -gt 0 ] && [ "$retry" -le 60 ] || fail "Retry-After: '$retry'"
    jq -e '.errors[0].code == "TOOMANYREQUESTS"' "$WORK/z.body" >/dev/null || fail "body: $(cat "$WORK/z.body")"
    # skopeo gets the same answer at the token endpoint.
    ! run skopeo inspect --tls-verify=false --creds "ci:$CI_PASS" "docker://$Z_HOST/x:v1" ||
        fail "skopeo got through while locked"
    # Another user is not locked.
    [ "$(code "http://$Z_HOST/v2/" -u "alice:wrong")" = 401 ] || fail "another user is locked too"
    # Visible: the audit log, the warning, the metrics.
    jq -e -s 'map(select(.event == "auth_throttled" and .claimed_user == "ci" and .action == "identity")) | length > 0' \
        "$WORK/z-audit.jsonl" >/dev/null || fail "no auth_throttled line: $(tail -3 "$WORK/z-audit.jsonl")"
    [ "$(jq -s 'map(select(.event == "auth_failure" and .claimed_user == "ci")) | length' "$WORK/z-audit.jsonl")" -ge 3 ] ||
        fail "the failures are not in the audit log"
    grep -q 'authentication throttled' "$WORK/Z.log" || fail "no warning in the log"
    curl -sf --max-time 30 "$Z_METRICS" | grep -E '^registry_auth_requests_total\{result="throttled"\} [1-9]' >/dev/null ||
        fail "no throttled count in the metrics: $(curl -sf --max-time 30 "$Z_METRICS" | grep -i auth | head -5)"
}

check "throttling: after 3 wrong passwords, 429 TOOMANYREQUESTS with Retry-After; in the audit log and metrics" throttled

# ---------------------------------------------------------------- secrets stay out of argv
no_secrets_in_argv() {
    ! "$SERVE" --addr 127.0.0.1:1 --storage memory --auth-user "ci:$CI_PASS" >"$WORK/argv.out" 2>&1 ||
        fail "serve accepted a password on the command line"
    grep -q 'NAME:file:PATH or NAME:env:VAR' "$WORK/argv.out" || fail "no hint: $(cat "$WORK/argv.out")"
    printf '%s\n' "$CI_PASS" >"$WORK/ci.pass"
    export E2E_SECRET=$CI_PASS
    start P http --auth-user "ci:file:$WORK/ci.pass" --auth-user "bot:env:E2E_SECRET"
    [ "$(code "http://$P_HOST/v2/" -u "ci:$CI_PASS")" = 200 ] || fail "the password from a file is refused"
    [ "$(code "http://$P_HOST/v2/" -u "bot:$CI_PASS")" = 200 ] || fail "the password from the environment is refused"
    ! tr '\0' ' ' <"/proc/$P_PID/cmdline" | grep -q "$CI_PASS" || fail "the password is in serve's argv"
    echo "$P_PID" >"$WORK/p.pid"
}
check "no secrets in argv: --auth-user NAME:PASSWORD is refused; file: and env: passwords work" no_secrets_in_argv
# Started inside a check's subshell: stopped here.
[ -f "$WORK/p.pid" ] && PIDS+=("$(cat "$WORK/p.pid")")

# ---------------------------------------------------------------- TLS S
# A CA, and a server certificate for 127.0.0.1 signed by it.
make_cert() { # make_cert NAME CN
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$WORK/ca/$1.key" -out "$WORK/ca/$1.csr" -subj "/CN=$2" 2>/dev/null &&
        openssl x509 -req -in "$WORK/ca/$1.csr" -CA "$WORK/ca/ca.crt" -CAkey "$WORK/ca/ca.key" \
            -CAcreateserial -days 2 -out "$WORK/ca/$1.crt" \
            -extfile <(printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') 2>/dev/null
}
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$WORK/ca/ca.key" -out "$WORK/ca/ca.crt" -subj "/CN=e2e test CA" 2>/dev/null ||
    { echo "openssl failed" >&2; exit 2; }
make_cert server first-cert || { echo "openssl failed" >&2; exit 2; }
mkdir -p "$WORK/certs.d"
cp "$WORK/ca/ca.crt" "$WORK/certs.d/ca.crt"
cp "$WORK/ca/server.crt" "$WORK/tls.crt"
cp "$WORK/ca/server.key" "$WORK/tls.key"
start S https --tls-cert "$WORK/tls.crt" --tls-key "$WORK/tls.key" --htpasswd "$WORK/htpasswd"

tls_verified() {
    run skopeo copy --quiet --dest-tls-verify=true --dest-cert-dir "$WORK/certs.d" \
        --dest-creds "ci:$CI_PASS" "oci:$WORK/layout:v1" "docker://$S_HOST/tls/app:v1"
    run skopeo copy --quiet --src-tls-verify=true --src-cert-dir "$WORK/certs.d" \
        --src-creds "ci:$CI_PASS" "docker://$S_HOST/tls/app:v1" "oci:$WORK/back-s:v1"
    same_layer "$WORK/back-s:v1"
    # Without the CA the certificate is not trusted; plain HTTP is not served.
    ! run skopeo inspect --tls-verify=true --creds "ci:$CI_PASS" "docker://$S_HOST/tls/app:v1" ||
        fail "an unknown CA was trusted"
    [ "$(code "http://$S_HOST/v2/")" != 401 ] || fail "plain HTTP answered"
    grep -q "listening on https://$S_HOST" "$WORK/S.log" || fail "serve does not say https"
}

tls_reloaded() {
    local before after i
    before=$(echo | timeout 30 openssl s_client -connect "$S_HOST" -CAfile "$WORK/ca/ca.crt" 2>/dev/null | openssl x509 -noout -subject)
    [[ "$before" == *first-cert* ]] || fail "serving $before"
    make_cert renewed renewed-cert
    # Key first, then the certificate (as renewals write them): the pair is used once
    # both match.
    cp "$WORK/ca/renewed.key" "$WORK/tls.key"
    cp "$WORK/ca/renewed.crt" "$WORK/tls.crt"
    for ((i = 0; i < 50; i++)); do
        after=$(echo | timeout 30 openssl s_client -connect "$S_HOST" -CAfile "$WORK/ca/ca.crt" 2>/dev/null | openssl x509 -noout -subject)
        [[ "$after" == *renewed-cert* ]] && break
        sleep 0.2
    done
    [[ "$after" == *renewed-cert* ]] || fail "still serving $after"
    [ "$(code "https://$S_HOST/v2/" --cacert "$WORK/ca/ca.crt" -u "ci:$CI_PASS")" = 200 ] ||
        fail "the renewed certificate does not verify"
}

check "TLS: skopeo --tls-verify=true with the test CA pushes and pulls; without the CA it fails" tls_verified
check "TLS: a renewed certificate and key are served without a restart" tls_reloaded

# ---------------------------------------------------------------- summary
if ((FAILED)); then
    echo "failed checks:"
    printf '  %s\n' "${FAILED_NAMES[@]}"
fi
[ -z "${E2E_COUNTS:-}" ] || echo "$PASSED $FAILED" >"$E2E_COUNTS"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
