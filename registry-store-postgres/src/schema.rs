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
const MIGRATIONS: &[&str] = &["CREATE TABLE registry_kv (
        t SMALLINT NOT NULL,
        k BYTEA NOT NULL,
        v BYTEA NOT NULL,
        PRIMARY KEY (t, k)
    )"];

pub(crate) const GET: &str = "SELECT v FROM registry_kv WHERE t = $1 AND k = $2";
pub(crate) const COUNT: &str = "SELECT count(*) FROM registry_kv WHERE t = $1";
pub(crate) const PUT: &str = "INSERT INTO registry_kv (t, k, v) VALUES ($1, $2, $3)
    ON CONFLICT (t, k) DO UPDATE SET v = EXCLUDED.v";
pub(crate) const DELETE: &str = "DELETE FROM registry_kv WHERE t = $1 AND k = $2";

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
