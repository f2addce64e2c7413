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

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Pool, RecyclingMethod};
use registry_core::kv::{KvEngine, KvMetadata, KvPair, KvRead, KvWrite, Table};
use registry_core::{Error, Result};
use tokio::runtime::Handle;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

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

/// A pooled connection that is discarded, not returned to the pool, if it is dropped
/// while a transaction may be open on it (a panic in a closure, an error between BEGIN
/// and its end): the server rolls back when the connection closes, and the next user
/// of the pool never continues someone else's transaction.
struct Session {
    client: Option<deadpool_postgres::Object>,
    in_transaction: Cell<bool>,
}

impl Session {
    fn new(client: deadpool_postgres::Object) -> Self {
        Session {
            client: Some(client),
            in_transaction: Cell::new(false),
        }
    }

    fn client(&self) -> &ClientWrapper {
        self.client.as_ref().expect("the session's connection")
    }

    /// Ends the transaction with `sql` (`COMMIT` or `ROLLBACK`), waiting for the answer.
    fn end(&self, handle: &Handle, sql: &str) -> std::result::Result<(), tokio_postgres::Error> {
        let r = handle.block_on(self.client().batch_execute(sql));
        if r.is_ok() {
            self.in_transaction.set(false);
        }
        r
    }

    /// Ends a read transaction without waiting for the server: the ROLLBACK is sent
    /// from a task, and the connection goes back to the pool once it is answered.
    fn end_in_background(mut self, handle: &Handle) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.in_transaction.get() {
            return;
        }
        handle.spawn(async move {
            if client.batch_execute("ROLLBACK").await.is_err() {
                // Unknown state: never reuse it.
                let _ = deadpool_postgres::Object::take(client);
            }
        });
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && self.in_transaction.get()
        {
            let _ = deadpool_postgres::Object::take(client);
        }
    }
}

/// A buffered put: (table, key, value).
type Put = (i16, Vec<u8>, Vec<u8>);

const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
const BEGIN_WRITE: &str = "BEGIN ISOLATION LEVEL SERIALIZABLE";

/// Reads and writes of one transaction. The `KvRead`/`KvWrite` calls are synchronous
/// (the metadata rules run as plain closures, as on redb); they run on a blocking
/// thread that waits for each statement.
///
/// Round trips are what a transaction costs (a few hundred microseconds each on one
/// host, milliseconds across a network), so a transaction sends as few as the closure
/// allows, using the protocol's pipelining (requests go out before earlier answers
/// arrive, and are answered in order):
/// - `BEGIN` travels with the first read instead of on its own;
/// - puts are buffered and sent with the next statement, or with `COMMIT`, since a
///   put's only answer is success or failure; reads still see them, because the
///   buffer goes out ahead of the read on the same connection;
/// - a read transaction's `ROLLBACK` is sent after the answer is returned.
///
/// So a write closure of k reads and any number of puts costs k + 1 round trips, and
/// a read closure of k reads costs k.
struct Txn<'a> {
    session: &'a Session,
    handle: &'a Handle,
    /// The statement that opens the transaction.
    begin: &'static str,
    /// Puts not yet sent.
    pending: RefCell<Vec<Put>>,
    /// Outbox entries, sent with COMMIT, after the puts: the number is taken as late
    /// as possible, so numbers come close to commit order.
    events: Vec<Vec<u8>>,
    /// A statement lost a serialization race: the transaction must run again.
    conflict: Cell<bool>,
}

impl<'a> Txn<'a> {
    fn new(session: &'a Session, handle: &'a Handle, begin: &'static str) -> Self {
        Txn {
            session,
            handle,
            begin,
            pending: RefCell::new(Vec::new()),
            events: Vec::new(),
            conflict: Cell::new(false),
        }
    }

    fn fail(&self, what: &str, e: tokio_postgres::Error) -> Error {
        if is_retryable(&e) {
            self.conflict.set(true);
        }
        db_err(what, e)
    }

    fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        self.handle
            .block_on(self.session.client().prepare_cached(sql))
            .map_err(|e| self.fail("prepare", e))
    }

    /// Opens the transaction on its own round trip, if it is not open yet.
    fn begin_now(&self) -> Result<()> {
        if !self.session.in_transaction.get() {
            // From the moment BEGIN is sent the session may be in a transaction: if it
            // fails, the session is discarded rather than reused.
            self.session.in_transaction.set(true);
            self.handle
                .block_on(self.session.client().batch_execute(self.begin))
                .map_err(|e| self.fail("begin", e))?;
        }
        Ok(())
    }

    /// Sends the buffered puts and then the statement `f` makes, in one round trip,
    /// with the transaction's BEGIN ahead of them if it is not open yet.
    fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(&'a ClientWrapper) -> Fut,
        Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        let pending = self.pending.take();
        if !pending.is_empty() {
            // Writes never travel with an unanswered BEGIN: had it failed, they would
            // run, and commit, on their own.
            self.begin_now()?;
        }
        let put = match pending.is_empty() {
            true => None,
            false => Some(self.statement(schema::PUT)?),
        };
        let session: &'a Session = self.session;
        let client = session.client();
        let pipelined_begin = !session.in_transaction.get();
        session.in_transaction.set(true);
        let (began, puts, out) = self.handle.block_on(async {
            let begin = async {
                match pipelined_begin {
                    true => client.batch_execute(self.begin).await,
                    false => Ok(()),
                }
            };
            let puts = send_puts(client, put.as_ref(), &pending);
            // `join!` polls in order, so the requests go out in this order.
            futures::join!(begin, puts, f(client))
        });
        began.map_err(|e| self.fail("begin", e))?;
        for r in puts {
            r.map_err(|e| self.fail("put", e))?;
        }
        out.map_err(|e| self.fail(what, e))
    }

    /// Sends the buffered puts and COMMIT in one round trip. A put that fails aborts the
    /// transaction, and PostgreSQL then answers COMMIT with a rollback (not an error),
    /// so the puts' answers are checked first.
    fn commit(&self) -> Result<()> {
        let pending = self.pending.take();
        if pending.is_empty() && self.events.is_empty() && !self.session.in_transaction.get() {
            return Ok(()); // the closure neither read nor wrote
        }
        self.begin_now()?;
        let put = match pending.is_empty() {
            true => None,
            false => Some(self.statement(schema::PUT)?),
        };
        let append = match self.events.is_empty() {
            true => None,
            false => Some(self.statement(schema::APPEND_EVENT)?),
        };
        let client = self.session.client();
        let outbox = table_id(Table::Outbox);
        let (puts, appends, committed) = self.handle.block_on(async {
            let puts = send_puts(client, put.as_ref(), &pending);
            let appends = futures::future::join_all(self.events.iter().map(|v| {
                let append = append.as_ref().expect("prepared when there are events");
                let outbox = &outbox;
                async move { client.execute(append, &[outbox, v]).await }
            }));
            futures::join!(puts, appends, client.batch_execute("COMMIT"))
        });
        // Whatever the answers, COMMIT ended the transaction (committed or rolled back)
        // unless the connection itself failed, in which case the session is dropped.
        let put_error = puts.into_iter().chain(appends).find_map(|r| r.err());
        if committed.is_ok() {
            self.session.in_transaction.set(false);
        }
        if let Some(e) = put_error {
            return Err(self.fail("put", e));
        }
        committed.map_err(|e| self.fail("commit", e))
    }
}

/// The buffered puts, as requests pipelined on `client` (`put` is the prepared PUT).
fn send_puts<'c>(
    client: &'c ClientWrapper,
    put: Option<&'c tokio_postgres::Statement>,
    pending: &'c [Put],
) -> impl Future<Output = Vec<std::result::Result<u64, tokio_postgres::Error>>> + 'c {
    futures::future::join_all(pending.iter().map(move |(t, k, v)| async move {
        let put = put.expect("prepared when there are puts");
        client.execute(put, &[t, k, v]).await
    }))
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
        let id = table_id(table);
        let row = self.run(
            "get",
            |c| async move { c.query_opt(&st, &[&id, &key]).await },
        )?;
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
        let st = self.statement(schema::scan(exclusive, end.is_some()))?;
        let id = table_id(table);
        let rows = self.run("scan", |c| async move {
            match &end {
                Some(end) => c.query(&st, &[&id, &lower, &end.as_slice(), &limit]).await,
                None => c.query(&st, &[&id, &lower, &limit]).await,
            }
        })?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn count(&self, table: Table) -> Result<u64> {
        let st = self.statement(schema::COUNT)?;
        let id = table_id(table);
        let row = self.run("count", |c| async move { c.query_one(&st, &[&id]).await })?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    fn outbox_head(&self) -> Result<u64> {
        let st = self.statement(schema::OUTBOX_HEAD)?;
        let row = self.run(
            "outbox head",
            |c| async move { c.query_one(&st, &[]).await },
        )?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    fn outbox_horizon(&self) -> Result<Option<u64>> {
        let st = self.statement(schema::OUTBOX_HORIZON)?;
        let row = self.run(
            "outbox horizon",
            |c| async move { c.query_one(&st, &[]).await },
        )?;
        Ok(Some(row.get::<_, i64>(0).max(0) as u64))
    }
}

impl KvWrite for Txn<'_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        self.pending
            .get_mut()
            .push((table_id(table), key.to_vec(), value.to_vec()));
        Ok(())
    }

    fn append_event(&mut self, value: &[u8]) -> Result<()> {
        self.events.push(value.to_vec());
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &[u8]) -> Result<bool> {
        let st = self.statement(schema::DELETE)?;
        let id = table_id(table);
        let n = self.run(
            "delete",
            |c| async move { c.execute(&st, &[&id, &key]).await },
        )?;
        Ok(n > 0)
    }
}

impl KvEngine for PostgresKv {
    fn outbox_settled(&self, horizon: u64) -> impl Future<Output = Result<bool>> + Send {
        let client = self.client();
        async move {
            let client = client.await?;
            let horizon = i64::try_from(horizon).unwrap_or(i64::MAX);
            let row = client
                .query_one(schema::OUTBOX_SETTLED, &[&horizon])
                .await
                .map_err(|e| db_err("outbox settled", e))?;
            Ok(row.get::<_, bool>(0))
        }
    }

    fn read<R, F>(&self, f: F) -> impl Future<Output = Result<R>> + Send
    where
        F: FnOnce(&dyn KvRead) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let client = self.client();
        async move {
            let session = Session::new(client.await?);
            let handle = Handle::current();
            tokio::task::spawn_blocking(move || {
                let out = f(&Txn::new(&session, &handle, BEGIN_READ));
                // Nothing to keep: a read-only transaction ends either way.
                session.end_in_background(&handle);
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
            let session = Session::new(client.await?);
            let handle = Handle::current();
            tokio::task::spawn_blocking(move || {
                let mut pause = Duration::from_millis(1);
                for attempt in 1..=WRITE_ATTEMPTS {
                    let mut txn = Txn::new(&session, &handle, BEGIN_WRITE);
                    let out = f(&mut txn);
                    let retry = match out {
                        Ok(value) if !txn.conflict.get() => match txn.commit() {
                            Ok(()) => return Ok(value),
                            Err(_) if txn.conflict.get() => true,
                            Err(e) => return Err(e),
                        },
                        // The closure's own error (a refused change): roll back.
                        Err(e) if !txn.conflict.get() => {
                            // A rollback that fails (the connection is gone) leaves
                            // the session marked, so it is discarded; the closure's
                            // error is still the answer.
                            if session.in_transaction.get() {
                                let _ = session.end(&handle, "ROLLBACK");
                            }
                            return Err(e);
                        }
                        _ => true,
                    };
                    debug_assert!(retry);
                    if session.in_transaction.get() {
                        session
                            .end(&handle, "ROLLBACK")
                            .map_err(|e| db_err("rollback", e))?;
                    }
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
