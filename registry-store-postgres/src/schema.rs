//! The schema and its migrations, and the statements the engine runs.
//!
//! One table: `registry_kv (t, k, v)`, `t` the [`Table`](registry_core::kv::Table) as
//! a small integer (its position, stable: tables are only ever appended), `k` and `v` the
//! engine's keys and values as bytes. `bytea` compares byte by byte, which is the key
//! order the metadata rules rely on for scans. The SQL is plain enough for the
//! PostgreSQL-compatible distributed databases too (CockroachDB, YugabyteDB): `BYTEA`,
//! `SMALLINT`, `ON CONFLICT ... DO UPDATE`, no extensions, no stored procedures.

use registry_core::Result;

/// The migrations, in order; `registry_schema` records how many have run. Never edit a
/// released one: append.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE registry_kv (
        t SMALLINT NOT NULL,
        k BYTEA NOT NULL,
        v BYTEA NOT NULL,
        PRIMARY KEY (t, k)
    )",
    // The outbox's numbers (see APPEND_EVENT).
    "CREATE SEQUENCE registry_outbox_seq",
];

pub(crate) const GET: &str = "SELECT v FROM registry_kv WHERE t = $1 AND k = $2";
pub(crate) const COUNT: &str = "SELECT count(*) FROM registry_kv WHERE t = $1";
pub(crate) const PUT: &str = "INSERT INTO registry_kv (t, k, v) VALUES ($1, $2, $3)
    ON CONFLICT (t, k) DO UPDATE SET v = EXCLUDED.v";
pub(crate) const DELETE: &str = "DELETE FROM registry_kv WHERE t = $1 AND k = $2";

/// Appends an outbox entry (`$1` the outbox table's number, `$2` the entry) under the
/// next number of a sequence, as 8 bytes big-endian (the key layout every engine uses),
/// so concurrent writers never touch a common row. The number is taken after the
/// transaction has its id (`pg_current_xact_id()` in the subquery assigns it if no
/// earlier write did), which is what lets readers tell when a missing number can no
/// longer appear (see OUTBOX_HORIZON).
pub(crate) const APPEND_EVENT: &str = "INSERT INTO registry_kv (t, k, v)
    SELECT $1, decode(lpad(to_hex(nextval('registry_outbox_seq')), 16, '0'), 'hex'), $2
    FROM (SELECT pg_current_xact_id()) AS assigned";

/// The highest number handed out (sequences are not transactional: rolled-back
/// transactions' numbers count too, which is all a new consumer's start needs).
pub(crate) const OUTBOX_HEAD: &str =
    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM registry_outbox_seq";

/// This snapshot's xmax: every transaction that had an id when the snapshot was taken
/// has a smaller one. A transaction whose outbox number was taken before a number this
/// snapshot sees had its id by then.
pub(crate) const OUTBOX_HORIZON: &str =
    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint";

/// Whether every transaction with an id below `$1` has ended (committed or rolled
/// back): the oldest still running is at or above it.
pub(crate) const OUTBOX_SETTLED: &str =
    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint >= $1";

/// A range scan in key order: keys from `$2` (inclusive, or exclusive when `exclusive`),
/// below `$3` when `bounded`, at most the last parameter. Four fixed texts, so a scan
/// builds no string (the prepared-statement cache is keyed by the text).
pub(crate) fn scan(exclusive: bool, bounded: bool) -> &'static str {
    match (exclusive, bounded) {
        (false, true) => {
            "SELECT k, v FROM registry_kv WHERE t = $1 AND k >= $2 AND k < $3 ORDER BY k LIMIT $4"
        }
        (true, true) => {
            "SELECT k, v FROM registry_kv WHERE t = $1 AND k > $2 AND k < $3 ORDER BY k LIMIT $4"
        }
        (false, false) => {
            "SELECT k, v FROM registry_kv WHERE t = $1 AND k >= $2 ORDER BY k LIMIT $3"
        }
        (true, false) => "SELECT k, v FROM registry_kv WHERE t = $1 AND k > $2 ORDER BY k LIMIT $3",
    }
}

/// Runs the migrations not yet run, in one transaction, under an advisory lock so that
/// processes starting together do not run them twice.
pub(crate) async fn migrate(client: &mut deadpool_postgres::Object) -> Result<()> {
    let err = |e: tokio_postgres::Error| super::db_err("migrating the schema", e);
    let tx = client.transaction().await.map_err(err)?;
    // Any fixed number: it only has to be the same in every process of this crate.
    tx.execute("SELECT pg_advisory_xact_lock(7346012501)", &[])
        .await
        .map_err(err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS registry_schema (version INTEGER NOT NULL)")
        .await
        .map_err(err)?;
    let done: i64 = match tx
        .query_opt("SELECT version FROM registry_schema", &[])
        .await
        .map_err(err)?
    {
        Some(row) => i64::from(row.get::<_, i32>(0)),
        None => {
            tx.execute("INSERT INTO registry_schema (version) VALUES (0)", &[])
                .await
                .map_err(err)?;
            0
        }
    };
    if done as usize > MIGRATIONS.len() {
        return Err(registry_core::Error::storage(format!(
            "the database schema is at version {done}, newer than this build knows ({}); \
             upgrade the registry",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
        tx.batch_execute(sql).await.map_err(err)?;
        tx.execute(
            "UPDATE registry_schema SET version = $1",
            &[&(i as i32 + 1)],
        )
        .await
        .map_err(err)?;
    }
    tx.commit().await.map_err(err)
}
