//! [`KvEngine`] over a redb database: one redb table per metadata table, one write
//! transaction (durable on commit) per registry operation.

use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use registry_core::kv::{
    KvEngine, KvPair, KvRead, KvWrite, Table, TableSet, TableVersions, outbox,
};
use registry_core::store::storage_error;
use registry_core::{CommitLog, Error, Result};

use crate::blobs::Skeleton;
use crate::new_database;

fn def(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

/// The metadata engine of the fs store.
///
/// Group commit: each write transaction commits without an fsync
/// (`Durability::None`), then waits until a durable commit that came after it has
/// finished. One waiter at a time makes that durable commit (an empty transaction with
/// `Durability::Immediate`, which persists every commit before it); the others wait for
/// it, or for the next one when theirs committed after it began. So concurrent writers
/// share one fsync, and none returns before its change is durable. The durable commit
/// covers every transaction committed before it took redb's writer lock, and waits up
/// to half a millisecond for write transactions already under way, so that it covers them too.
#[derive(Debug, Clone)]
pub struct RedbKv {
    db: Arc<Database>,
    group: Arc<GroupCommit>,
    /// In an [`FsStore`](crate::FsStore): its directories, made durable before any
    /// write is acknowledged (the redb file's own name is among them).
    skeleton: Option<Arc<Skeleton>>,
    /// Counted after each commit (`KvEngine::key_version`): this process holds the
    /// file locked, so every write to it passes here.
    versions: Arc<TableVersions>,
    /// Commits are durable in order: one durable commit covers every earlier one.
    log: CommitLog,
}

/// The state of group commit, shared by the writers of one database.
#[derive(Debug, Default)]
struct GroupCommit {
    state: Mutex<GroupState>,
    flushed: Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    /// Sequence number of the newest write transaction (taken while it holds redb's
    /// single writer lock, so in commit order).
    committed: u64,
    /// Every transaction up to this number is durable.
    durable: u64,
    /// A writer is making a durable commit right now.
    flushing: bool,
    /// Write transactions begun (or waiting for redb's writer lock) and not yet
    /// committed or aborted: a durable commit about to start waits a little for them.
    writing: u32,
    /// Durable commits made (for tests: which writes shared one).
    flushes: u64,
}

/// How long a durable commit waits at most for write transactions under way to commit
/// first, so that one fsync covers them too. Without it the writer that just committed
/// takes redb's writer lock straight back for its durable commit, before the writers
/// queued behind it get it, and concurrent writers end up with one fsync each. Only
/// taken when another transaction is under way: a lone writer never waits.
const GATHER: Duration = Duration::from_micros(500);

/// A write transaction under way (see [`GroupCommit::begin`]).
struct Writing<'a>(&'a GroupCommit);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.lock().writing -= 1;
        self.0.flushed.notify_all();
    }
}

impl GroupCommit {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        // The state is a few counters, consistent after any panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write transaction is about to begin; it counts as under way until the guard
    /// is dropped (committed, with its number from [`next_seq`](Self::next_seq), or not;
    /// also if it panics).
    fn begin(&self) -> Writing<'_> {
        self.lock().writing += 1;
        Writing(self)
    }

    /// The sequence number of the write transaction about to commit; call it while
    /// holding that transaction.
    fn next_seq(&self) -> u64 {
        let mut state = self.lock();
        state.committed += 1;
        state.committed
    }

    /// Returns once transaction `seq` (already committed) is durable.
    fn wait_durable(&self, db: &Database, seq: u64) -> Result<()> {
        let mut state = self.lock();
        loop {
            if state.durable >= seq {
                return Ok(());
            }
            if state.flushing {
                state = self.flushed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.flushing = true;
            let deadline = Instant::now() + GATHER;
            while state.writing > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .flushed
                    .wait_timeout(state, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            drop(state);
            let flushed = (|| -> Result<u64> {
                let mut txn = db.begin_write().map_err(storage_error)?;
                // Read once this transaction holds redb's writer lock: every number
                // taken so far belongs to a transaction that has committed by now (each
                // takes its number while holding that lock), so the durable commit below
                // covers them all, including those that committed while this one waited
                // for the lock. (Reading it before `begin_write` left those to the next
                // durable commit: one fsync per writer instead of one per group.)
                let target = self.lock().committed;
                txn.set_durability(Durability::Immediate)
                    .map_err(storage_error)?;
                txn.commit().map_err(storage_error)?;
                Ok(target)
            })();
            state = self.lock();
            state.flushing = false;
            if let Ok(target) = flushed {
                state.durable = state.durable.max(target);
                state.flushes += 1;
            }
            self.flushed.notify_all();
            // On failure this writer reports it (its change is not acknowledged); the
            // others retry the durable commit themselves.
            flushed?;
        }
    }
}

impl RedbKv {
    /// Opens (or creates) the database at `path` and makes sure every table exists.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, None)
    }

    pub(crate) fn open_with(path: &Path, skeleton: Option<Arc<Skeleton>>) -> Result<Self> {
        let db = match &skeleton {
            // A new store's: unnamed until the skeleton publishes it (src/new_database.rs).
            Some(skeleton) if !path.try_exists().map_err(storage_error)? => {
                match new_database::create_unnamed(path).map_err(storage_error)? {
                    Some((db, unnamed)) => {
                        skeleton.publish_first(unnamed);
                        db
                    }
                    None => Database::create(path).map_err(storage_error)?,
                }
            }
            _ => Database::create(path).map_err(storage_error)?,
        };
        let missing = {
            let txn = db.begin_read().map_err(storage_error)?;
            let mut missing = false;
            for table in Table::ALL {
                match txn.open_table(def(table)) {
                    Ok(_) => {}
                    Err(redb::TableError::TableDoesNotExist(_)) => missing = true,
                    Err(e) => return Err(storage_error(e)),
                }
            }
            missing
        };
        if missing {
            // Not fsynced: empty tables hold nothing acknowledged. Should a crash undo
            // this commit, the next open creates them again; the first durable commit
            // (group commit, below) persists them with the first write.
            let mut txn = db.begin_write().map_err(storage_error)?;
            txn.set_durability(Durability::None)
                .map_err(storage_error)?;
            for table in Table::ALL {
                txn.open_table(def(table)).map_err(storage_error)?;
            }
            txn.commit().map_err(storage_error)?;
        }
        Ok(RedbKv {
            db: Arc::new(db),
            group: Arc::default(),
            skeleton,
            versions: Arc::default(),
            log: CommitLog::new(),
        })
    }
}

fn scan_table<T: ReadableTable<&'static [u8], &'static [u8]>, O>(
    t: &T,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
    out_of: impl Fn(&[u8], &[u8]) -> O,
) -> Result<Vec<O>> {
    let mut out = Vec::new();
    visit_table(t, prefix, after, limit, |k, v| {
        out.push(out_of(k, v));
        Ok(())
    })?;
    Ok(out)
}

/// Calls `each` on the entries [`KvRead::scan`] selects, borrowed from redb's pages.
fn visit_table<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let lower = match after {
        Some(a) if a >= prefix => Bound::Excluded(a),
        _ => Bound::Included(prefix),
    };
    for entry in t
        .range::<&[u8]>((lower, Bound::Unbounded))
        .map_err(storage_error)?
        .take(limit)
    {
        let (k, v) = entry.map_err(storage_error)?;
        if !k.value().starts_with(prefix) {
            break;
        }
        each(k.value(), v.value())?;
    }
    Ok(())
}

struct Read(redb::ReadTransaction);

/// A write transaction and the tables it changed.
struct Write<'a>(&'a redb::WriteTransaction, TableSet);

/// Reads are the same in both kinds of transaction; only the table types differ.
macro_rules! kv_read {
    ($txn:ty) => {
        impl KvRead for $txn {
            fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
                let t = self.0.open_table(def(table)).map_err(storage_error)?;
                Ok(t.get(key)
                    .map_err(storage_error)?
                    .map(|v| v.value().to_vec()))
            }
            fn scan(
                &self,
                table: Table,
                prefix: &[u8],
                after: Option<&[u8]>,
                limit: usize,
            ) -> Result<Vec<KvPair>> {
                let t = self.0.open_table(def(table)).map_err(storage_error)?;
                scan_table(&t, prefix, after, limit, |k, v| (k.to_vec(), v.to_vec()))
            }
            fn for_each_key(
                &self,
                table: Table,
                prefix: &[u8],
                after: Option<&[u8]>,
                limit: usize,
                each: &mut dyn FnMut(&[u8]) -> Result<()>,
            ) -> Result<()> {
                let t = self.0.open_table(def(table)).map_err(storage_error)?;
                visit_table(&t, prefix, after, limit, |k, _| each(k))
            }
            fn count(&self, table: Table) -> Result<u64> {
                let t = self.0.open_table(def(table)).map_err(storage_error)?;
                t.len().map_err(storage_error)
            }
            fn outbox_head(&self) -> Result<u64> {
                let t = self
                    .0
                    .open_table(def(Table::Outbox))
                    .map_err(storage_error)?;
                match t.last().map_err(storage_error)? {
                    Some((k, _)) => outbox::key_number(k.value()),
                    None => outbox::head_of_empty(self),
                }
            }
        }
    };
}

kv_read!(Read);
kv_read!(Write<'_>);

impl KvWrite for Write<'_> {
    /// The next number after the outbox's last entry (write transactions are serial):
    /// no counter to read and write in a second table on every event, which measurably
    /// slowed manifest pushes (the counter is still honoured when the table is empty).
    fn append_event(&mut self, value: &[u8]) -> Result<()> {
        let next = {
            let mut t = self
                .0
                .open_table(def(Table::Outbox))
                .map_err(storage_error)?;
            let last = match t.last().map_err(storage_error)? {
                Some((k, _)) => Some(outbox::key_number(k.value())?),
                None => None,
            };
            if let Some(last) = last {
                let key = outbox::seq_key(last + 1);
                t.insert(&key[..], value).map_err(storage_error)?;
                self.1.insert_key(Table::Outbox, &key);
                return Ok(());
            }
            drop(t);
            outbox::head_of_empty(self)? + 1
        };
        let mut t = self
            .0
            .open_table(def(Table::Outbox))
            .map_err(storage_error)?;
        let key = outbox::seq_key(next);
        t.insert(&key[..], value).map_err(storage_error)?;
        self.1.insert_key(Table::Outbox, &key);
        Ok(())
    }
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        let mut t = self.0.open_table(def(table)).map_err(storage_error)?;
        t.insert(key, value).map_err(storage_error)?;
        self.1.insert_key(table, key);
        Ok(())
    }
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<bool> {
        let mut t = self.0.open_table(def(table)).map_err(storage_error)?;
        let existed = t.remove(key).map_err(storage_error)?.is_some();
        if existed {
            self.1.insert_key(table, key);
        }
        Ok(existed)
    }
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> Result<R> + Send + 'static) -> Result<R> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::storage(format!("metadata task failed: {e}")))?
}

impl KvEngine for RedbKv {
    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(storage_error)?;
            f(&Read(txn))
        })
        .await
    }

    /// In place, on the caller's thread: a lookup reads one B-tree path, a few pages
    /// from redb's cache or the OS page cache, which costs microseconds, less than the
    /// two thread wake-ups of a hop to the blocking pool (measured: HEAD of a manifest
    /// needed half the server CPU). The price is that a lookup whose pages are on disk
    /// only holds a runtime worker for those few reads; scans, which can be long, and
    /// writes, which wait for fsync, still run on the blocking pool.
    async fn lookup<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let txn = self.db.begin_read().map_err(storage_error)?;
        f(&Read(txn))
    }

    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut dyn KvWrite) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let kv = self.clone();
        blocking(move || {
            kv.commit(
                |txn| {
                    let mut w = Write(txn, TableSet::default());
                    f(&mut w).map(|r| (r, w.1))
                },
                true,
            )
        })
        .await
    }

    fn key_version(&self, table: Table, key: &[u8]) -> Option<u64> {
        Some(self.versions.get(table, key))
    }

    /// Shared with the fs store's inline blobs (`InlineBlobs`).
    fn commit_log(&self) -> Option<CommitLog> {
        Some(self.log)
    }
}

impl RedbKv {
    /// Runs `f` in a write transaction, commits it and returns once the change is
    /// durable (group commit, see the type's docs). Nothing is committed if `f` fails.
    /// Blocks: call it from the blocking pool. Also used for the fs store's inline
    /// blobs, which share the database and its fsyncs.
    pub(crate) fn write_durable<R>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<R>,
    ) -> Result<R> {
        self.commit(|txn| f(txn).map(|r| (r, TableSet::default())), true)
    }

    /// [`write_durable`](Self::write_durable) without the wait: the change is durable
    /// once a later durable commit of this database is ([`CommitLog`]). Blocks only
    /// for redb's writer lock.
    pub(crate) fn write_before_link<R>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<R>,
    ) -> Result<R> {
        self.commit(|txn| f(txn).map(|r| (r, TableSet::default())), false)
    }

    /// The log of this database's commits.
    pub(crate) fn commit_log(&self) -> CommitLog {
        self.log
    }

    /// Durable commits made, transactions committed, and the last durable one.
    #[cfg(test)]
    pub(crate) fn group_state(&self) -> (u64, u64, u64) {
        let state = self.group.lock();
        (state.flushes, state.committed, state.durable)
    }

    /// Commits `f`'s change, and with `durable` returns once it is durable. `f` names
    /// the metadata tables it changed beside its result: their versions move once the
    /// commit is visible, whether or not the fsync after it succeeds (and on the
    /// blocking thread, so also when the caller stopped waiting).
    fn commit<R>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(R, TableSet)>,
        durable: bool,
    ) -> Result<R> {
        if let Some(s) = &self.skeleton {
            s.ensure_durable().map_err(storage_error)?;
        }
        let writing = self.group.begin();
        let committed = (|| {
            let mut txn = self.db.begin_write().map_err(storage_error)?;
            match f(&txn) {
                Ok((r, changed)) => {
                    // Not fsynced here: `wait_durable` shares one fsync among the
                    // writers that committed meanwhile, and returns only once it is
                    // done.
                    txn.set_durability(Durability::None)
                        .map_err(storage_error)?;
                    let seq = self.group.next_seq();
                    txn.commit().map_err(storage_error)?;
                    self.versions.bump(changed);
                    Ok((r, seq))
                }
                Err(e) => {
                    txn.abort().map_err(storage_error)?;
                    Err(e)
                }
            }
        })();
        drop(writing);
        let (r, seq) = committed?;
        if durable {
            self.group.wait_durable(&self.db, seq)?;
        }
        Ok(r)
    }

    /// The database, for reads outside the metadata tables (the inline blobs).
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many writers at once share durable commits: every one of them returns, each
    /// sees its own write, and every acknowledged write is there after a reopen (a
    /// commit left non-durable would be gone: redb reopens at its last durable commit).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_are_all_durable_when_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let kv = RedbKv::open(&path).unwrap();
        let writers: Vec<_> = (0..64u32)
            .map(|i| {
                let kv = kv.clone();
                tokio::spawn(async move {
                    kv.write(move |t| t.put(Table::Tags, &i.to_be_bytes(), b"v"))
                        .await
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        let (committed, durable) = {
            let state = kv.group.lock();
            (state.committed, state.durable)
        };
        assert_eq!((committed, durable), (64, 64));
        drop(kv);
        let kv = RedbKv::open(&path).unwrap();
        let n = kv.read(|t| t.count(Table::Tags)).await.unwrap();
        assert_eq!(n, 64);
    }

    /// A new store's database has no name until its first write (or the store's
    /// durability task) publishes it, and then holds everything acknowledged; one
    /// dropped before that leaves nothing behind, and the next open starts afresh; one
    /// whose name another process took meanwhile refuses every write, and the other
    /// database is untouched.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_databases_are_named_before_the_first_write_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        for fan in ["blobs/sha256", "blobs/sha512"] {
            std::fs::create_dir_all(dir.path().join(fan)).unwrap();
        }
        let open_new = || {
            let skeleton = Arc::new(Skeleton::new(dir.path()));
            RedbKv::open_with(&path, Some(skeleton)).unwrap()
        };
        let put = |i: u8| move |t: &mut dyn KvWrite| t.put(Table::Tags, &[i], b"v");

        let kv = open_new();
        assert!(!path.exists(), "named before anything was written");
        drop(kv);
        assert!(!path.exists(), "an unpublished database left a file");

        let kv = open_new();
        kv.write(put(1)).await.unwrap();
        assert!(path.exists());
        kv.write(put(2)).await.unwrap();
        drop(kv);
        let kv = RedbKv::open(&path).unwrap();
        assert_eq!(kv.read(|t| t.count(Table::Tags)).await.unwrap(), 2);
        drop(kv);

        std::fs::remove_file(&path).unwrap();
        let late = open_new();
        let first = RedbKv::open(&path).unwrap();
        first.write(put(7)).await.unwrap();
        let refused = late.write(put(8)).await.unwrap_err().to_string();
        assert!(refused.contains("created by another process"), "{refused}");
        drop((late, first));
        let kv = RedbKv::open(&path).unwrap();
        let keys = kv
            .read(|t| t.scan(Table::Tags, b"", None, 10))
            .await
            .unwrap();
        assert_eq!(keys, [(vec![7], b"v".to_vec())]);
    }

    /// Tag listings over a redb file are kept until a committed write changes a tag,
    /// also one whose caller stopped waiting before the commit: its version moves on
    /// the thread that commits. Writes to other tables, and a write that fails, keep
    /// the listing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kept_tag_listings_follow_commits_also_abandoned_ones() {
        use futures::FutureExt;
        use registry_core::kv::KvMetadata;
        use registry_core::names::{RepoName, Tag};
        use registry_core::store::MetadataStore;

        let dir = tempfile::tempdir().unwrap();
        let meta = KvMetadata::new(RedbKv::open(&dir.path().join("meta.redb")).unwrap());
        let repo = RepoName::parse("kept/x").unwrap();
        fn put_tag(name: &str) -> impl Fn(&mut dyn KvWrite) -> Result<()> + Send + Sync + 'static {
            let key = [b"kept/x\0".as_slice(), name.as_bytes()].concat();
            move |t| t.put(Table::Tags, &key, b"")
        }
        let names = || async {
            let tags = meta.list_tag_names(&repo, None, 100).await.unwrap();
            tags.iter().map(Tag::to_string).collect::<Vec<_>>()
        };
        meta.engine().write(put_tag("a")).await.unwrap();
        assert_eq!(names().await, ["a"]);
        assert_eq!(names().await, ["a"]);
        assert_eq!(meta.tag_listings_reused(), 1);
        meta.engine()
            .write(|t| t.put(Table::Repos, b"kept/x", b"{}"))
            .await
            .unwrap();
        let failed = meta
            .engine()
            .write({
                let put = put_tag("z");
                move |t| {
                    put(t)?;
                    Err::<(), _>(Error::storage("refused"))
                }
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(names().await, ["a"]);
        assert_eq!(meta.tag_listings_reused(), 2);

        // Polled once (the commit starts on the blocking pool), then dropped.
        let before = meta.engine().key_version(Table::Tags, b"kept/x").unwrap();
        assert!(meta.engine().write(put_tag("b")).now_or_never().is_none());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while meta.engine().key_version(Table::Tags, b"kept/x") == Some(before) {
            assert!(
                std::time::Instant::now() < deadline,
                "the abandoned commit never counted"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(names().await, ["a", "b"]);
        assert_eq!(meta.tag_listings_reused(), 2);
    }
}
