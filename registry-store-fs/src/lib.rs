//! # registry-store-fs
//!
//! Crash-safe local storage for a [`registry_core::Registry`]: blobs as files, every
//! piece of metadata in one redb database, one durable redb write transaction per
//! registry operation.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use futures::stream::{self, StreamExt};
//! use registry_core::{Digest, Registry, RepoName};
//! use registry_store_fs::{CheckOptions, FsStore};
//!
//! let dir = tempfile::tempdir()?;
//! let store = FsStore::open(dir.path()).await?;
//! let registry = Registry::builder(store.clone()).build();
//!
//! // Push a blob in one request...
//! let repo = RepoName::parse("demo/app")?;
//! let data = bytes::Bytes::from_static(b"layer bytes");
//! let digest = Digest::sha256(&data);
//! registry
//!     .put_blob(&repo, &digest, None, stream::iter([Ok(data.clone())]).boxed())
//!     .await?;
//!
//! // ...read it back (the stream is verified against the digest as it ends)...
//! let mut body = registry.get_blob(&repo, &digest, None).await?.stream;
//! let mut read = Vec::new();
//! while let Some(chunk) = body.next().await {
//!     read.extend_from_slice(&chunk?);
//! }
//! assert_eq!(read, data);
//!
//! // ...and check the store: records against files, counts against links.
//! let report = store.check(CheckOptions { verify_digests: true, repair: false }).await?;
//! assert!(report.problems.is_empty());
//! assert_eq!(report.blobs, 1);
//! # Ok(())
//! # }
//! ```
//!
//! ## Layout under the data directory
//! - `meta.redb`: all metadata, one redb table per [`registry_core::kv::Table`] (see
//!   `docs/design.md` for the tables and invariants), and `inline_blobs`: the bytes
//!   of blobs up to 256 KiB stored whole (`put_bytes`: manifests), by digest;
//! - `blobs/<algorithm>/<first two hex>/<hex>`: blob bytes, immutable once named (but
//!   for a file the scrub found corrupt, which an upload of the same bytes replaces);
//! - `uploads/<id>/`: one upload session: `info.json` (repository, start time), and
//!   `data` (the bytes so far; its modification time is the session's last activity),
//!   renamed `data.committed` when committed; `uploads/.tmp-<id>`: a manifest being
//!   stored (`put_bytes`), or a session being created.
//!
//! ## Writes
//! The registry hashes an upload while this store appends it to `data` in large writes;
//! an append that fails or is cancelled is cut back to where it started. Committing
//! fsyncs the file, renames it `data.committed` (so no later append can write into a
//! blob), hard-links it to its blob name (an existing name means `AlreadyPresent`) and
//! fsyncs the directory; only then does the registry commit the metadata that makes
//! the blob visible. The upload stays readable until it is deleted, so a commit can be
//! repeated. Manifests skip the session: `put_bytes` keeps bytes up to 256 KiB in
//! `meta.redb`, committed like metadata (no file, no inode, a shared fsync; for a
//! manifest being pushed no fsync of their own, since the durable commit of its link,
//! later in the same file, covers them: `BlobStore::put_bytes_before_link`); larger
//! ones it writes to a temporary file, fsyncs, hard-links to the blob name and fsyncs
//! the directory. Manifest files of a store written by an earlier version are still
//! read. Metadata commits are
//! durable before they return (group commit: see [`RedbKv`]). The store's own
//! directories are made durable in the background after open, and every write waits
//! for that before it is acknowledged; a new store's `meta.redb` gets its name in the
//! same step, having been created unnamed, without redb's fsyncs (`docs/design.md` §5).
//!
//! ## After a crash
//! Nothing acknowledged is lost, nothing partial is visible. What may be left:
//! - upload sessions: kept on purpose, since a client may continue a chunked upload
//!   after the restart (the registry re-hashes what is there). Their creation is not
//!   fsynced: after a power loss (not a crash of the process) a session may be gone or
//!   its record torn, and it is then unknown to clients (who start the upload again)
//!   and removed when sessions are next listed. Sessions idle longer
//!   than the registry's upload expiry are deleted by
//!   [`Registry::collect_garbage`](registry_core::Registry::collect_garbage)
//!   (through `list_uploads` / `delete_upload`); sessions half-created or
//!   half-deleted (`uploads/.tmp-*`, `uploads/.trash-*`), and temporary manifest
//!   files, are removed on open;
//! - orphan blob files (committed, metadata never written): unreadable, since every
//!   read goes through metadata; [`FsStore::check`] reports them and, repairing,
//!   removes those older than a grace time; a collection with `GcOptions::orphans`
//!   removes them too.
//!
//! [`FsStore::check`] verifies the rest: counts and indexes against the links, records
//! against files, and on request every file's digest. [`FsStore::scrubber`] checks the
//! digests of a running store in the background, at a bounded rate, and makes reads
//! refuse the files it finds corrupt.

#![forbid(unsafe_code)]

mod blobs;
mod inline;
mod new_database;
mod redb_kv;
mod scrub;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use registry_core::kv::{KvEngine, KvMetadata, Table};
use registry_core::registry::DEFAULT_DELETION_LEASE;
use registry_core::store::{BlobRecord, BlobStore, MetadataStore, Storage, stored_bytes_match};
use registry_core::{Digest, Error, Result, Timestamp};

pub use blobs::FsBlobStore;
use blobs::Skeleton;
pub use redb_kv::RedbKv;
pub use scrub::{DEFAULT_SCRUB_RATE, ScrubOptions, ScrubReport, ScrubStats, Scrubber};

/// How old an orphan file must be before [`FsStore::check`] with `repair` removes it:
/// younger ones may belong to a commit whose metadata is being written right now.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(10 * 60);

/// Blob files plus redb metadata under one directory.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
    blobs: Arc<FsBlobStore>,
    metadata: Arc<KvMetadata<RedbKv>>,
    orphan_grace: Duration,
    /// The scrub's counters, shared by every [`Scrubber`] of this store.
    scrub: Arc<scrub::Shared>,
}

/// Knobs for [`FsStore::check`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Re-hash every blob file and compare with its name.
    pub verify_digests: bool,
    /// Repair what can be repaired: count and index drift (from the links), records
    /// whose bytes are gone, and orphan files older than the grace time.
    pub repair: bool,
}

/// What [`FsStore::check`] found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Blob records.
    pub blobs: u64,
    /// Manifest links.
    pub manifests: u64,
    /// Repositories.
    pub repositories: u64,
    /// Files without a record (left by a crash between commit and link; unreadable and
    /// harmless, so not problems). Counted before any repair.
    pub orphans: u64,
    /// Everything wrong, one line each, as found (before any repair).
    pub problems: Vec<String>,
    /// How many problems (and orphan files) were repaired.
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

impl FsStore {
    /// Opens (or creates) a store in `dir`. Upload sessions left by an earlier process
    /// are kept: clients may continue them.
    pub async fn open(dir: impl AsRef<Path>) -> Result<FsStore> {
        let root = dir.as_ref().to_owned();
        let skeleton = Arc::new(Skeleton::new(&root));
        let store = tokio::task::spawn_blocking({
            let skeleton = skeleton.clone();
            move || {
                std::fs::create_dir_all(&root).map_err(Error::storage)?;
                let kv = RedbKv::open_with(&root.join("meta.redb"), Some(skeleton.clone()))?;
                let blobs = FsBlobStore::open_with(&root, skeleton)?.with_inline(kv.clone());
                tracing::debug!(root = %root.display(), "fs store opened");
                Ok::<_, Error>(FsStore {
                    root,
                    blobs: Arc::new(blobs),
                    metadata: Arc::new(KvMetadata::new(kv)),
                    orphan_grace: DEFAULT_ORPHAN_GRACE,
                    scrub: Arc::default(),
                })
            }
        })
        .await
        .map_err(|e| Error::storage(format!("open task failed: {e}")))??;
        // The directory fsyncs, off the open path: the first write waits for them if
        // they are not done by then (and reports their error, if any).
        drop(tokio::task::spawn_blocking(move || {
            if let Err(e) = skeleton.ensure_durable() {
                tracing::warn!(error = %e, "making the store's directories durable failed; the first write retries");
            }
        }));
        Ok(store)
    }

    /// Sets how old an orphan file must be before a repairing [`check`](Self::check)
    /// removes it (default [`DEFAULT_ORPHAN_GRACE`]). Removal takes the same deletion
    /// lease as the collector, so even a zero grace never breaks a concurrent commit of
    /// the same digest (it commits again); the grace only avoids that extra work.
    pub fn with_orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// Whether a full read that [`Registry`](registry_core::Registry) asks to verify
    /// (`verify_reads`) skips hashing a file this process already read whole and
    /// verified, or stored itself from bytes the registry hashed, unchanged since
    /// (default: yes; see `docs/design.md` §5, "Cost of verified reads"). `false`:
    /// every verified read is hashed.
    pub fn remember_verified(self, on: bool) -> Self {
        self.blobs.remember_verified(on);
        self
    }

    /// Verified reads served without hashing (see
    /// [`remember_verified`](Self::remember_verified)).
    pub fn reads_not_rehashed(&self) -> u64 {
        self.blobs.reads_not_rehashed()
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A handle that runs scrub passes over this store's blob files: each file hashed
    /// at a bounded rate, matching files marked as verified, corrupt ones refused by
    /// every read until they are replaced. This is what finds bytes that change below
    /// the file system while the process runs, which the marks of
    /// [`remember_verified`](Self::remember_verified) would otherwise keep serving (see
    /// [`Scrubber::run_pass`]). Take it before [`into_storage`](Self::into_storage):
    /// it keeps working on the same files afterwards. Nothing runs until a pass is
    /// asked for; scheduling passes is the caller's.
    pub fn scrubber(&self) -> Scrubber {
        Scrubber::new(self.blobs.clone(), self.scrub.clone())
    }

    /// Both halves, ready for [`registry_core::Registry::builder`].
    pub fn into_storage(self) -> Storage {
        Storage {
            blobs: self.blobs,
            metadata: self.metadata,
        }
    }

    /// Verifies the store: every count, reverse index and candidate entry against the
    /// links (the metadata audit), blob records against files (a record without a file,
    /// a size that differs, a file without a record: an orphan), and, with
    /// `verify_digests`, every file's content against its name. A file altered behind
    /// the registry's back is reported here; a full read of it through the registry
    /// fails at its end instead of completing (`verify_reads`).
    ///
    /// With `repair`: count and index drift is fixed from the links; a record whose
    /// bytes are gone loses the repository links nothing references, and the record
    /// goes once no link is left (a blob still referenced by a manifest stays a
    /// problem until it is pushed again, which restores its bytes); orphan files older
    /// than the grace time are deleted. Corrupt files are reported, never deleted: they
    /// are evidence. Repair is meant for a stopped store; reporting is safe at any time.
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
        let mut files = self.blobs.list().await?;
        let mut seen = std::collections::HashSet::new();
        while let Some(d) = files.next().await {
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
                    let size = self.blobs.stat(&d).await?.unwrap_or(0);
                    if size != rec.size {
                        report.problems.push(format!(
                            "blob {d}: file has {size} bytes, record says {}",
                            rec.size
                        ));
                    }
                }
            }
            // A file a scrub found corrupt is refused by reads: not a failed check.
            if options.verify_digests
                && !stored_bytes_match(self.blobs.as_ref(), &d)
                    .await
                    .or_else(|e| match e {
                        Error::Storage(_) if self.blobs.verified().knows_corrupt(&d) => Ok(false),
                        e => Err(e),
                    })?
            {
                report
                    .problems
                    .push(format!("blob {d}: file content does not match its digest"));
            }
        }
        // Records whose bytes are gone: a crash inside the re-commit window of design
        // §4.3, or files removed behind our back. Reads of them answer 404, never wrong
        // bytes.
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
            let mut problem = format!("blob {d}: record ({} links) without file", rec.links);
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

    /// Whether an orphan file is past the grace time (by the time its bytes were last
    /// written; a vanished file is not).
    async fn old_enough(&self, d: &Digest) -> Result<bool> {
        let modified = self.blobs.modified(d).await?;
        Ok(modified.is_some_and(|t| t.elapsed().unwrap_or_default() >= self.orphan_grace))
    }

    /// Deletes a blob's bytes and record through the collector's lease protocol
    /// ([`registry_core::store::delete_unlinked_bytes`], the one way bytes are deleted):
    /// an uploader committing the same digest meanwhile finds the record `Deleting`,
    /// waits, and commits again. `false` if the blob gained a link or someone else holds
    /// the lease.
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

impl From<FsStore> for Storage {
    fn from(s: FsStore) -> Storage {
        s.into_storage()
    }
}
