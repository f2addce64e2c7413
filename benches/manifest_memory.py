#!/usr/bin/env python3
"""Peak memory of a server under concurrent near-limit manifest PUTs (issue 17).

Starts the given server command on a free loopback port, pushes one config blob, then
PUTs N distinct manifests of SIZE bytes (just under the 4 MiB limit) from N threads at
once, and reports the server's peak RSS (VmHWM, reset after startup), how many PUTs got
201 and how many 429. Prints one JSON line.

    python3 benches/manifest_memory.py [--parallel 64] [--size 4190000] -- SERVER ARGS...

The server command gets `--addr 127.0.0.1:PORT` appended; `{port}` in it is replaced too.
"""

import argparse
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

CONFIG = b"{}"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def request(port, method, path, body=b"", headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def manifest(i, size):
    digest = "sha256:" + hashlib.sha256(CONFIG).hexdigest()
    head = (
        '{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":'
        '"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},'
        '"layers":[],"annotations":{"n":"%d","pad":"' % (OCI_MANIFEST, digest, len(CONFIG), i)
    )
    tail = '"}}'
    return (head + "x" * (size - len(head) - len(tail)) + tail).encode()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parallel", type=int, default=64)
    p.add_argument("--size", type=int, default=4 * 1024 * 1024 - 4096)
    p.add_argument("--label", default="server")
    p.add_argument("server", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = [x for x in a.server if x != "--"]
    port = free_port()
    cmd = [x.replace("{port}", str(port)) for x in cmd] + ["--addr", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                if request(port, "GET", "/v2/")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                sys.exit("server did not start")
            time.sleep(0.05)
        digest = "sha256:" + hashlib.sha256(CONFIG).hexdigest()
        st, _ = request(port, "POST", f"/v2/mem/test/blobs/uploads/?digest={digest}", CONFIG,
                        {"Content-Length": str(len(CONFIG))})
        assert st == 201, st
        bodies = [manifest(i, a.size) for i in range(a.parallel)]
        idle_kb = status_kb(proc.pid, "VmRSS")
        with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
            f.write("5")
        start = threading.Barrier(a.parallel)
        results = [None] * a.parallel

        def put(i):
            start.wait()
            results[i] = request(port, "PUT", f"/v2/mem/test/manifests/t{i}", bodies[i],
                                 {"Content-Type": OCI_MANIFEST})[0]

        threads = [threading.Thread(target=put, args=(i,)) for i in range(a.parallel)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.time() - t0
        peak_kb = status_kb(proc.pid, "VmHWM")
        print(json.dumps({
            "label": a.label,
            "parallel": a.parallel,
            "manifest_bytes": a.size,
            "created": results.count(201),
            "too_many_requests": results.count(429),
            "other": [s for s in results if s not in (201, 429)],
            "idle_rss_mb": round(idle_kb / 1024, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1),
            "seconds": round(seconds, 2),
        }))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
