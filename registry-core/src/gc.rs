//! Online garbage collection: reclaiming space while pushes and pulls go on.
//!
//! Collection walks candidates, never the whole store, and every removal is one atomic
//! check-and-delete in the metadata store (see `docs/design.md`, "Collection"). It takes
//! no lock, so it can run as often as wanted, concurrently with any traffic, and several
//! collectors may run at once (on several processes sharing a store).

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::digest::Digest;
use crate::error::Result;
use crate::events::Event;
use crate::names::{RepoName, Tag};
use crate::policy::{Keep, RetentionRule};
use crate::registry::{AllowAll, ListOptions, Registry};
use crate::store::{ManifestCollectRule, TagEntry};
use crate::time::Timestamp;

/// What happens to manifests that no tag, index or live subject keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UntaggedPolicy {
    /// Keep them (they stay pullable by digest). The default, as in the reference
    /// registry.
    #[default]
    Keep,
    /// Collect them once they are older than the protection window.
    Collect,
}

/// Knobs for [`Registry::collect_garbage`].
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Protection window for this run (default: the registry's).
    pub window: Option<Duration>,
    /// What to do with untagged manifests. Referrers of a live subject and children of a
    /// live index are always kept; referrers whose subject is gone are always collected.
    pub untagged: UntaggedPolicy,
    /// Also look for blob bytes that no record describes (left by a crash between an
    /// upload's commit and its link) and delete them. Lists every blob in storage.
    pub orphans: bool,
    /// First run a mark and sweep over all metadata ([`MetadataStore::audit`]), which
    /// recomputes every count from the links and repairs drift (reports it in a dry
    /// run). Reads all metadata: run it occasionally, not on every collection.
    ///
    /// [`MetadataStore::audit`]: crate::MetadataStore::audit
    pub audit: bool,
    /// Report what would be freed without freeing anything.
    pub dry_run: bool,
    /// Retention rules: tags they do not keep are removed first (immutable tags never
    /// are), with their manifest once it has no tag left (see [`RetentionRule`]).
    pub retention: Vec<RetentionRule>,
}

/// A tag removed (or, in a dry run, to be removed) by a retention rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRemoval {
    /// The repository.
    pub repo: RepoName,
    /// The tag.
    pub tag: Tag,
    /// The manifest it pointed at.
    pub digest: Digest,
    /// When it was tagged.
    pub tagged_at: Timestamp,
    /// Whether the manifest went too (it had no other tag and no parent index, and was
    /// outside the protection window). In a dry run: whether it would.
    pub manifest_removed: bool,
}

/// What a collection did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests deleted (untagged by policy, or referrers whose subject is gone).
    pub manifests_removed: u64,
    /// Unreferenced blob links removed.
    pub links_removed: u64,
    /// Blob links kept because they are still inside the protection window.
    pub links_protected: u64,
    /// Blobs whose bytes were deleted.
    pub blobs_deleted: u64,
    /// Orphan blobs (bytes without a record) deleted.
    pub orphans_deleted: u64,
    /// Bytes freed (blobs whose size is known).
    pub bytes_freed: u64,
    /// Upload sessions expired.
    pub uploads_expired: u64,
    /// Differences the audit found between stored counts and the links.
    pub drift_found: u64,
    /// Of those, how many it repaired.
    pub drift_repaired: u64,
    /// Tags removed by retention rules (would be removed, in a dry run), in repository
    /// and tag order.
    pub retention: Vec<RetentionRemoval>,
    /// Outbox events trimmed ([`RegistryConfig::event_retention`]).
    ///
    /// [`RegistryConfig::event_retention`]: crate::RegistryConfig::event_retention
    pub events_trimmed: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// How long it took, in real (monotonic) time: a measurement, not a decision, so it
    /// does not come from the registry's [`Clock`](crate::Clock) (a manual clock would
    /// report zero). The only field that differs between two runs of a deterministic
    /// scenario.
    pub duration: Duration,
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{} tags by retention, {} manifests, {} links, {} blobs, {} orphans, {} bytes freed; {} links protected; {} uploads expired; {} drift found, {} repaired; {} events trimmed; {:.3}s",
            if self.dry_run { "(dry run) " } else { "" },
            self.retention.len(),
            self.manifests_removed,
            self.links_removed,
            self.blobs_deleted,
            self.orphans_deleted,
            self.bytes_freed,
            self.links_protected,
            self.uploads_expired,
            self.drift_found,
            self.drift_repaired,
            self.events_trimmed,
            self.duration.as_secs_f64()
        )
    }
}

const PAGE: usize = 512;

/// The tags of one repository that the rules remove: matched by at least one rule and
/// kept by none. Recency is by tagging time, newest first; equal times order by tag,
/// greatest first, so the choice is deterministic.
fn retention_victims<'a>(
    repo: &RepoName,
    entries: &'a [TagEntry],
    rules: &[RetentionRule],
    now: Timestamp,
) -> Vec<&'a TagEntry> {
    let mut matched = vec![false; entries.len()];
    let mut kept = vec![false; entries.len()];
    for rule in rules {
        let mut mine: Vec<usize> = (0..entries.len())
            .filter(|&i| rule.tags.matches(repo, &entries[i].tag))
            .collect();
        mine.sort_by(|&a, &b| {
            (entries[b].tagged_at, &entries[b].tag).cmp(&(entries[a].tagged_at, &entries[a].tag))
        });
        for (rank, &i) in mine.iter().enumerate() {
            matched[i] = true;
            kept[i] |= match rule.keep {
                Keep::Last(n) => rank < n,
                Keep::YoungerThan(age) => now.since(entries[i].tagged_at) < age,
            };
        }
    }
    (0..entries.len())
        .filter(|&i| matched[i] && !kept[i])
        .map(|i| &entries[i])
        .collect()
}
/// Collecting an index frees its children for the next pass; bound the cascade.
const MAX_MANIFEST_PASSES: usize = 16;

impl Registry {
    /// Reclaims space, in four steps, each removal re-checked atomically:
    /// 1. manifests that policy no longer keeps (untagged, or referrers of a deleted
    ///    subject), older than the window;
    /// 2. blob links no manifest references, outside the window;
    /// 3. bytes of blobs left with no link (and, with [`GcOptions::orphans`], bytes
    ///    with no record at all);
    /// 4. upload sessions idle past the expiry.
    ///
    /// Retention rules ([`GcOptions::retention`]) run before step 1. A read-only
    /// registry refuses every collection except a dry run.
    pub async fn collect_garbage(&self, options: &GcOptions) -> Result<GcReport> {
        if !options.dry_run {
            self.check_writable("garbage collection")?;
        }
        // Real time, for `GcReport::duration` only; every decision below uses `now`.
        let started = Instant::now();
        let window = options
            .window
            .unwrap_or(self.inner.config.protection_window);
        let now = self.now();
        let cutoff = now.saturating_sub(window);
        let mut report = GcReport {
            dry_run: options.dry_run,
            ..GcReport::default()
        };
        if options.audit {
            let audit = self.inner.meta.audit(!options.dry_run).await?;
            for problem in &audit.problems {
                tracing::warn!(%problem, "metadata drift");
            }
            report.drift_found = audit.problems.len() as u64;
            report.drift_repaired = audit.repaired;
        }
        if !options.retention.is_empty() {
            self.apply_retention(options, now, cutoff, &mut report)
                .await?;
        }
        self.collect_manifests(options, cutoff, &mut report).await?;
        self.collect_links(options, cutoff, &mut report).await?;
        self.collect_blobs(options, &mut report).await?;
        if options.orphans {
            self.collect_orphans(options, &mut report).await?;
        }
        for upload in self.inner.blobs.list_uploads().await? {
            if now.since(upload.updated_at) > self.inner.config.upload_expiry {
                report.uploads_expired += 1;
                if !options.dry_run {
                    self.discard_upload(&upload.repo, &upload.id).await?;
                }
            }
        }
        if !options.dry_run {
            let config = &self.inner.config;
            report.events_trimmed = self
                .trim_events(config.event_retention, config.max_events)
                .await?;
        }
        report.duration = started.elapsed();
        tracing::info!(%report, "garbage collection finished");
        Ok(report)
    }

    /// Removes the tags no retention rule keeps, repository by repository. Each removal
    /// is conditional (the tag still points where the listing said, tagged at the same
    /// time), and the manifest goes only if, in its own atomic change, it has no tag and
    /// no parent left and was pushed before `cutoff`.
    async fn apply_retention(
        &self,
        options: &GcOptions,
        now: Timestamp,
        cutoff: Timestamp,
        report: &mut GcReport,
    ) -> Result<()> {
        let meta = &self.inner.meta;
        let policy = &self.inner.config.policy;
        let collect = ManifestCollectRule {
            cutoff,
            untagged: true,
        };
        let mut repos_after: Option<RepoName> = None;
        loop {
            let repos = self
                .list_repositories(
                    &ListOptions {
                        n: Some(PAGE),
                        last: repos_after.as_ref().map(|r| r.to_string()),
                    },
                    &AllowAll,
                )
                .await?;
            for repo in &repos.items {
                let covered = options.retention.iter().any(|r| {
                    r.tags
                        .prefix()
                        .is_none_or(|p| crate::access::under_prefix(repo.as_str(), p.as_str()))
                });
                if !covered {
                    continue;
                }
                let mut entries = Vec::new();
                let mut after: Option<Tag> = None;
                loop {
                    let page = meta.list_tag_entries(repo, after.as_ref(), PAGE).await?;
                    let full = page.len() == PAGE;
                    after = page.last().map(|e| e.tag.clone());
                    entries.extend(page);
                    if !full {
                        break;
                    }
                }
                let doomed = retention_victims(repo, &entries, &options.retention, now)
                    .into_iter()
                    .filter(|e| !policy.is_immutable(repo, &e.tag))
                    .collect::<Vec<_>>();
                for e in &doomed {
                    let manifest_removed = if options.dry_run {
                        // Would the manifest lose its last tag?
                        let rest = entries
                            .iter()
                            .filter(|o| o.digest == e.digest)
                            .all(|o| doomed.iter().any(|d| d.tag == o.tag));
                        // Reported on the manifest's last removed tag, as a real run
                        // removes it when that tag goes.
                        let last = doomed.iter().rev().find(|d| d.digest == e.digest);
                        rest && last.is_some_and(|l| l.tag == e.tag)
                            && meta.manifest(repo, &e.digest).await?.is_some_and(|m| {
                                m.parents == 0 && m.pushed_at <= cutoff && m.subject.is_none()
                            })
                    } else {
                        if !meta
                            .delete_tag_if(repo, &e.tag, &e.digest, e.tagged_at, policy)
                            .await?
                        {
                            continue; // moved or deleted meanwhile: not ours to remove
                        }
                        self.emit(Event::TagDeleted {
                            repo: repo.clone(),
                            tag: e.tag.clone(),
                            digest: e.digest.clone(),
                        });
                        match meta.collect_manifest(repo, &e.digest, collect).await? {
                            Some(deleted) => {
                                self.emit(Event::ManifestDeleted {
                                    repo: repo.clone(),
                                    digest: e.digest.clone(),
                                    tags: deleted.tags,
                                });
                                true
                            }
                            None => false,
                        }
                    };
                    report.manifests_removed += u64::from(manifest_removed);
                    report.retention.push(RetentionRemoval {
                        repo: repo.clone(),
                        tag: e.tag.clone(),
                        digest: e.digest.clone(),
                        tagged_at: e.tagged_at,
                        manifest_removed,
                    });
                }
            }
            match repos.next {
                Some(_) => repos_after = repos.items.last().cloned(),
                None => return Ok(()),
            }
        }
    }

    async fn collect_manifests(
        &self,
        options: &GcOptions,
        cutoff: crate::Timestamp,
        report: &mut GcReport,
    ) -> Result<()> {
        let meta = &self.inner.meta;
        let rule = ManifestCollectRule {
            cutoff,
            untagged: options.untagged == UntaggedPolicy::Collect,
        };
        for _ in 0..MAX_MANIFEST_PASSES {
            let mut removed_this_pass = 0;
            let mut repos_after: Option<RepoName> = None;
            loop {
                let repos = self
                    .list_repositories(
                        &ListOptions {
                            n: Some(PAGE),
                            last: repos_after.as_ref().map(|r| r.to_string()),
                        },
                        &AllowAll,
                    )
                    .await?;
                for repo in &repos.items {
                    let mut after: Option<Digest> = None;
                    loop {
                        let page = meta.list_manifests(repo, after.as_ref(), PAGE).await?;
                        for m in &page {
                            let eligible = m.tags == 0
                                && m.parents == 0
                                && m.pushed_at <= cutoff
                                && (m.subject.is_some() || rule.untagged);
                            if !eligible {
                                continue;
                            }
                            if options.dry_run {
                                let orphaned_referrer = match &m.subject {
                                    Some(s) => meta.manifest(repo, s).await?.is_none(),
                                    None => true,
                                };
                                report.manifests_removed += u64::from(orphaned_referrer);
                            } else if let Some(deleted) =
                                meta.collect_manifest(repo, &m.digest, rule).await?
                            {
                                removed_this_pass += 1;
                                report.manifests_removed += 1;
                                self.emit(Event::ManifestDeleted {
                                    repo: repo.clone(),
                                    digest: m.digest.clone(),
                                    tags: deleted.tags,
                                });
                            }
                        }
                        if page.len() < PAGE {
                            break;
                        }
                        after = page.last().map(|m| m.digest.clone());
                    }
                }
                match repos.next {
                    Some(_) => repos_after = repos.items.last().cloned(),
                    None => break,
                }
            }
            // A dry run cannot see the cascade (children freed by a collected index).
            if removed_this_pass == 0 || options.dry_run {
                break;
            }
        }
        Ok(())
    }

    async fn collect_links(
        &self,
        options: &GcOptions,
        cutoff: crate::Timestamp,
        report: &mut GcReport,
    ) -> Result<()> {
        let meta = &self.inner.meta;
        let mut after: Option<(RepoName, Digest)> = None;
        loop {
            let page = meta
                .unreferenced_blob_links(after.as_ref().map(|(r, d)| (r, d)), PAGE)
                .await?;
            for (repo, digest, link) in &page {
                if link.protected_at > cutoff {
                    report.links_protected += 1;
                } else if options.dry_run {
                    report.links_removed += 1;
                } else if meta.collect_blob_link(repo, digest, cutoff).await? {
                    report.links_removed += 1;
                    self.emit(Event::LinkCollected {
                        repo: repo.clone(),
                        digest: digest.clone(),
                    });
                }
            }
            if page.len() < PAGE {
                return Ok(());
            }
            after = page.last().map(|(r, d, _)| (r.clone(), d.clone()));
        }
    }

    async fn collect_blobs(&self, options: &GcOptions, report: &mut GcReport) -> Result<()> {
        let meta = &self.inner.meta;
        let mut after: Option<Digest> = None;
        loop {
            let page = meta.unlinked_blobs(after.as_ref(), PAGE).await?;
            for (digest, rec) in &page {
                if options.dry_run {
                    report.blobs_deleted += 1;
                    report.bytes_freed += rec.size;
                } else if let Some(size) = self.delete_unlinked_blob(digest).await? {
                    report.blobs_deleted += 1;
                    report.bytes_freed += size;
                    self.emit(Event::BlobCollected {
                        digest: digest.clone(),
                        size,
                    });
                }
            }
            if page.len() < PAGE {
                return Ok(());
            }
            after = page.last().map(|(d, _)| d.clone());
        }
    }

    async fn collect_orphans(&self, options: &GcOptions, report: &mut GcReport) -> Result<()> {
        let mut digests = self.inner.blobs.list().await?;
        while let Some(digest) = digests.next().await {
            let digest = digest?;
            if self.inner.meta.blob(&digest).await?.is_some() {
                continue;
            }
            report.orphans_deleted += 1;
            if options.dry_run {
                continue;
            }
            // Claimed through the same `Deleting` protocol as any collection, so an
            // upload committing these bytes right now re-commits after us (design §4.3).
            let size = self.inner.blobs.stat(&digest).await?.unwrap_or(0);
            if self.delete_unlinked_blob(&digest).await?.is_some() {
                report.bytes_freed += size;
                self.emit(Event::BlobCollected { digest, size });
            }
        }
        Ok(())
    }

    /// Collects every `interval` until `shutdown` completes. Spawn it on your runtime
    /// (the core never spawns tasks itself). Failures are logged and retried next time.
    pub async fn run_collector(
        &self,
        interval: Duration,
        options: GcOptions,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                // Real time: a schedule has to wake up by itself, which a manual clock
                // cannot make it do. Deterministic tests call `collect_garbage` directly.
                _ = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.collect_garbage(&options).await {
                tracing::warn!(error = %e, "garbage collection failed; will retry");
            }
        }
    }
}
