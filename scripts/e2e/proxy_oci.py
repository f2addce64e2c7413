#!/usr/bin/env python3
"""Images and pushes for scripts/e2e-proxy.sh (standard library only, loopback only).

    proxy_oci.py layout DIR [--big-mib N] [--big REF,...]
        Writes an OCI image layout to DIR with these references, all random content
        (gzip layers that are real tar files, configs whose diff_ids match, so podman
        can store them):
          app-v1, app-v2  single-platform linux/amd64 images, one small layer each
          multi-v1        an image index: linux/amd64 and linux/arm64, each with its own
                          config and layer
          --big REFs      (default big-v1,flaky-v1,bench-v1) images with one layer
                          holding N MiB of random bytes each
        and prints a JSON summary on stdout: per reference its manifest digest, config,
        layers (and for multi-v1 the same per platform).

    proxy_oci.py burst --target HOST:PORT --prefix P --threads N --seconds S --acked FILE
                       [--pause SECONDS]
        Pushes small distinct images (layer, config, manifest under a new tag) to
        repositories P0..P3 until S seconds have passed, each thread pausing between
        images (default 0.05 s). Each manifest PUT answered 201
        is appended to FILE as a JSON line {repo, tag, digest}. A connection error or a
        5xx (the registry killed or restarting) abandons that image, never recorded.
        Prints {"acked": .., "abandoned": .., "wrong": ..}; exit 1 if anything was
        answered wrongly or nothing was acknowledged.

    proxy_oci.py mirrored --acked FILE --wait S --remote URL CREDS_FILE FROM TO [...]
        Waits up to S seconds until every acknowledged image is on every remote: GET
        URL/v2/<repo with prefix FROM replaced by TO>/manifests/<tag> (Basic auth from
        CREDS_FILE, first line USER:PASSWORD) answers 200 with the acknowledged digest.
        Prints one line per remote; exit 1 if any image is missing or different.
"""

import argparse
import base64
import gzip
import io
import json
import os
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scaleout import Clean, Conn, Wrong, burst, sha  # noqa: E402

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX,
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])


def tar_of(name, content):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        info.mode = 0o644
        info.mtime = 0
        t.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def image(content, name, arch="amd64", ident=""):
    """(manifest bytes, {digest: blob bytes}) of an image with one layer holding
    `content` as file `name`."""
    tar = tar_of(name, content)
    layer = gzip.compress(tar, compresslevel=1, mtime=0)
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Labels": {"e2e.id": ident}},
        "rootfs": {"type": "layers", "diff_ids": [sha(tar)]},
        "history": [{"created_by": f"e2e-proxy {ident}"}],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZ, "digest": sha(layer), "size": len(layer)}],
    }, sort_keys=True).encode()
    return manifest, {sha(config): config, sha(layer): layer}


def layout(args):
    d = args.dir
    os.makedirs(os.path.join(d, "blobs", "sha256"), exist_ok=True)

    def put(data):
        digest = sha(data)
        with open(os.path.join(d, "blobs", "sha256", digest[7:]), "wb") as f:
            f.write(data)
        return digest

    refs, summary = [], {}

    def add_image(ref, content, fname, arch="amd64"):
        manifest, blobs = image(content, fname, arch, ref)
        for b in blobs.values():
            put(b)
        digest = put(manifest)
        m = json.loads(manifest)
        info = {"digest": digest, "size": len(manifest), "config": m["config"]["digest"],
                "layers": [l["digest"] for l in m["layers"]]}
        if ref:
            refs.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
                         "annotations": {"org.opencontainers.image.ref.name": ref}})
            summary[ref] = info
        return info

    add_image("app-v1", os.urandom(100_000), "app.bin")
    add_image("app-v2", os.urandom(120_000), "app.bin")
    plats = {}
    for arch in ("amd64", "arm64"):
        plats[arch] = add_image(None, os.urandom(150_000), f"{arch}.bin", arch)
    index = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": plats[a]["digest"],
                       "size": plats[a]["size"],
                       "platform": {"architecture": a, "os": "linux"}} for a in ("amd64", "arm64")],
    }, sort_keys=True).encode()
    idx = put(index)
    refs.append({"mediaType": OCI_INDEX, "digest": idx, "size": len(index),
                 "annotations": {"org.opencontainers.image.ref.name": "multi-v1"}})
    summary["multi-v1"] = {"digest": idx, **plats}
    for ref in filter(None, args.big.split(",")):
        add_image(ref, os.urandom(args.big_mib << 20), "big.bin")
    with open(os.path.join(d, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(d, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": refs}, f)
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


# ---------------------------------------------------------------- burst of pushes
def upload(c, target, repo, blob):
    resp, data = c.request(target, "POST", f"/v2/{repo}/blobs/uploads/", b"",
                           {"Content-Length": "0"})
    if resp.status != 202:
        raise Wrong(f"POST upload in {repo}: {resp.status} {data[:200]!r}")
    loc = resp.getheader("Location") or ""
    if loc.startswith("http"):
        loc = "/" + loc.split("/", 3)[3]
    loc += ("&" if "?" in loc else "?") + "digest=" + sha(blob)
    resp, data = c.request(target, "PUT", loc, blob, {
        "Content-Type": "application/octet-stream", "Content-Length": str(len(blob))})
    if resp.status != 201:
        raise Wrong(f"PUT upload in {repo}: {resp.status} {data[:200]!r}")


def burst_command(args):
    """Images with real tar layers (skopeo pulls some of them later), through
    scaleout.py's burst loop."""
    def push_one(c, rng, n, i):
        repo = f"{args.prefix}{rng.randrange(4)}"
        tag = f"t{os.getpid()}-{n}-{i}"
        manifest, blobs = image(os.urandom(rng.randrange(20_000, 60_000)), "f.bin",
                                ident=f"{repo}:{tag}")
        for b in blobs.values():
            upload(c, args.target, repo, b)
        resp, data = c.request(args.target, "PUT", f"/v2/{repo}/manifests/{tag}", manifest, {
            "Content-Type": OCI_MANIFEST, "Content-Length": str(len(manifest))})
        if resp.status != 201:
            raise Wrong(f"manifest PUT {repo}:{tag}: {resp.status} {data[:200]!r}")
        return {"repo": repo, "tag": tag, "digest": sha(manifest)}

    return burst(args.threads, args.seconds, args.acked, f"{args.prefix}-{os.getpid()}",
                 push_one, pause=args.pause)


# ---------------------------------------------------------------- mirrored everywhere?
def mirrored(args):
    acked = []
    with open(args.acked, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                acked.append(json.loads(line))
    if not acked:
        print("nothing was acknowledged")
        return 1
    remotes = []
    for url, creds_file, src, dst in args.remote:
        with open(creds_file, encoding="utf-8") as f:
            creds = f.readline().strip()
        remotes.append({
            "url": url, "src": src, "dst": dst,
            "auth": "Basic " + base64.b64encode(creds.encode()).decode(),
            "target": url.split("://", 1)[1].rstrip("/"), "conn": Conn(),
            "missing": {(r["repo"], r["tag"]): r["digest"] for r in acked},
            "wrong": {}, "took": None,
        })
    start = time.monotonic()
    deadline = start + args.wait
    while True:
        for r in remotes:
            if not r["missing"]:
                continue
            for (repo, tag), digest in list(r["missing"].items()):
                name = r["dst"] + repo[len(r["src"]):] if repo.startswith(r["src"]) else repo
                try:
                    resp, data = r["conn"].request(r["target"], "GET", f"/v2/{name}/manifests/{tag}", headers={
                        "Accept": ACCEPT, "Authorization": r["auth"]})
                except Clean:
                    break  # the remote is restarting: next round
                if resp.status == 404:
                    continue
                del r["missing"][(repo, tag)]
                if resp.status != 200:
                    r["wrong"][(name, tag)] = f"status {resp.status}"
                elif sha(data) != digest:
                    r["wrong"][(name, tag)] = sha(data)
            if not r["missing"]:
                r["took"] = time.monotonic() - start
        if all(not r["missing"] for r in remotes) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ok = True
    for r in remotes:
        when = f"after {r['took']:.1f}s" if r["took"] is not None else f"after {args.wait:.0f}s"
        print(f"{r['url']} ({r['src']} -> {r['dst']}): {len(acked) - len(r['missing'])} of {len(acked)} "
              f"acknowledged images present {when}, {len(r['wrong'])} different")
        if r["missing"]:
            ok = False
            print(f"  missing, e.g. {sorted(r['missing'])[:3]}")
        if r["wrong"]:
            ok = False
            print(f"  different, e.g. {sorted(r['wrong'].items())[:3]}")
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("layout")
    a.add_argument("dir")
    a.add_argument("--big-mib", type=int, default=64)
    a.add_argument("--big", default="big-v1,flaky-v1,bench-v1")
    b = sub.add_parser("burst")
    b.add_argument("--target", required=True)
    b.add_argument("--prefix", required=True)
    b.add_argument("--threads", type=int, default=3)
    b.add_argument("--seconds", type=float, required=True)
    b.add_argument("--acked", required=True)
    b.add_argument("--pause", type=float, default=0.05)
    m = sub.add_parser("mirrored")
    m.add_argument("--acked", required=True)
    m.add_argument("--wait", type=float, default=60)
    m.add_argument("--remote", nargs=4, action="append", required=True,
                   metavar=("URL", "CREDS_FILE", "FROM", "TO"))
    args = p.parse_args()
    return {"layout": layout, "burst": burst_command, "mirrored": mirrored}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
