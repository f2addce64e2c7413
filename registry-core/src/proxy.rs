//! Pull-through cache: the repositories under a prefix mirror another registry (an
//! [`ImageSource`], usually a remote one) on demand.
//!
//! Built with [`RegistryBuilder::with_upstream`](crate::RegistryBuilder::with_upstream).
//! Reads of a repository under the prefix behave as follows (`docs/design.md` §14):
//!
//! - **Manifests by digest** are immutable: fetched once, verified, stored, and never
//!   asked for again.
//! - **Manifests by tag** are served from the cache while the tag was confirmed within
//!   the upstream's [tag TTL](Upstream::with_tag_ttl); after that the upstream is asked
//!   for the tag's digest (a HEAD), and the manifest fetched only if the cache lacks
//!   it. When the upstream cannot be reached, the cached tag is served (stale) rather
//!   than failing; when the upstream says the tag does not exist, so does the cache.
//! - **Blobs** missing from the repository are linked from any repository of this
//!   registry that holds them (once the upstream confirms, with a HEAD, that its
//!   repository has them), or else fetched. A fetch streams the upstream's bytes
//!   into a spool file; every client asking for the blob meanwhile reads that file as
//!   it grows (one upstream fetch however many clients, constant memory each), and the
//!   same bytes are stored through the usual upload path, which hashes them and links
//!   them only if they match: nothing partial or unverified ever becomes visible. The
//!   last byte reaches clients only once the whole blob has arrived and its source
//!   vouched for it, so a failed fetch ends every client's body with an error.
//! - **Tag listings** are the upstream's; the cached tags while it cannot be reached.
//! - **Manifests may be sparse**: an index is cached without the platforms nobody
//!   pulled, an image before its layers.
//! - **Pushes** are refused ([`Error::Denied`]) unless the upstream
//!   [allows them](Upstream::allow_push); deletes are allowed (to evict by hand).
//! - **Size budget**: [`Registry::prune_cache`] deletes the least recently pulled
//!   manifests of a prefix over its [budget](Upstream::with_cache_budget); the
//!   collector then reclaims their blobs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use crate::access::under_prefix;
use crate::digest::Digest;
use crate::endpoint::ImageSource;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::names::{Reference, RepoName, Tag};
use crate::registry::{
    AllowAll, BlobBody, ListOptions, Manifest, Page, PutManifestOptions, RangeRequest, Registry,
};
use crate::store::{ByteRange, ByteStream, LinkOutcome};
use crate::time::Timestamp;

/// Default time a tag fetched from an upstream is served without asking again.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(60);

/// Bytes read from a spool file at a time by each reader.
const SPOOL_CHUNK: u64 = 1 << 20;

/// Most bytes of the upstream's stream written to the spool file in one write.
const SPOOL_BATCH: usize = 1 << 20;

/// One upstream of a pull-through cache: a repository prefix of this registry, and the
/// registry it mirrors.
#[derive(Clone)]
pub struct Upstream {
    pub(crate) prefix: RepoName,
    pub(crate) name: String,
    pub(crate) source: Arc<dyn ImageSource>,
    pub(crate) remote_prefix: Option<RepoName>,
    pub(crate) tag_ttl: Duration,
    pub(crate) allow_push: bool,
    pub(crate) cache_budget: Option<u64>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("prefix", &self.prefix)
            .field("name", &self.name)
            .field("remote_prefix", &self.remote_prefix)
            .field("tag_ttl", &self.tag_ttl)
            .field("allow_push", &self.allow_push)
            .field("cache_budget", &self.cache_budget)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Repositories under `prefix` mirror `source`: `prefix/library/alpine` is the
    /// upstream's `library/alpine`. `name` identifies the upstream in logs and errors
    /// (its URL, without credentials).
    pub fn new(prefix: RepoName, name: impl Into<String>, source: Arc<dyn ImageSource>) -> Self {
        Upstream {
            prefix,
            name: name.into(),
            source,
            remote_prefix: None,
            tag_ttl: DEFAULT_TAG_TTL,
            allow_push: false,
            cache_budget: None,
        }
    }

    /// Maps the prefix to a prefix of the upstream instead of its root:
    /// `prefix/app` is then the upstream's `remote_prefix/app`.
    pub fn with_remote_prefix(mut self, remote_prefix: RepoName) -> Self {
        self.remote_prefix = Some(remote_prefix);
        self
    }

    /// How long a tag is served from the cache before the upstream is asked again
    /// (default [`DEFAULT_TAG_TTL`]; zero: ask on every pull by tag).
    pub fn with_tag_ttl(mut self, ttl: Duration) -> Self {
        self.tag_ttl = ttl;
        self
    }

    /// Lets clients push to the prefix too (default: refused, so the cache only ever
    /// holds what the upstream has).
    pub fn allow_push(mut self, on: bool) -> Self {
        self.allow_push = on;
        self
    }

    /// Bytes the cache may hold under the prefix before [`Registry::prune_cache`]
    /// evicts the least recently pulled images (default: no limit).
    pub fn with_cache_budget(mut self, bytes: u64) -> Self {
        self.cache_budget = Some(bytes);
        self
    }

    /// The repository prefix of this registry.
    pub fn prefix(&self) -> &RepoName {
        &self.prefix
    }

    /// The upstream's name, as given to [`new`](Self::new).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The upstream's name for repository `repo` of this registry, or `None` when `repo`
    /// is not under the prefix.
    pub fn remote_repo(&self, repo: &RepoName) -> Option<RepoName> {
        let prefix = self.prefix.as_str();
        let rest = repo.as_str().strip_prefix(prefix)?;
        let rest = match rest.strip_prefix('/') {
            Some(rest) => rest,
            None if rest.is_empty() => "",
            None => return None,
        };
        let name = match (&self.remote_prefix, rest) {
            (Some(p), "") => p.as_str().to_owned(),
            (Some(p), rest) => format!("{p}/{rest}"),
            (None, "") => return None,
            (None, rest) => rest.to_owned(),
        };
        RepoName::parse(&name).ok()
    }
}

/// What the pull-through cache has done since the registry was built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Manifest reads answered from the cache without a fetch (a fresh tag, a digest
    /// already held, or a tag the upstream confirmed unchanged).
    pub manifest_hits: u64,
    /// Manifests fetched from an upstream.
    pub manifest_fetches: u64,
    /// Tags checked with the upstream (after their TTL).
    pub tag_checks: u64,
    /// Blob reads answered from the cache (held, or linked from another repository).
    pub blob_hits: u64,
    /// Blob fetches started from an upstream.
    pub blob_fetches: u64,
    /// Blob reads that joined a fetch already running.
    pub blob_joins: u64,
    /// Bytes received from upstreams for blobs.
    pub upstream_bytes: u64,
    /// Blob fetches that failed (nothing was stored).
    pub failed_fetches: u64,
    /// Tags served from the cache because the upstream could not be reached.
    pub stale_served: u64,
}

#[derive(Default)]
struct Counters {
    manifest_hits: AtomicU64,
    manifest_fetches: AtomicU64,
    tag_checks: AtomicU64,
    blob_hits: AtomicU64,
    blob_fetches: AtomicU64,
    blob_joins: AtomicU64,
    upstream_bytes: AtomicU64,
    failed_fetches: AtomicU64,
    stale_served: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What [`Registry::prune_cache`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PruneReport {
    /// Manifests deleted (with their tags), least recently pulled first.
    pub manifests_removed: u64,
    /// What they referenced, as an upper bound of what the collector will free (blobs
    /// shared with manifests that stay are counted but not freed).
    pub bytes_released: u64,
}

/// Held by whoever fetches one manifest (or checks one tag); the others wait for it.
type FetchLock = Arc<tokio::sync::Mutex<()>>;

/// The cache's state: its upstreams and what is in flight.
pub(crate) struct Proxy {
    upstreams: Vec<Upstream>,
    spool_dir: PathBuf,
    /// When each cached tag was last confirmed with its upstream.
    checked: Mutex<HashMap<(RepoName, Tag), Instant>>,
    /// One lock per manifest being fetched: concurrent misses wait for the first.
    manifest_fetches: Mutex<HashMap<(RepoName, String), FetchLock>>,
    /// Blob fetches in flight.
    fills: Mutex<HashMap<(RepoName, Digest), Arc<FillSlot>>>,
    /// When each cached manifest was last pulled, for eviction (lost on restart: the
    /// push time stands in until the next pull).
    pulled: Mutex<HashMap<(RepoName, Digest), Timestamp>>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps: a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Proxy {
    pub(crate) fn new(upstreams: Vec<Upstream>, spool_dir: Option<PathBuf>) -> Option<Proxy> {
        if upstreams.is_empty() {
            return None;
        }
        Some(Proxy {
            upstreams,
            spool_dir: spool_dir.unwrap_or_else(std::env::temp_dir),
            checked: Mutex::default(),
            manifest_fetches: Mutex::default(),
            fills: Mutex::default(),
            pulled: Mutex::default(),
            counters: Counters::default(),
        })
    }

    fn upstream_for(&self, repo: &RepoName) -> Option<&Upstream> {
        self.upstreams
            .iter()
            .find(|u| under_prefix(repo.as_str(), u.prefix.as_str()))
    }

    fn fresh(&self, repo: &RepoName, tag: &Tag, ttl: Duration) -> bool {
        lock(&self.checked)
            .get(&(repo.clone(), tag.clone()))
            .is_some_and(|at| at.elapsed() < ttl)
    }

    fn confirm(&self, repo: &RepoName, tag: &Tag) {
        lock(&self.checked).insert((repo.clone(), tag.clone()), Instant::now());
    }

    async fn manifest_lock(&self, repo: &RepoName, key: String) -> ManifestFetchGuard<'_> {
        let key = (repo.clone(), key);
        let mutex = lock(&self.manifest_fetches)
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = mutex.clone().lock_owned().await;
        ManifestFetchGuard {
            proxy: self,
            key,
            mutex,
            _guard: guard,
        }
    }
}

/// Held while a manifest is fetched; removes the lock from the map when nobody else
/// waits for it.
struct ManifestFetchGuard<'a> {
    proxy: &'a Proxy,
    key: (RepoName, String),
    mutex: FetchLock,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for ManifestFetchGuard<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.proxy.manifest_fetches);
        // The map, this guard and the owned guard hold it: nobody else waits.
        if Arc::strong_count(&self.mutex) <= 3 {
            map.remove(&self.key);
        }
    }
}

/// A blob fetch in flight, shared by everyone who asks for the blob meanwhile.
#[derive(Default)]
struct FillSlot {
    /// `None` once started means the blob turned out to be held locally.
    fill: tokio::sync::OnceCell<Option<Arc<Fill>>>,
}

#[derive(Debug, Clone)]
enum FillState {
    /// This many bytes are in the spool file.
    Receiving(u64),
    /// All bytes are in the spool file and their source vouched for them.
    Complete,
    /// The fetch failed; readers fail with this reason.
    Failed(String),
}

/// The spool file of one fetch. Deleted when the last reader is done with it.
struct Fill {
    size: u64,
    path: PathBuf,
    state: watch::Receiver<FillState>,
}

impl Drop for Fill {
    fn drop(&mut self) {
        // Best effort: a leftover spool file is only disk space in a temporary folder.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Fill {
    /// Bytes `start..end` of the blob as they arrive. The last byte of the blob waits
    /// for the end of the fetch, so a reader never sees a complete body of a blob whose
    /// fetch failed.
    fn read(self: Arc<Self>, start: u64, end: u64) -> ByteStream {
        struct Reader {
            fill: Arc<Fill>,
            state: watch::Receiver<FillState>,
            file: Option<tokio::fs::File>,
            pos: u64,
            end: u64,
        }
        let state = self.state.clone();
        let reader = Reader {
            fill: self,
            state,
            file: None,
            pos: start,
            end,
        };
        stream::try_unfold(reader, |mut r| async move {
            loop {
                if r.pos >= r.end {
                    return Ok(None);
                }
                let ready = match &*r.state.borrow_and_update() {
                    FillState::Receiving(n) => (*n).min(r.fill.size.saturating_sub(1)),
                    FillState::Complete => r.fill.size,
                    FillState::Failed(reason) => {
                        return Err(std::io::Error::other(reason.clone()));
                    }
                };
                let limit = ready.min(r.end);
                if r.pos < limit {
                    if r.file.is_none() {
                        let mut file = tokio::fs::File::open(&r.fill.path).await?;
                        file.seek(std::io::SeekFrom::Start(r.pos)).await?;
                        r.file = Some(file);
                    }
                    let file = r.file.as_mut().expect("opened above");
                    let want = (limit - r.pos).min(SPOOL_CHUNK) as usize;
                    let mut buf = BytesMut::with_capacity(want);
                    let mut n = 0;
                    while n < want {
                        let got = (&mut *file)
                            .take((want - n) as u64)
                            .read_buf(&mut buf)
                            .await?;
                        if got == 0 {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "spool file shorter than announced",
                            ));
                        }
                        n += got;
                    }
                    r.pos += n as u64;
                    return Ok(Some((buf.freeze(), r)));
                }
                if r.state.changed().await.is_err()
                    && matches!(*r.state.borrow(), FillState::Receiving(_))
                {
                    return Err(std::io::Error::other("the upstream fetch was abandoned"));
                }
            }
        })
        .boxed()
    }
}

/// Copies the upstream's stream into the spool file, publishing progress after each
/// chunk is in the file.
async fn spool(
    file: tokio::fs::File,
    mut body: ByteStream,
    size: u64,
    progress: watch::Sender<FillState>,
    counters: &Counters,
) {
    use futures::FutureExt;
    let mut file = Some(file.into_std().await);
    let mut written = 0u64;
    let outcome: std::result::Result<(), String> = async {
        let mut ended = false;
        while !ended {
            let Some(first) = body.next().await else {
                break;
            };
            // Whatever else has already arrived, up to a batch, goes in the same write:
            // a hop to a blocking thread per network chunk (16 KiB) would cost more
            // than the copy.
            let mut batch = vec![first];
            let mut len = 0;
            while len < SPOOL_BATCH {
                match body.next().now_or_never() {
                    Some(Some(chunk)) => batch.push(chunk),
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
                len = batch
                    .iter()
                    .map(|c| c.as_ref().map_or(0, |c| c.len()))
                    .sum::<usize>();
            }
            let mut chunks = Vec::with_capacity(batch.len());
            for chunk in batch {
                chunks.push(chunk.map_err(|e| format!("upstream stream failed: {e}"))?);
            }
            let n: u64 = chunks.iter().map(|c| c.len() as u64).sum();
            if written + n > size {
                return Err(format!(
                    "upstream sent more than the {size} bytes announced"
                ));
            }
            let mut f = file.take().expect("the file is back after each write");
            f = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                for c in &chunks {
                    f.write_all(c)?;
                }
                Ok::<_, std::io::Error>(f)
            })
            .await
            .map_err(|e| format!("spool file: {e}"))?
            .map_err(|e| format!("spool file: {e}"))?;
            file = Some(f);
            written += n;
            counters.upstream_bytes.fetch_add(n, Ordering::Relaxed);
            // The bytes are in the file (written by the call that returned): readers
            // may read them now.
            progress.send_replace(FillState::Receiving(written));
        }
        if written != size {
            return Err(format!(
                "upstream stream ended after {written} of {size} bytes"
            ));
        }
        Ok(())
    }
    .await;
    progress.send_replace(match outcome {
        Ok(()) => FillState::Complete,
        Err(reason) => {
            bump(&counters.failed_fetches);
            FillState::Failed(reason)
        }
    });
}

impl Registry {
    fn proxy(&self) -> Option<&Proxy> {
        self.inner.proxy.as_ref()
    }

    /// The upstream whose prefix covers `repo`, if `repo` is part of a pull-through
    /// cache.
    pub fn upstream_for(&self, repo: &RepoName) -> Option<&Upstream> {
        self.proxy()?.upstream_for(repo)
    }

    /// The pull-through cache's counters, or `None` without upstreams.
    pub fn proxy_stats(&self) -> Option<ProxyStats> {
        let c = &self.proxy()?.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(ProxyStats {
            manifest_hits: get(&c.manifest_hits),
            manifest_fetches: get(&c.manifest_fetches),
            tag_checks: get(&c.tag_checks),
            blob_hits: get(&c.blob_hits),
            blob_fetches: get(&c.blob_fetches),
            blob_joins: get(&c.blob_joins),
            upstream_bytes: get(&c.upstream_bytes),
            failed_fetches: get(&c.failed_fetches),
            stale_served: get(&c.stale_served),
        })
    }

    /// Makes the cache hold what `reference` names in `repo` (under an upstream's
    /// prefix), fetching it if need be; the caller then reads it locally.
    pub(crate) async fn refresh_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<()> {
        let proxy = self.proxy().expect("an upstream implies a proxy");
        let meta = &self.inner.meta;
        let remote = upstream
            .remote_repo(repo)
            .ok_or_else(|| Error::NameUnknown { repo: repo.clone() })?;
        match reference {
            Reference::Digest(digest) => {
                if meta.manifest(repo, digest).await?.is_none() {
                    let _fetching = proxy.manifest_lock(repo, digest.to_string()).await;
                    if meta.manifest(repo, digest).await?.is_none() {
                        let manifest = upstream.source.get_manifest(&remote, reference).await?;
                        self.cache_manifest(repo, digest, manifest, None).await?;
                        self.mark_pulled(repo, digest);
                        return Ok(());
                    }
                }
                bump(&proxy.counters.manifest_hits);
                self.mark_pulled(repo, digest);
                Ok(())
            }
            Reference::Tag(tag) => {
                if proxy.fresh(repo, tag, upstream.tag_ttl)
                    && let Some(digest) = meta.tag(repo, tag).await?
                {
                    bump(&proxy.counters.manifest_hits);
                    self.mark_pulled(repo, &digest);
                    return Ok(());
                }
                let _checking = proxy.manifest_lock(repo, tag.to_string()).await;
                let local = meta.tag(repo, tag).await?;
                if proxy.fresh(repo, tag, upstream.tag_ttl)
                    && let Some(digest) = &local
                {
                    // Another request checked it while this one waited.
                    bump(&proxy.counters.manifest_hits);
                    self.mark_pulled(repo, digest);
                    return Ok(());
                }
                bump(&proxy.counters.tag_checks);
                let current = match upstream.source.stat_manifest(&remote, reference).await {
                    Ok(current) => current,
                    Err(e @ (Error::ManifestUnknown { .. } | Error::NameUnknown { .. })) => {
                        return Err(e);
                    }
                    Err(e) => match &local {
                        Some(digest) => {
                            tracing::warn!(
                                %repo, %tag, upstream = %upstream.name, error = %e,
                                "upstream unreachable: serving the cached tag"
                            );
                            bump(&proxy.counters.stale_served);
                            self.mark_pulled(repo, digest);
                            return Ok(());
                        }
                        None => return Err(e),
                    },
                };
                let digest = current.digest;
                if meta.manifest(repo, &digest).await?.is_none() {
                    let manifest = upstream
                        .source
                        .get_manifest(&remote, &Reference::Digest(digest.clone()))
                        .await?;
                    self.cache_manifest(repo, &digest, manifest, Some(tag))
                        .await?;
                } else {
                    bump(&proxy.counters.manifest_hits);
                    if local.as_ref() != Some(&digest) {
                        self.set_tag(repo, tag, &digest).await?;
                    }
                }
                proxy.confirm(repo, tag);
                self.mark_pulled(repo, &digest);
                Ok(())
            }
        }
    }

    /// The tags of a cached repository are the upstream's (pulling one fetches it):
    /// `None` when the upstream cannot be reached, to list the cached tags instead.
    pub(crate) async fn proxy_list_tags(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        options: &ListOptions,
    ) -> Result<Option<Page<Tag>>> {
        let remote = upstream
            .remote_repo(repo)
            .ok_or_else(|| Error::NameUnknown { repo: repo.clone() })?;
        let options = ListOptions {
            n: Some(self.page_size(options.n)),
            last: options.last.clone(),
        };
        match upstream.source.list_tags(&remote, &options).await {
            Ok(page) => Ok(Some(page)),
            Err(e @ Error::NameUnknown { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(%repo, upstream = %upstream.name, error = %e,
                    "upstream unreachable: listing the cached tags");
                Ok(None)
            }
        }
    }

    /// Stores a manifest fetched from an upstream, after checking it is the one asked
    /// for (whatever the source promises).
    async fn cache_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        manifest: Manifest,
        tag: Option<&Tag>,
    ) -> Result<()> {
        if &manifest.meta.digest != digest || !digest.verify(&manifest.bytes) {
            return Err(Error::Upstream {
                reason: format!("upstream served bytes that do not hash to manifest {digest}"),
            });
        }
        if let Some(proxy) = self.proxy() {
            bump(&proxy.counters.manifest_fetches);
        }
        self.store_manifest(
            repo,
            &Reference::Digest(digest.clone()),
            &manifest.meta.media_type,
            manifest.bytes,
            PutManifestOptions {
                tags: tag.into_iter().cloned().collect(),
            },
        )
        .await?;
        Ok(())
    }

    fn mark_pulled(&self, repo: &RepoName, digest: &Digest) {
        if let Some(proxy) = self.proxy() {
            lock(&proxy.pulled).insert((repo.clone(), digest.clone()), self.now());
        }
    }

    /// Whether `repo` holds blob (or manifest) `digest`, linking it from another
    /// repository of this registry if one holds it and the upstream confirms that its
    /// repository has the blob: a HEAD instead of a fetch.
    async fn hold_blob(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool> {
        let meta = &self.inner.meta;
        if meta.blob_link(repo, digest).await?.is_some()
            || meta.manifest(repo, digest).await?.is_some()
        {
            return Ok(true);
        }
        let Some(holder) = self.readable_holder(digest, &AllowAll).await? else {
            return Ok(false);
        };
        // The bytes here were verified when the holder got them, but whether this
        // repository may have them is the upstream's to say: another repository (or
        // another upstream) may be one this repository's readers cannot read there.
        let Some(remote) = upstream.remote_repo(repo) else {
            return Ok(false);
        };
        match upstream.source.stat_blob(&remote, digest).await {
            Ok(info) if info.size == self.inner.blobs.stat(digest).await?.unwrap_or(u64::MAX) => {}
            // Not there, or unreachable: no link; the fetch says what the upstream says.
            _ => return Ok(false),
        }
        let linked = meta
            .mount_blob(&holder, repo, digest, self.now(), &self.inner.config.policy)
            .await?;
        if let Some(LinkOutcome::Linked { .. }) = linked {
            self.emit(Event::BlobMounted {
                repo: repo.clone(),
                from: holder,
                digest: digest.clone(),
            });
            return Ok(true);
        }
        Ok(meta.blob_link(repo, digest).await?.is_some())
    }

    /// The size of blob `digest` for a HEAD in a cached repository: `None` when the
    /// repository holds it (answer locally); else the size of a fetch in flight or the
    /// upstream's answer, without fetching the bytes.
    pub(crate) async fn proxy_stat_blob(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>> {
        let proxy = self.proxy().expect("an upstream implies a proxy");
        if self.hold_blob(upstream, repo, digest).await? {
            return Ok(None);
        }
        let slot = lock(&proxy.fills)
            .get(&(repo.clone(), digest.clone()))
            .cloned();
        if let Some(Some(fill)) = slot.as_ref().and_then(|s| s.fill.get()) {
            return Ok(Some(fill.size));
        }
        let remote = upstream
            .remote_repo(repo)
            .ok_or_else(|| Error::NameUnknown { repo: repo.clone() })?;
        Ok(Some(upstream.source.stat_blob(&remote, digest).await?.size))
    }

    /// A blob of a cached repository: `None` when the repository holds it (read it
    /// locally); else a body read from the fetch in flight, which this call starts if
    /// nobody has.
    pub(crate) async fn proxy_get_blob(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        range: Option<RangeRequest>,
    ) -> Result<Option<BlobBody>> {
        let proxy = self.proxy().expect("an upstream implies a proxy");
        if self.hold_blob(upstream, repo, digest).await? {
            bump(&proxy.counters.blob_hits);
            return Ok(None);
        }
        let key = (repo.clone(), digest.clone());
        let slot = lock(&proxy.fills).entry(key.clone()).or_default().clone();
        let mut started = false;
        let fill = slot
            .fill
            .get_or_try_init(|| {
                started = true;
                self.start_fill(upstream, repo, digest, slot.clone())
            })
            .await;
        let fill = match fill {
            Ok(fill) => fill.clone(),
            Err(e) => {
                let mut fills = lock(&proxy.fills);
                if fills.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    fills.remove(&key);
                }
                return Err(e);
            }
        };
        let Some(fill) = fill else {
            bump(&proxy.counters.blob_hits);
            return Ok(None);
        };
        if !started {
            bump(&proxy.counters.blob_joins);
        }
        let size = fill.size;
        let range = range.map(|r| r.resolve(size)).transpose()?;
        let (start, end) = match range {
            Some(ByteRange { start, end }) => (start, end + 1),
            None => (0, size),
        };
        Ok(Some(BlobBody {
            digest: digest.clone(),
            size,
            range,
            stream: fill.read(start, end),
        }))
    }

    /// Starts fetching a blob: the upstream's stream goes into a spool file, and from
    /// the spool file into the store, both in tasks of their own so that the fetch
    /// finishes (and is stored) even if every client goes away.
    async fn start_fill(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        slot: Arc<FillSlot>,
    ) -> Result<Option<Arc<Fill>>> {
        let proxy = self.proxy().expect("an upstream implies a proxy");
        // A fetch that just finished removes its slot after storing the blob.
        if self.hold_blob(upstream, repo, digest).await? {
            return Ok(None);
        }
        let remote = upstream
            .remote_repo(repo)
            .ok_or_else(|| Error::NameUnknown { repo: repo.clone() })?;
        bump(&proxy.counters.blob_fetches);
        let body = upstream.source.get_blob(&remote, digest).await?;
        let limit = self.inner.config.max_blob_size;
        if body.size > limit {
            return Err(Error::TooLarge {
                what: "blob",
                limit,
            });
        }
        // Created on first use (and again if something removed it meanwhile).
        tokio::fs::create_dir_all(&proxy.spool_dir)
            .await
            .map_err(|e| {
                Error::storage(format!(
                    "spool directory {}: {e}",
                    proxy.spool_dir.display()
                ))
            })?;
        let path = proxy
            .spool_dir
            .join(format!("registry-fill-{}", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| Error::storage(format!("spool file {}: {e}", path.display())))?;
        let (progress, state) = watch::channel(FillState::Receiving(0));
        let fill = Arc::new(Fill {
            size: body.size,
            path,
            state,
        });
        tracing::info!(%repo, %digest, size = body.size, upstream = %upstream.name, "fetching blob from upstream");

        let registry = self.clone();
        let size = body.size;
        tokio::spawn(async move {
            let proxy = registry.proxy().expect("an upstream implies a proxy");
            spool(file, body.stream, size, progress, &proxy.counters).await;
        });

        let registry = self.clone();
        let (repo, digest, stored) = (repo.clone(), digest.clone(), fill.clone());
        tokio::spawn(async move {
            // The upload path hashes the bytes and links them only if they match.
            let bytes = stored.clone().read(0, stored.size);
            match registry.store_blob(&repo, &digest, Some(size), bytes).await {
                Ok(_) => tracing::debug!(%repo, %digest, "cached blob stored"),
                Err(e) => tracing::warn!(%repo, %digest, error = %e, "blob fetch not stored"),
            }
            let proxy = registry.proxy().expect("an upstream implies a proxy");
            let mut fills = lock(&proxy.fills);
            let key = (repo, digest);
            if fills.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                fills.remove(&key);
            }
        });
        Ok(Some(fill))
    }

    /// Deletes the least recently pulled manifests of every cached prefix that holds
    /// more than its [budget](Upstream::with_cache_budget), until what they reference
    /// covers the excess. Only manifests no index of the repository lists are
    /// candidates (an index goes as a whole; its children follow at the next prune).
    /// The bytes are freed by the next collection ([`Registry::collect_garbage`]),
    /// once the protection window has passed.
    pub async fn prune_cache(&self) -> Result<PruneReport> {
        let mut report = PruneReport::default();
        let Some(proxy) = self.proxy() else {
            return Ok(report);
        };
        for upstream in &proxy.upstreams {
            let Some(budget) = upstream.cache_budget else {
                continue;
            };
            let used = self
                .inner
                .meta
                .quota_usage(&upstream.prefix)
                .await?
                .unwrap_or(0);
            if used <= budget {
                continue;
            }
            let mut candidates = self.cache_candidates(upstream).await?;
            candidates.sort_by_key(|c| c.0);
            let mut released = 0;
            for (_, repo, digest, bytes) in candidates {
                if released >= used - budget {
                    break;
                }
                match self
                    .delete_manifest(&repo, &Reference::Digest(digest.clone()))
                    .await
                {
                    Ok(()) => {
                        released += bytes;
                        report.manifests_removed += 1;
                        lock(&proxy.pulled).remove(&(repo, digest));
                    }
                    // Listed by an index or gone since it was listed: not a candidate.
                    Err(Error::InUse { .. } | Error::ManifestUnknown { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            report.bytes_released += released;
        }
        Ok(report)
    }

    /// The manifests of a cached prefix that eviction may delete, with when they were
    /// last pulled and what they reference (an upper bound of what deleting frees).
    async fn cache_candidates(
        &self,
        upstream: &Upstream,
    ) -> Result<Vec<(Timestamp, RepoName, Digest, u64)>> {
        let proxy = self.proxy().expect("an upstream implies a proxy");
        let prefix = upstream.prefix.clone();
        let under = move |r: &RepoName| under_prefix(r.as_str(), prefix.as_str());
        let mut out = Vec::new();
        let mut repos_after = None;
        loop {
            let repos = self
                .list_repositories(
                    &ListOptions {
                        n: None,
                        last: repos_after.take(),
                    },
                    &under,
                )
                .await?;
            for repo in &repos.items {
                let mut after = None;
                loop {
                    let page = match self
                        .list_manifests(
                            repo,
                            &ListOptions {
                                n: None,
                                last: after.take(),
                            },
                        )
                        .await
                    {
                        Ok(page) => page,
                        Err(Error::NameUnknown { .. }) => break,
                        Err(e) => return Err(e),
                    };
                    for m in page.items.into_iter().filter(|m| m.parents == 0) {
                        let mut bytes = m.size;
                        if let Some(record) = self.inner.meta.manifest(repo, &m.digest).await? {
                            for blob in &record.blobs {
                                if let Some(link) = self.inner.meta.blob_link(repo, blob).await? {
                                    bytes += link.size;
                                }
                            }
                        }
                        let pulled = lock(&proxy.pulled)
                            .get(&(repo.clone(), m.digest.clone()))
                            .copied()
                            .unwrap_or(m.pushed_at);
                        out.push((pulled, repo.clone(), m.digest, bytes));
                    }
                    match page.next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
            }
            match repos.next {
                Some(next) => repos_after = Some(next),
                None => return Ok(out),
            }
        }
    }
}
