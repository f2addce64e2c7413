#!/usr/bin/env bash
# The whole test suite, from a machine with nothing but the Rust toolchain:
# installs what the tests need (Debian and PyPI packages), then runs the gates of
# STYLE.md and every test: unit, behaviour suite on each store, model-based, stress,
# kill -9 crash, in-process HTTP, real clients (skopeo, umoci, oras, oci-client), doc
# tests (the object store against moto and Azurite among them); then the
# out-of-process client suites against the serve binary (fs, and two processes on one
# bucket).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing test dependencies"
scripts/install-test-deps.sh

step "formatting"
cargo fmt --all --check

step "dependency directions"
python3 scripts/check-deps.py

step "clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "docs"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --all-features --locked

step "each library crate alone, with its default features (as docs.rs and dependents build it)"
# The workspace build unifies features across members and can hide a crate that needs
# a dependency feature it does not ask for.
for crate in registry-core registry-store-fs registry-store-object registry-http; do
    cargo check --locked --quiet -p "$crate" --lib
done

step "tests"
cargo test --workspace --all-features --locked

step "three registries with their policies and a promotion (examples/three_registries.rs)"
cargo run --quiet --locked -p registry-examples --example three_registries

step "real clients against the serve binary (skopeo, oras, buildah, podman, raw HTTP, auth)"
scripts/e2e-clients.sh

step "two serve processes on one bucket: S3 (moto) and Azure Blob (Azurite), with skopeo"
scripts/e2e-object.sh

# ---- fuzzing (hostile input): every cargo-fuzz target for a bounded time ------------
# FUZZ_SECONDS per target (default 25); any crash, leak or hang fails the run.
step "fuzzing every target (scripts/fuzz.sh)"
scripts/fuzz.sh
# ---- end of fuzzing -----------------------------------------------------------------
