"""Concurrent pushes and reads through several registry processes that share one
storage, while the caller kills processes and restarts the database under them.

    scaleout.py run --targets HOST:PORT,... --seconds S --acked FILE --report FILE
    scaleout.py verify --targets HOST:PORT,... --acked FILE

`run` pushes images (a config and a layer; the layer's chunked upload is started,
continued and finished on three different processes, the manifest PUT on a fourth
pick) from several threads until S seconds have passed, and appends every manifest
acknowledged with 201 to FILE as a JSON line. Reader threads meanwhile GET
acknowledged manifests by tag from random processes. Every answer is classified:
  - clean: the expected success; a 5xx, a 429, or a connection error (a killed
    process, the database down). A failed step abandons its image (no client retries
    a half-pushed image here; a later image starts afresh);
  - wrong: any other status, a manifest read back with other bytes, a digest header
    that differs, a 404 for an acknowledged tag.
The report (JSON) counts both; the caller fails the test on any wrong answer.

`verify` reads every acknowledged image back from every target (manifest by tag,
bytes compared; config and layer by digest, sha256 checked) and prints one line of
counts; it exits non-zero if anything is missing or differs.

Standard library only; loopback only."""
import argparse
import hashlib
import http.client
import json
import os
import random
import sys
import threading
import time

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


class Clean(Exception):
    """An answer a client must expect from a registry in trouble: retry later."""

    def __init__(self, message, kind):
        super().__init__(message)
        self.kind = kind  # the status code, or the connection error's name


class Wrong(Exception):
    """An answer that is not true of the registry's state, or a refusal with no cause."""


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Conn:
    """One keep-alive connection per (thread, target); reopened after any error."""

    def __init__(self):
        self.conns = {}

    def request(self, target, method, path, body=None, headers=None):
        conn = self.conns.get(target)
        if conn is None:
            host, port = target.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            self.conns[target] = conn
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            del self.conns[target]
            raise Clean(f"{method} {path} on {target}: {type(e).__name__}: {e}", type(e).__name__)
        if resp.status >= 500 or resp.status == 429:
            raise Clean(f"{method} {path} on {target}: {resp.status}: {data[:200]!r}", str(resp.status))
        return resp, data


def expect(resp, data, status, what):
    if resp.status != status:
        raise Wrong(f"{what}: {resp.status} (expected {status}): {data[:300]!r}")


def location(resp, target):
    loc = resp.getheader("Location")
    if not loc:
        raise Wrong(f"no Location from {target}")
    if loc.startswith("http"):
        loc = "/" + loc.split("/", 3)[3]
    return loc


def with_digest(loc, digest):
    return loc + ("&" if "?" in loc else "?") + "digest=" + digest


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.wrong = []
        self.clean_samples = []
        self.by_kind = {}

    def add(self, key, n=1):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def clean(self, e):
        with self.lock:
            self.counts["clean_errors"] = self.counts.get("clean_errors", 0) + 1
            self.by_kind[e.kind] = self.by_kind.get(e.kind, 0) + 1
            if len(self.clean_samples) < 10 or (e.kind[0].isdigit() and len(self.clean_samples) < 20):
                self.clean_samples.append(str(e))

    def bad(self, e):
        with self.lock:
            self.counts["wrong_answers"] = self.counts.get("wrong_answers", 0) + 1
            if len(self.wrong) < 20:
                self.wrong.append(str(e))


def burst(threads, seconds, acked_path, seed, push_one, pause=0.0):
    """Runs `threads` pushers until `seconds` have passed: each calls
    push_one(conn, rng, thread, i) with its own connection and seeded rng, for i = 1, 2,
    ... A push that returns its record {repo, tag, digest} (its manifest acknowledged)
    is appended to `acked_path` as a JSON line; one that raises Clean (the registry in
    trouble) is abandoned and counted; Wrong is counted and printed. Prints the counts;
    returns the exit status: 1 if any answer was wrong or nothing was acknowledged.
    Shared by notify.py and proxy_oci.py (their pushes differ, not the loop)."""
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    counts = {"acked": 0, "abandoned": 0, "wrong": 0}
    out = open(acked_path, "a", buffering=1, encoding="utf-8")

    def worker(n):
        rng = random.Random(f"{seed}-{n}")
        c = Conn()
        i = 0
        while time.monotonic() < deadline:
            i += 1
            try:
                rec = push_one(c, rng, n, i)
            except Clean:
                with lock:
                    counts["abandoned"] += 1
                time.sleep(0.2)
                continue
            except Wrong as e:
                with lock:
                    counts["wrong"] += 1
                print(f"wrong answer: {e}", file=sys.stderr)
                continue
            with lock:
                counts["acked"] += 1
                out.write(json.dumps({"repo": rec["repo"], "tag": rec["tag"],
                                      "digest": rec["digest"]}) + "\n")
            if pause:
                time.sleep(pause)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.close()
    print(json.dumps(counts))
    return 0 if counts["wrong"] == 0 and counts["acked"] > 0 else 1


def push_image(c, targets, rng, repo, tag, ident):
    """Pushes one image; returns its record once the manifest PUT is acknowledged."""
    pick = lambda: rng.choice(targets)  # noqa: E731
    layer = os.urandom(rng.randrange(40_000, 200_000))
    layer_digest = sha(layer)
    half = len(layer) // 2
    # The layer: started on one process, each chunk through another, finished on a third.
    t = pick()
    resp, data = c.request(t, "POST", f"/v2/{repo}/blobs/uploads/", b"", {"Content-Length": "0"})
    expect(resp, data, 202, f"POST upload on {t}")
    loc = location(resp, t)
    for start, chunk in ((0, layer[:half]), (half, layer[half:])):
        t = pick()
        resp, data = c.request(t, "PATCH", loc, chunk, {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{start}-{start + len(chunk) - 1}",
            "Content-Length": str(len(chunk)),
        })
        expect(resp, data, 202, f"PATCH {start}+{len(chunk)} on {t}")
        loc = location(resp, t)
    t = pick()
    resp, data = c.request(t, "PUT", with_digest(loc, layer_digest), b"", {"Content-Length": "0"})
    expect(resp, data, 201, f"PUT (finish upload) on {t}")
    # The config: one monolithic POST.
    config = json.dumps({"architecture": "amd64", "os": "linux", "id": ident}).encode()
    config_digest = sha(config)
    t = pick()
    resp, data = c.request(t, "POST", f"/v2/{repo}/blobs/uploads/?digest={config_digest}", config, {
        "Content-Type": "application/octet-stream", "Content-Length": str(len(config))})
    expect(resp, data, 201, f"monolithic POST on {t}")
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": len(layer)}],
    }).encode()
    digest = sha(manifest)
    t = pick()
    resp, data = c.request(t, "PUT", f"/v2/{repo}/manifests/{tag}", manifest, {
        "Content-Type": MANIFEST, "Content-Length": str(len(manifest))})
    expect(resp, data, 201, f"manifest PUT on {t}")
    if resp.getheader("Docker-Content-Digest") != digest:
        raise Wrong(f"manifest PUT on {t} acknowledged {resp.getheader('Docker-Content-Digest')}, pushed {digest}")
    return {"repo": repo, "tag": tag, "digest": digest, "config": config_digest,
            "layer": layer_digest, "by": t}


def pusher(n, args, targets, start, deadline, stats, acked, acked_lock, out):
    rng = random.Random(n)
    c = Conn()
    i = 0
    while time.monotonic() < deadline:
        i += 1
        # Images in a few repositories shared by the threads, and a scratch repository
        # whose images are deleted again, so the collector has something to remove.
        scratch = i % 5 == 0
        repo = f"scale/scratch{n}" if scratch else f"scale/app{rng.randrange(4)}"
        tag = f"p{n}-{i}"
        try:
            rec = push_image(c, targets, rng, repo, tag, f"{n}-{i}-{rng.random()}")
        except Clean as e:
            stats.clean(e)
            stats.add("pushes_abandoned")
            time.sleep(0.05)
            continue
        except Wrong as e:
            stats.bad(e)
            continue
        stats.add("pushes_acknowledged")
        # When, in seconds from the start: the script checks that pushes went on in
        # each phase of its timeline (how many depends on the machine's speed).
        rec["t"] = round(time.monotonic() - start, 2)
        if scratch:
            t = rng.choice(targets)
            try:
                resp, data = c.request(t, "DELETE", f"/v2/{repo}/manifests/{rec['digest']}")
                expect(resp, data, 202, f"DELETE manifest on {t}")
                stats.add("deletes")
            except Clean as e:
                stats.clean(e)
            except Wrong as e:
                stats.bad(e)
            continue
        with acked_lock:
            acked.append(rec)
            out.write(json.dumps(rec) + "\n")
            out.flush()


def reader(n, targets, deadline, stats, acked, acked_lock):
    rng = random.Random(1000 + n)
    c = Conn()
    while time.monotonic() < deadline:
        with acked_lock:
            rec = rng.choice(acked) if acked else None
        if rec is None:
            time.sleep(0.05)
            continue
        t = rng.choice(targets)
        try:
            resp, data = c.request(t, "GET", f"/v2/{rec['repo']}/manifests/{rec['tag']}",
                                   headers={"Accept": MANIFEST})
            expect(resp, data, 200, f"GET acknowledged {rec['repo']}:{rec['tag']} on {t}")
            if sha(data) != rec["digest"]:
                raise Wrong(f"{rec['repo']}:{rec['tag']} on {t} has {sha(data)}, acknowledged {rec['digest']}")
            stats.add("reads_ok")
        except Clean as e:
            stats.clean(e)
            time.sleep(0.05)
        except Wrong as e:
            stats.bad(e)


def run(args):
    targets = args.targets.split(",")
    start = time.monotonic()
    deadline = start + args.seconds
    stats = Stats()
    acked, acked_lock = [], threading.Lock()
    with open(args.acked, "a") as out:
        threads = [threading.Thread(target=pusher, args=(n, args, targets, start, deadline, stats, acked, acked_lock, out))
                   for n in range(args.pushers)]
        threads += [threading.Thread(target=reader, args=(n, targets, deadline, stats, acked, acked_lock))
                    for n in range(args.readers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    report = {"counts": stats.counts, "clean_by_kind": stats.by_kind, "wrong": stats.wrong,
              "clean_samples": stats.clean_samples}
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(stats.counts), json.dumps(stats.by_kind))
    return 0


def verify(args):
    targets = args.targets.split(",")
    with open(args.acked) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    c = Conn()
    problems = []
    checked = 0
    for t in targets:
        for rec in recs:
            try:
                resp, data = c.request(t, "GET", f"/v2/{rec['repo']}/manifests/{rec['tag']}",
                                       headers={"Accept": MANIFEST})
                expect(resp, data, 200, f"manifest {rec['repo']}:{rec['tag']} on {t}")
                if sha(data) != rec["digest"]:
                    raise Wrong(f"{rec['repo']}:{rec['tag']} on {t}: {sha(data)}, acknowledged {rec['digest']}")
                for blob in (rec["config"], rec["layer"]):
                    resp, data = c.request(t, "GET", f"/v2/{rec['repo']}/blobs/{blob}")
                    expect(resp, data, 200, f"blob {blob} of {rec['repo']}:{rec['tag']} on {t}")
                    if sha(data) != blob:
                        raise Wrong(f"blob {blob} on {t} has {sha(data)}")
                checked += 1
            except (Clean, Wrong) as e:
                problems.append(str(e))
    for p in problems[:20]:
        print("problem:", p)
    print(f"verified {checked} of {len(recs) * len(targets)} image reads "
          f"({len(recs)} acknowledged images x {len(targets)} processes), {len(problems)} problems")
    return 0 if recs and not problems else 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["run", "verify"])
    p.add_argument("--targets", required=True)
    p.add_argument("--acked", required=True)
    p.add_argument("--report")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--pushers", type=int, default=6)
    p.add_argument("--readers", type=int, default=2)
    args = p.parse_args()
    for t in args.targets.split(","):
        if not t.startswith("127.0.0.1:"):
            sys.exit(f"target {t}: loopback only")
    sys.exit(run(args) if args.mode == "run" else verify(args))


if __name__ == "__main__":
    main()
