//! Small blobs kept in the metadata database instead of as files: in practice, the
//! manifests `put_bytes` stores.
//!
//! A manifest stored as a file costs a new inode (the file system's inode allocator
//! was the largest part of a manifest push's kernel time), a write, an fsync of the
//! file and one of its directory. Kept here, it costs a row in a redb transaction
//! whose fsync is shared with concurrent writers (group commit), and a read is a
//! lookup on the caller's thread instead of an open, a read and a close on the
//! blocking pool. Bytes are kept verbatim under their digest, immutable like a blob
//! file; a read that is to be verified is hashed in full (they are small), so a
//! damaged row is refused before a byte is sent.

use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use registry_core::store::{CommitOutcome, storage_error};
use registry_core::{CommitLog, Digest, Error, Result};

use crate::redb_kv::RedbKv;

/// Digest (`algorithm:hex`) → the blob's bytes. Created by the first write; an older
/// store without it simply has no inline blobs.
const TABLE: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("inline_blobs");

/// Bytes up to this size that arrive whole (`put_bytes`) are kept inline; larger ones,
/// and every upload, are files. Manifests are almost always a few KiB; a redb value
/// this size still lives in a handful of pages.
pub(crate) const INLINE_MAX: usize = 256 * 1024;

/// The inline blobs of one fs store, in its metadata database.
#[derive(Debug, Clone)]
pub(crate) struct InlineBlobs {
    kv: RedbKv,
}

impl InlineBlobs {
    pub(crate) fn new(kv: RedbKv) -> Self {
        InlineBlobs { kv }
    }

    /// Reads `f(value)` for `digest`'s row, if any. In place, like the metadata
    /// lookups: one B-tree path from redb's cache.
    fn lookup<R>(&self, digest: &Digest, f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        let txn = self.kv.database().begin_read().map_err(storage_error)?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage_error(e)),
        };
        let key = digest.to_string();
        let value = table.get(key.as_str()).map_err(storage_error)?;
        Ok(value.map(|v| f(v.value())))
    }

    pub(crate) fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        self.lookup(digest, |v| v.len() as u64)
    }

    pub(crate) fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        self.lookup(digest, Bytes::copy_from_slice)
    }

    /// The log of the database the rows are in (the store's metadata's too).
    pub(crate) fn commit_log(&self) -> CommitLog {
        self.kv.commit_log()
    }

    /// Stores `bytes` (hashed by the caller to `digest`): durable when it returns, or
    /// without `durable` once a later commit to the database is (a link to them).
    /// Blocks. A row already there with the same bytes: `AlreadyPresent`. One with
    /// other bytes was damaged (its digest says what it must hold): it is replaced by
    /// these, and the answer is `AlreadyPresent` too, since the blob existed and may be
    /// referenced.
    pub(crate) fn put(
        &self,
        digest: &Digest,
        bytes: &[u8],
        durable: bool,
    ) -> Result<CommitOutcome> {
        let key = digest.to_string();
        let write = |txn: &redb::WriteTransaction| {
            let mut table = txn.open_table(TABLE).map_err(storage_error)?;
            let same = table
                .get(key.as_str())
                .map_err(storage_error)?
                .map(|v| v.value() == bytes);
            match same {
                Some(true) => Ok(CommitOutcome::AlreadyPresent),
                Some(false) => {
                    tracing::warn!(%digest, "inline blob did not match its digest: replaced");
                    table.insert(key.as_str(), bytes).map_err(storage_error)?;
                    Ok(CommitOutcome::AlreadyPresent)
                }
                None => {
                    table.insert(key.as_str(), bytes).map_err(storage_error)?;
                    Ok(CommitOutcome::Stored)
                }
            }
        };
        if durable {
            self.kv.write_durable(write)
        } else {
            self.kv.write_before_link(write)
        }
    }

    /// Removes `digest`'s row; whether there was one. Blocks.
    pub(crate) fn delete(&self, digest: &Digest) -> Result<bool> {
        if self.size(digest)?.is_none() {
            // Nothing to remove: no write transaction, no fsync (a blob stored as a
            // file, the usual case for what the collector deletes).
            return Ok(false);
        }
        let key = digest.to_string();
        self.kv.write_durable(|txn| {
            let mut table = txn.open_table(TABLE).map_err(storage_error)?;
            let removed = table.remove(key.as_str()).map_err(storage_error)?;
            Ok(removed.is_some())
        })
    }

    /// Every inline blob's digest. Blocks.
    pub(crate) fn list(&self) -> Result<Vec<Digest>> {
        let txn = self.kv.database().begin_read().map_err(storage_error)?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage_error(e)),
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage_error)? {
            let (k, _) = entry.map_err(storage_error)?;
            out.push(Digest::parse(k.value()).map_err(|e| {
                Error::storage(format!("inline blob under a name that is no digest: {e}"))
            })?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use registry_core::kv::KvMetadata;
    use registry_core::manifest::media_type::OCI_MANIFEST;
    use registry_core::testkit::{image_manifest, push_blob, repo, tag_ref};
    use registry_core::{MemoryKv, PutManifestOptions, Registry, Storage};

    use crate::redb_kv::RedbKv;

    /// Durable commits made so far, and whether everything committed is durable.
    fn flushes(kv: &RedbKv) -> (u64, bool) {
        let state = kv.group_state();
        (state.0, state.1 == state.2)
    }

    /// A manifest's bytes kept inline become durable with the commit that links them:
    /// one durable commit for a manifest push, not two, and everything committed is
    /// durable when the push returns. With the metadata in another log, the bytes get
    /// a durable commit of their own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn manifest_bytes_become_durable_with_their_link() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::FsStore::open(dir.path()).await.unwrap();
        let kv = store.metadata.engine().clone();
        let blobs = store.blobs.clone();
        // Durable commits made by pushing a manifest whose blobs are there.
        let manifest_push = |r: Registry, name: &'static str, layer: &'static [u8]| {
            let kv = kv.clone();
            async move {
                let repo = repo(name);
                push_blob(&r, &repo, b"{}").await;
                push_blob(&r, &repo, layer).await;
                let manifest = image_manifest(b"{}", &[layer]);
                let (before, _) = flushes(&kv);
                r.put_manifest(
                    &repo,
                    &tag_ref("v1"),
                    OCI_MANIFEST,
                    Bytes::from(manifest),
                    PutManifestOptions::default(),
                )
                .await
                .unwrap();
                let (after, all_durable) = flushes(&kv);
                assert!(
                    all_durable,
                    "a push returned before its commits were durable"
                );
                assert!(r.get_manifest(&repo, &tag_ref("v1")).await.is_ok());
                after - before
            }
        };
        let r = Registry::builder(store.into_storage()).build();
        assert_eq!(manifest_push(r.clone(), "one/log", b"layer").await, 1);
        assert_eq!(manifest_push(r, "one/log2", b"layer2").await, 1);

        let elsewhere = Registry::builder(Storage {
            blobs,
            metadata: Arc::new(KvMetadata::new(MemoryKv::default())),
        })
        .build();
        assert_eq!(manifest_push(elsewhere, "two/logs", b"layer3").await, 1);
    }
}
