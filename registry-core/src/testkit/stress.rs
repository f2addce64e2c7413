//! A bounded stress test of collection under load: concurrent pushers (images sharing
//! base layers), deleters, tag movers and a collector looping with a zero window. It
//! checks that no accepted manifest ever references a missing blob, that every pull of
//! a live image verifies, and that after deleting everything storage is empty.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::*;
use crate::manifest::media_type::OCI_MANIFEST;

/// How much work to do; both bounds apply.
#[derive(Debug, Clone)]
pub struct StressConfig {
    /// Concurrent pushers.
    pub pushers: usize,
    /// Images each pusher pushes.
    pub images_per_pusher: usize,
    /// Stop early after this long.
    pub max_duration: Duration,
    /// Pause between two collections of one collector. With a zero protection window a
    /// collection refuses every push whose uploads it catches before their manifest;
    /// on slow storage (an emulator over HTTP) a push takes long enough that back-to-
    /// back collections would refuse nearly all of them.
    pub collector_pause: Duration,
    /// The registries' protection window (zero: collections race every push). On slow
    /// storage, where a push takes seconds, a zero window starves pushers: each attempt
    /// is refused by a collection that took its fresh blob links.
    pub protection_window: Duration,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            pushers: 4,
            images_per_pusher: 40,
            max_duration: Duration::from_secs(60),
            collector_pause: Duration::from_millis(3),
            protection_window: Duration::ZERO,
        }
    }
}

/// Operation counts of a run.
#[derive(Debug, Default)]
pub struct StressReport {
    /// Images accepted.
    pub pushes: u64,
    /// Manifest pushes refused because a collection removed an unprotected blob link
    /// first (the client re-uploads and retries, as real clients do).
    pub push_retries: u64,
    /// Pulls of live images, each verified blob by blob.
    pub pulls: u64,
    /// Manifests deleted.
    pub deletes: u64,
    /// Tags moved.
    pub tag_moves: u64,
    /// Collections run.
    pub collections: u64,
    /// Blob bytes deleted by those collections.
    pub blobs_collected: u64,
    /// Full invariant checks run while the load went on.
    pub checks: u64,
}

#[derive(Clone)]
struct Image {
    repo: RepoName,
    digest: Digest,
    blobs: Vec<Digest>,
}

const REPOS: [&str; 3] = ["stress/a", "stress/b", "stress/c"];

#[derive(Default)]
struct Counters {
    pushes: AtomicU64,
    push_retries: AtomicU64,
    pulls: AtomicU64,
    deletes: AtomicU64,
    tag_moves: AtomicU64,
    collections: AtomicU64,
    blobs_collected: AtomicU64,
    checks: AtomicU64,
}

/// Pulls an image and verifies the manifest and every blob against its digest.
async fn pull_and_verify(r: &Registry, image: &Image) -> Result<(), String> {
    let m = r
        .get_manifest(&image.repo, &Reference::Digest(image.digest.clone()))
        .await
        .map_err(|e| format!("manifest {}: {e}", image.digest))?;
    if !image.digest.verify(&m.bytes) {
        return Err(format!("manifest {} bytes do not verify", image.digest));
    }
    for b in &image.blobs {
        let data = read_blob(r, &image.repo, b)
            .await
            .map_err(|e| format!("blob {b} of {}: {e}", image.digest))?;
        if !b.verify(&data) {
            return Err(format!("blob {b} does not verify"));
        }
    }
    Ok(())
}

/// Runs the stress test on `storage` (which must start empty) and returns its counts.
/// Panics on the first invariant violation.
pub async fn run(storage: Storage, config: StressConfig) -> StressReport {
    run_shared(vec![storage], config).await
}

/// The stress test over several registries sharing one store (several processes on one
/// bucket, say): each `Storage` is one instance's view of the same stored state.
/// Pushers spread over the instances and verify each push through the *next* instance
/// (what one writes, another reads at once); every instance runs its own collector;
/// deletes, tag moves and checks go through different instances. At the end every
/// instance must see the same empty store.
pub async fn run_shared(storages: Vec<Storage>, config: StressConfig) -> StressReport {
    assert!(!storages.is_empty(), "at least one storage");
    let regs: Vec<Registry> = storages
        .into_iter()
        .map(|s| {
            Registry::builder(s)
                .with_protection_window(config.protection_window)
                .build()
        })
        .collect();
    let n = regs.len();
    let r = regs[0].clone();
    let deadline = Instant::now() + config.max_duration;
    // Accepted images not yet deleted; deleters remove an entry before deleting it, and
    // checks hold the lock, so every entry here must be fully readable.
    let live: Arc<Mutex<BTreeMap<Digest, Image>>> = Arc::default();
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Pushers that lost the race against back-to-back zero-window collections many
    // times in a row. Collectors then hold back until they get through: the run tests
    // that no interleaving breaks an image, and a starved pusher (likely on a loaded
    // 2-core machine, where one collection pass outlasts a push) would test nothing.
    let starving = Arc::new(AtomicUsize::new(0));

    let mut pushers = Vec::new();
    for w in 0..config.pushers {
        let (r, live, counters) = (regs[w % n].clone(), live.clone(), counters.clone());
        let starving = starving.clone();
        let reader = regs[(w + 1) % n].clone();
        let images = config.images_per_pusher;
        pushers.push(tokio::spawn(async move {
            for i in 0..images {
                if Instant::now() > deadline {
                    break;
                }
                let repo = super::repo(REPOS[(w + i) % REPOS.len()]);
                let base: [&[u8]; 2] = [b"shared base layer 0", b"shared base layer 1"];
                let own = format!("layer of pusher {w} image {i}").into_bytes();
                let cfg = format!("{{\"pusher\":{w},\"image\":{i}}}").into_bytes();
                let layers: Vec<&[u8]> = vec![base[0], base[1], &own];
                let manifest = image_manifest(&cfg, &layers);
                let tag = super::tag(&format!("w{w}-{}", i % 4));
                let mut attempts = 0;
                let digest = loop {
                    attempts += 1;
                    assert!(attempts < 200, "push kept failing");
                    if attempts == 10 {
                        starving.fetch_add(1, Ordering::SeqCst);
                    }
                    push_blob(&r, &repo, &cfg).await;
                    for l in &layers {
                        push_blob(&r, &repo, l).await;
                    }
                    match r
                        .put_manifest(
                            &repo,
                            &Reference::Tag(tag.clone()),
                            OCI_MANIFEST,
                            Bytes::from(manifest.clone()),
                            PutManifestOptions::default(),
                        )
                        .await
                    {
                        Ok(res) => {
                            if attempts >= 10 {
                                starving.fetch_sub(1, Ordering::SeqCst);
                            }
                            break res.digest;
                        }
                        // With a zero window a collection may take a blob link between
                        // the upload and the manifest: the push is refused, never
                        // accepted incomplete. Clients retry from the uploads.
                        Err(Error::ManifestBlobUnknown { .. }) => {
                            counters.push_retries.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("push failed: {e}"),
                    }
                };
                let image = Image {
                    repo,
                    digest: digest.clone(),
                    blobs: std::iter::once(&cfg[..])
                        .chain(layers.iter().copied())
                        .map(Digest::sha256)
                        .collect(),
                };
                let mut guard = live.lock().await;
                pull_and_verify(&reader, &image)
                    .await
                    .expect("pull right after push");
                guard.insert(digest, image);
                drop(guard);
                counters.pushes.fetch_add(1, Ordering::Relaxed);
                counters.pulls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let deleter = {
        let (r, live, counters, stop) = (
            regs[1 % n].clone(),
            live.clone(),
            counters.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let victim = {
                    let mut guard = live.lock().await;
                    let key = guard.keys().nth(n % guard.len().max(1)).cloned();
                    // Keep about half the images alive so pulls have work to do.
                    if guard.len() < 6 || n % 2 == 0 {
                        None
                    } else {
                        key.and_then(|k| guard.remove(&k))
                    }
                };
                if let Some(image) = victim {
                    r.delete_manifest(&image.repo, &Reference::Digest(image.digest.clone()))
                        .await
                        .expect("delete a live manifest");
                    counters.deletes.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let tag_mover = {
        let (r, live, counters, stop) = (
            regs[2 % n].clone(),
            live.clone(),
            counters.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let guard = live.lock().await;
                if let Some(image) = guard.values().nth(n % guard.len().max(1)).cloned() {
                    let tag = super::tag(&format!("moving-{}", n % 3));
                    r.tag_manifest(&image.repo, &tag, &image.digest)
                        .await
                        .expect("tag a live manifest");
                    counters.tag_moves.fetch_add(1, Ordering::Relaxed);
                }
                drop(guard);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let (pause, config_window) = (config.collector_pause, config.protection_window);
    let collectors = regs.iter().map(|r| {
        let (r, counters, stop) = (r.clone(), counters.clone(), stop.clone());
        let starving = starving.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let held_back = Instant::now();
                while starving.load(Ordering::SeqCst) > 0
                    && held_back.elapsed() < Duration::from_secs(5)
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let report = r
                    .collect_garbage(&GcOptions {
                        window: Some(config_window),
                        ..GcOptions::default()
                    })
                    .await
                    .expect("collection");
                counters.collections.fetch_add(1, Ordering::Relaxed);
                counters
                    .blobs_collected
                    .fetch_add(report.blobs_deleted, Ordering::Relaxed);
                // Back to back, but not spinning: with a zero window, a collector that
                // never pauses would refuse every push between its uploads and its
                // manifest, forever.
                tokio::time::sleep(pause).await;
            }
        })
    });
    let collectors: Vec<_> = collectors.collect();

    let checker = {
        let (regs, live, counters, stop) =
            (regs.clone(), live.clone(), counters.clone(), stop.clone());
        tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let r = &regs[round % regs.len()];
                let guard = live.lock().await;
                for image in guard.values() {
                    if let Err(e) = pull_and_verify(r, image).await {
                        panic!("a live image is broken while collections run: {e}");
                    }
                    counters.pulls.fetch_add(1, Ordering::Relaxed);
                }
                drop(guard);
                counters.checks.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    for p in pushers {
        p.await.expect("pusher");
    }
    stop.store(true, Ordering::Relaxed);
    for t in [deleter, tag_mover, checker].into_iter().chain(collectors) {
        t.await.expect("worker");
    }
    for image in live.lock().await.values() {
        for r in &regs {
            pull_and_verify(r, image).await.expect("final verification");
        }
    }
    assert_cleans_up(&r).await;
    for other in &regs[1..] {
        let stats = other.storage().metadata.stats().await.expect("stats");
        assert_eq!(
            stats,
            r.storage().metadata.stats().await.expect("stats"),
            "every instance sees the same (empty) store"
        );
    }
    let c = &counters;
    StressReport {
        pushes: c.pushes.load(Ordering::Relaxed),
        push_retries: c.push_retries.load(Ordering::Relaxed),
        pulls: c.pulls.load(Ordering::Relaxed),
        deletes: c.deletes.load(Ordering::Relaxed),
        tag_moves: c.tag_moves.load(Ordering::Relaxed),
        collections: c.collections.load(Ordering::Relaxed),
        blobs_collected: c.blobs_collected.load(Ordering::Relaxed),
        checks: c.checks.load(Ordering::Relaxed),
    }
}
