#!/usr/bin/env python3
"""Driver of scripts/e2e-notify.sh: pushes images and checks what the webhook receiver
(scripts/e2e/receiver.py) got against what the registry acknowledged.

    notify.py push --targets H:P[,H:P...] --seconds S --threads N --prefix P --acked FILE
        Pushes images (a chunked layer, a config, a manifest under a new tag) to
        repositories P0..P3, spreading each push's requests over the targets, until S
        seconds have passed. Every manifest PUT answered 201 is appended to FILE as one
        JSON line {repo, tag, digest}. Connection errors and 5xx answers (a process
        killed, restarting) are counted and the push is abandoned, never recorded.

    notify.py verify --acked FILE --received FILE --format distribution|cloudevents
                     [--path /hook] [--wait S] [--order]
        Waits up to S seconds until every acknowledged push has been delivered with a 2xx
        answer, then checks: each acknowledged (repo, tag, digest) was delivered as a
        push of that tag to that digest; every delivered request had a good signature
        and shape; with --order, per repository the events' sequence numbers (from their
        ids) increase in the order they were first delivered.

Standard library only, plus scaleout.py beside it (the same pushes).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scaleout import burst, push_image  # noqa: E402


def push(args):
    targets = args.targets.split(",")

    def push_one(c, rng, n, i):
        repo = f"{args.prefix}{rng.randrange(4)}"
        return push_image(c, targets, rng, repo, f"w{n}-{i}", f"{args.prefix}-{n}-{i}")

    return burst(args.threads, args.seconds, args.acked, args.prefix, push_one)


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        # A last line without its newline is still being written: skip it, the
        # next poll reads it whole.
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def delivered_tag(format_, e):
    """(repo, tag, digest) if the event says a tag now points at a manifest."""
    if format_ == "distribution":
        t = e.get("target") or {}
        if e.get("action") == "push" and t.get("tag") and t.get("digest"):
            return (t["repository"], t["tag"], t["digest"])
        return None
    data = e.get("data") or {}
    ev = data.get("event") or {}
    if ev.get("kind") == "tag_moved":
        return (ev.get("repo"), ev.get("tag"), ev.get("to"))
    return None


def repository_of(format_, e):
    if format_ == "distribution":
        return (e.get("target") or {}).get("repository")
    ev = (e.get("data") or {}).get("event") or {}
    return ev.get("repo")


def verify(args):
    acked = {(r["repo"], r["tag"], r["digest"]) for r in read_jsonl(args.acked)}
    deadline = time.monotonic() + args.wait
    while True:
        lines = [l for l in read_jsonl(args.received) if l.get("path") == args.path]
        ok = [l for l in lines if 200 <= l.get("status", 0) < 300 and l.get("event")]
        got = {delivered_tag(args.format, l["event"]) for l in ok}
        missing = acked - got
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    problems = []
    if not acked:
        problems.append("nothing was acknowledged: the test pushed nothing")
    if missing:
        problems.append(f"{len(missing)} of {len(acked)} acknowledged pushes never delivered, e.g. "
                        f"{sorted(missing)[:3]}")
    bad_sig = [l for l in lines if l.get("signature_ok") is not True]
    bad_shape = [l for l in lines if l.get("shape_ok") is not True]
    if bad_sig:
        problems.append(f"{len(bad_sig)} deliveries with a bad or missing signature")
    if bad_shape:
        problems.append(f"{len(bad_shape)} deliveries with a bad shape: {bad_shape[0].get('problems')}")
    order_note = ""
    if args.order:
        seen = set()
        last = {}
        disorder = 0
        for l in ok:
            ident = l["event"].get("id")
            if ident in seen:
                continue
            seen.add(ident)
            seq = int(str(ident).split("-", 1)[0])
            repo = repository_of(args.format, l["event"])
            if repo is None:
                continue
            if seq <= last.get(repo, 0):
                disorder += 1
            last[repo] = seq
        order_note = f", {len(seen)} distinct events, {disorder} out of order per repository"
        if disorder:
            problems.append(f"{disorder} events delivered out of order within their repository")
    duplicates = len(ok) - len({l["event"].get("id") for l in ok})
    print(f"{len(acked)} acknowledged pushes, {len(ok)} events delivered "
          f"({duplicates} duplicates){order_note}")
    for p in problems:
        print("problem: " + p)
    return 1 if problems else 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push")
    p.add_argument("--targets", required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--prefix", required=True)
    p.add_argument("--acked", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--acked", required=True)
    v.add_argument("--received", required=True)
    v.add_argument("--format", choices=("distribution", "cloudevents"), default="distribution")
    v.add_argument("--path", default="/hook")
    v.add_argument("--wait", type=float, default=60)
    v.add_argument("--order", action="store_true")
    args = ap.parse_args()
    return push(args) if args.cmd == "push" else verify(args)


if __name__ == "__main__":
    sys.exit(main())
