//! [`KvEngine`] over a redb database: one redb table per metadata table, one write
//! transaction (durable on commit) per registry operation.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use registry_core::kv::{KvEngine, KvPair, KvRead, KvWrite, Table};
use registry_core::store::storage_error;
use registry_core::{Error, Result};

fn def(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

/// The metadata engine of the fs store.
#[derive(Debug, Clone)]
pub struct RedbKv {
    db: Arc<Database>,
}

impl RedbKv {
    /// Opens (or creates) the database at `path` and makes sure every table exists.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(storage_error)?;
        let txn = db.begin_write().map_err(storage_error)?;
        for table in Table::ALL {
            txn.open_table(def(table)).map_err(storage_error)?;
        }
        txn.commit().map_err(storage_error)?;
        Ok(RedbKv { db: Arc::new(db) })
    }
}

fn scan_table<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<KvPair>> {
    let lower = match after {
        Some(a) if a >= prefix => Bound::Excluded(a),
        _ => Bound::Included(prefix),
    };
    let mut out = Vec::new();
    for entry in t
        .range::<&[u8]>((lower, Bound::Unbounded))
        .map_err(storage_error)?
    {
        if out.len() >= limit {
            break;
        }
        let (k, v) = entry.map_err(storage_error)?;
        if !k.value().starts_with(prefix) {
            break;
        }
        out.push((k.value().to_vec(), v.value().to_vec()));
    }
    Ok(out)
}

struct Read(redb::ReadTransaction);

struct Write(redb::WriteTransaction);

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
                scan_table(&t, prefix, after, limit)
            }
            fn count(&self, table: Table) -> Result<u64> {
                let t = self.0.open_table(def(table)).map_err(storage_error)?;
                t.len().map_err(storage_error)
            }
        }
    };
}

kv_read!(Read);
kv_read!(Write);

impl KvWrite for Write {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<()> {
        let mut t = self.0.open_table(def(table)).map_err(storage_error)?;
        t.insert(key, value).map_err(storage_error)?;
        Ok(())
    }
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<bool> {
        let mut t = self.0.open_table(def(table)).map_err(storage_error)?;
        Ok(t.remove(key).map_err(storage_error)?.is_some())
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

    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut dyn KvWrite) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let db = self.db.clone();
        blocking(move || {
            let mut txn = Write(db.begin_write().map_err(storage_error)?);
            match f(&mut txn) {
                Ok(r) => {
                    // Durability::Immediate (the default): fsynced before commit returns.
                    txn.0.commit().map_err(storage_error)?;
                    Ok(r)
                }
                Err(e) => {
                    txn.0.abort().map_err(storage_error)?;
                    Err(e)
                }
            }
        })
        .await
    }
}
