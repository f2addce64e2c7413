//! A bounded stress test of collection under load: concurrent pushers (images sharing
//! base layers), deleters, tag movers and a collector looping with a zero window. It
//! checks that no accepted manifest ever references a missing blob, that every pull of
//! a live image verifies, and that after deleting everything storage is empty.
//!
//! With [`StressConfig::refused_racers`] (the default), every manifest push races
//! pushes of the *same bytes* that are refused after their bytes were stored (issue 16):
//! into a repository lacking the image's blobs (`MANIFEST_BLOB_UNKNOWN`), under an
//! immutable tag that points elsewhere (`ImmutableTag`), over a quota (`QuotaExceeded`),
//! and uploads of the image's own blobs into a repository whose quota refuses every
//! link. A refusal must never take away the bytes of the push acknowledged next to it:
//! every acknowledged manifest not deleted since must stay readable, by digest and by
//! tag, with every blob it references. Such a manifest found unreadable is counted as
//! *lost*; the run fails if any is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Barrier, Mutex};

use super::*;
use crate::manifest::media_type::OCI_MANIFEST;
use crate::policy::TagPattern;

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
    /// Every manifest push races refused pushes of the same bytes (see the module
    /// docs), each through another instance when there are several.
    pub refused_racers: bool,
    /// Every storage call first yields to the scheduler 0 to 3 times, and one in
    /// [`JITTER_SLEEP_ONE_IN`] sleeps 1 to 4 times the store's mean call duration (at
    /// least 1 ms): concurrent tasks then overtake one another between any two storage
    /// calls, not only where a store happens to wait (the in-memory store never does),
    /// and even slow calls (an fsync, a request to an emulator) fit between two calls
    /// of another task. Byte deletions sleep 8 times as often and up to 16 times as
    /// long: the window between deciding to delete and deleting is where bytes get
    /// lost.
    pub jitter: bool,
}

/// See [`StressConfig::jitter`].
pub const JITTER_SLEEP_ONE_IN: u64 = 16;

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            pushers: 4,
            images_per_pusher: 40,
            max_duration: Duration::from_secs(60),
            collector_pause: Duration::from_millis(3),
            protection_window: Duration::ZERO,
            refused_racers: true,
            jitter: true,
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
    /// Manifest pushes attempted: the pushers' (retries included) and the racers'.
    pub attempts: u64,
    /// Manifest pushes acknowledged (answered `Ok`).
    pub acknowledged: u64,
    /// Manifest pushes refused, for any reason (`push_retries` and the racers'
    /// refusals below). `attempts == acknowledged + refused`.
    pub refused: u64,
    /// Racers refused with `ManifestBlobUnknown` (the repository lacks a blob).
    pub refused_blob_unknown: u64,
    /// Racers refused with `ImmutableTag`.
    pub refused_immutable: u64,
    /// Racers refused with `QuotaExceeded`.
    pub refused_quota: u64,
    /// Racers' blob uploads refused with `QuotaExceeded` after their bytes were stored
    /// (not counted in `attempts`: they are not manifest pushes).
    pub refused_blob_uploads: u64,
    /// Acknowledged manifests, not deleted since, found unreadable (the manifest or a
    /// blob it references). Must be 0.
    pub lost: u64,
}

#[derive(Clone)]
struct Image {
    repo: RepoName,
    tag: Tag,
    digest: Digest,
    blobs: Vec<Digest>,
}

const REPOS: [&str; 3] = ["stress/a", "stress/b", "stress/c"];

/// Where the racers push (see [`Racer`]).
const LACKING_REPO: &str = "stress/lacking";
const PINNED_REPO: &str = "stress/pinned";
const PINNED_TAG: &str = "pinned";
const QUOTA_REPO: &str = "stress/quota";
/// Below the size of every stress manifest (asserted), above what the racers' blobs
/// need at once: blobs fit, manifests do not.
const QUOTA_BYTES: u64 = 400;
const FULL_REPO: &str = "stress/full";

/// A refused push of the same bytes as an accepted one.
#[derive(Debug, Clone, Copy)]
enum Racer {
    /// The manifest into a repository holding none of its blobs.
    Lacking,
    /// The image into a repository where its tag is immutable and points elsewhere.
    Pinned,
    /// The image into a repository whose quota holds the blobs but not the manifest.
    OverQuota,
    /// The image's own blobs into a repository whose quota refuses every link (racing
    /// the accepted pusher's uploads of the same blobs), then the manifest (refused:
    /// its blobs are not there).
    Full,
}

const RACERS: [Racer; 4] = [Racer::Lacking, Racer::Pinned, Racer::OverQuota, Racer::Full];

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
    attempts: AtomicU64,
    acknowledged: AtomicU64,
    refused: AtomicU64,
    refused_blob_unknown: AtomicU64,
    refused_immutable: AtomicU64,
    refused_quota: AtomicU64,
    refused_blob_uploads: AtomicU64,
    /// Acknowledged manifests found unreadable: digest → what was wrong, first seen.
    lost: std::sync::Mutex<BTreeMap<Digest, String>>,
    /// Racer outcomes that break a policy (a push that should have been refused was
    /// accepted, or refused for a reason that cannot apply).
    unexpected: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    fn lose(&self, image: &Image, why: String) {
        let mut lost = self.lost.lock().expect("lost lock");
        if !lost.contains_key(&image.digest) {
            eprintln!(
                "stress: LOST acknowledged manifest {} in {}: {why}",
                image.digest, image.repo
            );
            lost.insert(image.digest.clone(), why);
        }
    }

    fn unexpected(&self, what: String) {
        eprintln!("stress: unexpected: {what}");
        self.unexpected.lock().expect("unexpected lock").push(what);
    }
}

/// Pulls an image and verifies the manifest (by digest, and by its tag while the tag
/// still points at it) and every blob against its digest.
async fn pull_and_verify(r: &Registry, image: &Image) -> Result<(), String> {
    let m = r
        .get_manifest(&image.repo, &Reference::Digest(image.digest.clone()))
        .await
        .map_err(|e| format!("manifest {}: {e}", image.digest))?;
    if !image.digest.verify(&m.bytes) {
        return Err(format!("manifest {} bytes do not verify", image.digest));
    }
    let still_tagged = |r: &Registry| {
        let (r, image) = (r.clone(), image.clone());
        async move {
            r.storage()
                .metadata
                .tag(&image.repo, &image.tag)
                .await
                .ok()
                .flatten()
                == Some(image.digest.clone())
        }
    };
    if still_tagged(r).await {
        match r
            .get_manifest(&image.repo, &Reference::Tag(image.tag.clone()))
            .await
        {
            Ok(m) if m.meta.digest == image.digest => {
                if !image.digest.verify(&m.bytes) {
                    return Err(format!(
                        "manifest {} by tag {}: bytes do not verify",
                        image.digest, image.tag
                    ));
                }
            }
            // The tag moved in between (only the pusher moves it, and a delete removes
            // it): nothing to check by tag.
            Ok(_) => {}
            Err(e) => {
                if still_tagged(r).await {
                    return Err(format!(
                        "manifest {} by tag {}: {e}",
                        image.digest, image.tag
                    ));
                }
            }
        }
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

/// Waits at a barrier, bounded: a party that never comes is a bug, not a hang.
async fn meet(barrier: &Barrier, what: &str) {
    if tokio::time::timeout(Duration::from_secs(120), barrier.wait())
        .await
        .is_err()
    {
        panic!("stress: {what}: a racer never arrived");
    }
}

/// One refused push of the bytes an accepted pusher pushes at the same moment: uploads
/// (when its kind needs them) after `uploads`, the manifest after `put`.
#[allow(clippy::too_many_arguments)]
async fn race_refused(
    r: Registry,
    kind: Racer,
    blobs: Vec<Vec<u8>>,
    manifest: Bytes,
    uploads: Arc<Barrier>,
    put: Arc<Barrier>,
    counters: Arc<Counters>,
) {
    // The config and the pusher's own layer: the blobs whose bytes only this image has,
    // so that this upload may be the one that stores them.
    let own = [blobs[0].clone(), blobs[3].clone()];
    let (repo_name, tag_name, to_upload): (&str, &str, &[Vec<u8>]) = match kind {
        Racer::Lacking => (LACKING_REPO, "lacking", &[]),
        Racer::Pinned => (PINNED_REPO, PINNED_TAG, &blobs),
        Racer::OverQuota => (QUOTA_REPO, "q", &blobs),
        Racer::Full => (FULL_REPO, "full", &own),
    };
    let repo = super::repo(repo_name);
    meet(&uploads, "uploads").await;
    let mut linked = Vec::new();
    for data in to_upload {
        let d = Digest::sha256(data);
        match r
            .put_blob(&repo, &d, Some(data.len() as u64), body(&[data]))
            .await
        {
            Ok(_) => linked.push(d),
            Err(Error::QuotaExceeded { .. }) => {
                counters
                    .refused_blob_uploads
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => counters.unexpected(format!("{kind:?}: blob upload into {repo}: {e}")),
        }
    }
    if let Racer::Full = kind
        && !linked.is_empty()
    {
        counters.unexpected(format!("{kind:?}: a blob upload passed a 1-byte quota"));
    }
    meet(&put, "manifest put").await;
    counters.attempts.fetch_add(1, Ordering::Relaxed);
    let result = r
        .put_manifest(
            &repo,
            &Reference::Tag(super::tag(tag_name)),
            OCI_MANIFEST,
            manifest,
            PutManifestOptions::default(),
        )
        .await;
    match result {
        Ok(res) => {
            counters.acknowledged.fetch_add(1, Ordering::Relaxed);
            counters.unexpected(format!(
                "{kind:?}: push of {} into {repo} accepted",
                res.digest
            ));
        }
        Err(e) => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            let counter = match (&e, kind) {
                // Any racer may find a blob link taken by a zero-window collection.
                (Error::ManifestBlobUnknown { .. }, _) => &counters.refused_blob_unknown,
                (Error::ImmutableTag { .. }, Racer::Pinned) => &counters.refused_immutable,
                (Error::QuotaExceeded { .. }, Racer::OverQuota) => &counters.refused_quota,
                _ => {
                    counters.unexpected(format!("{kind:?}: push into {repo}: {e}"));
                    return;
                }
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Free the quota for the next racers: this image's own blobs (the base layers are
    // shared, counted once, and other racers' manifests need their links).
    if let Racer::OverQuota = kind {
        let own: Vec<Digest> = own.iter().map(|b| Digest::sha256(b)).collect();
        for d in linked.into_iter().filter(|d| own.contains(d)) {
            match r.delete_blob(&repo, &d).await {
                Ok(()) | Err(Error::BlobUnknown { .. }) => {}
                Err(e) => counters.unexpected(format!("{kind:?}: unlinking {d}: {e}")),
            }
        }
    }
}

/// Runs the stress test on `storage` (which must start empty) and returns its counts.
/// Panics on the first invariant violation, and at the end if an acknowledged manifest
/// was lost.
pub async fn run(storage: Storage, config: StressConfig) -> StressReport {
    run_shared(vec![storage], config).await
}

/// The stress test over several registries sharing one store (several processes on one
/// bucket, say): each `Storage` is one instance's view of the same stored state.
/// Pushers spread over the instances and verify each push through the *next* instance
/// (what one writes, another reads at once); racers of a push go through the instances
/// after it; every instance runs its own collector; deletes, tag moves and checks go
/// through different instances. At the end every instance must see the same empty
/// store.
pub async fn run_shared(storages: Vec<Storage>, config: StressConfig) -> StressReport {
    assert!(!storages.is_empty(), "at least one storage");
    let storages: Vec<Storage> = if config.jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let schedule = super::interleave::Schedule::jitter(seed, JITTER_SLEEP_ONE_IN);
        storages.into_iter().map(|s| schedule.wrap(s)).collect()
    } else {
        storages
    };
    let regs: Vec<Registry> = storages
        .iter()
        .map(|s| {
            Registry::builder(s.clone())
                .with_protection_window(config.protection_window)
                .build()
        })
        .collect();
    // The racers' instances: the same storage, with the policies that refuse them. The
    // other registries have none, so the final clean-up may delete everything.
    let pinned = TagPattern::parse(&format!("{PINNED_REPO}:{PINNED_TAG}")).expect("pattern");
    let policy_regs: Vec<Registry> = storages
        .into_iter()
        .map(|s| {
            Registry::builder(s)
                .with_protection_window(config.protection_window)
                .with_immutable_tags(pinned.clone())
                .with_quota(super::repo(QUOTA_REPO), QUOTA_BYTES)
                .with_quota(super::repo(FULL_REPO), 1)
                .build()
        })
        .collect();
    let n = regs.len();
    let r = regs[0].clone();
    if config.refused_racers {
        // The immutable tag the `Pinned` racers try to move.
        push_image(
            &policy_regs[0],
            &super::repo(PINNED_REPO),
            PINNED_TAG,
            b"{\"pinned\":true}",
            &[b"pinned layer"],
        )
        .await;
    }
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
        let racer_regs: Vec<Registry> = (0..RACERS.len())
            .map(|k| policy_regs[(w + 1 + k) % n].clone())
            .collect();
        let racing = config.refused_racers;
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
                let manifest = Bytes::from(image_manifest(&cfg, &layers));
                assert!(
                    manifest.len() as u64 > QUOTA_BYTES,
                    "the quota racer's manifest must not fit its quota"
                );
                // Config first, own layer last: the order `race_refused` relies on.
                let blob_bytes: Vec<Vec<u8>> = std::iter::once(&cfg[..])
                    .chain(layers.iter().copied())
                    .map(<[u8]>::to_vec)
                    .collect();
                let tag = super::tag(&format!("w{w}-{}", i % 4));
                let mut attempts = 0;
                let accepted = loop {
                    attempts += 1;
                    assert!(attempts < 200, "push kept failing");
                    if attempts == 10 {
                        starving.fetch_add(1, Ordering::SeqCst);
                    }
                    // Racers start their uploads and their manifest push together with
                    // ours: the same bytes, stored by whoever comes first.
                    let parties = if racing { RACERS.len() + 1 } else { 1 };
                    let (uploads, put) = (
                        Arc::new(Barrier::new(parties)),
                        Arc::new(Barrier::new(parties)),
                    );
                    let racers: Vec<_> = if racing {
                        RACERS
                            .iter()
                            .zip(&racer_regs)
                            .map(|(kind, rr)| {
                                tokio::spawn(race_refused(
                                    rr.clone(),
                                    *kind,
                                    blob_bytes.clone(),
                                    manifest.clone(),
                                    uploads.clone(),
                                    put.clone(),
                                    counters.clone(),
                                ))
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    meet(&uploads, "uploads").await;
                    for data in &blob_bytes {
                        push_blob(&r, &repo, data).await;
                    }
                    meet(&put, "manifest put").await;
                    counters.attempts.fetch_add(1, Ordering::Relaxed);
                    let result = r
                        .put_manifest(
                            &repo,
                            &Reference::Tag(tag.clone()),
                            OCI_MANIFEST,
                            manifest.clone(),
                            PutManifestOptions::default(),
                        )
                        .await;
                    let image = match &result {
                        Ok(res) => {
                            counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                            let image = Image {
                                repo: repo.clone(),
                                tag: tag.clone(),
                                digest: res.digest.clone(),
                                blobs: blob_bytes.iter().map(|b| Digest::sha256(b)).collect(),
                            };
                            // Right after the acknowledgement, through another instance.
                            if let Err(e) = pull_and_verify(&reader, &image).await {
                                counters.lose(&image, format!("right after its push: {e}"));
                            }
                            Some(image)
                        }
                        // With a zero window a collection may take a blob link between
                        // the upload and the manifest: the push is refused, never
                        // accepted incomplete. Clients retry from the uploads.
                        Err(Error::ManifestBlobUnknown { .. }) => {
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                            counters.push_retries.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                        // An emulator under load (moto, Azurite on a busy 2-core
                        // machine) now and then answers 5xx or times out: the client
                        // is told the push failed and retries it, as it would a 500.
                        // Not acknowledged, so nothing to check; counted as a retry.
                        Err(e @ (Error::Storage(_) | Error::TooManyRequests { .. })) => {
                            eprintln!("stress: push attempt failed, retrying: {e}");
                            counters.push_retries.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                        Err(e) => panic!("push failed: {e:?}"),
                    };
                    // Every refusal's clean-up is over once its racer is: whatever it
                    // deleted is gone by now.
                    for racer in racers {
                        racer.await.expect("racer");
                    }
                    if let Some(image) = image {
                        if attempts >= 10 {
                            starving.fetch_sub(1, Ordering::SeqCst);
                        }
                        for rr in [&r, &reader] {
                            if let Err(e) = pull_and_verify(rr, &image).await {
                                counters.lose(&image, format!("after the racers: {e}"));
                            }
                        }
                        break image;
                    }
                };
                let mut guard = live.lock().await;
                let lost = counters
                    .lost
                    .lock()
                    .expect("lost lock")
                    .contains_key(&accepted.digest);
                if !lost {
                    guard.insert(accepted.digest.clone(), accepted);
                }
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
                    if guard.len() < 6 || n.is_multiple_of(2) {
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
                        counters.lose(image, format!("while collections run: {e}"));
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
            if let Err(e) = pull_and_verify(r, image).await {
                counters.lose(image, format!("at the end: {e}"));
            }
        }
    }
    let c = &counters;
    let report = StressReport {
        pushes: c.pushes.load(Ordering::Relaxed),
        push_retries: c.push_retries.load(Ordering::Relaxed),
        pulls: c.pulls.load(Ordering::Relaxed),
        deletes: c.deletes.load(Ordering::Relaxed),
        tag_moves: c.tag_moves.load(Ordering::Relaxed),
        collections: c.collections.load(Ordering::Relaxed),
        blobs_collected: c.blobs_collected.load(Ordering::Relaxed),
        checks: c.checks.load(Ordering::Relaxed),
        attempts: c.attempts.load(Ordering::Relaxed),
        acknowledged: c.acknowledged.load(Ordering::Relaxed),
        refused: c.refused.load(Ordering::Relaxed),
        refused_blob_unknown: c.refused_blob_unknown.load(Ordering::Relaxed),
        refused_immutable: c.refused_immutable.load(Ordering::Relaxed),
        refused_quota: c.refused_quota.load(Ordering::Relaxed),
        refused_blob_uploads: c.refused_blob_uploads.load(Ordering::Relaxed),
        lost: c.lost.lock().expect("lost lock").len() as u64,
    };
    println!("stress: {report:?}");
    let lost = c.lost.lock().expect("lost lock").clone();
    assert!(
        lost.is_empty(),
        "{} acknowledged manifest(s) lost: {lost:#?}\n{report:?}",
        lost.len()
    );
    let unexpected = c.unexpected.lock().expect("unexpected lock").clone();
    assert!(
        unexpected.is_empty(),
        "unexpected outcomes: {unexpected:#?}"
    );
    assert_eq!(
        report.attempts,
        report.acknowledged + report.refused,
        "every attempt is acknowledged or refused"
    );
    assert_eq!(report.acknowledged, report.pushes);
    if config.refused_racers && report.pushes > 0 {
        assert!(report.refused > report.push_retries, "racers were refused");
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
    report
}
