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

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use registry_core::kv::{KvEngine, KvPair, KvRead, KvWrite, Table};
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

fn scan_map<'a>(
    map: &'a BTreeMap<Vec<u8>, Vec<u8>>,
    prefix: &'a [u8],
    after: Option<&[u8]>,
) -> impl Iterator<Item = (&'a Vec<u8>, &'a Vec<u8>)> + 'a {
    map.range((lower_bound(prefix, after), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

fn lower_bound(prefix: &[u8], after: Option<&[u8]>) -> Bound<Vec<u8>> {
    match after {
        Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
        _ => Bound::Included(prefix.to_vec()),
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
        Ok(scan_map(&self.tables[table.index()], prefix, after)
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
        let mut base = scan_map(&self.base.tables[table.index()], prefix, after).peekable();
        let writes = &self.writes[table.index()];
        let mut own = writes
            .range((lower_bound(prefix, after), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .peekable();
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

/// The transaction-log engine. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct LogKv {
    store: Arc<dyn ObjectStore>,
    log_dir: Path,
    checkpoint_dir: Path,
    checkpoint_interval: u64,
    state: Arc<RwLock<State>>,
    /// One committing writer per process: writers in one process would only race each
    /// other for the same log entry.
    writer: tokio::sync::Mutex<()>,
    /// Refreshes from the bucket, one at a time; see [`LogKv::refresh`].
    refresh: tokio::sync::Mutex<u64>,
    refreshes_started: AtomicU64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("version", &self.version)
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
        let kv = LogKv {
            store,
            log_dir: root.clone().join("log"),
            checkpoint_dir: root.clone().join("checkpoint"),
            checkpoint_interval: checkpoint_interval.max(1),
            state: Arc::default(),
            writer: tokio::sync::Mutex::new(()),
            refresh: tokio::sync::Mutex::new(0),
            refreshes_started: AtomicU64::new(0),
        };
        let checkpoints: Vec<_> = kv
            .store
            .list(Some(&kv.checkpoint_dir))
            .try_collect()
            .await
            .map_err(os_err)?;
        if let Some(newest) = checkpoints.iter().map(|m| &m.location).max() {
            let bytes = kv
                .store
                .get(newest)
                .await
                .map_err(os_err)?
                .bytes()
                .await
                .map_err(os_err)?;
            let (version, ops) = decode(bytes)?;
            let mut state = kv.write_state();
            state.apply(ops);
            state.version = version;
        }
        kv.catch_up().await?;
        Ok(kv)
    }

    /// The version of the newest log entry this process has applied.
    pub fn version(&self) -> u64 {
        self.read_state().version
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        // A panic inside a transaction closure never leaves the state half-changed:
        // transactions change it only in `State::apply`, which does not panic.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies entries after the local version until the next one does not exist.
    async fn catch_up(&self) -> Result<()> {
        loop {
            let next = self.version() + 1;
            let bytes = match self.store.get(&numbered(&self.log_dir, next)).await {
                Ok(r) => r.bytes().await.map_err(os_err)?,
                Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(os_err(e)),
            };
            let (version, ops) = decode(bytes)?;
            if version != next {
                return Err(Error::storage(format!(
                    "metadata log entry {next} claims version {version}"
                )));
            }
            let mut state = self.write_state();
            // A writer of this process may have applied its own entry meanwhile.
            if state.version + 1 == next {
                state.apply(ops);
                state.version = next;
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

    async fn write_checkpoint(
        store: Arc<dyn ObjectStore>,
        dir: Path,
        state: Arc<RwLock<State>>,
        version: u64,
    ) -> Result<()> {
        let body = {
            let state = state.read().unwrap_or_else(|p| p.into_inner());
            if state.version != version {
                // Moved on already; the next interval writes one.
                return Ok(());
            }
            let ops = state
                .tables
                .iter()
                .enumerate()
                .flat_map(|(i, map)| map.iter().map(move |(k, v)| (Table::ALL[i], k, Some(v))));
            encode(version, ops)
        };
        store
            .put(&numbered(&dir, version), PutPayload::from(body))
            .await
            .map_err(os_err)?;
        // Keep the two newest: a process opening right now may be reading the older.
        let mut old: Vec<Path> = store
            .list(Some(&dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(os_err)?;
        old.sort();
        old.truncate(old.len().saturating_sub(2));
        for p in old {
            match store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(os_err(e)),
            }
        }
        Ok(())
    }
}

impl KvEngine for LogKv {
    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.refresh().await?;
        f(&*self.read_state())
    }

    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        F: Fn(&mut dyn KvWrite) -> Result<R> + Send + Sync + 'static,
        R: Send + 'static,
    {
        let _writer = self.writer.lock().await;
        self.refresh().await?;
        loop {
            let (result, version, ops) = {
                let state = self.read_state();
                let mut txn = Txn {
                    base: &state,
                    writes: Default::default(),
                };
                let result = f(&mut txn)?;
                (result, state.version + 1, txn.into_ops())
            };
            if ops.is_empty() {
                // Read-only (or a no-op): serialised at the version it read.
                return Ok(result);
            }
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
                    {
                        let mut state = self.write_state();
                        if state.version + 1 == version {
                            state.apply(ops);
                            state.version = version;
                        }
                    }
                    if version % self.checkpoint_interval == 0 {
                        let (store, dir, state) = (
                            self.store.clone(),
                            self.checkpoint_dir.clone(),
                            self.state.clone(),
                        );
                        // Off the request path: a checkpoint can be large.
                        tokio::spawn(async move {
                            if let Err(e) = Self::write_checkpoint(store, dir, state, version).await
                            {
                                tracing::warn!(error = %e, version, "metadata checkpoint failed");
                            }
                        });
                    }
                    return Ok(result);
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    // Another process committed this version first: read it, run again.
                    tracing::debug!(version, "metadata log race lost; retrying");
                    self.catch_up().await?;
                }
                // The entry may or may not exist now (a timeout after the write landed,
                // say); the next refresh reads whichever is true.
                Err(e) => return Err(os_err(e)),
            }
        }
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
