#!/usr/bin/env python3
"""A logging HTTP proxy in front of a registry: records what a real client sends.

Usage: record_trace.py LISTEN_PORT UPSTREAM_PORT OUT.jsonl

Each request becomes one JSON line: method, path (an upload session's own path
becomes "{upload}": the replaying registry hands out its own), query without the
reference registry's `_state`, the headers the registry looks at, and the body as
hex. Only for generating fuzz seeds (make-seeds.sh); 127.0.0.1 only.
"""
import http.client
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

LISTEN, UPSTREAM, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
KEEP = ("content-type", "content-range", "range", "content-length")


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def body(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def handle_one(self):
        body = self.body()
        url = urlsplit(self.path)
        path = re.sub(r"/blobs/uploads/[^/]+$", "/blobs/uploads/{upload}", url.path)
        query = [(k, v) for k, v in parse_qsl(url.query) if k != "_state"]
        headers = {k: v for k, v in self.headers.items() if k.lower() in KEEP}
        with open(OUT, "a") as f:
            f.write(json.dumps({"method": self.command, "path": path,
                                "query": urlencode(query), "headers": headers,
                                "body": body.hex()}) + "\n")
        conn = http.client.HTTPConnection("127.0.0.1", UPSTREAM)
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        # Repeated headers (skopeo sends several Accept) must all go through.
        for k, v in self.headers.items():
            if k.lower() not in ("transfer-encoding", "content-length"):
                conn.putheader(k, v)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        # A HEAD answer's length is the resource's, not the (empty) body's.
        length = resp.getheader("content-length") if self.command == "HEAD" else None
        self.send_header("content-length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", LISTEN), Proxy).serve_forever()
