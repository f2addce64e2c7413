//! The in-memory store: the embedded default. Nothing to open, no runtime spawned, gone
//! when dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::kv::{KvEngine, KvMetadata, KvPair, KvRead, KvWrite, Table, TableSet, TableVersions};
use crate::names::RepoName;
use crate::store::{
    BlobRead, BlobStore, ByteRange, ByteStream, CommitOutcome, Storage, UploadId, UploadInfo,
};
use crate::time::Timestamp;

/// In-memory storage for a [`Registry`](crate::Registry): a [`MemoryBlobStore`] and
/// [`KvMetadata`] over a [`MemoryKv`].
///
/// ```
/// let storage = registry_core::MemoryStore::new().into_storage();
/// let registry = registry_core::Registry::builder(storage).build();
/// # let _ = registry;
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    blobs: Arc<MemoryBlobStore>,
    metadata: Arc<KvMetadata<MemoryKv>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The blob half.
    pub fn blobs(&self) -> &Arc<MemoryBlobStore> {
        &self.blobs
    }

    /// The metadata half.
    pub fn metadata(&self) -> &Arc<KvMetadata<MemoryKv>> {
        &self.metadata
    }

    /// Both halves, ready for [`Registry::builder`](crate::Registry::builder).
    pub fn into_storage(self) -> Storage {
        Storage {
            blobs: self.blobs,
            metadata: self.metadata,
        }
    }
}

impl From<MemoryStore> for Storage {
    fn from(s: MemoryStore) -> Storage {
        s.into_storage()
    }
}

impl Default for KvMetadata<MemoryKv> {
    fn default() -> Self {
        KvMetadata::new(MemoryKv::default())
    }
}

type Tables = [BTreeMap<Vec<u8>, Vec<u8>>; Table::ALL.len()];

/// An in-memory [`KvEngine`]: ordered maps behind a reader-writer lock. A write
/// transaction holds the write lock and keeps an undo log, so an `Err` from the closure
/// leaves nothing behind.
#[derive(Debug, Default)]
pub struct MemoryKv {
    tables: RwLock<Tables>,
    versions: TableVersions,
}

struct ReadTxn<'a>(&'a Tables);

fn scan_map(
    map: &BTreeMap<Vec<u8>, Vec<u8>>,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> Vec<KvPair> {
    crate::kv::scan_range(map, prefix, after)
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl KvRead for ReadTxn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0[table.index()].get(key).cloned())
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>> {
        Ok(scan_map(&self.0[table.index()], prefix, after, limit))
    }
    fn count(&self, table: Table) -> Result<u64> {
        Ok(self.0[table.index()].len() as u64)
    }
}

struct WriteTxn<'a> {
    tables: &'a mut Tables,
    undo: Vec<(Table, Vec<u8>, Option<Vec<u8>>)>,
    changed: TableSet,
}

impl KvRead for WriteTxn<'_> {
    // A write transaction reads its own writes: the tables are updated in place.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        ReadTxn(self.tables).get(table, key)
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>> {
        ReadTxn(self.tables).scan(table, prefix, after, limit)
    }
    fn count(&self, table: Table) -> Result<u64> {
        ReadTxn(self.tables).count(table)
    }
}

impl KvWrite for WriteTxn<'_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        let old = self.tables[table.index()].insert(key.to_vec(), value.to_vec());
        self.undo.push((table, key.to_vec(), old));
        self.changed.insert_key(table, key);
        Ok(())
    }
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<bool> {
        let old = self.tables[table.index()].remove(key);
        let existed = old.is_some();
        if existed {
            self.undo.push((table, key.to_vec(), old));
            self.changed.insert_key(table, key);
        }
        Ok(existed)
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::storage("in-memory store lock poisoned by a panic")
}

impl KvEngine for MemoryKv {
    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let tables = self.tables.read().map_err(poisoned)?;
        f(&ReadTxn(&tables))
    }

    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut dyn KvWrite) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let mut tables = self.tables.write().map_err(poisoned)?;
        let mut txn = WriteTxn {
            tables: &mut tables,
            undo: Vec::new(),
            changed: TableSet::default(),
        };
        let result = f(&mut txn);
        let WriteTxn {
            tables,
            undo,
            changed,
        } = txn;
        if result.is_err() {
            for (table, key, old) in undo.into_iter().rev() {
                match old {
                    Some(v) => tables[table.index()].insert(key, v),
                    None => tables[table.index()].remove(&key),
                };
            }
        } else {
            // Under the write lock: a reader waiting for it may read the old counter
            // and then the new tables, which only wastes what it keeps.
            self.versions.bump(changed);
        }
        result
    }

    /// Every write goes through this value (it is not shared with other processes).
    fn key_version(&self, table: Table, key: &[u8]) -> Option<u64> {
        Some(self.versions.get(table, key))
    }
}

/// A blob held as the chunks it arrived in (shared, never copied).
#[derive(Debug, Clone, Default)]
struct Chunks {
    parts: Vec<Bytes>,
    len: u64,
}

impl Chunks {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len() as u64;
            self.parts.push(b);
        }
    }

    fn stream(&self, range: Option<ByteRange>) -> ByteStream {
        let (start, end) = match range {
            Some(r) => (r.start, r.end + 1),
            None => (0, self.len),
        };
        let mut out = Vec::new();
        let mut offset = 0u64;
        for part in &self.parts {
            let (lo, hi) = (offset, offset + part.len() as u64);
            offset = hi;
            if hi <= start || lo >= end {
                continue;
            }
            let s = start.saturating_sub(lo) as usize;
            let e = (end.min(hi) - lo) as usize;
            out.push(Ok(part.slice(s..e)));
        }
        stream::iter(out).boxed()
    }
}

#[derive(Debug)]
struct Upload {
    repo: RepoName,
    data: Chunks,
    started_at: Timestamp,
    updated_at: Timestamp,
}

/// Blobs and upload sessions in memory.
#[derive(Debug, Default)]
pub struct MemoryBlobStore {
    blobs: RwLock<HashMap<Digest, Chunks>>,
    uploads: Mutex<HashMap<UploadId, Upload>>,
}

impl MemoryBlobStore {
    /// Total bytes held in committed blobs.
    pub fn bytes_stored(&self) -> u64 {
        self.blobs
            .read()
            .map(|b| b.values().map(|c| c.len).sum())
            .unwrap_or(0)
    }

    fn upload_mut<R>(&self, id: &UploadId, f: impl FnOnce(&mut Upload) -> Result<R>) -> Result<R> {
        let mut uploads = self.uploads.lock().map_err(poisoned)?;
        let upload = uploads
            .get_mut(id)
            .ok_or_else(|| Error::UploadUnknown { id: id.to_string() })?;
        f(upload)
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(self
            .blobs
            .read()
            .map_err(poisoned)?
            .get(digest)
            .map(|c| c.len))
    }

    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobRead>> {
        let blobs = self.blobs.read().map_err(poisoned)?;
        let Some(chunks) = blobs.get(digest) else {
            return Ok(None);
        };
        if let Some(r) = range
            && (r.end >= chunks.len || r.start > r.end)
        {
            return Err(Error::RangeNotSatisfiable { size: chunks.len });
        }
        Ok(Some(BlobRead {
            size: chunks.len,
            range,
            stream: chunks.stream(range),
        }))
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        Ok(self
            .blobs
            .write()
            .map_err(poisoned)?
            .remove(digest)
            .is_some())
    }

    async fn list(&self) -> Result<BoxStream<'static, Result<Digest>>> {
        let digests: Vec<_> = self
            .blobs
            .read()
            .map_err(poisoned)?
            .keys()
            .cloned()
            .map(Ok)
            .collect();
        Ok(stream::iter(digests).boxed())
    }

    async fn create_upload(&self, id: &UploadId, repo: &RepoName, now: Timestamp) -> Result<()> {
        self.uploads.lock().map_err(poisoned)?.insert(
            id.clone(),
            Upload {
                repo: repo.clone(),
                data: Chunks::default(),
                started_at: now,
                updated_at: now,
            },
        );
        Ok(())
    }

    async fn upload_info(&self, id: &UploadId) -> Result<Option<UploadInfo>> {
        Ok(self
            .uploads
            .lock()
            .map_err(poisoned)?
            .get(id)
            .map(|u| UploadInfo {
                id: id.clone(),
                repo: u.repo.clone(),
                len: u.data.len,
                started_at: u.started_at,
                updated_at: u.updated_at,
            }))
    }

    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        mut data: ByteStream,
        now: Timestamp,
    ) -> Result<u64> {
        let check = |u: &mut Upload| {
            if u.data.len != offset {
                return Err(Error::UploadOffset {
                    expected: u.data.len,
                    got: offset,
                });
            }
            Ok(())
        };
        self.upload_mut(id, check)?;
        // Collect first so that a failing stream leaves the session untouched.
        let mut received = Chunks::default();
        while let Some(chunk) = data.next().await {
            received.push(chunk.map_err(Error::storage)?);
        }
        self.upload_mut(id, |u| {
            check(u)?;
            for part in received.parts {
                u.data.push(part);
            }
            u.updated_at = now;
            Ok(u.data.len)
        })
    }

    async fn read_upload(&self, id: &UploadId) -> Result<ByteStream> {
        self.upload_mut(id, |u| Ok(u.data.stream(None)))
    }

    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<CommitOutcome> {
        let data = self.upload_mut(id, |u| Ok(u.data.clone()))?;
        if data.len != len {
            return Err(Error::UploadOffset {
                expected: data.len,
                got: len,
            });
        }
        let mut blobs = self.blobs.write().map_err(poisoned)?;
        if blobs.contains_key(digest) {
            return Ok(CommitOutcome::AlreadyPresent);
        }
        blobs.insert(digest.clone(), data);
        Ok(CommitOutcome::Stored)
    }

    async fn delete_upload(&self, id: &UploadId) -> Result<bool> {
        Ok(self.uploads.lock().map_err(poisoned)?.remove(id).is_some())
    }

    async fn list_uploads(&self) -> Result<Vec<UploadInfo>> {
        Ok(self
            .uploads
            .lock()
            .map_err(poisoned)?
            .iter()
            .map(|(id, u)| UploadInfo {
                id: id.clone(),
                repo: u.repo.clone(),
                len: u.data.len,
                started_at: u.started_at,
                updated_at: u.updated_at,
            })
            .collect())
    }
}
