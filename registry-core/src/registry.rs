//! [`Registry`]: the OCI registry semantics over any [`Storage`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use tokio::sync::broadcast;

use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::manifest::{Descriptor, ManifestInfo};
use crate::names::{Reference, RepoName, Tag};
use crate::policy::{Policy, Quota, TagPattern};
use crate::store::{
    BlobStore, ByteRange, ByteStream, LinkOutcome, ManifestRecord, MetadataStore, NewManifest,
    Storage, UploadId, UploadInfo,
};
use crate::time::{Clock, SystemClock, Timestamp};

/// Default manifest size limit: 4 MiB, as the distribution spec suggests.
pub const DEFAULT_MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
/// Default protection window for uploaded, mounted or confirmed blobs.
pub const DEFAULT_PROTECTION_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Default idle time after which an upload session expires.
pub const DEFAULT_UPLOAD_EXPIRY: Duration = Duration::from_secs(60 * 60);
/// Default (and maximum) page size for tag, catalog and referrer listings.
pub const DEFAULT_MAX_PAGE_SIZE: usize = 10_000;

/// Default deletion lease: a byte deletion takes milliseconds; a holder silent for this
/// long has crashed.
pub const DEFAULT_DELETION_LEASE: Duration = Duration::from_secs(30);

/// Default limit on open upload sessions, in total.
pub const DEFAULT_MAX_OPEN_UPLOADS: u64 = 10_000;
/// Default limit on open upload sessions per repository.
pub const DEFAULT_MAX_OPEN_UPLOADS_PER_REPO: u64 = 1_000;

/// How many times a commit retries when it races with the collector on the same blob.
const COMMIT_ATTEMPTS: usize = 8;

/// Configuration of a [`Registry`], built with [`Registry::builder`].
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Largest manifest accepted, in bytes.
    pub max_manifest_size: u64,
    /// Largest blob accepted, in bytes.
    pub max_blob_size: u64,
    /// How long an uploaded, mounted or confirmed blob is protected from collection.
    pub protection_window: Duration,
    /// Idle time after which an upload session is forgotten.
    pub upload_expiry: Duration,
    /// Largest page returned by listings (also the page size when none is asked for).
    pub max_page_size: usize,
    /// Hash full blob reads while streaming and fail the stream if the bytes do not
    /// match their digest (protects against storage corrupted behind our back).
    pub verify_reads: bool,
    /// How long a collector's lease to delete a blob's bytes lasts before another
    /// process may take it over (the holder is then presumed dead).
    pub deletion_lease: Duration,
    /// Most upload sessions open at once in this process, over all repositories.
    pub max_open_uploads: u64,
    /// Most upload sessions open at once in this process in one repository.
    pub max_open_uploads_per_repo: u64,
    /// Immutable tags and quotas, enforced inside the metadata store's atomic changes.
    pub policy: Policy,
    /// Refuse every write ([`Error::ReadOnly`]); the collector only runs dry.
    pub read_only: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_manifest_size: DEFAULT_MAX_MANIFEST_SIZE,
            max_blob_size: u64::MAX,
            protection_window: DEFAULT_PROTECTION_WINDOW,
            upload_expiry: DEFAULT_UPLOAD_EXPIRY,
            max_page_size: DEFAULT_MAX_PAGE_SIZE,
            verify_reads: true,
            deletion_lease: DEFAULT_DELETION_LEASE,
            max_open_uploads: DEFAULT_MAX_OPEN_UPLOADS,
            max_open_uploads_per_repo: DEFAULT_MAX_OPEN_UPLOADS_PER_REPO,
            policy: Policy::default(),
            read_only: false,
        }
    }
}

/// Builds a [`Registry`].
#[derive(Debug)]
pub struct RegistryBuilder {
    storage: Storage,
    config: RegistryConfig,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({:?})", self.now())
    }
}

impl RegistryBuilder {
    /// Sets the manifest size limit (default 4 MiB).
    pub fn with_max_manifest_size(mut self, bytes: u64) -> Self {
        self.config.max_manifest_size = bytes;
        self
    }
    /// Sets the blob size limit (default unlimited).
    pub fn with_max_blob_size(mut self, bytes: u64) -> Self {
        self.config.max_blob_size = bytes;
        self
    }
    /// Sets the protection window (default 10 minutes; zero allowed).
    pub fn with_protection_window(mut self, window: Duration) -> Self {
        self.config.protection_window = window;
        self
    }
    /// Sets the idle expiry of upload sessions (default 1 hour).
    pub fn with_upload_expiry(mut self, expiry: Duration) -> Self {
        self.config.upload_expiry = expiry;
        self
    }
    /// Sets the largest page a listing returns (default 10,000).
    pub fn with_max_page_size(mut self, n: usize) -> Self {
        self.config.max_page_size = n.max(1);
        self
    }
    /// Turns digest verification of full blob reads on or off (default on).
    pub fn with_verify_reads(mut self, on: bool) -> Self {
        self.config.verify_reads = on;
        self
    }
    /// Sets the deletion lease (default 30 s).
    pub fn with_deletion_lease(mut self, lease: Duration) -> Self {
        self.config.deletion_lease = lease;
        self
    }
    /// Limits open upload sessions, in total and per repository (defaults 10,000 and
    /// 1,000). Past them, new sessions get [`Error::TooManyRequests`].
    pub fn with_max_open_uploads(mut self, total: u64, per_repo: u64) -> Self {
        self.config.max_open_uploads = total;
        self.config.max_open_uploads_per_repo = per_repo;
        self
    }
    /// Makes the tags matching `pattern` immutable: once such a tag exists, pushing
    /// another manifest under it, re-tagging it, or deleting it (directly, or by deleting
    /// its manifest) is refused with [`Error::ImmutableTag`]. Pushing the manifest it
    /// already points at again is allowed. May be called several times.
    pub fn with_immutable_tags(mut self, pattern: TagPattern) -> Self {
        self.config.policy.immutable_tags.push(pattern);
        self
    }
    /// Limits the distinct blobs and manifests linked in the repositories under `prefix`
    /// to `bytes` bytes together. A push that would exceed it is refused with
    /// [`Error::QuotaExceeded`] and links nothing. May be called for several prefixes
    /// (nested prefixes are each enforced).
    pub fn with_quota(mut self, prefix: RepoName, bytes: u64) -> Self {
        self.config.policy.quotas.push(Quota { prefix, bytes });
        self
    }
    /// Makes the registry read-only: uploads, manifest pushes, tags, deletes and
    /// collection are refused with [`Error::ReadOnly`] (a dry-run collection still
    /// reports). Reads do not even refresh blob protection.
    pub fn read_only(mut self, on: bool) -> Self {
        self.config.read_only = on;
        self
    }
    /// Uses another clock (tests use [`ManualClock`](crate::ManualClock)).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
    /// Replaces the whole configuration.
    pub fn with_config(mut self, config: RegistryConfig) -> Self {
        self.config = config;
        self
    }
    /// Builds the registry. Cheap: no I/O, no task spawned.
    pub fn build(self) -> Registry {
        let (events, _) = broadcast::channel(1024);
        Registry {
            inner: Arc::new(Inner {
                blobs: self.storage.blobs,
                meta: self.storage.metadata,
                config: self.config,
                clock: self.clock,
                events,
                hashers: Mutex::new(HashMap::new()),
                open_uploads: tokio::sync::Mutex::new(None),
            }),
        }
    }
}

/// An OCI registry over some [`Storage`]. Cheap to clone; clones share everything.
///
/// Every method validates its input, keeps the invariants of `docs/design.md`, and
/// reports failures as typed [`Error`]s.
#[derive(Clone, Debug)]
pub struct Registry {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) meta: Arc<dyn MetadataStore>,
    pub(crate) config: RegistryConfig,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<Event>,
    /// Incremental hash state of upload sessions in this process. Lost on restart (the
    /// upload is then re-hashed from storage when it finishes).
    hashers: Mutex<HashMap<UploadId, Hasher>>,
    /// Open upload sessions per repository, counted from storage on first use, then
    /// kept up to date by this process (sessions of other processes sharing the store
    /// are not seen: the limits are per process).
    open_uploads: tokio::sync::Mutex<Option<HashMap<RepoName, u64>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// An upload session's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadStatus {
    /// The session id (opaque to clients).
    pub id: UploadId,
    /// Bytes received so far; the next chunk must start here.
    pub offset: u64,
}

/// A blob's identity and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
}

/// A byte range as a client asks for it, before it is resolved against the blob size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// `start-end`, inclusive.
    FromTo(u64, u64),
    /// `start-`
    From(u64),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

impl RangeRequest {
    /// Resolves against a blob of `size` bytes (RFC 9110 rules: an end past the blob is
    /// clamped; a start past it, or an empty suffix, is unsatisfiable).
    pub fn resolve(self, size: u64) -> Result<ByteRange> {
        let unsatisfiable = Error::RangeNotSatisfiable { size };
        let (start, end) = match self {
            RangeRequest::FromTo(s, e) if s <= e => (s, e.min(size.saturating_sub(1))),
            RangeRequest::FromTo(..) => return Err(unsatisfiable),
            RangeRequest::From(s) => (s, size.saturating_sub(1)),
            RangeRequest::Suffix(0) => return Err(unsatisfiable),
            RangeRequest::Suffix(n) => (size.saturating_sub(n), size.saturating_sub(1)),
        };
        if size == 0 || start >= size {
            return Err(unsatisfiable);
        }
        Ok(ByteRange { start, end })
    }
}

/// A blob being read.
pub struct BlobBody {
    /// Digest of the whole blob.
    pub digest: Digest,
    /// Size of the whole blob.
    pub size: u64,
    /// The range streamed, `None` for the whole blob.
    pub range: Option<ByteRange>,
    /// The bytes.
    pub stream: ByteStream,
}

impl std::fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobBody")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// A manifest's metadata, without its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestMeta {
    /// Digest of the raw bytes.
    pub digest: Digest,
    /// Media type it was pushed with.
    pub media_type: String,
    /// Size of the raw bytes.
    pub size: u64,
}

/// A manifest with its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Digest, media type and size.
    pub meta: ManifestMeta,
    /// The bytes exactly as pushed.
    pub bytes: Bytes,
}

/// Knobs for [`Registry::put_manifest`].
#[derive(Debug, Clone, Default)]
pub struct PutManifestOptions {
    /// More tags to point at the manifest in the same atomic change.
    pub tags: Vec<Tag>,
}

/// The result of a manifest push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutManifestResult {
    /// Digest of the bytes.
    pub digest: Digest,
    /// The subject, when the manifest is a referrer (`OCI-Subject`).
    pub subject: Option<Digest>,
    /// Every tag now pointing at the manifest from this push.
    pub tags: Vec<Tag>,
}

/// Paging for listings: at most `n` items strictly after `last`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Page size (capped at the registry's maximum; `None` means the maximum).
    pub n: Option<usize>,
    /// Only items that sort strictly after this one.
    pub last: Option<String>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, sorted.
    pub items: Vec<T>,
    /// When more items remain: the `last` to ask for the next page.
    pub next: Option<String>,
}

/// Who may read which repository, for mounts (and later listings).
pub trait ReadAccess: Send + Sync {
    /// Whether the caller may read `repo`.
    fn can_read(&self, repo: &RepoName) -> bool;
}

/// Everyone may read everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl ReadAccess for AllowAll {
    fn can_read(&self, _: &RepoName) -> bool {
        true
    }
}

impl<F: Fn(&RepoName) -> bool + Send + Sync> ReadAccess for F {
    fn can_read(&self, repo: &RepoName) -> bool {
        self(repo)
    }
}

/// Where the bytes being committed are.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// An upload session (kept until the blob is linked, so a commit can be repeated).
    Upload(&'a UploadId),
    /// In memory, whole (a manifest): stored in one call, again if need be.
    Bytes {
        repo: &'a RepoName,
        bytes: &'a Bytes,
    },
}

/// What to link once bytes are committed.
enum LinkStep<'a> {
    Blob {
        repo: &'a RepoName,
        size: u64,
    },
    Manifest {
        repo: &'a RepoName,
        manifest: &'a NewManifest,
    },
}

/// A stream adapter failure, recorded so that the typed error survives the trip
/// through the store (which only sees an `io::Error`).
type FailureCell = Arc<Mutex<Option<Error>>>;

impl Registry {
    /// Starts building a registry over `storage`.
    pub fn builder(storage: impl Into<Storage>) -> RegistryBuilder {
        RegistryBuilder {
            storage: storage.into(),
            config: RegistryConfig::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// A registry over a fresh [`MemoryStore`](crate::MemoryStore) with defaults.
    pub fn in_memory() -> Registry {
        Registry::builder(crate::MemoryStore::new()).build()
    }

    /// The configuration.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// The storage, for adapters' own maintenance tools.
    pub fn storage(&self) -> Storage {
        Storage {
            blobs: self.inner.blobs.clone(),
            metadata: self.inner.meta.clone(),
        }
    }

    /// Receives every [`Event`] from now on. A receiver that falls more than 1,024 events
    /// behind loses the oldest ones (and is told so by `recv`).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    pub(crate) fn emit(&self, event: Event) {
        tracing::debug!(?event, "registry event");
        // No subscriber is not an error.
        let _ = self.inner.events.send(event);
    }

    /// Refuses writes in read-only mode.
    pub(crate) fn check_writable(&self, operation: &'static str) -> Result<()> {
        if self.inner.config.read_only {
            return Err(Error::ReadOnly { operation });
        }
        Ok(())
    }

    fn policy(&self) -> &Policy {
        &self.inner.config.policy
    }

    fn hashers(&self) -> std::sync::MutexGuard<'_, HashMap<UploadId, Hasher>> {
        // The map holds plain values; a panic elsewhere cannot leave it inconsistent.
        self.inner
            .hashers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ----- uploads -----

    /// Starts an upload session in `repo`, hashing with `algorithm` (the digest the
    /// client will claim at the end normally uses it; another algorithm still works, at
    /// the cost of re-reading the upload).
    pub async fn start_upload(
        &self,
        repo: &RepoName,
        algorithm: Algorithm,
    ) -> Result<UploadStatus> {
        self.check_writable("blob upload")?;
        self.reserve_upload_slot(repo).await?;
        let id = UploadId::random();
        if let Err(e) = self.inner.blobs.create_upload(&id, repo, self.now()).await {
            self.release_upload_slot(repo).await;
            return Err(e);
        }
        self.hashers().insert(id.clone(), Hasher::new(algorithm));
        Ok(UploadStatus { id, offset: 0 })
    }

    async fn reserve_upload_slot(&self, repo: &RepoName) -> Result<()> {
        let mut open = self.inner.open_uploads.lock().await;
        if open.is_none() {
            let mut counts: HashMap<RepoName, u64> = HashMap::new();
            for u in self.inner.blobs.list_uploads().await? {
                *counts.entry(u.repo).or_default() += 1;
            }
            *open = Some(counts);
        }
        let counts = open.as_mut().expect("initialised above");
        let config = &self.inner.config;
        let mut total: u64 = counts.values().sum();
        let mut here = counts.get(repo).copied().unwrap_or(0);
        if total >= config.max_open_uploads || here >= config.max_open_uploads_per_repo {
            // Sessions idle past the expiry count until a collection removes them;
            // reclaim them now, or abandoned sessions would lock clients out until then.
            let now = self.now();
            for u in self.inner.blobs.list_uploads().await? {
                if now.since(u.updated_at) > config.upload_expiry
                    && self.inner.blobs.delete_upload(&u.id).await?
                {
                    self.hashers().remove(&u.id);
                    if let Some(n) = counts.get_mut(&u.repo) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            counts.remove(&u.repo);
                        }
                    }
                }
            }
            total = counts.values().sum();
            here = counts.get(repo).copied().unwrap_or(0);
        }
        if total >= config.max_open_uploads {
            return Err(Error::TooManyRequests {
                reason: format!("{total} upload sessions are open; finish or cancel some"),
            });
        }
        if here >= config.max_open_uploads_per_repo {
            return Err(Error::TooManyRequests {
                reason: format!("{here} upload sessions are open in {repo}; finish or cancel some"),
            });
        }
        *counts.entry(repo.clone()).or_default() += 1;
        Ok(())
    }

    async fn release_upload_slot(&self, repo: &RepoName) {
        if let Some(counts) = self.inner.open_uploads.lock().await.as_mut() {
            if let Some(n) = counts.get_mut(repo) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(repo);
                }
            }
        }
    }

    async fn session(&self, repo: &RepoName, id: &UploadId) -> Result<UploadInfo> {
        let unknown = || Error::UploadUnknown { id: id.to_string() };
        let info = self
            .inner
            .blobs
            .upload_info(id)
            .await?
            .ok_or_else(unknown)?;
        if &info.repo != repo {
            return Err(unknown());
        }
        if self.now().since(info.updated_at) > self.inner.config.upload_expiry {
            // A read-only registry reports the session gone but leaves it to a writer.
            if !self.inner.config.read_only {
                self.discard_upload(repo, id).await?;
            }
            return Err(unknown());
        }
        Ok(info)
    }

    pub(crate) async fn discard_upload(&self, repo: &RepoName, id: &UploadId) -> Result<bool> {
        self.hashers().remove(id);
        let existed = self.inner.blobs.delete_upload(id).await?;
        if existed {
            self.release_upload_slot(repo).await;
        }
        Ok(existed)
    }

    /// The progress of an upload session.
    pub async fn upload_status(&self, repo: &RepoName, id: &UploadId) -> Result<UploadStatus> {
        let info = self.session(repo, id).await?;
        Ok(UploadStatus {
            id: id.clone(),
            offset: info.len,
        })
    }

    /// Appends a chunk. `offset`, when given, must equal the bytes received so far
    /// ([`Error::UploadOffset`] otherwise); `declared_len`, when given, must equal the
    /// chunk's length ([`Error::SizeMismatch`]). A failed append changes nothing.
    pub async fn append_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        offset: Option<u64>,
        declared_len: Option<u64>,
        data: ByteStream,
    ) -> Result<UploadStatus> {
        self.check_writable("blob upload")?;
        let info = self.session(repo, id).await?;
        if let Some(o) = offset {
            if o != info.len {
                return Err(Error::UploadOffset {
                    expected: info.len,
                    got: o,
                });
            }
        }
        let hasher = self.hashers().remove(id).filter(|h| h.len() == info.len);
        let hasher = Arc::new(Mutex::new(hasher));
        let failure = FailureCell::default();
        let stream = self.guard_stream(
            data,
            info.len,
            declared_len,
            hasher.clone(),
            failure.clone(),
        );
        let result = self
            .inner
            .blobs
            .append_upload(id, info.len, stream, self.now())
            .await;
        let new_len = match result {
            Ok(len) => len,
            Err(e) => return Err(take_failure(&failure).unwrap_or(e)),
        };
        let hasher = hasher.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = hasher.filter(|h| h.len() == new_len) {
            self.hashers().insert(id.clone(), h);
        }
        Ok(UploadStatus {
            id: id.clone(),
            offset: new_len,
        })
    }

    /// Wraps incoming bytes: enforces the declared length and the blob size limit, and
    /// feeds the session's hasher as bytes pass.
    fn guard_stream(
        &self,
        data: ByteStream,
        already: u64,
        declared_len: Option<u64>,
        hasher: Arc<Mutex<Option<Hasher>>>,
        failure: FailureCell,
    ) -> ByteStream {
        let limit = self.inner.config.max_blob_size;
        let fail = move |e: Error| {
            let msg = e.to_string();
            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            std::io::Error::other(msg)
        };
        // State: the body, bytes received, and whether the stream has ended.
        stream::unfold((data, 0u64, false), move |(mut data, received, done)| {
            let (hasher, fail) = (hasher.clone(), fail.clone());
            async move {
                if done {
                    return None;
                }
                let chunk = match data.next().await {
                    Some(Ok(chunk)) => chunk,
                    // Recorded so that the caller sees its own stream's failure,
                    // not the storage error the store makes of it.
                    Some(Err(e)) => {
                        let e = Error::BodyIncomplete {
                            reason: e.to_string(),
                        };
                        return Some((Err(fail(e)), (data, received, true)));
                    }
                    None => {
                        return match declared_len {
                            Some(expected) if expected != received => Some((
                                Err(fail(Error::SizeMismatch {
                                    expected,
                                    actual: received,
                                })),
                                (data, received, true),
                            )),
                            _ => None,
                        };
                    }
                };
                let received = received + chunk.len() as u64;
                if let Some(expected) = declared_len.filter(|&d| received > d) {
                    let e = Error::SizeMismatch {
                        expected,
                        actual: received,
                    };
                    return Some((Err(fail(e)), (data, received, true)));
                }
                if already.saturating_add(received) > limit {
                    let e = Error::TooLarge {
                        what: "blob",
                        limit,
                    };
                    return Some((Err(fail(e)), (data, received, true)));
                }
                if let Some(h) = hasher.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    h.update(&chunk);
                }
                Some((Ok(chunk), (data, received, false)))
            }
        })
        .boxed()
    }

    /// Finishes an upload: appends `last_chunk` if given, checks that everything received
    /// hashes to `digest`, and makes the blob visible in `repo`.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
        last_chunk: Option<(ByteStream, Option<u64>)>,
    ) -> Result<BlobInfo> {
        self.check_writable("blob upload")?;
        if let Some((data, declared_len)) = last_chunk {
            self.append_upload(repo, id, None, declared_len, data)
                .await?;
        }
        let info = self.session(repo, id).await?;
        let hasher = self
            .hashers()
            .remove(id)
            .filter(|h| h.len() == info.len && h.algorithm() == digest.algorithm());
        let actual = match hasher {
            Some(h) => h.finish(),
            None => self.rehash_upload(id, digest.algorithm(), info.len).await?,
        };
        if &actual != digest {
            self.discard_upload(repo, id).await?;
            return Err(Error::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let linked = self
            .commit_and_link(
                Source::Upload(id),
                digest,
                LinkStep::Blob {
                    repo,
                    size: info.len,
                },
                info.len,
            )
            .await;
        if let Err(e) = linked {
            if matches!(e, Error::QuotaExceeded { .. }) {
                // Retrying cannot succeed until something is deleted: free the session
                // now rather than at expiry, so a refusal leaves nothing behind.
                self.discard_upload(repo, id).await?;
            }
            return Err(e);
        }
        self.release_upload_slot(repo).await;
        self.emit(Event::BlobStored {
            repo: repo.clone(),
            digest: digest.clone(),
            size: info.len,
        });
        Ok(BlobInfo {
            digest: digest.clone(),
            size: info.len,
        })
    }

    /// Hashes the first `len` bytes of an upload (the length the commit will publish;
    /// an append landing meanwhile makes the commit fail rather than change the bytes).
    async fn rehash_upload(&self, id: &UploadId, algorithm: Algorithm, len: u64) -> Result<Digest> {
        let mut stream = self.inner.blobs.read_upload(id).await?;
        let mut h = Hasher::new(algorithm);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(Error::storage)?;
            let want = (len - h.len()).min(chunk.len() as u64) as usize;
            h.update(&chunk[..want]);
            if h.len() == len {
                break;
            }
        }
        if h.len() != len {
            return Err(Error::UploadOffset {
                expected: h.len(),
                got: len,
            });
        }
        Ok(h.finish())
    }

    /// Cancels an upload session and frees what it received.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        self.check_writable("upload cancel")?;
        self.session(repo, id).await?;
        self.discard_upload(repo, id).await?;
        Ok(())
    }

    /// Uploads a whole blob in one call (the single-request `POST ?digest=` upload).
    pub async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        declared_len: Option<u64>,
        data: ByteStream,
    ) -> Result<BlobInfo> {
        let status = self.start_upload(repo, digest.algorithm()).await?;
        let result = self
            .finish_upload(repo, &status.id, digest, Some((data, declared_len)))
            .await;
        if result.is_err() {
            self.discard_upload(repo, &status.id).await?;
        }
        result
    }

    /// Commits `source` as blob `digest` and links it, following the protocol of
    /// `docs/design.md` §4.3 (bytes first; wait out a collector's deletion lease on the
    /// same digest; confirm the bytes after linking, since a link pins them).
    async fn commit_and_link(
        &self,
        source: Source<'_>,
        digest: &Digest,
        step: LinkStep<'_>,
        len: u64,
    ) -> Result<()> {
        let blobs = &self.inner.blobs;
        let commit = || async {
            match source {
                Source::Upload(id) => blobs.commit_upload(id, digest, len).await,
                Source::Bytes { repo, bytes } => {
                    blobs
                        .put_bytes(repo, digest, bytes.clone(), self.now())
                        .await
                }
            }
        };
        let mut linked = None;
        for _ in 0..COMMIT_ATTEMPTS {
            self.wait_for_deletion(digest).await?;
            let committed = commit().await?;
            let done = match self.link_step(digest, &step).await {
                Ok(done) => done,
                Err(e) => {
                    self.drop_unlinked_bytes(digest, committed).await;
                    return Err(e);
                }
            };
            let done = match done {
                Some(outcome) => {
                    linked = outcome;
                    true
                }
                None => false,
            };
            if done {
                // The link now pins the record; if a collection deleted the bytes between
                // our commit and our link, commit them again (the source is still there).
                if blobs.stat(digest).await?.is_none() {
                    commit().await?;
                }
                if let Source::Upload(id) = source {
                    blobs.delete_upload(id).await?;
                }
                if let (Some(outcome), LinkStep::Manifest { repo, .. }) = (linked, &step) {
                    for (tag, from) in outcome.moved_tags {
                        self.emit(Event::TagMoved {
                            repo: (*repo).clone(),
                            tag,
                            from,
                            to: digest.clone(),
                        });
                    }
                }
                return Ok(());
            }
        }
        Err(Error::storage(format!(
            "blob {digest} kept being collected while it was committed; retry the upload"
        )))
    }

    /// Runs the metadata half of a commit. `Ok(None)`: the bytes are being collected;
    /// finish that and retry. `Ok(Some(outcome))`: linked (`outcome` for manifests).
    async fn link_step(
        &self,
        digest: &Digest,
        step: &LinkStep<'_>,
    ) -> Result<Option<Option<crate::store::PutManifestOutcome>>> {
        let meta = &self.inner.meta;
        match step {
            LinkStep::Blob { repo, size } => Ok(
                match meta
                    .link_blob(repo, digest, *size, self.now(), self.policy())
                    .await?
                {
                    LinkOutcome::Linked { .. } => Some(None),
                    LinkOutcome::BlobDeleting => None,
                },
            ),
            LinkStep::Manifest { repo, manifest } => Ok(meta
                .put_manifest(repo, (*manifest).clone(), self.now(), self.policy())
                .await?
                .map(Some)),
        }
    }

    /// After a refused link (a manifest with a missing blob, say), removes the bytes this
    /// commit stored, so a refusal leaves nothing behind, through the deletion lease like
    /// any byte deletion ([`crate::store::delete_unlinked_bytes`]): a concurrent
    /// committer of the same bytes that linked first keeps them (the lease is refused
    /// while a link exists); one that links after waits for the deletion and commits its
    /// bytes again (§4.3 of `docs/design.md`).
    async fn drop_unlinked_bytes(&self, digest: &Digest, committed: crate::store::CommitOutcome) {
        if committed != crate::store::CommitOutcome::Stored {
            return;
        }
        if let Err(e) = self.delete_unlinked_blob(digest).await {
            // Orphaned bytes are harmless; the collector's orphan scan reclaims them.
            tracing::warn!(%digest, error = %e, "could not remove bytes of a refused commit");
        }
    }

    /// Waits while another collector holds a fresh deletion lease on `digest`; takes over
    /// (and finishes) a stale one, whose holder is presumed dead.
    async fn wait_for_deletion(&self, digest: &Digest) -> Result<()> {
        let lease = self.inner.config.deletion_lease;
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            match self.inner.meta.blob(digest).await? {
                Some(rec) if rec.state.is_deleting() => {}
                _ => return Ok(()),
            }
            if self.delete_unlinked_blob(digest).await?.is_some() {
                continue;
            }
            // A lease is held for one byte deletion; waiting longer than the lease (in
            // real time) means something is wrong: give up and let the client retry.
            if started.elapsed() > lease + Duration::from_secs(1) {
                return Err(Error::TooManyRequests {
                    reason: format!("blob {digest} is being deleted; retry shortly"),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Deletes the bytes of a blob with no links if this caller obtains the deletion
    /// lease; returns the size freed.
    pub(crate) async fn delete_unlinked_blob(&self, digest: &Digest) -> Result<Option<u64>> {
        crate::store::delete_unlinked_bytes(
            self.inner.blobs.as_ref(),
            self.inner.meta.as_ref(),
            digest,
            self.now(),
            self.inner.config.deletion_lease,
        )
        .await
    }

    // ----- blobs -----

    /// Links a blob that `repo` may not have yet: from `from` when given, otherwise from
    /// any repository holding it that `access` allows reading. Returns whether the blob
    /// is now in `repo`; `false` means the client should upload it instead.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
        access: &dyn ReadAccess,
    ) -> Result<bool> {
        self.check_writable("blob mount")?;
        let source = match from {
            Some(from) if access.can_read(from) => Some(from.clone()),
            Some(_) => None,
            None => self.readable_holder(digest, access).await?,
        };
        let Some(source) = source else {
            return Ok(false);
        };
        let outcome = self
            .inner
            .meta
            .mount_blob(&source, repo, digest, self.now(), self.policy())
            .await?;
        match outcome {
            Some(LinkOutcome::Linked { .. }) => {
                self.emit(Event::BlobMounted {
                    repo: repo.clone(),
                    from: source,
                    digest: digest.clone(),
                });
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn readable_holder(
        &self,
        digest: &Digest,
        access: &dyn ReadAccess,
    ) -> Result<Option<RepoName>> {
        let mut after: Option<RepoName> = None;
        loop {
            let page = self
                .inner
                .meta
                .blob_repositories(digest, after.as_ref(), 256)
                .await?;
            if let Some(found) = page.iter().find(|r| access.can_read(r)) {
                return Ok(Some(found.clone()));
            }
            if page.len() < 256 {
                return Ok(None);
            }
            after = page.last().cloned();
        }
    }

    /// Size of a blob in `repo`; also refreshes its protection from collection, since a
    /// client that sees it present will not upload it again.
    pub async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobInfo> {
        let size = self.blob_size_in(repo, digest).await?;
        Ok(BlobInfo {
            digest: digest.clone(),
            size,
        })
    }

    async fn blob_size_in(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        let meta = &self.inner.meta;
        if let Some(link) = meta.blob_link(repo, digest).await? {
            let now = self.now();
            // Refresh only when a good part of the window has passed: one write per
            // window per blob, not one per request (and none without a window).
            let window = self.inner.config.protection_window;
            // A read-only registry writes nothing, not even this.
            if !window.is_zero()
                && !self.inner.config.read_only
                && now.since(link.protected_at) > window / 4
            {
                meta.touch_blob_link(repo, digest, now).await?;
            }
            return Ok(link.size);
        }
        // Manifests are blobs too, and clients may fetch them through the blobs endpoint.
        if let Some(m) = meta.manifest(repo, digest).await? {
            return Ok(m.size);
        }
        Err(Error::BlobUnknown {
            digest: digest.clone(),
        })
    }

    /// Streams a blob of `repo`, or part of it.
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<RangeRequest>,
    ) -> Result<BlobBody> {
        let size = self.blob_size_in(repo, digest).await?;
        let range = range.map(|r| r.resolve(size)).transpose()?;
        let verify = self.inner.config.verify_reads;
        let Some(read) = self
            .inner
            .blobs
            .read_verified(digest, range, verify)
            .await?
        else {
            tracing::warn!(%digest, "blob has metadata but no bytes");
            return Err(Error::BlobUnknown {
                digest: digest.clone(),
            });
        };
        Ok(BlobBody {
            digest: digest.clone(),
            size: read.size,
            range,
            stream: read.stream,
        })
    }

    /// Removes `repo`'s link to a blob. Refused ([`Error::InUse`]) while manifests of
    /// the repository reference it.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        self.check_writable("blob delete")?;
        if !self.inner.meta.unlink_blob(repo, digest).await? {
            return Err(Error::BlobUnknown {
                digest: digest.clone(),
            });
        }
        self.emit(Event::BlobDeleted {
            repo: repo.clone(),
            digest: digest.clone(),
        });
        Ok(())
    }

    // ----- manifests -----

    /// Pushes a manifest: `bytes` exactly as received with its `Content-Type`. When
    /// `reference` is a digest the bytes must hash to it; when it is a tag the tag
    /// points at the manifest. Every referenced blob and child manifest must be in the
    /// repository (the `subject` need not exist).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: &str,
        bytes: Bytes,
        options: PutManifestOptions,
    ) -> Result<PutManifestResult> {
        self.check_writable("manifest push")?;
        let limit = self.inner.config.max_manifest_size;
        if bytes.len() as u64 > limit {
            return Err(Error::TooLarge {
                what: "manifest",
                limit,
            });
        }
        let info = ManifestInfo::inspect(content_type, &bytes)?;
        let digest = match reference {
            Reference::Digest(d) => {
                let actual = Digest::compute(d.algorithm(), &bytes);
                if &actual != d {
                    return Err(Error::DigestMismatch {
                        expected: d.clone(),
                        actual,
                    });
                }
                actual
            }
            Reference::Tag(_) => Digest::sha256(&bytes),
        };
        let mut tags: Vec<Tag> = match reference {
            Reference::Tag(t) => vec![t.clone()],
            Reference::Digest(_) => Vec::new(),
        };
        for t in options.tags {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let size = bytes.len() as u64;
        let subject = info.subject.as_ref().map(|s| s.digest.clone());
        let referrer = subject.as_ref().map(|_| Descriptor {
            media_type: info.media_type.clone(),
            digest: digest.clone(),
            size,
            artifact_type: info.effective_artifact_type().map(str::to_owned),
            annotations: info.annotations.clone(),
            urls: Vec::new(),
        });
        let manifest = NewManifest {
            record: ManifestRecord {
                digest: digest.clone(),
                media_type: info.media_type.clone(),
                size,
                blobs: info.blob_references(),
                children: info.manifest_references(),
                subject: subject.clone(),
                tags: 0,
                parents: 0,
                pushed_at: self.now(),
            },
            referrer,
            tags: tags.clone(),
        };
        if self.inner.meta.manifest(repo, &digest).await?.is_some() {
            // Pushed again (CI does this constantly): the bytes and references are
            // there; only the tags may move.
            for tag in &tags {
                self.tag_manifest(repo, tag, &digest).await?;
            }
            return Ok(PutManifestResult {
                digest,
                subject,
                tags,
            });
        }
        // The bytes are all here: stored in one call, no upload session (on the fs
        // store that is two fsyncs instead of six).
        let len = bytes.len() as u64;
        self.commit_and_link(
            Source::Bytes {
                repo,
                bytes: &bytes,
            },
            &digest,
            LinkStep::Manifest {
                repo,
                manifest: &manifest,
            },
            len,
        )
        .await?;
        self.emit(Event::ManifestPut {
            repo: repo.clone(),
            digest: digest.clone(),
            media_type: info.media_type,
            subject: subject.clone(),
        });
        Ok(PutManifestResult {
            digest,
            subject,
            tags,
        })
    }

    async fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestRecord> {
        let unknown = || Error::ManifestUnknown {
            reference: reference.to_string(),
        };
        match reference {
            Reference::Digest(d) => self.inner.meta.manifest(repo, d).await,
            Reference::Tag(t) => self.inner.meta.tagged_manifest(repo, t).await,
        }?
        .ok_or_else(unknown)
    }

    /// A manifest's digest, media type and size.
    pub async fn stat_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<ManifestMeta> {
        let rec = self.resolve(repo, reference).await?;
        Ok(ManifestMeta {
            digest: rec.digest,
            media_type: rec.media_type,
            size: rec.size,
        })
    }

    /// A manifest with its exact bytes, verified against its digest.
    pub async fn get_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        let rec = self.resolve(repo, reference).await?;
        let missing = || Error::ManifestUnknown {
            reference: reference.to_string(),
        };
        let Some(read) = self.inner.blobs.read(&rec.digest, None).await? else {
            tracing::warn!(digest = %rec.digest, "manifest has metadata but no bytes");
            return Err(missing());
        };
        let mut buf = BytesMut::with_capacity(rec.size as usize);
        let mut stream = read.stream;
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.map_err(Error::storage)?);
        }
        let bytes = buf.freeze();
        if !rec.digest.verify(&bytes) {
            tracing::error!(digest = %rec.digest, "stored manifest bytes do not match their digest");
            return Err(Error::storage(format!(
                "stored manifest {} is corrupt",
                rec.digest
            )));
        }
        Ok(Manifest {
            meta: ManifestMeta {
                digest: rec.digest,
                media_type: rec.media_type,
                size: rec.size,
            },
            bytes,
        })
    }

    /// Deletes by tag (only the tag goes) or by digest (the manifest and every tag
    /// pointing at it go). Refused ([`Error::InUse`]) for a manifest an index of the
    /// repository still lists.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        self.check_writable("manifest delete")?;
        let unknown = || Error::ManifestUnknown {
            reference: reference.to_string(),
        };
        match reference {
            Reference::Tag(tag) => {
                let digest = self
                    .inner
                    .meta
                    .delete_tag(repo, tag, self.policy())
                    .await?
                    .ok_or_else(unknown)?;
                self.emit(Event::TagDeleted {
                    repo: repo.clone(),
                    tag: tag.clone(),
                    digest,
                });
            }
            Reference::Digest(d) => {
                let deleted = self
                    .inner
                    .meta
                    .delete_manifest(repo, d, self.policy())
                    .await?
                    .ok_or_else(unknown)?;
                self.emit(Event::ManifestDeleted {
                    repo: repo.clone(),
                    digest: d.clone(),
                    tags: deleted.tags,
                });
            }
        }
        Ok(())
    }

    /// Points `tag` at a manifest already in `repo`.
    pub async fn tag_manifest(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<()> {
        self.check_writable("tag")?;
        let from = self
            .inner
            .meta
            .set_tag(repo, tag, digest, self.now(), self.policy())
            .await?;
        if from.as_ref() != Some(digest) {
            self.emit(Event::TagMoved {
                repo: repo.clone(),
                tag: tag.clone(),
                from,
                to: digest.clone(),
            });
        }
        Ok(())
    }

    // ----- listings -----

    fn page_size(&self, n: Option<usize>) -> usize {
        // Listings fetch one item more than the page to learn whether more remain: keep
        // that `n + 1` from overflowing when both `n` and the limit are `usize::MAX`.
        let max = self.inner.config.max_page_size.min(usize::MAX - 1);
        n.map_or(max, |n| n.min(max))
    }

    /// Tags of `repo`, sorted. [`Error::NameUnknown`] if the repository does not exist.
    pub async fn list_tags(&self, repo: &RepoName, options: &ListOptions) -> Result<Page<Tag>> {
        if self.inner.meta.repository(repo).await?.is_none() {
            return Err(Error::NameUnknown { repo: repo.clone() });
        }
        let n = self.page_size(options.n);
        if n == 0 {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let last = options.last.as_deref().map(Tag::parse).transpose()?;
        let mut items = self
            .inner
            .meta
            .list_tag_names(repo, last.as_ref(), n + 1)
            .await?;
        Ok(paginate(&mut items, n, |t| t.to_string()))
    }

    /// Repositories, sorted, filtered by `access`.
    pub async fn list_repositories(
        &self,
        options: &ListOptions,
        access: &dyn ReadAccess,
    ) -> Result<Page<RepoName>> {
        let n = self.page_size(options.n);
        if n == 0 {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let mut after = options.last.as_deref().map(RepoName::parse).transpose()?;
        let mut items = Vec::new();
        loop {
            let page = self
                .inner
                .meta
                .list_repositories(after.as_ref(), n + 1)
                .await?;
            let exhausted = page.len() < n + 1;
            after = page.last().cloned();
            items.extend(page.into_iter().filter(|r| access.can_read(r)));
            if items.len() > n || exhausted {
                break;
            }
        }
        Ok(paginate(&mut items, n, |r| r.to_string()))
    }

    /// Manifests in `repo` whose subject is `subject`, optionally only those of
    /// `artifact_type`. An unknown subject simply has no referrers.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        options: &ListOptions,
    ) -> Result<Page<Descriptor>> {
        let n = self.page_size(options.n);
        if n == 0 {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let mut after = options.last.as_deref().map(Digest::parse).transpose()?;
        let mut items = Vec::new();
        loop {
            let page = self
                .inner
                .meta
                .list_referrers(repo, subject, after.as_ref(), n + 1)
                .await?;
            let exhausted = page.len() < n + 1;
            after = page.last().map(|r| r.digest.clone());
            items.extend(
                page.into_iter().map(|r| r.descriptor).filter(|d| {
                    artifact_type.is_none_or(|a| d.artifact_type.as_deref() == Some(a))
                }),
            );
            if items.len() > n || exhausted {
                break;
            }
        }
        Ok(paginate(&mut items, n, |d| d.digest.to_string()))
    }
}

fn take_failure(cell: &FailureCell) -> Option<Error> {
    cell.lock().unwrap_or_else(|p| p.into_inner()).take()
}

fn paginate<T>(items: &mut Vec<T>, n: usize, key: impl Fn(&T) -> String) -> Page<T> {
    let next = if items.len() > n {
        items.truncate(n);
        items.last().map(key)
    } else {
        None
    };
    Page {
        items: std::mem::take(items),
        next,
    }
}

/// Hashes a full blob read as it streams; if the bytes do not match, the stream ends
/// with an error instead of completing, so corrupt content is never served as valid.
pub(crate) fn verify_stream(inner: ByteStream, digest: Digest) -> ByteStream {
    let mut hasher = Some(Hasher::new(digest.algorithm()));
    inner
        .map(Some)
        .chain(stream::once(async { None }))
        .filter_map(move |item| {
            let out = match item {
                Some(Ok(chunk)) => {
                    if let Some(h) = hasher.as_mut() {
                        h.update(&chunk);
                    }
                    Some(Ok(chunk))
                }
                Some(Err(e)) => {
                    hasher = None;
                    Some(Err(e))
                }
                None => match hasher.take() {
                    Some(h) => {
                        let actual = h.finish();
                        if actual == digest {
                            None
                        } else {
                            tracing::error!(%digest, %actual, "stored blob does not match its digest");
                            Some(Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("stored blob {digest} is corrupt"),
                            )))
                        }
                    }
                    None => None,
                },
            };
            futures::future::ready(out)
        })
        .boxed()
}
