"""oras (the Python client, pinned by scripts/install-test-deps.sh) against a registry,
for scripts/e2e-clients.sh.

Usage: oras_e2e.py HOST:PORT REPO WORKDIR

1. pushes an artifact (artifactType set, empty config, two files) with real chunked
   uploads (POST, several PATCHes of 64 KiB, PUT);
2. pulls it back into WORKDIR/pulled and compares the bytes;
3. attaches two referrers (manifests whose `subject` is the artifact), each pushed by
   digest, with different artifactTypes.

The assertions on the referrers API are made by the caller with curl. On success it
prints one JSON object on its last line:
{"artifact": DIGEST, "artifact_type": ..., "referrers": [{"digest", "artifact_type",
"oci_subject", "status"}, ...]}. Exits non-zero (with the reason) on any failure.
"""
import hashlib
import json
import os
import sys

import oras.client
import oras.oci

host, repo, work = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(work, exist_ok=True)
os.chdir(work)

ARTIFACT = "application/vnd.e2e.artifact.v1"
SIGNATURE = "application/vnd.e2e.signature.v1"
SBOM = "application/vnd.e2e.sbom.v1"
EMPTY = "application/vnd.oci.empty.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class Client(oras.client.OrasClient):
    """The stock client, plus: sets the manifest's artifactType, and can push the
    manifest by digest (over the exact bytes sent) instead of by tag."""

    artifact_type = None
    by_digest = False
    last_digest = None

    def upload_manifest(self, manifest, container):
        if self.artifact_type:
            manifest["artifactType"] = self.artifact_type
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.last_digest = digest
        ref = digest if self.by_digest else (container.tag or "latest")
        url = f"{self.prefix}://{container.registry}/v2/{container.api_prefix}/manifests/{ref}"
        return self.do_request(url, "PUT", headers={"Content-Type": MANIFEST}, data=body)


def fail(msg):
    print(f"FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


client = Client(hostname=host, insecure=True)

files = {"a.txt": os.urandom(300_000), "b.bin": os.urandom(70_000)}
for name, data in files.items():
    with open(name, "wb") as f:
        f.write(data)

# 1. Push with chunked uploads: 64 KiB PATCHes, so a.txt takes five chunks.
client.artifact_type = ARTIFACT
resp = client.push(
    target=f"{host}/{repo}:v1",
    files=list(files),
    manifest_config=f":{EMPTY}",
    do_chunked=True,
    chunk_size=64 * 1024,
    quiet=True,
)
if resp.status_code != 201:
    fail(f"manifest PUT answered {resp.status_code}: {resp.text}")
artifact = client.last_digest
if resp.headers.get("Docker-Content-Digest") not in (None, artifact):
    fail(f"Docker-Content-Digest {resp.headers.get('Docker-Content-Digest')} != {artifact}")
print(f"pushed {repo}:v1 = {artifact}", file=sys.stderr)

# 2. Pull back and compare bytes.
os.makedirs("pulled", exist_ok=True)
client.pull(target=f"{host}/{repo}:v1", outdir="pulled")
for name, data in files.items():
    path = os.path.join("pulled", name)
    if not os.path.exists(path):
        fail(f"{name} missing after pull (have {os.listdir('pulled')})")
    with open(path, "rb") as f:
        if f.read() != data:
            fail(f"{name} differs after pull")
manifest = client.get_manifest(f"{host}/{repo}:v1")
if manifest.get("artifactType") != ARTIFACT:
    fail(f"pulled manifest lost its artifactType: {manifest}")
print("pulled back byte for byte", file=sys.stderr)

# 3. Referrers, pushed by digest. The subject's size is that of the exact bytes.
r = client.do_request(
    f"http://{host}/v2/{repo}/manifests/{artifact}", "GET", headers={"Accept": MANIFEST}
)
if r.status_code != 200 or hashlib.sha256(r.content).hexdigest() != artifact.split(":")[1]:
    fail(f"GET manifest by digest: {r.status_code} {r.headers}")
subject = oras.oci.Subject(mediaType=MANIFEST, digest=artifact, size=len(r.content))

referrers = []
for art_type, name, content in [(SIGNATURE, "sig.txt", b"signed"), (SBOM, "sbom.json", b"{\"sbom\":1}")]:
    with open(name, "wb") as f:
        f.write(content)
    client.artifact_type = art_type
    client.by_digest = True
    resp = client.push(
        target=f"{host}/{repo}",
        files=[name],
        manifest_config=f":{EMPTY}",
        subject=subject,
        manifest_annotations={"org.example.kind": name},
        quiet=True,
    )
    referrers.append(
        {
            "digest": client.last_digest,
            "artifact_type": art_type,
            "status": resp.status_code,
            "oci_subject": resp.headers.get("OCI-Subject"),
        }
    )
print(
    json.dumps(
        {"artifact": artifact, "artifact_type": ARTIFACT, "referrers": referrers}
    )
)
