//! Startup at scale: how long a new process takes from opening its storage to its
//! first answer, with N manifests stored (default 100,000), for the three metadata
//! stores a registry can share or keep: PostgreSQL, the bucket's own log, and fs.
//!
//!     STARTUP_PG_URL=postgres://registry@127.0.0.1:PORT/DB \
//!         cargo bench -p registry-benches --bench metadata_startup
//!
//! `benches/scaleout.sh` runs it with a PostgreSQL it starts; without STARTUP_PG_URL
//! the PostgreSQL row is left out (said in the output). Environment: STARTUP_MANIFESTS
//! (default 100000), STARTUP_REPOS (default 100), STARTUP_CONCURRENCY (default 16).
//!
//! Each store is filled through the `Registry` API (one image per repository, then
//! manifests that differ by an annotation, each with its own tag, STARTUP_CONCURRENCY
//! at a time), then a second store value is opened on the same data as a new process
//! would, and the time to open it plus one manifest GET by tag is measured (three
//! times; the median). The
//! bucket log runs on object_store's in-memory store, so its figure is the replay's CPU
//! and memory cost without network latency: on real S3 every object read adds a round
//! trip; and the bucket log holds all metadata in the memory of every process (the
//! others hold none), which this harness, one process for all three, does not show.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use registry_core::fixtures::image;
use registry_core::{PutManifestOptions, Reference, Registry, RepoName, Storage, Tag};
use registry_store_fs::FsStore;
use registry_store_object::BucketStore;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo(r: usize) -> RepoName {
    RepoName::parse(&format!("startup/r{r:03}")).expect("repository name")
}

/// Fills `registry` with `manifests` manifests over `repos` repositories: a base image
/// per repository, then the manifests, `STARTUP_CONCURRENCY` pushes at a time, worker
/// w taking manifests w, w + concurrency, ... of every repository in turn (so with few
/// repositories the workers push into the same one at once).
async fn fill(registry: &Registry, manifests: usize, repos: usize) -> Duration {
    let concurrency = env_or("STARTUP_CONCURRENCY", 16).max(1);
    let started = Instant::now();
    let per_repo = manifests.div_ceil(repos);
    let bases = futures::future::join_all((0..repos).map(|r| {
        let registry = registry.clone();
        async move {
            let base = image()
                .seed(r as u64)
                .layers([512])
                .push(&registry, &repo(r), "base")
                .await
                .expect("base image");
            let template: serde_json::Value =
                serde_json::from_slice(&base.manifest_bytes).expect("manifest JSON");
            (template, base.manifest.media_type)
        }
    }))
    .await;
    let bases = Arc::new(bases);
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (registry, bases) = (registry.clone(), bases.clone());
        tasks.push(tokio::spawn(async move {
            for i in (worker..per_repo).step_by(concurrency) {
                for (r, (template, media_type)) in bases.iter().enumerate() {
                    let mut m = template.clone();
                    m["annotations"] = serde_json::json!({ "n": i.to_string() });
                    let bytes = Bytes::from(serde_json::to_vec(&m).expect("JSON"));
                    let tag = Tag::parse(&format!("m{i}")).expect("tag");
                    registry
                        .put_manifest(
                            &repo(r),
                            &Reference::Tag(tag),
                            media_type,
                            bytes,
                            PutManifestOptions::default(),
                        )
                        .await
                        .expect("manifest put");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("fill task");
    }
    started.elapsed()
}

/// Opens a store with `open` and reads one manifest by tag: the time, median of three.
async fn startup<F, Fut>(open: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Storage>,
{
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let registry = Registry::builder(open().await).build();
        let tag = Tag::parse("m0").expect("tag");
        registry
            .get_manifest(&repo(0), &Reference::Tag(tag))
            .await
            .expect("the first manifest");
        times.push(started.elapsed());
    }
    times.sort();
    times[1]
}

fn row(store: &str, manifests: usize, filled: Duration, open: Duration) {
    println!(
        "| {store} | {manifests} | {:.1} s ({:.0}/s) | {:.1} ms |",
        filled.as_secs_f64(),
        manifests as f64 / filled.as_secs_f64(),
        open.as_secs_f64() * 1e3,
    );
}

fn main() {
    // `cargo bench` passes --bench; this harness takes no arguments.
    let manifests = env_or("STARTUP_MANIFESTS", 100_000);
    let repos = env_or("STARTUP_REPOS", 100).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!(
            "| metadata store | manifests | fill ({} at a time) | open + first GET (median of 3) |",
            env_or("STARTUP_CONCURRENCY", 16).max(1)
        );
        println!("|---|---:|---:|---:|");

        if let Ok(url) = std::env::var("STARTUP_PG_URL") {
            let blobs: Arc<registry_core::MemoryBlobStore> = Arc::default();
            let storage = |blobs: Arc<registry_core::MemoryBlobStore>, url: String| async move {
                Storage {
                    blobs,
                    metadata: Arc::new(
                        registry_store_postgres::connect(&url)
                            .await
                            .expect("PostgreSQL"),
                    ),
                }
            };
            let registry = Registry::builder(storage(blobs.clone(), url.clone()).await).build();
            let filled = fill(&registry, manifests, repos).await;
            drop(registry);
            let open = startup(|| storage(blobs.clone(), url.clone())).await;
            row("PostgreSQL (blobs in memory)", manifests, filled, open);
        } else {
            println!(
                "| PostgreSQL | (not run: set STARTUP_PG_URL; benches/scaleout.sh does) | | |"
            );
        }

        let bucket: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let registry = Registry::builder(
            BucketStore::open(bucket.clone())
                .await
                .expect("bucket store")
                .into_storage(),
        )
        .build();
        let filled = fill(&registry, manifests, repos).await;
        drop(registry);
        let open = startup(|| async {
            BucketStore::open(bucket.clone())
                .await
                .expect("bucket store")
                .into_storage()
        })
        .await;
        row(
            "bucket log (in-memory object store)",
            manifests,
            filled,
            open,
        );
        drop(bucket);

        let dir = tempfile::tempdir().expect("temp dir");
        let fs = FsStore::open(dir.path()).await.expect("fs store");
        let registry = Registry::builder(fs.into_storage()).build();
        let filled = fill(&registry, manifests, repos).await;
        drop(registry);
        let open = startup(|| async {
            FsStore::open(dir.path())
                .await
                .expect("fs store (reopened)")
                .into_storage()
        })
        .await;
        row("fs (redb)", manifests, filled, open);
    });
}
