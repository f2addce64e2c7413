//! # registry-store-fs
//!
//! Crash-safe local storage for a [`registry_core::Registry`]: blobs as files, every
//! piece of metadata in one redb database, one redb write transaction per registry
//! operation.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use futures::stream::{self, StreamExt};
//! use registry_core::{Digest, Registry, RepoName};
//!
//! let dir = tempfile::tempdir()?;
//! let store = registry_store_fs::FsStore::open(dir.path()).await?;
//! let registry = Registry::builder(store).build();
//!
//! let repo = RepoName::parse("demo/app")?;
//! let data = bytes::Bytes::from_static(b"layer bytes");
//! let digest = Digest::sha256(&data);
//! registry
//!     .put_blob(&repo, &digest, None, stream::iter([Ok(data.clone())]).boxed())
//!     .await?;
//! assert_eq!(registry.stat_blob(&repo, &digest).await?.size, data.len() as u64);
//! # Ok(())
//! # }
//! ```
//!
//! Layout under the data directory:
//! - `meta.redb`: all metadata (see `docs/design.md` for the tables and invariants);
//! - `blobs/<algorithm>/<first two hex>/<hex>`: blob bytes, immutable;
//! - `uploads/<id>/` (`data`, `info.json`): upload sessions; they survive restarts, so
//!   a client can continue a chunked upload after the process restarts. A session
//!   directory is created under a temporary name and renamed into place, and deleted by
//!   renaming it away first, so a crash never leaves half a session under its name;
//!   those temporary names are cleared when the store opens. Sessions idle past the
//!   registry's upload expiry are removed by collection.
//!
//! Crash safety: an upload file is fsynced, renamed and hard-linked into place (the
//! directory fsynced) before its metadata is committed; metadata commits are durable
//! (`Durability::Immediate`). A crash therefore leaves at worst orphan files or upload
//! sessions, which [`FsStore::check`] reports and collection reclaims.

#![forbid(unsafe_code)]

mod blobs;
mod redb_kv;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use registry_core::kv::{KvEngine, KvMetadata, Table};
use registry_core::store::{BlobRecord, BlobStore, MetadataStore, Storage};
use registry_core::{Digest, Hasher, Result};

pub use blobs::FsBlobStore;
pub use redb_kv::RedbKv;

/// Blob files plus redb metadata under one directory.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
    blobs: Arc<FsBlobStore>,
    metadata: Arc<KvMetadata<RedbKv>>,
}

/// Knobs for [`FsStore::check`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Re-hash every blob file and compare with its name.
    pub verify_digests: bool,
    /// Repair what can be repaired: count drift (from the links) and orphan files.
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
    /// Files without a record (left by a crash between commit and link; harmless).
    pub orphans: u64,
    /// Everything wrong, one line each (orphans are not problems).
    pub problems: Vec<String>,
    /// How many problems were repaired.
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
    /// Opens (or creates) a store in `dir`.
    pub async fn open(dir: impl AsRef<Path>) -> Result<FsStore> {
        let root = dir.as_ref().to_owned();
        let opened = root.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&opened).map_err(registry_core::Error::storage)?;
            let kv = RedbKv::open(&opened.join("meta.redb"))?;
            let blobs = FsBlobStore::open(&opened)?;
            Ok(FsStore {
                root: opened,
                blobs: Arc::new(blobs),
                metadata: Arc::new(KvMetadata::new(kv)),
            })
        })
        .await
        .map_err(|e| registry_core::Error::storage(format!("open task failed: {e}")))?
        .inspect(|_: &FsStore| tracing::debug!(root = %root.display(), "fs store opened"))
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Both halves, ready for [`registry_core::Registry::builder`].
    pub fn into_storage(self) -> Storage {
        Storage {
            blobs: self.blobs,
            metadata: self.metadata,
        }
    }

    /// Verifies the store: metadata counts against the links (repairing drift on
    /// request), blob records against files, and, on request, every file's digest. A
    /// file altered behind the registry's back is reported here, and a full read of it
    /// through the registry fails instead of serving it.
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
            let record = self.metadata.blob(&d).await?;
            match &record {
                None => {
                    report.orphans += 1;
                    if options.repair {
                        self.blobs.delete(&d).await?;
                    }
                    continue;
                }
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
            if options.verify_digests && !self.verify_file(&d).await? {
                report
                    .problems
                    .push(format!("blob {d}: file content does not match its digest"));
            }
        }
        // Records whose bytes are gone (only a crash inside the commit protocol's
        // re-commit window can leave one; reads of it answer 404, never wrong bytes).
        let records = self
            .metadata
            .engine()
            .read(|t| t.scan(Table::Blobs, b"", None, usize::MAX))
            .await?;
        for (k, v) in records {
            let d = String::from_utf8_lossy(&k).into_owned();
            let rec: BlobRecord =
                serde_json::from_slice(&v).map_err(registry_core::Error::storage)?;
            let parsed = Digest::parse(&d).map_err(registry_core::Error::from)?;
            if !rec.state.is_deleting() && !seen.contains(&parsed) {
                report
                    .problems
                    .push(format!("blob {d}: record without file"));
            }
        }
        Ok(report)
    }

    async fn verify_file(&self, d: &Digest) -> Result<bool> {
        let Some(read) = self.blobs.read(d, None).await? else {
            return Ok(false);
        };
        let mut h = Hasher::new(d.algorithm());
        let mut s = read.stream;
        while let Some(chunk) = s.next().await {
            match chunk {
                Ok(c) => h.update(&c),
                Err(_) => return Ok(false),
            }
        }
        Ok(h.finish() == *d)
    }
}

impl From<FsStore> for Storage {
    fn from(s: FsStore) -> Storage {
        s.into_storage()
    }
}
