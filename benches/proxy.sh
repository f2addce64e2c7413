#!/usr/bin/env bash
# The pull-through cache, side by side with pulling from its upstream directly: CNCF
# Distribution (Debian's docker-registry) holds an image with a 64 MiB and a 1 MiB
# layer; our `serve --proxy` caches it. See benches/README.md.
#
#   bash benches/proxy.sh            # 5 rounds, about a minute
#
# Each round starts a fresh proxy (fresh data dir) and measures, alternating:
#   direct   GET of each layer and 200 manifest GETs from Distribution
#   first    the same through the proxy, nothing cached (fetch + spool + store)
#   cached   the same again through the proxy (served from its fs store)
# Reported: medians, and ratios cached/direct (throughput, higher is better) and
# first/direct (time, the first pull's overhead). Everything on 127.0.0.1; every
# process started here is stopped by PID.
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-5}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SERVE=$TARGET_DIR/release/examples/serve
log() { echo "[proxy-bench] $*" >&2; }

source "$ROOT/scripts/e2e/lib.sh"
if ! command -v docker-registry >/dev/null 2>&1; then
    log "installing CNCF Distribution (Debian docker-registry)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry >/dev/null
fi
log "building serve (release)"
cargo build --release --locked --example serve -q

WORK=$(mktemp -d "${TMPDIR:-/tmp}/registry-bench-proxy.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT

D_PORT=$(free_port)
mkdir -p "$WORK/dist"
cat >"$WORK/dist.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/dist
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$D_PORT
EOF
docker-registry serve "$WORK/dist.yml" >"$WORK/dist.log" 2>&1 &
PIDS+=($!)
wait_port "$D_PORT" Distribution "$WORK/dist.log"

# Push the image (python: no client needed); prints the layer digests and the tag.
python3 - "http://127.0.0.1:$D_PORT" >"$WORK/digests" <<'EOF'
import hashlib, json, os, sys, urllib.request
base = sys.argv[1]
def req(method, url, data=None, headers={}):
    r = urllib.request.Request(url if url.startswith("http") else base + url, data=data, method=method, headers=headers)
    return urllib.request.urlopen(r)
def blob(data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    loc = req("POST", "/v2/bench/app/blobs/uploads/").headers["Location"]
    req("PUT", loc + ("&" if "?" in loc else "?") + "digest=" + d, data, {"Content-Type": "application/octet-stream"})
    return d
cfg = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
big, small = os.urandom(64 << 20), os.urandom(1 << 20)
c, b, s = blob(cfg), blob(big), blob(small)
m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": len(cfg)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n}
               for d, n in ((b, len(big)), (s, len(small)))]}).encode()
req("PUT", "/v2/bench/app/manifests/v1", m, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
print(b, s)
EOF
read -r BIG SMALL <"$WORK/digests"

# One measurement: seconds for a blob GET (whole body, discarded), checked for size.
blob_seconds() {
    curl -sf -o /dev/null -w '%{time_total} %{size_download}' "$1" | awk '{print $1}'
}
# Seconds per manifest GET, over N sequential GETs on one connection.
manifest_seconds() {
    python3 - "$1" "$2" <<'EOF'
import http.client, sys, time, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
n = int(sys.argv[2])
conn = http.client.HTTPConnection(u.hostname, u.port)
accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
conn.request("GET", "/v2/", headers=accept); conn.getresponse().read()
t0 = time.perf_counter()
for _ in range(n):
    conn.request("GET", u.path, headers=accept)
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
print((time.perf_counter() - t0) / n)
EOF
}

RAW=$WORK/raw
: >"$RAW"
for ((round = 1; round <= ROUNDS; round++)); do
    P_PORT=$(free_port)
    mkdir -p "$WORK/p$round"
    "$SERVE" --addr "127.0.0.1:$P_PORT" --data-dir "$WORK/p$round" --no-access-log \
        --proxy "mirror=http://127.0.0.1:$D_PORT,ttl=1h" >"$WORK/p$round.log" 2>&1 &
    P_PID=$!
    PIDS+=("$P_PID")
    wait_port "$P_PORT" proxy "$WORK/p$round.log"
    direct=http://127.0.0.1:$D_PORT/v2/bench/app
    proxy=http://127.0.0.1:$P_PORT/v2/mirror/bench/app
    for kind in direct first cached; do
        case $kind in direct) base=$direct ;; *) base=$proxy ;; esac
        # The manifest first, as a client pulls; "first" is the one GET that fetches it.
        n=200
        [ "$kind" = first ] && n=1
        m=$(manifest_seconds "$base/manifests/v1" "$n")
        echo "$kind manifest $m" >>"$RAW"
        echo "$kind blob64 $(blob_seconds "$base/blobs/$BIG")" >>"$RAW"
        echo "$kind blob1 $(blob_seconds "$base/blobs/$SMALL")" >>"$RAW"
        if [ "$kind" = first ]; then
            # The store task runs after the last reader: wait until the proxy holds it.
            for ((i = 0; i < 100; i++)); do
                [ -n "$(find "$WORK/p$round" -type f -size +60M 2>/dev/null | head -n 1)" ] && break
                sleep 0.1
            done
        fi
    done
    kill "$P_PID"; wait "$P_PID" 2>/dev/null || true
    log "round $round done"
done

python3 - "$RAW" "$ROUNDS" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {}
for kind in ("direct", "first", "cached"):
    for what in ("manifest", "blob64", "blob1"):
        med[kind, what] = statistics.median(float(v) for k, w, v in rows if k == kind and w == what)
size = {"blob64": 64, "blob1": 1}
print(f"# pull-through cache vs Distribution directly, medians of {sys.argv[2]} rounds")
print("| workload | direct | first (uncached) | cached | cached/direct throughput | first/direct time |")
print("|---|---|---|---|---|---|")
for what in ("blob64", "blob1"):
    d, f, c = (med[k, what] for k in ("direct", "first", "cached"))
    mb = size[what]
    print(f"| GET {mb} MiB blob | {mb/d:.0f} MiB/s | {mb/f:.0f} MiB/s | {mb/c:.0f} MiB/s | {d/c:.2f}x | {f/d:.2f}x |")
d, f, c = (med[k, "manifest"] for k in ("direct", "first", "cached"))
print(f"| GET manifest (first: one GET; else mean of 200) | {d*1e3:.2f} ms | {f*1e3:.2f} ms | {c*1e3:.2f} ms | {d/c:.2f}x | {f/d:.2f}x |")
EOF
