//! Collection at scale on the in-memory store:
//! `cargo bench -p registry-core --bench gc` (set `GC_BLOBS` / `GC_MANIFESTS` to resize).
//!
//! Reports the time and the process's resident memory growth of a full collection over
//! 100k blobs and 10k manifests, of a dry run and an audit over the same store, and the
//! push throughput with and without a collector looping concurrently.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use registry_core::{
    Digest, GcOptions, PutManifestOptions, Reference, Registry, RepoName, Tag, UntaggedPolicy,
};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn push_image(r: &Registry, repo: &RepoName, n: usize, layers_per: usize) -> Digest {
    let mut layer_json = Vec::new();
    for l in 0..layers_per {
        let data = Bytes::from(format!("blob {n}/{l}"));
        let d = Digest::sha256(&data);
        r.put_blob(
            repo,
            &d,
            None,
            futures::stream::iter([Ok(data.clone())]).boxed(),
        )
        .await
        .unwrap();
        layer_json.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{}}}"#,
            data.len()
        ));
    }
    let config = Bytes::from(format!("{{\"n\":{n}}}"));
    let cd = Digest::sha256(&config);
    r.put_blob(
        repo,
        &cd,
        None,
        futures::stream::iter([Ok(config.clone())]).boxed(),
    )
    .await
    .unwrap();
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        layer_json.join(",")
    );
    r.put_manifest(
        repo,
        &Reference::Tag(Tag::parse(&format!("t{n}")).unwrap()),
        "application/vnd.oci.image.manifest.v1+json",
        Bytes::from(m),
        PutManifestOptions::default(),
    )
    .await
    .unwrap()
    .digest
}

async fn fill(r: &Registry, blobs: usize, manifests: usize) -> Vec<(RepoName, Digest)> {
    // Each manifest holds one config and (blobs / manifests - 1) layers.
    let layers_per = (blobs / manifests).saturating_sub(1).max(1);
    let mut out = Vec::with_capacity(manifests);
    for n in 0..manifests {
        let repo = RepoName::parse(&format!("bench/r{}", n % 100)).unwrap();
        let d = push_image(r, &repo, n, layers_per).await;
        out.push((repo, d));
    }
    out
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let blobs = env("GC_BLOBS", 100_000);
    let manifests = env("GC_MANIFESTS", 10_000);
    rt.block_on(async {
        let r = Registry::builder(registry_core::MemoryStore::new())
            .with_protection_window(Duration::ZERO)
            .build();
        let t = Instant::now();
        let images = fill(&r, blobs, manifests).await;
        let stats = r.storage().metadata.stats().await.unwrap();
        println!(
            "filled {} blob records, {} manifests in {:.2?} (rss {} MiB)",
            stats.blobs,
            stats.manifests,
            t.elapsed(),
            rss_kib() / 1024
        );

        let t = Instant::now();
        let audit = r.storage().metadata.audit(false).await.unwrap();
        println!("audit (mark and sweep) over everything: {:.2?}, {} problems", t.elapsed(), audit.problems.len());

        let t = Instant::now();
        let idle = r.collect_garbage(&GcOptions::default()).await.unwrap();
        println!("collection with nothing to free: {:.2?} ({idle})", t.elapsed());

        // Untag half the images, then collect them with the untagged policy.
        for (i, (repo, d)) in images.iter().enumerate() {
            if i % 2 == 0 {
                r.delete_manifest(repo, &Reference::Digest(d.clone())).await.unwrap();
            }
        }
        let before = rss_kib();
        let t = Instant::now();
        let dry = r
            .collect_garbage(&GcOptions {
                dry_run: true,
                untagged: UntaggedPolicy::Collect,
                ..GcOptions::default()
            })
            .await
            .unwrap();
        println!("dry run after deleting half: {:.2?} ({dry})", t.elapsed());
        let t = Instant::now();
        let report = r.collect_garbage(&GcOptions::default()).await.unwrap();
        println!(
            "collection freeing half: {:.2?}, rss growth {} KiB ({report})",
            t.elapsed(),
            rss_kib().saturating_sub(before)
        );

        // Push throughput with and without a collector looping.
        for with_gc in [false, true] {
            let r = Registry::builder(registry_core::MemoryStore::new())
                .with_protection_window(Duration::from_secs(600))
                .build();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let collector = with_gc.then(|| {
                let (r, stop) = (r.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut runs = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        r.collect_garbage(&GcOptions::default()).await.unwrap();
                        runs += 1;
                        // Continuously, with a short pause: a flat-out spin would only
                        // measure how two cores are shared.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    runs
                })
            });
            let t = Instant::now();
            let n = 3_000;
            let mut tasks = Vec::new();
            for w in 0..4 {
                let r = r.clone();
                tasks.push(tokio::spawn(async move {
                    let repo = RepoName::parse(&format!("push/w{w}")).unwrap();
                    for i in 0..n / 4 {
                        push_image(&r, &repo, w * 1_000_000 + i, 4).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let secs = t.elapsed().as_secs_f64();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let runs = match collector {
                Some(c) => c.await.unwrap(),
                None => 0,
            };
            println!(
                "push {n} images of 5 blobs, collector {}: {:.0} images/s ({runs} collections meanwhile)",
                if with_gc { "looping" } else { "off" },
                n as f64 / secs
            );
        }
    });
}
