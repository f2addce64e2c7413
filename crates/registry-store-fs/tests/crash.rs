//! Crash safety against real `kill -9`.
//!
//! The test re-executes its own binary as a child (`crash_child`, ignored in normal
//! runs) that pushes images sharing layers through a `Registry` over `FsStore`, chunked
//! and monolithic, concurrently, printing `ACK <repo> <digest>` only after a push
//! returned Ok. The parent kills it with SIGKILL at random moments, many times, and after
//! every kill reopens the store and checks: every acknowledged manifest reads back with
//! bytes matching its digest, all its blobs read back and verify, no partial blob is
//! visible, and `check` finds no problem. At the end, collection reclaims the leftover
//! upload sessions and orphan files, and `check` still reports no problem.
//!
//! `CRASH_CYCLES` (default 30) sets the number of kills.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use registry_core::{
    Algorithm, Digest, GcOptions, ManifestInfo, PutManifestOptions, Reference, Registry, RepoName,
    Tag,
};
use registry_store_fs::{CheckOptions, FsStore};

fn body(data: Vec<u8>) -> registry_core::ByteStream {
    futures::stream::iter([Ok(Bytes::from(data))]).boxed()
}

/// Content of a given size, unique per name.
fn content(name: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut x: u64 = name.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

async fn push_blob(r: &Registry, repo: &RepoName, data: Vec<u8>, chunked: bool) {
    let d = Digest::sha256(&data);
    if chunked {
        let s = r.start_upload(repo, Algorithm::Sha256).await.unwrap();
        let half = data.len() / 2;
        let (a, b) = (data[..half].to_vec(), data[half..].to_vec());
        r.append_upload(repo, &s.id, Some(0), None, body(a))
            .await
            .unwrap();
        r.finish_upload(repo, &s.id, &d, Some((body(b), None)))
            .await
            .unwrap();
    } else {
        r.put_blob(repo, &d, Some(data.len() as u64), body(data))
            .await
            .unwrap();
    }
}

/// The child: pushes until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by crash_safety_under_kill_9 as a child process"]
async fn crash_child() {
    let dir = std::env::var("CRASH_CHILD_DIR").expect("CRASH_CHILD_DIR");
    let seed = std::env::var("CRASH_CHILD_SEED").expect("CRASH_CHILD_SEED");
    let store = FsStore::open(&dir).await.unwrap();
    let r = Registry::builder(store).build();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (r, seed, out) = (r.clone(), seed.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let repo = RepoName::parse(&format!("crash/r{}", w % 2)).unwrap();
                let layers = [
                    content("base layer 0", 200_000),
                    content("base layer 1", 50_000),
                    content(&format!("{seed}-{w}-{i}"), 100_000 + i % 7 * 10_000),
                ];
                let config = format!("{{\"seed\":\"{seed}\",\"w\":{w},\"i\":{i}}}").into_bytes();
                for (n, l) in layers.iter().enumerate() {
                    push_blob(&r, &repo, l.clone(), (i + n) % 2 == 1).await;
                }
                push_blob(&r, &repo, config.clone(), false).await;
                let layer_json: Vec<String> = layers
                    .iter()
                    .map(|l| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}"#, Digest::sha256(l), l.len()))
                    .collect();
                let m = format!(
                    r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
                    Digest::sha256(&config),
                    config.len(),
                    layer_json.join(",")
                );
                let tag = Reference::Tag(Tag::parse(&format!("s{seed}-w{w}-i{i}")).unwrap());
                let res = r
                    .put_manifest(&repo, &tag, "application/vnd.oci.image.manifest.v1+json", Bytes::from(m), PutManifestOptions::default())
                    .await
                    .unwrap();
                use std::io::Write;
                let mut o = out.lock().unwrap();
                writeln!(o, "ACK {repo} {}", res.digest).unwrap();
                o.flush().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

async fn verify(dir: &std::path::Path, acked: &[(String, String)]) {
    let store = FsStore::open(dir).await.unwrap();
    let report = store
        .check(CheckOptions {
            verify_digests: true,
            repair: false,
        })
        .await
        .unwrap();
    assert!(
        report.problems.is_empty(),
        "check after a kill: {:?}",
        report.problems
    );
    let r = Registry::builder(store).build();
    for (repo, digest) in acked {
        let repo = RepoName::parse(repo).unwrap();
        let d = Digest::parse(digest).unwrap();
        let m = r
            .get_manifest(&repo, &Reference::Digest(d.clone()))
            .await
            .unwrap_or_else(|e| panic!("acknowledged manifest {digest} lost: {e}"));
        assert!(d.verify(&m.bytes));
        let info = ManifestInfo::inspect(&m.meta.media_type, &m.bytes).unwrap();
        for b in info.blob_references() {
            let mut s = r.get_blob(&repo, &b, None).await.unwrap().stream;
            let mut h = registry_core::Hasher::new(Algorithm::Sha256);
            while let Some(c) = s.next().await {
                h.update(&c.expect("blob of an acknowledged manifest reads back"));
            }
            assert_eq!(h.finish(), b, "blob content verifies");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_safety_under_kill_9() {
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let mut acked: Vec<(String, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut kills = 0;
    for cycle in 0..cycles {
        if Instant::now() > deadline {
            break;
        }
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("CRASH_CHILD_DIR", dir.path())
            .env("CRASH_CHILD_SEED", format!("{cycle}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.strip_prefix("ACK ") {
                        let mut parts = rest.split(' ');
                        if let (Some(repo), Some(d)) = (parts.next(), parts.next()) {
                            // A torn last line (killed mid-write) does not parse.
                            if Digest::parse(d).is_ok() {
                                lines.lock().unwrap().push((repo.to_owned(), d.to_owned()));
                            }
                        }
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(300 + rng.next() % 900)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        reader.join().unwrap();
        acked.extend(lines.lock().unwrap().drain(..));
        verify(dir.path(), &acked).await;
    }
    assert!(kills >= 5, "only {kills} kills");
    assert!(!acked.is_empty(), "the child acknowledged nothing");
    // Leftovers (upload sessions, orphan files) are reclaimed; nothing acked is lost.
    {
        let store = FsStore::open(dir.path()).await.unwrap();
        let r = Registry::builder(store)
            .with_upload_expiry(Duration::ZERO)
            .build();
        std::thread::sleep(Duration::from_millis(5));
        let report = r
            .collect_garbage(&GcOptions {
                orphans: true,
                ..GcOptions::default()
            })
            .await
            .unwrap();
        println!(
            "after {kills} kills, {} acknowledged images; gc: {report}",
            acked.len()
        );
    }
    verify(dir.path(), &acked).await;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("uploads"))
        .unwrap()
        .collect();
    assert!(
        leftovers.is_empty(),
        "upload files left: {}",
        leftovers.len()
    );
    let store = FsStore::open(dir.path()).await.unwrap();
    let report = store.check(CheckOptions::default()).await.unwrap();
    println!("check: {report}");
    assert!(
        report.problems.is_empty() && report.orphans == 0,
        "{report:?}"
    );
}
