//! Crash safety against real `kill -9`.
//!
//! The test re-executes its own binary as a child (`crash_child`, ignored in normal
//! runs) that pushes images through a `Registry` over `FsStore` from four concurrent
//! workers: layers shared by every image and across repositories (so commits race on
//! the same digest and find it `AlreadyPresent`), unique layers, monolithic uploads,
//! chunked uploads in two or three requests, mounts, indexes over earlier images, and
//! abandoned uploads. It prints `ACK <repo> <tag> <digest>` only after the manifest
//! push returned Ok. The parent kills it with SIGKILL after a random delay, restarts it
//! on the same directory, and after every kill checks:
//! - every blob file that appeared since the last kill hashes to its name (no partial
//!   blob is visible, ever);
//! - `check` reports no problem (counts are transactional: no drift is allowed; orphan
//!   files are allowed and reported apart);
//! - every manifest acknowledged in this cycle reads back with bytes matching its digest,
//!   its blobs read back whole and verify, its children exist; every manifest
//!   acknowledged earlier is still there under its tag.
//!
//! Every fifth cycle, and at the end, everything acknowledged so far is read back and
//! `check` re-hashes every file. At the end a collection with a zero upload expiry
//! reclaims the abandoned uploads and orphan files, and `check` finds nothing at all.
//!
//! `CRASH_CYCLES` (default 30) sets the number of kills; the loop also stops after
//! `CRASH_SECONDS` (default 45).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use registry_core::{
    Algorithm, AllowAll, Digest, GcOptions, ManifestInfo, PutManifestOptions, Reference, Registry,
    RepoName, Tag, media_type,
};
use registry_store_fs::{CheckOptions, FsStore};

const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

fn body(data: &[u8]) -> registry_core::ByteStream {
    futures::stream::iter([Ok(Bytes::copy_from_slice(data))]).boxed()
}

/// Deterministic content of a given size, unique per name.
fn content(name: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 8);
    let mut x: u64 = name.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    }) | 1;
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Pushes one blob the way `mode` says: 0 monolithic, 1 two requests, 2 three requests
/// with the last bytes in the closing request.
async fn push_blob(r: &Registry, repo: &RepoName, data: &[u8], mode: usize) {
    let d = Digest::sha256(data);
    if mode == 0 {
        r.put_blob(repo, &d, Some(data.len() as u64), body(data))
            .await
            .expect("monolithic push");
        return;
    }
    let s = r
        .start_upload(repo, Algorithm::Sha256)
        .await
        .expect("start");
    let cuts: Vec<usize> = if mode == 1 {
        vec![0, data.len()]
    } else {
        vec![0, data.len() / 3, 2 * data.len() / 3]
    };
    for w in cuts.windows(2) {
        r.append_upload(
            repo,
            &s.id,
            Some(w[0] as u64),
            None,
            body(&data[w[0]..w[1]]),
        )
        .await
        .expect("append");
    }
    let last = *cuts.last().expect("cuts");
    let tail = (last < data.len()).then(|| (body(&data[last..]), None));
    r.finish_upload(repo, &s.id, &d, tail)
        .await
        .expect("finish");
}

fn descriptor(media: &str, data_digest: &Digest, size: usize) -> String {
    format!(r#"{{"mediaType":"{media}","digest":"{data_digest}","size":{size}}}"#)
}

/// The child: pushes until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by crash_safety_under_kill_9 as a child process"]
async fn crash_child() {
    let dir = std::env::var("CRASH_CHILD_DIR").expect("CRASH_CHILD_DIR");
    let seed = std::env::var("CRASH_CHILD_SEED").expect("CRASH_CHILD_SEED");
    let store = FsStore::open(&dir).await.expect("open");
    let r = Registry::builder(store).build();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let base = [
        content("base layer 0", 300_000),
        content("base layer 1", 40_000),
    ];
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let (r, seed, out, base) = (r.clone(), seed.clone(), out.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let repo = RepoName::parse(&format!("crash/r{}", w % 2)).expect("repo");
            let other = RepoName::parse(&format!("crash/r{}", (w + 1) % 2)).expect("repo");
            let mut previous: Vec<(Digest, usize)> = Vec::new();
            for i in 0usize.. {
                let unique = content(&format!("{seed}-{w}-{i}"), 60_000 + i % 7 * 20_000);
                let config = format!(r#"{{"seed":"{seed}","w":{w},"i":{i}}}"#).into_bytes();
                // Shared layers: mounted from the other repository when it has them.
                for (n, layer) in base.iter().enumerate() {
                    let d = Digest::sha256(layer);
                    let mounted = (i + n) % 3 == 0
                        && r.mount_blob(&repo, &d, Some(&other), &AllowAll)
                            .await
                            .expect("mount");
                    if !mounted {
                        push_blob(&r, &repo, layer, (i + n + w) % 3).await;
                    }
                }
                push_blob(&r, &repo, &unique, (i + w) % 3).await;
                push_blob(&r, &repo, &config, 0).await;
                if i % 4 == 3 {
                    // A client that will never come back: the collection reclaims it.
                    let s = r
                        .start_upload(&repo, Algorithm::Sha256)
                        .await
                        .expect("start");
                    r.append_upload(&repo, &s.id, Some(0), None, body(&unique[..1000]))
                        .await
                        .expect("append");
                }
                let layers: Vec<String> = [&base[0], &base[1], &unique]
                    .iter()
                    .map(|l| descriptor(LAYER, &Digest::sha256(l), l.len()))
                    .collect();
                let m = format!(
                    r#"{{"schemaVersion":2,"mediaType":"{}","config":{},"layers":[{}]}}"#,
                    media_type::OCI_MANIFEST,
                    descriptor(CONFIG, &Digest::sha256(&config), config.len()),
                    layers.join(",")
                );
                let mut pushes = vec![(format!("s{seed}-w{w}-i{i}"), media_type::OCI_MANIFEST, m)];
                if i % 5 == 4 && previous.len() >= 2 {
                    let children: Vec<String> = previous[previous.len() - 2..]
                        .iter()
                        .map(|(d, size)| descriptor(media_type::OCI_MANIFEST, d, *size))
                        .collect();
                    let index = format!(
                        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{}]}}"#,
                        media_type::OCI_INDEX,
                        children.join(",")
                    );
                    pushes.push((
                        format!("s{seed}-w{w}-i{i}-index"),
                        media_type::OCI_INDEX,
                        index,
                    ));
                }
                for (tag, media, bytes) in pushes {
                    let size = bytes.len();
                    let reference = Reference::Tag(Tag::parse(&tag).expect("tag"));
                    let res = r
                        .put_manifest(
                            &repo,
                            &reference,
                            media,
                            Bytes::from(bytes),
                            PutManifestOptions::default(),
                        )
                        .await
                        .expect("manifest push");
                    if media == media_type::OCI_MANIFEST {
                        previous.push((res.digest.clone(), size));
                    }
                    // Acknowledged: only now may the parent hold us to it.
                    let mut o = out.lock().expect("stdout");
                    writeln!(o, "ACK {repo} {tag} {}", res.digest).expect("write");
                    o.flush().expect("flush");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
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

#[derive(Debug, Clone)]
struct Ack {
    repo: RepoName,
    tag: Tag,
    digest: Digest,
}

/// Hashes every blob file not hashed before: the files are immutable once named, so
/// each needs hashing once, right after the kill that may have torn it.
fn verify_new_files(dir: &Path, hashed: &mut HashSet<Digest>) -> usize {
    let root = dir.join("blobs/sha256");
    let mut new = 0;
    for fan in std::fs::read_dir(&root).expect("fan-out") {
        for file in std::fs::read_dir(fan.expect("fan").path()).expect("files") {
            let file = file.expect("file");
            let name = file.file_name().to_string_lossy().into_owned();
            let d = Digest::parse(&format!("sha256:{name}")).expect("blob names are digests");
            if hashed.contains(&d) {
                continue;
            }
            let bytes = std::fs::read(file.path()).expect("read blob file");
            assert!(d.verify(&bytes), "blob file {d} does not match its name");
            hashed.insert(d);
            new += 1;
        }
    }
    new
}

/// Reads an acknowledged manifest and everything it references, verifying each.
async fn verify_ack(r: &Registry, ack: &Ack) {
    let m = r
        .get_manifest(&ack.repo, &Reference::Tag(ack.tag.clone()))
        .await
        .unwrap_or_else(|e| panic!("acknowledged manifest {} lost: {e}", ack.digest));
    assert_eq!(m.meta.digest, ack.digest, "tag {} moved", ack.tag);
    assert!(ack.digest.verify(&m.bytes), "manifest bytes verify");
    let info = ManifestInfo::inspect(&m.meta.media_type, &m.bytes).expect("parses");
    for b in info.blob_references() {
        let mut s = r
            .get_blob(&ack.repo, &b, None)
            .await
            .unwrap_or_else(|e| panic!("blob {b} of {} lost: {e}", ack.digest))
            .stream;
        let mut h = registry_core::Hasher::new(Algorithm::Sha256);
        while let Some(c) = s.next().await {
            h.update(&c.expect("blob of an acknowledged manifest reads back"));
        }
        assert_eq!(h.finish(), b, "blob content verifies");
    }
    for c in info.manifest_references() {
        r.stat_manifest(&ack.repo, &Reference::Digest(c.clone()))
            .await
            .unwrap_or_else(|e| panic!("child {c} of index {} lost: {e}", ack.digest));
    }
}

/// Everything that must hold after a kill. `full`: re-read every acknowledged image
/// and re-hash every file; otherwise the new acknowledgements in full and the older
/// ones by their tags.
async fn verify(dir: &Path, acked: &[Ack], new_from: usize, full: bool) {
    let store = FsStore::open(dir).await.expect("reopen after kill");
    let report = store
        .check(CheckOptions {
            verify_digests: full,
            repair: false,
        })
        .await
        .expect("check");
    assert!(
        report.problems.is_empty(),
        "check after a kill: {:?}",
        report.problems
    );
    let r = Registry::builder(store).build();
    for (n, ack) in acked.iter().enumerate() {
        if full || n >= new_from {
            verify_ack(&r, ack).await;
        } else {
            let meta = r
                .stat_manifest(&ack.repo, &Reference::Tag(ack.tag.clone()))
                .await
                .unwrap_or_else(|e| panic!("acknowledged manifest {} lost: {e}", ack.digest));
            assert_eq!(meta.digest, ack.digest);
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_safety_under_kill_9() {
    let cycles: usize = env_or("CRASH_CYCLES", 30);
    let budget = Duration::from_secs(env_or("CRASH_SECONDS", 45));
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let mut acked: Vec<Ack> = Vec::new();
    let mut hashed = HashSet::new();
    let started = Instant::now();
    let mut kills = 0;
    for cycle in 0..cycles {
        if started.elapsed() > budget {
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
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parts: Vec<&str> = line.split(' ').collect();
                // A torn last line (killed mid-write) does not parse: not acknowledged.
                if let ["ACK", repo, tag, digest] = parts[..]
                    && let (Ok(repo), Ok(tag), Ok(digest)) = (
                        RepoName::parse(repo),
                        Tag::parse(tag),
                        Digest::parse(digest),
                    )
                {
                    acks.push(Ack { repo, tag, digest });
                }
            }
            acks
        });
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        tokio::time::sleep(Duration::from_millis(150 + rng.next() % 750)).await;
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the child stopped by itself ({status}):\n{}",
                errors.join().unwrap()
            );
        }
        child.kill().unwrap(); // SIGKILL, to this PID only
        child.wait().unwrap();
        kills += 1;
        let new_from = acked.len();
        acked.extend(reader.join().unwrap());
        let stderr = errors.join().unwrap();
        assert!(!stderr.contains("panicked"), "the child failed:\n{stderr}");
        verify_new_files(dir.path(), &mut hashed);
        verify(dir.path(), &acked, new_from, cycle % 5 == 4).await;
    }
    assert!(kills >= 5, "only {kills} kills");
    assert!(!acked.is_empty(), "the child acknowledged nothing");
    let kill_phase = started.elapsed();

    // The leftovers (abandoned uploads, orphan files) are reclaimed; nothing acked is
    // lost by that.
    let gc = {
        let store = FsStore::open(dir.path()).await.unwrap();
        let r = Registry::builder(store)
            .with_upload_expiry(Duration::ZERO)
            .build();
        std::thread::sleep(Duration::from_millis(5));
        r.collect_garbage(&GcOptions {
            orphans: true,
            ..GcOptions::default()
        })
        .await
        .unwrap()
    };
    verify(dir.path(), &acked, 0, true).await;
    let leftovers = std::fs::read_dir(dir.path().join("uploads"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "upload sessions left after collection");
    let store = FsStore::open(dir.path()).await.unwrap();
    let report = store.check(CheckOptions::default()).await.unwrap();
    println!(
        "{kills} kills in {:.1}s, {} acknowledged manifests, {} blob files hashed; gc: {gc}; check: {report}, {} orphans",
        kill_phase.as_secs_f64(),
        acked.len(),
        hashed.len(),
        report.orphans
    );
    assert!(
        report.problems.is_empty() && report.orphans == 0,
        "{report:?}"
    );
}
