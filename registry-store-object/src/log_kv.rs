//! Metadata as a transaction log in the bucket: a [`KvEngine`] whose commits are
//! create-if-absent writes of numbered log entries.
//!
//! Every process holds the key-value state in memory, as a cache of the log: the last
//! checkpoint object plus the log entries after it. A write transaction runs on the
//! newest state the process knows, then tries to create the next entry,
//! `meta/log/<version + 1>`, with its writes. Exactly one process can create an entry
//! (the bucket's create-if-absent is atomic), so the log is one serial history and
//! every transaction is serialisable across processes. The loser of a race reads the
//! winner's entry, applies it, and runs its transaction again on the newer state;
//! that is why [`KvEngine::write`] takes an `Fn`.
//!
//! Before each read or write the process reads `meta/log/<version + 1>`: an answer of
//! "not found" proves it is up to date (entries are created in order, each by a process
//! that had seen the one before), so a read sees every write acknowledged anywhere
//! before it started. Concurrent readers share one such check.
//!
//! The local state is only a cache: losing it (a restart) costs reading the newest
//! checkpoint and the entries after it, up to [`LogOptions::replay_concurrency`] GETs
//! in flight. Checkpoints are written every `checkpoint_interval` versions by the
//! process that committed that version.
//!
//! Trimming (opt-in, [`LogOptions::retention`]) deletes entries and checkpoints behind
//! a checkpoint that is old enough. A process behind a trim would read a deleted entry
//! as "not found" and believe itself current, and its create of that entry would
//! succeed: so every "not found", every entry read and every create is trusted only
//! while the process's lease holds (it confirmed being current less than
//! [`LogOptions::lease`] ago) or after it read the trim watermark (`meta/trimmed`, the
//! version through which entries may be gone) and found the version above it. See
//! `docs/design.md`, section 7, "Trimming the log".

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt, stream};
use object_store::path::Path;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use registry_core::kv::{KvEngine, KvPair, KvRead, KvWrite, Table, scan_range};
use registry_core::{Error, Result};

use crate::os_err;

type Tables = [BTreeMap<Vec<u8>, Vec<u8>>; Table::ALL.len()];

/// One change: put (`Some`) or delete (`None`) of a key in a table.
type Op = (Table, Vec<u8>, Option<Vec<u8>>);

/// The state as of log version `version`.
#[derive(Default)]
struct State {
    version: u64,
    tables: Tables,
}

impl State {
    fn apply(&mut self, ops: Vec<Op>) {
        for (table, key, value) in ops {
            let map = &mut self.tables[table.index()];
            match value {
                Some(v) => {
                    map.insert(key, v);
                }
                None => {
                    map.remove(&key);
                }
            }
        }
    }
}

impl KvRead for State {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tables[table.index()].get(key).cloned())
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>> {
        Ok(scan_range(&self.tables[table.index()], prefix, after)
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn count(&self, table: Table) -> Result<u64> {
        Ok(self.tables[table.index()].len() as u64)
    }
}

/// A write transaction: the state it started from plus its own writes, which it reads
/// back. Nothing touches the shared state until the log entry exists.
struct Txn<'a> {
    base: &'a State,
    writes: [BTreeMap<Vec<u8>, Option<Vec<u8>>>; Table::ALL.len()],
}

impl Txn<'_> {
    fn into_ops(self) -> Vec<Op> {
        let mut ops = Vec::new();
        for (i, writes) in self.writes.into_iter().enumerate() {
            for (key, value) in writes {
                // Writes that change nothing are left out of the entry.
                if self.base.tables[i].get(&key) != value.as_ref() {
                    ops.push((Table::ALL[i], key, value));
                }
            }
        }
        ops
    }
}

impl KvRead for Txn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.writes[table.index()].get(key) {
            Some(written) => Ok(written.clone()),
            None => self.base.get(table, key),
        }
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>> {
        // Merge the two ordered ranges; an own write wins over the base entry.
        let mut base = scan_range(&self.base.tables[table.index()], prefix, after).peekable();
        let writes = &self.writes[table.index()];
        let mut own = scan_range(writes, prefix, after).peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let take_own = match (base.peek(), own.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((bk, _)), Some((ok, _))) => ok <= bk,
            };
            if take_own {
                let (k, v) = own.next().expect("peeked");
                if base.peek().is_some_and(|(bk, _)| *bk == k) {
                    base.next();
                }
                if let Some(v) = v {
                    out.push((k.clone(), v.clone()));
                }
            } else {
                let (k, v) = base.next().expect("peeked");
                out.push((k.clone(), v.clone()));
            }
        }
        Ok(out)
    }

    fn count(&self, table: Table) -> Result<u64> {
        let base = &self.base.tables[table.index()];
        let mut n = base.len() as i64;
        for (k, v) in &self.writes[table.index()] {
            match (base.contains_key(k), v.is_some()) {
                (false, true) => n += 1,
                (true, false) => n -= 1,
                _ => {}
            }
        }
        Ok(n as u64)
    }
}

impl KvWrite for Txn<'_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        self.writes[table.index()].insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &[u8]) -> Result<bool> {
        let existed = self.get(table, key)?.is_some();
        self.writes[table.index()].insert(key.to_vec(), None);
        Ok(existed)
    }
}

/// Entry and checkpoint encoding: a format byte, the version, then the changes, each
/// `table: u8, key_len: u32, key, kind: u8 (0 delete, 1 put), [value_len: u32, value]`.
const FORMAT: u8 = 1;

fn encode(
    version: u64,
    ops: impl IntoIterator<Item = (Table, impl AsRef<[u8]>, Option<impl AsRef<[u8]>>)>,
) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(FORMAT);
    b.put_u64(version);
    for (table, key, value) in ops {
        let key = key.as_ref();
        b.put_u8(table.index() as u8);
        b.put_u32(key.len() as u32);
        b.put_slice(key);
        match value {
            None => b.put_u8(0),
            Some(v) => {
                let v = v.as_ref();
                b.put_u8(1);
                b.put_u32(v.len() as u32);
                b.put_slice(v);
            }
        }
    }
    b.freeze()
}

fn decode(mut b: Bytes) -> Result<(u64, Vec<Op>)> {
    let corrupt = || Error::storage("corrupt metadata log object");
    if b.remaining() < 9 || b.get_u8() != FORMAT {
        return Err(corrupt());
    }
    let version = b.get_u64();
    let mut ops = Vec::new();
    let take = |b: &mut Bytes| -> Result<Vec<u8>> {
        if b.remaining() < 4 {
            return Err(corrupt());
        }
        let n = b.get_u32() as usize;
        if b.remaining() < n {
            return Err(corrupt());
        }
        Ok(b.split_to(n).to_vec())
    };
    while b.has_remaining() {
        let table = *Table::ALL.get(b.get_u8() as usize).ok_or_else(corrupt)?;
        let key = take(&mut b)?;
        if !b.has_remaining() {
            return Err(corrupt());
        }
        let value = match b.get_u8() {
            0 => None,
            1 => Some(take(&mut b)?),
            _ => return Err(corrupt()),
        };
        ops.push((table, key, value));
    }
    Ok((version, ops))
}

/// Version numbers in object names are zero-padded so that names sort by version.
fn numbered(dir: &Path, version: u64) -> Path {
    dir.clone().join(format!("{version:020}"))
}

/// The version in an entry's or checkpoint's name.
fn version_of(p: &Path) -> Option<u64> {
    p.filename()?.parse().ok()
}

/// A transaction waiting to be committed, its result type erased so that one batch can
/// hold transactions of every kind.
struct Pending {
    run: Transaction,
    reply: oneshot::Sender<Result<Answer>>,
}

/// A transaction's result, type-erased.
type Answer = Box<dyn Any + Send>;

/// A transaction, its result type erased.
type Transaction = Box<dyn Fn(&mut dyn KvWrite) -> Result<Answer> + Send + Sync>;

/// The monotonic clock a process measures its lease on: [`Instant::now`] unless a test
/// injects one it can move.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Instant + Send + Sync>);

impl Clock {
    /// A clock that reads `now`.
    pub fn new(now: impl Fn() -> Instant + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now))
    }

    fn now(&self) -> Instant {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new(Instant::now)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// Knobs of the log; see `BucketOptions`, which carries them.
#[derive(Debug, Clone)]
pub(crate) struct LogOptions {
    /// Versions between checkpoints.
    pub(crate) checkpoint_interval: u64,
    /// Entry GETs in flight while replaying.
    pub(crate) replay_concurrency: usize,
    /// How long a confirmation of being current is trusted without reading the trim
    /// watermark. Every process sharing the bucket must use one at most a third of
    /// the retention of any process that trims.
    pub(crate) lease: Duration,
    /// Trim entries and checkpoints behind a checkpoint this old (by the bucket's
    /// clock; at least three leases); `None` never trims.
    pub(crate) retention: Option<Duration>,
    /// Entries deleted per trim pass at most.
    pub(crate) trim_batch: usize,
    /// The clock leases are measured on.
    pub(crate) clock: Clock,
}

/// Entries replayed between two checks of the trim watermark when no lease holds (a
/// bound on what is held before being applied).
const REPLAY_CHUNK: u64 = 4096;

/// What one trim pass did ([`LogKv::trim`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrimReport {
    /// The trim watermark after the pass: entries up to it may be gone.
    pub watermark: u64,
    /// Log entries deleted.
    pub entries_deleted: usize,
    /// Checkpoints deleted.
    pub checkpoints_deleted: usize,
}

/// The transaction-log engine.
#[derive(Debug)]
pub struct LogKv {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    log_dir: Path,
    checkpoint_dir: Path,
    /// `meta/trimmed`: the version through which entries may have been deleted.
    watermark: Path,
    options: LogOptions,
    state: RwLock<State>,
    /// When the last check that proved this process current started (the lease).
    confirmed: Mutex<Option<Instant>>,
    /// Transactions submitted and not yet taken into a batch.
    queue: Mutex<Vec<Pending>>,
    /// Held while a batch commits: the transactions queued meanwhile form the next
    /// batch (group commit), so concurrent writers of one process share log entries
    /// instead of racing each other for them.
    committer: Arc<tokio::sync::Mutex<()>>,
    /// Refreshes from the bucket, one at a time; see [`Inner::refresh`].
    refresh: tokio::sync::Mutex<u64>,
    refreshes_started: AtomicU64,
    /// A background trim pass is running in this process.
    trimming: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogKv")
            .field("store", &self.store)
            .field("log_dir", &self.log_dir)
            .field("version", &self.read_state().version)
            .finish_non_exhaustive()
    }
}

impl LogKv {
    /// Opens the log under `root` (`root/log/`, `root/checkpoint/`, `root/trimmed`):
    /// loads the newest checkpoint and the entries after it.
    pub(crate) async fn open(
        store: Arc<dyn ObjectStore>,
        root: &Path,
        mut options: LogOptions,
    ) -> Result<LogKv> {
        options.checkpoint_interval = options.checkpoint_interval.max(1);
        options.replay_concurrency = options.replay_concurrency.max(1);
        options.trim_batch = options.trim_batch.max(1);
        let inner = Inner {
            store,
            log_dir: root.clone().join("log"),
            checkpoint_dir: root.clone().join("checkpoint"),
            watermark: root.clone().join("trimmed"),
            options,
            state: RwLock::default(),
            confirmed: Mutex::default(),
            queue: Mutex::default(),
            committer: Arc::default(),
            refresh: tokio::sync::Mutex::new(0),
            refreshes_started: AtomicU64::new(0),
            trimming: AtomicBool::new(false),
        };
        inner.load_checkpoint(false).await?;
        inner.catch_up().await?;
        Ok(LogKv {
            inner: Arc::new(inner),
        })
    }

    /// The version of the newest log entry this process has applied.
    pub fn version(&self) -> u64 {
        self.inner.read_state().version
    }

    /// Runs one trim pass now (the process that writes a checkpoint runs one after it
    /// when retention is configured): raises the trim watermark to the newest checkpoint
    /// older than the retention, then deletes up to the per-pass bound of entries at or
    /// below the watermark and every checkpoint below it. Without retention it does
    /// nothing.
    pub async fn trim(&self) -> Result<TrimReport> {
        self.inner.trim().await
    }
}

impl Inner {
    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        // The state changes only in `State::apply`, which does not panic midway, so a
        // poisoned lock still guards a whole state.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies entry `version` unless it is already applied.
    fn apply(&self, version: u64, ops: Vec<Op>) {
        let mut state = self.write_state();
        if state.version + 1 == version {
            state.apply(ops);
            state.version = version;
        }
    }

    /// When this process last confirmed being current. Taken before the local version
    /// that requests are about to ask beyond is read: a confirmation is recorded only
    /// after the state reached the version it confirmed, so the requests ask about
    /// entries above that version, the ones the lease protects.
    fn lease(&self) -> Option<Instant> {
        *self.confirmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `lease` (from [`lease`](Self::lease)) is younger than the lease duration.
    /// Asked only after the answers it is to vouch for have arrived, so that a pause or
    /// a slow request anywhere before counts against it.
    fn lease_holds(&self, lease: Option<Instant>) -> bool {
        lease.is_some_and(|at| {
            self.options
                .clock
                .now()
                .checked_duration_since(at)
                .unwrap_or_default()
                < self.options.lease
        })
    }

    /// Records that a check started at `at` proved this process current.
    fn renew(&self, at: Instant) {
        let mut confirmed = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        if confirmed.is_none_or(|c| c < at) {
            *confirmed = Some(at);
        }
    }

    /// The trim watermark and the version of the object holding it (`(0, None)` before
    /// the first trim).
    async fn watermark(&self) -> Result<(u64, Option<UpdateVersion>)> {
        let got = match self.store.get(&self.watermark).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok((0, None)),
            Err(e) => return Err(os_err(e)),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(os_err)?;
        let trimmed = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::storage("corrupt metadata trim watermark"))?;
        Ok((trimmed, Some(version)))
    }

    /// Whether answers about entries `lowest` and above, all received before this call
    /// to requests sent after `lease` was taken, are the log's: yes while that lease
    /// holds (nothing above a version that was current less than a lease ago can have
    /// been trimmed yet), otherwise if the trim
    /// watermark, read now, is below `lowest`. A deleted entry is only ever deleted
    /// after the watermark covers it, and an entry created where one was deleted (by a
    /// process behind the trim) only after that too, so a watermark below `lowest` read
    /// after the answers proves none of them was about a trimmed or re-created entry.
    async fn trusted(&self, lowest: u64, lease: Option<Instant>) -> Result<bool> {
        if self.lease_holds(lease) {
            return Ok(true);
        }
        Ok(self.watermark().await?.0 < lowest)
    }

    /// Reads entry `version`; `None` if it does not exist (yet).
    async fn entry(&self, version: u64) -> Result<Option<Vec<Op>>> {
        let bytes = match self.store.get(&numbered(&self.log_dir, version)).await {
            Ok(r) => r.bytes().await.map_err(os_err)?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(os_err(e)),
        };
        let (claimed, ops) = decode(bytes)?;
        if claimed != version {
            return Err(Error::storage(format!(
                "metadata log entry {version} claims version {claimed}"
            )));
        }
        Ok(Some(ops))
    }

    /// Reads up to `limit` entries from `from` on, in order, stopping at the first that
    /// does not exist; with the start of the GET that found nothing, if one did. The
    /// first GET goes alone (a freshness check usually finds nothing), and so does the
    /// second (a process one entry behind pays nothing extra); then rounds of 2, 4, ...
    /// GETs at once, and from `replay_concurrency` on a pipeline of that many in flight.
    /// So a process a few entries behind (several processes sharing a bucket) wastes at
    /// most as many GETs past the end as it found entries, and a long replay is bounded
    /// by latency / concurrency.
    async fn fetch(&self, from: u64, limit: u64) -> Result<(Vec<(u64, Vec<Op>)>, Option<Instant>)> {
        let clock = &self.options.clock;
        let end = from.saturating_add(limit);
        let mut entries = Vec::new();
        let mut next = from;
        let mut window: u64 = 1;
        let mut rounds = 0;
        while window < self.options.replay_concurrency as u64 {
            let n = window.min(end - next);
            if n == 0 {
                return Ok((entries, None));
            }
            let started = clock.now();
            let round = futures::future::join_all((next..next + n).map(|v| self.entry(v))).await;
            for (v, got) in (next..).zip(round) {
                match got? {
                    Some(ops) => entries.push((v, ops)),
                    None => return Ok((entries, Some(started))),
                }
            }
            next += n;
            rounds += 1;
            if rounds > 1 {
                window *= 2;
            }
        }
        let mut gets = stream::iter(next..end)
            .map(|v| {
                let started = clock.now();
                async move { (v, started, self.entry(v).await) }
            })
            .buffered(self.options.replay_concurrency);
        while let Some((v, started, got)) = gets.next().await {
            match got? {
                Some(ops) => entries.push((v, ops)),
                None => return Ok((entries, Some(started))),
            }
        }
        Ok((entries, None))
    }

    /// Applies entries after the local version until the next one does not exist,
    /// trusting what it read only as [`trusted`](Self::trusted) allows; behind a trim,
    /// it reloads from the newest checkpoint first.
    async fn catch_up(&self) -> Result<()> {
        let mut reloads = 0;
        loop {
            let lease = self.lease();
            let from = self.read_state().version + 1;
            let (entries, end) = self.fetch(from, REPLAY_CHUNK).await?;
            if !self.trusted(from, lease).await? {
                tracing::info!(
                    version = from - 1,
                    "metadata log trimmed past this process's version; reloading from the newest checkpoint"
                );
                // Each reload moves to a checkpoint at or above the watermark; one that
                // does not means the checkpoint is missing (a damaged bucket).
                reloads += 1;
                if reloads > 5 {
                    return Err(Error::storage(format!(
                        "the metadata log is trimmed past version {} and no newer checkpoint loads",
                        from - 1
                    )));
                }
                self.load_checkpoint(true).await?;
                continue;
            }
            for (version, ops) in entries {
                self.apply(version, ops);
            }
            if let Some(started) = end {
                self.renew(started);
                return Ok(());
            }
        }
    }

    /// Replaces the state with the newest checkpoint if that is newer. `required`: a
    /// trim made the entries after the local version unreadable, so there must be a
    /// checkpoint (a trim never deletes the newest).
    async fn load_checkpoint(&self, required: bool) -> Result<()> {
        // A trim pass may delete the checkpoint between the listing and the GET.
        for _ in 0..5 {
            let listed: Vec<ObjectMeta> = self
                .store
                .list(Some(&self.checkpoint_dir))
                .try_collect()
                .await
                .map_err(os_err)?;
            let Some(newest) = listed
                .iter()
                .filter_map(|m| Some((version_of(&m.location)?, &m.location)))
                .max()
            else {
                if required {
                    return Err(Error::storage(
                        "the metadata log was trimmed, yet there is no checkpoint",
                    ));
                }
                return Ok(());
            };
            if newest.0 <= self.read_state().version {
                return Ok(());
            }
            let bytes = match self.store.get(newest.1).await {
                Ok(got) => got.bytes().await.map_err(os_err)?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(os_err(e)),
            };
            let (version, ops) = decode(bytes)?;
            let mut loaded = State::default();
            loaded.apply(ops);
            loaded.version = version;
            let mut state = self.write_state();
            if state.version < version {
                *state = loaded;
            }
            return Ok(());
        }
        Err(Error::storage(
            "metadata checkpoints kept disappearing while loading one",
        ))
    }

    /// Brings the local state up to date with the bucket. A refresh that started after
    /// this call began is as good as one of its own, so concurrent readers share one.
    async fn refresh(&self) -> Result<()> {
        let arrived = self.refreshes_started.load(Ordering::SeqCst);
        let mut last_done = self.refresh.lock().await;
        if *last_done > arrived {
            return Ok(());
        }
        let ticket = self.refreshes_started.fetch_add(1, Ordering::SeqCst) + 1;
        self.catch_up().await?;
        *last_done = ticket;
        Ok(())
    }

    /// Commits `batch` as one log entry and answers each transaction. Runs on local
    /// state without asking the bucket first: if that state is stale, the entry's
    /// create fails, the process catches up and runs the batch again.
    async fn commit(self: Arc<Self>, batch: Vec<Pending>) {
        let mut results = Vec::with_capacity(batch.len());
        loop {
            results.clear();
            // Without a lease (idle, or behind a trim) catch up first, checking the trim
            // watermark: an entry created where a trim deleted one cannot be
            // acknowledged (below).
            if !self.lease_holds(self.lease())
                && let Err(e) = self.catch_up().await
            {
                let message = e.to_string();
                for p in batch {
                    let _ = p.reply.send(Err(Error::storage(message.clone())));
                }
                return;
            }
            let lease = self.lease();
            let (version, ops) = {
                let state = self.read_state();
                let mut txn = Txn {
                    base: &state,
                    writes: Default::default(),
                };
                for (i, p) in batch.iter().enumerate() {
                    // A transaction that fails leaves no writes in the batch (the first
                    // one in a batch starts from none: nothing to save).
                    let saved = (i > 0).then(|| txn.writes.clone());
                    let result = (p.run)(&mut txn);
                    if result.is_err() {
                        txn.writes = saved.unwrap_or_default();
                    }
                    results.push(result);
                }
                (state.version + 1, txn.into_ops())
            };
            let started = self.options.clock.now();
            let outcome = if ops.is_empty() {
                // Nothing to write: the answers stand if nothing was committed after
                // the state they read.
                match self.entry(version).await {
                    Ok(None) => match self.trusted(version, lease).await {
                        Ok(true) => {
                            self.renew(started);
                            Ok(true)
                        }
                        Ok(false) => self.catch_up().await.map(|()| false),
                        Err(e) => Err(e),
                    },
                    // Read and checked like any other entry.
                    Ok(Some(_)) => self.catch_up().await.map(|()| false),
                    Err(e) => Err(e),
                }
            } else {
                let entry = encode(version, ops.iter().map(|(t, k, v)| (*t, k, v.as_ref())));
                let path = numbered(&self.log_dir, version);
                let put = self
                    .store
                    .put_opts(
                        &path,
                        PutPayload::from(entry),
                        PutOptions::from(PutMode::Create),
                    )
                    .await;
                match put {
                    Ok(_) => match self.trusted(version, lease).await {
                        Ok(true) => {
                            self.apply(version, ops);
                            self.renew(started);
                            if version % self.options.checkpoint_interval == 0 {
                                // Off the request path: a checkpoint can be large.
                                tokio::spawn(self.clone().write_checkpoint(version));
                            }
                            Ok(true)
                        }
                        Ok(false) => {
                            // At or below the watermark: either created where a trim had
                            // deleted an entry (this process stalled past a trim between
                            // its check and the PUT: history nobody reads), or a real
                            // commit that a trim overtook since. Never acknowledged, and
                            // not run again (it may have been applied): an unknown
                            // outcome, like a timeout. The next read reloads.
                            tracing::warn!(
                                version,
                                "metadata commit landed at or below the trim watermark"
                            );
                            Err(Error::storage(format!(
                                "metadata commit of version {version} overtaken by a trim of the log; outcome unknown, retry"
                            )))
                        }
                        // Written, but not known to be the log's: the next read decides.
                        Err(e) => Err(e),
                    },
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        tracing::debug!(version, "metadata log race lost; running the batch again");
                        self.catch_up().await.map(|()| false)
                    }
                    // The entry may or may not exist now (a timeout after the write
                    // landed, say); the next refresh reads whichever is true.
                    Err(e) => Err(os_err(e)),
                }
            };
            match outcome {
                Ok(true) => {
                    for (p, r) in batch.into_iter().zip(results.drain(..)) {
                        let _ = p.reply.send(r);
                    }
                    return;
                }
                Ok(false) => continue,
                Err(e) => {
                    let message = e.to_string();
                    for p in batch {
                        let _ = p.reply.send(Err(Error::storage(message.clone())));
                    }
                    return;
                }
            }
        }
    }

    async fn write_checkpoint(self: Arc<Self>, version: u64) {
        let body = {
            let state = self.read_state();
            if state.version != version {
                // Moved on already; the next interval writes one.
                return;
            }
            let ops = state
                .tables
                .iter()
                .enumerate()
                .flat_map(|(i, map)| map.iter().map(move |(k, v)| (Table::ALL[i], k, Some(v))));
            encode(version, ops)
        };
        let put = self
            .store
            .put(
                &numbered(&self.checkpoint_dir, version),
                PutPayload::from(body),
            )
            .await;
        if let Err(e) = put {
            tracing::warn!(error = %e, version, "metadata checkpoint failed");
            return;
        }
        let result = if self.options.retention.is_some() {
            // One pass at a time per process; the next checkpoint starts another.
            if self.trimming.swap(true, Ordering::SeqCst) {
                return;
            }
            let result = self.trim().await.map(|_| ());
            self.trimming.store(false, Ordering::SeqCst);
            result
        } else {
            self.keep_two_checkpoints().await
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, version, "metadata log trim failed");
        }
    }

    /// Without trimming: keeps the two newest checkpoints (a process opening right now
    /// may be reading the older) and deletes the rest.
    async fn keep_two_checkpoints(&self) -> Result<()> {
        let mut old: Vec<Path> = self
            .store
            .list(Some(&self.checkpoint_dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(os_err)?;
        old.sort();
        old.truncate(old.len().saturating_sub(2));
        self.delete_all(old).await.map(|_| ())
    }

    /// Deletes `paths`, a missing one counting as deleted; returns how many went.
    async fn delete_all(&self, paths: Vec<Path>) -> Result<usize> {
        let n = paths.len();
        let mut results = self
            .store
            .delete_stream(stream::iter(paths.into_iter().map(Ok)).boxed());
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(os_err(e)),
            }
        }
        Ok(n)
    }

    /// One trim pass; see [`LogKv::trim`].
    async fn trim(&self) -> Result<TrimReport> {
        let Some(retention) = self.options.retention else {
            return Ok(TrimReport::default());
        };
        // A process counts its lease on its own clock, the trimmer ages checkpoints on
        // the bucket's: three leases leave room for clocks running at different rates.
        let retention = retention.max(self.options.lease.saturating_mul(3));
        let checkpoints: Vec<ObjectMeta> = self
            .store
            .list(Some(&self.checkpoint_dir))
            .try_collect()
            .await
            .map_err(os_err)?;
        // The bucket's "now": the newest checkpoint was written moments ago (by this
        // process, right before the pass, when a checkpoint starts it).
        let now = checkpoints.iter().map(|m| m.last_modified).max();
        let target = checkpoints
            .iter()
            .filter(|m| {
                now.and_then(|now| now.signed_duration_since(m.last_modified).to_std().ok())
                    .is_some_and(|age| age >= retention)
            })
            .filter_map(|m| version_of(&m.location))
            .max();
        let watermark = self.raise_watermark(target).await?;
        if watermark == 0 {
            return Ok(TrimReport::default());
        }
        let mut report = TrimReport {
            watermark,
            ..TrimReport::default()
        };
        // Entries are listed oldest first on S3, Azure and GCS, so the pass stops early;
        // a store listing in another order only costs a longer listing.
        let doomed: Vec<Path> = self
            .store
            .list(Some(&self.log_dir))
            .try_filter(|m| {
                let below = version_of(&m.location).is_some_and(|v| v <= watermark);
                futures::future::ready(below)
            })
            .map_ok(|m| m.location)
            .take(self.options.trim_batch)
            .try_collect()
            .await
            .map_err(os_err)?;
        report.entries_deleted = self.delete_all(doomed).await?;
        // Checkpoints below the watermark: every process behind it loads a newer one.
        let old: Vec<Path> = checkpoints
            .into_iter()
            .filter(|m| version_of(&m.location).is_some_and(|v| v < watermark))
            .map(|m| m.location)
            .collect();
        report.checkpoints_deleted = self.delete_all(old).await?;
        tracing::debug!(
            watermark,
            entries = report.entries_deleted,
            checkpoints = report.checkpoints_deleted,
            "metadata log trimmed"
        );
        Ok(report)
    }

    /// Raises the trim watermark to `target` (never lowers it: a conditional update, so
    /// two trimmers cannot move it backwards); returns the watermark after.
    async fn raise_watermark(&self, target: Option<u64>) -> Result<u64> {
        for _ in 0..10 {
            let (current, version) = self.watermark().await?;
            let Some(target) = target.filter(|t| *t > current) else {
                return Ok(current);
            };
            let mode = match version {
                Some(v) => PutMode::Update(v),
                None => PutMode::Create,
            };
            let put = self
                .store
                .put_opts(
                    &self.watermark,
                    PutPayload::from(format!("{target}\n")),
                    PutOptions::from(mode),
                )
                .await;
            match put {
                Ok(_) => return Ok(target),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => continue,
                Err(e) => return Err(os_err(e)),
            }
        }
        Err(Error::storage(
            "the metadata trim watermark kept changing while raising it",
        ))
    }
}

impl KvEngine for LogKv {
    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.inner.refresh().await?;
        f(&*self.inner.read_state())
    }

    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        F: Fn(&mut dyn KvWrite) -> Result<R> + Send + Sync + 'static,
        R: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Pending {
                run: Box::new(move |t| f(t).map(|r| Box::new(r) as Answer)),
                reply,
            });
        {
            let committing = self.inner.committer.clone().lock_owned().await;
            let batch =
                std::mem::take(&mut *self.inner.queue.lock().unwrap_or_else(|p| p.into_inner()));
            if !batch.is_empty() {
                // Spawned, so that a caller going away (a cancelled request) never stops
                // a batch halfway, leaving other callers without an answer.
                let inner = self.inner.clone();
                let task = tokio::spawn(async move {
                    inner.commit(batch).await;
                    drop(committing);
                });
                let _ = task.await;
            }
            // Else an earlier batch took this transaction and has answered it.
        }
        let result = answer
            .await
            .map_err(|_| Error::storage("metadata commit task failed"))??;
        Ok(*result
            .downcast::<R>()
            .expect("a transaction's own result type"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let ops: Vec<Op> = vec![
            (Table::Blobs, b"a".to_vec(), Some(b"1".to_vec())),
            (Table::Tags, b"r\0t".to_vec(), None),
            (Table::BlobCandidates, Vec::new(), Some(Vec::new())),
        ];
        let bytes = encode(7, ops.iter().map(|(t, k, v)| (*t, k, v.as_ref())));
        assert_eq!(decode(bytes.clone()).unwrap(), (7, ops));
        for cut in 0..bytes.len() - 1 {
            // Every truncation is either rejected or a shorter valid prefix of changes.
            if let Ok((v, _)) = decode(bytes.slice(..cut)) {
                assert_eq!(v, 7);
            }
        }
        assert!(decode(Bytes::from_static(b"\x02")).is_err());
    }

    /// A process behind a trim, whose create of a trimmed entry succeeded, leaves that
    /// entry in the bucket (a stray). Another process behind the trim finds it, and must
    /// neither apply it nor take the missing entry after it for the end of the log: it
    /// reloads from the checkpoint and sees every committed write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stray_entry_below_the_watermark_is_never_applied() {
        use object_store::memory::InMemory;
        let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let root = Path::from("meta");
        let options = LogOptions {
            checkpoint_interval: 8,
            replay_concurrency: 4,
            // No lease: every answer is checked against the watermark.
            lease: Duration::ZERO,
            retention: Some(Duration::ZERO),
            trim_batch: 100,
            clock: Clock::default(),
        };
        let open = || LogKv::open(bucket.clone(), &root, options.clone());
        let writer = open().await.expect("open");
        let behind = open().await.expect("open");
        let put = |i: u8| writer.write(move |t| t.put(Table::Tags, &[i], b"committed"));
        for i in 1..=8 {
            put(i).await.expect("write");
        }
        let checkpoint = numbered(&root.clone().join("checkpoint"), 8);
        for _ in 0..2000 {
            if bucket.head(&checkpoint).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = writer.trim().await.expect("trim");
        assert_eq!(report.watermark, 8);
        for i in 9..=10 {
            put(i).await.expect("write");
        }
        let log: Vec<u64> = bucket
            .list(Some(&root.clone().join("log")))
            .map_ok(|m| version_of(&m.location).expect("numbered"))
            .try_collect()
            .await
            .expect("list");
        assert!(log.iter().all(|v| *v > 8), "{log:?}");

        let stray = encode(1, [(Table::Tags, [99u8], Some(b"stray"))]);
        bucket
            .put(&numbered(&root.clone().join("log"), 1), stray.into())
            .await
            .expect("put a stray entry");
        let keys = behind
            .read(|r| r.scan(Table::Tags, &[], None, 100))
            .await
            .expect("read");
        let keys: Vec<u8> = keys.into_iter().map(|(k, _)| k[0]).collect();
        assert_eq!(keys, (1..=10).collect::<Vec<u8>>());
        assert_eq!(behind.version(), 10);
    }

    /// A bucket whose creates of log entries, once armed, take an hour by the test's
    /// clock: a process stalled between its check and its PUT.
    #[derive(Debug)]
    struct Stalling {
        inner: Arc<dyn ObjectStore>,
        offset: Arc<Mutex<Duration>>,
        armed: AtomicBool,
    }

    impl std::fmt::Display for Stalling {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Stalling({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Stalling {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let entry = location.as_ref().starts_with("meta/log/");
            if entry && matches!(opts.mode, PutMode::Create) && self.armed.load(Ordering::SeqCst) {
                *self.offset.lock().unwrap() += Duration::from_secs(3600);
            }
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A process whose lease held when it committed, but whose create of a trimmed
    /// entry returned after the lease had run out (it stalled past a trim): the create
    /// succeeded in deleted history, and the write must not be acknowledged (a fork
    /// that would lose it). It is reported failed, applied nowhere, and a retry lands
    /// after the newest entry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_overtaken_by_a_trim_is_not_acknowledged() {
        use object_store::memory::InMemory;
        let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let offset = Arc::new(Mutex::new(Duration::ZERO));
        let stalling = Arc::new(Stalling {
            inner: memory.clone(),
            offset: offset.clone(),
            armed: AtomicBool::new(false),
        });
        let base = Instant::now();
        let clock = Clock::new(move || base + *offset.lock().unwrap());
        let root = Path::from("meta");
        let trimming = LogOptions {
            checkpoint_interval: 8,
            replay_concurrency: 4,
            lease: Duration::ZERO,
            retention: Some(Duration::ZERO),
            trim_batch: 100,
            clock: Clock::default(),
        };
        let trimmer = LogKv::open(memory.clone(), &root, trimming.clone())
            .await
            .expect("open");
        let stalled_options = LogOptions {
            lease: Duration::from_secs(60),
            retention: None,
            clock,
            ..trimming
        };
        let stalled = LogKv::open(stalling.clone(), &root, stalled_options)
            .await
            .expect("open");
        for i in 1..=8u8 {
            trimmer
                .write(move |t| t.put(Table::Tags, &[i], b"committed"))
                .await
                .expect("write");
        }
        let checkpoint = numbered(&root.clone().join("checkpoint"), 8);
        for _ in 0..2000 {
            if memory.head(&checkpoint).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(trimmer.trim().await.expect("trim").watermark, 8);

        stalling.armed.store(true, Ordering::SeqCst);
        let put = || stalled.write(|t| t.put(Table::Tags, &[50], b"stalled"));
        assert!(
            put().await.is_err(),
            "a commit into trimmed history was acknowledged"
        );
        stalling.armed.store(false, Ordering::SeqCst);
        async fn scan(kv: &LogKv) -> Result<Vec<u8>> {
            kv.read(|r| {
                let all = r.scan(Table::Tags, &[], None, 100)?;
                Ok(all.into_iter().map(|(k, _)| k[0]).collect::<Vec<u8>>())
            })
            .await
        }
        let committed: Vec<u8> = (1..=8).collect();
        assert_eq!(scan(&stalled).await.expect("read"), committed);
        assert_eq!(scan(&trimmer).await.expect("read"), committed);

        put().await.expect("the retry");
        let mut with_retry = committed;
        with_retry.push(50);
        assert_eq!(scan(&trimmer).await.expect("read"), with_retry);
        assert_eq!((trimmer.version(), stalled.version()), (9, 9));
    }
}
