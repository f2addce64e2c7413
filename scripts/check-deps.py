#!/usr/bin/env python3
"""Fails if a crate depends across the borders of docs/design.md: core depends on no
other registry crate, storage adapters never on registry-http, http never on a store."""
import json
import subprocess
import sys

FORBIDDEN = {
    "registry-core": {"registry-http", "registry-store-fs", "registry-store-object"},
    "registry-store-fs": {"registry-http", "registry-store-object"},
    "registry-store-object": {"registry-http", "registry-store-fs"},
    "registry-http": {"registry-store-fs", "registry-store-object"},
    # Layout import/export works on any Registry; it knows no store and no HTTP.
    "registry-layout": {"registry-http", "registry-store-fs", "registry-store-object"},
    "registry-store-postgres": {"registry-http", "registry-store-fs", "registry-store-object"},
    # The remote client is an ImageSource/ImageSink like a Registry: core only.
    "registry-remote": {
        "registry-http", "registry-store-fs", "registry-store-object", "registry-store-postgres",
        "registry-layout",
    },
}

meta = json.loads(subprocess.check_output(
    ["cargo", "metadata", "--format-version", "1", "--no-deps"]))
problems = []
for pkg in meta["packages"]:
    banned = FORBIDDEN.get(pkg["name"], set())
    for dep in pkg["dependencies"]:
        # Dev-dependencies may cross borders (tests run a store behind the HTTP layer).
        if dep["name"] in banned and dep.get("kind") != "dev":
            problems.append(f'{pkg["name"]} depends on {dep["name"]}')
for p in problems:
    print(f"dependency direction violated: {p}")
print(f"dependency directions: {len(FORBIDDEN)} crates checked, {len(problems)} problems")
sys.exit(1 if problems else 0)
