//! Behaviour only a store on disk has: reopening, and files changed behind our back.

use bytes::Bytes;
use futures::StreamExt;
use registry_core::{Algorithm, Digest, Registry, RepoName};
use registry_store_fs::{CheckOptions, FsStore};

fn body(data: &'static [u8]) -> registry_core::ByteStream {
    futures::stream::iter([Ok(Bytes::from_static(data))]).boxed()
}

#[tokio::test]
async fn chunked_upload_continues_after_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let repo = RepoName::parse("fs/resume").unwrap();
    let id = {
        let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
        let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
        r.append_upload(
            &repo,
            &s.id,
            Some(0),
            None,
            body(b"written before the restart, "),
        )
        .await
        .unwrap();
        s.id
        // Everything is dropped here: the database closes, the hash state is lost.
    };
    let r = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
    let status = r.upload_status(&repo, &id).await.unwrap();
    assert_eq!(status.offset, 28);
    r.append_upload(&repo, &id, Some(28), None, body(b"and after"))
        .await
        .unwrap();
    let d = Digest::sha256(b"written before the restart, and after");
    r.finish_upload(&repo, &id, &d, None).await.unwrap();
    let mut s = r.get_blob(&repo, &d, None).await.unwrap().stream;
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    assert_eq!(out, b"written before the restart, and after");
}

#[tokio::test]
async fn a_blob_altered_on_disk_is_detected_and_never_served_as_valid() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let r = Registry::builder(store.clone()).build();
    let repo = RepoName::parse("fs/corrupt").unwrap();
    let d = Digest::sha256(b"original content");
    r.put_blob(&repo, &d, None, body(b"original content"))
        .await
        .unwrap();
    let clean = store
        .check(CheckOptions {
            verify_digests: true,
            repair: false,
        })
        .await
        .unwrap();
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);

    // Same length, different bytes: only hashing can tell.
    let path = dir
        .path()
        .join("blobs/sha256")
        .join(&d.hex()[..2])
        .join(d.hex());
    std::fs::write(&path, b"tampered content").unwrap();

    let report = store
        .check(CheckOptions {
            verify_digests: true,
            repair: false,
        })
        .await
        .unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains("does not match its digest"));

    let mut s = r.get_blob(&repo, &d, None).await.unwrap().stream;
    let mut failed = false;
    while let Some(c) = s.next().await {
        failed |= c.is_err();
    }
    assert!(failed, "a full read of corrupt bytes must end in an error");
}
