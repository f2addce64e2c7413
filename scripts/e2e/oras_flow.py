"""oras (the Python client) against the registry: push an artifact with chunked uploads,
pull it back byte for byte, attach a referrer (a manifest whose subject is the
artifact), and find it through the referrers API with and without an artifactType
filter. Usage: oras_flow.py HOST:PORT WORKDIR. Exits non-zero on the first failure."""
import hashlib
import json
import os
import sys

import oras.client
import oras.oci
import requests

host, work = sys.argv[1], sys.argv[2]
os.chdir(work)
base = f"http://{host}"
client = oras.client.OrasClient(hostname=host, insecure=True)

files = {"a.txt": os.urandom(300_000), "b.bin": os.urandom(70_000)}
for name, data in files.items():
    with open(name, "wb") as f:
        f.write(data)
with open("config.json", "w") as f:
    f.write("{}")

ARTIFACT = "application/vnd.example.artifact+json"
SIGNATURE = "application/vnd.example.signature+json"

# Chunked upload in 64 KiB PATCHes: several real chunks per file.
client.push(
    target=f"{host}/e2e/art:v1",
    files=list(files),
    manifest_config=f"config.json:{ARTIFACT}",
    do_chunked=True,
    chunk_size=64 * 1024,
    quiet=True,
)

os.makedirs("pulled", exist_ok=True)
pulled = client.pull(target=f"{host}/e2e/art:v1", outdir="pulled")
for name, data in files.items():
    with open(os.path.join("pulled", name), "rb") as f:
        assert f.read() == data, f"{name} differs after pull"
print(f"pulled {len(pulled)} files back, identical")

accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
r = requests.get(f"{base}/v2/e2e/art/manifests/v1", headers=accept)
r.raise_for_status()
manifest_bytes = r.content
digest = r.headers["Docker-Content-Digest"]
assert digest == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
subject = oras.oci.Subject(mediaType=r.headers["Content-Type"], digest=digest, size=len(manifest_bytes))

with open("sig.txt", "w") as f:
    f.write("signed")
resp = client.push(
    target=f"{host}/e2e/art:sig",
    files=["sig.txt"],
    manifest_config=f"config.json:{SIGNATURE}",
    subject=subject,
    quiet=True,
)
assert resp.headers.get("OCI-Subject") == digest, f"OCI-Subject: {resp.headers}"

r = requests.get(f"{base}/v2/e2e/art/referrers/{digest}")
r.raise_for_status()
index = r.json()
assert index["mediaType"] == "application/vnd.oci.image.index.v1+json", index
types = [m.get("artifactType") for m in index["manifests"]]
assert types == [SIGNATURE], types

r = requests.get(f"{base}/v2/e2e/art/referrers/{digest}", params={"artifactType": SIGNATURE})
assert r.headers.get("OCI-Filters-Applied") == "artifactType", r.headers
assert len(r.json()["manifests"]) == 1
r = requests.get(f"{base}/v2/e2e/art/referrers/{digest}", params={"artifactType": "application/other"})
assert r.json()["manifests"] == [], r.json()
print("referrer found, filter applied")
