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
    Storage, UploadId, UploadInfo, UploadOwner,
};
use crate::time::{Clock, SystemClock, Timestamp};

mod ids;
mod manifests;
mod outbox;
mod repos;
mod uploads;

pub use repos::{ManifestEntry, RegistryStats, RepositoryDeletion};

/// Default manifest size limit: 4 MiB, as the distribution spec suggests.
pub const DEFAULT_MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
/// Default protection window for uploaded, mounted or confirmed blobs.
pub const DEFAULT_PROTECTION_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Default idle time after which an upload session expires.
pub const DEFAULT_UPLOAD_EXPIRY: Duration = Duration::from_secs(60 * 60);
/// Default idle time after which an empty upload session may be reclaimed under
/// pressure (see [`RegistryConfig::empty_upload_expiry`]).
pub const DEFAULT_EMPTY_UPLOAD_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// Default (and maximum) page size for tag, catalog and referrer listings.
pub const DEFAULT_MAX_PAGE_SIZE: usize = 10_000;

/// Default deletion lease: a byte deletion takes milliseconds; a holder silent for this
/// long has crashed.
pub const DEFAULT_DELETION_LEASE: Duration = Duration::from_secs(30);

/// Default limit on open upload sessions, in total.
pub const DEFAULT_MAX_OPEN_UPLOADS: u64 = 10_000;
/// Default limit on open upload sessions per repository.
pub const DEFAULT_MAX_OPEN_UPLOADS_PER_REPO: u64 = 1_000;
/// Default limit on open upload sessions per owner (identity, or address when
/// anonymous): well above what one client pushes in parallel (Docker uploads 5 layers
/// at once, containers/image 6), so that 100 concurrent pushes by one CI account fit,
/// and a twentieth of the total, so that no one client can take every session.
pub const DEFAULT_MAX_OPEN_UPLOADS_PER_OWNER: u64 = 500;

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
    /// Idle time after which a session that received no bytes at all may be reclaimed
    /// when the session limits are reached: one client opening sessions and never
    /// using them locks others out for minutes, not for the whole `upload_expiry`.
    pub empty_upload_expiry: Duration,
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
    /// Most upload sessions open at once in this process for one owner (sessions
    /// opened with [`Registry::start_upload_for`]; see [`UploadOwner`]).
    pub max_open_uploads_per_owner: u64,
    /// Immutable tags and quotas, enforced inside the metadata store's atomic changes.
    pub policy: Policy,
    /// Refuse every write ([`Error::ReadOnly`]); the collector only runs dry.
    pub read_only: bool,
    /// Outbox events older than this are trimmed by the collector once every durable
    /// consumer has them (default 24 hours).
    pub event_retention: Duration,
    /// At most this many outbox events are kept, whatever their age, once every durable
    /// consumer has them (default 100,000: about 20 MB on the in-memory store).
    pub max_events: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_manifest_size: DEFAULT_MAX_MANIFEST_SIZE,
            max_blob_size: u64::MAX,
            protection_window: DEFAULT_PROTECTION_WINDOW,
            upload_expiry: DEFAULT_UPLOAD_EXPIRY,
            empty_upload_expiry: DEFAULT_EMPTY_UPLOAD_EXPIRY,
            max_page_size: DEFAULT_MAX_PAGE_SIZE,
            verify_reads: true,
            deletion_lease: DEFAULT_DELETION_LEASE,
            max_open_uploads: DEFAULT_MAX_OPEN_UPLOADS,
            max_open_uploads_per_repo: DEFAULT_MAX_OPEN_UPLOADS_PER_REPO,
            max_open_uploads_per_owner: DEFAULT_MAX_OPEN_UPLOADS_PER_OWNER,
            policy: Policy::default(),
            read_only: false,
            event_retention: Duration::from_secs(24 * 3600),
            max_events: 100_000,
        }
    }
}

/// Builds a [`Registry`].
#[derive(Debug)]
pub struct RegistryBuilder {
    storage: Storage,
    config: RegistryConfig,
    clock: Arc<dyn Clock>,
    id_seed: Option<u64>,
    upstreams: Vec<crate::proxy::Upstream>,
    spool_dir: Option<std::path::PathBuf>,
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
    /// Sets how long outbox events are kept and how many at most (defaults: 24 hours,
    /// 100,000), once every durable consumer has them; the collector trims.
    pub fn with_event_retention(mut self, retention: Duration, max_events: u64) -> Self {
        self.config.event_retention = retention;
        self.config.max_events = max_events;
        self
    }
    /// Sets the idle expiry of upload sessions (default 1 hour).
    pub fn with_upload_expiry(mut self, expiry: Duration) -> Self {
        self.config.upload_expiry = expiry;
        self
    }
    /// Sets the idle time after which sessions that received nothing are reclaimed
    /// when the session limits are reached (default 5 minutes).
    pub fn with_empty_upload_expiry(mut self, expiry: Duration) -> Self {
        self.config.empty_upload_expiry = expiry;
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
    /// Limits the upload sessions one owner may have open (default 500).
    pub fn with_max_open_uploads_per_owner(mut self, n: u64) -> Self {
        self.config.max_open_uploads_per_owner = n;
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
    /// Accepts sparse manifests in the repositories under `prefix` (in every repository
    /// with `None`): image manifests whose config or layers, and indexes whose child
    /// manifests, the repository does not hold, as a mirror of some platforms of a
    /// multi-platform image has. What is missing is not served; when it arrives later it
    /// is counted as referenced from then on (`docs/design.md` §10, "Sparse
    /// manifests"). May be called several times.
    pub fn with_sparse_manifests(mut self, prefix: Option<RepoName>) -> Self {
        self.config.policy.sparse.push(prefix);
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
    /// Draws upload session ids from a generator seeded with `seed` instead of the
    /// operating system's: the n-th session opened gets the same id in every run, so a
    /// test scenario replays byte for byte (with a [`ManualClock`](crate::ManualClock)
    /// for time). Ids keep their shape (`<32 hex>`, or `<32 hex>_<16 hex owner tag>`).
    ///
    /// For tests only: seeded ids are predictable, and with authentication off a
    /// session's id is all it takes to write to it.
    pub fn with_id_seed(mut self, seed: u64) -> Self {
        self.id_seed = Some(seed);
        self
    }
    /// Makes the repositories under `upstream`'s prefix a pull-through cache of another
    /// registry (see [`proxy`](crate::proxy)): what they lack is fetched from the
    /// upstream, stored, and served. Manifests there may be sparse (an index is cached
    /// without the platforms nobody pulled). Repeatable, one prefix per upstream.
    pub fn with_upstream(mut self, upstream: crate::proxy::Upstream) -> Self {
        self.config
            .policy
            .sparse
            .push(Some(upstream.prefix.clone()));
        if upstream.cache_budget.is_some()
            && !self
                .config
                .policy
                .quotas
                .iter()
                .any(|q| q.prefix == upstream.prefix)
        {
            // The budget is measured with the quota counter kept in the metadata store's
            // atomic changes; a quota nobody can reach only counts.
            self.config.policy.quotas.push(Quota {
                prefix: upstream.prefix.clone(),
                bytes: u64::MAX,
            });
        }
        self.upstreams.push(upstream);
        self
    }

    /// Where blobs being fetched from an upstream are spooled while clients read them
    /// (default: the system's temporary directory). Each file lives as long as its
    /// fetch.
    pub fn with_spool_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.spool_dir = Some(dir.into());
        self
    }

    /// Builds the registry. Cheap: no I/O, no task spawned, and no event channel until
    /// somebody [subscribes](Registry::subscribe).
    pub fn build(self) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                blobs: self.storage.blobs,
                meta: self.storage.metadata,
                config: self.config,
                clock: self.clock,
                events: std::sync::OnceLock::new(),
                written: std::sync::OnceLock::new(),
                ids: ids::IdSource::new(self.id_seed),
                hashers: Mutex::new(HashMap::new()),
                open_uploads: tokio::sync::Mutex::new(None),
                proxy: crate::proxy::Proxy::new(self.upstreams, self.spool_dir),
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
    /// Created by the first [`Registry::subscribe`]: a channel of 1,024 slots takes
    /// about 112 KiB, which a test harness holding a thousand registries nobody listens
    /// to should not pay (measured with `benches/idle_rss.rs`).
    events: std::sync::OnceLock<broadcast::Sender<Event>>,
    /// Bumped after each change this process commits, for outbox readers
    /// ([`Registry::event_signal`]); created by the first of them.
    written: std::sync::OnceLock<tokio::sync::watch::Sender<u64>>,
    /// Where upload session ids come from.
    ids: ids::IdSource,
    /// Incremental hash state of upload sessions in this process. Lost on restart (the
    /// upload is then re-hashed from storage when it finishes).
    hashers: Mutex<HashMap<UploadId, Hasher>>,
    /// Open upload sessions per repository and per owner, counted from storage on first
    /// use, then kept up to date by this process (sessions of other processes sharing
    /// the store are not seen: the limits are per process).
    open_uploads: tokio::sync::Mutex<Option<uploads::OpenUploads>>,
    /// The pull-through cache's upstreams and fetches in flight, if any upstream is set.
    pub(crate) proxy: Option<crate::proxy::Proxy>,
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
            id_seed: None,
            upstreams: Vec::new(),
            spool_dir: None,
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

    /// Receives every [`Event`] this process makes from now on, as it makes them: a
    /// live, in-memory view with no delay, for tests and in-process reactions. It is not
    /// durable: a receiver that falls more than 1,024 events behind loses the oldest
    /// ones (and is told so by `recv`), and other processes' changes never reach it.
    /// For a complete record that survives restarts, read the outbox:
    /// [`events_from`](Self::events_from), [`events_after`](Self::events_after).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner
            .events
            .get_or_init(|| broadcast::channel(1024).0)
            .subscribe()
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    pub(crate) fn emit(&self, event: Event) {
        tracing::debug!(?event, "registry event");
        // No channel yet: nobody ever subscribed, nothing to do. No subscriber left is
        // not an error either.
        if let Some(events) = self.inner.events.get() {
            let _ = events.send(event);
        }
        if let Some(written) = self.inner.written.get() {
            written.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Refuses writes in read-only mode.
    pub(crate) fn check_writable(&self, operation: &'static str) -> Result<()> {
        if self.inner.config.read_only {
            return Err(Error::ReadOnly { operation });
        }
        Ok(())
    }

    /// Refuses writes in read-only mode, and pushes into a pull-through cache that does
    /// not take them ([`Upstream::allow_push`](crate::proxy::Upstream::allow_push)).
    pub(crate) fn check_push(&self, repo: &RepoName, operation: &'static str) -> Result<()> {
        self.check_writable(operation)?;
        if let Some(upstream) = self.upstream_for(repo)
            && !upstream.allow_push
        {
            return Err(Error::Denied {
                reason: format!(
                    "{repo} is a pull-through cache of {}: {operation} refused",
                    upstream.name
                ),
            });
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
        self.check_push(repo, "blob mount")?;
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

    pub(crate) async fn readable_holder(
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
        if let Some(upstream) = self.upstream_for(repo)
            && let Some(size) = self.proxy_stat_blob(upstream, repo, digest).await?
        {
            return Ok(BlobInfo {
                digest: digest.clone(),
                size,
            });
        }
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
        if let Some(upstream) = self.upstream_for(repo)
            && let Some(body) = self.proxy_get_blob(upstream, repo, digest, range).await?
        {
            return Ok(body);
        }
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

    /// A presigned URL (see [`BlobStore::presigned_get`]) from which a client may fetch
    /// the whole blob `digest` of `repo` for `ttl`, instead of streaming it through this
    /// process; `None` if the store cannot presign. Checked like
    /// [`get_blob`](Self::get_blob): [`Error::BlobUnknown`] unless `repo` holds the blob
    /// (a URL is never handed out for bytes the repository does not link), and the link's
    /// protection from collection is refreshed. The bytes are not hashed on their way
    /// out (they do not pass here): OCI clients check digests themselves.
    pub async fn presigned_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        ttl: std::time::Duration,
    ) -> Result<Option<String>> {
        // A blob the cache does not hold yet is fetched through `get_blob`.
        if let Some(upstream) = self.upstream_for(repo)
            && self
                .proxy_stat_blob(upstream, repo, digest)
                .await?
                .is_some()
        {
            return Ok(None);
        }
        self.blob_size_in(repo, digest).await?;
        self.inner.blobs.presigned_get(digest, ttl).await
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

    // ----- listings -----

    pub(crate) fn page_size(&self, n: Option<usize>) -> usize {
        // Listings fetch one item more than the page to learn whether more remain: keep
        // that `n + 1` from overflowing when both `n` and the limit are `usize::MAX`.
        let max = self.inner.config.max_page_size.min(usize::MAX - 1);
        n.map_or(max, |n| n.min(max))
    }

    /// Tags of `repo`, sorted. [`Error::NameUnknown`] if the repository does not exist.
    pub async fn list_tags(&self, repo: &RepoName, options: &ListOptions) -> Result<Page<Tag>> {
        if let Some(upstream) = self.upstream_for(repo)
            && let Some(page) = self.proxy_list_tags(upstream, repo, options).await?
        {
            return Ok(page);
        }
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
