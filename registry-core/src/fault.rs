//! Fault injection: a [`Storage`] wrapper that fails, slows down or tears storage calls
//! by rule, to test how a client's retry logic copes with a misbehaving registry (and
//! that the registry itself keeps its promises when its storage misbehaves).
//!
//! ```
//! use std::time::Duration;
//! use registry_core::fault::{Faults, Rule};
//! use registry_core::{MemoryStore, Registry, RepoName, fixtures};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), registry_core::Error> {
//! let faults = Faults::new(42) // the seed of every probability below
//!     // The first manifest write fails (a 500 for an HTTP client)...
//!     .with(Rule::error("meta.put_manifest").times(1))
//!     // ...and a third of blob appends store only a prefix, then fail.
//!     .with(Rule::torn("blobs.append_upload").probability(0.33))
//!     .with(Rule::latency("blobs.read", Duration::from_millis(5)));
//! let registry = Registry::builder(faults.wrap(MemoryStore::new())).build();
//! let repo = RepoName::parse("demo/app")?;
//!
//! let image = fixtures::image().layers([1024]);
//! assert!(image.push(&registry, &repo, "v1").await.is_err()); // the injected failure
//! faults.set_enabled(false);
//! image.push(&registry, &repo, "v1").await?; // the retry
//! assert_eq!(faults.injected().len(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! **Operations** are named as in `testkit::hooks`: `blobs.<method>` for
//! [`BlobStore`] methods (`blobs.read` also covers `read_verified`) and `meta.<method>`
//! for [`MetadataStore`] methods, for example `blobs.append_upload`, `blobs.put_bytes`
//! (manifest bytes), `blobs.commit_upload`, `meta.link_blob`, `meta.put_manifest`,
//! `meta.set_tag`. A rule names them with a glob (`blobs.*`, `meta.*_manifest`, `*`).
//!
//! **Rules** match a call by operation and, optionally, by repository, digest or upload
//! id glob (a call without that key does not match). Each rule counts the calls it
//! matches: it lets the first [`after`](Rule::after) pass, then fires with its
//! [`probability`](Rule::probability) (drawn from the seeded generator, so a sequential
//! scenario fails the same calls in every run), at most [`times`](Rule::times) times.
//! The first rule that fires decides the call's fault.
//!
//! **Faults** ([`Fault`]): an error before the call (nothing happened), an error after
//! it (it happened, the answer was lost), latency, or a torn call. A torn write stores
//! only a prefix, then fails: an append keeps a prefix of its chunk (the session is
//! longer than the client thinks, as after a crash mid-append), a one-call blob write
//! (`put_bytes`) leaves a partial upload session behind and stores no blob. A torn read
//! streams a prefix, then an error. Commits and metadata changes are atomic by the
//! storage contract: torn, they simply fail. Injected errors are
//! [`Error::Storage`] wrapping an [`InjectedFault`], which tests can downcast to.
//!
//! What the registry guarantees under these faults (the shared suite checks it on
//! every store): an acknowledged push reads back whole, a refused one is absent, and
//! nothing partial is ever served as a blob or manifest.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use wildmatch::WildMatch;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::names::{RepoName, Tag};
use crate::policy::Policy;
use crate::rng::SplitMix64;
use crate::store::*;
use crate::time::Timestamp;

/// What a rule does to a call it fires on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail before the call: nothing happened.
    Error,
    /// Make the call, then fail: it happened, but the caller is told it did not (a lost
    /// acknowledgement).
    ErrorAfter,
    /// Wait this long (in real time), then make the call.
    Latency(Duration),
    /// A torn call: a write stores only a prefix, then fails; a read streams a prefix,
    /// then fails. Calls that cannot tear (atomic commits, metadata changes) fail as
    /// with [`Fault::Error`].
    Torn,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Error => "error",
            Fault::ErrorAfter => "error after the call",
            Fault::Latency(_) => "latency",
            Fault::Torn => "torn",
        }
    }
}

/// The error an injected failure carries inside [`Error::Storage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedFault {
    /// The operation, such as `blobs.append_upload`.
    pub op: &'static str,
    /// The fault.
    pub fault: Fault,
}

impl std::fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "injected fault ({}) in {}", self.fault.name(), self.op)
    }
}

impl std::error::Error for InjectedFault {}

impl InjectedFault {
    /// The injected fault inside `e`, if `e` is one.
    pub fn find(e: &Error) -> Option<&InjectedFault> {
        match e {
            Error::Storage(inner) => inner.downcast_ref::<InjectedFault>(),
            _ => None,
        }
    }
}

fn injected(op: &'static str, fault: Fault) -> Error {
    Error::storage(InjectedFault { op, fault })
}

/// When and how to inject a [`Fault`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Rule {
    op: WildMatch,
    op_text: String,
    repo: Option<WildMatch>,
    digest: Option<WildMatch>,
    upload: Option<WildMatch>,
    probability: f64,
    after: u64,
    times: Option<u64>,
    fault: Fault,
}

impl Rule {
    /// A rule injecting `fault` into every call of the operations `op` (a glob) names.
    pub fn new(op: &str, fault: Fault) -> Rule {
        Rule {
            op: WildMatch::new(op),
            op_text: op.to_owned(),
            repo: None,
            digest: None,
            upload: None,
            probability: 1.0,
            after: 0,
            times: None,
            fault,
        }
    }
    /// [`Fault::Error`] on `op`.
    pub fn error(op: &str) -> Rule {
        Rule::new(op, Fault::Error)
    }
    /// [`Fault::ErrorAfter`] on `op`.
    pub fn error_after(op: &str) -> Rule {
        Rule::new(op, Fault::ErrorAfter)
    }
    /// [`Fault::Latency`] of `delay` on `op`.
    pub fn latency(op: &str, delay: Duration) -> Rule {
        Rule::new(op, Fault::Latency(delay))
    }
    /// [`Fault::Torn`] on `op`.
    pub fn torn(op: &str) -> Rule {
        Rule::new(op, Fault::Torn)
    }
    /// Only calls about a repository matching `glob`.
    pub fn repo(mut self, glob: &str) -> Rule {
        self.repo = Some(WildMatch::new(glob));
        self
    }
    /// Only calls about a digest matching `glob` (`sha256:ab*`).
    pub fn digest(mut self, glob: &str) -> Rule {
        self.digest = Some(WildMatch::new(glob));
        self
    }
    /// Only calls about an upload session whose id matches `glob`.
    pub fn upload(mut self, glob: &str) -> Rule {
        self.upload = Some(WildMatch::new(glob));
        self
    }
    /// Fires on a matching call with probability `p` (clamped to `[0, 1]`; default 1).
    pub fn probability(mut self, p: f64) -> Rule {
        self.probability = p.clamp(0.0, 1.0);
        self
    }
    /// Lets the first `n` matching calls pass untouched (default 0).
    pub fn after(mut self, n: u64) -> Rule {
        self.after = n;
        self
    }
    /// Fires at most `m` times (default: no limit).
    pub fn times(mut self, m: u64) -> Rule {
        self.times = Some(m);
        self
    }

    fn matches(&self, call: &Call<'_>) -> bool {
        fn key(glob: &Option<WildMatch>, value: Option<&str>) -> bool {
            match (glob, value) {
                (None, _) => true,
                (Some(g), Some(v)) => g.matches(v),
                (Some(_), None) => false,
            }
        }
        self.op.matches(call.op)
            && key(&self.repo, call.repo.map(RepoName::as_str))
            && key(&self.digest, call.digest.map(Digest::as_str))
            && key(&self.upload, call.upload.map(UploadId::as_str))
    }
}

/// One injected fault, as [`Faults::injected`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// The operation.
    pub op: &'static str,
    /// The call's repository, digest and upload id, those it has, space-separated.
    pub key: String,
    /// The fault.
    pub fault: Fault,
    /// The rule that fired (its operation glob).
    pub rule: String,
}

/// A storage call, as rules see it.
struct Call<'a> {
    op: &'static str,
    repo: Option<&'a RepoName>,
    digest: Option<&'a Digest>,
    upload: Option<&'a UploadId>,
}

impl<'a> Call<'a> {
    fn new(op: &'static str) -> Self {
        Call {
            op,
            repo: None,
            digest: None,
            upload: None,
        }
    }
    fn repo(mut self, r: &'a RepoName) -> Self {
        self.repo = Some(r);
        self
    }
    fn digest(mut self, d: &'a Digest) -> Self {
        self.digest = Some(d);
        self
    }
    fn upload(mut self, u: &'a UploadId) -> Self {
        self.upload = Some(u);
        self
    }
    fn key(&self) -> String {
        let parts = [
            self.repo.map(|r| r.to_string()),
            self.digest.map(|d| d.to_string()),
            self.upload.map(|u| u.to_string()),
        ];
        parts.into_iter().flatten().collect::<Vec<_>>().join(" ")
    }
}

struct RuleState {
    rule: Rule,
    seen: u64,
    fired: u64,
}

struct State {
    rules: Vec<RuleState>,
    rng: SplitMix64,
    log: Vec<Injection>,
}

/// A set of fault rules, shared by the storages it [wraps](Faults::wrap). Cheap to
/// clone; clones share rules, counts, generator and log, so a test changes the rules
/// of a running registry through its own clone.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<State>>,
    enabled: Arc<AtomicBool>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Faults")
            .field(
                "rules",
                &s.rules.iter().map(|r| &r.rule.op_text).collect::<Vec<_>>(),
            )
            .field("injected", &s.log.len())
            .finish()
    }
}

impl Faults {
    /// No rules yet; probabilities are drawn from a generator seeded with `seed`.
    pub fn new(seed: u64) -> Faults {
        Faults {
            state: Arc::new(Mutex::new(State {
                rules: Vec::new(),
                rng: SplitMix64::new(seed),
                log: Vec::new(),
            })),
            enabled: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Adds `rule` (after the others), builder style.
    pub fn with(self, rule: Rule) -> Faults {
        self.add(rule);
        self
    }

    /// Adds `rule` (after the others), also while storage is in use.
    pub fn add(&self, rule: Rule) {
        self.lock().rules.push(RuleState {
            rule,
            seen: 0,
            fired: 0,
        });
    }

    /// Removes every rule (the log stays).
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Turns injection off (every call passes untouched, and is not counted) or back on.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Every fault injected so far, in order.
    pub fn injected(&self) -> Vec<Injection> {
        self.lock().log.clone()
    }

    /// `storage`, every call of which goes through these rules first.
    pub fn wrap(&self, storage: impl Into<Storage>) -> Storage {
        let storage = storage.into();
        Storage {
            blobs: Arc::new(FaultyBlobs {
                inner: storage.blobs,
                faults: self.clone(),
            }),
            metadata: Arc::new(FaultyMeta {
                inner: storage.metadata,
                faults: self.clone(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Counts and a log: a panic elsewhere cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fault to inject into `call`, if a rule fires.
    fn decide(&self, call: &Call<'_>) -> Option<Fault> {
        if !self.enabled.load(Ordering::SeqCst) {
            return None;
        }
        let mut state = self.lock();
        let State { rules, rng, log } = &mut *state;
        let mut decided = None;
        for r in rules.iter_mut() {
            if !r.rule.matches(call) {
                continue;
            }
            r.seen += 1;
            if decided.is_some()
                || r.seen <= r.rule.after
                || r.rule.times.is_some_and(|m| r.fired >= m)
            {
                continue;
            }
            // Draw only for a real coin toss, so rules of probability 1 leave the
            // generator's stream (and the other rules' choices) as it was.
            if r.rule.probability < 1.0 && rng.next_f64() >= r.rule.probability {
                continue;
            }
            r.fired += 1;
            decided = Some(r.rule.fault);
            log.push(Injection {
                op: call.op,
                key: call.key(),
                fault: r.rule.fault,
                rule: r.rule.op_text.clone(),
            });
        }
        decided
    }

    /// A number in `[0, n)` from the seeded generator (where torn calls cut).
    fn below(&self, n: u64) -> u64 {
        self.lock().rng.below(n)
    }

    /// Runs `fut` (a call not tearable in any special way) under the rules.
    async fn around<T>(&self, call: Call<'_>, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let op = call.op;
        match self.decide(&call) {
            None => fut.await,
            Some(Fault::Latency(d)) => {
                tokio::time::sleep(d).await;
                fut.await
            }
            // Not polled: the call never happens.
            Some(f @ (Fault::Error | Fault::Torn)) => Err(injected(op, f)),
            Some(Fault::ErrorAfter) => {
                let _ = fut.await;
                Err(injected(op, Fault::ErrorAfter))
            }
        }
    }

    /// A stream of the first `keep` bytes of `inner`, then an error.
    fn cut_stream(op: &'static str, inner: ByteStream, keep: u64) -> ByteStream {
        futures::stream::unfold(
            (inner, keep, false),
            move |(mut inner, left, done)| async move {
                if done {
                    return None;
                }
                if left == 0 {
                    let e = std::io::Error::other(InjectedFault {
                        op,
                        fault: Fault::Torn,
                    });
                    return Some((Err(e), (inner, 0, true)));
                }
                match inner.next().await {
                    Some(Ok(chunk)) => {
                        let take = (chunk.len() as u64).min(left);
                        Some((
                            Ok(chunk.slice(..take as usize)),
                            (inner, left - take, false),
                        ))
                    }
                    Some(Err(e)) => Some((Err(e), (inner, 0, true))),
                    // Shorter than the cut: the error still comes, where the rest would.
                    None => Some((
                        Err(std::io::Error::other(InjectedFault {
                            op,
                            fault: Fault::Torn,
                        })),
                        (inner, 0, true),
                    )),
                }
            },
        )
        .boxed()
    }

    /// A read under the rules: torn reads stream a prefix of what they would.
    async fn read_call(
        &self,
        call: Call<'_>,
        fut: impl Future<Output = Result<Option<BlobRead>>>,
    ) -> Result<Option<BlobRead>> {
        let op = call.op;
        match self.decide(&call) {
            None => fut.await,
            Some(Fault::Latency(d)) => {
                tokio::time::sleep(d).await;
                fut.await
            }
            Some(Fault::Error) => Err(injected(op, Fault::Error)),
            Some(Fault::ErrorAfter) => {
                let _ = fut.await;
                Err(injected(op, Fault::ErrorAfter))
            }
            Some(Fault::Torn) => Ok(fut.await?.map(|mut read| {
                let len = read.range.map_or(read.size, |r| r.len());
                let keep = self.below(len.max(1));
                read.stream = Self::cut_stream(op, read.stream, keep);
                read
            })),
        }
    }
}

/// Collects a body whole (a torn append cuts it at a point chosen among its bytes;
/// test-sized bodies only).
async fn collect(mut data: ByteStream) -> Result<Bytes> {
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = data.next().await {
        buf.extend_from_slice(&chunk.map_err(Error::storage)?);
    }
    Ok(buf.freeze())
}

fn one_chunk(bytes: Bytes) -> ByteStream {
    futures::stream::iter([Ok(bytes)]).boxed()
}

struct FaultyBlobs {
    inner: Arc<dyn BlobStore>,
    faults: Faults,
}

struct FaultyMeta {
    inner: Arc<dyn MetadataStore>,
    faults: Faults,
}

#[async_trait]
impl BlobStore for FaultyBlobs {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        let call = Call::new("blobs.stat").digest(digest);
        self.faults.around(call, self.inner.stat(digest)).await
    }
    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobRead>> {
        let call = Call::new("blobs.read").digest(digest);
        self.faults
            .read_call(call, self.inner.read(digest, range))
            .await
    }
    // Forwarded, so that a store's own verified read (the fs store's) is what runs.
    async fn read_verified(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        verify: bool,
    ) -> Result<Option<BlobRead>> {
        let call = Call::new("blobs.read").digest(digest);
        let fut = self.inner.read_verified(digest, range, verify);
        self.faults.read_call(call, fut).await
    }
    async fn delete(&self, digest: &Digest) -> Result<bool> {
        let call = Call::new("blobs.delete").digest(digest);
        self.faults.around(call, self.inner.delete(digest)).await
    }
    async fn list(&self) -> Result<BoxStream<'static, Result<Digest>>> {
        self.faults
            .around(Call::new("blobs.list"), self.inner.list())
            .await
    }
    async fn create_upload(&self, id: &UploadId, repo: &RepoName, now: Timestamp) -> Result<()> {
        let call = Call::new("blobs.create_upload").upload(id).repo(repo);
        self.faults
            .around(call, self.inner.create_upload(id, repo, now))
            .await
    }
    async fn upload_info(&self, id: &UploadId) -> Result<Option<UploadInfo>> {
        let call = Call::new("blobs.upload_info").upload(id);
        self.faults.around(call, self.inner.upload_info(id)).await
    }
    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        data: ByteStream,
        now: Timestamp,
    ) -> Result<u64> {
        const OP: &str = "blobs.append_upload";
        match self.faults.decide(&Call::new(OP).upload(id)) {
            None => self.inner.append_upload(id, offset, data, now).await,
            Some(Fault::Latency(d)) => {
                tokio::time::sleep(d).await;
                self.inner.append_upload(id, offset, data, now).await
            }
            Some(Fault::Error) => Err(injected(OP, Fault::Error)),
            Some(Fault::ErrorAfter) => {
                let _ = self.inner.append_upload(id, offset, data, now).await;
                Err(injected(OP, Fault::ErrorAfter))
            }
            Some(Fault::Torn) => {
                // Collected first, to cut it at a point among its bytes. A body that
                // fails on its own fails as it would have.
                let whole = collect(data).await?;
                let keep = self.faults.below(whole.len() as u64 + 1) as usize;
                let _ = self
                    .inner
                    .append_upload(id, offset, one_chunk(whole.slice(..keep)), now)
                    .await;
                Err(injected(OP, Fault::Torn))
            }
        }
    }
    async fn read_upload(&self, id: &UploadId) -> Result<ByteStream> {
        const OP: &str = "blobs.read_upload";
        match self.faults.decide(&Call::new(OP).upload(id)) {
            Some(Fault::Torn) => {
                let len = self.inner.upload_info(id).await?.map_or(0, |u| u.len);
                let keep = self.faults.below(len.max(1));
                let stream = self.inner.read_upload(id).await?;
                Ok(Faults::cut_stream(OP, stream, keep))
            }
            Some(Fault::Latency(d)) => {
                tokio::time::sleep(d).await;
                self.inner.read_upload(id).await
            }
            Some(f @ (Fault::Error | Fault::ErrorAfter)) => Err(injected(OP, f)),
            None => self.inner.read_upload(id).await,
        }
    }
    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<CommitOutcome> {
        let call = Call::new("blobs.commit_upload").upload(id).digest(digest);
        self.faults
            .around(call, self.inner.commit_upload(id, digest, len))
            .await
    }
    async fn delete_upload(&self, id: &UploadId) -> Result<bool> {
        let call = Call::new("blobs.delete_upload").upload(id);
        self.faults.around(call, self.inner.delete_upload(id)).await
    }
    async fn put_bytes(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        now: Timestamp,
    ) -> Result<CommitOutcome> {
        const OP: &str = "blobs.put_bytes";
        let call = Call::new(OP).repo(repo).digest(digest);
        match self.faults.decide(&call) {
            None => self.inner.put_bytes(repo, digest, bytes, now).await,
            Some(Fault::Latency(d)) => {
                tokio::time::sleep(d).await;
                self.inner.put_bytes(repo, digest, bytes, now).await
            }
            Some(Fault::Error) => Err(injected(OP, Fault::Error)),
            Some(Fault::ErrorAfter) => {
                let _ = self.inner.put_bytes(repo, digest, bytes, now).await;
                Err(injected(OP, Fault::ErrorAfter))
            }
            Some(Fault::Torn) => {
                // What a crash mid-write leaves: a partial temporary file, never a
                // partial blob (the store commits by rename or conditional create).
                // Here, a session holding a prefix, which expires like any other.
                let keep = self.faults.below(bytes.len() as u64 + 1) as usize;
                let id = UploadId::parse(&format!("torn{:016x}", self.faults.below(u64::MAX)))
                    .expect("a valid upload id");
                if self.inner.create_upload(&id, repo, now).await.is_ok() {
                    let prefix = one_chunk(bytes.slice(..keep));
                    let _ = self.inner.append_upload(&id, 0, prefix, now).await;
                }
                Err(injected(OP, Fault::Torn))
            }
        }
    }
    async fn list_uploads(&self) -> Result<Vec<UploadInfo>> {
        self.faults
            .around(Call::new("blobs.list_uploads"), self.inner.list_uploads())
            .await
    }
    async fn presigned_get(
        &self,
        digest: &Digest,
        ttl: std::time::Duration,
    ) -> Result<Option<String>> {
        let call = Call::new("blobs.presigned_get").digest(digest);
        self.faults
            .around(call, self.inner.presigned_get(digest, ttl))
            .await
    }
}

#[async_trait]
impl MetadataStore for FaultyMeta {
    async fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        let call = Call::new("meta.blob").digest(digest);
        self.faults.around(call, self.inner.blob(digest)).await
    }
    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobLink>> {
        let call = Call::new("meta.blob_link").repo(repo).digest(digest);
        self.faults
            .around(call, self.inner.blob_link(repo, digest))
            .await
    }
    async fn blob_repositories(
        &self,
        digest: &Digest,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        let call = Call::new("meta.blob_repositories").digest(digest);
        let fut = self.inner.blob_repositories(digest, after, limit);
        self.faults.around(call, fut).await
    }
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        let call = Call::new("meta.manifest").repo(repo).digest(digest);
        self.faults
            .around(call, self.inner.manifest(repo, digest))
            .await
    }
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let call = Call::new("meta.tag").repo(repo);
        self.faults.around(call, self.inner.tag(repo, tag)).await
    }
    async fn tagged_manifest(&self, repo: &RepoName, tag: &Tag) -> Result<Option<ManifestRecord>> {
        let call = Call::new("meta.tagged_manifest").repo(repo);
        self.faults
            .around(call, self.inner.tagged_manifest(repo, tag))
            .await
    }
    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoRecord>> {
        let call = Call::new("meta.repository").repo(repo);
        self.faults.around(call, self.inner.repository(repo)).await
    }
    async fn list_tags(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<(Tag, Digest)>> {
        let call = Call::new("meta.list_tags").repo(repo);
        self.faults
            .around(call, self.inner.list_tags(repo, after, limit))
            .await
    }
    async fn list_tag_names(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<Tag>> {
        let call = Call::new("meta.list_tag_names").repo(repo);
        let fut = self.inner.list_tag_names(repo, after, limit);
        self.faults.around(call, fut).await
    }
    async fn list_tag_entries(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<TagEntry>> {
        let call = Call::new("meta.list_tag_entries").repo(repo);
        let fut = self.inner.list_tag_entries(repo, after, limit);
        self.faults.around(call, fut).await
    }
    async fn quota_usage(&self, prefix: &RepoName) -> Result<Option<u64>> {
        let call = Call::new("meta.quota_usage").repo(prefix);
        self.faults
            .around(call, self.inner.quota_usage(prefix))
            .await
    }
    async fn list_manifests(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<ManifestRecord>> {
        let call = Call::new("meta.list_manifests").repo(repo);
        let fut = self.inner.list_manifests(repo, after, limit);
        self.faults.around(call, fut).await
    }
    async fn list_blob_links(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobLink)>> {
        let call = Call::new("meta.list_blob_links").repo(repo);
        let fut = self.inner.list_blob_links(repo, after, limit);
        self.faults.around(call, fut).await
    }
    async fn list_repositories(
        &self,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        let call = Call::new("meta.list_repositories");
        let fut = self.inner.list_repositories(after, limit);
        self.faults.around(call, fut).await
    }
    async fn list_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<Referrer>> {
        let call = Call::new("meta.list_referrers").repo(repo).digest(subject);
        let fut = self.inner.list_referrers(repo, subject, after, limit);
        self.faults.around(call, fut).await
    }
    async fn unreferenced_blob_links(
        &self,
        after: Option<(&RepoName, &Digest)>,
        limit: usize,
    ) -> Result<Vec<(RepoName, Digest, BlobLink)>> {
        let call = Call::new("meta.unreferenced_blob_links");
        let fut = self.inner.unreferenced_blob_links(after, limit);
        self.faults.around(call, fut).await
    }
    async fn unlinked_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobRecord)>> {
        let call = Call::new("meta.unlinked_blobs");
        self.faults
            .around(call, self.inner.unlinked_blobs(after, limit))
            .await
    }
    async fn stats(&self) -> Result<MetaStats> {
        self.faults
            .around(Call::new("meta.stats"), self.inner.stats())
            .await
    }
    async fn audit(&self, repair: bool) -> Result<AuditReport> {
        self.faults
            .around(Call::new("meta.audit"), self.inner.audit(repair))
            .await
    }
    async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<LinkOutcome> {
        let call = Call::new("meta.link_blob").repo(repo).digest(digest);
        let fut = self.inner.link_blob(repo, digest, size, now, policy);
        self.faults.around(call, fut).await
    }
    async fn mount_blob(
        &self,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<LinkOutcome>> {
        let call = Call::new("meta.mount_blob").repo(to).digest(digest);
        let fut = self.inner.mount_blob(from, to, digest, now, policy);
        self.faults.around(call, fut).await
    }
    async fn touch_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        now: Timestamp,
    ) -> Result<bool> {
        let call = Call::new("meta.touch_blob_link").repo(repo).digest(digest);
        let fut = self.inner.touch_blob_link(repo, digest, now);
        self.faults.around(call, fut).await
    }
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let call = Call::new("meta.unlink_blob").repo(repo).digest(digest);
        self.faults
            .around(call, self.inner.unlink_blob(repo, digest))
            .await
    }
    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<PutManifestOutcome>> {
        let digest = manifest.record.digest.clone();
        let call = Call::new("meta.put_manifest").repo(repo).digest(&digest);
        let fut = self.inner.put_manifest(repo, manifest, now, policy);
        self.faults.around(call, fut).await
    }
    async fn set_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<Digest>> {
        let call = Call::new("meta.set_tag").repo(repo).digest(digest);
        let fut = self.inner.set_tag(repo, tag, digest, now, policy);
        self.faults.around(call, fut).await
    }
    async fn delete_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        policy: &Policy,
    ) -> Result<Option<Digest>> {
        let call = Call::new("meta.delete_tag").repo(repo);
        self.faults
            .around(call, self.inner.delete_tag(repo, tag, policy))
            .await
    }
    async fn delete_tag_if(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        tagged_at: Timestamp,
        policy: &Policy,
    ) -> Result<bool> {
        let call = Call::new("meta.delete_tag_if").repo(repo).digest(digest);
        let fut = self
            .inner
            .delete_tag_if(repo, tag, digest, tagged_at, policy);
        self.faults.around(call, fut).await
    }
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        policy: &Policy,
    ) -> Result<Option<DeletedManifest>> {
        let call = Call::new("meta.delete_manifest").repo(repo).digest(digest);
        let fut = self.inner.delete_manifest(repo, digest, policy);
        self.faults.around(call, fut).await
    }
    async fn collect_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        rule: ManifestCollectRule,
    ) -> Result<Option<DeletedManifest>> {
        let call = Call::new("meta.collect_manifest").repo(repo).digest(digest);
        let fut = self.inner.collect_manifest(repo, digest, rule);
        self.faults.around(call, fut).await
    }
    async fn collect_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        cutoff: Timestamp,
    ) -> Result<bool> {
        let call = Call::new("meta.collect_blob_link")
            .repo(repo)
            .digest(digest);
        let fut = self.inner.collect_blob_link(repo, digest, cutoff);
        self.faults.around(call, fut).await
    }
    async fn begin_blob_deletion(
        &self,
        digest: &Digest,
        now: Timestamp,
        lease: Duration,
    ) -> Result<Option<BlobRecord>> {
        let call = Call::new("meta.begin_blob_deletion").digest(digest);
        let fut = self.inner.begin_blob_deletion(digest, now, lease);
        self.faults.around(call, fut).await
    }
    async fn finish_blob_deletion(&self, digest: &Digest, since: Timestamp) -> Result<bool> {
        let call = Call::new("meta.finish_blob_deletion").digest(digest);
        let fut = self.inner.finish_blob_deletion(digest, since);
        self.faults.around(call, fut).await
    }
    async fn events_after(&self, after: u64, limit: usize) -> Result<crate::events::OutboxRead> {
        self.faults
            .around(
                Call::new("meta.events_after"),
                self.inner.events_after(after, limit),
            )
            .await
    }

    async fn outbox_settled(&self, horizon: u64) -> Result<bool> {
        self.faults
            .around(
                Call::new("meta.outbox_settled"),
                self.inner.outbox_settled(horizon),
            )
            .await
    }

    async fn events_head(&self) -> Result<u64> {
        self.faults
            .around(Call::new("meta.events_head"), self.inner.events_head())
            .await
    }

    async fn claim_consumer(
        &self,
        name: &str,
        owner: &str,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<u64>> {
        self.faults
            .around(
                Call::new("meta.claim_consumer"),
                self.inner.claim_consumer(name, owner, now, lease),
            )
            .await
    }

    async fn ack_consumer(
        &self,
        name: &str,
        owner: &str,
        cursor: u64,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<bool> {
        self.faults
            .around(
                Call::new("meta.ack_consumer"),
                self.inner.ack_consumer(name, owner, cursor, now, lease),
            )
            .await
    }

    async fn consumers(&self) -> Result<Vec<(String, crate::events::ConsumerRecord)>> {
        self.faults
            .around(Call::new("meta.consumers"), self.inner.consumers())
            .await
    }

    async fn trim_events(
        &self,
        now: Timestamp,
        retention: std::time::Duration,
        max_events: u64,
    ) -> Result<u64> {
        self.faults
            .around(
                Call::new("meta.trim_events"),
                self.inner.trim_events(now, retention, max_events),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryStore, Registry, fixtures};

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    /// `after`, `times`, filters and the seeded coin: the same calls fail in every run.
    #[tokio::test]
    async fn rules_count_filter_and_replay() {
        async fn run(seed: u64) -> (Vec<bool>, Vec<Injection>) {
            let faults = Faults::new(seed)
                .with(Rule::error("meta.repository").repo("a/*").after(2).times(3))
                .with(Rule::error("meta.repository").repo("b/*").probability(0.5));
            let storage = faults.wrap(MemoryStore::new());
            let mut outcomes = Vec::new();
            for i in 0..12 {
                let r = repo(if i % 2 == 0 { "a/x" } else { "b/y" });
                outcomes.push(storage.metadata.repository(&r).await.is_err());
            }
            (outcomes, faults.injected())
        }
        let (first, log) = run(9).await;
        assert_eq!(run(9).await.0, first, "same seed, same failures");
        // a/x: calls 0,2,4,6,8,10 → the first two pass, then three fail, then none.
        let a: Vec<bool> = first.iter().step_by(2).copied().collect();
        assert_eq!(a, [false, false, true, true, true, false]);
        let b_failures = first.iter().skip(1).step_by(2).filter(|&&f| f).count();
        assert!(
            b_failures < 6,
            "probability 0.5 fails some, not all: {first:?}"
        );
        assert_eq!(log.len(), 3 + b_failures);
        assert_eq!(log[0].op, "meta.repository");
        assert_eq!(log[0].key, "a/x");
        // Disabled: everything passes.
        let faults = Faults::new(0).with(Rule::error("*"));
        let storage = faults.wrap(MemoryStore::new());
        assert!(storage.metadata.stats().await.is_err());
        faults.set_enabled(false);
        assert!(storage.metadata.stats().await.is_ok());
    }

    /// Torn appends keep a prefix and fail; the registry refuses to finish such an
    /// upload under the claimed digest, and nothing partial is readable.
    #[tokio::test]
    async fn torn_append_is_never_served() {
        let faults = Faults::new(3).with(Rule::torn("blobs.append_upload").times(1));
        let registry = Registry::builder(faults.wrap(MemoryStore::new())).build();
        let r = repo("torn/app");
        let data = Bytes::from(vec![5u8; 10_000]);
        let digest = Digest::sha256(&data);
        let status = registry
            .start_upload(&r, crate::Algorithm::Sha256)
            .await
            .unwrap();
        let e = registry
            .append_upload(&r, &status.id, Some(0), None, one_chunk(data.clone()))
            .await
            .unwrap_err();
        assert!(InjectedFault::find(&e).is_some(), "{e}");
        // The session holds a prefix: finishing under the full digest is refused.
        let kept = registry.upload_status(&r, &status.id).await.unwrap().offset;
        assert!(kept <= data.len() as u64);
        if kept < data.len() as u64 {
            let e = registry
                .finish_upload(&r, &status.id, &digest, None)
                .await
                .unwrap_err();
            assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
        }
        assert!(registry.stat_blob(&r, &digest).await.is_err() || kept == data.len() as u64);
        // A retry from scratch succeeds and reads back whole.
        let pushed = fixtures::image()
            .layers([])
            .layer_bytes(data.clone())
            .push(&registry, &r, "v1")
            .await;
        assert!(pushed.is_ok());
        let mut body = registry.get_blob(&r, &digest, None).await.unwrap().stream;
        let mut got = Vec::new();
        while let Some(c) = body.next().await {
            got.extend_from_slice(&c.unwrap());
        }
        assert_eq!(got, data);
    }

    /// A torn read streams a prefix, then an error: never a short body that ends well.
    #[tokio::test]
    async fn torn_read_ends_in_an_error() {
        let faults = Faults::new(1);
        let registry = Registry::builder(faults.wrap(MemoryStore::new())).build();
        let r = repo("torn/read");
        let img = fixtures::image()
            .layers([50_000])
            .push(&registry, &r, "v1")
            .await
            .unwrap();
        faults.add(
            Rule::torn("blobs.read")
                .digest(img.layers[0].digest.as_str())
                .times(1),
        );
        let mut body = registry
            .get_blob(&r, &img.layers[0].digest, None)
            .await
            .unwrap()
            .stream;
        let mut got = 0usize;
        let mut failed = false;
        while let Some(c) = body.next().await {
            match c {
                Ok(c) => got += c.len(),
                Err(_) => failed = true,
            }
        }
        assert!(failed && got < 50_000, "got {got} bytes, failed: {failed}");
        // Error-after on a manifest push: the push happened, the caller was told not.
        faults.add(Rule::error_after("meta.put_manifest").times(1));
        let img2 = fixtures::image().seed(2);
        assert!(img2.push(&registry, &r, "v2").await.is_err());
        assert!(
            registry
                .get_manifest(&r, &Reference::Tag(Tag::parse("v2").unwrap()))
                .await
                .is_ok()
        );
    }

    use crate::names::Reference;
}
