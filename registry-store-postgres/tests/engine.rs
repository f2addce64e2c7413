//! The engine's own promises on a real PostgreSQL, below the metadata rules: a
//! transaction reads its own buffered writes, a refused or panicking transaction leaves
//! nothing behind (not even on the pooled connection the next transaction gets), and
//! read-modify-write races are serialised.

use std::sync::Arc;

use registry_core::kv::{KvEngine, KvRead, Table};
use registry_core::{Error, Result};
use registry_store_postgres::PostgresKv;

mod common;

const T: Table = Table::Tags;

async fn engine(pool_size: usize) -> PostgresKv {
    let url = common::fresh_database().await;
    PostgresKv::connect(&url, pool_size).await.expect("connect")
}

fn get(r: &dyn KvRead, key: &[u8]) -> Result<Option<Vec<u8>>> {
    r.get(T, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_reads_its_own_buffered_writes() {
    let kv = engine(1).await;
    let seen = kv
        .write(|w| {
            w.put(T, b"a/1", b"one")?;
            w.put(T, b"a/2", b"two")?;
            let one = w.get(T, b"a/1")?;
            w.put(T, b"a/3", b"three")?;
            let scanned = w.scan(T, b"a/", None, 10)?;
            let existed = w.delete(T, b"a/2")?;
            let count = w.count(T)?;
            Ok((one, scanned, existed, count))
        })
        .await
        .unwrap();
    assert_eq!(seen.0.as_deref(), Some(&b"one"[..]));
    let keys: Vec<&[u8]> = seen.1.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, [&b"a/1"[..], b"a/2", b"a/3"]);
    assert!(seen.2, "the buffered put of a/2 was visible to the delete");
    assert_eq!(seen.3, 2);
    let after = kv
        .read(|r| Ok((get(r, b"a/1")?, get(r, b"a/2")?, get(r, b"a/3")?)))
        .await
        .unwrap();
    assert_eq!(
        after,
        (Some(b"one".to_vec()), None, Some(b"three".to_vec()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_alone_are_committed() {
    let kv = engine(1).await;
    kv.write(|w| w.put(T, b"only", b"puts")).await.unwrap();
    let v = kv.read(|r| get(r, b"only")).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"puts"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transaction_leaves_nothing() {
    // One connection: the next transaction runs on the very connection the refused one
    // used, so a transaction left open on it would show.
    let kv = engine(1).await;
    let r: Result<()> = kv
        .write(|w| {
            w.put(T, b"refused/1", b"x")?;
            w.get(T, b"refused/1")?; // the put has been sent
            w.put(T, b"refused/2", b"y")?; // still buffered
            Err(Error::UploadUnknown {
                id: "refused".into(),
            })
        })
        .await;
    assert!(r.is_err());
    kv.write(|w| w.put(T, b"next", b"z")).await.unwrap();
    let (one, two, next) = kv
        .read(|r| {
            Ok((
                get(r, b"refused/1")?,
                get(r, b"refused/2")?,
                get(r, b"next")?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(
        (one, two),
        (None, None),
        "a refused transaction's writes stayed"
    );
    assert_eq!(next.as_deref(), Some(&b"z"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_transaction_never_lends_its_connection_out() {
    let kv = engine(1).await;
    let kv = Arc::new(kv);
    let k = kv.clone();
    let panicked = tokio::spawn(async move {
        k.write(|w| {
            w.put(T, b"panic/1", b"x")?;
            w.get(T, b"panic/1")?; // sent: the transaction is open on the server
            panic!("a bug in a closure");
            #[allow(unreachable_code)]
            Ok(())
        })
        .await
    })
    .await;
    assert!(panicked.is_err() || panicked.unwrap().is_err());
    // Had the connection gone back to the pool mid-transaction, this COMMIT would also
    // commit panic/1.
    kv.write(|w| w.put(T, b"after", b"y")).await.unwrap();
    let v = kv.read(|r| get(r, b"panic/1")).await.unwrap();
    assert_eq!(v, None, "the panicking transaction's write was committed");
    let v = kv.read(|r| get(r, b"after")).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"y"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_modify_write_races_are_serialised() {
    let kv = Arc::new(engine(4).await);
    let increment = |kv: Arc<PostgresKv>| async move {
        for _ in 0..25 {
            kv.write(|w| {
                let n = w
                    .get(T, b"counter")?
                    .map(|v| u64::from_be_bytes(v.try_into().expect("8 bytes")))
                    .unwrap_or(0);
                w.put(T, b"counter", &(n + 1).to_be_bytes())
            })
            .await
            .unwrap();
        }
    };
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(increment(kv.clone())))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let v = kv.read(|r| get(r, b"counter")).await.unwrap().unwrap();
    assert_eq!(
        u64::from_be_bytes(v.try_into().unwrap()),
        100,
        "an increment was lost"
    );
}

/// A transaction that has taken an outbox number and not committed yet holds readers
/// back (its number may still appear, before numbers already visible); once it ends,
/// readers see its event if it committed and skip the number if it rolled back. No
/// timeout is involved (`docs/design.md`, "PostgreSQL: numbers from a sequence").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_readers_wait_for_numbers_that_may_still_appear() {
    use registry_core::testkit::{push_blob, repo};
    use registry_core::{Event, MemoryBlobStore, Registry, Storage};

    let url = common::fresh_database().await;
    let metadata = registry_store_postgres::connect(&url)
        .await
        .expect("connect");
    let registry = Registry::builder(Storage {
        blobs: Arc::new(MemoryBlobStore::default()),
        metadata: Arc::new(metadata),
    })
    .build();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("a second connection");
    tokio::spawn(connection);
    // Takes the next number the way the engine does, in a transaction left open.
    let hold = |name: &'static str| {
        let client = &client;
        async move {
            client
                .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
                .await
                .unwrap();
            let entry =
                format!(r#"{{"at":0,"event":{{"kind":"repository_created","repo":"{name}"}}}}"#);
            client
                .execute(
                    "INSERT INTO registry_kv (t, k, v)
                     SELECT $1, decode(lpad(to_hex(nextval('registry_outbox_seq')), 16, '0'), 'hex'), $2
                     FROM (SELECT pg_current_xact_id()) AS assigned",
                    &[&(Table::Outbox.index() as i16), &entry.into_bytes()],
                )
                .await
                .unwrap();
        }
    };
    let created = |events: &[registry_core::StoredEvent]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match &e.event {
                Event::RepositoryCreated { repo } => Some(repo.to_string()),
                _ => None,
            })
            .collect()
    };

    // Committed in the end: seen, in number order, only once it committed.
    let head = registry.events_head().await.unwrap();
    hold("gap/committed").await;
    push_blob(&registry, &repo("gap/after-commit"), b"x").await;
    let page = registry.events_after(head, 100).await.unwrap();
    assert!(
        page.events.is_empty(),
        "passed a number that may still appear: {page:?}"
    );
    assert_eq!(page.next_after, head);
    client.batch_execute("COMMIT").await.unwrap();
    let page = registry.events_after(head, 100).await.unwrap();
    assert_eq!(created(&page.events), ["gap/committed", "gap/after-commit"]);

    // Rolled back: skipped once the transaction has ended, and only then.
    let head = page.next_after;
    hold("gap/rolled-back").await;
    push_blob(&registry, &repo("gap/after-rollback"), b"y").await;
    assert!(
        registry
            .events_after(head, 100)
            .await
            .unwrap()
            .events
            .is_empty()
    );
    client.batch_execute("ROLLBACK").await.unwrap();
    // Settled once no transaction that had an id when the gap was seen is still open,
    // anywhere in the cluster: the other tests of this binary share the server, so
    // this may take a moment.
    let mut page = registry.events_after(head, 100).await.unwrap();
    for _ in 0..300 {
        if !page.events.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        page = registry.events_after(head, 100).await.unwrap();
    }
    assert_eq!(created(&page.events), ["gap/after-rollback"]);
    assert!(
        page.next_after > head + 1,
        "the rolled-back number was skipped"
    );
}
