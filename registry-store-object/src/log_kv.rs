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
//! checkpoint and the entries after it. Checkpoints are written every
//! `checkpoint_interval` versions by the process that committed that version.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::oneshot;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
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

/// The transaction-log engine.
#[derive(Debug)]
pub struct LogKv {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    log_dir: Path,
    checkpoint_dir: Path,
    checkpoint_interval: u64,
    state: RwLock<State>,
    /// Transactions submitted and not yet taken into a batch.
    queue: Mutex<Vec<Pending>>,
    /// Held while a batch commits: the transactions queued meanwhile form the next
    /// batch (group commit), so concurrent writers of one process share log entries
    /// instead of racing each other for them.
    committer: Arc<tokio::sync::Mutex<()>>,
    /// Refreshes from the bucket, one at a time; see [`Inner::refresh`].
    refresh: tokio::sync::Mutex<u64>,
    refreshes_started: AtomicU64,
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
    /// Opens the log under `root` (`root/log/`, `root/checkpoint/`): loads the newest
    /// checkpoint and the entries after it.
    pub(crate) async fn open(
        store: Arc<dyn ObjectStore>,
        root: &Path,
        checkpoint_interval: u64,
    ) -> Result<LogKv> {
        let inner = Inner {
            store,
            log_dir: root.clone().join("log"),
            checkpoint_dir: root.clone().join("checkpoint"),
            checkpoint_interval: checkpoint_interval.max(1),
            state: RwLock::default(),
            queue: Mutex::default(),
            committer: Arc::default(),
            refresh: tokio::sync::Mutex::new(0),
            refreshes_started: AtomicU64::new(0),
        };
        let checkpoints: Vec<_> = inner
            .store
            .list(Some(&inner.checkpoint_dir))
            .try_collect()
            .await
            .map_err(os_err)?;
        if let Some(newest) = checkpoints.iter().map(|m| &m.location).max() {
            let bytes = inner
                .store
                .get(newest)
                .await
                .map_err(os_err)?
                .bytes()
                .await
                .map_err(os_err)?;
            let (version, ops) = decode(bytes)?;
            let mut state = inner.write_state();
            state.apply(ops);
            state.version = version;
        }
        inner.catch_up().await?;
        Ok(LogKv {
            inner: Arc::new(inner),
        })
    }

    /// The version of the newest log entry this process has applied.
    pub fn version(&self) -> u64 {
        self.inner.read_state().version
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

    /// Applies entries after the local version until the next one does not exist.
    async fn catch_up(&self) -> Result<()> {
        loop {
            let next = self.read_state().version + 1;
            match self.entry(next).await? {
                Some(ops) => self.apply(next, ops),
                None => return Ok(()),
            }
        }
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
            let outcome = if ops.is_empty() {
                // Nothing to write: the answers stand if nothing was committed after
                // the state they read.
                match self.entry(version).await {
                    Ok(None) => Ok(true),
                    Ok(Some(ops)) => {
                        self.apply(version, ops);
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            } else {
                let entry = encode(version, ops.iter().map(|(t, k, v)| (*t, k, v.as_ref())));
                let put = self
                    .store
                    .put_opts(
                        &numbered(&self.log_dir, version),
                        PutPayload::from(entry),
                        PutOptions::from(PutMode::Create),
                    )
                    .await;
                match put {
                    Ok(_) => {
                        self.apply(version, ops);
                        if version % self.checkpoint_interval == 0 {
                            // Off the request path: a checkpoint can be large.
                            tokio::spawn(self.clone().write_checkpoint(version));
                        }
                        Ok(true)
                    }
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
        let result = async {
            let store = &self.store;
            store
                .put(
                    &numbered(&self.checkpoint_dir, version),
                    PutPayload::from(body),
                )
                .await?;
            // Keep the two newest: a process opening right now may be reading the older.
            let mut old: Vec<Path> = store
                .list(Some(&self.checkpoint_dir))
                .map_ok(|m| m.location)
                .try_collect()
                .await?;
            old.sort();
            old.truncate(old.len().saturating_sub(2));
            for p in old {
                match store.delete(&p).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, version, "metadata checkpoint failed");
        }
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
}
