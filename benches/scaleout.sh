#!/usr/bin/env bash
# Scale-out benchmark: manifest PUT and GET-by-tag ops/s through 1 and 3 serve
# processes with the metadata in PostgreSQL, against the bucket's own metadata log and
# the single-process fs store, in one run. See benches/README.md ("Scale-out").
#
#   bash benches/scaleout.sh               # about 15 minutes, 6 of them the startup at 100k
#   PUTS=300 GETS=3000 bash benches/scaleout.sh
#
# Setups (each fresh: a new emulator, a new database):
#   fs        --storage fs (one process; a data dir cannot be shared)
#   log-1     --storage az://... (or s3://), metadata in the bucket's log, one process
#   log-3     the same, three processes
#   pg-1      --storage az://... (or s3://) --metadata postgres://..., one process
#   pg-3      the same, three processes
# Each process gets its own `load` (its own repository, concurrency CONC): PUTS
# manifests, then GETS GETs by tag; ops/s is all processes' operations over the slowest
# one's time. The bucket is an emulator (Azurite by default, moto with BUCKET=s3) on
# the same 2 cores as everything else, and a manifest's bytes are an object PUT and
# GET there too: the absolute figures are the emulator's as much as ours, and three
# processes share the cores with it, PostgreSQL and three load generators.
# PostgreSQL runs with its default durability (every commit flushed), like fs.
#
# Environment: PUTS (default 300), GETS (default 3000), ROUNDS (default 2), CONC
# (default 4), SETUPS (default "fs log-1 log-3 pg-1 pg-3"), BUCKET (az or s3),
# STARTUP_MANIFESTS (default 100000; 0 skips the startup measurement), OUT (default
# target/bench). Output: $OUT/scaleout.md, $OUT/scaleout-raw.jsonl, $OUT/startup.md.
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PUTS=${PUTS:-300}
GETS=${GETS:-3000}
ROUNDS=${ROUNDS:-2}
# The bucket: az (Azurite, in memory; the default: several times faster than moto, so
# the metadata stores' differences show) or s3 (moto).
BUCKET=${BUCKET:-az}
SETUPS=${SETUPS:-fs log-1 log-3 pg-1 pg-3}
CONC=${CONC:-4}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET_DIR/bench}
LOAD=$TARGET_DIR/release/load
SERVE=$TARGET_DIR/release/examples/serve
mkdir -p "$OUT"
RAW=$OUT/scaleout-raw.jsonl
: >"$RAW"
log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

scripts/install-test-deps.sh apt python azurite >&2
cargo build --release --locked -p registry-benches --bin load
cargo build --release --locked -p registry-examples --example serve

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-scaleout.XXXXXX")
PIDS=()
SERVES=()
cleanup() {
    local pid
    # `|| true`: under `set -e` a process already gone would end the clean-up early.
    for pid in "${SERVES[@]}" "${PIDS[@]}" $BUCKET_PID; do
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port, wait_port, init_postgres, start_postgres, create_database
source "$ROOT/scripts/e2e/lib.sh"

# start_bucket: a fresh emulator for one setup (they slow down as they fill, so no
# setup inherits another's objects); sets BUCKET_URL and BUCKET_PID.
start_bucket() {
    if [ "$BUCKET" = s3 ]; then
        MOTO_PORT=$(free_port)
        "$ROOT/.test-deps/venv/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
        BUCKET_PID=$!
        wait_port "$MOTO_PORT" moto "$WORK/moto.log"
        curl -sf -X PUT "http://127.0.0.1:$MOTO_PORT/bench" >/dev/null
        export AWS_ENDPOINT=http://127.0.0.1:$MOTO_PORT AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
            AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
        BUCKET_URL=s3://bench
    else
        AZ_PORT=$(free_port)
        "$ROOT/.test-deps/azurite/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$AZ_PORT" \
            --inMemoryPersistence --skipApiVersionCheck --silent >"$WORK/azurite.log" 2>&1 &
        BUCKET_PID=$!
        wait_port "$AZ_PORT" azurite "$WORK/azurite.log"
        export AZURE_STORAGE_USE_EMULATOR=true AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:$AZ_PORT
        # The container, created with one request signed with the emulator's public key.
        python3 - "$AZ_PORT" <<'PY'
import base64, hashlib, hmac, sys, urllib.request
from email.utils import formatdate
port = sys.argv[1]
key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
date, version, account = formatdate(usegmt=True), "2021-08-06", "devstoreaccount1"
to_sign = ("PUT\n" + "\n" * 11 + f"x-ms-date:{date}\nx-ms-version:{version}\n"
           f"/{account}/{account}/bench\nrestype:container")
sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest())
req = urllib.request.Request(f"http://127.0.0.1:{port}/{account}/bench?restype=container", method="PUT",
    headers={"x-ms-date": date, "x-ms-version": version,
             "Authorization": f"SharedKey {account}:{sig.decode()}", "Content-Length": "0"})
assert urllib.request.urlopen(req).status == 201
PY
        BUCKET_URL=az://bench
    fi
}
stop_bucket() {
    kill -9 "$BUCKET_PID" 2>/dev/null || true
    wait "$BUCKET_PID" 2>/dev/null || true
    BUCKET_PID=
}
BUCKET_PID=

init_postgres "$WORK"
start_postgres
PIDS+=("$PG_PID")

N=0
# run_setup NAME PROCESSES STORAGE [FLAGS...]: one round of one setup; one JSON line
# per workload into $RAW.
run_setup() {
    local name=$1 procs=$2 storage=$3 i port
    shift 3
    N=$((N + 1))
    local flags=("$@")
    case "$storage" in
    bucket)
        start_bucket
        storage=$BUCKET_URL/run$N
        ;;
    fs) flags+=(--data-dir "$WORK/fs$N") ;;
    esac
    if [ "${flags[0]:-}" = pg ]; then
        create_database "run$N"
        flags=(--metadata "postgres://registry@127.0.0.1:$PG_PORT/run$N")
    fi
    local urls=()
    SERVES=()
    for ((i = 0; i < procs; i++)); do
        port=$(free_port)
        "$SERVE" --addr "127.0.0.1:$port" --storage "$storage" --no-access-log "${flags[@]}" \
            >"$WORK/serve-$N-$i.log" 2>&1 &
        SERVES+=($!)
        wait_port "$port" serve "$WORK/serve-$N-$i.log"
        urls+=("http://127.0.0.1:$port")
    done
    sync
    local workload count
    for workload in manifest-put manifest-get-tag; do
        count=$PUTS
        [ "$workload" = manifest-put ] || count=$GETS
        local outs=()
        local lpids=()
        for ((i = 0; i < procs; i++)); do
            # manifest-get-tag reads the tags manifest-put wrote: t00000.. up to PUTS-1.
            local spread=()
            [ "$workload" = manifest-put ] || spread=(--spread "$PUTS")
            "$LOAD" --url "${urls[$i]}" --workload "$workload" --count "$count" --concurrency "$CONC" \
                --seed $((21 + i)) --repo "bench/p$i" "${spread[@]}" --max-seconds 120 \
                >"$WORK/load-$N-$i.json" &
            lpids+=($!)
            outs+=("$WORK/load-$N-$i.json")
        done
        for pid in "${lpids[@]}"; do wait "$pid"; done
        jq -cs --arg setup "$name" --arg w "$workload" --argjson procs "$procs" \
            '{setup: $setup, workload: $w, processes: $procs,
              ops: (map(.ops) | add), errors: (map(.errors) | add),
              ops_per_s: ((map(.ops) | add) / (map(.seconds) | max)),
              p50_ms: (map(.p50_ms) | max), p99_ms: (map(.p99_ms) | max)}' "${outs[@]}" | tee -a "$RAW" >&2
    done
    for pid in "${SERVES[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    SERVES=()
    [ -z "$BUCKET_PID" ] || stop_bucket
}

for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r of $ROUNDS"
    for setup in $SETUPS; do
        case $setup in
        fs) run_setup fs 1 fs ;;
        log-1) run_setup log-1 1 bucket ;;
        log-3) run_setup log-3 3 bucket ;;
        pg-1) run_setup pg-1 1 bucket pg ;;
        pg-3) run_setup pg-3 3 bucket pg ;;
        *) echo "unknown setup $setup" >&2; exit 2 ;;
        esac
    done
done

# Startup at scale (benches/metadata_startup.rs): open + first GET with STARTUP_MANIFESTS
# manifests stored, PostgreSQL (this cluster) against the bucket log and fs.
if [ "${STARTUP_MANIFESTS:-100000}" != 0 ]; then
    log "startup at ${STARTUP_MANIFESTS:-100000} manifests"
    create_database startup
    STARTUP_PG_URL=postgres://registry@127.0.0.1:$PG_PORT/startup \
        cargo bench --locked -p registry-benches --bench metadata_startup | tee "$OUT/startup.md"
fi

# The table: medians over rounds, ratios against pg-1 (or the first setup run).
python3 - "$RAW" "$OUT/scaleout.md" "$PUTS" "$GETS" "$ROUNDS" <<'EOF'
import json, statistics, sys
raw, out, puts, gets, rounds = sys.argv[1:]
rows = [json.loads(l) for l in open(raw) if l.strip()]
setups = [s for s in ["fs", "log-1", "log-3", "pg-1", "pg-3"] if any(r["setup"] == s for r in rows)]
base = "pg-1" if "pg-1" in setups else setups[0]
med = {}
for s in setups:
    for w in ("manifest-put", "manifest-get-tag"):
        v = [r["ops_per_s"] for r in rows if r["setup"] == s and r["workload"] == w]
        e = sum(r["errors"] for r in rows if r["setup"] == s and r["workload"] == w)
        med[s, w] = (statistics.median(v) if v else float("nan"), e)
lines = [f"# Scale-out: manifest ops/s (medians of {rounds} rounds; {puts} PUTs and {gets} GETs per process, concurrency 4 each)", "",
         f"| setup | PUT ops/s | GET ops/s | PUT vs {base} | GET vs {base} | errors |", "|---|---:|---:|---:|---:|---:|"]
for s in setups:
    p, pe = med[s, "manifest-put"]
    g, ge = med[s, "manifest-get-tag"]
    bp, bg = med[base, "manifest-put"][0], med[base, "manifest-get-tag"][0]
    lines.append(f"| {s} | {p:,.0f} | {g:,.0f} | {p / bp:.2f} | {g / bg:.2f} | {pe + ge} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
