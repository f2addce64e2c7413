//! Push-mirroring: every image pushed under a repository prefix is copied to another
//! registry (an [`ImageSink`], usually a remote one), driven by the outbox.
//!
//! A [`Mirror`] is a durable consumer of the outbox ([`Registry::claim_events`]), named
//! `mirror:NAME`. For each event under its prefix, in order:
//!
//! - a manifest stored, or a tag moved, is [transferred](crate::promote::transfer) with
//!   everything it references (and its referrers), then tagged;
//! - with [deletes](MirrorTarget::with_deletes), a tag or manifest deleted here is
//!   deleted there (a target that no longer has it is fine; one that cannot delete a
//!   tag gets the manifest deleted if no tag here points at it any more);
//! - everything else is passed over.
//!
//! The cursor is acknowledged after the events it covers were copied, at most once a
//! second, so a mirror killed at any point copies again, on restart, what it had not
//! acknowledged: at least once, and a copy of what the target already holds writes
//! nothing. A copy that fails in a way a retry may fix (the target unreachable or
//! failing, asking to slow down) is retried, with backoff from 1 s to 60 s, without
//! passing the event; a refusal for good (denied, invalid, too large...) is logged,
//! counted and passed over, so it never holds later pushes back. Processes sharing a
//! storage share the consumer, one of them copying at a time through its lease (a
//! process restarted under the same `instance` name takes its lease back at once).
//!
//! A new mirror starts at the outbox's head: it copies what is pushed from then on.
//! What was there before is copied with [`sync`](crate::promote::sync) (`serve sync`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::access::under_prefix;
use crate::endpoint::{ImageSink, ImageSource};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::names::{Reference, RepoName};
use crate::promote::{PromoteError, PromoteOptions, transfer};
use crate::registry::Registry;

/// Events read from the outbox at a time.
const PAGE: usize = 64;
/// How long a mirror's lease on its consumer lasts without renewal.
const LEASE: Duration = Duration::from_secs(30);
/// The cursor is stored at most this often (a write of the metadata store each).
const ACK_EVERY: Duration = Duration::from_secs(1);

/// Where a [`Mirror`] copies to.
#[derive(Clone)]
pub struct MirrorTarget {
    prefix: RepoName,
    name: String,
    sink: Arc<dyn ImageSink>,
    remote_prefix: Option<RepoName>,
    deletes: bool,
    referrers: bool,
}

impl std::fmt::Debug for MirrorTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorTarget")
            .field("prefix", &self.prefix)
            .field("name", &self.name)
            .field("remote_prefix", &self.remote_prefix)
            .field("deletes", &self.deletes)
            .finish_non_exhaustive()
    }
}

impl MirrorTarget {
    /// Copies what is pushed under `prefix` to `sink`, under the same names (`prefix`
    /// included). `name` identifies the target in logs and names the outbox consumer
    /// (its URL, without credentials): keep it stable across restarts.
    pub fn new(prefix: RepoName, name: impl Into<String>, sink: Arc<dyn ImageSink>) -> Self {
        MirrorTarget {
            prefix,
            name: name.into(),
            sink,
            remote_prefix: None,
            deletes: false,
            referrers: true,
        }
    }

    /// Replaces `prefix` by `remote_prefix` in the target's names.
    pub fn with_remote_prefix(mut self, remote_prefix: RepoName) -> Self {
        self.remote_prefix = Some(remote_prefix);
        self
    }

    /// Also deletes in the target what is deleted here (default: no).
    pub fn with_deletes(mut self, on: bool) -> Self {
        self.deletes = on;
        self
    }

    /// Copies referrers (signatures, SBOMs) along with each image (default: yes).
    pub fn with_referrers(mut self, on: bool) -> Self {
        self.referrers = on;
        self
    }

    /// The target's name, as given to [`new`](Self::new).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The outbox consumer this target's mirror uses.
    pub fn consumer(&self) -> String {
        format!("mirror:{}:{}", self.prefix, self.name)
    }

    /// The target's name for repository `repo`, or `None` when it is not mirrored.
    pub fn remote_repo(&self, repo: &RepoName) -> Option<RepoName> {
        if !under_prefix(repo.as_str(), self.prefix.as_str()) {
            return None;
        }
        match &self.remote_prefix {
            None => Some(repo.clone()),
            Some(p) => {
                let rest = &repo.as_str()[self.prefix.as_str().len()..];
                RepoName::parse(&format!("{p}{rest}")).ok()
            }
        }
    }
}

/// A mirror's progress, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MirrorStatus {
    /// The target's name.
    pub name: String,
    /// Whether this process holds the consumer's lease (copies) now.
    pub active: bool,
    /// Every event up to this number was copied (or passed over).
    pub cursor: u64,
    /// Events of the outbox not copied yet (as of the last look at its head).
    pub lag: u64,
    /// Images (manifests, with what they reference) copied.
    pub copied: u64,
    /// Tags and manifests deleted in the target.
    pub deleted: u64,
    /// Copies or deletes that failed (and were retried).
    pub failures: u64,
    /// Events trimmed from the outbox before this mirror read them.
    pub missed: u64,
}

#[derive(Default)]
struct Counters {
    active: AtomicBool,
    cursor: AtomicU64,
    lag: AtomicU64,
    copied: AtomicU64,
    deleted: AtomicU64,
    failures: AtomicU64,
    missed: AtomicU64,
}

/// Copies what is pushed to a registry into a [`MirrorTarget`], from a task of its own
/// (see the [module documentation](self)). Stop it with [`Mirror::shutdown`]; dropping
/// it stops it too, without waiting.
#[derive(Debug)]
pub struct Mirror {
    name: String,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

impl Mirror {
    /// Starts mirroring `registry` into `target` (on the current tokio runtime).
    /// `instance` names this process among those sharing the storage (their leases).
    pub fn start(registry: Registry, target: MirrorTarget, instance: impl Into<String>) -> Mirror {
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = watch::channel(false);
        let worker = Worker {
            signal: registry.event_signal(),
            registry,
            consumer: target.consumer(),
            target: target.clone(),
            owner: instance.into(),
            counters: counters.clone(),
            stop: stopped,
        };
        Mirror {
            name: target.name,
            counters,
            stop,
            task: Some(tokio::spawn(worker.run())),
        }
    }

    /// Its progress.
    pub fn status(&self) -> MirrorStatus {
        self.watch().status()
    }

    /// A handle that reads its progress (for metrics), usable after it stopped.
    pub fn watch(&self) -> MirrorWatch {
        MirrorWatch {
            name: self.name.clone(),
            counters: self.counters.clone(),
        }
    }
}

/// Reads a [`Mirror`]'s progress; cheap to clone.
#[derive(Debug, Clone)]
pub struct MirrorWatch {
    name: String,
    counters: Arc<Counters>,
}

impl MirrorWatch {
    /// The mirror's progress now.
    pub fn status(&self) -> MirrorStatus {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MirrorStatus {
            name: self.name.clone(),
            active: c.active.load(Ordering::Relaxed),
            cursor: get(&c.cursor),
            lag: get(&c.lag),
            copied: get(&c.copied),
            deleted: get(&c.deleted),
            failures: get(&c.failures),
            missed: get(&c.missed),
        }
    }
}

impl Mirror {
    /// Stops after the copy in progress, stores the cursor and gives the lease up.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Worker {
    registry: Registry,
    target: MirrorTarget,
    consumer: String,
    owner: String,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
    signal: watch::Receiver<u64>,
}

/// Why the holder loop ended.
enum Exit {
    Stopped(u64),
    LeaseLost,
    Failed(Error),
}

fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(6);
    Duration::from_secs(secs.min(60))
}

impl Worker {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d` unless stopped first; `true` if stopped.
    async fn sleep(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => true,
            _ = tokio::time::sleep(d) => self.stopped(),
        }
    }

    async fn run(mut self) {
        let mut failures = 0;
        tracing::info!(target = %self.target.name, prefix = %self.target.prefix, "mirror configured");
        while !self.stopped() {
            let claimed = self
                .registry
                .claim_events(&self.consumer, &self.owner, LEASE)
                .await;
            let wait = match claimed {
                Ok(Some(cursor)) => {
                    failures = 0;
                    self.counters.active.store(true, Ordering::Relaxed);
                    self.counters.cursor.store(cursor, Ordering::Relaxed);
                    let exit = self.hold(cursor).await;
                    self.counters.active.store(false, Ordering::Relaxed);
                    match exit {
                        Exit::Stopped(cursor) => {
                            let _ = self
                                .registry
                                .ack_events(&self.consumer, &self.owner, cursor, Duration::ZERO)
                                .await;
                            return;
                        }
                        Exit::LeaseLost => Duration::from_millis(100),
                        Exit::Failed(e) => {
                            failures += 1;
                            tracing::warn!(target = %self.target.name, error = %e, "mirror: the store failed; will retry");
                            backoff(failures)
                        }
                    }
                }
                // Another process copies; take over if it stops renewing its lease.
                Ok(None) => LEASE / 3,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(target = %self.target.name, error = %e, "mirror: cannot claim the lease; will retry");
                    backoff(failures)
                }
            };
            if self.sleep(wait).await {
                return;
            }
        }
    }

    async fn ack(&self, cursor: u64) -> std::result::Result<(), Exit> {
        match self
            .registry
            .ack_events(&self.consumer, &self.owner, cursor, LEASE)
            .await
        {
            Ok(true) => {
                self.counters.cursor.store(cursor, Ordering::Relaxed);
                Ok(())
            }
            Ok(false) => Err(Exit::LeaseLost),
            Err(e) => Err(Exit::Failed(e)),
        }
    }

    /// Copies while holding the lease.
    async fn hold(&mut self, mut cursor: u64) -> Exit {
        let mut acked_at = Instant::now();
        let mut acked = cursor;
        loop {
            if self.stopped() {
                return Exit::Stopped(cursor);
            }
            self.signal.mark_unchanged();
            let page = match self.registry.events_after(cursor, PAGE).await {
                Ok(p) => p,
                Err(e) => return Exit::Failed(e),
            };
            if page.missed_through > cursor {
                let missed = page.missed_through - cursor;
                self.counters.missed.fetch_add(missed, Ordering::Relaxed);
                tracing::warn!(target = %self.target.name, from = cursor + 1, through = page.missed_through,
                    "mirror: events were trimmed before they were copied; run a sync");
            }
            if let Ok(head) = self.registry.events_head().await {
                self.counters
                    .lag
                    .store(head.saturating_sub(cursor), Ordering::Relaxed);
            }
            if page.events.is_empty() {
                cursor = cursor.max(page.next_after);
                if cursor > acked || acked_at.elapsed() >= LEASE / 3 {
                    if let Err(exit) = self.ack(cursor).await {
                        return exit;
                    }
                    (acked, acked_at) = (cursor, Instant::now());
                }
                let mut signal = self.signal.clone();
                tokio::select! {
                    _ = self.stop.wait_for(|s| *s) => {}
                    _ = signal.changed() => {}
                    // Other processes' changes are not signalled: look again.
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                continue;
            }
            for stored in page.events {
                let mut failures = 0;
                loop {
                    match self.apply(&stored.event).await {
                        Ok(()) => break,
                        Err(e) => {
                            failures += 1;
                            self.counters.failures.fetch_add(1, Ordering::Relaxed);
                            if let Ok(head) = self.registry.events_head().await {
                                let behind = head.saturating_sub(cursor);
                                self.counters.lag.store(behind, Ordering::Relaxed);
                            }
                            tracing::warn!(target = %self.target.name, seq = stored.seq, error = %e,
                                "mirror: copy failed; will retry");
                            // Keep the lease while waiting.
                            if let Err(exit) = self.ack(cursor).await {
                                return exit;
                            }
                            acked_at = Instant::now();
                            if self.sleep(backoff(failures)).await {
                                return Exit::Stopped(cursor);
                            }
                        }
                    }
                }
                cursor = stored.seq;
                if acked_at.elapsed() >= ACK_EVERY {
                    if let Err(exit) = self.ack(cursor).await {
                        return exit;
                    }
                    (acked, acked_at) = (cursor, Instant::now());
                }
            }
            cursor = cursor.max(page.next_after);
        }
    }

    /// Copies (or deletes) what one event describes. `Err` only for what a retry may
    /// fix (see [`transient`]): anything else is logged, counted and passed over, so
    /// that one event the target refuses never holds every later one back.
    async fn apply(&self, event: &Event) -> Result<()> {
        let (repo, digest, tag) = match event {
            Event::ManifestPut { repo, digest, .. } => (repo, digest, None),
            Event::TagMoved { repo, tag, to, .. } => (repo, to, Some(tag)),
            Event::TagDeleted {
                repo, tag, digest, ..
            } if self.target.deletes => {
                return self.delete_tag(repo, tag, digest).await;
            }
            Event::ManifestDeleted { repo, digest, .. } if self.target.deletes => {
                return self.delete(repo, Reference::Digest(digest.clone())).await;
            }
            _ => return Ok(()),
        };
        let Some(remote) = self.target.remote_repo(repo) else {
            return Ok(());
        };
        let mut options = PromoteOptions::default().with_referrers(self.target.referrers);
        if let Some(tag) = tag {
            options = options.with_tag(tag.clone());
        }
        let source: &dyn ImageSource = &self.registry;
        match transfer(source, repo, digest, &*self.target.sink, &remote, &options).await {
            Ok(report) => {
                if report.manifests_copied > 0 {
                    self.counters.copied.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(target = %self.target.name, %repo, %digest, ?report, "mirrored");
                Ok(())
            }
            // Deleted here since: a later event says so; nothing to copy.
            Err(
                e @ (PromoteError::SourceManifestMissing { .. }
                | PromoteError::SourceBlobMissing { .. }),
            ) => {
                tracing::info!(target = %self.target.name, %repo, %digest, error = %e, "mirror: passed over");
                Ok(())
            }
            // Refused for good (by the target: a policy, a size limit; or the source
            // cannot read it back): retrying cannot help, and holding every later push
            // back would be worse.
            Err(
                PromoteError::Destination { error, digest }
                | PromoteError::Source { error, digest },
            ) if !transient(&error) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(target = %self.target.name, %repo, %digest, %error, "mirror: refused for good; passed over");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A tag deleted here: deleted there too, unless it exists here again by now (the
    /// event that re-created it copies it). Registries that cannot delete tags
    /// (Distribution answers 400) get the manifest deleted instead when no tag here
    /// points at it any more; otherwise the delete is passed over.
    async fn delete_tag(
        &self,
        repo: &RepoName,
        tag: &crate::names::Tag,
        digest: &crate::digest::Digest,
    ) -> Result<()> {
        if self.target.remote_repo(repo).is_none()
            || self.registry.inner.meta.tag(repo, tag).await?.is_some()
        {
            return Ok(());
        }
        match self.delete(repo, Reference::Tag(tag.clone())).await {
            Err(e) if !transient(&e) => {
                let untagged = self
                    .registry
                    .inner
                    .meta
                    .manifest(repo, digest)
                    .await?
                    .is_some_and(|m| m.tags == 0);
                if untagged {
                    tracing::info!(target = %self.target.name, %repo, %tag, error = %e,
                        "mirror: the target cannot delete tags; deleting the untagged manifest");
                    self.delete(repo, Reference::Digest(digest.clone())).await
                } else {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target = %self.target.name, %repo, %tag, error = %e,
                        "mirror: the target refuses to delete the tag; passed over");
                    Ok(())
                }
            }
            other => other,
        }
    }

    async fn delete(&self, repo: &RepoName, reference: Reference) -> Result<()> {
        let Some(remote) = self.target.remote_repo(repo) else {
            return Ok(());
        };
        match self.target.sink.delete_manifest(&remote, &reference).await {
            Ok(()) => {
                self.counters.deleted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            // Already gone there.
            Err(Error::ManifestUnknown { .. } | Error::NameUnknown { .. }) => Ok(()),
            Err(error) if transient(&error) => Err(error),
            Err(error) => match reference {
                // The caller decides what to do instead.
                Reference::Tag(_) => Err(error),
                Reference::Digest(_) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target = %self.target.name, %repo, %reference, %error,
                        "mirror: the target refuses the delete; passed over");
                    Ok(())
                }
            },
        }
    }
}

/// Whether a retry may fix `error`: the target or this registry's storage failing, or
/// asking to slow down. Refusals (denied, invalid, unsupported, too large, a digest
/// the target computes otherwise...) are for good.
fn transient(error: &Error) -> bool {
    matches!(
        error,
        Error::Upstream { .. } | Error::TooManyRequests { .. } | Error::Storage(_)
    )
}
