//! Quick throughput figures for `FsStore` through `Registry` (no HTTP): push and pull
//! of a 64 MiB and a 1 MiB blob, manifest puts and gets per second. A measurement to
//! read, not a test; run it in release mode:
//!
//! ```text
//! cargo run --release -p registry-store-fs --example fs_throughput [DATA_DIR]
//! ```
//!
//! Without `DATA_DIR` it works in a temporary directory (usually on the same disk as
//! the system's temp dir).

use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use registry_core::{Digest, PutManifestOptions, Reference, Registry, RepoName, Tag};
use registry_store_fs::FsStore;

/// Bytes arrive from a client in pieces of this size (a typical HTTP body frame).
const FRAME: usize = 64 * 1024;

fn frames(data: &Bytes) -> registry_core::ByteStream {
    let pieces: Vec<std::io::Result<Bytes>> = (0..data.len())
        .step_by(FRAME)
        .map(|at| Ok(data.slice(at..(at + FRAME).min(data.len()))))
        .collect();
    futures::stream::iter(pieces).boxed()
}

fn content(size: usize, salt: u64) -> Bytes {
    let mut x = 0x9e3779b97f4a7c15u64 ^ salt;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    Bytes::from(out)
}

async fn push_pull(r: &Registry, repo: &RepoName, size: usize, rounds: usize) {
    let mib = size as f64 / (1024.0 * 1024.0);
    let (mut push, mut pull) = (0.0, 0.0);
    for round in 0..rounds {
        let data = content(size, round as u64 + size as u64);
        let d = Digest::sha256(&data);
        let t = Instant::now();
        r.put_blob(repo, &d, Some(size as u64), frames(&data))
            .await
            .expect("push");
        push += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut s = r.get_blob(repo, &d, None).await.expect("pull").stream;
        let mut n = 0;
        while let Some(c) = s.next().await {
            n += c.expect("chunk").len();
        }
        pull += t.elapsed().as_secs_f64();
        assert_eq!(n, size);
    }
    let total = mib * rounds as f64;
    println!(
        "{mib:>6.0} MiB blob: push {:>7.0} MiB/s, pull {:>7.0} MiB/s ({rounds} rounds)",
        total / push,
        total / pull
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let temp = tempfile::tempdir()?;
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| temp.path().to_owned());
    let r = Registry::builder(FsStore::open(&dir).await?).build();
    let repo = RepoName::parse("bench/app")?;

    push_pull(&r, &repo, 64 << 20, 3).await;
    push_pull(&r, &repo, 1 << 20, 50).await;

    let config = Bytes::from_static(b"{}");
    let config_digest = Digest::sha256(&config);
    r.put_blob(&repo, &config_digest, None, frames(&config))
        .await?;
    let n = 500;
    let t = Instant::now();
    let mut digests = Vec::new();
    for i in 0..n {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":2}},"layers":[],"annotations":{{"n":"{i}"}}}}"#
        );
        let tag = Reference::Tag(Tag::parse(&format!("t{i}"))?);
        let res = r
            .put_manifest(
                &repo,
                &tag,
                "application/vnd.oci.image.manifest.v1+json",
                Bytes::from(m),
                PutManifestOptions::default(),
            )
            .await?;
        digests.push(res.digest);
    }
    let put = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for d in &digests {
        r.get_manifest(&repo, &Reference::Digest(d.clone())).await?;
    }
    let get = n as f64 / t.elapsed().as_secs_f64();
    println!("manifests: put {put:>7.0}/s, get {get:>7.0}/s ({n} each, sequential)");
    Ok(())
}
