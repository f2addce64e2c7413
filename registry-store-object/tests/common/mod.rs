//! Real object-storage emulators for the tests: moto (S3) and Azurite (Azure Blob),
//! installed by `scripts/install-test-deps.sh` under `.test-deps/`, started once
//! per test binary on free loopback ports, with a fresh bucket or container per test.
//!
//! Each emulator runs under a small shell guard that kills it (SIGKILL, by PID) when
//! the test binary exits, since statics are never dropped.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, S3CopyIfNotExists};
use object_store::azure::MicrosoftAzureBuilder;
use sha2::Digest as _;

/// Azurite's well-known development account (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Where `scripts/install-test-deps.sh` installs: `.test-deps/` at the repository root,
/// outside `target/` so that `cargo clean` keeps it (the script and every test agree on
/// one place).
fn test_deps() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.test-deps")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Starts `program args` under a guard that kills it when this process ends, and waits
/// until `port` accepts connections.
fn start(name: &str, program: PathBuf, args: &[String], port: u16) {
    assert!(
        program.exists(),
        "{name} is not installed at {}: run scripts/install-test-deps.sh",
        program.display()
    );
    let mut command = vec![program.display().to_string()];
    command.extend(args.iter().cloned());
    let quoted: Vec<String> = command.iter().map(|a| format!("'{a}'")).collect();
    let guard = format!(
        "{} >/dev/null 2>&1 & child=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.5; done; \
         kill -9 $child 2>/dev/null",
        quoted.join(" "),
        parent = std::process::id(),
    );
    let mut guard = Command::new("bash")
        .args(["-c", &guard])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    // Reaped if it ends while the tests run (the emulator died); see the guard above.
    std::thread::spawn(move || guard.wait());
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{name} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends one HTTP/1.1 request and returns the status code.
fn http(port: u16, request: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.write_all(request.as_bytes()).expect("send");
    let mut response = Vec::new();
    s.read_to_end(&mut response).expect("receive");
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text}"))
}

/// A name no other test (or earlier run) uses: 3-63 lowercase letters, digits, '-'.
pub fn unique_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!(
        "t{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// moto's port (started on first use).
pub fn moto_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let port = free_port();
        let args = ["-H", "127.0.0.1", "-p", &port.to_string()].map(String::from);
        start(
            "moto",
            test_deps().join("venv/bin/moto_server"),
            &args,
            port,
        );
        port
    })
}

/// Azurite's blob port (started on first use).
pub fn azurite_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let port = free_port();
        let args = [
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--silent",
        ]
        .map(String::from);
        let bin = test_deps().join("azurite/node_modules/.bin/azurite-blob");
        start("azurite", bin, &args, port);
        port
    })
}

/// Creates a bucket on moto (moto needs no signature).
pub fn create_s3_bucket(bucket: &str) {
    let port = moto_port();
    let status = http(
        port,
        &format!(
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200, "creating bucket {bucket} on moto");
}

/// A client of bucket `bucket` on moto: a separate client per call, as separate
/// processes would have.
pub fn s3_client(bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(s3(bucket))
}

/// The signer of a client of bucket `bucket` on moto.
pub fn s3_signer(bucket: &str) -> Arc<dyn object_store::signer::Signer> {
    Arc::new(s3(bucket))
}

fn s3(bucket: &str) -> object_store::aws::AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{}", moto_port()))
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_allow_http(true)
        .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
        .build()
        .expect("S3 client")
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&sha2::Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = sha2::Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = sha2::Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

/// Creates a container on Azurite with one request signed with the development
/// account's shared key.
pub fn create_azure_container(container: &str) {
    let port = azurite_port();
    let date = httpdate(std::time::SystemTime::now());
    let version = "2021-08-06";
    // Shared Key string-to-sign: verb, eleven empty standard headers, the x-ms-
    // headers, then the resource (path-style emulator URLs repeat the account).
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
         /{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container"
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(AZURITE_KEY)
        .expect("dev key");
    let signature =
        base64::engine::general_purpose::STANDARD.encode(hmac_sha256(&key, to_sign.as_bytes()));
    let status = http(
        port,
        &format!(
            "PUT /{AZURITE_ACCOUNT}/{container}?restype=container HTTP/1.1\r\n\
             Host: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\n\
             Authorization: SharedKey {AZURITE_ACCOUNT}:{signature}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 201, "creating container {container} on Azurite");
}

/// A client of container `container` on Azurite (a separate client per call).
pub fn azure_client(container: &str) -> Arc<dyn ObjectStore> {
    Arc::new(azure(container))
}

/// The signer of a client of container `container` on Azurite.
pub fn azure_signer(container: &str) -> Arc<dyn object_store::signer::Signer> {
    Arc::new(azure(container))
}

fn azure(container: &str) -> object_store::azure::MicrosoftAzure {
    MicrosoftAzureBuilder::new()
        .with_account(AZURITE_ACCOUNT)
        .with_access_key(AZURITE_KEY)
        .with_endpoint(format!(
            "http://127.0.0.1:{}/{AZURITE_ACCOUNT}",
            azurite_port()
        ))
        .with_allow_http(true)
        .with_container_name(container)
        .build()
        .expect("Azure client")
}

/// An RFC 7231 date (`Sun, 06 Nov 1994 08:49:37 GMT`), without a date crate.
fn httpdate(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!("{weekday}, {day:02} {month_name} {year} {h:02}:{m:02}:{s:02} GMT")
}

/// The tests every emulator runs: the behaviour suite, the model test and three
/// adapters (each with its own client) sharing nothing but one bucket. `$create` makes
/// a bucket or container by name; `$client` makes a new client of it.
#[macro_export]
macro_rules! emulator_tests {
    ($name:literal, $create:path, $client:path, $signer:path) => {
        async fn fixture() -> registry_core::testkit::Fixture {
            let bucket = common::unique_name();
            $create(&bucket);
            let store = registry_store_object::BucketStore::open($client(&bucket))
                .await
                .expect("open store");
            registry_core::testkit::Fixture::new(store, bucket)
        }

        registry_core::behaviour_suite!(fixture);

        #[test]
        fn model_based() {
            let cases = std::env::var("MODEL_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(3);
            registry_core::testkit::model::run(cases, fixture);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn three_instances_share_one_bucket() {
            use registry_core::testkit::stress;
            let bucket = common::unique_name();
            $create(&bucket);
            let mut storages = Vec::new();
            for _ in 0..3 {
                let store = registry_store_object::BucketStore::open($client(&bucket))
                    .await
                    .expect("open store");
                storages.push(store.into_storage());
            }
            let report = stress::run_shared(
                storages,
                stress::StressConfig {
                    pushers: 3,
                    images_per_pusher: 3,
                    collector_pause: std::time::Duration::from_millis(200),
                    // A push to an emulator takes seconds; see
                    // `StressConfig::protection_window`.
                    protection_window: std::time::Duration::from_secs(30),
                    // Nine images with their racers take about 30 s alone on moto; the
                    // count bounds the run, this only keeps a loaded machine (tests in
                    // parallel) from cutting it short of the nine asserted below.
                    max_duration: std::time::Duration::from_secs(180),
                    ..Default::default()
                },
            )
            .await;
            println!("three instances ({}): {report:?}", $name);
            assert_eq!(report.pushes, 9);
            assert!(report.collections > 0);
            // Every push raced refused pushes of its bytes (issue 16).
            assert!(report.refused_immutable + report.refused_quota > 0 && report.lost == 0);
        }

        /// Presigned blob URLs serve the blob's bytes; see
        /// `common::presigned_urls_serve_blobs`.
        #[cfg(any(feature = "aws", feature = "azure", feature = "gcp"))]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn presigned_urls_serve_blobs() {
            let bucket = common::unique_name();
            $create(&bucket);
            common::presigned_urls_serve_blobs($client(&bucket), $signer(&bucket)).await;
        }

        /// Processes behind a trim of the metadata log reload; see
        /// `common::trim_fences_processes_behind`.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn trim_fences_processes_behind() {
            let bucket = common::unique_name();
            $create(&bucket);
            common::trim_fences_processes_behind(|| $client(&bucket)).await;
        }

        /// `check` reports records whose bytes were deleted straight from the bucket;
        /// see `common::check_reports_records_without_bytes`.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn check_reports_records_without_bytes() {
            let bucket = common::unique_name();
            $create(&bucket);
            common::check_reports_records_without_bytes($client(&bucket), $client(&bucket)).await;
        }
    };
}

/// `BucketStore::check` against a store whose bytes were deleted behind the registry's
/// back (issue 16 left exactly this: a manifest record whose bytes a refused push
/// deleted). `bucket` and `other` are two clients of one empty bucket (two processes).
///
/// A manifest's object and a layer's object are deleted straight from the bucket: the
/// manifest still answers HEAD but not GET, and `check`, through this process and
/// through a second one, reports both records `without bytes` (and nothing else). A
/// repair cannot drop records a manifest holds and says so. Pushing the layer again
/// restores its bytes; the manifest is deleted and pushed again; then the store checks
/// clean. An object without a record is an orphan, not a problem, and a repair with no
/// grace time reclaims it.
pub async fn check_reports_records_without_bytes(
    bucket: Arc<dyn ObjectStore>,
    other: Arc<dyn ObjectStore>,
) {
    use object_store::ObjectStoreExt;
    use object_store::path::Path;
    use registry_core::testkit::{
        assert_cleans_up, image_manifest, push_blob, push_image, repo, tag,
    };
    use registry_core::{Digest, Error, PutManifestOptions, Reference, Registry};
    use registry_store_object::{BucketStore, CheckOptions};

    let object = |d: &Digest| Path::from(format!("blobs/{}/{}", d.algorithm().name(), d.hex()));
    let store = BucketStore::open(bucket.clone()).await.expect("open");
    let r = Registry::builder(store.clone()).build();
    let app = repo("check/app");
    let (config, layer) = (&b"{\"check\":1}"[..], &b"check layer"[..]);
    let (manifest, _) = push_image(&r, &app, "v1", config, &[layer]).await;
    let layer_digest = Digest::sha256(layer);

    let clean = store.check(CheckOptions::default()).await.expect("check");
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    assert_eq!(
        (
            clean.blobs,
            clean.manifests,
            clean.repositories,
            clean.orphans
        ),
        (3, 1, 1, 0)
    );

    for d in [&manifest, &layer_digest] {
        bucket.delete(&object(d)).await.expect("delete the object");
    }
    // The symptom: listed and HEAD 200, GET 404.
    let by_tag = Reference::Tag(tag("v1"));
    assert_eq!(
        r.stat_manifest(&app, &by_tag).await.expect("HEAD").digest,
        manifest
    );
    assert!(matches!(
        r.get_manifest(&app, &by_tag).await,
        Err(Error::ManifestUnknown { .. })
    ));

    let expected = [
        format!("blob {manifest}: record (1 links) without bytes"),
        format!("blob {layer_digest}: record (1 links) without bytes"),
    ];
    let second = BucketStore::open(other)
        .await
        .expect("open a second instance");
    for s in [&store, &second] {
        let report = s.check(CheckOptions::default()).await.expect("check");
        let mut problems = report.problems.clone();
        problems.sort();
        let mut want = expected.to_vec();
        want.sort();
        assert_eq!(problems, want, "{report}");
        assert!(report.to_string().ends_with("2 problems"), "{report}");
    }
    // The manifest holds both records: a repair reports them and keeps them.
    let repair = CheckOptions {
        repair: true,
        ..CheckOptions::default()
    };
    let report = store.check(repair).await.expect("repairing check");
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(
        report.problems.iter().all(|p| p.contains("not repaired")),
        "{:?}",
        report.problems
    );

    // Pushing the layer again restores its bytes; the manifest is deleted and pushed
    // again (a re-push of a manifest the repository holds only moves tags).
    push_blob(&r, &app, layer).await;
    r.delete_manifest(&app, &Reference::Digest(manifest.clone()))
        .await
        .expect("delete the broken manifest");
    r.put_manifest(
        &app,
        &by_tag,
        registry_core::media_type::OCI_MANIFEST,
        bytes::Bytes::from(image_manifest(config, &[layer])),
        PutManifestOptions::default(),
    )
    .await
    .expect("push again");
    r.get_manifest(&app, &by_tag)
        .await
        .expect("GET after the push");
    let report = second
        .check(CheckOptions {
            verify_digests: true,
            ..CheckOptions::default()
        })
        .await
        .expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    // Bytes no record claims: an orphan, harmless; reclaimed by a repair without grace.
    let stray = b"bytes nobody recorded";
    let stray_digest = Digest::sha256(stray);
    bucket
        .put(
            &object(&stray_digest),
            bytes::Bytes::from_static(stray).into(),
        )
        .await
        .expect("put a stray object");
    let report = store.check(CheckOptions::default()).await.expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.orphans, 1);
    let report = store
        .clone()
        .with_orphan_grace(Duration::ZERO)
        .check(repair)
        .await
        .expect("repairing check");
    assert_eq!((report.orphans, report.repaired), (1, 1), "{report:?}");
    assert!(matches!(
        bucket.head(&object(&stray_digest)).await,
        Err(object_store::Error::NotFound { .. })
    ));
    assert_cleans_up(&r).await;
}

/// Trimming the metadata log, with processes behind it (issue 21). `client` makes a new
/// client of one empty bucket (a separate process each).
///
/// A trims (no retention, checkpoints every 5 versions). B, with a 60 s lease on a clock
/// the test moves, and C, with no lease (it checks the trim watermark every time), are
/// left behind at version 3 while A commits through version 12 and trims through the
/// checkpoint at 10. The trimmed entries and the older checkpoints are gone. B, paused
/// for longer than its lease, reads every write (no stale read); C commits from its
/// stale version, where a create of entry 4 would succeed in trimmed history: it
/// checks the watermark first, reloads, and its write lands after entry 12, seen by
/// all three, with no write lost (no fork) and nothing left below the watermark.
pub async fn trim_fences_processes_behind(client: impl Fn() -> Arc<dyn ObjectStore>) {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    use object_store::path::Path;
    use registry_core::kv::{KvEngine, Table};
    use registry_store_object::{BucketOptions, BucketStore, Clock};

    let offset = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let base = Instant::now();
    let moved = offset.clone();
    let clock = Clock::new(move || base + *moved.lock().unwrap());
    let options = |lease: Duration, retention: Option<Duration>, clock: Clock| BucketOptions {
        checkpoint_interval: 5,
        lease,
        log_retention: retention,
        clock,
        ..BucketOptions::default()
    };
    let a = BucketStore::open_with(
        client(),
        options(Duration::ZERO, Some(Duration::ZERO), Clock::default()),
    )
    .await
    .expect("open A");
    let b = BucketStore::open_with(client(), options(Duration::from_secs(60), None, clock))
        .await
        .expect("open B");
    let c = BucketStore::open_with(client(), options(Duration::ZERO, None, Clock::default()))
        .await
        .expect("open C");
    async fn put(s: &BucketStore, i: u8) -> registry_core::Result<()> {
        s.log()
            .write(move |t| t.put(Table::Tags, &[i], b"committed"))
            .await
    }
    async fn keys(s: &BucketStore) -> registry_core::Result<Vec<u8>> {
        s.log()
            .read(|r| {
                let all = r.scan(Table::Tags, &[], None, 1000)?;
                Ok(all.into_iter().map(|(k, _)| k[0]).collect::<Vec<u8>>())
            })
            .await
    }
    for i in 1..=3 {
        put(&a, i).await.expect("write");
    }
    assert_eq!(keys(&b).await.expect("read B"), [1, 2, 3]);
    assert_eq!(keys(&c).await.expect("read C"), [1, 2, 3]);

    for i in 4..=10 {
        put(&a, i).await.expect("write");
    }
    // The checkpoint at 10 is written in the background; nothing moves until it is.
    let store = client();
    let checkpoint = Path::from(format!("meta/checkpoint/{:020}", 10));
    for _ in 0..3000 {
        if store.head(&checkpoint).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = a.log().trim().await.expect("trim");
    assert_eq!(report.watermark, 10, "{report:?}");
    for i in 11..=12 {
        put(&a, i).await.expect("write");
    }
    let listed = |dir: &'static str| {
        let store = store.clone();
        async move {
            let mut v: Vec<u64> = store
                .list(Some(&Path::from(format!("meta/{dir}"))))
                .map_ok(|m| m.location.filename().unwrap().parse::<u64>().unwrap())
                .try_collect()
                .await
                .expect("list");
            v.sort();
            v
        }
    };
    assert_eq!(listed("log").await, [11, 12], "trimmed entries are gone");
    assert_eq!(
        listed("checkpoint").await,
        [10],
        "older checkpoints are gone"
    );

    // B was paused for longer than its lease: it must not take the trimmed entry 4's
    // absence for the end of the log.
    *offset.lock().unwrap() += Duration::from_secs(61);
    let all: Vec<u8> = (1..=12).collect();
    assert_eq!(keys(&b).await.expect("read B"), all, "B read stale state");
    assert_eq!(b.log().version(), 12);

    // C commits from version 3, where its create of entry 4 would succeed.
    put(&c, 100).await.expect("C's write");
    let mut with_c = all.clone();
    with_c.push(100);
    for (name, s) in [("A", &a), ("B", &b), ("C", &c)] {
        assert_eq!(keys(s).await.expect("read"), with_c, "{name}");
        assert_eq!(s.log().version(), 13, "{name}");
    }
    assert_eq!(
        listed("log").await,
        [11, 12, 13],
        "nothing written below the watermark"
    );
}

/// A plain `GET` of `url` (`http://127.0.0.1:PORT/...`, as presigned URLs of the
/// emulators are): the status and the body.
pub fn http_get(url: &str) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).expect("send");
    let mut response = Vec::new();
    s.read_to_end(&mut response).expect("receive");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head}"));
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked responses are not parsed here: {head}"
    );
    (status, response[split + 4..].to_vec())
}

/// A blob pushed through a registry on `bucket` gets a presigned URL (with `signer`)
/// that serves exactly its bytes to a client without credentials; a repository that
/// does not hold the blob gets no URL; and without a signer the store presigns nothing.
#[cfg(any(feature = "aws", feature = "azure", feature = "gcp"))]
pub async fn presigned_urls_serve_blobs(
    bucket: Arc<dyn ObjectStore>,
    signer: Arc<dyn object_store::signer::Signer>,
) {
    use registry_core::Digest;
    use registry_core::testkit::{push_blob, repo};
    use registry_store_object::BucketStore;

    let plain = BucketStore::open(bucket).await.expect("open");
    let signed = plain.clone().with_signer(signer);
    let r = registry_core::Registry::builder(signed).build();
    let app = repo("presign/app");
    let data = b"presigned bytes".repeat(1000);
    push_blob(&r, &app, &data).await;
    let digest = Digest::sha256(&data);
    let ttl = Duration::from_secs(300);
    let url = r
        .presigned_blob(&app, &digest, ttl)
        .await
        .expect("presign")
        .expect("a URL");
    let (status, body) = tokio::task::spawn_blocking(move || http_get(&url))
        .await
        .expect("GET");
    assert_eq!(status, 200);
    assert!(body == data, "the presigned URL served other bytes");

    // Not linked to the repository: refused before any URL is made.
    let other = repo("presign/other");
    assert!(matches!(
        r.presigned_blob(&other, &digest, ttl).await,
        Err(registry_core::Error::BlobUnknown { .. })
    ));
    let unknown = Digest::sha256(b"never pushed");
    let url = registry_core::store::BlobStore::presigned_get(
        &*plain.clone().into_storage().blobs,
        &unknown,
        ttl,
    )
    .await
    .expect("presign");
    assert_eq!(url, None, "a store without a signer presigns nothing");
}
