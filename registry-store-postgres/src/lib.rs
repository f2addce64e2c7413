//! Registry metadata in PostgreSQL: a [`KvEngine`] whose tables are rows of one
//! PostgreSQL table, so that [`KvMetadata`] (every metadata rule of `registry-core`,
//! written once) runs on a database that any number of registry processes share.
//!
//! Combine it with any `BlobStore`: object storage when several processes serve one
//! registry, files for one host.
//!
//! ```no_run
//! # async fn doc() -> Result<(), registry_core::Error> {
//! use std::sync::Arc;
//! use registry_core::{MemoryBlobStore, Registry, Storage};
//!
//! let metadata = registry_store_postgres::connect("postgres://registry@127.0.0.1/registry").await?;
//! let storage = Storage {
//!     blobs: Arc::new(MemoryBlobStore::default()),
//!     metadata: Arc::new(metadata),
//! };
//! let registry = Registry::builder(storage).build();
//! # Ok(()) }
//! ```
//!
//! # Transactions
//!
//! Each [`KvEngine::write`] is one `SERIALIZABLE` transaction (PostgreSQL's serializable
//! snapshot isolation): the closure runs on the transaction's snapshot, every read and
//! write goes to the database, and a commit that would break serializability fails with
//! SQLSTATE 40001, after which the transaction is rolled back and the closure runs again
//! (the `KvEngine` contract allows it: `f` is `Fn`). So the atomic changes of the
//! metadata store are serialisable across processes, as on the in-memory and redb
//! engines. Reads run in `REPEATABLE READ READ ONLY` transactions: one consistent
//! snapshot, never a serialization failure.
//!
//! Writes to different repositories touch different keys (the schema keys every record
//! by repository and digest), so they do not conflict: there is no global row or lock.
//! Shared keys are shared for a reason (the record of a blob two repositories link, a
//! quota prefix's usage) and serialise exactly those writes.
//!
//! `docs/design.md` ("Metadata in PostgreSQL") says why this is a `KvEngine` and not a
//! schema of its own, and what it costs.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use registry_core::kv::{KvEngine, KvMetadata, KvPair, KvRead, KvWrite, Table};
use registry_core::{Error, Result};
use tokio::runtime::Handle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls};

mod schema;

/// The metadata store: [`KvMetadata`] over PostgreSQL.
pub type PostgresMetadata = KvMetadata<PostgresKv>;

/// Default number of pooled connections per process.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// How many times a write transaction runs again after losing a serialization race.
const WRITE_ATTEMPTS: u32 = 64;

/// Connects to the database at `url` (`postgres://USER:PASSWORD@HOST:PORT/DB`), brings
/// its schema up to date, and returns the metadata store.
pub async fn connect(url: &str) -> Result<PostgresMetadata> {
    Ok(KvMetadata::new(
        PostgresKv::connect(url, DEFAULT_POOL_SIZE).await?,
    ))
}

/// Where a database URL points, without its password: `database DB on HOST:PORT`,
/// for messages and logs.
pub fn describe_url(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "(unparsable URL)".to_owned();
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
            tokio_postgres::config::Host::Unix(path) => format!("{}:{p}", path.display()),
        })
        .collect();
    format!(
        "database {} on {}",
        config.get_dbname().unwrap_or("(the user's)"),
        hosts.join(",")
    )
}

/// A [`KvEngine`] on PostgreSQL (see the crate documentation).
pub struct PostgresKv {
    pool: Pool,
}

impl std::fmt::Debug for PostgresKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresKv")
            .field("pool", &self.pool.status())
            .finish()
    }
}

fn db_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::storage(format!("PostgreSQL: {context}: {e}"))
}

/// Whether a failed statement or commit lost a race that running the transaction again
/// can win.
fn is_retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

impl PostgresKv {
    /// Connects with a pool of at most `pool_size` connections and migrates the schema.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| db_err("invalid URL", e))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| db_err("pool", e))?;
        let kv = PostgresKv { pool };
        let mut client = kv.client().await?;
        schema::migrate(&mut client).await?;
        Ok(kv)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| db_err("connect", e))
    }
}

/// Reads and writes of one transaction. The `KvRead`/`KvWrite` calls are synchronous
/// (the metadata rules run as plain closures, as on redb); they run on a blocking
/// thread that waits for each statement.
struct Txn<'a> {
    tx: &'a Transaction<'a>,
    handle: &'a Handle,
    /// A statement lost a serialization race: the transaction must run again.
    conflict: Cell<bool>,
}

impl Txn<'_> {
    fn run<T>(
        &self,
        what: &str,
        f: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        self.handle.block_on(f).map_err(|e| {
            if is_retryable(&e) {
                self.conflict.set(true);
            }
            db_err(what, e)
        })
    }

    fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        self.run("prepare", self.tx.prepare_cached(sql))
    }
}

fn table_id(t: Table) -> i16 {
    t.index() as i16
}

/// The smallest key greater than every key starting with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl KvRead for Txn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let st = self.statement(schema::GET)?;
        let row = self.run("get", self.tx.query_opt(&st, &[&table_id(table), &key]))?;
        Ok(row.map(|r| r.get(0)))
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (lower, exclusive) = match after {
            Some(a) if a >= prefix => (a, true),
            _ => (prefix, false),
        };
        let end = prefix_end(prefix);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = schema::scan(exclusive, end.is_some());
        let st = self.statement(&sql)?;
        let id = table_id(table);
        let rows = match &end {
            Some(end) => self.run(
                "scan",
                self.tx.query(&st, &[&id, &lower, &end.as_slice(), &limit]),
            )?,
            None => self.run("scan", self.tx.query(&st, &[&id, &lower, &limit]))?,
        };
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn count(&self, table: Table) -> Result<u64> {
        let st = self.statement(schema::COUNT)?;
        let row = self.run("count", self.tx.query_one(&st, &[&table_id(table)]))?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }
}

impl KvWrite for Txn<'_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        let st = self.statement(schema::PUT)?;
        self.run(
            "put",
            self.tx.execute(&st, &[&table_id(table), &key, &value]),
        )?;
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &[u8]) -> Result<bool> {
        let st = self.statement(schema::DELETE)?;
        let n = self.run("delete", self.tx.execute(&st, &[&table_id(table), &key]))?;
        Ok(n > 0)
    }
}

impl KvEngine for PostgresKv {
    fn read<R, F>(&self, f: F) -> impl Future<Output = Result<R>> + Send
    where
        F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let client = self.client();
        async move {
            let mut client = client.await?;
            let handle = Handle::current();
            tokio::task::spawn_blocking(move || {
                let tx = handle
                    .block_on(
                        client
                            .build_transaction()
                            .isolation_level(IsolationLevel::RepeatableRead)
                            .read_only(true)
                            .start(),
                    )
                    .map_err(|e| db_err("begin", e))?;
                let txn = Txn {
                    tx: &tx,
                    handle: &handle,
                    conflict: Cell::new(false),
                };
                let out = f(&txn);
                // Nothing to keep: a read-only transaction ends either way.
                let _ = handle.block_on(tx.rollback());
                out
            })
            .await
            .map_err(|e| db_err("read task", e))?
        }
    }

    fn write<R, F>(&self, f: F) -> impl Future<Output = Result<R>> + Send
    where
        F: Fn(&mut dyn KvWrite) -> Result<R> + Send + Sync + 'static,
        R: Send + 'static,
    {
        let client = self.client();
        async move {
            let mut client = client.await?;
            let handle = Handle::current();
            tokio::task::spawn_blocking(move || {
                let mut pause = Duration::from_millis(1);
                for attempt in 1..=WRITE_ATTEMPTS {
                    let tx = handle
                        .block_on(
                            client
                                .build_transaction()
                                .isolation_level(IsolationLevel::Serializable)
                                .start(),
                        )
                        .map_err(|e| db_err("begin", e))?;
                    let mut txn = Txn {
                        tx: &tx,
                        handle: &handle,
                        conflict: Cell::new(false),
                    };
                    let out = f(&mut txn);
                    let conflict = txn.conflict.get();
                    let retry = match out {
                        Ok(value) if !conflict => match handle.block_on(tx.commit()) {
                            Ok(()) => return Ok(value),
                            Err(e) if is_retryable(&e) => true,
                            Err(e) => return Err(db_err("commit", e)),
                        },
                        // The closure's own error (a refused change): roll back.
                        Err(e) if !conflict => {
                            let _ = handle.block_on(tx.rollback());
                            return Err(e);
                        }
                        _ => {
                            let _ = handle.block_on(tx.rollback());
                            true
                        }
                    };
                    debug_assert!(retry);
                    tracing::debug!(attempt, "metadata transaction lost a serialization race; running it again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(Error::TooManyRequests {
                    reason: format!(
                        "a metadata change lost {WRITE_ATTEMPTS} serialization races in a row; retry"
                    ),
                    retry_after: Some(Duration::from_secs(1)),
                })
            })
            .await
            .map_err(|e| db_err("write task", e))?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn described_urls_never_show_the_password() {
        let d = super::describe_url("postgres://reg:s3cret@db.example:6543/registry");
        assert_eq!(d, "database registry on db.example:6543");
        assert!(!super::describe_url("postgres://u:s3cret@h/x").contains("s3cret"));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
