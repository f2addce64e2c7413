//! [`BucketStore::check`]: records against objects, counts against links.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use registry_core::kv::{KvEngine, Table};
use registry_core::registry::DEFAULT_DELETION_LEASE;
use registry_core::store::{BlobRecord, BlobStore, MetadataStore};
use registry_core::{Digest, Error, Result, Timestamp};

use crate::BucketStore;

/// How old an orphan object must be before [`BucketStore::check`] with `repair`
/// removes it: younger ones may belong to a commit whose metadata is being written
/// right now (by this process or another one on the bucket).
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(10 * 60);

/// Knobs for [`BucketStore::check`] (the same as the fs store's).
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Re-read every blob object and hash it against its name.
    pub verify_digests: bool,
    /// Repair what can be repaired: count and index drift (from the links), records
    /// whose bytes are gone, and orphan objects older than the grace time.
    pub repair: bool,
}

/// What [`BucketStore::check`] found (the same fields and summary line as the fs
/// store's report).
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Blob records.
    pub blobs: u64,
    /// Manifest links.
    pub manifests: u64,
    /// Repositories.
    pub repositories: u64,
    /// Blob objects without a record (left by a crash between commit and link, or a
    /// refused push whose clean-up did not run; unreadable and harmless, so not
    /// problems). Counted before any repair.
    pub orphans: u64,
    /// Everything wrong, one line each, as found (before any repair). A record whose
    /// bytes are gone reads `blob <digest>: record (<n> links) without bytes`.
    pub problems: Vec<String>,
    /// How many problems (and orphan objects) were repaired.
    pub repaired: u64,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} blobs, {} manifests, {} repositories, {} problems",
            self.blobs,
            self.manifests,
            self.repositories,
            self.problems.len()
        )
    }
}

impl BucketStore {
    /// Sets how old an orphan object must be before a repairing [`check`](Self::check)
    /// removes it (default [`DEFAULT_ORPHAN_GRACE`]). Removal takes the collector's
    /// deletion lease, so even a zero grace never breaks a concurrent commit of the
    /// same digest (it commits again); the grace only avoids that extra work.
    pub fn with_orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// Verifies the store, like the fs store's `check`: every count, reverse index and
    /// candidate entry against the links (the metadata audit), blob records against
    /// objects (a record whose object is missing: `record (N links) without bytes`, a
    /// problem, whether the bytes belong to a blob or a manifest; a size that differs;
    /// an object without a record: an orphan), and, with `verify_digests`, every
    /// object's content against its name.
    ///
    /// With `repair`: count and index drift is fixed from the links; a record whose
    /// bytes are gone loses the repository links nothing references, and the record
    /// goes once no link is left (a blob still referenced by a manifest stays a problem
    /// until pushed again, which restores its bytes; a manifest's own bytes, until the
    /// manifest is deleted and pushed again: a re-push of a manifest the repository
    /// holds only moves tags); orphan objects older than the grace time are deleted
    /// through the deletion lease. Corrupt objects are reported, never deleted.
    /// Reporting is safe at any time, from any process on the bucket; repair is meant
    /// for a quiet store.
    pub async fn check(&self, options: CheckOptions) -> Result<CheckReport> {
        let audit = self.metadata.audit(options.repair).await?;
        let mut report = CheckReport {
            blobs: audit.blobs,
            manifests: audit.manifests,
            repositories: audit.repositories,
            problems: audit.problems,
            repaired: audit.repaired,
            ..CheckReport::default()
        };
        let mut objects = self.blobs.list().await?;
        let mut seen = HashSet::new();
        while let Some(d) = objects.next().await {
            let d = d?;
            seen.insert(d.clone());
            match self.metadata.blob(&d).await? {
                None => {
                    report.orphans += 1;
                    if options.repair && self.old_enough(&d).await? && self.reclaim(&d).await? {
                        report.repaired += 1;
                    }
                    continue;
                }
                // A collection holds (or held, before a crash) the lease on these bytes.
                Some(rec) if rec.state.is_deleting() => continue,
                Some(rec) => {
                    // Gone since the listing: the records pass below decides.
                    let Some(size) = self.blobs.stat(&d).await? else {
                        seen.remove(&d);
                        continue;
                    };
                    if size != rec.size {
                        report.problems.push(format!(
                            "blob {d}: object has {size} bytes, record says {}",
                            rec.size
                        ));
                    }
                }
            }
            if options.verify_digests
                && !registry_core::store::stored_bytes_match(self.blobs.as_ref(), &d).await?
            {
                report.problems.push(format!(
                    "blob {d}: object content does not match its digest"
                ));
            }
        }
        // Records whose bytes are gone: a crash inside the re-commit window of design
        // §4.3, objects deleted behind the registry's back, or a deletion that did not
        // go through the lease. Reads of them answer 404, never wrong bytes.
        let records = self
            .metadata
            .engine()
            .read(|t| t.scan(Table::Blobs, b"", None, usize::MAX))
            .await?;
        for (k, v) in records {
            let d = Digest::parse(&String::from_utf8_lossy(&k)).map_err(Error::from)?;
            let rec: BlobRecord = serde_json::from_slice(&v).map_err(Error::storage)?;
            if rec.state.is_deleting() || seen.contains(&d) {
                continue;
            }
            // Listed before the record was read: committed since, not missing.
            if self.blobs.stat(&d).await?.is_some() {
                continue;
            }
            let mut problem = format!("blob {d}: record ({} links) without bytes", rec.links);
            if options.repair {
                match registry_core::store::repair_record_without_bytes(
                    self.blobs.as_ref(),
                    self.metadata.as_ref(),
                    &d,
                    Timestamp::from_system_time(SystemTime::now()),
                    DEFAULT_DELETION_LEASE,
                )
                .await?
                {
                    None => report.repaired += 1,
                    Some(why) => problem.push_str(&format!("; not repaired: {why}")),
                }
            }
            report.problems.push(problem);
        }
        Ok(report)
    }

    /// Whether an orphan object is past the grace time (by its last modification; a
    /// vanished object is not).
    async fn old_enough(&self, d: &Digest) -> Result<bool> {
        let Some(modified) = self.blobs.last_modified(d).await? else {
            return Ok(false);
        };
        Ok(modified.elapsed().unwrap_or_default() >= self.orphan_grace)
    }

    /// Deletes a blob's bytes and record through the collector's lease protocol
    /// ([`registry_core::store::delete_unlinked_bytes`], the one way bytes are
    /// deleted). `false` if the blob gained a link or someone else holds the lease.
    async fn reclaim(&self, d: &Digest) -> Result<bool> {
        let now = Timestamp::from_system_time(SystemTime::now());
        let deleted = registry_core::store::delete_unlinked_bytes(
            self.blobs.as_ref(),
            self.metadata.as_ref(),
            d,
            now,
            DEFAULT_DELETION_LEASE,
        )
        .await?;
        Ok(deleted.is_some())
    }
}
