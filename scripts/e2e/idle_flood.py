"""Holds many idle and half-sent connections to a registry, then checks that a new
client is still answered and that the half-sent ones are closed by the server.

usage: idle_flood.py HOST:PORT IDLE SLOW WAIT_SECONDS
Exits 0 when a fresh GET /v2/ answers 200 while IDLE idle sockets and SLOW slowloris
sockets are open, and every slowloris socket has been closed within WAIT_SECONDS.
Bounded: every socket has a timeout, and the script closes all of them on exit.
"""
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
idle_n, slow_n, wait = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
held = []


def connect():
    s = socket.create_connection((host, int(port)), timeout=5)
    held.append(s)
    return s


try:
    for _ in range(idle_n):
        connect()
    slow = []
    for _ in range(slow_n):
        s = connect()
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: loc")  # and never the rest
        slow.append(s)
    time.sleep(0.5)
    # A new client, while every socket above is held open.
    c = socket.create_connection((host, int(port)), timeout=wait)
    c.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    reply = b""
    while chunk := c.recv(4096):
        reply += chunk
    c.close()
    if not reply.startswith(b"HTTP/1.1 200"):
        sys.exit(f"a new client got {reply[:60]!r} instead of 200")
    # The half-sent requests are cut off by the header-read timeout.
    deadline = time.monotonic() + wait
    for s in slow:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while s.recv(4096):
                pass
        except socket.timeout:
            sys.exit("a half-sent request was still open after the timeout")
        except OSError:
            pass  # reset: closed
    print(f"ok: {idle_n} idle and {slow_n} half-sent sockets; new client answered 200")
finally:
    for s in held:
        s.close()
