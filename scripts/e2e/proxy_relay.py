#!/usr/bin/env python3
"""An HTTP relay for scripts/e2e-proxy.sh: forwards every request to an upstream
registry and logs it, and can die in the middle of a blob (standard library only).

    proxy_relay.py --port PORT --upstream HOST:PORT --log FILE [--die-on-blob DIGEST]

Each request is forwarded as it came (method, path, headers with Authorization, body)
and answered with the upstream's status, headers and body. One line per request is
appended to --log once its answer is sent: `METHOD PATH STATUS BYTES_SENT`.

--die-on-blob DIGEST: the first GET of a blob with that digest answered 200 gets the
headers (with the full Content-Length) and about half of the body, then this process
exits at once (os._exit): the client sees the connection close mid-body, as when an
upstream crashes. The log line says `... DIED`.

Prints `relay listening on http://127.0.0.1:PORT` once it listens; stops on SIGTERM.
"""

import argparse
import http.client
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade"}
OWN = {"content-length", "date", "server"}  # written by this relay
CHUNK = 64 * 1024


class Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "e2e-relay"

    def log_message(self, *_):  # our own log instead
        pass

    def record(self, status, sent, note=""):
        line = f"{self.command} {self.path} {status} {sent}{note}\n"
        with self.server.log_lock:
            self.server.log.write(line)
            self.server.log.flush()

    def relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        up = http.client.HTTPConnection(*self.server.upstream, timeout=120)
        try:
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
        except OSError as e:
            self.send_error(502, f"upstream: {e}")
            self.record(502, 0, " UPSTREAM-ERROR")
            return
        die = (self.server.die_on_blob and self.command == "GET" and resp.status == 200
               and self.path.split("?")[0].endswith("/blobs/" + self.server.die_on_blob))
        length = resp.getheader("Content-Length")
        data = None
        if self.command != "HEAD" and length is None:
            data = resp.read()  # chunked upstream: answer with a length
            length = str(len(data))
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() not in OWN:
                self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        sent = 0
        if self.command == "HEAD":
            pass
        elif data is not None:
            self.wfile.write(data)
            sent = len(data)
        else:
            limit = int(length) // 2 if die else None
            while True:
                buf = resp.read(CHUNK)
                if not buf:
                    break
                if limit is not None and sent + len(buf) >= limit:
                    self.wfile.write(buf[: limit - sent])
                    self.wfile.flush()
                    sent = limit
                    self.record(resp.status, sent, " DIED")
                    os._exit(3)  # the process dies: every connection is cut
                self.wfile.write(buf)
                sent += len(buf)
        self.wfile.flush()
        up.close()
        self.record(resp.status, sent)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = relay


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="HOST:PORT")
    p.add_argument("--log", required=True)
    p.add_argument("--die-on-blob", default=None, help="sha256:HEX")
    args = p.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Relay)
    server.daemon_threads = True
    server.upstream = (host, int(port))
    server.die_on_blob = args.die_on_blob
    server.log = open(args.log, "a", encoding="utf-8")
    server.log_lock = threading.Lock()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"relay listening on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
