"""oras (the Python client) against a registry that requires authentication.
Usage: oras_auth.py HOST:PORT USER PASSWORD WORKDIR. The user must be allowed to push to
auth/*. Exits non-zero on the first failure.

- anonymous and wrong-password pushes are refused (the client raises, nothing lands);
- the default token backend follows the Bearer challenge to /token with Basic
  credentials, then pushes (chunked) and pulls back byte for byte;
- the basic backend sends Basic credentials on every request and does the same."""
import os
import sys

import oras.client
import oras.decorator
import requests

# oras retries a refused request five times with sleeps of up to 83 s; the refusals
# below are meant to happen, so skip the waiting (the retries themselves still run).
oras.decorator.time.sleep = lambda _seconds: None

host, user, password, work = sys.argv[1:5]
os.chdir(work)
base = f"http://{host}"

files = {"a.bin": os.urandom(200_000), "b.txt": b"hello, authenticated world\n"}
for name, data in files.items():
    with open(name, "wb") as f:
        f.write(data)


def push(client, tag, **kw):
    return client.push(target=f"{host}/auth/art:{tag}", files=list(files), quiet=True, **kw)


def tags():
    r = requests.get(f"{base}/v2/auth/art/tags/list", auth=(user, password))
    if r.status_code == 404:
        return []
    r.raise_for_status()
    return sorted(r.json().get("tags") or [])


def refused(what, fn):
    try:
        fn()
    except Exception as e:  # oras raises ValueError or requests' HTTPError
        print(f"{what}: refused ({type(e).__name__})")
        return
    raise AssertionError(f"{what}: accepted")


anonymous = oras.client.OrasClient(hostname=host, insecure=True)
refused("anonymous push", lambda: push(anonymous, "anon"))
wrong = oras.client.OrasClient(hostname=host, insecure=True)
wrong.auth.set_basic_auth(user, password + "x")
refused("wrong password push", lambda: push(wrong, "wrong"))
assert tags() == [], f"refused pushes left tags behind: {tags()}"

for backend, tag in [("token", "via-token"), ("basic", "via-basic")]:
    client = oras.client.OrasClient(hostname=host, insecure=True, auth_backend=backend)
    client.auth.set_basic_auth(user, password)
    push(client, tag, do_chunked=True, chunk_size=64 * 1024)
    out = f"pulled-{backend}"
    os.makedirs(out, exist_ok=True)
    client.pull(target=f"{host}/auth/art:{tag}", outdir=out)
    for name, data in files.items():
        with open(os.path.join(out, name), "rb") as f:
            assert f.read() == data, f"{backend}: {name} differs after pull"
    print(f"{backend} backend: pushed and pulled back identical")

assert tags() == ["via-basic", "via-token"], tags()
print("oras auth ok")
