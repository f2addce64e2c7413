#!/usr/bin/env bash
# Regenerates the committed seed corpora (fuzz/corpus/<target>/) from a real image
# built with umoci and real client traffic: skopeo pushing, copying (cross-repository
# mount), pulling and deleting through a recording proxy (record_trace.py) in front of
# the reference registry (Debian's docker-registry). Needs umoci, skopeo,
# docker-registry and python3; everything listens on 127.0.0.1 and stops at exit.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A small image: one layer holding one file.
umoci init --layout "$tmp/layout"
umoci new --image "$tmp/layout:v1"
printf 'hello from a fuzz seed\n' > "$tmp/hello.txt"
umoci insert --image "$tmp/layout:v1" "$tmp/hello.txt" /hello.txt
umoci config --image "$tmp/layout:v1" --config.cmd /hello.txt \
    --config.label org.example.seed=yes

reg_port=$(free_port)
cat > "$tmp/registry.yml" <<YML
version: 0.1
log: {level: error}
storage:
  filesystem: {rootdirectory: $tmp/registry}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$reg_port}
YML
docker-registry serve "$tmp/registry.yml" > "$tmp/registry.log" 2>&1 &
pids+=($!)
proxy_port=$(free_port)
python3 record_trace.py "$proxy_port" "$reg_port" "$tmp/current.jsonl" &
pids+=($!)
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$proxy_port/v2/" > /dev/null && break
    sleep 0.1
done

reg=127.0.0.1:$proxy_port
phase() { # name, then the command whose traffic it records
    local name=$1
    shift
    rm -f "$tmp/current.jsonl"
    "$@"
    mv "$tmp/current.jsonl" "traces/$name.jsonl"
}
mkdir -p traces
phase push-oci skopeo copy -q --dest-tls-verify=false "oci:$tmp/layout:v1" "docker://$reg/seed/img:v1"
phase push-docker skopeo copy -q --dest-tls-verify=false --format v2s2 "oci:$tmp/layout:v1" "docker://$reg/seed/docker:v1"
phase copy-mount skopeo copy -q --src-tls-verify=false --dest-tls-verify=false "docker://$reg/seed/img:v1" "docker://$reg/seed/copy:v2"
phase pull skopeo copy -q --src-tls-verify=false "docker://$reg/seed/img:v1" "oci:$tmp/pulled:v1"
phase delete skopeo delete --tls-verify=false "docker://$reg/seed/copy:v2"

# inspect_manifest: every JSON document of the image layouts (manifests, configs,
# layout indexes) and the manifests skopeo pushed.
# Crash inputs kept as regression seeds (`regression-*`) stay.
for t in inspect_manifest parse_inputs parse_ranges http_router; do
    mkdir -p "corpus/$t"
    find "corpus/$t" -type f ! -name 'regression-*' -delete
done
for f in "$tmp"/layout/index.json "$tmp"/layout/blobs/sha256/* "$tmp"/pulled/index.json "$tmp"/pulled/blobs/sha256/*; do
    if python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$f" 2> /dev/null; then
        cp "$f" "corpus/inspect_manifest/$(sha256sum "$f" | cut -c1-16)"
    fi
done
python3 - <<'PY'
import glob, hashlib, json, os, struct

def put(target, data):
    name = hashlib.sha256(data).hexdigest()[:16]
    with open(os.path.join("corpus", target, name), "wb") as f:
        f.write(data)

requests = [json.loads(l) for t in sorted(glob.glob("traces/*.jsonl")) for l in open(t)]
for r in requests:
    if r["method"] == "PUT" and "/manifests/" in r["path"]:
        put("inspect_manifest", bytes.fromhex(r["body"]))
    # Names, tags and digests as real clients send them.
    parts = r["path"].split("/")
    for marker in ("blobs", "manifests", "tags", "referrers"):
        if marker in parts:
            i = parts.index(marker)
            put("parse_inputs", "/".join(parts[2:i]).encode())
            if i + 1 < len(parts) and parts[i + 1] not in ("uploads", "list"):
                put("parse_inputs", parts[i + 1].encode())
    for k, v in r["headers"].items():
        if k.lower() in ("content-range", "range"):
            put("parse_ranges", struct.pack("<Q", 1000) + v.encode())
for v in ["bytes=0-0", "bytes=0-", "bytes=-1", "bytes=10-5", "0-1023", "bytes 0-9/10"]:
    put("parse_ranges", struct.pack("<Q", 10) + v.encode())
# http_router: the first byte picks a recorded trace to replay before the fuzzed
# requests (1-based, in sorted file order; 0 replays none).
for i, _ in enumerate(sorted(glob.glob("traces/*.jsonl"))):
    put("http_router", bytes([i + 1]))
PY
ls traces corpus/*
