#!/usr/bin/env bash
# The whole test suite, from a Debian machine with nothing but the Rust toolchain (as
# root). Steps, each announced and timed:
#
#   test dependencies     lists what is missing (package, version, where), then installs
#                         it: Debian packages (skopeo, umoci, buildah, podman,
#                         docker-registry, ...), oras and moto in a venv and Azurite from
#                         npm under .test-deps/, a nightly toolchain and cargo-fuzz
#                         (scripts/install-test-deps.sh; INSTALL_TEST_DEPS=no only checks)
#   gates                 rustfmt, dependency directions, clippy, rustdoc, each library
#                         crate alone with its default features
#   build test binaries   one debug build, all features, for the tests and the examples
#   tests                 unit, behaviour suite on each store (the object store against
#                         moto and Azurite), model-based, stress, kill -9 crash,
#                         in-process HTTP, real clients (cargo test), then the doc tests
#                         (the README's examples among them)
#   three registries      the three_registries example, from the test build
#   build serve           the release build of the serve example, for the e2e steps
#   e2e                   real clients against serve processes (scripts/e2e-clients.sh),
#                         two serve processes on one bucket, also with the metadata in
#                         PostgreSQL (scripts/e2e-object.sh), metrics scraped by a real
#                         Prometheus and the logs (scripts/e2e-metrics.sh), token
#                         servers, Distribution trusting ours, htpasswd, throttling
#                         and TLS (scripts/e2e-auth.sh), three processes on PostgreSQL
#                         through a kill -9 and a database crash (scripts/e2e-scaleout.sh),
#                         webhooks to a real receiver through a kill -9, the receiver
#                         down and two processes on one bucket (scripts/e2e-notify.sh),
#                         pull-through caches of Distribution and of serve, mirroring
#                         through a kill -9, sync (scripts/e2e-proxy.sh)
#   fuzz                  every cargo-fuzz target for FUZZ_SECONDS (default 25) each
#
# It keeps going after a failure (a failed build skips only the steps that need it),
# prints each step's time and result at the end, and its last line is
# `N passed, M failed`: cargo tests, doc tests, e2e checks, fuzz targets, plus one per
# other step (a gate, a build). The exit status is non-zero if anything failed.
#
# Environment: FUZZ_SECONDS, FUZZ_TARGETS (scripts/fuzz.sh), E2E_ONLY
# (scripts/e2e-clients.sh), INSTALL_TEST_DEPS=no, TEST_LOGS (where step logs go,
# default target/test-logs).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
LOGS=${TEST_LOGS:-$TARGET_DIR/test-logs}
mkdir -p "$LOGS" && LOGS=$(cd "$LOGS" && pwd)
rm -f "$LOGS"/*.log "$LOGS"/*.json "$LOGS"/*.counts

# One feature set and profile for everything that runs from the test build: every
# workspace member, all features, debug. Examples come out of the same build.
CARGO_ALL=(--workspace --all-features --locked)
# The example run as a smoke test, by name (whatever package holds it).
SMOKE_EXAMPLE=three_registries
# The serve binary the e2e steps drive: a release build of the `serve` example, with
# the features its own package asks for (the same build as the README's
# `cargo run --release --example serve`).
SERVE_BUILD=(cargo build --release --locked -p registry-examples --example serve)
SERVE_BIN=$TARGET_DIR/release/examples/serve

# On CI (CI=true: a fresh machine, nothing to reuse): no incremental compilation data,
# and line tables only as debug info (backtraces keep file and line): a smaller
# target/ and faster links. Not on your machine, where a different profile would
# rebuild what your own `cargo test` built, and the other way round.
CI_BUILD=
if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
    export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=line-tables-only
    CI_BUILD="CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=line-tables-only"
fi

# ---------------------------------------------------------------- bookkeeping
STEP_NAMES=()
STEP_TIMES=()
STEP_RESULTS=()
PASSED=0
FAILED=0
SUITE_START=$SECONDS
STEP_NO=0
STEP_COUNT=19

fmt_time() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }

announce() {
    STEP_NO=$((STEP_NO + 1))
    printf '\n==> [%d/%d] %s\n' "$STEP_NO" "$STEP_COUNT" "$1"
}

record() { # record NAME SECONDS RESULT
    STEP_NAMES+=("$1")
    STEP_TIMES+=("$2")
    STEP_RESULTS+=("$3")
    printf '<== %s: %s (%s)\n' "$1" "$3" "$(fmt_time "$2")"
}

# step NAME COMMAND...: a step that counts as one check.
step() {
    local name=$1 start=$SECONDS rc=0
    shift
    announce "$name"
    "$@" || rc=$?
    if [ "$rc" = 0 ]; then
        PASSED=$((PASSED + 1))
        record "$name" $((SECONDS - start)) ok
    else
        FAILED=$((FAILED + 1))
        record "$name" $((SECONDS - start)) "FAILED (exit $rc)"
    fi
    return "$rc"
}

# counted_step NAME COUNTS_FILE COMMAND...: a step whose command writes
# `PASSED FAILED [SKIPPED]` into COUNTS_FILE; no file means it broke before counting
# (one failure).
counted_step() {
    local name=$1 counts=$2 start=$SECONDS rc=0 p f s result
    shift 2
    announce "$name"
    rm -f "$counts"
    "$@" || rc=$?
    if [ -s "$counts" ]; then
        read -r p f s <"$counts"
        s=${s:-0}
    else
        p=0 f=1 s=0
    fi
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
        f=1 # failed without a failed check: count the step itself
    fi
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
    result="$p passed, $f failed"
    [ "$s" = 0 ] || result+=", $s ignored"
    [ "$rc" = 0 ] || result+=" (exit $rc)"
    record "$name" $((SECONDS - start)) "$result"
}

skip() { # skip NAME WHY
    announce "$1"
    echo "skipped: $2"
    record "$1" 0 "skipped ($2)"
}

# ---------------------------------------------------------------- the steps
install_deps() {
    if [ "${INSTALL_TEST_DEPS:-yes}" = no ]; then
        scripts/install-test-deps.sh --plan
    else
        scripts/install-test-deps.sh
    fi
}

crates_alone() {
    # The workspace build unifies features across members and can hide a crate that
    # needs a dependency feature it does not ask for.
    local crate rc=0
    for crate in registry-core registry-store-fs registry-store-object registry-http registry-layout registry-store-postgres; do
        echo "cargo check -p $crate --lib"
        cargo check --locked -p "$crate" --lib || rc=1
    done
    return "$rc"
}

build_tests() {
    # The JSON messages name the artifacts (the smoke example's path below); cargo's
    # progress and diagnostics still go to the terminal.
    cargo test "${CARGO_ALL[@]}" --no-run --message-format=json-render-diagnostics \
        >"$LOGS/build-tests.json"
}

smoke_example_bin() {
    jq -r --arg n "$SMOKE_EXAMPLE" \
        'select(.reason == "compiler-artifact" and .target.name == $n
                and (.target.kind | index("example")) and .executable != null) | .executable' \
        "$LOGS/build-tests.json" 2>/dev/null | tail -n 1
}

# cargo_test COUNTS LOG ARGS...: cargo test with ARGS, every test binary even after a
# failure; writes `PASSED FAILED IGNORED` (summed over libtest's `test result:` lines)
# into COUNTS. A test binary that ends without a result line (it crashed) counts as
# one failure.
cargo_test() {
    local counts=$1 log=$2 rc
    shift 2
    cargo test "${CARGO_ALL[@]}" --no-fail-fast "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    python3 - "$log" "$counts" <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read()
results = re.findall(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text, re.M)
started = len(re.findall(r"^\s+(?:Running|Doc-tests) ", text, re.M))
if started or results:
    p, f, i = (sum(int(r[k]) for r in results) for k in range(3))
    f += max(0, started - len(results))
    open(sys.argv[2], "w").write(f"{p} {f} {i}\n")
EOF
    return "$rc"
}

run_smoke_example() {
    local bin
    bin=$(smoke_example_bin)
    [ -n "$bin" ] && [ -x "$bin" ] || {
        echo "the test build did not produce the $SMOKE_EXAMPLE example" >&2
        return 1
    }
    echo "$bin"
    "$bin"
}

build_serve() {
    echo "${SERVE_BUILD[*]}"
    "${SERVE_BUILD[@]}"
}

# ---------------------------------------------------------------- run
echo "scripts/test.sh: $STEP_COUNT steps, logs in ${LOGS#"$ROOT"/}/"
[ -z "$CI_BUILD" ] || echo "CI=$CI: building with $CI_BUILD"

# Free disk, printed because a full disk fails the build in confusing ways (a linker's
# bus error, "database or disk is full" from cargo's cache). A clean run writes about
# 5 GiB under target/ (CI profile; more with full debug info), 2 GiB under fuzz/target
# and 0.5 GiB of test dependencies; runs on a shared disk have failed for lack of it.
disk_report() {
    local avail
    avail=$(df -Pk "$TARGET_DIR" 2>/dev/null | awk 'NR == 2 { print int($4 / 1048576) }')
    echo "disk: ${avail:-?} GiB free where $TARGET_DIR is; target/ holds $(du -sh "$TARGET_DIR" 2>/dev/null | cut -f1)"
    if [ -n "$avail" ] && [ "$avail" -lt 10 ]; then
        echo "warning: under 10 GiB free; the builds below need about 8 GiB" >&2
    fi
}
mkdir -p "$TARGET_DIR"
disk_report

deps_ok=1
step "test dependencies (scripts/install-test-deps.sh)" install_deps || deps_ok=0

step "formatting (cargo fmt --check)" cargo fmt --all --check
step "dependency directions (scripts/check-deps.py)" python3 scripts/check-deps.py
step "clippy (all targets, all features)" \
    cargo clippy "${CARGO_ALL[@]}" --all-targets -- -D warnings
step "docs (rustdoc, warnings denied)" \
    env RUSTDOCFLAGS=-Dwarnings cargo doc "${CARGO_ALL[@]}" --no-deps
step "each library crate alone, with its default features" crates_alone

if step "build test binaries and examples (debug, all features)" build_tests; then
    counted_step "tests (cargo test: unit and integration)" "$LOGS/tests.counts" \
        cargo_test "$LOGS/tests.counts" "$LOGS/tests.log" --lib --bins --tests
    counted_step "doc tests (cargo test --doc, the README's examples among them)" \
        "$LOGS/doc-tests.counts" cargo_test "$LOGS/doc-tests.counts" "$LOGS/doc-tests.log" --doc
    step "three registries with their policies and a promotion ($SMOKE_EXAMPLE example)" \
        run_smoke_example
else
    skip "tests (cargo test: unit and integration)" "the build failed"
    skip "doc tests (cargo test --doc, the README's examples among them)" "the build failed"
    skip "three registries ($SMOKE_EXAMPLE example)" "the build failed"
fi

if ((!deps_ok)); then
    STEP_NO=$((STEP_NO + 1))
    skip "e2e: real clients (scripts/e2e-clients.sh)" "test dependencies missing"
    skip "e2e: two serve processes on one bucket (scripts/e2e-object.sh)" "test dependencies missing"
    skip "e2e: metrics scraped by Prometheus (scripts/e2e-metrics.sh)" "test dependencies missing"
    skip "e2e: authentication (scripts/e2e-auth.sh)" "test dependencies missing"
    skip "e2e: three processes on PostgreSQL under crashes (scripts/e2e-scaleout.sh)" "test dependencies missing"
    skip "e2e: webhooks (scripts/e2e-notify.sh)" "test dependencies missing"
    skip "e2e: pull-through cache and mirroring (scripts/e2e-proxy.sh)" "test dependencies missing"
elif step "build serve (release) for the e2e steps" build_serve; then
    counted_step "e2e: real clients against serve (scripts/e2e-clients.sh)" "$LOGS/e2e-clients.counts" \
        env SERVE="$SERVE_BIN" E2E_COUNTS="$LOGS/e2e-clients.counts" scripts/e2e-clients.sh
    counted_step "e2e: two serve processes on one bucket: S3, Azure, S3 + PostgreSQL (scripts/e2e-object.sh)" \
        "$LOGS/e2e-object.counts" \
        env SERVE="$SERVE_BIN" E2E_COUNTS="$LOGS/e2e-object.counts" scripts/e2e-object.sh
    counted_step "e2e: metrics scraped by a real Prometheus, the dashboard's queries, access and audit logs (scripts/e2e-metrics.sh)" \
        "$LOGS/e2e-metrics.counts" \
        env SERVE="$SERVE_BIN" E2E_COUNTS="$LOGS/e2e-metrics.counts" scripts/e2e-metrics.sh
    counted_step "e2e: authentication: token servers both ways with Distribution, htpasswd, throttling, TLS (scripts/e2e-auth.sh)" \
        "$LOGS/e2e-auth.counts" \
        env SERVE="$SERVE_BIN" E2E_COUNTS="$LOGS/e2e-auth.counts" scripts/e2e-auth.sh
    counted_step "e2e: three serve processes on one PostgreSQL and one bucket, through a kill -9 and a database crash (scripts/e2e-scaleout.sh)" \
        "$LOGS/e2e-scaleout.counts" \
        env SERVE="$SERVE_BIN" E2E_COUNTS="$LOGS/e2e-scaleout.counts" scripts/e2e-scaleout.sh
    counted_step "e2e: webhooks from the outbox to a real receiver, through a kill -9, the receiver down 30 s, two processes on one bucket (scripts/e2e-notify.sh)" \
        "$LOGS/e2e-notify.counts" \
        env SERVE="$SERVE_BIN" E2E_COUNTS="$LOGS/e2e-notify.counts" scripts/e2e-notify.sh
    counted_step "e2e: pull-through caches of Distribution and serve with skopeo and podman, mirroring through a kill -9, sync (scripts/e2e-proxy.sh)" \
        "$LOGS/e2e-proxy.counts" \
        env SERVE="$SERVE_BIN" E2E_COUNTS="$LOGS/e2e-proxy.counts" scripts/e2e-proxy.sh
else
    skip "e2e: real clients (scripts/e2e-clients.sh)" "the serve build failed"
    skip "e2e: two serve processes on one bucket (scripts/e2e-object.sh)" "the serve build failed"
    skip "e2e: metrics scraped by Prometheus (scripts/e2e-metrics.sh)" "the serve build failed"
    skip "e2e: authentication (scripts/e2e-auth.sh)" "the serve build failed"
    skip "e2e: three processes on PostgreSQL under crashes (scripts/e2e-scaleout.sh)" "the serve build failed"
    skip "e2e: webhooks (scripts/e2e-notify.sh)" "the serve build failed"
    skip "e2e: pull-through cache and mirroring (scripts/e2e-proxy.sh)" "the serve build failed"
fi

if ((deps_ok)); then
    if step "build fuzz targets (cargo +nightly fuzz build)" scripts/fuzz.sh --build-only; then
        counted_step "fuzz every target for ${FUZZ_SECONDS:-25}s (scripts/fuzz.sh)" "$LOGS/fuzz.counts" \
            env FUZZ_COUNTS="$LOGS/fuzz.counts" scripts/fuzz.sh --no-build
    else
        skip "fuzz every target (scripts/fuzz.sh)" "the fuzz build failed"
    fi
else
    STEP_NO=$((STEP_NO + 1))
    skip "fuzz every target (scripts/fuzz.sh)" "test dependencies missing"
fi

# ---------------------------------------------------------------- summary
total=$((SECONDS - SUITE_START))
disk_report
printf '\n==> summary (logs in %s/)\n' "${LOGS#"$ROOT"/}"
for i in "${!STEP_NAMES[@]}"; do
    printf '  %6s  %-82.82s %s\n' "$(fmt_time "${STEP_TIMES[$i]}")" "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}"
done
printf '  %6s  %s\n' "$(fmt_time "$total")" total
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
