//! Blob bytes and upload sessions as objects.
//!
//! Layout under the store's root:
//! - `blobs/<algorithm>/<hex>`: a committed blob, immutable.
//! - `uploads/<id>/info`: the session (repository, start time), created if absent.
//! - `uploads/<id>/data/<offset>-<updated ms>-<uuid>`: the bytes of one append.
//! - `uploads/<id>/claim/<offset>`: names the append that owns `offset`, created if
//!   absent. The data object is written first and the claim decides: of two appends
//!   racing for one offset (two processes continuing one session) exactly one wins, and
//!   the loser deletes its data and reports the offset error. Without the claim, a
//!   large append (a multipart upload, which cannot be conditional) could silently
//!   replace another's bytes under a hash state computed from different ones.
//!
//! A session's length is the sum of its claimed appends from offset 0, read from one
//! listing of the session's prefix; the claims are read only when a listing shows two
//! candidates for one offset (a loser not yet cleaned up).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    WriteMultipart,
};
use registry_core::store::{
    BlobRead, BlobStore, ByteRange, ByteStream, CommitOutcome, UploadId, UploadInfo,
};
use registry_core::{Digest, Error, RepoName, Result, Timestamp};
use serde::{Deserialize, Serialize};

use crate::os_err;

/// Appends up to this size are written with one conditional put; larger ones stream
/// through a multipart upload in parts of this size (S3's minimum part is 5 MiB). It
/// bounds the memory of one request.
pub(crate) const PART_SIZE: usize = 5 * 1024 * 1024;

/// Multipart parts in flight per request.
const PART_CONCURRENCY: usize = 2;

/// Session records kept per process before the cache starts over.
const RECORD_CACHE: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRecord {
    repo: String,
    started_at: u64,
}

/// One append of a session, as listed.
#[derive(Debug, Clone)]
struct Piece {
    updated_at: u64,
    location: Path,
    size: u64,
}

/// [`BlobStore`] over an object store.
#[derive(Debug, Clone)]
pub struct ObjectBlobStore {
    store: Arc<dyn ObjectStore>,
    blobs: Path,
    uploads: Path,
    /// Session records read or written by this process (a cache: sessions are listed
    /// for existence every time).
    records: Arc<Mutex<HashMap<UploadId, SessionRecord>>>,
    /// Presigns blob GETs; see `BucketStore::with_signer`.
    #[cfg(any(feature = "aws", feature = "azure", feature = "gcp"))]
    pub(crate) signer: Option<Arc<dyn object_store::signer::Signer>>,
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// Deleting a missing object is success on S3 and `NotFound` on Azure: both mean gone.
async fn delete_quietly(store: &dyn ObjectStore, p: &Path) -> Result<bool> {
    match store.delete(p).await {
        Ok(()) => Ok(true),
        Err(e) if not_found(&e) => Ok(false),
        Err(e) => Err(os_err(e)),
    }
}

fn io_error(e: object_store::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl ObjectBlobStore {
    pub(crate) fn new(store: Arc<dyn ObjectStore>, root: &Path) -> Self {
        ObjectBlobStore {
            store,
            blobs: root.clone().join("blobs"),
            uploads: root.clone().join("uploads"),
            records: Arc::default(),
            #[cfg(any(feature = "aws", feature = "azure", feature = "gcp"))]
            signer: None,
        }
    }

    fn blob_path(&self, d: &Digest) -> Path {
        self.blobs
            .clone()
            .join(d.algorithm().name())
            .clone()
            .join(d.hex())
    }

    fn session(&self, id: &UploadId) -> Path {
        self.uploads.clone().join(id.as_str())
    }

    /// The session's appends that count, in offset order, with the session record; `None`
    /// if the session does not exist.
    async fn pieces(&self, id: &UploadId) -> Result<Option<(SessionRecord, Vec<Piece>)>> {
        let dir = self.session(id);
        let info = dir.clone().join("info");
        // One listing shows whether the session exists, and every append and claim.
        let listed: Vec<ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(os_err)?;
        if !listed.iter().any(|m| m.location == info) {
            self.forget(id);
            return Ok(None);
        }
        let Some(record) = self.record(id, &info).await? else {
            return Ok(None);
        };
        let mut by_offset: BTreeMap<u64, Vec<Piece>> = BTreeMap::new();
        let mut claimed = std::collections::HashSet::new();
        for meta in listed {
            let parts: Vec<_> = meta.location.parts().collect();
            let [.., kind, name] = parts.as_slice() else {
                continue;
            };
            let (kind, name) = (kind.as_ref(), name.as_ref());
            if kind == "claim" {
                if let Ok(offset) = name.parse::<u64>() {
                    claimed.insert(offset);
                }
                continue;
            }
            if kind != "data" {
                continue;
            }
            let mut fields = name.splitn(3, '-');
            let (Some(offset), Some(updated), Some(_)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Ok(offset), Ok(updated_at)) = (offset.parse(), updated.parse()) else {
                continue;
            };
            by_offset.entry(offset).or_default().push(Piece {
                updated_at,
                location: meta.location.clone(),
                size: meta.size,
            });
        }
        let mut pieces = Vec::new();
        let mut len = 0;
        for (offset, mut candidates) in by_offset {
            // Appends count only from offset 0 without gaps, and only once claimed (the
            // data object is written before its claim).
            if offset != len || !claimed.contains(&offset) {
                break;
            }
            let winner = if candidates.len() == 1 {
                // The claimer wrote its data before claiming, so a lone candidate of a
                // claimed offset is the claimer's.
                candidates.pop()
            } else {
                let claim = self.claimed(id, offset).await?;
                candidates
                    .into_iter()
                    .find(|p| claim.as_deref() == p.location.filename())
            };
            let Some(winner) = winner else { break };
            len += winner.size;
            pieces.push(winner);
        }
        Ok(Some((record, pieces)))
    }

    /// A session's record: immutable once created, so read once per process. `None`
    /// if the session was deleted since it was listed.
    async fn record(&self, id: &UploadId, info: &Path) -> Result<Option<SessionRecord>> {
        if let Some(r) = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Ok(Some(r.clone()));
        }
        let bytes = match self.store.get(info).await {
            Ok(r) => r.bytes().await.map_err(os_err)?,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(os_err(e)),
        };
        let record: SessionRecord = serde_json::from_slice(&bytes).map_err(Error::storage)?;
        self.remember(id, &record);
        Ok(Some(record))
    }

    fn remember(&self, id: &UploadId, record: &SessionRecord) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() >= RECORD_CACHE {
            // Sessions other processes finished are never forgotten one by one here.
            records.clear();
        }
        records.insert(id.clone(), record.clone());
    }

    fn forget(&self, id: &UploadId) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The data object name the claim of `offset` names, if claimed.
    async fn claimed(&self, id: &UploadId, offset: u64) -> Result<Option<String>> {
        let claim = self
            .session(id)
            .clone()
            .join("claim")
            .clone()
            .join(format!("{offset:020}"));
        match self.store.get(&claim).await {
            Ok(r) => {
                let b = r.bytes().await.map_err(os_err)?;
                Ok(Some(String::from_utf8_lossy(&b).into_owned()))
            }
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }

    /// Streams `pieces` one after another.
    fn concat(&self, pieces: Vec<Piece>) -> ByteStream {
        let store = self.store.clone();
        stream::iter(pieces)
            .then(move |p| {
                let store = store.clone();
                async move {
                    match store.get(&p.location).await {
                        Ok(r) => r.into_stream().map_err(io_error).boxed(),
                        Err(e) => stream::once(async move { Err(io_error(e)) }).boxed(),
                    }
                }
            })
            .flatten()
            .boxed()
    }

    /// Writes `data` to `location`: one put when it is small, a multipart upload
    /// otherwise. Returns the size written; nothing is left behind on error.
    async fn write_object(&self, location: &Path, mut data: ByteStream) -> Result<u64> {
        let mut first = Vec::new();
        let mut buffered = 0;
        while buffered < PART_SIZE {
            match data.next().await {
                Some(Ok(chunk)) => {
                    buffered += chunk.len();
                    first.push(chunk);
                }
                Some(Err(e)) => return Err(Error::storage(e)),
                None => {
                    let payload: PutPayload = first.into_iter().collect();
                    self.store.put(location, payload).await.map_err(os_err)?;
                    return Ok(buffered as u64);
                }
            }
        }
        let upload = self.store.put_multipart(location).await.map_err(os_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut written = 0u64;
        for chunk in first {
            written += chunk.len() as u64;
            writer.put(chunk);
        }
        loop {
            let next = match data.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => {
                    let _ = writer.abort().await;
                    return Err(Error::storage(e));
                }
                None => break,
            };
            if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
                let _ = writer.abort().await;
                return Err(os_err(e));
            }
            written += next.len() as u64;
            writer.put(next);
        }
        writer.finish().await.map_err(os_err)?;
        Ok(written)
    }

    /// When a blob's object was last written (`None` if it does not exist): how old an
    /// orphan is, for [`crate::BucketStore::check`].
    pub(crate) async fn last_modified(&self, d: &Digest) -> Result<Option<SystemTime>> {
        match self.store.head(&self.blob_path(d)).await {
            Ok(meta) => {
                let ms = u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
                Ok(Some(UNIX_EPOCH + Duration::from_millis(ms)))
            }
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }

    /// Copies `from` to the blob's name unless it exists: the one atomic step that makes
    /// a blob readable.
    async fn publish(&self, from: &Path, d: &Digest) -> Result<CommitOutcome> {
        match self
            .store
            .copy_if_not_exists(from, &self.blob_path(d))
            .await
        {
            Ok(()) => Ok(CommitOutcome::Stored),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(CommitOutcome::AlreadyPresent),
            Err(e) => Err(os_err(e)),
        }
    }
}

#[async_trait]
impl BlobStore for ObjectBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.store.head(&self.blob_path(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobRead>> {
        let path = self.blob_path(digest);
        let options = GetOptions {
            range: range.map(|r| GetRange::Bounded(r.start..r.end + 1)),
            ..Default::default()
        };
        let result = match self.store.get_opts(&path, options).await {
            Ok(r) => r,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => {
                // A range past the end: answer with the size, as the contract asks.
                if range.is_some()
                    && let Some(size) = self.stat(digest).await?
                {
                    return Err(Error::RangeNotSatisfiable { size });
                }
                return Err(os_err(e));
            }
        };
        let size = result.meta.size;
        if let Some(r) = range
            && (r.end >= size || r.start > r.end)
        {
            return Err(Error::RangeNotSatisfiable { size });
        }
        Ok(Some(BlobRead {
            size,
            range,
            stream: result.into_stream().map_err(io_error).boxed(),
        }))
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        // Whether it existed matters to callers' reports only; a HEAD first keeps it exact.
        if self.stat(digest).await?.is_none() {
            return Ok(false);
        }
        delete_quietly(self.store.as_ref(), &self.blob_path(digest)).await
    }

    async fn list(&self) -> Result<BoxStream<'static, Result<Digest>>> {
        Ok(self
            .store
            .list(Some(&self.blobs))
            .map_err(os_err)
            .try_filter_map(|meta| async move {
                let mut parts = meta.location.parts().collect::<Vec<_>>().into_iter().rev();
                let (Some(hex), Some(algorithm)) = (parts.next(), parts.next()) else {
                    return Ok(None);
                };
                // Anything that is not a blob name (a stray object) is not a blob.
                Ok(Digest::parse(&format!("{}:{}", algorithm.as_ref(), hex.as_ref())).ok())
            })
            .boxed())
    }

    async fn create_upload(&self, id: &UploadId, repo: &RepoName, now: Timestamp) -> Result<()> {
        let record = SessionRecord {
            repo: repo.to_string(),
            started_at: now.0,
        };
        let body = serde_json::to_vec(&record).map_err(Error::storage)?;
        self.store
            .put_opts(
                &self.session(id).clone().join("info"),
                PutPayload::from(body),
                PutOptions::from(PutMode::Create),
            )
            .await
            .map_err(os_err)?;
        self.remember(id, &record);
        Ok(())
    }

    async fn upload_info(&self, id: &UploadId) -> Result<Option<UploadInfo>> {
        let Some((record, pieces)) = self.pieces(id).await? else {
            return Ok(None);
        };
        let repo = RepoName::parse(&record.repo).map_err(Error::storage)?;
        Ok(Some(UploadInfo {
            id: id.clone(),
            repo,
            len: pieces.iter().map(|p| p.size).sum(),
            started_at: Timestamp(record.started_at),
            updated_at: Timestamp(
                pieces
                    .last()
                    .map_or(record.started_at, |p| p.updated_at.max(record.started_at)),
            ),
        }))
    }

    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        data: ByteStream,
        now: Timestamp,
    ) -> Result<u64> {
        let dir = self.session(id);
        let name = format!("{offset:020}-{}-{}", now.0, uuid::Uuid::new_v4().simple());
        let location = dir.clone().join("data").clone().join(name.as_str());
        let written = self.write_object(&location, data).await?;
        if written == 0 {
            // Nothing to claim; an empty object would only cost a request to clean up.
            delete_quietly(self.store.as_ref(), &location).await?;
            return Ok(offset);
        }
        let claim = self
            .store
            .put_opts(
                &dir.clone()
                    .join("claim")
                    .clone()
                    .join(format!("{offset:020}")),
                PutPayload::from(name.into_bytes()),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match claim {
            Ok(_) => Ok(offset + written),
            Err(e) => {
                delete_quietly(self.store.as_ref(), &location).await?;
                match e {
                    object_store::Error::AlreadyExists { .. } => {
                        let expected = self.upload_info(id).await?.map_or(0, |i| i.len);
                        Err(Error::UploadOffset {
                            expected,
                            got: offset,
                        })
                    }
                    e => Err(os_err(e)),
                }
            }
        }
    }

    async fn read_upload(&self, id: &UploadId) -> Result<ByteStream> {
        let Some((_, pieces)) = self.pieces(id).await? else {
            return Err(Error::UploadUnknown { id: id.to_string() });
        };
        Ok(self.concat(pieces))
    }

    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<CommitOutcome> {
        let Some((_, mut pieces)) = self.pieces(id).await? else {
            return Err(Error::UploadUnknown { id: id.to_string() });
        };
        let actual: u64 = pieces.iter().map(|p| p.size).sum();
        if actual != len {
            return Err(Error::UploadOffset {
                expected: actual,
                got: len,
            });
        }
        // No HEAD first: publishing is create-if-absent and reports an existing blob.
        match pieces.len() {
            0 => {
                let put = self
                    .store
                    .put_opts(
                        &self.blob_path(digest),
                        PutPayload::default(),
                        PutOptions::from(PutMode::Create),
                    )
                    .await;
                match put {
                    Ok(_) => Ok(CommitOutcome::Stored),
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        Ok(CommitOutcome::AlreadyPresent)
                    }
                    Err(e) => Err(os_err(e)),
                }
            }
            // One append (a monolithic push): a server-side copy, no bytes move through us.
            1 => {
                self.publish(&pieces.pop().expect("one piece").location, digest)
                    .await
            }
            _ => {
                // Several appends: joined into one object first (the stores cannot
                // concatenate objects server-side through object_store), then published.
                let joined = self
                    .session(id)
                    .clone()
                    .join(format!("joined-{}", uuid::Uuid::new_v4().simple()));
                let result = async {
                    self.write_object(&joined, self.concat(pieces)).await?;
                    self.publish(&joined, digest).await
                }
                .await;
                delete_quietly(self.store.as_ref(), &joined).await?;
                result
            }
        }
    }

    async fn delete_upload(&self, id: &UploadId) -> Result<bool> {
        let dir = self.session(id);
        let info = dir.clone().join("info");
        let objects: Vec<Path> = self
            .store
            .list(Some(&dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(os_err)?;
        self.forget(id);
        // The record last: until it is gone the session is whole or listed for cleanup.
        // The rest in one bulk request where the store has one (S3 DeleteObjects).
        let rest: Vec<_> = objects
            .iter()
            .filter(|p| **p != info)
            .cloned()
            .map(Ok)
            .collect();
        if !rest.is_empty() {
            let mut deleted = self.store.delete_stream(stream::iter(rest).boxed());
            while let Some(result) = deleted.next().await {
                match result {
                    Ok(_) => {}
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(os_err(e)),
                }
            }
        }
        delete_quietly(self.store.as_ref(), &info).await
    }

    async fn list_uploads(&self) -> Result<Vec<UploadInfo>> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.uploads))
            .await
            .map_err(os_err)?;
        let mut sessions = Vec::new();
        for dir in listed.common_prefixes {
            let Some(id) = dir.filename().and_then(UploadId::parse) else {
                continue;
            };
            match self.upload_info(&id).await? {
                Some(info) => sessions.push(info),
                // Leftovers of a deleted session (an append that finished after the
                // delete): nothing can reach them; remove them.
                None => {
                    self.delete_upload(&id).await?;
                }
            }
        }
        Ok(sessions)
    }

    async fn presigned_get(&self, digest: &Digest, ttl: Duration) -> Result<Option<String>> {
        #[cfg(any(feature = "aws", feature = "azure", feature = "gcp"))]
        if let Some(signer) = &self.signer {
            // The `http` crate's `GET`, named through the signer's parameter type.
            let get = "GET".parse().expect("GET is a method");
            let url = signer
                .signed_url(get, &self.blob_path(digest), ttl)
                .await
                .map_err(os_err)?;
            return Ok(Some(url.to_string()));
        }
        let _ = (digest, ttl);
        Ok(None)
    }
}
