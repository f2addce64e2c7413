//! [`MetadataStore`] over any transactional ordered key-value engine.
//!
//! The registry's metadata rules (links, tags, reference counts, the referrers index,
//! collection candidates) are written once here, against [`KvRead`] / [`KvWrite`]. An
//! engine only has to run a closure inside one serialisable transaction: the in-memory
//! store does it under a lock, the fs store inside a redb write transaction. Every
//! [`MetadataStore`] write method is exactly one such transaction.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::events::{ConsumerRecord, Event, OutboxRead};
use crate::names::{RepoName, Tag};
use crate::policy::Policy;
use crate::store::{
    AuditReport, BlobLink, BlobRecord, BlobState, CommitLog, DeletedManifest, LinkOutcome,
    ManifestCollectRule, ManifestRecord, MetaStats, MetadataStore, NewManifest, PutManifestOutcome,
    Referrer, RepoRecord, TagEntry,
};
use crate::time::Timestamp;

// The mark-and-sweep audit (`MetadataStore::audit`) and the quota accounting done
// inside the link transactions: private parts of this module, in kv/.
mod audit;
mod event_codec;

/// The stored record of an event made at `at` (what the outbox keeps): the canonical
/// bytes of an event, which [`StoredEvent::id`](crate::StoredEvent::id) hashes.
pub(crate) fn event_record(at: crate::Timestamp, event: &crate::Event) -> Vec<u8> {
    event_codec::encode_entry(at, event)
}
pub mod outbox;
mod quota;

use outbox::record_event;
use quota::{quota_add, quota_release};

/// The tables of the metadata schema. Keys join their parts with a NUL byte, which no
/// repository name, tag or digest can contain, so prefixes never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// digest → [`BlobRecord`]
    Blobs,
    /// repo, digest → [`BlobLink`]
    BlobLinks,
    /// digest, repo → () (which repositories link a blob)
    BlobRepos,
    /// repo, digest → [`ManifestRecord`]
    Manifests,
    /// repo, tag → digest
    Tags,
    /// repo, digest, tag → () (which tags point at a manifest)
    ManifestTags,
    /// repo, subject, digest → [`Referrer`]
    Referrers,
    /// repo → [`RepoRecord`]
    Repos,
    /// repo, digest → () (blob links no manifest references)
    LinkCandidates,
    /// digest → () (blob records with no links)
    BlobCandidates,
    /// quota prefix → bytes counted (u64): the prefixes whose usage is maintained
    QuotaUsage,
    /// quota prefix, digest → links under the prefix and size (one digest counts once)
    QuotaRefs,
    /// repo, digest → [`PendingRefs`]: references of sparse manifests to what the
    /// repository does not hold yet
    PendingRefs,
    /// sequence number (8 bytes, big-endian) → an event (the outbox; kv/outbox.rs)
    Outbox,
    /// `next` → the next sequence number (counting engines), `trimmed` → every number at
    /// or below it was trimmed
    OutboxState,
    /// consumer name → [`ConsumerRecord`]
    OutboxConsumers,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 16] = [
        Table::Blobs,
        Table::BlobLinks,
        Table::BlobRepos,
        Table::Manifests,
        Table::Tags,
        Table::ManifestTags,
        Table::Referrers,
        Table::Repos,
        Table::LinkCandidates,
        Table::BlobCandidates,
        Table::QuotaUsage,
        Table::QuotaRefs,
        Table::PendingRefs,
        Table::Outbox,
        Table::OutboxState,
        Table::OutboxConsumers,
    ];

    /// A stable name, for engines that name their tables.
    pub const fn name(self) -> &'static str {
        match self {
            Table::Blobs => "blobs",
            Table::BlobLinks => "blob_links",
            Table::BlobRepos => "blob_repos",
            Table::Manifests => "manifests",
            Table::Tags => "tags",
            Table::ManifestTags => "manifest_tags",
            Table::Referrers => "referrers",
            Table::Repos => "repos",
            Table::LinkCandidates => "link_candidates",
            Table::BlobCandidates => "blob_candidates",
            Table::QuotaUsage => "quota_usage",
            Table::QuotaRefs => "quota_refs",
            Table::PendingRefs => "pending_refs",
            Table::Outbox => "outbox",
            Table::OutboxState => "outbox_state",
            Table::OutboxConsumers => "outbox_consumers",
        }
    }

    /// Position in [`Table::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// What a write transaction changed: per table, the groups of the keys it wrote. A
/// key's group is its bytes before the first 0 byte (all of it if there is none):
/// [`KvMetadata`]'s keys start with a repository's name and a 0 byte, so a group holds one
/// repository's entries of a table. Groups are hashed onto [`KEY_GROUPS`] counters per
/// table, so groups that hash alike share one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSet([u64; Table::ALL.len()]);

/// Counters per table in [`TableVersions`]: a change to one repository's tags retires a
/// kept listing of another one only if their names hash alike (1 in 64).
pub const KEY_GROUPS: usize = 64;

/// The counter of `key`'s group: FNV-1a over the bytes before the first 0 byte. Fixed,
/// not seeded: a collision only costs a listing read again.
fn key_group(key: &[u8]) -> usize {
    let group = key.split(|b| *b == 0).next().unwrap_or_default();
    let hash = group.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % KEY_GROUPS as u64) as usize
}

impl TableSet {
    /// Adds `key` of `table`.
    pub fn insert_key(&mut self, table: Table, key: &[u8]) {
        self.0[table.index()] |= 1 << key_group(key);
    }

    /// Adds every key of `table`: for a change whose keys are not known one by one.
    pub fn insert(&mut self, table: Table) {
        self.0[table.index()] = u64::MAX;
    }

    /// Whether some key of `table` is in the set.
    pub fn contains(self, table: Table) -> bool {
        self.0[table.index()] != 0
    }
}

/// Counters of the committed write transactions that changed a table, one per group of
/// keys ([`TableSet`]): what an engine that sees every write to its data keeps for
/// [`KvEngine::key_version`].
#[derive(Debug)]
pub struct TableVersions(Box<[[AtomicU64; KEY_GROUPS]; Table::ALL.len()]>);

impl Default for TableVersions {
    fn default() -> Self {
        TableVersions(Box::new(std::array::from_fn(|_| {
            std::array::from_fn(|_| AtomicU64::new(0))
        })))
    }
}

impl TableVersions {
    /// The counter of `key`'s group in `table`.
    pub fn get(&self, table: Table, key: &[u8]) -> u64 {
        self.0[table.index()][key_group(key)].load(Ordering::SeqCst)
    }

    /// Counts a committed change. Call it once the change is visible to new snapshots
    /// and before the write returns: a reader that reads the old counter may then have
    /// seen the old data, never the other way round.
    pub fn bump(&self, changed: TableSet) {
        for (counters, mut groups) in self.0.iter().zip(changed.0) {
            while groups != 0 {
                counters[groups.trailing_zeros() as usize].fetch_add(1, Ordering::SeqCst);
                groups &= groups - 1;
            }
        }
    }
}

/// A key-value pair returned by a scan.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// Reads inside a transaction.
pub trait KvRead {
    /// The value under `key`.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Entries whose key starts with `prefix` and sorts strictly after `after` (when
    /// given), in ascending key order, at most `limit`.
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>>;
    /// Calls `each` with the keys [`scan`](Self::scan) would return, in order, without
    /// their values and without collecting them: listings that need only the names
    /// build their items straight from the engine's pages (one allocation per item,
    /// not two). Stops at the first error `each` returns.
    fn for_each_key(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        each: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        for (k, _) in self.scan(table, prefix, after, limit)? {
            each(&k)?;
        }
        Ok(())
    }
    /// Number of entries in a table.
    fn count(&self, table: Table) -> Result<u64>;

    /// The highest outbox sequence number handed out so far (0: none). Engines that
    /// override [`KvWrite::append_event`] override this too.
    fn outbox_head(&self) -> Result<u64> {
        outbox::head_counted(self)
    }

    /// For engines whose outbox numbers can become visible out of order: a token of
    /// this snapshot for [`KvEngine::outbox_settled`]. `None` (the default): numbers
    /// are visible in order, a missing one is never coming.
    fn outbox_horizon(&self) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// Reads and writes inside a transaction.
pub trait KvWrite: KvRead {
    /// Stores `value` under `key`.
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()>;
    /// Removes `key`; whether it was there.
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<bool>;

    /// Appends `value` to [`Table::Outbox`] under the next sequence number. The default
    /// keeps a counter in [`Table::OutboxState`], which is right for engines that run
    /// one write transaction at a time; an engine with concurrent writers overrides it
    /// (one counter row would make every pair of writes conflict).
    fn append_event(&mut self, value: &[u8]) -> Result<()> {
        outbox::append_counted(self, value)
    }
}

/// The entries of an ordered map that [`KvRead::scan`] selects: keys starting with
/// `prefix` and sorting strictly after `after`, in ascending order. For engines that
/// keep their tables (or a transaction's own writes) in `BTreeMap`s.
pub fn scan_range<'a, V>(
    map: &'a std::collections::BTreeMap<Vec<u8>, V>,
    prefix: &'a [u8],
    after: Option<&[u8]>,
) -> impl Iterator<Item = (&'a Vec<u8>, &'a V)> + 'a {
    use std::ops::Bound;
    let lower = match after {
        Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
        _ => Bound::Included(prefix.to_vec()),
    };
    map.range((lower, Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

/// A transactional ordered key-value engine.
pub trait KvEngine: Send + Sync + 'static {
    /// Runs `f` on a consistent snapshot.
    fn read<R, F>(&self, f: F) -> impl Future<Output = Result<R>> + Send
    where
        F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
        R: Send + 'static;

    /// Runs `f`, a lookup of a few keys, on a consistent snapshot: what
    /// [`read`](Self::read) does. An engine whose lookups cost less than a hop to another
    /// thread may override it to run them in place (redb: a B-tree path of a few pages,
    /// cached); scans and everything else go through `read`.
    fn lookup<R, F>(&self, f: F) -> impl Future<Output = Result<R>> + Send
    where
        F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.read(f)
    }

    /// Runs `f` in one serialisable write transaction, committed (durably, if the engine
    /// is durable) when `f` returns `Ok` and rolled back when it returns `Err`.
    ///
    /// `f` is `Fn`: an optimistic engine (one whose commit can lose a race with another
    /// process) discards the transaction and runs `f` again on the newer state.
    fn write<R, F>(&self, f: F) -> impl Future<Output = Result<R>> + Send
    where
        F: Fn(&mut dyn KvWrite) -> Result<R> + Send + Sync + 'static,
        R: Send + 'static;

    /// Whether every write transaction that could still make an outbox number at or
    /// below the snapshot `horizon` visible (a token from [`KvRead::outbox_horizon`])
    /// has finished. Engines that number in order never return a horizon; the default
    /// answers yes.
    fn outbox_settled(&self, horizon: u64) -> impl Future<Output = Result<bool>> + Send {
        let _ = horizon;
        async { Ok(true) }
    }

    /// A counter of the committed write transactions that changed a key of `table` in
    /// `key`'s group (its bytes before the first 0 byte, see [`TableSet`]), for caches
    /// of what was read from that group: it moves on after a write's change becomes
    /// visible and before that write returns, so something read after the counter was
    /// read is current while the counter has not moved. It may also move for other
    /// groups, never stay for this one. Only an engine that sees every write to its data
    /// can keep one: all writers in this process, going through this value or its
    /// clones (the in-memory engine; a redb file, which one process holds locked).
    /// `None`, the default: another process may write, and nothing read may be reused.
    fn key_version(&self, table: Table, key: &[u8]) -> Option<u64> {
        let _ = (table, key);
        None
    }

    /// The log of this engine's commits, if a blob store shares it
    /// ([`MetadataStore::commit_log`]). Default: none.
    fn commit_log(&self) -> Option<CommitLog> {
        None
    }
}

/// A [`MetadataStore`] implemented over a [`KvEngine`].
///
/// Over an engine that keeps [`KvEngine::key_version`], complete tag listings are
/// kept in memory and reused while no tag of their repository changed (tag lists are
/// what CI tools and image updaters poll).
#[derive(Debug)]
pub struct KvMetadata<E> {
    engine: Arc<E>,
    tag_lists: Arc<TagListCache>,
}

impl<E> Clone for KvMetadata<E> {
    fn clone(&self) -> Self {
        KvMetadata {
            engine: self.engine.clone(),
            tag_lists: self.tag_lists.clone(),
        }
    }
}

impl<E: KvEngine> KvMetadata<E> {
    /// Wraps an engine.
    pub fn new(engine: E) -> Self {
        KvMetadata {
            engine: Arc::new(engine),
            tag_lists: Arc::default(),
        }
    }

    /// The engine. Writes made through it directly are seen by the tag-list cache as
    /// long as the engine counts them in [`KvEngine::key_version`].
    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Tag listings answered from memory, without reading the engine.
    pub fn tag_listings_reused(&self) -> u64 {
        self.tag_lists.reused.load(Ordering::Relaxed)
    }

    /// The engine's version of `repo`'s tags: its keys in [`Table::Tags`] are the
    /// repository's name, a 0 byte and the tag, so the name is their group.
    fn tags_version(&self, repo: &RepoName) -> Option<u64> {
        self.engine
            .key_version(Table::Tags, repo.as_str().as_bytes())
    }
}

/// Complete tag listings by repository, each with the version of the repository's
/// [`Table::Tags`] entries read before its snapshot: valid while that version has not
/// moved. At most [`TagListCache::MAX_TAGS`] tags in all.
#[derive(Debug, Default)]
struct TagListCache {
    lists: Mutex<CachedLists>,
    reused: AtomicU64,
}

#[derive(Debug, Default)]
struct CachedLists {
    by_repo: HashMap<RepoName, (u64, Arc<[Tag]>)>,
    tags: usize,
}

impl TagListCache {
    /// About 1.5 MiB of short tags.
    const MAX_TAGS: usize = 1 << 16;

    fn lock(&self) -> std::sync::MutexGuard<'_, CachedLists> {
        // A map of immutable values, consistent after any panic.
        self.lists.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tags of `repo` after `after`, at most `limit`, if its listing read at
    /// `version` is held.
    fn page(
        &self,
        repo: &RepoName,
        version: u64,
        after: Option<&Tag>,
        limit: usize,
    ) -> Option<Vec<Tag>> {
        let list = match self.lock().by_repo.get(repo) {
            Some((v, list)) if *v == version => list.clone(),
            _ => return None,
        };
        self.reused.fetch_add(1, Ordering::Relaxed);
        // The listing is in key order, which for one repository is the tags' byte order.
        let start = after.map_or(0, |a| {
            list.partition_point(|t| t.as_bytes() <= a.as_bytes())
        });
        Some(list[start..].iter().take(limit).cloned().collect())
    }

    /// Keeps `tags`, the complete listing of `repo` read after `version` was read;
    /// `current` gives a repository's version now.
    fn keep(
        &self,
        repo: &RepoName,
        version: u64,
        tags: &[Tag],
        current: impl Fn(&RepoName) -> Option<u64>,
    ) {
        if tags.len() > Self::MAX_TAGS / 4 {
            return;
        }
        let mut lists = self.lock();
        if lists.by_repo.get(repo).is_some_and(|(v, _)| *v > version) {
            // The one kept was read at a later version: fresher.
            return;
        }
        if let Some((_, old)) = lists.by_repo.remove(repo) {
            lists.tags -= old.len();
        }
        if lists.tags + tags.len() > Self::MAX_TAGS {
            // Listings whose version moved are dead; if that is not enough, start
            // again.
            lists.by_repo.retain(|r, (v, _)| current(r) == Some(*v));
            lists.tags = lists.by_repo.values().map(|(_, l)| l.len()).sum();
            if lists.tags + tags.len() > Self::MAX_TAGS {
                lists.by_repo.clear();
                lists.tags = 0;
            }
        }
        lists.tags += tags.len();
        lists.by_repo.insert(repo.clone(), (version, tags.into()));
    }
}

fn key(parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(Error::storage)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::storage(format!("corrupt metadata record: {e}")))
}

fn get<T: DeserializeOwned>(t: &dyn KvRead, table: Table, k: &[u8]) -> Result<Option<T>> {
    t.get(table, k)?.map(|v| decode(&v)).transpose()
}

fn put<T: Serialize>(t: &mut dyn KvWrite, table: Table, k: &[u8], v: &T) -> Result<()> {
    t.put(table, k, &encode(v)?)
}

/// The last NUL-separated part of a key, as text.
fn last_part(k: &[u8]) -> Result<&str> {
    let start = k.iter().rposition(|&b| b == 0).map_or(0, |i| i + 1);
    std::str::from_utf8(&k[start..]).map_err(Error::storage)
}

fn parts(k: &[u8]) -> Result<Vec<&str>> {
    k.split(|&b| b == 0)
        .map(|p| std::str::from_utf8(p).map_err(Error::storage))
        .collect()
}

fn parse_stored<T>(r: std::result::Result<T, crate::error::InvalidInput>) -> Result<T> {
    r.map_err(|e| Error::storage(format!("corrupt metadata key: {e}")))
}

/// Adds one link to a blob record, creating it if needed. `None` if it is being deleted.
fn add_blob_link(t: &mut dyn KvWrite, d: &Digest, size: u64, now: Timestamp) -> Result<Option<()>> {
    let k = key(&[d.as_str()]);
    let mut rec: BlobRecord = match get::<BlobRecord>(t, Table::Blobs, &k)? {
        Some(rec) if rec.state.is_deleting() => return Ok(None),
        Some(rec) => rec,
        None => BlobRecord {
            size,
            links: 0,
            state: BlobState::Live,
            created_at: now,
        },
    };
    if rec.links == 0 {
        t.delete(Table::BlobCandidates, &k)?;
    }
    rec.links += 1;
    put(t, Table::Blobs, &k, &rec)?;
    Ok(Some(()))
}

/// Removes one link from a blob record; at zero links it becomes a collection candidate.
fn release_blob_link(t: &mut dyn KvWrite, d: &Digest) -> Result<()> {
    let k = key(&[d.as_str()]);
    let Some(mut rec) = get::<BlobRecord>(t, Table::Blobs, &k)? else {
        return Err(Error::storage(format!(
            "blob record {d} missing while releasing a link"
        )));
    };
    rec.links = rec.links.saturating_sub(1);
    if rec.links == 0 {
        t.put(Table::BlobCandidates, &k, b"")?;
    }
    put(t, Table::Blobs, &k, &rec)
}

fn adjust_repo(t: &mut dyn KvWrite, repo: &RepoName, blobs: i64, manifests: i64) -> Result<()> {
    let k = key(&[repo.as_str()]);
    let existing: Option<RepoRecord> = get(t, Table::Repos, &k)?;
    let existed = existing.is_some();
    let mut rec = existing.unwrap_or_default();
    rec.blobs = rec.blobs.saturating_add_signed(blobs);
    rec.manifests = rec.manifests.saturating_add_signed(manifests);
    if rec.blobs == 0 && rec.manifests == 0 {
        if t.delete(Table::Repos, &k)? {
            record_event(t, Event::RepositoryDeleted { repo: repo.clone() })?;
        }
        Ok(())
    } else {
        if !existed {
            record_event(t, Event::RepositoryCreated { repo: repo.clone() })?;
        }
        put(t, Table::Repos, &k, &rec)
    }
}

/// How many sparse manifests of a repository reference a digest it does not hold, as a
/// blob and as a child manifest. They become the blob link's `manifest_refs` or the
/// child record's `parents` when it arrives (`docs/design.md` §10, "Sparse manifests").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingRefs {
    /// References from `blobs` (config, layers).
    pub blobs: u64,
    /// References from `children` (index entries).
    pub children: u64,
}

/// Adds `delta` blob or child references to what `repo` is waiting for under `d`.
fn adjust_pending(
    t: &mut dyn KvWrite,
    repo: &RepoName,
    d: &Digest,
    child: bool,
    delta: i64,
) -> Result<()> {
    let k = key(&[repo.as_str(), d.as_str()]);
    let mut p: PendingRefs = get(t, Table::PendingRefs, &k)?.unwrap_or_default();
    let n = if child { &mut p.children } else { &mut p.blobs };
    *n = n.saturating_add_signed(delta);
    if p == PendingRefs::default() {
        t.delete(Table::PendingRefs, &k)?;
        Ok(())
    } else {
        put(t, Table::PendingRefs, &k, &p)
    }
}

/// Takes the blob (or child) references pending under `d` in `repo`: the one who makes
/// `d` present counts them from now on.
fn take_pending(t: &mut dyn KvWrite, repo: &RepoName, d: &Digest, child: bool) -> Result<u64> {
    let k = key(&[repo.as_str(), d.as_str()]);
    let Some(p) = get::<PendingRefs>(t, Table::PendingRefs, &k)? else {
        return Ok(0);
    };
    let n = if child { p.children } else { p.blobs };
    if n > 0 {
        adjust_pending(t, repo, d, child, -(n as i64))?;
    }
    Ok(n)
}

/// Links `d` into `repo`; `from` is the repository it is mounted from, for the event.
fn link_blob_txn(
    t: &mut dyn KvWrite,
    repo: &RepoName,
    d: &Digest,
    size: u64,
    now: Timestamp,
    policy: &Policy,
    from: Option<&RepoName>,
) -> Result<LinkOutcome> {
    let lk = key(&[repo.as_str(), d.as_str()]);
    if let Some(mut link) = get::<BlobLink>(t, Table::BlobLinks, &lk)? {
        // Refreshing protection must not revive a record the collector is deleting: the
        // link keeps it live, so that cannot happen; check anyway for a clear error.
        link.protected_at = link.protected_at.max(now);
        put(t, Table::BlobLinks, &lk, &link)?;
        return Ok(LinkOutcome::Linked { created: false });
    }
    if add_blob_link(t, d, size, now)?.is_none() {
        return Ok(LinkOutcome::BlobDeleting);
    }
    // Sparse manifests that reference the blob count from now on.
    let manifest_refs = take_pending(t, repo, d, false)?;
    let link = BlobLink {
        size,
        manifest_refs,
        protected_at: now,
    };
    put(t, Table::BlobLinks, &lk, &link)?;
    if manifest_refs == 0 {
        t.put(Table::LinkCandidates, &lk, b"")?;
    }
    t.put(Table::BlobRepos, &key(&[d.as_str(), repo.as_str()]), b"")?;
    adjust_repo(t, repo, 1, 0)?;
    quota_add(t, repo, d, size, policy, true)?;
    record_event(
        t,
        match from {
            Some(from) => Event::BlobMounted {
                repo: repo.clone(),
                from: from.clone(),
                digest: d.clone(),
            },
            None => Event::BlobStored {
                repo: repo.clone(),
                digest: d.clone(),
                size,
            },
        },
    )?;
    Ok(LinkOutcome::Linked { created: true })
}

fn remove_blob_link(t: &mut dyn KvWrite, repo: &RepoName, d: &Digest) -> Result<()> {
    let lk = key(&[repo.as_str(), d.as_str()]);
    t.delete(Table::BlobLinks, &lk)?;
    t.delete(Table::LinkCandidates, &lk)?;
    t.delete(Table::BlobRepos, &key(&[d.as_str(), repo.as_str()]))?;
    release_blob_link(t, d)?;
    adjust_repo(t, repo, -1, 0)?;
    quota_release(t, repo, d)
}

/// When `tag` was pointed at `d`.
fn tag_time(t: &dyn KvRead, repo: &RepoName, d: &Digest, tag: &Tag) -> Result<Timestamp> {
    let mt = key(&[repo.as_str(), d.as_str(), tag.as_str()]);
    Ok(match t.get(Table::ManifestTags, &mt)? {
        Some(v) if !v.is_empty() => decode(&v)?,
        // Written before tagging times were kept (or rebuilt by an audit): the
        // manifest's push time is the best estimate.
        _ => get::<ManifestRecord>(t, Table::Manifests, &key(&[repo.as_str(), d.as_str()]))?
            .map_or(Timestamp(0), |m| m.pushed_at),
    })
}

/// Points `tag` at `d` (whose record is `rec`, updated in place but not stored).
/// Returns the previous target if the tag moved.
fn point_tag(
    t: &mut dyn KvWrite,
    repo: &RepoName,
    tag: &Tag,
    d: &Digest,
    rec: &mut ManifestRecord,
    now: Timestamp,
    policy: &Policy,
) -> Result<Option<Option<Digest>>> {
    let tk = key(&[repo.as_str(), tag.as_str()]);
    let old: Option<Digest> = get(t, Table::Tags, &tk)?;
    if old.as_ref() == Some(d) {
        return Ok(None);
    }
    if let Some(old) = &old {
        // Checked here, inside the change that would move the tag, so two concurrent
        // pushes to a new immutable tag cannot both win: the second sees the first.
        if policy.is_immutable(repo, tag) {
            return Err(Error::ImmutableTag {
                repo: repo.clone(),
                tag: tag.clone(),
                current: old.clone(),
            });
        }
        let mk = key(&[repo.as_str(), old.as_str()]);
        if let Some(mut old_rec) = get::<ManifestRecord>(t, Table::Manifests, &mk)? {
            old_rec.tags = old_rec.tags.saturating_sub(1);
            put(t, Table::Manifests, &mk, &old_rec)?;
        }
        t.delete(
            Table::ManifestTags,
            &key(&[repo.as_str(), old.as_str(), tag.as_str()]),
        )?;
    }
    put(t, Table::Tags, &tk, d)?;
    // The index entry carries the tagging time, for retention by age and by recency.
    put(
        t,
        Table::ManifestTags,
        &key(&[repo.as_str(), d.as_str(), tag.as_str()]),
        &now,
    )?;
    rec.tags += 1;
    Ok(Some(old))
}

fn delete_manifest_txn(
    t: &mut dyn KvWrite,
    repo: &RepoName,
    d: &Digest,
    policy: &Policy,
) -> Result<Option<DeletedManifest>> {
    let mk = key(&[repo.as_str(), d.as_str()]);
    let Some(rec) = get::<ManifestRecord>(t, Table::Manifests, &mk)? else {
        return Ok(None);
    };
    if rec.parents > 0 {
        return Err(Error::InUse {
            digest: d.clone(),
            reason: format!(
                "{} index manifest(s) in {repo} list this manifest; delete them first",
                rec.parents
            ),
        });
    }
    let mut tags = Vec::new();
    let tp = prefix(&[repo.as_str(), d.as_str()]);
    for (k, _) in t.scan(Table::ManifestTags, &tp, None, usize::MAX)? {
        let tag = parse_stored(Tag::parse(last_part(&k)?))?;
        if policy.is_immutable(repo, &tag) {
            return Err(Error::ImmutableTag {
                repo: repo.clone(),
                tag,
                current: d.clone(),
            });
        }
        t.delete(Table::ManifestTags, &k)?;
        t.delete(Table::Tags, &key(&[repo.as_str(), tag.as_str()]))?;
        tags.push(tag);
    }
    for b in &rec.blobs {
        let lk = key(&[repo.as_str(), b.as_str()]);
        if let Some(mut link) = get::<BlobLink>(t, Table::BlobLinks, &lk)? {
            link.manifest_refs = link.manifest_refs.saturating_sub(1);
            if link.manifest_refs == 0 {
                t.put(Table::LinkCandidates, &lk, b"")?;
            }
            put(t, Table::BlobLinks, &lk, &link)?;
        } else if rec.sparse {
            adjust_pending(t, repo, b, false, -1)?;
        }
    }
    for c in &rec.children {
        let ck = key(&[repo.as_str(), c.as_str()]);
        if let Some(mut child) = get::<ManifestRecord>(t, Table::Manifests, &ck)? {
            child.parents = child.parents.saturating_sub(1);
            put(t, Table::Manifests, &ck, &child)?;
        } else if rec.sparse {
            adjust_pending(t, repo, c, true, -1)?;
        }
    }
    if let Some(subject) = &rec.subject {
        t.delete(
            Table::Referrers,
            &key(&[repo.as_str(), subject.as_str(), d.as_str()]),
        )?;
    }
    record_event(
        t,
        Event::ManifestDeleted {
            repo: repo.clone(),
            digest: d.clone(),
            tags: tags.clone(),
        },
    )?;
    t.delete(Table::Manifests, &mk)?;
    release_blob_link(t, d)?;
    adjust_repo(t, repo, 0, -1)?;
    quota_release(t, repo, d)?;
    Ok(Some(DeletedManifest { record: rec, tags }))
}

#[async_trait]
impl<E: KvEngine> MetadataStore for KvMetadata<E> {
    fn commit_log(&self) -> Option<CommitLog> {
        self.engine.commit_log()
    }

    async fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        let k = key(&[digest.as_str()]);
        self.engine.lookup(move |t| get(t, Table::Blobs, &k)).await
    }

    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobLink>> {
        let k = key(&[repo.as_str(), digest.as_str()]);
        self.engine
            .lookup(move |t| get(t, Table::BlobLinks, &k))
            .await
    }

    async fn blob_repositories(
        &self,
        digest: &Digest,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        let p = prefix(&[digest.as_str()]);
        let after = after.map(|a| key(&[digest.as_str(), a.as_str()]));
        self.engine
            .read(move |t| {
                t.scan(Table::BlobRepos, &p, after.as_deref(), limit)?
                    .iter()
                    .map(|(k, _)| parse_stored(RepoName::parse(last_part(k)?)))
                    .collect()
            })
            .await
    }

    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        let k = key(&[repo.as_str(), digest.as_str()]);
        self.engine
            .lookup(move |t| get(t, Table::Manifests, &k))
            .await
    }

    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let k = key(&[repo.as_str(), tag.as_str()]);
        self.engine.lookup(move |t| get(t, Table::Tags, &k)).await
    }

    async fn tagged_manifest(&self, repo: &RepoName, tag: &Tag) -> Result<Option<ManifestRecord>> {
        let (repo, tag) = (repo.clone(), tag.clone());
        self.engine
            .lookup(move |t| {
                let Some(digest) =
                    get::<Digest>(t, Table::Tags, &key(&[repo.as_str(), tag.as_str()]))?
                else {
                    return Ok(None);
                };
                get(t, Table::Manifests, &key(&[repo.as_str(), digest.as_str()]))
            })
            .await
    }

    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoRecord>> {
        let k = key(&[repo.as_str()]);
        self.engine.lookup(move |t| get(t, Table::Repos, &k)).await
    }

    async fn list_tags(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<(Tag, Digest)>> {
        let p = prefix(&[repo.as_str()]);
        let after = after.map(|a| key(&[repo.as_str(), a.as_str()]));
        self.engine
            .read(move |t| {
                t.scan(Table::Tags, &p, after.as_deref(), limit)?
                    .iter()
                    .map(|(k, v)| Ok((parse_stored(Tag::parse(last_part(k)?))?, decode(v)?)))
                    .collect()
            })
            .await
    }

    async fn list_tag_names(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<Tag>> {
        // The first names are read as a lookup (in place, on redb): most repositories
        // have fewer tags than that, and the hop to the blocking pool cost about a
        // tenth of a 1,000-tag listing's CPU. A longer listing goes on through `read`
        // after the last name read, in a second snapshot: a listing's pages never were
        // one snapshot either.
        const IN_PLACE: usize = 1024;
        // Read before the snapshots: a listing read at this version is current for as
        // long as the version stays.
        let version = self.tags_version(repo);
        if let Some(v) = version
            && let Some(tags) = self.tag_lists.page(repo, v, after, limit)
        {
            return Ok(tags);
        }
        let complete = after.is_none();
        let scan = |after: Option<Vec<u8>>, limit: usize| {
            let p = prefix(&[repo.as_str()]);
            move |t: &dyn KvRead| {
                let mut tags = Vec::with_capacity(limit.min(IN_PLACE));
                t.for_each_key(Table::Tags, &p, after.as_deref(), limit, &mut |k| {
                    tags.push(parse_stored(Tag::parse(last_part(k)?))?);
                    Ok(())
                })?;
                Ok(tags)
            }
        };
        let first = limit.min(IN_PLACE);
        let after = after.map(|a| key(&[repo.as_str(), a.as_str()]));
        let mut tags = self.engine.lookup(scan(after, first)).await?;
        if let Some(last) = tags.last().filter(|_| tags.len() == first && limit > first) {
            let after = key(&[repo.as_str(), last.as_str()]);
            let rest = self.engine.read(scan(Some(after), limit - first)).await?;
            tags.extend(rest);
        }
        if let Some(v) = version
            && complete
            && tags.len() < limit
        {
            self.tag_lists
                .keep(repo, v, &tags, |r| self.tags_version(r));
        }
        Ok(tags)
    }

    async fn list_tag_entries(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<TagEntry>> {
        let p = prefix(&[repo.as_str()]);
        let after = after.map(|a| key(&[repo.as_str(), a.as_str()]));
        let repo = repo.clone();
        self.engine
            .read(move |t| {
                let mut out = Vec::new();
                for (k, v) in t.scan(Table::Tags, &p, after.as_deref(), limit)? {
                    let tag = parse_stored(Tag::parse(last_part(&k)?))?;
                    let digest: Digest = decode(&v)?;
                    let tagged_at = tag_time(t, &repo, &digest, &tag)?;
                    out.push(TagEntry {
                        tag,
                        digest,
                        tagged_at,
                    });
                }
                Ok(out)
            })
            .await
    }

    async fn quota_usage(&self, prefix: &RepoName) -> Result<Option<u64>> {
        let k = key(&[prefix.as_str()]);
        self.engine
            .lookup(move |t| get(t, Table::QuotaUsage, &k))
            .await
    }

    async fn list_manifests(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<ManifestRecord>> {
        let p = prefix(&[repo.as_str()]);
        let after = after.map(|a| key(&[repo.as_str(), a.as_str()]));
        self.engine
            .read(move |t| {
                t.scan(Table::Manifests, &p, after.as_deref(), limit)?
                    .iter()
                    .map(|(_, v)| decode(v))
                    .collect()
            })
            .await
    }

    // One prefix scan of the links table instead of the trait's derivation.
    async fn list_blob_links(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobLink)>> {
        let p = prefix(&[repo.as_str()]);
        let after = after.map(|a| key(&[repo.as_str(), a.as_str()]));
        self.engine
            .read(move |t| {
                t.scan(Table::BlobLinks, &p, after.as_deref(), limit)?
                    .iter()
                    .map(|(k, v)| {
                        let d = parse_stored(Digest::parse(last_part(k)?))?;
                        Ok((d, decode(v)?))
                    })
                    .collect()
            })
            .await
    }

    async fn list_repositories(
        &self,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        let after = after.map(|a| key(&[a.as_str()]));
        self.engine
            .read(move |t| {
                t.scan(Table::Repos, b"", after.as_deref(), limit)?
                    .iter()
                    .map(|(k, _)| {
                        parse_stored(RepoName::parse(
                            std::str::from_utf8(k).map_err(Error::storage)?,
                        ))
                    })
                    .collect()
            })
            .await
    }

    async fn list_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<Referrer>> {
        let p = prefix(&[repo.as_str(), subject.as_str()]);
        let after = after.map(|a| key(&[repo.as_str(), subject.as_str(), a.as_str()]));
        self.engine
            .read(move |t| {
                t.scan(Table::Referrers, &p, after.as_deref(), limit)?
                    .iter()
                    .map(|(_, v)| decode(v))
                    .collect()
            })
            .await
    }

    async fn unreferenced_blob_links(
        &self,
        after: Option<(&RepoName, &Digest)>,
        limit: usize,
    ) -> Result<Vec<(RepoName, Digest, BlobLink)>> {
        let after = after.map(|(r, d)| key(&[r.as_str(), d.as_str()]));
        self.engine
            .read(move |t| {
                let mut out = Vec::new();
                for (k, _) in t.scan(Table::LinkCandidates, b"", after.as_deref(), limit)? {
                    let p = parts(&k)?;
                    let [repo, digest] = p[..] else {
                        return Err(Error::storage("corrupt link candidate key"));
                    };
                    if let Some(link) = get(t, Table::BlobLinks, &k)? {
                        out.push((
                            parse_stored(RepoName::parse(repo))?,
                            parse_stored(Digest::parse(digest))?,
                            link,
                        ));
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn unlinked_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobRecord)>> {
        let after = after.map(|d| key(&[d.as_str()]));
        self.engine
            .read(move |t| {
                let mut out = Vec::new();
                for (k, _) in t.scan(Table::BlobCandidates, b"", after.as_deref(), limit)? {
                    if let Some(rec) = get(t, Table::Blobs, &k)? {
                        let d = std::str::from_utf8(&k).map_err(Error::storage)?;
                        out.push((parse_stored(Digest::parse(d))?, rec));
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn stats(&self) -> Result<MetaStats> {
        self.engine
            .read(|t| {
                let mut deleting = 0;
                let mut after: Option<Vec<u8>> = None;
                loop {
                    let page = t.scan(Table::BlobCandidates, b"", after.as_deref(), 1024)?;
                    for (k, _) in &page {
                        if get::<BlobRecord>(t, Table::Blobs, k)?
                            .is_some_and(|rec| rec.state.is_deleting())
                        {
                            deleting += 1;
                        }
                    }
                    match page.last() {
                        Some((k, _)) if page.len() == 1024 => after = Some(k.clone()),
                        _ => break,
                    }
                }
                Ok(MetaStats {
                    blobs: t.count(Table::Blobs)?,
                    deleting,
                    blob_links: t.count(Table::BlobLinks)?,
                    manifests: t.count(Table::Manifests)?,
                    tags: t.count(Table::Tags)?,
                    referrers: t.count(Table::Referrers)?,
                    repositories: t.count(Table::Repos)?,
                })
            })
            .await
    }

    async fn audit(&self, repair: bool) -> Result<AuditReport> {
        self.engine
            .write(move |t| audit::audit_txn(t, repair))
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
        let (repo, d, policy) = (repo.clone(), digest.clone(), policy.clone());
        self.engine
            .write(move |t| link_blob_txn(t, &repo, &d, size, now, &policy, None))
            .await
    }

    async fn mount_blob(
        &self,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<LinkOutcome>> {
        let (from, to, d) = (from.clone(), to.clone(), digest.clone());
        let policy = policy.clone();
        self.engine
            .write(move |t| {
                let Some(src) =
                    get::<BlobLink>(t, Table::BlobLinks, &key(&[from.as_str(), d.as_str()]))?
                else {
                    return Ok(None);
                };
                link_blob_txn(t, &to, &d, src.size, now, &policy, Some(&from)).map(Some)
            })
            .await
    }

    async fn touch_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        now: Timestamp,
    ) -> Result<bool> {
        let k = key(&[repo.as_str(), digest.as_str()]);
        self.engine
            .write(move |t| {
                let Some(mut link) = get::<BlobLink>(t, Table::BlobLinks, &k)? else {
                    return Ok(false);
                };
                if link.protected_at < now {
                    link.protected_at = now;
                    put(t, Table::BlobLinks, &k, &link)?;
                }
                Ok(true)
            })
            .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let (repo, d) = (repo.clone(), digest.clone());
        self.engine
            .write(move |t| {
                let lk = key(&[repo.as_str(), d.as_str()]);
                let Some(link) = get::<BlobLink>(t, Table::BlobLinks, &lk)? else {
                    return Ok(false);
                };
                if link.manifest_refs > 0 {
                    return Err(Error::InUse {
                        digest: d.clone(),
                        reason: format!(
                            "{} manifest(s) in {repo} reference this blob; delete them first",
                            link.manifest_refs
                        ),
                    });
                }
                record_event(
                    t,
                    Event::BlobDeleted {
                        repo: repo.clone(),
                        digest: d.clone(),
                    },
                )?;
                remove_blob_link(t, &repo, &d)?;
                Ok(true)
            })
            .await
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<PutManifestOutcome>> {
        let (repo, policy) = (repo.clone(), policy.clone());
        self.engine
            .write(move |t| {
                let NewManifest {
                    record,
                    referrer,
                    tags,
                } = manifest.clone();
                let d = record.digest.clone();
                if get::<BlobRecord>(t, Table::Blobs, &key(&[d.as_str()]))?
                    .is_some_and(|rec| rec.state.is_deleting())
                {
                    return Ok(None);
                }
                let mk = key(&[repo.as_str(), d.as_str()]);
                let existing: Option<ManifestRecord> = get(t, Table::Manifests, &mk)?;
                let created = existing.is_none();
                let mut rec = match existing {
                    Some(rec) => rec,
                    None => {
                        // What the repository lacks is refused, or, where sparse
                        // manifests are allowed, counted as pending until it arrives.
                        let sparse_ok = policy.allows_sparse(&repo);
                        let mut sparse = false;
                        for b in &record.blobs {
                            let lk = key(&[repo.as_str(), b.as_str()]);
                            let Some(mut link) = get::<BlobLink>(t, Table::BlobLinks, &lk)? else {
                                if !sparse_ok {
                                    return Err(Error::ManifestBlobUnknown { digest: b.clone() });
                                }
                                adjust_pending(t, &repo, b, false, 1)?;
                                sparse = true;
                                continue;
                            };
                            if link.manifest_refs == 0 {
                                t.delete(Table::LinkCandidates, &lk)?;
                            }
                            link.manifest_refs += 1;
                            put(t, Table::BlobLinks, &lk, &link)?;
                        }
                        for c in &record.children {
                            let ck = key(&[repo.as_str(), c.as_str()]);
                            let Some(mut child) = get::<ManifestRecord>(t, Table::Manifests, &ck)?
                            else {
                                if !sparse_ok {
                                    return Err(Error::ManifestBlobUnknown { digest: c.clone() });
                                }
                                adjust_pending(t, &repo, c, true, 1)?;
                                sparse = true;
                                continue;
                            };
                            child.parents += 1;
                            put(t, Table::Manifests, &ck, &child)?;
                        }
                        add_blob_link(t, &d, record.size, now)?.ok_or_else(|| {
                            Error::storage("blob record changed state mid-transaction")
                        })?;
                        // The manifest link itself counts (its bytes are stored too);
                        // its record is written below, after the quota allowed it.
                        quota_add(t, &repo, &d, record.size, &policy, false)?;
                        if let (Some(subject), Some(descriptor)) = (&record.subject, referrer) {
                            put(
                                t,
                                Table::Referrers,
                                &key(&[repo.as_str(), subject.as_str(), d.as_str()]),
                                &Referrer {
                                    digest: d.clone(),
                                    descriptor,
                                },
                            )?;
                        }
                        adjust_repo(t, &repo, 0, 1)?;
                        ManifestRecord {
                            tags: 0,
                            // Sparse indexes already listing it count from now on.
                            parents: take_pending(t, &repo, &d, true)?,
                            pushed_at: now,
                            sparse,
                            ..record
                        }
                    }
                };
                let mut moved_tags = Vec::new();
                for tag in tags {
                    if let Some(old) = point_tag(t, &repo, &tag, &d, &mut rec, now, &policy)? {
                        moved_tags.push((tag, old));
                    }
                }
                put(t, Table::Manifests, &mk, &rec)?;
                // The manifest's arrival, then the tags it moved. Pushed again (two
                // pushes raced past the registry's check), only the tags changed.
                if created {
                    record_event(
                        t,
                        Event::ManifestPut {
                            repo: repo.clone(),
                            digest: d.clone(),
                            media_type: rec.media_type.clone(),
                            subject: rec.subject.clone(),
                            size: rec.size,
                        },
                    )?;
                }
                for (tag, from) in &moved_tags {
                    record_event(
                        t,
                        Event::TagMoved {
                            repo: repo.clone(),
                            tag: tag.clone(),
                            from: from.clone(),
                            to: d.clone(),
                        },
                    )?;
                }
                Ok(Some(PutManifestOutcome {
                    created,
                    moved_tags,
                }))
            })
            .await
    }

    async fn set_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<Digest>> {
        let (repo, tag, d) = (repo.clone(), tag.clone(), digest.clone());
        let policy = policy.clone();
        self.engine
            .write(move |t| {
                let mk = key(&[repo.as_str(), d.as_str()]);
                let Some(mut rec) = get::<ManifestRecord>(t, Table::Manifests, &mk)? else {
                    return Err(Error::ManifestUnknown {
                        reference: d.to_string(),
                    });
                };
                match point_tag(t, &repo, &tag, &d, &mut rec, now, &policy)? {
                    Some(old) => {
                        put(t, Table::Manifests, &mk, &rec)?;
                        record_event(
                            t,
                            Event::TagMoved {
                                repo: repo.clone(),
                                tag: tag.clone(),
                                from: old.clone(),
                                to: d.clone(),
                            },
                        )?;
                        Ok(old)
                    }
                    None => Ok(Some(d.clone())),
                }
            })
            .await
    }

    async fn delete_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        policy: &Policy,
    ) -> Result<Option<Digest>> {
        let (repo, tag) = (repo.clone(), tag.clone());
        let immutable = policy.is_immutable(&repo, &tag);
        self.engine
            .write(move |t| {
                let tk = key(&[repo.as_str(), tag.as_str()]);
                let Some(d) = get::<Digest>(t, Table::Tags, &tk)? else {
                    return Ok(None);
                };
                if immutable {
                    return Err(Error::ImmutableTag {
                        repo: repo.clone(),
                        tag: tag.clone(),
                        current: d,
                    });
                }
                t.delete(Table::Tags, &tk)?;
                t.delete(
                    Table::ManifestTags,
                    &key(&[repo.as_str(), d.as_str(), tag.as_str()]),
                )?;
                let mk = key(&[repo.as_str(), d.as_str()]);
                if let Some(mut rec) = get::<ManifestRecord>(t, Table::Manifests, &mk)? {
                    rec.tags = rec.tags.saturating_sub(1);
                    put(t, Table::Manifests, &mk, &rec)?;
                }
                record_event(
                    t,
                    Event::TagDeleted {
                        repo: repo.clone(),
                        tag: tag.clone(),
                        digest: d.clone(),
                    },
                )?;
                Ok(Some(d))
            })
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
        let (repo, tag, d) = (repo.clone(), tag.clone(), digest.clone());
        let immutable = policy.is_immutable(&repo, &tag);
        self.engine
            .write(move |t| {
                let tk = key(&[repo.as_str(), tag.as_str()]);
                if get::<Digest>(t, Table::Tags, &tk)?.as_ref() != Some(&d)
                    || tag_time(t, &repo, &d, &tag)? != tagged_at
                {
                    return Ok(false);
                }
                if immutable {
                    return Err(Error::ImmutableTag {
                        repo: repo.clone(),
                        tag: tag.clone(),
                        current: d.clone(),
                    });
                }
                t.delete(Table::Tags, &tk)?;
                t.delete(
                    Table::ManifestTags,
                    &key(&[repo.as_str(), d.as_str(), tag.as_str()]),
                )?;
                let mk = key(&[repo.as_str(), d.as_str()]);
                if let Some(mut rec) = get::<ManifestRecord>(t, Table::Manifests, &mk)? {
                    rec.tags = rec.tags.saturating_sub(1);
                    put(t, Table::Manifests, &mk, &rec)?;
                }
                record_event(
                    t,
                    Event::TagDeleted {
                        repo: repo.clone(),
                        tag: tag.clone(),
                        digest: d.clone(),
                    },
                )?;
                Ok(true)
            })
            .await
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        policy: &Policy,
    ) -> Result<Option<DeletedManifest>> {
        let (repo, d, policy) = (repo.clone(), digest.clone(), policy.clone());
        self.engine
            .write(move |t| delete_manifest_txn(t, &repo, &d, &policy))
            .await
    }

    async fn collect_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        rule: ManifestCollectRule,
    ) -> Result<Option<DeletedManifest>> {
        let (repo, d) = (repo.clone(), digest.clone());
        self.engine
            .write(move |t| {
                let mk = key(&[repo.as_str(), d.as_str()]);
                let Some(rec) = get::<ManifestRecord>(t, Table::Manifests, &mk)? else {
                    return Ok(None);
                };
                if rec.tags > 0 || rec.parents > 0 || rec.pushed_at > rule.cutoff {
                    return Ok(None);
                }
                let collect = match &rec.subject {
                    // A referrer lives as long as its subject, whatever the policy.
                    Some(subject) => t
                        .get(Table::Manifests, &key(&[repo.as_str(), subject.as_str()]))?
                        .is_none(),
                    None => rule.untagged,
                };
                if !collect {
                    return Ok(None);
                }
                // Only untagged manifests are collected: no tag can be immutable here.
                delete_manifest_txn(t, &repo, &d, &Policy::default())
            })
            .await
    }

    async fn collect_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        cutoff: Timestamp,
    ) -> Result<bool> {
        let (repo, d) = (repo.clone(), digest.clone());
        self.engine
            .write(move |t| {
                let lk = key(&[repo.as_str(), d.as_str()]);
                match get::<BlobLink>(t, Table::BlobLinks, &lk)? {
                    Some(link) if link.manifest_refs == 0 && link.protected_at <= cutoff => {
                        record_event(
                            t,
                            Event::LinkCollected {
                                repo: repo.clone(),
                                digest: d.clone(),
                            },
                        )?;
                        remove_blob_link(t, &repo, &d)?;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            })
            .await
    }

    async fn begin_blob_deletion(
        &self,
        digest: &Digest,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<BlobRecord>> {
        let k = key(&[digest.as_str()]);
        self.engine
            .write(move |t| {
                let rec = match get::<BlobRecord>(t, Table::Blobs, &k)? {
                    Some(rec) if rec.links > 0 => return Ok(None),
                    Some(rec) => match rec.state {
                        BlobState::Deleting { since } if since.saturating_add(lease) > now => {
                            return Ok(None);
                        }
                        _ => rec,
                    },
                    // Orphan bytes (no record): claim them, so that an uploader committing
                    // the same digest right now waits for us and re-commits after.
                    None => {
                        t.put(Table::BlobCandidates, &k, b"")?;
                        BlobRecord {
                            size: 0,
                            links: 0,
                            state: BlobState::Live,
                            created_at: now,
                        }
                    }
                };
                let rec = BlobRecord {
                    state: BlobState::Deleting { since: now },
                    ..rec
                };
                put(t, Table::Blobs, &k, &rec)?;
                Ok(Some(rec))
            })
            .await
    }

    async fn finish_blob_deletion(&self, digest: &Digest, since: Timestamp) -> Result<bool> {
        let k = key(&[digest.as_str()]);
        let d = digest.clone();
        self.engine
            .write(move |t| match get::<BlobRecord>(t, Table::Blobs, &k)? {
                Some(rec) if rec.state == (BlobState::Deleting { since }) => {
                    t.delete(Table::Blobs, &k)?;
                    t.delete(Table::BlobCandidates, &k)?;
                    // Orphan bytes claimed without a record (size 0) were never
                    // reported as stored: nor is their removal.
                    if rec.size > 0 || rec.created_at != since {
                        record_event(
                            t,
                            Event::BlobCollected {
                                digest: d.clone(),
                                size: rec.size,
                            },
                        )?;
                    }
                    Ok(true)
                }
                _ => Ok(false),
            })
            .await
    }

    async fn events_after(&self, after: u64, limit: usize) -> Result<OutboxRead> {
        self.engine
            .read(move |t| outbox::read(t, after, limit))
            .await
    }

    async fn outbox_settled(&self, horizon: u64) -> Result<bool> {
        self.engine.outbox_settled(horizon).await
    }

    async fn events_head(&self) -> Result<u64> {
        self.engine.lookup(|t| t.outbox_head()).await
    }

    async fn claim_consumer(
        &self,
        name: &str,
        owner: &str,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<u64>> {
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.engine
            .write(move |t| outbox::claim(t, &name, &owner, now, lease))
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
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.engine
            .write(move |t| outbox::ack(t, &name, &owner, cursor, now, lease))
            .await
    }

    async fn consumers(&self) -> Result<Vec<(String, ConsumerRecord)>> {
        self.engine.read(|t| outbox::consumers(t)).await
    }

    async fn trim_events(
        &self,
        now: Timestamp,
        retention: std::time::Duration,
        max_events: u64,
    ) -> Result<u64> {
        self.engine
            .write(move |t| outbox::trim(t, now, retention, max_events))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryKv;
    use crate::testkit::{push_image, repo};
    use crate::{MemoryBlobStore, Registry, Storage};

    /// The in-memory engine without its table versions: listings are read every time,
    /// as over an engine other processes write to.
    struct Uncounted(MemoryKv);

    impl KvEngine for Uncounted {
        async fn read<R, F>(&self, f: F) -> Result<R>
        where
            F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
            R: Send + 'static,
        {
            self.0.read(f).await
        }

        async fn write<R, F>(&self, f: F) -> Result<R>
        where
            F: Fn(&mut dyn KvWrite) -> Result<R> + Send + Sync + 'static,
            R: Send + 'static,
        {
            self.0.write(f).await
        }
    }

    /// A listing longer than the part read in place goes on after its last name: every
    /// name once, in order, whatever the limit and the starting point; read each time,
    /// and from a kept listing.
    #[tokio::test]
    async fn long_tag_listings_continue_after_the_part_read_in_place() {
        long_listings(KvMetadata::new(Uncounted(MemoryKv::default())), false).await;
        long_listings(KvMetadata::new(MemoryKv::default()), true).await;
    }

    async fn long_listings<E: KvEngine>(meta: KvMetadata<E>, kept: bool) {
        let names: Vec<String> = (0..1100).map(|i| format!("t{i:05}")).collect();
        let written = names.clone();
        meta.engine()
            .write(move |t| {
                for n in &written {
                    t.put(Table::Tags, &key(&["long/x", n]), b"")?;
                }
                // A neighbour whose names must not leak into the listing.
                t.put(Table::Tags, &key(&["long/y", "a"]), b"")
            })
            .await
            .unwrap();
        let repo = repo("long/x");
        let list = |after: Option<&str>, limit: usize| {
            let after = after.map(|a| Tag::parse(a).unwrap());
            let (meta, repo) = (&meta, &repo);
            async move {
                let tags = meta
                    .list_tag_names(repo, after.as_ref(), limit)
                    .await
                    .unwrap();
                tags.iter().map(|t| t.to_string()).collect::<Vec<_>>()
            }
        };
        assert_eq!(list(None, 10_001).await, names);
        assert_eq!(list(None, 1024).await, names[..1024]);
        assert_eq!(list(None, 1025).await, names[..1025]);
        assert_eq!(list(Some("t00049"), 2000).await, names[50..]);
        assert_eq!(list(Some("t00049"), 1030).await, names[50..1080]);
        assert!(list(Some("t01099"), 2000).await.is_empty());
        // Every listing after the first complete one came from memory, or none did.
        assert_eq!(meta.tag_listings_reused(), if kept { 5 } else { 0 });
    }

    /// A complete listing is kept until a write changes a tag of its repository (or of
    /// one whose name hashes alike): writes to other tables and tags of other
    /// repositories leave it, a listing starting after a tag or cut short is answered
    /// from it, and a listing that was not complete is not kept.
    #[tokio::test]
    async fn tag_listings_are_kept_until_a_tag_changes() {
        let meta = Arc::new(KvMetadata::new(MemoryKv::default()));
        let storage = Storage {
            blobs: Arc::new(MemoryBlobStore::default()),
            metadata: meta.clone(),
        };
        let r = Registry::builder(storage).build();
        let repo = repo("kept/x");
        let (d, _) = push_image(&r, &repo, "b", b"{}", &[b"layer"]).await;
        r.tag_manifest(&repo, &Tag::parse("a").unwrap(), &d)
            .await
            .unwrap();
        let names = |after: Option<&str>, limit: usize| {
            let (meta, repo) = (&meta, &repo);
            let after = after.map(|a| Tag::parse(a).unwrap());
            async move {
                let tags = meta.list_tag_names(repo, after.as_ref(), limit).await;
                tags.unwrap()
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
            }
        };
        // Cut short: not kept.
        assert_eq!(names(None, 1).await, ["a"]);
        assert_eq!(names(None, 3).await, ["a", "b"]);
        assert_eq!(meta.tag_listings_reused(), 0);
        assert_eq!(names(None, 3).await, ["a", "b"]);
        assert_eq!(names(Some("a"), 3).await, ["b"]);
        assert_eq!(names(None, 1).await, ["a"]);
        assert_eq!(meta.tag_listings_reused(), 3);
        // A blob pushed and linked changes no tag.
        crate::testkit::push_blob(&r, &repo, b"another").await;
        assert_eq!(names(None, 3).await, ["a", "b"]);
        assert_eq!(meta.tag_listings_reused(), 4);
        // Nor does a tag pushed in a repository of another group.
        let group = key_group(b"kept/x");
        let other = (0..1000)
            .map(|i| format!("kept/other{i}"))
            .find(|n| key_group(n.as_bytes()) != group)
            .unwrap();
        push_image(&r, &crate::testkit::repo(&other), "z", b"{}", &[]).await;
        assert_eq!(names(None, 3).await, ["a", "b"]);
        assert_eq!(meta.tag_listings_reused(), 5);
        // A tag of a repository in the same group does: the counter is shared.
        let alike = (0..1000)
            .map(|i| format!("kept/alike{i}"))
            .find(|n| key_group(n.as_bytes()) == group)
            .unwrap();
        push_image(&r, &crate::testkit::repo(&alike), "z", b"{}", &[]).await;
        assert_eq!(names(None, 3).await, ["a", "b"]);
        assert_eq!(meta.tag_listings_reused(), 5);
        assert_eq!(names(None, 3).await, ["a", "b"]);
        assert_eq!(meta.tag_listings_reused(), 6);
        // And so, of course, does one of its own.
        r.tag_manifest(&repo, &Tag::parse("c").unwrap(), &d)
            .await
            .unwrap();
        assert_eq!(names(None, 4).await, ["a", "b", "c"]);
        assert_eq!(meta.tag_listings_reused(), 6);
        assert_eq!(names(None, 4).await, ["a", "b", "c"]);
        assert_eq!(meta.tag_listings_reused(), 7);
    }

    /// A key's group is its bytes before the first 0 byte: a repository's tag keys all
    /// count on the counter its name does, and a change counts once per group, however
    /// many of its keys it wrote.
    #[test]
    fn keys_count_in_their_repository_s_group() {
        let versions = TableVersions::default();
        let mut changed = TableSet::default();
        changed.insert_key(Table::Tags, &key(&["a/b", "v1"]));
        changed.insert_key(Table::Tags, &key(&["a/b", "v2"]));
        assert!(changed.contains(Table::Tags));
        assert!(!changed.contains(Table::Repos));
        versions.bump(changed);
        assert_eq!(versions.get(Table::Tags, b"a/b"), 1);
        assert_eq!(versions.get(Table::Tags, &key(&["a/b", "other"])), 1);
        assert_eq!(versions.get(Table::Repos, b"a/b"), 0);
        let elsewhere = (0..1000)
            .map(|i| format!("c/{i}"))
            .find(|n| key_group(n.as_bytes()) != key_group(b"a/b"))
            .unwrap();
        assert_eq!(versions.get(Table::Tags, elsewhere.as_bytes()), 0);
        // A change whose keys are not known counts in every group.
        let mut all = TableSet::default();
        all.insert(Table::Tags);
        versions.bump(all);
        assert_eq!(versions.get(Table::Tags, b"a/b"), 2);
        assert_eq!(versions.get(Table::Tags, elsewhere.as_bytes()), 1);
    }

    /// Tag index entries written before tagging times were recorded (empty values, as
    /// in older stores and after an audit rebuilt the index) fall back to the manifest's
    /// push time; new entries carry the time the tag moved.
    #[tokio::test]
    async fn tag_times_fall_back_to_push_time() {
        let meta = Arc::new(KvMetadata::new(MemoryKv::default()));
        let storage = Storage {
            blobs: Arc::new(MemoryBlobStore::default()),
            metadata: meta.clone(),
        };
        let clock = crate::ManualClock::new(Timestamp(1_000));
        let r = Registry::builder(storage)
            .with_clock(Arc::new(clock.clone()))
            .build();
        let repo = repo("times/x");
        let (m, _) = push_image(&r, &repo, "old", b"{}", &[b"layer"]).await;
        clock.advance(std::time::Duration::from_secs(5));
        r.tag_manifest(&repo, &Tag::parse("new").unwrap(), &m)
            .await
            .unwrap();
        let m2 = m.clone();
        meta.engine()
            .write(move |t| {
                t.put(
                    Table::ManifestTags,
                    &key(&["times/x", m2.as_str(), "old"]),
                    b"",
                )
            })
            .await
            .unwrap();
        clock.advance(std::time::Duration::from_secs(5));
        let entries = meta.list_tag_entries(&repo, None, 10).await.unwrap();
        let times: Vec<(&str, Timestamp)> = entries
            .iter()
            .map(|e| (e.tag.as_str(), e.tagged_at))
            .collect();
        assert_eq!(
            times,
            [("new", Timestamp(6_000)), ("old", Timestamp(1_000))]
        );
    }
}
