#!/usr/bin/env python3
"""A webhook receiver for the e2e tests of `serve --notify` (standard library only).

Every POST is checked and its events appended, one JSON line each, to --out:

    {"path": "/hook", "delivery": "...", "attempt": "1", "status": 200,
     "content_type": "...", "signature_ok": true, "shape_ok": true,
     "problems": [], "event": {...the event...}}

A request whose body cannot be parsed is recorded as one line with "event": null.

Checks (recorded, never refused unless --strict):
- the signature: `X-Registry-Signature: sha256=<hex HMAC-SHA256 of the raw body>` with
  the secret of --secret-file (absent secret file: not checked, signature_ok null);
- the shape: Distribution's envelope `{"events": [...]}` (Content-Type
  application/vnd.docker.distribution.events.v1+json or v2+json), each event with
  `id`, `timestamp` (RFC 3339), `action` in push/delete/mount, `target.repository`,
  and `source`; or a CloudEvent (application/cloudevents+json) or a batch of them
  (application/cloudevents-batch+json) with specversion 1.0, id, source, type.

Failures on request:
- `--fail-first N`: answer --fail-status (default 503) to the first N POSTs;
- `--fail-for SECONDS`: answer --fail-status for that long after start;
- `POST /_control/fail?seconds=S&status=503` (or `?count=N`) turns failing on while
  running; `POST /_control/ok` turns it off. `GET /_control/stats` answers counts.
Failing requests' events are recorded too, with their status (the sender retries them).

`--strict` answers 400 to a request with a bad signature or shape (the sender retries
those forever: use it only to see that nothing bad is sent).

Prints `receiver listening on http://HOST:PORT` once it listens; stops on SIGTERM or
SIGINT. `--port 0` picks a free port; `--port-file F` writes the port chosen.
"""

import argparse
import hashlib
import hmac
import json
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DISTRIBUTION_TYPES = (
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",
)
CE_SINGLE = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


class State:
    def __init__(self, args):
        self.lock = threading.Lock()
        # Unbuffered appends under `lock`: each line goes out in one write(2),
        # so a reader polling the file never sees half a line from a buffer
        # split, and `close` (also under the lock) never cuts one.
        self.out = open(args.out, "ab", buffering=0)
        self.secret = None
        if args.secret_file:
            with open(args.secret_file, "rb") as f:
                self.secret = f.read().rstrip(b"\r\n")
        self.strict = args.strict
        self.fail_status = args.fail_status
        self.fail_remaining = args.fail_first
        self.fail_until = time.monotonic() + args.fail_for if args.fail_for else 0.0
        self.requests = 0
        self.failed = 0
        self.events = 0
        self.bad = 0

    def write_line(self, line):
        self.out.write((json.dumps(line) + "\n").encode("utf-8"))

    def close(self):
        with self.lock:
            self.out.close()
            self.out = None

    def failing(self):
        """The status to answer now instead of 200, if any (consumes --fail-first)."""
        if self.fail_remaining > 0:
            self.fail_remaining -= 1
            return self.fail_status
        if time.monotonic() < self.fail_until:
            return self.fail_status
        return None


def check_signature(secret, body, header):
    if secret is None:
        return None
    want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, header or "")


def check_distribution_event(e):
    problems = []
    if not isinstance(e, dict):
        return ["event is not an object"]
    if not isinstance(e.get("id"), str) or not e["id"]:
        problems.append("no id")
    if not isinstance(e.get("timestamp"), str) or not RFC3339.match(e["timestamp"]):
        problems.append("timestamp is not RFC 3339: %r" % e.get("timestamp"))
    if e.get("action") not in ("push", "delete", "mount"):
        problems.append("action %r" % e.get("action"))
    target = e.get("target")
    if not isinstance(target, dict) or not target.get("repository"):
        problems.append("no target.repository")
    else:
        if e.get("action") == "push" and target.get("digest"):
            # A tag moved to a manifest deleted since may lack its media type and size.
            wanted = ("url",) if target.get("tag") else ("mediaType", "size", "length", "url")
            for k in wanted:
                if k not in target:
                    problems.append("push target without %s" % k)
        if e.get("action") == "mount" and not target.get("fromRepository"):
            problems.append("mount without fromRepository")
    if not isinstance(e.get("source"), dict):
        problems.append("no source")
    return problems


def check_cloudevent(e):
    if not isinstance(e, dict):
        return ["event is not an object"]
    problems = []
    if e.get("specversion") != "1.0":
        problems.append("specversion %r" % e.get("specversion"))
    for k in ("id", "source", "type"):
        if not isinstance(e.get(k), str) or not e[k]:
            problems.append("no " + k)
    if "time" in e and not RFC3339.match(str(e["time"])):
        problems.append("time is not RFC 3339")
    return problems


def parse(content_type, body):
    """(events, problems-of-the-request, per-event checker)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    try:
        doc = json.loads(body)
    except ValueError as err:
        return None, ["body is not JSON: %s" % err], None
    if ctype in DISTRIBUTION_TYPES:
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            return None, ["not a Distribution envelope"], None
        if not doc["events"]:
            return [], ["empty envelope"], check_distribution_event
        return doc["events"], [], check_distribution_event
    if ctype == CE_SINGLE:
        return [doc], [], check_cloudevent
    if ctype == CE_BATCH:
        if not isinstance(doc, list):
            return None, ["a CloudEvents batch is not an array"], None
        return doc, [], check_cloudevent
    return None, ["unexpected Content-Type %r" % content_type], None


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def answer(self, status, body=b"", ctype="text/plain"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if urlsplit(self.path).path == "/_control/stats":
                with state.lock:
                    stats = {
                        "requests": state.requests,
                        "failed": state.failed,
                        "events": state.events,
                        "bad": state.bad,
                    }
                return self.answer(200, json.dumps(stats).encode(), "application/json")
            self.answer(404)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            url = urlsplit(self.path)
            if url.path.startswith("/_control/"):
                return self.control(url)
            sig_ok = check_signature(
                state.secret, body, self.headers.get("X-Registry-Signature")
            )
            events, problems, check = parse(self.headers.get("Content-Type"), body)
            per_event = [check(e) if check else [] for e in (events or [])]
            shape_ok = not problems and not any(per_event)
            bad = sig_ok is False or not shape_ok
            with state.lock:
                state.requests += 1
                status = state.failing() or 200
                if state.out is None:
                    # Stopping: nothing can be recorded, so nothing is accepted.
                    status = 503
                if state.strict and bad and status == 200:
                    status = 400
                if status >= 300:
                    state.failed += 1
                else:
                    state.events += len(events or [])
                if bad:
                    state.bad += 1
                base = {
                    "path": url.path,
                    "delivery": self.headers.get("X-Registry-Delivery"),
                    "attempt": self.headers.get("X-Registry-Delivery-Attempt"),
                    "status": status,
                    "content_type": self.headers.get("Content-Type"),
                    "signature_ok": sig_ok,
                    "shape_ok": shape_ok,
                    "received_at": time.time(),
                }
                if state.out is None:
                    pass
                elif events is None:
                    state.write_line(dict(base, problems=problems, event=None))
                else:
                    for e, p in zip(events, per_event):
                        state.write_line(dict(base, problems=problems + p, event=e))
            if status == 503:
                self.send_response(status)
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.answer(status)

        def control(self, url):
            q = parse_qs(url.query)
            with state.lock:
                if url.path == "/_control/fail":
                    state.fail_status = int(q.get("status", [state.fail_status])[0])
                    if "count" in q:
                        state.fail_remaining = int(q["count"][0])
                    else:
                        seconds = float(q.get("seconds", ["3600"])[0])
                        state.fail_until = time.monotonic() + seconds
                elif url.path == "/_control/ok":
                    state.fail_remaining = 0
                    state.fail_until = 0.0
                else:
                    return self.answer(404)
            self.answer(200, b"ok\n")

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the port chosen here")
    ap.add_argument("--out", required=True, help="append events here (JSONL)")
    ap.add_argument("--secret-file", help="verify X-Registry-Signature with this secret")
    ap.add_argument("--fail-first", type=int, default=0, metavar="N")
    ap.add_argument("--fail-for", type=float, default=0.0, metavar="SECONDS")
    ap.add_argument("--fail-status", type=int, default=503)
    ap.add_argument("--strict", action="store_true",
                    help="answer 400 to bad signatures or shapes")
    args = ap.parse_args()

    state = State(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    port = server.server_address[1]
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write("%d\n" % port)
    print("receiver listening on http://%s:%d" % (args.host, port), flush=True)

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
