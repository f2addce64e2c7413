//! Behaviour only a store on disk has: reopening, files changed behind our back,
//! metadata drift written straight into redb, and appends cut short.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use redb::ReadableTable;
use registry_core::kv::Table;
use registry_core::store::{BlobLink, BlobRecord, BlobStore, CommitOutcome, RepoRecord};
use registry_core::testkit::{
    assert_cleans_up, body, image_manifest_with, index_manifest, push_blob, push_image, read_blob,
    repo, tag_ref,
};
use registry_core::{
    Algorithm, AllowAll, Digest, Error, GcOptions, ListOptions, PutManifestOptions, Reference,
    Registry, RepoName, Timestamp, UploadId, media_type,
};
use registry_store_fs::{
    CheckOptions, CheckReport, FsBlobStore, FsStore, ScrubOptions, ScrubStats,
};

const REPORT: CheckOptions = CheckOptions {
    verify_digests: true,
    repair: false,
};
const REPAIR: CheckOptions = CheckOptions {
    verify_digests: true,
    repair: true,
};

fn blob_file(dir: &std::path::Path, d: &Digest) -> std::path::PathBuf {
    dir.join("blobs")
        .join(d.algorithm().name())
        .join(&d.hex()[..2])
        .join(d.hex())
}

async fn check(store: &FsStore, options: CheckOptions) -> CheckReport {
    store.check(options).await.expect("check runs")
}

#[tokio::test]
async fn chunked_upload_continues_after_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo("fs/resume");
    let id = {
        let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
        let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
        r.append_upload(
            &repo,
            &s.id,
            Some(0),
            None,
            body(&[b"written before ", b"the restart, "]),
        )
        .await
        .unwrap();
        s.id
        // Everything is dropped here: the database closes, the hash state is lost.
    };
    let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
    let status = r.upload_status(&repo, &id).await.unwrap();
    assert_eq!(status.offset, 28);
    r.append_upload(&repo, &id, Some(28), None, body(&[b"and after"]))
        .await
        .unwrap();
    let d = Digest::sha256(b"written before the restart, and after");
    r.finish_upload(&repo, &id, &d, None).await.unwrap();
    assert_eq!(
        read_blob(&r, &repo, &d).await.unwrap(),
        b"written before the restart, and after"
    );
}

/// Everything a registry can observe, in a comparable form.
async fn observe(r: &Registry) -> Vec<String> {
    let mut out = Vec::new();
    let stats = r.storage().metadata.stats().await.unwrap();
    out.push(format!("{stats:?}"));
    let repos = r
        .list_repositories(&ListOptions::default(), &AllowAll)
        .await
        .unwrap();
    for repo in repos.items {
        let tags = r.list_tags(&repo, &ListOptions::default()).await.unwrap();
        for t in tags.items {
            let m = r
                .get_manifest(&repo, &Reference::Tag(t.clone()))
                .await
                .unwrap();
            out.push(format!("{repo}:{t} {} {}", m.meta.digest, m.bytes.len()));
            let referrers = r
                .referrers(&repo, &m.meta.digest, None, &ListOptions::default())
                .await
                .unwrap();
            out.push(format!("referrers {:?}", referrers.items));
        }
        let manifests = r
            .storage()
            .metadata
            .list_manifests(&repo, None, 1000)
            .await
            .unwrap();
        for m in manifests {
            for b in &m.blobs {
                let bytes = read_blob(r, &repo, b).await.unwrap();
                out.push(format!("{repo} {b} {}", bytes.len()));
            }
        }
    }
    out
}

#[tokio::test]
async fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (repo("fs/keep-a"), repo("fs/keep-b"));
    let before = {
        let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
        let (m1, s1) = push_image(&r, &a, "v1", b"{\"c\":1}", &[b"base", b"app one"]).await;
        let (m2, s2) = push_image(&r, &a, "v2", b"{\"c\":2}", &[b"base", b"app two"]).await;
        push_image(&r, &b, "latest", b"{\"c\":1}", &[b"base"]).await;
        let index = index_manifest(&[(&m1, s1), (&m2, s2)]);
        r.put_manifest(
            &a,
            &tag_ref("multi"),
            media_type::OCI_INDEX,
            Bytes::from(index),
            PutManifestOptions::default(),
        )
        .await
        .unwrap();
        push_blob(&r, &a, b"{}").await;
        push_blob(&r, &a, b"signature").await;
        let sig = image_manifest_with(
            b"{}",
            &[b"signature"],
            Some((&m1, s1)),
            Some("application/vnd.example.sig"),
        );
        r.put_manifest(
            &a,
            &tag_ref("sig"),
            media_type::OCI_MANIFEST,
            Bytes::from(sig),
            PutManifestOptions::default(),
        )
        .await
        .unwrap();
        // An upload in progress is part of the state too.
        let s = r.start_upload(&b, Algorithm::Sha256).await.unwrap();
        r.append_upload(&b, &s.id, Some(0), None, body(&[b"half"]))
            .await
            .unwrap();
        observe(&r).await
    };
    let store = FsStore::open(dir.path()).await.unwrap();
    let report = check(&store, REPORT).await;
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(
        (report.manifests, report.repositories, report.orphans),
        (5, 2, 0)
    );
    let r = Registry::builder(store.clone()).build();
    assert_eq!(observe(&r).await, before);
    let uploads = r.storage().blobs.list_uploads().await.unwrap();
    assert_eq!(uploads.len(), 1);
    assert_eq!((uploads[0].repo.as_str(), uploads[0].len), ("fs/keep-b", 4));
    r.cancel_upload(&b, &uploads[0].id).await.unwrap();

    assert_cleans_up(&r).await;
    let report = check(&store, REPORT).await;
    assert_eq!((report.blobs, report.problems.len()), (0, 0), "{report:?}");
}

#[tokio::test]
async fn a_blob_altered_on_disk_is_detected_and_never_served_as_valid() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let r = Registry::builder(store.clone()).build();
    let repo = repo("fs/corrupt");
    let d = push_blob(&r, &repo, b"original content").await;
    let clean = check(&store, REPORT).await;
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);

    // Same length, different bytes: only hashing can tell.
    std::fs::write(blob_file(dir.path(), &d), b"tampered content").unwrap();

    assert!(
        check(&store, CheckOptions::default())
            .await
            .problems
            .is_empty(),
        "without hashing, a same-size file looks fine"
    );
    let report = check(&store, REPORT).await;
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains("does not match its digest"));

    let mut s = r.get_blob(&repo, &d, None).await.unwrap().stream;
    let mut chunks = Vec::new();
    while let Some(c) = s.next().await {
        chunks.push(c);
    }
    assert!(
        chunks.last().is_some_and(|c| c.is_err()),
        "a full read of corrupt bytes must end in an error"
    );

    // Repair leaves the evidence alone: still reported, still never served as valid.
    check(&store, REPAIR).await;
    assert_eq!(check(&store, REPORT).await.problems.len(), 1);
    assert!(read_blob(&r, &repo, &d).await.is_err());

    // A shorter file is caught without hashing.
    std::fs::write(blob_file(dir.path(), &d), b"short").unwrap();
    let report = check(&store, CheckOptions::default()).await;
    assert!(
        report.problems[0].contains("file has 5 bytes"),
        "{report:?}"
    );
    assert!(read_blob(&r, &repo, &d).await.is_err());
}

/// Outbox entries written as JSON by an earlier version, in a real redb file, are read
/// back among the binary records of this one, in order, and numbering goes on after
/// them.
#[tokio::test]
async fn outbox_entries_written_as_json_by_an_earlier_version_are_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo("fs/legacy");
    let before = {
        let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
        push_blob(&r, &repo, b"first").await;
        r.events_after(0, 100).await.unwrap().events
    };
    assert!(!before.is_empty());
    let legacy = registry_core::Event::TagMoved {
        repo: repo.clone(),
        tag: registry_core::Tag::parse("old").unwrap(),
        from: None,
        to: Digest::sha256(b"m"),
    };
    let seq = before.last().unwrap().seq + 1;
    {
        let db = redb::Database::open(dir.path().join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def = redb::TableDefinition::<&[u8], &[u8]>::new(Table::Outbox.name());
            let mut outbox = txn.open_table(def).unwrap();
            // The form earlier versions wrote: `{"at":...,"event":{"kind":...}}`.
            let json =
                serde_json::to_vec(&serde_json::json!({"at": 42, "event": &legacy})).unwrap();
            assert_eq!(json[0], b'{');
            outbox
                .insert(&seq.to_be_bytes()[..], json.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
    push_blob(&r, &repo, b"second").await;
    let all = r.events_after(0, 100).await.unwrap().events;
    assert_eq!(&all[..before.len()], &before[..]);
    let old = &all[before.len()];
    assert_eq!((old.seq, old.at, &old.event), (seq, Timestamp(42), &legacy));
    let after = &all[before.len() + 1..];
    assert!(!after.is_empty(), "the new push's events follow");
    assert!(after.iter().all(|e| e.seq > seq));
    assert!(matches!(
        after.last().unwrap().event,
        registry_core::Event::BlobStored { .. }
    ));
}

/// Drift written straight into redb, behind the registry's back, as a bug or a torn
/// write would leave it.
#[tokio::test]
async fn check_repairs_count_drift_written_into_redb() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo("fs/drift");
    let (manifest, _) = {
        let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
        push_image(&r, &repo, "v1", b"{}", &[b"layer"]).await
    };
    let layer = Digest::sha256(b"layer");
    {
        let db = redb::Database::open(dir.path().join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def = |t: Table| redb::TableDefinition::<&[u8], &[u8]>::new(t.name());
            let mut blobs = txn.open_table(def(Table::Blobs)).unwrap();
            let mut rec: BlobRecord = serde_json::from_slice(
                blobs
                    .get(layer.as_str().as_bytes())
                    .unwrap()
                    .unwrap()
                    .value(),
            )
            .unwrap();
            rec.links = 9;
            blobs
                .insert(
                    layer.as_str().as_bytes(),
                    serde_json::to_vec(&rec).unwrap().as_slice(),
                )
                .unwrap();
            let mut links = txn.open_table(def(Table::BlobLinks)).unwrap();
            let lk = format!("{repo}\0{layer}");
            let mut link: BlobLink =
                serde_json::from_slice(links.get(lk.as_bytes()).unwrap().unwrap().value()).unwrap();
            link.manifest_refs = 0;
            links
                .insert(lk.as_bytes(), serde_json::to_vec(&link).unwrap().as_slice())
                .unwrap();
            let mut repos = txn.open_table(def(Table::Repos)).unwrap();
            let wrong = RepoRecord {
                blobs: 40,
                manifests: 2,
            };
            repos
                .insert(
                    repo.as_str().as_bytes(),
                    serde_json::to_vec(&wrong).unwrap().as_slice(),
                )
                .unwrap();
        }
        txn.commit().unwrap();
    }

    let store = FsStore::open(dir.path()).await.unwrap();
    let found = check(&store, REPORT).await;
    // The blob's link count, the link's manifest references, the repository record
    // (the candidate indexes are recomputed from the manifests, so they still agree).
    assert_eq!(found.problems.len(), 3, "{:?}", found.problems);
    assert_eq!(found.repaired, 0);
    assert_eq!(
        check(&store, REPORT).await.problems,
        found.problems,
        "reporting changes nothing"
    );
    let fixed = check(&store, REPAIR).await;
    assert_eq!(fixed.repaired, 3, "{:?}", fixed.problems);
    let after = check(&store, REPORT).await;
    assert!(after.problems.is_empty(), "{:?}", after.problems);

    // The repaired counts are the ones the registry relies on: deleting the image and
    // collecting leaves nothing behind.
    let r = Registry::builder(store.clone()).build();
    assert_eq!(
        r.storage()
            .metadata
            .blob(&layer)
            .await
            .unwrap()
            .unwrap()
            .links,
        1
    );
    assert!(
        r.get_manifest(&repo, &Reference::Digest(manifest))
            .await
            .is_ok()
    );
    assert_cleans_up(&r).await;
}

#[tokio::test]
async fn orphan_files_are_reported_apart_and_removed_after_the_grace_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let r = Registry::builder(store.clone()).build();
    let repo = repo("fs/orphans");
    let kept = push_blob(&r, &repo, b"kept").await;
    // Bytes committed by a process that died before writing their metadata.
    let orphan = Digest::sha256(b"orphan");
    let path = blob_file(dir.path(), &orphan);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"orphan").unwrap();
    // Something that is not a blob name at all is not ours to report or remove.
    std::fs::create_dir_all(dir.path().join("blobs/sha256/00")).unwrap();
    std::fs::write(dir.path().join("blobs/sha256/00/not-a-digest"), b"x").unwrap();

    let report = check(&store, REPORT).await;
    assert_eq!(
        (report.orphans, report.problems.len()),
        (1, 0),
        "{report:?}"
    );
    assert!(
        read_blob(&r, &repo, &orphan).await.is_err(),
        "orphans are unreadable"
    );

    // Young orphans may belong to a commit in flight: kept.
    let report = check(&store, REPAIR).await;
    assert_eq!((report.orphans, report.repaired), (1, 0));
    assert!(blob_file(dir.path(), &orphan).exists());

    let eager = store.clone().with_orphan_grace(Duration::ZERO);
    let report = check(&eager, REPAIR).await;
    assert_eq!((report.orphans, report.repaired), (1, 1));
    assert!(!blob_file(dir.path(), &orphan).exists());
    let report = check(&store, REPORT).await;
    assert_eq!(
        (report.orphans, report.problems.len()),
        (0, 0),
        "{report:?}"
    );
    assert!(dir.path().join("blobs/sha256/00/not-a-digest").exists());
    assert_eq!(read_blob(&r, &repo, &kept).await.unwrap(), b"kept");
}

#[tokio::test]
async fn records_whose_bytes_are_gone_serve_404_and_are_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let r = Registry::builder(store.clone()).build();
    let repo = repo("fs/missing");
    let loose = push_blob(&r, &repo, b"loose blob").await;
    push_image(&r, &repo, "v1", b"{}", &[b"used layer"]).await;
    let used = Digest::sha256(b"used layer");
    std::fs::remove_file(blob_file(dir.path(), &loose)).unwrap();
    std::fs::remove_file(blob_file(dir.path(), &used)).unwrap();

    let report = check(&store, REPORT).await;
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(matches!(
        r.get_blob(&repo, &loose, None).await,
        Err(Error::BlobUnknown { .. })
    ));

    // The loose blob loses its link and record; the referenced one cannot, and says
    // how to restore it.
    let report = check(&store, REPAIR).await;
    assert_eq!(report.repaired, 1, "{:?}", report.problems);
    assert!(
        report.problems.iter().any(|p| p.contains("not repaired")),
        "{:?}",
        report.problems
    );
    assert!(r.storage().metadata.blob(&loose).await.unwrap().is_none());
    assert!(matches!(
        r.stat_blob(&repo, &loose).await,
        Err(Error::BlobUnknown { .. })
    ));
    assert_eq!(check(&store, REPORT).await.problems.len(), 1);

    // Pushing the referenced blob again brings its bytes back.
    push_blob(&r, &repo, b"used layer").await;
    let report = check(&store, REPORT).await;
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(read_blob(&r, &repo, &used).await.unwrap(), b"used layer");
    assert_cleans_up(&r).await;
}

/// A body that yields `first`, then either fails or never finishes.
fn stuck_body(first: usize, fail: bool) -> registry_core::ByteStream {
    let head = futures::stream::iter([Ok(Bytes::from(vec![7u8; first]))]);
    if fail {
        head.chain(futures::stream::iter([Err(std::io::Error::other(
            "client went away",
        ))]))
        .boxed()
    } else {
        head.chain(futures::stream::pending()).boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_that_fail_or_are_cancelled_leave_the_upload_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let blobs = store.clone().into_storage().blobs;
    let (id, repo) = (UploadId::random(), RepoName::parse("fs/append").unwrap());
    let now = Timestamp(1_700_000_000_000);
    blobs.create_upload(&id, &repo, now).await.unwrap();
    assert_eq!(
        blobs
            .append_upload(&id, 0, body(&[b"0123456789"]), now)
            .await
            .unwrap(),
        10
    );

    // Several large blocks reach the disk before the body fails.
    let failed = blobs
        .append_upload(&id, 10, stuck_body(5 << 20, true), now)
        .await;
    assert!(failed.is_err());
    assert_eq!(blobs.upload_info(&id).await.unwrap().unwrap().len, 10);

    // The request future is dropped mid-body (a timeout, a disconnect).
    let cancelled = tokio::time::timeout(
        Duration::from_millis(300),
        blobs.append_upload(&id, 10, stuck_body(3 << 20, false), now),
    )
    .await;
    assert!(cancelled.is_err(), "the append never finishes by itself");
    // The cut runs on the blocking pool; meanwhile the session refuses new appends.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match blobs.append_upload(&id, 10, body(&[b"abc"]), now).await {
            Ok(len) => {
                assert_eq!(len, 13);
                break;
            }
            Err(Error::TooManyRequests { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("append after a cancelled one: {e}"),
        }
    }
    let mut data = Vec::new();
    let mut s = blobs.read_upload(&id).await.unwrap();
    while let Some(c) = s.next().await {
        data.extend_from_slice(&c.unwrap());
    }
    assert_eq!(data, b"0123456789abc");

    // Commit is repeatable and leaves the upload readable until it is deleted.
    let d = Digest::sha256(b"0123456789abc");
    assert_eq!(
        blobs.commit_upload(&id, &d, 13).await.unwrap(),
        CommitOutcome::Stored
    );
    assert_eq!(
        blobs.commit_upload(&id, &d, 13).await.unwrap(),
        CommitOutcome::AlreadyPresent
    );
    assert_eq!(blobs.upload_info(&id).await.unwrap().unwrap().len, 13);
    assert!(
        blobs
            .append_upload(&id, 13, body(&[b"x"]), now)
            .await
            .is_err(),
        "a committed upload takes no more bytes"
    );
    assert!(blobs.delete_upload(&id).await.unwrap());
    assert_eq!(blobs.stat(&d).await.unwrap(), Some(13));
    // The collector's orphan scan reclaims bytes no record claims.
    let r = Registry::builder(store).build();
    let gc = r
        .collect_garbage(&GcOptions {
            orphans: true,
            ..GcOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(gc.orphans_deleted, 1);
    assert_eq!(blobs.stat(&d).await.unwrap(), None);
}

/// Bytes `from..from + len` of a sequence that shows misplaced blocks: byte `i` is
/// `i * 31 / 7` truncated, so no two nearby blocks hold the same bytes.
fn sequence(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| (i * 31 / 7) as u8).collect()
}

/// `total` bytes of [`sequence`] in chunks of `chunk` (a network's uneven frames), then
/// an error if `fail`.
fn chunked_body(total: usize, chunk: usize, fail: bool) -> registry_core::ByteStream {
    let chunks: Vec<std::io::Result<Bytes>> = (0..total)
        .step_by(chunk)
        .map(|at| Ok(Bytes::from(sequence(at, chunk.min(total - at)))))
        .chain(fail.then(|| Err(std::io::Error::other("client went away"))))
        .collect();
    futures::stream::iter(chunks).boxed()
}

/// An append writes one block while it receives the next, blocks growing from 128 KiB
/// to 1 MiB: the bytes must land whole and in order, and a body that fails after
/// several blocks (one of them possibly still being written) must leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_written_while_received_land_in_order_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = FsStore::open(dir.path())
        .await
        .unwrap()
        .into_storage()
        .blobs;
    let repo = RepoName::parse("fs/pipelined").unwrap();
    let now = Timestamp(1_700_000_000_000);
    // Just under, at and over a block boundary, and many blocks.
    for total in [
        (128 << 10) - 1,
        128 << 10,
        (384 << 10) + 1,
        (3 << 20) + 12_345,
    ] {
        let id = UploadId::random();
        blobs.create_upload(&id, &repo, now).await.unwrap();
        let failed = blobs
            .append_upload(&id, 0, chunked_body(total, 100_003, true), now)
            .await;
        assert!(failed.is_err(), "{total} bytes, then an error");
        assert_eq!(blobs.upload_info(&id).await.unwrap().unwrap().len, 0);

        let len = blobs
            .append_upload(&id, 0, chunked_body(total, 100_003, false), now)
            .await
            .unwrap();
        assert_eq!(len, total as u64);
        let mut data = Vec::with_capacity(total);
        let mut s = blobs.read_upload(&id).await.unwrap();
        while let Some(c) = s.next().await {
            data.extend_from_slice(&c.unwrap());
        }
        assert!(data == sequence(0, total), "{total} bytes read back differ");
        assert!(blobs.delete_upload(&id).await.unwrap());
    }
}

/// Verified reads of the fs store hash each block where it is read, with the next block
/// read ahead: a multi-block blob must come back whole and exact, and one corrupted in
/// a middle block must end in an error in place of its last block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_multi_block_reads_are_exact_and_catch_corruption_in_any_block() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let r = Registry::builder(store.clone()).build();
    let repo = repo("fs/blocks");
    // Three full 1 MiB blocks and a short fourth one.
    let data: Vec<u8> = (0..(3 << 20) + 5).map(|i: u32| (i % 251) as u8).collect();
    let d = push_blob(&r, &repo, &data).await;
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);

    let mut tampered = data.clone();
    tampered[(1 << 20) + 17] ^= 1;
    std::fs::write(blob_file(dir.path(), &d), &tampered).unwrap();
    let mut s = r.get_blob(&repo, &d, None).await.unwrap().stream;
    let mut served = 0;
    let mut last = None;
    while let Some(c) = s.next().await {
        match c {
            Ok(c) => served += c.len(),
            Err(e) => last = Some(e),
        }
    }
    assert!(
        last.is_some(),
        "a full read of corrupt bytes must end in an error"
    );
    assert!(served < data.len(), "the last block must be withheld");
}

/// A file verified whole is not hashed again while it is unchanged; any change to it
/// (here: same length, other bytes) makes the next read hash it, and catch it.
#[tokio::test]
async fn a_verified_file_is_hashed_once_until_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let r = Registry::builder(store.clone()).build();
    let repo = repo("fs/marks");
    let data: Vec<u8> = (0..(2 << 20) + 3).map(|i: u32| (i % 249) as u8).collect();
    let d = push_blob(&r, &repo, &data).await;
    // Rewritten with the same bytes outside the registry: no longer the file the push
    // committed, so not marked by it.
    std::fs::write(blob_file(dir.path(), &d), &data).unwrap();
    // A file changed within the last 2 s is never marked (file times are coarse).
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    assert_eq!(store.reads_not_rehashed(), 0);
    tokio::time::sleep(Duration::from_millis(2100)).await;

    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data); // hashed, marked
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data); // not hashed
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    assert_eq!(store.reads_not_rehashed(), 2);
    // Ranges are never hashed, marked or not.
    let part = r
        .get_blob(&repo, &d, Some(registry_core::RangeRequest::FromTo(10, 19)))
        .await
        .unwrap();
    assert_eq!(part.range.unwrap().len(), 10);
    assert_eq!(store.reads_not_rehashed(), 2);

    let mut tampered = data.clone();
    tampered[(1 << 20) + 5] ^= 1;
    std::fs::write(blob_file(dir.path(), &d), &tampered).unwrap();
    assert!(
        read_blob(&r, &repo, &d).await.is_err(),
        "a changed file must be hashed again"
    );
    assert_eq!(store.reads_not_rehashed(), 2);

    // Off: every verified read is hashed.
    std::fs::write(blob_file(dir.path(), &d), &data).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let store = store.remember_verified(false);
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    assert_eq!(store.reads_not_rehashed(), 2);
}

/// A blob file this process committed holds the bytes the registry hashed on their way
/// in: it is marked at once (a monolithic push, a chunked one, a manifest), and its
/// first read is not hashed. A change to it afterwards is still caught, and with marks
/// off every read is hashed.
#[tokio::test]
async fn a_file_this_process_committed_is_not_hashed_on_its_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let r = Registry::builder(store.clone()).build();
    let repo = repo("fs/committed");
    let data = pattern((2 << 20) + 5, 241);
    let d = push_blob(&r, &repo, &data).await;
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    assert_eq!(
        store.reads_not_rehashed(),
        1,
        "a pushed blob is not hashed again"
    );

    // Chunked: two appends, then the commit.
    let chunked = pattern((1 << 20) + 9, 239);
    let cd = Digest::sha256(&chunked);
    let session = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    let (a, b) = chunked.split_at(1 << 19);
    r.append_upload(&repo, &session.id, Some(0), None, body(&[a]))
        .await
        .unwrap();
    r.append_upload(&repo, &session.id, Some(a.len() as u64), None, body(&[b]))
        .await
        .unwrap();
    r.finish_upload(&repo, &session.id, &cd, None)
        .await
        .unwrap();
    assert_eq!(read_blob(&r, &repo, &cd).await.unwrap(), chunked);
    assert_eq!(store.reads_not_rehashed(), 2);

    // Changed after the commit: hashed, and caught.
    let mut tampered = data.clone();
    tampered[1 << 20] ^= 1;
    std::fs::write(blob_file(dir.path(), &d), &tampered).unwrap();
    assert!(read_blob(&r, &repo, &d).await.is_err());
    assert_eq!(store.reads_not_rehashed(), 2);

    // Marks off: a new push is hashed on its first read.
    let store = store.remember_verified(false);
    let other = pattern(70_000, 233);
    let od = push_blob(&r, &repo, &other).await;
    assert_eq!(read_blob(&r, &repo, &od).await.unwrap(), other);
    assert_eq!(store.reads_not_rehashed(), 2);

    // Stored in one call (manifests): marked too; already present: not by this call.
    let dir = tempfile::tempdir().unwrap();
    let blobs = FsBlobStore::open(dir.path()).unwrap();
    let bytes = Bytes::from(pattern(3000, 229));
    let md = Digest::sha256(&bytes);
    let stored = blobs
        .put_bytes(&repo, &md, bytes.clone(), Timestamp(0))
        .await
        .unwrap();
    assert_eq!(stored, CommitOutcome::Stored);
    let mut read = blobs.read_verified(&md, None, true).await.unwrap().unwrap();
    let mut got = Vec::new();
    while let Some(chunk) = read.stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, bytes);
    assert_eq!(blobs.reads_not_rehashed(), 1);
}

/// Bytes of a blob spanning several scrub chunks and read blocks.
fn pattern(len: usize, modulo: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i % modulo) as u8).collect()
}

/// A scrub pass hashes every blob file (not upload files) and marks those that match,
/// as a verified read would: the verified reads after it are not hashed again.
#[tokio::test]
async fn a_scrub_pass_checks_every_blob_and_marks_the_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let scrubber = store.scrubber();
    let r = Registry::builder(store.clone()).build();
    let repo = repo("fs/scrub-good");
    let big = pattern((2 << 20) + 3, 247);
    let blobs = [
        push_blob(&r, &repo, &big).await,
        push_blob(&r, &repo, b"small one").await,
        push_blob(&r, &repo, b"").await,
    ];
    // An upload in progress is not a blob file.
    let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    r.append_upload(&repo, &s.id, Some(0), None, body(&[b"half"]))
        .await
        .unwrap();
    assert_eq!(scrubber.stats(), ScrubStats::default());
    // Only files changed more than 2 s ago are marked (as by verified reads).
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let report = scrubber
        .run_pass(&ScrubOptions::default().unpaced())
        .await
        .unwrap();
    assert_eq!(report.files, 3, "{report}");
    assert_eq!(report.bytes, big.len() as u64 + 9);
    assert!(
        report.corrupt.is_empty() && report.errors.is_empty(),
        "{report:?}"
    );
    assert!(!report.stopped);
    assert!(report.to_string().starts_with("3 files, "), "{report}");
    let stats = store.scrubber().stats();
    assert_eq!(
        (
            stats.passes,
            stats.files,
            stats.bytes,
            stats.corrupt_files,
            stats.read_errors
        ),
        (1, 3, big.len() as u64 + 9, 0, 0)
    );
    assert!(stats.last_pass_end > 1_700_000_000, "{stats:?}");

    assert_eq!(store.reads_not_rehashed(), 0);
    assert_eq!(read_blob(&r, &repo, &blobs[0]).await.unwrap(), big);
    assert_eq!(read_blob(&r, &repo, &blobs[1]).await.unwrap(), b"small one");
    assert_eq!(read_blob(&r, &repo, &blobs[2]).await.unwrap(), b"");
    assert_eq!(store.reads_not_rehashed(), 3, "marked by the scrub");
}

/// A file that does not match its digest is refused by every read before any byte,
/// until it changes: a push of the blob replaces it, a change by hand makes the next
/// verified read hash it, deleting the blob forgets it.
#[tokio::test]
async fn a_blob_found_corrupt_by_a_scrub_is_refused_until_it_is_pushed_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let scrubber = store.scrubber();
    let r = Registry::builder(store.clone()).build();
    let unverified = Registry::builder(store.clone())
        .with_verify_reads(false)
        .build();
    let repo = repo("fs/scrub-corrupt");
    let data = pattern((2 << 20) + 3, 241);
    let d = push_blob(&r, &repo, &data).await;
    let good = push_blob(&r, &repo, b"good neighbour").await;
    let path = blob_file(dir.path(), &d);
    // Same length, other bytes, changed long enough ago to look settled.
    let mut tampered = data.clone();
    tampered[(1 << 20) + 9] ^= 1;
    std::fs::write(&path, &tampered).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let pass = ScrubOptions::default().unpaced();
    let report = scrubber.run_pass(&pass).await.unwrap();
    assert_eq!(
        report.corrupt,
        vec![(d.clone(), path.clone())],
        "{report:?}"
    );
    assert_eq!(report.files, 2);
    assert!(
        report.to_string().contains(", 1 corrupt, 0 errors"),
        "{report}"
    );
    assert_eq!(scrubber.stats().corrupt_files, 1);

    let refused = |read: Result<registry_core::BlobBody, Error>| {
        let Err(e) = read else {
            panic!("a read of a corrupt file was served");
        };
        let text = e.to_string();
        assert!(matches!(e, Error::Storage(_)), "{e:?}");
        assert!(text.contains(d.as_str()), "{text}");
        assert!(text.contains("scrub"), "{text}");
        assert!(text.contains("serve check --verify-digests"), "{text}");
        assert!(text.contains("push the blob again"), "{text}");
    };
    // Refused before any byte: the read itself fails, not its stream.
    for registry in [&r, &unverified] {
        refused(registry.get_blob(&repo, &d, None).await);
        let range = Some(registry_core::RangeRequest::FromTo(0, 9));
        refused(registry.get_blob(&repo, &d, range).await);
    }
    assert_eq!(
        read_blob(&r, &repo, &good).await.unwrap(),
        b"good neighbour"
    );
    // `check` reports it as any corrupt file (and is not failed by the refusal).
    let report = check(&store, REPORT).await;
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains("does not match its digest"));

    // Pushed again, the way clients push: the file is replaced and served.
    push_blob(&r, &repo, &data).await;
    assert_eq!(scrubber.stats().corrupt_files, 0);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    let report = scrubber.run_pass(&pass).await.unwrap();
    assert_eq!((report.files, report.corrupt.len()), (2, 0), "{report:?}");
    let stats = scrubber.stats();
    assert_eq!((stats.passes, stats.corrupt_files), (2, 0), "{stats:?}");
    assert!(check(&store, REPORT).await.problems.is_empty());

    // Changed by other means: no longer the file found corrupt, hashed by the next
    // verified read like any changed file.
    std::fs::write(&path, &tampered).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    scrubber.run_pass(&pass).await.unwrap();
    assert_eq!(scrubber.stats().corrupt_files, 1);
    std::fs::write(&path, &data).unwrap();
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    assert_eq!(scrubber.stats().corrupt_files, 0);
    std::fs::write(&path, &tampered).unwrap();
    assert!(
        read_blob(&r, &repo, &d).await.is_err(),
        "a changed file is hashed again"
    );

    // Deleted: forgotten.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    scrubber.run_pass(&pass).await.unwrap();
    assert_eq!(scrubber.stats().corrupt_files, 1);
    r.delete_blob(&repo, &d).await.unwrap();
    r.collect_garbage(&GcOptions {
        window: Some(Duration::ZERO),
        ..GcOptions::default()
    })
    .await
    .unwrap();
    assert!(!path.exists());
    assert_eq!(scrubber.stats().corrupt_files, 0);
}

/// The pace is a ceiling on bytes over time (a lower bound on a pass's duration, not a
/// speed test), and a stop signal ends a slow pass early with what it has.
#[tokio::test]
async fn a_scrub_pass_keeps_to_its_rate_and_stops_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let scrubber = store.scrubber();
    let r = Registry::builder(store.clone()).build();
    let repo = repo("fs/scrub-pace");
    push_blob(&r, &repo, &pattern(2 << 20, 239)).await;
    push_blob(&r, &repo, &pattern(2 << 20, 233)).await;

    let started = std::time::Instant::now();
    let report = scrubber
        .run_pass(&ScrubOptions::default().with_max_bytes_per_sec(2 << 20))
        .await
        .unwrap();
    assert_eq!((report.files, report.bytes), (2, 4 << 20), "{report:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "4 MiB at 2 MiB/s took {:?}",
        started.elapsed()
    );

    // At 512 KiB/s this pass would take 8 s.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slow = ScrubOptions::default()
        .with_max_bytes_per_sec(512 << 10)
        .with_stop(stop_rx);
    let started = std::time::Instant::now();
    let pass = tokio::spawn({
        let scrubber = scrubber.clone();
        let slow = slow.clone();
        async move { scrubber.run_pass(&slow).await }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stop_tx.send(true).unwrap();
    let report = pass.await.unwrap().unwrap();
    assert!(report.stopped, "{report:?}");
    assert!(report.bytes < 4 << 20, "{report:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(report.to_string().ends_with("(stopped)"), "{report}");
    // A stopped pass is not a completed one.
    assert_eq!(scrubber.stats().passes, 1);
    // Told to stop before it starts: nothing hashed.
    let report = scrubber.run_pass(&slow).await.unwrap();
    assert!(report.stopped && report.bytes == 0, "{report:?}");
}

/// Files removed while a pass runs (by the collector) are skipped, not errors.
#[tokio::test]
async fn a_scrub_pass_skips_files_removed_during_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let scrubber = store.scrubber();
    let r = Registry::builder(store.clone()).build();
    let repo = repo("fs/scrub-vanish");
    let a = push_blob(&r, &repo, &pattern(1 << 20, 229)).await;
    let b = push_blob(&r, &repo, &pattern(1 << 20, 227)).await;
    // At 1 MiB/s, the first chunk is due after a second: both files are gone by then.
    let pass = tokio::spawn({
        let scrubber = scrubber.clone();
        async move {
            scrubber
                .run_pass(&ScrubOptions::default().with_max_bytes_per_sec(1 << 20))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::remove_file(blob_file(dir.path(), &a)).unwrap();
    std::fs::remove_file(blob_file(dir.path(), &b)).unwrap();
    let report = pass.await.unwrap().unwrap();
    assert_eq!(report.files, 0, "{report:?}");
    assert!(
        report.errors.is_empty() && report.corrupt.is_empty(),
        "{report:?}"
    );
    assert!(!report.stopped);
    assert_eq!(scrubber.stats().passes, 1);
}

/// Manifests are blob files too: one found corrupt is refused, and storing its bytes
/// again (here by pushing the image to another repository: the bytes-only path, without
/// an upload session) replaces its file.
#[tokio::test]
async fn a_manifest_found_corrupt_by_a_scrub_is_replaced_when_its_bytes_are_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, other) = (repo("fs/scrub-manifest"), repo("fs/scrub-other"));
    let manifest = image_manifest_with(b"{}", &[b"layer"], None, None);
    // A manifest file, as earlier versions stored every manifest (and this one stores
    // those over the inline limit): the push below finds it and keeps it.
    let md = Digest::sha256(manifest.as_bytes());
    FsBlobStore::open(dir.path())
        .unwrap()
        .put_bytes(&repo, &md, Bytes::from(manifest.clone()), Timestamp(0))
        .await
        .unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let scrubber = store.scrubber();
    let r = Registry::builder(store.clone()).build();
    let (m, _) = push_image(&r, &repo, "v1", b"{}", &[b"layer"]).await;
    assert_eq!(m, md);
    let path = blob_file(dir.path(), &m);
    std::fs::write(&path, manifest.replace("layer", "LAYER")).unwrap();

    let report = scrubber
        .run_pass(&ScrubOptions::default().unpaced())
        .await
        .unwrap();
    assert_eq!(
        report.corrupt,
        vec![(m.clone(), path.clone())],
        "{report:?}"
    );
    assert!(r.get_manifest(&repo, &tag_ref("v1")).await.is_err());

    let (again, _) = push_image(&r, &other, "v1", b"{}", &[b"layer"]).await;
    assert_eq!(again, m);
    assert_eq!(scrubber.stats().corrupt_files, 0);
    let got = r.get_manifest(&repo, &tag_ref("v1")).await.unwrap();
    assert_eq!(got.bytes, manifest.as_bytes());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), manifest);
}

/// Small bytes stored whole (manifests) are kept in meta.redb, not as files: stat,
/// whole and ranged reads, listing and deletion see them, a reopened store still has
/// them, and `check` counts them like files. Bytes over the inline limit, and
/// uploads, are files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bytes_stored_whole_are_kept_in_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let blobs = store.clone().into_storage().blobs;
    let repo = repo("fs/inline");
    let small = Bytes::from(pattern(3000, 229));
    let sd = Digest::sha256(&small);
    let put = |d: Digest, b: Bytes| {
        let blobs = blobs.clone();
        let repo = repo.clone();
        async move { blobs.put_bytes(&repo, &d, b, Timestamp(0)).await.unwrap() }
    };
    assert_eq!(put(sd.clone(), small.clone()).await, CommitOutcome::Stored);
    assert_eq!(
        put(sd.clone(), small.clone()).await,
        CommitOutcome::AlreadyPresent
    );
    assert!(
        !blob_file(dir.path(), &sd).exists(),
        "no file for small bytes"
    );
    assert_eq!(blobs.stat(&sd).await.unwrap(), Some(3000));
    let range = registry_core::store::ByteRange { start: 10, end: 19 };
    let mut read = blobs.read(&sd, Some(range)).await.unwrap().unwrap();
    assert_eq!((read.size, read.range), (3000, Some(range)));
    let mut got = Vec::new();
    while let Some(chunk) = read.stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, &small[10..20]);
    let past = registry_core::store::ByteRange {
        start: 2990,
        end: 3000,
    };
    assert!(matches!(
        blobs.read(&sd, Some(past)).await,
        Err(Error::RangeNotSatisfiable { size: 3000 })
    ));

    // Over the limit: a file, as before.
    let big = Bytes::from(pattern(256 * 1024 + 1, 227));
    let bd = Digest::sha256(&big);
    assert_eq!(put(bd.clone(), big.clone()).await, CommitOutcome::Stored);
    assert!(blob_file(dir.path(), &bd).exists());
    // Uploaded too (a file under the same name): listed once, deleted from both.
    let layer = push_blob(&Registry::builder(store.clone()).build(), &repo, &small).await;
    assert_eq!(layer, sd);
    assert!(blob_file(dir.path(), &sd).exists());
    let mut listed: Vec<Digest> = blobs
        .list()
        .await
        .unwrap()
        .map(|d| d.unwrap())
        .collect()
        .await;
    listed.sort_by_key(|d| d.to_string());
    let mut want = vec![sd.clone(), bd.clone()];
    want.sort_by_key(|d| d.to_string());
    assert_eq!(listed, want);
    assert!(blobs.delete(&sd).await.unwrap());
    assert_eq!(blobs.stat(&sd).await.unwrap(), None);
    assert!(!blob_file(dir.path(), &sd).exists());
    assert!(!blobs.delete(&sd).await.unwrap());
    assert!(blobs.delete(&bd).await.unwrap());
    assert!(blobs.list().await.unwrap().next().await.is_none());
    drop((blobs, store));

    // Through the registry (a new store: the one above lost bytes behind its
    // records' back): the manifest is inline, and survives a reopen.
    let dir = tempfile::tempdir().unwrap();
    let (m, manifest) = {
        let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
        let (m, _) = push_image(&r, &repo, "v1", b"{}", &[b"layer"]).await;
        (m, image_manifest_with(b"{}", &[b"layer"], None, None))
    };
    assert!(!blob_file(dir.path(), &m).exists());
    let store = FsStore::open(dir.path()).await.unwrap();
    let r = Registry::builder(store.clone()).build();
    let got = r.get_manifest(&repo, &tag_ref("v1")).await.unwrap();
    assert_eq!(got.bytes, manifest.as_bytes());
    let report = check(&store, REPORT).await;
    assert!(report.problems.is_empty(), "{report:?}");
    assert_eq!((report.blobs, report.manifests, report.orphans), (3, 1, 0));
    // Collected like any blob once nothing references it.
    r.delete_manifest(&repo, &Reference::Digest(m.clone()))
        .await
        .unwrap();
    let gc = GcOptions {
        window: Some(Duration::ZERO),
        ..GcOptions::default()
    };
    r.collect_garbage(&gc).await.unwrap();
    assert_eq!(
        store.clone().into_storage().blobs.stat(&m).await.unwrap(),
        None
    );
}

/// An inline row damaged behind the registry's back (written straight into redb) is
/// refused by reads, reported by `check`, and replaced when its bytes are stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_inline_blob_is_refused_reported_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, other) = (repo("fs/inline-damaged"), repo("fs/inline-other"));
    let manifest = image_manifest_with(b"{}", &[b"layer"], None, None);
    let m = {
        let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
        push_image(&r, &repo, "v1", b"{}", &[b"layer"]).await.0
    };
    {
        let db = redb::Database::open(dir.path().join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def = redb::TableDefinition::<&str, &[u8]>::new("inline_blobs");
            let mut t = txn.open_table(def).unwrap();
            let damaged = manifest.replace("layer", "LAYER");
            assert!(t.get(m.to_string().as_str()).unwrap().is_some());
            t.insert(m.to_string().as_str(), damaged.as_bytes())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = FsStore::open(dir.path()).await.unwrap();
    let r = Registry::builder(store.clone()).build();
    assert!(r.get_manifest(&repo, &tag_ref("v1")).await.is_err());
    let blobs = store.clone().into_storage().blobs;
    assert!(
        blobs.read_verified(&m, None, true).await.is_err(),
        "a verified read fails before any byte"
    );
    let report = check(&store, REPORT).await;
    assert_eq!(
        report.problems,
        vec![format!("blob {m}: file content does not match its digest")]
    );

    let (again, _) = push_image(&r, &other, "v1", b"{}", &[b"layer"]).await;
    assert_eq!(again, m);
    let got = r.get_manifest(&repo, &tag_ref("v1")).await.unwrap();
    assert_eq!(got.bytes, manifest.as_bytes());
    assert!(check(&store, REPORT).await.problems.is_empty());
}

/// Sessions are created without fsync (a power loss may forget one, or tear its record):
/// a torn record makes the session unknown, never an error, and the next listing (what
/// expiry and the session limits read) removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_record_was_torn_is_unknown_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let blobs = store.clone().into_storage().blobs;
    let repo = RepoName::parse("fs/torn").unwrap();
    let now = Timestamp(1_700_000_000_000);
    let (torn, whole) = (UploadId::random(), UploadId::random());
    blobs.create_upload(&torn, &repo, now).await.unwrap();
    blobs.create_upload(&whole, &repo, now).await.unwrap();
    let record = dir
        .path()
        .join("uploads")
        .join(torn.to_string())
        .join("info.json");
    // As a power loss leaves a file whose size was written but not its bytes.
    std::fs::write(&record, b"{\"repo\":\"fs/to").unwrap();

    assert!(blobs.upload_info(&torn).await.unwrap().is_none());
    let listed: Vec<_> = blobs
        .list_uploads()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(listed, vec![whole.clone()]);
    assert!(
        !dir.path().join("uploads").join(torn.to_string()).exists(),
        "the torn session is removed by the listing"
    );
    // The whole one is untouched and still takes bytes.
    assert_eq!(
        blobs
            .append_upload(&whole, 0, body(&[b"abc"]), now)
            .await
            .unwrap(),
        3
    );
}
