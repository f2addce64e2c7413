//! The storage contract: content-addressed bytes ([`BlobStore`]) and atomic metadata
//! operations ([`MetadataStore`]). `docs/design.md` states the invariants each
//! implementation must keep; the `testkit` feature checks them.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::events::{ConsumerRecord, OutboxRead};
use crate::manifest::Descriptor;
use crate::names::{RepoName, Tag};
use crate::policy::Policy;
use crate::time::Timestamp;

/// A stream of bytes moving into or out of storage.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// An opaque upload session id: 1 to 64 characters of `[A-Za-z0-9_-]`, safe to use in
/// URLs, file names and object keys.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UploadId(Box<str>);

impl UploadId {
    /// A new random id.
    pub fn random() -> Self {
        UploadId(uuid::Uuid::new_v4().simple().to_string().into())
    }

    /// A new random id that carries `owner`'s tag: the session limits count it against
    /// the owner, and [`is_for`](Self::is_for) tells whether a caller is that owner,
    /// with nothing stored beside the session (so it works across processes sharing
    /// storage, and for sessions that survive a restart).
    pub fn random_for(owner: &UploadOwner) -> Self {
        let random = uuid::Uuid::new_v4().simple();
        UploadId(format!("{random}_{}", owner.tag()).into())
    }

    /// The owner tag carried by the id, if it was made by [`random_for`](Self::random_for).
    pub fn owner_tag(&self) -> Option<&str> {
        let (_, tag) = self.0.rsplit_once('_')?;
        (tag.len() == UploadOwner::TAG_LEN && tag.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(tag)
    }

    /// Whether `owner` may use this session: it carries `owner`'s tag, or no tag at all
    /// (a session opened without an owner answers to anyone who may push).
    pub fn is_for(&self, owner: &UploadOwner) -> bool {
        self.owner_tag().is_none_or(|t| t == owner.tag())
    }

    /// Parses an id received from a client; `None` if it could not be one of ours.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| UploadId(s.into()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UploadId({})", self.0)
    }
}

/// Who opens an upload session: an authenticated identity, or the client's address when
/// it is anonymous. Sessions are limited per owner
/// ([`RegistryConfig::max_open_uploads_per_owner`](crate::RegistryConfig)), so that one
/// client cannot take every session of the registry, and `registry-http` binds a session
/// to the owner that opened it. Only a hash of the name is kept (in the session id).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UploadOwner(Box<str>);

impl UploadOwner {
    /// Hex digits of the tag an owned [`UploadId`] carries (64 bits of SHA-256: a client
    /// cannot find another owner's tag by chance, and still needs the session's random
    /// part to use it).
    pub const TAG_LEN: usize = 16;

    /// The owner named `name`: any stable text that tells owners apart, such as
    /// `user:alice` or `addr:192.0.2.1`.
    pub fn new(name: &str) -> Self {
        use sha2::Digest as _;
        let hash = sha2::Sha256::digest(name.as_bytes());
        let mut tag = String::with_capacity(Self::TAG_LEN);
        for b in &hash[..Self::TAG_LEN / 2] {
            tag.push_str(&format!("{b:02x}"));
        }
        UploadOwner(tag.into())
    }

    /// The owner's tag, as carried by its session ids.
    pub fn tag(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UploadOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UploadOwner({})", self.0)
    }
}

/// An upload session as storage knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadInfo {
    /// The session id.
    pub id: UploadId,
    /// The repository the upload was started in.
    pub repo: RepoName,
    /// Bytes received so far.
    pub len: u64,
    /// When the session was created.
    pub started_at: Timestamp,
    /// When bytes were last appended (or the session was created).
    pub updated_at: Timestamp,
}

/// A resolved, inclusive byte range within a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte offset.
    pub start: u64,
    /// Last byte offset, inclusive.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Always false: a resolved range holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Bytes being read from storage.
pub struct BlobRead {
    /// The whole blob's size.
    pub size: u64,
    /// The range being streamed, `None` for the whole blob.
    pub range: Option<ByteRange>,
    /// The bytes.
    pub stream: ByteStream,
}

impl fmt::Debug for BlobRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobRead")
            .field("size", &self.size)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// What [`BlobStore::commit_upload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The upload's bytes became the blob.
    Stored,
    /// The blob was already present; the upload's bytes were not needed.
    AlreadyPresent,
}

/// A log of commits that become durable in order: a durable commit makes every earlier
/// commit of the same log durable. A blob store and a metadata store that name the same
/// log (the fs store: inline blobs and metadata in one redb file) let the registry store
/// bytes it links right away without an fsync of their own: the link's durable commit
/// covers them ([`BlobStore::put_bytes_before_link`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommitLog(u64);

impl CommitLog {
    /// A log no other value names (one per database opened).
    pub fn new() -> CommitLog {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        CommitLog(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl Default for CommitLog {
    fn default() -> Self {
        CommitLog::new()
    }
}

/// Content-addressed bytes, plus the upload sessions that produce them.
///
/// The store never interprets bytes and never checks digests: the
/// [`Registry`](crate::Registry) hashes everything while it streams in and only commits
/// an upload under the digest it computed. Contract (see `docs/design.md`):
/// - a blob, once committed, is immutable and readable until `delete`;
/// - `append_upload` is all-or-nothing: on error the upload keeps its previous length;
/// - `commit_upload` makes the blob readable (atomically: never partially visible) and
///   leaves the upload readable until `delete_upload`, so a commit can be repeated;
/// - every method may be called concurrently, from several processes for shared stores.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of a committed blob, if present.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>>;

    /// Streams a committed blob, or the part of it in `range` (already resolved against
    /// its size by the caller, who learnt it from metadata or `stat`).
    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobRead>>;

    /// Reads like [`read`](Self::read); with `verify` and no `range`, the stream is also
    /// checked against `digest`: if the bytes do not hash to it, the stream ends in an
    /// error instead of completing. The default hashes the chunks as they pass; a store
    /// may instead hash where it reads (off the task that writes to the socket).
    async fn read_verified(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        verify: bool,
    ) -> Result<Option<BlobRead>> {
        let read = self.read(digest, range).await?;
        Ok(read.map(|mut read| {
            if verify && range.is_none() {
                read.stream = crate::registry::verify_stream(read.stream, digest.clone());
            }
            read
        }))
    }

    /// Deletes a committed blob; `false` if it was not there.
    async fn delete(&self, digest: &Digest) -> Result<bool>;

    /// Every committed blob, in no particular order (for orphan detection).
    async fn list(&self) -> Result<BoxStream<'static, Result<Digest>>>;

    /// Creates an empty upload session.
    async fn create_upload(&self, id: &UploadId, repo: &RepoName, now: Timestamp) -> Result<()>;

    /// The state of an upload session.
    async fn upload_info(&self, id: &UploadId) -> Result<Option<UploadInfo>>;

    /// Appends `data` at `offset`, which must equal the current length
    /// ([`Error::UploadOffset`] otherwise). All-or-nothing. Returns the new length.
    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        data: ByteStream,
        now: Timestamp,
    ) -> Result<u64>;

    /// Streams everything uploaded so far (to re-hash a session whose hash state was lost,
    /// for example after a restart).
    async fn read_upload(&self, id: &UploadId) -> Result<ByteStream>;

    /// Makes the upload's bytes readable as blob `digest`. See the trait docs. `len` is
    /// the length the caller hashed: if the session has another length (an append
    /// landed since), nothing is committed and the answer is [`Error::UploadOffset`],
    /// so a blob never holds bytes other than the ones its digest was computed from.
    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<CommitOutcome>;

    /// Discards an upload session; `false` if it did not exist.
    async fn delete_upload(&self, id: &UploadId) -> Result<bool>;

    /// Stores `bytes`, which the caller hashed to `digest`, as committed blob `digest`
    /// in one call: for small content the caller holds whole (manifests). The same
    /// guarantees as [`commit_upload`](Self::commit_upload) (atomic, durable before it
    /// returns, [`CommitOutcome::AlreadyPresent`] if the blob was there), without an
    /// upload session anyone could see or continue. May be repeated with the same bytes
    /// (the re-commit of `docs/design.md` §4.3). The default goes through a temporary
    /// upload session in `repo`, deleted before it returns; a store may do it cheaper.
    async fn put_bytes(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        now: Timestamp,
    ) -> Result<CommitOutcome> {
        let id = UploadId::random();
        self.create_upload(&id, repo, now).await?;
        let len = bytes.len() as u64;
        let data = futures::stream::iter([Ok(bytes)]);
        let result = async {
            self.append_upload(&id, 0, Box::pin(data), now).await?;
            self.commit_upload(&id, digest, len).await
        }
        .await;
        // Committed bytes belong to the blob now; the session is of no further use.
        let deleted = self.delete_upload(&id).await;
        let outcome = result?;
        deleted?;
        Ok(outcome)
    }

    /// The log whose durable commits make [`put_bytes_before_link`] durable, if the
    /// store has one (the default: none). Wrappers of a store forward it, with
    /// `put_bytes_before_link`, or neither.
    ///
    /// [`put_bytes_before_link`]: Self::put_bytes_before_link
    fn commit_log(&self) -> Option<CommitLog> {
        None
    }

    /// [`put_bytes`](Self::put_bytes), except that the bytes need not be durable when it
    /// returns: they are once a later commit of [`commit_log`](Self::commit_log) is
    /// durable. The [`Registry`](crate::Registry) calls it only when its metadata store
    /// names the same log, and then links the bytes in a durable metadata commit, which
    /// comes later in the log; should it not get there (a crash, a refused link), the
    /// bytes were never referenced. The default is `put_bytes`.
    async fn put_bytes_before_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        now: Timestamp,
    ) -> Result<CommitOutcome> {
        self.put_bytes(repo, digest, bytes, now).await
    }

    /// Every open upload session (for expiry).
    async fn list_uploads(&self) -> Result<Vec<UploadInfo>>;

    /// A URL from which committed blob `digest` can be fetched with a plain `GET`, without
    /// further credentials, for `ttl` (a presigned object-store URL), so that its bytes
    /// need not pass through the registry; `None` when the store has no such URLs (the
    /// default: memory, files). The store does not check that the blob exists: the
    /// caller knows it from metadata. Wrappers of a store forward it.
    async fn presigned_get(
        &self,
        digest: &Digest,
        ttl: std::time::Duration,
    ) -> Result<Option<String>> {
        let _ = (digest, ttl);
        Ok(None)
    }
}

/// When the collector may delete a manifest: see [`MetadataStore::collect_manifest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestCollectRule {
    /// Only manifests pushed at or before this time.
    pub cutoff: Timestamp,
    /// Also untagged manifests that are not referrers (the "collect untagged" policy).
    pub untagged: bool,
}

/// Whether a blob record is live or being collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobState {
    /// Readable; may gain links.
    Live,
    /// A collector holds a lease, taken at `since`, to delete the bytes; no link may be
    /// added until the deletion finishes and the record is gone. Only the lease holder
    /// deletes the bytes; a lease older than the deletion lease may be taken over (its
    /// holder is presumed dead).
    Deleting {
        /// When the lease was taken; also the token that finishes the deletion.
        since: Timestamp,
    },
}

impl BlobState {
    /// Whether a deletion is in progress.
    pub fn is_deleting(&self) -> bool {
        matches!(self, BlobState::Deleting { .. })
    }
}

/// Registry-wide facts about one blob's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// Size in bytes.
    pub size: u64,
    /// Number of repository links to these bytes: blob links plus manifest links.
    pub links: u64,
    /// Live or being deleted.
    pub state: BlobState,
    /// When the record was created.
    pub created_at: Timestamp,
}

/// A repository's link to a blob (it was uploaded or mounted there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobLink {
    /// Size of the blob.
    pub size: u64,
    /// Number of manifests in this repository that reference the blob.
    pub manifest_refs: u64,
    /// The link is protected from collection until `protected_at + window`, even with no
    /// manifest referencing it: the time it was last uploaded, mounted or confirmed.
    pub protected_at: Timestamp,
}

/// A manifest as it is linked into one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// Digest of the raw bytes.
    pub digest: Digest,
    /// Media type it was pushed with, served back as `Content-Type`.
    pub media_type: String,
    /// Size of the raw bytes.
    pub size: u64,
    /// Blobs it references (config and layers), each counted once.
    pub blobs: Vec<Digest>,
    /// Child manifests it references (indexes), each counted once.
    pub children: Vec<Digest>,
    /// Its subject, if it is a referrer.
    pub subject: Option<Digest>,
    /// Number of tags pointing at it.
    pub tags: u64,
    /// Number of index manifests in this repository that list it as a child.
    pub parents: u64,
    /// When it was first pushed to this repository.
    pub pushed_at: Timestamp,
    /// Pushed under the sparse-manifest policy with references the repository did not
    /// hold ([`Policy::allows_sparse`]): those that are still missing are counted in
    /// the store's pending references, not in blob links or child records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sparse: bool,
}

/// A repository's record: it exists while it links any blob or manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoRecord {
    /// Number of blob links.
    pub blobs: u64,
    /// Number of manifest links.
    pub manifests: u64,
}

/// Everything needed to link a manifest into a repository.
#[derive(Debug, Clone)]
pub struct NewManifest {
    /// The record to store (counts are ignored and computed by the store).
    pub record: ManifestRecord,
    /// The descriptor to list under its subject in the referrers index.
    pub referrer: Option<Descriptor>,
    /// Tags to point at it in the same atomic change.
    pub tags: Vec<Tag>,
}

/// What [`MetadataStore::put_manifest`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutManifestOutcome {
    /// False when the repository already had this manifest.
    pub created: bool,
    /// Tags that now point at the manifest, with their previous target (if it differed).
    pub moved_tags: Vec<(Tag, Option<Digest>)>,
}

/// What [`MetadataStore::delete_manifest`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedManifest {
    /// The manifest's record as it was.
    pub record: ManifestRecord,
    /// Tags that pointed at it and are gone too.
    pub tags: Vec<Tag>,
}

/// An entry of the referrers index: a manifest whose `subject` is another manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Referrer {
    /// The referring manifest's digest (also in `descriptor`).
    pub digest: Digest,
    /// Its descriptor for the referrers API (artifactType, annotations).
    pub descriptor: Descriptor,
}

/// A tag with the time it started pointing at its manifest (for retention by age).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEntry {
    /// The tag.
    pub tag: Tag,
    /// The manifest it points at.
    pub digest: Digest,
    /// When the tag was last moved to `digest` (for tags written before this was
    /// recorded: when the manifest was pushed to the repository).
    pub tagged_at: Timestamp,
}

/// Counts of everything in a metadata store; all zero when it is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaStats {
    /// Blob records.
    pub blobs: u64,
    /// Blob records in the `Deleting` state.
    pub deleting: u64,
    /// Repository → blob links.
    pub blob_links: u64,
    /// Repository → manifest links.
    pub manifests: u64,
    /// Tags.
    pub tags: u64,
    /// Referrers index entries.
    pub referrers: u64,
    /// Repositories.
    pub repositories: u64,
}

/// What [`MetadataStore::audit`] found (and, when repairing, fixed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Blob records examined.
    pub blobs: u64,
    /// Manifest links examined.
    pub manifests: u64,
    /// Repositories examined.
    pub repositories: u64,
    /// Every difference between the stored counts and indexes and what the links say,
    /// one line each.
    pub problems: Vec<String>,
    /// How many of `problems` were repaired.
    pub repaired: u64,
}

/// Result of [`MetadataStore::link_blob`] and friends when the blob is being collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    /// The link exists now (created, or refreshed if it was there).
    Linked {
        /// Whether it was newly created.
        created: bool,
    },
    /// The blob record is in the `Deleting` state: finish that deletion, then retry.
    BlobDeleting,
}

/// Registry metadata with atomic operations. Each write method is one atomic,
/// serialisable change: it either happens entirely, with every reference count it
/// affects, or not at all. The contract, and why redb transactions and conditional
/// object writes can each provide it, is in `docs/design.md`.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// The log this store's durable commits go to, if a blob store may share it (see
    /// [`BlobStore::commit_log`]; the default: none). Wrappers forward it.
    fn commit_log(&self) -> Option<CommitLog> {
        None
    }
    /// A blob's registry-wide record.
    async fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>>;
    /// A repository's link to a blob.
    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobLink>>;
    /// Repositories linking a blob, sorted, after `after`, at most `limit`.
    async fn blob_repositories(
        &self,
        digest: &Digest,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>>;
    /// A manifest linked into a repository.
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>>;
    /// The manifest a tag points at.
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>>;
    /// The record of the manifest a tag points at: [`tag`](Self::tag) then
    /// [`manifest`](Self::manifest). Stores that can read both at once override it (one
    /// read transaction instead of two: a GET by tag is the registry's most common
    /// request).
    async fn tagged_manifest(&self, repo: &RepoName, tag: &Tag) -> Result<Option<ManifestRecord>> {
        match self.tag(repo, tag).await? {
            Some(digest) => self.manifest(repo, &digest).await,
            None => Ok(None),
        }
    }
    /// A repository's record; `None` if it does not exist.
    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoRecord>>;
    /// Tags of a repository in lexical order, strictly after `after`, at most `limit`.
    async fn list_tags(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<(Tag, Digest)>>;
    /// The tags [`list_tags`](Self::list_tags) would return, without their manifests
    /// (the tag list of the distribution API needs only the names).
    async fn list_tag_names(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<Tag>> {
        Ok(self
            .list_tags(repo, after, limit)
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .collect())
    }
    /// Tags of a repository with their tagging times, in lexical order, strictly after
    /// `after`, at most `limit`.
    async fn list_tag_entries(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<TagEntry>>;
    /// Bytes counted against the quota of `prefix`: the distinct blobs and manifests
    /// linked under it. `None` when no quota on `prefix` has been enforced yet (the count
    /// starts, from a scan, with the first link under a quota).
    async fn quota_usage(&self, prefix: &RepoName) -> Result<Option<u64>>;
    /// Manifests of a repository in digest order, strictly after `after`, at most `limit`.
    async fn list_manifests(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<ManifestRecord>>;
    /// Blob links of a repository in digest order, strictly after `after`, at most
    /// `limit` (for repository listings and deletion).
    ///
    /// The default derives them from what every store has (links referenced by the
    /// repository's manifests, C2 of `docs/design.md`, plus the unreferenced ones), at
    /// the cost of reading all the repository's manifests and all link candidates for
    /// each page; a store that can scan its links by repository overrides it
    /// ([`KvMetadata`](crate::kv::KvMetadata) does).
    async fn list_blob_links(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobLink)>> {
        const PAGE: usize = 1000;
        // Keyed by the digest's text: the order every listing uses (key bytes).
        let mut digests = std::collections::BTreeMap::new();
        let mut manifests_after: Option<Digest> = None;
        loop {
            let page = self
                .list_manifests(repo, manifests_after.as_ref(), PAGE)
                .await?;
            for m in &page {
                digests.extend(m.blobs.iter().map(|d| (d.to_string(), d.clone())));
            }
            match page.last() {
                Some(last) if page.len() == PAGE => manifests_after = Some(last.digest.clone()),
                _ => break,
            }
        }
        let mut candidates_after: Option<(RepoName, Digest)> = None;
        'scan: loop {
            let page = self
                .unreferenced_blob_links(candidates_after.as_ref().map(|(r, d)| (r, d)), PAGE)
                .await?;
            for (r, d, _) in &page {
                // Candidates are in (repository, digest) order: past ours, done.
                match r.as_str().cmp(repo.as_str()) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => {
                        digests.insert(d.to_string(), d.clone());
                    }
                    std::cmp::Ordering::Greater => break 'scan,
                }
            }
            match page.last() {
                Some((r, d, _)) if page.len() == PAGE => {
                    candidates_after = Some((r.clone(), d.clone()))
                }
                _ => break,
            }
        }
        let mut out = Vec::new();
        for (_, d) in digests
            .into_iter()
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a.as_str()))
        {
            if out.len() == limit {
                break;
            }
            if let Some(link) = self.blob_link(repo, &d).await? {
                out.push((d, link));
            }
        }
        Ok(out)
    }
    /// Repositories in lexical order, strictly after `after`, at most `limit`.
    async fn list_repositories(
        &self,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>>;
    /// Manifests in `repo` whose subject is `subject`, in digest order.
    async fn list_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<Referrer>>;
    /// Blob links with no manifest referencing them (collection candidates, protection
    /// not considered), in (repository, digest) order after `after`.
    async fn unreferenced_blob_links(
        &self,
        after: Option<(&RepoName, &Digest)>,
        limit: usize,
    ) -> Result<Vec<(RepoName, Digest, BlobLink)>>;
    /// Blob records with no links (collection candidates), in digest order after `after`.
    async fn unlinked_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobRecord)>>;
    /// Counts of everything stored.
    async fn stats(&self) -> Result<MetaStats>;
    /// Mark and sweep: recomputes every count, reverse index and candidate entry from
    /// the links themselves (C1–C6 of `docs/design.md`) and reports each difference.
    /// With `repair`, fixes what can be derived from the links (counts, indexes, tags
    /// to missing manifests); a manifest whose referenced blob link is missing breaks
    /// invariant 2 and is reported, never silently changed.
    async fn audit(&self, repair: bool) -> Result<AuditReport>;

    /// Links blob `digest` (whose bytes are committed) into `repo`, creating its blob
    /// record if needed and setting the link's `protected_at` to `now`. A new link is
    /// counted against every quota covering `repo`, in the same atomic change; past one
    /// of `policy`'s quotas the change fails with [`Error::QuotaExceeded`].
    async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<LinkOutcome>;
    /// Links a blob into `to` if `from` links it (a mount). `Ok(None)` if `from` does not.
    /// Quotas as for [`link_blob`](Self::link_blob).
    async fn mount_blob(
        &self,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<LinkOutcome>>;
    /// Sets an existing link's `protected_at` to `now`; `false` if there is no link.
    async fn touch_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        now: Timestamp,
    ) -> Result<bool>;
    /// Removes a repository's link to a blob (manifests referencing it keep their counts;
    /// the link is simply no longer readable). `false` if there was none.
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool>;

    /// Links a manifest (whose bytes are committed as blob `record.digest`) into `repo`
    /// and points `tags` at it, in one atomic change. Fails with
    /// [`Error::ManifestBlobUnknown`] if any referenced blob is not linked in `repo`, or
    /// any child manifest is not in `repo`, at the moment of the change. Returns `None`
    /// when the manifest's own bytes are being collected (blob record `Deleting`): the
    /// caller finishes that deletion, commits the bytes again and retries.
    /// [`Error::ImmutableTag`] if a tag is immutable under `policy` and points at another
    /// manifest; [`Error::QuotaExceeded`] if the new manifest link passes a quota.
    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<PutManifestOutcome>>;
    /// Points `tag` at manifest `digest`, which must be in `repo`, recording `now` as its
    /// tagging time if it moves. Returns the previous
    /// target; [`Error::ManifestUnknown`] if the manifest is not there,
    /// [`Error::ImmutableTag`] if the tag is immutable and points elsewhere.
    async fn set_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<Digest>>;
    /// Removes a tag; returns what it pointed at. [`Error::ImmutableTag`] if it is
    /// immutable under `policy`.
    async fn delete_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        policy: &Policy,
    ) -> Result<Option<Digest>>;
    /// Removes a tag only if it still points at `digest` and was tagged at `tagged_at`
    /// (as [`list_tag_entries`](Self::list_tag_entries) reported it), so a decision made
    /// on a listing never removes a tag moved since. Whether it was removed;
    /// [`Error::ImmutableTag`] if it is immutable under `policy`.
    async fn delete_tag_if(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        tagged_at: Timestamp,
        policy: &Policy,
    ) -> Result<bool>;
    /// Unlinks a manifest from `repo` with every tag pointing at it, releasing the counts
    /// it held on blobs and children and removing it from the referrers index.
    /// [`Error::ImmutableTag`] if one of those tags is immutable under `policy`.
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        policy: &Policy,
    ) -> Result<Option<DeletedManifest>>;

    /// Deletes a manifest (as [`delete_manifest`](Self::delete_manifest)) if, at the
    /// moment of the change, it has no tags, no parent index, was pushed at or before
    /// `rule.cutoff`, and either it is a referrer whose subject is not in the repository,
    /// or it is not a referrer and `rule.untagged` is set.
    async fn collect_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        rule: ManifestCollectRule,
    ) -> Result<Option<DeletedManifest>>;

    /// Removes a blob link if, at the moment of the change, no manifest references it and
    /// `protected_at <= cutoff`. Returns whether it was removed.
    async fn collect_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        cutoff: Timestamp,
    ) -> Result<bool>;
    /// Takes the lease to delete a blob's bytes: moves a record with no links to
    /// `Deleting { since: now }`; takes over a `Deleting` lease older than `lease`; when
    /// there is no record at all (orphan bytes), creates one in `Deleting` (size 0).
    /// Returns the record (with the new lease) if the caller may now delete the bytes;
    /// `None` if it has links or another collector holds a fresh lease.
    async fn begin_blob_deletion(
        &self,
        digest: &Digest,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<BlobRecord>>;
    /// Removes a `Deleting { since }` record once its bytes are gone; `false` if the
    /// record is not in that state with that `since` (the lease was taken over).
    async fn finish_blob_deletion(&self, digest: &Digest, since: Timestamp) -> Result<bool>;

    // The outbox: every write method above that changes content appends its events in
    // the same atomic change (`docs/design.md`, "Notifications: the outbox").

    /// Outbox entries numbered after `after`, in order, at most `limit`. Numbers may be
    /// missing: trimmed (at or below `trimmed_through`), never used (a transaction that
    /// rolled back), or, on engines that report a `horizon`, not visible yet.
    async fn events_after(&self, after: u64, limit: usize) -> Result<OutboxRead>;
    /// Whether numbers missing below what a read with this `horizon` returned are gone
    /// for good (every transaction that could still make one visible has ended).
    async fn outbox_settled(&self, horizon: u64) -> Result<bool>;
    /// The highest outbox number handed out so far (0: none).
    async fn events_head(&self) -> Result<u64>;
    /// Takes or renews `owner`'s lease on consumer `name`, creating the consumer at the
    /// current head if it is new. Its cursor if `owner` holds the lease now; `None` if
    /// another owner holds an unexpired one.
    async fn claim_consumer(
        &self,
        name: &str,
        owner: &str,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<u64>>;
    /// Raises consumer `name`'s cursor to `cursor` and renews the lease, if `owner`
    /// still holds it; `false` if not (another owner took it over).
    async fn ack_consumer(
        &self,
        name: &str,
        owner: &str,
        cursor: u64,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<bool>;
    /// Every durable consumer, by name.
    async fn consumers(&self) -> Result<Vec<(String, ConsumerRecord)>>;
    /// Removes outbox entries that every consumer heard from in the last week has
    /// acknowledged and that are older than `retention` or beyond the newest
    /// `max_events`, oldest first; at most one batch (call again while it returns more
    /// than zero). Returns how many it removed.
    async fn trim_events(
        &self,
        now: Timestamp,
        retention: std::time::Duration,
        max_events: u64,
    ) -> Result<u64>;
}

/// A blob store and a metadata store that belong together.
#[derive(Clone)]
pub struct Storage {
    /// The bytes.
    pub blobs: Arc<dyn BlobStore>,
    /// The metadata.
    pub metadata: Arc<dyn MetadataStore>,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage").finish_non_exhaustive()
    }
}

/// Deletes a blob's bytes: the one way bytes are ever deleted (the collector, the orphan
/// scan, the clean-up after a refused push, an adapter's repair all come here).
///
/// Only the holder of the deletion lease deletes, between taking it
/// ([`MetadataStore::begin_blob_deletion`], which refuses while the blob has any link)
/// and removing the record ([`MetadataStore::finish_blob_deletion`]). While the lease
/// exists nobody can link the digest (linking reports `BlobDeleting` and waits), so bytes
/// that a link pins are never deleted, and a committer racing the deletion commits its
/// bytes again after it (`docs/design.md` §4.3). A check of "no record" followed by a
/// delete, in two steps, is not safe: a link can land between them.
///
/// Returns the size on record if this call deleted the bytes; `None` if the blob has
/// links or another deleter holds a fresh lease.
pub async fn delete_unlinked_bytes(
    blobs: &dyn BlobStore,
    metadata: &dyn MetadataStore,
    digest: &Digest,
    now: Timestamp,
    lease: std::time::Duration,
) -> Result<Option<u64>> {
    let Some(rec) = metadata.begin_blob_deletion(digest, now, lease).await? else {
        return Ok(None);
    };
    let BlobState::Deleting { since } = rec.state else {
        return Err(Error::storage("begin_blob_deletion returned a live record"));
    };
    blobs.delete(digest).await?;
    metadata.finish_blob_deletion(digest, since).await?;
    Ok(Some(rec.size))
}

/// For an adapter's `check --repair`: repairs a blob record whose bytes are gone.
/// Removes the repository links to it that no manifest references (HEAD then answers
/// 404 and clients push it again), then, if no link is left, the record itself through
/// [`delete_unlinked_bytes`]. Returns why it could not, if it could not.
pub async fn repair_record_without_bytes(
    blobs: &dyn BlobStore,
    metadata: &dyn MetadataStore,
    digest: &Digest,
    now: Timestamp,
    lease: std::time::Duration,
) -> Result<Option<String>> {
    const PAGE: usize = 1000;
    let mut after = None;
    loop {
        let repos = metadata
            .blob_repositories(digest, after.as_ref(), PAGE)
            .await?;
        for repo in &repos {
            let unreferenced = metadata
                .blob_link(repo, digest)
                .await?
                .is_some_and(|l| l.manifest_refs == 0);
            if unreferenced {
                match metadata.unlink_blob(repo, digest).await {
                    Ok(_) | Err(Error::InUse { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        match repos.last() {
            Some(last) if repos.len() == PAGE => after = Some(last.clone()),
            _ => break,
        }
    }
    match metadata.blob(digest).await? {
        None => Ok(None),
        Some(rec) if rec.links == 0 => {
            let deleted = delete_unlinked_bytes(blobs, metadata, digest, now, lease).await?;
            Ok(deleted
                .is_none()
                .then(|| "a collection holds its deletion lease".into()))
        }
        Some(rec) => Ok(Some(format!(
            "{} manifest link(s) or referenced repository link(s) remain; pushing the blob \
             or manifest again restores its bytes",
            rec.links
        ))),
    }
}

/// For an adapter's `check --verify-digests`: whether the stored bytes of `digest` read
/// whole and hash to it (`false` if they are missing or unreadable).
pub async fn stored_bytes_match(blobs: &dyn BlobStore, digest: &Digest) -> Result<bool> {
    use futures::StreamExt;
    let Some(read) = blobs.read(digest, None).await? else {
        return Ok(false);
    };
    let mut hasher = crate::digest::Hasher::new(digest.algorithm());
    let mut stream = read.stream;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => hasher.update(&c),
            Err(_) => return Ok(false),
        }
    }
    Ok(hasher.finish() == *digest)
}

/// Turns anything displayable into a storage error (for adapters).
pub fn storage_error(e: impl fmt::Display) -> Error {
    Error::storage(e.to_string())
}
