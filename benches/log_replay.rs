//! Replay of the bucket-log metadata store (`registry-store-object`): how long a process
//! takes to open (newest checkpoint + the entries after it) and a running process to
//! catch up, with N log entries after the checkpoint: one GET at a time (as before
//! issue 21, `replay_concurrency` 1) and batched (the default, 32 GETs in flight).
//!
//! ```sh
//! cargo bench -p registry-benches --bench log_replay                 # object_store's InMemory
//! S3_ENDPOINT=http://127.0.0.1:PORT cargo bench -p registry-benches --bench log_replay
//! ```
//!
//! Also against the in-memory store with 10 ms added to every request (S3-like latency).
//! With `S3_ENDPOINT` (moto: `.test-deps/venv/bin/moto_server -H 127.0.0.1 -p PORT`) it
//! also measures against S3, in a fresh bucket it creates. `ENTRIES` (default 5000) and
//! `ROUNDS` (default 3) change the size and the repetitions. Prints one line per
//! measurement: the median and every round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_core::kv::{KvEngine, Table};
use registry_store_object::object_store::ObjectStore;
use registry_store_object::object_store::memory::InMemory;
use registry_store_object::object_store::throttle::{ThrottleConfig, ThrottledStore};
use registry_store_object::{BucketOptions, BucketStore};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn options(replay_concurrency: usize) -> BucketOptions {
    BucketOptions {
        // No checkpoint: every entry written here is replayed.
        checkpoint_interval: u64::MAX,
        replay_concurrency,
        ..BucketOptions::default()
    }
}

/// Writes `n` log entries, one small transaction each (sequential: concurrent writers of
/// one process would share entries).
async fn fill(store: &BucketStore, n: usize) {
    for i in 0..n {
        let key = format!("bench/{i:08}").into_bytes();
        store
            .log()
            .write(move |t| t.put(Table::Tags, &key, b"bench"))
            .await
            .expect("write");
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(what: &str, rounds: Vec<Duration>) {
    let each: Vec<String> = rounds.iter().map(|d| format!("{d:.2?}")).collect();
    println!(
        "{what}: median {:.2?} ({})",
        median(rounds),
        each.join(", ")
    );
}

/// Writes through `fill_bucket`, reads through `bucket` (the same bucket, or the same
/// with latency added).
async fn measure(
    name: &str,
    fill_bucket: Arc<dyn ObjectStore>,
    bucket: Arc<dyn ObjectStore>,
    entries: usize,
    rounds: usize,
) {
    let writer = BucketStore::open_with(fill_bucket, options(1))
        .await
        .expect("open");
    // Processes opened before the entries exist, to catch up afterwards.
    let mut behind = Vec::new();
    for concurrency in [1, 32] {
        let store = BucketStore::open_with(bucket.clone(), options(concurrency))
            .await
            .expect("open");
        behind.push((concurrency, store));
    }
    let t = Instant::now();
    fill(&writer, entries).await;
    println!("{name}: wrote {entries} entries in {:.2?}", t.elapsed());
    for (concurrency, store) in behind {
        let t = Instant::now();
        store.log().read(|_| Ok(())).await.expect("catch up");
        let catch_up = t.elapsed();
        assert_eq!(store.log().version(), entries as u64);
        report(
            &format!("{name}: catch up of a running process, {concurrency} GETs in flight"),
            vec![catch_up],
        );
    }
    for concurrency in [1, 32] {
        let mut opens = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            let s = BucketStore::open_with(bucket.clone(), options(concurrency))
                .await
                .expect("open");
            opens.push(t.elapsed());
            assert_eq!(s.log().version(), entries as u64);
        }
        report(
            &format!("{name}: open, {entries} entries to replay, {concurrency} GETs in flight"),
            opens,
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let entries = env_number("ENTRIES", 5000);
    let rounds = env_number("ROUNDS", 3).max(1);
    let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    measure("InMemory", memory.clone(), memory, entries, rounds).await;
    // S3's first byte takes some 10-30 ms; moto on loopback answers in about 4 ms of
    // its own (single-process Python) CPU time, so it measures its CPU, not latency.
    let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let latency = ThrottleConfig {
        wait_get_per_call: Duration::from_millis(10),
        wait_list_per_call: Duration::from_millis(10),
        wait_put_per_call: Duration::from_millis(10),
        ..ThrottleConfig::default()
    };
    let slow: Arc<dyn ObjectStore> = Arc::new(ThrottledStore::new(memory.clone(), latency));
    measure(
        "InMemory + 10 ms per request",
        memory,
        slow,
        entries,
        rounds,
    )
    .await;
    if let Ok(endpoint) = std::env::var("S3_ENDPOINT") {
        let bucket = format!(
            "replay-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        );
        create_bucket(&endpoint, &bucket).await;
        let s3 = registry_store_object::object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_bucket_name(&bucket)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_allow_http(true)
            .build()
            .expect("S3 client");
        let s3: Arc<dyn ObjectStore> = Arc::new(s3);
        measure("S3 (moto)", s3.clone(), s3, entries, rounds).await;
    }
}

/// `PUT /BUCKET` without a signature (moto accepts it).
async fn create_bucket(endpoint: &str, bucket: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = endpoint
        .strip_prefix("http://")
        .expect("S3_ENDPOINT is http://HOST:PORT")
        .trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!(
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    s.read_to_string(&mut response).await.expect("receive");
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "creating bucket {bucket}: {response}"
    );
}
