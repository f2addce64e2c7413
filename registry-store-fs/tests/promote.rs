//! Promotion across storage adapters: from the in-memory registry into one on disk,
//! read back after reopening the store; and between two registries over one store.

use bytes::Bytes;
use futures::StreamExt;
use registry_core::testkit::{
    body, image_manifest_with, index_manifest, push_blob, read_blob, repo, tag, tag_ref,
};
use registry_core::{
    Digest, ListOptions, PromoteOptions, PromoteReport, PutManifestOptions, Reference, Registry,
    RepoName, media_type, promote, same_storage,
};
use registry_store_fs::{CheckOptions, FsStore};

async fn push_manifest(r: &Registry, repo: &RepoName, ct: &str, json: String) -> (Digest, u64) {
    let d = Digest::sha256(json.as_bytes());
    let size = json.len() as u64;
    r.put_manifest(
        repo,
        &Reference::Digest(d.clone()),
        ct,
        Bytes::from(json),
        PutManifestOptions::default(),
    )
    .await
    .expect("manifest push");
    (d, size)
}

/// What was pushed to the source: every manifest and blob digest.
struct Pushed {
    index: Digest,
    child: Digest,
    signature: Digest,
    sbom: Digest,
    manifests: Vec<Digest>,
    blobs: Vec<Digest>,
    blob_bytes: u64,
}

/// A two-platform index whose first child has a 3 MiB layer pushed in 48 chunks, with a
/// signature on the index and an SBOM on the first child.
async fn push_fixture(r: &Registry, repo: &RepoName) -> Pushed {
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let big_digest = Digest::sha256(&big);
    let parts: Vec<&[u8]> = big.chunks(64 * 1024).collect();
    r.put_blob(repo, &big_digest, Some(big.len() as u64), body(&parts))
        .await
        .expect("big layer");
    let small: [&[u8]; 6] = [
        br#"{"architecture":"amd64"}"#,
        br#"{"architecture":"arm64"}"#,
        b"arm64 layer",
        b"{}",
        b"signature bytes",
        b"sbom document",
    ];
    for b in small {
        push_blob(r, repo, b).await;
    }
    let [amd64_cfg, arm64_cfg, arm64_layer, empty, sig, sbom] = small;
    let amd64 = push_manifest(
        r,
        repo,
        media_type::OCI_MANIFEST,
        image_manifest_with(amd64_cfg, &[&big], None, None),
    )
    .await;
    let arm64 = push_manifest(
        r,
        repo,
        media_type::OCI_MANIFEST,
        image_manifest_with(arm64_cfg, &[arm64_layer], None, None),
    )
    .await;
    let index = push_manifest(
        r,
        repo,
        media_type::OCI_INDEX,
        index_manifest(&[(&amd64.0, amd64.1), (&arm64.0, arm64.1)]),
    )
    .await;
    let signature = push_manifest(
        r,
        repo,
        media_type::OCI_MANIFEST,
        image_manifest_with(
            empty,
            &[sig],
            Some((&index.0, index.1)),
            Some("application/vnd.example.signature"),
        ),
    )
    .await;
    let sbom_manifest = push_manifest(
        r,
        repo,
        media_type::OCI_MANIFEST,
        image_manifest_with(
            empty,
            &[sbom],
            Some((&amd64.0, amd64.1)),
            Some("application/spdx+json"),
        ),
    )
    .await;
    let mut blobs: Vec<Digest> = small.iter().map(|b| Digest::sha256(b)).collect();
    blobs.push(big_digest);
    Pushed {
        manifests: vec![
            index.0.clone(),
            amd64.0.clone(),
            arm64.0.clone(),
            signature.0.clone(),
            sbom_manifest.0.clone(),
        ],
        index: index.0,
        child: amd64.0,
        signature: signature.0,
        sbom: sbom_manifest.0,
        blobs,
        blob_bytes: small.iter().map(|b| b.len() as u64).sum::<u64>() + big.len() as u64,
    }
}

async fn referrers(r: &Registry, repo: &RepoName, subject: &Digest) -> Vec<Digest> {
    r.referrers(repo, subject, None, &ListOptions::default())
        .await
        .expect("referrers")
        .items
        .into_iter()
        .map(|d| d.digest)
        .collect()
}

#[tokio::test]
async fn promote_from_memory_into_fs_and_read_back_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let ci = Registry::in_memory();
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let pushed = push_fixture(&ci, &src).await;

    let options = PromoteOptions::default().with_tag(tag("v1"));
    {
        let prod = Registry::builder(FsStore::open(dir.path()).await.unwrap()).build();
        let report = promote(&ci, &src, &pushed.index, &prod, &dst, &options)
            .await
            .unwrap();
        assert_eq!(
            report,
            PromoteReport {
                manifests_copied: 5,
                blobs_streamed: 7,
                bytes_streamed: pushed.blob_bytes,
                tagged: Some(tag("v1")),
                ..PromoteReport::default()
            }
        );
        // The registry and its store are dropped here: everything below is read from disk.
    }

    let store = FsStore::open(dir.path()).await.unwrap();
    let prod = Registry::builder(store.clone()).build();
    let tagged = prod.get_manifest(&dst, &tag_ref("v1")).await.unwrap();
    assert_eq!(tagged.meta.digest, pushed.index);
    for m in &pushed.manifests {
        let r = Reference::Digest(m.clone());
        let a = ci.get_manifest(&src, &r).await.unwrap();
        let b = prod.get_manifest(&dst, &r).await.unwrap();
        assert_eq!(a, b, "manifest {m}");
    }
    for d in &pushed.blobs {
        let a = read_blob(&ci, &src, d).await.unwrap();
        let b = read_blob(&prod, &dst, d).await.unwrap();
        assert_eq!(a, b, "blob {d}");
    }
    assert_eq!(
        referrers(&prod, &dst, &pushed.index).await,
        vec![pushed.signature.clone()]
    );
    assert_eq!(
        referrers(&prod, &dst, &pushed.child).await,
        vec![pushed.sbom.clone()]
    );
    // Every file hashes to its name and every count matches the links.
    let check = store
        .check(CheckOptions {
            verify_digests: true,
            repair: false,
        })
        .await
        .unwrap();
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    assert_eq!((check.manifests, check.orphans), (5, 0));

    // Promoting again finds everything on disk.
    let again = promote(&ci, &src, &pushed.index, &prod, &dst, &options)
        .await
        .unwrap();
    assert_eq!(
        again,
        PromoteReport {
            manifests_skipped: 5,
            blobs_skipped: 7,
            tagged: Some(tag("v1")),
            ..PromoteReport::default()
        }
    );
}

#[tokio::test]
async fn registries_over_one_fs_store_mount_instead_of_copying() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).await.unwrap();
    let ci = Registry::builder(store.clone()).build();
    let prod = Registry::builder(store.clone()).build();
    assert!(same_storage(&ci, &prod));
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let pushed = push_fixture(&ci, &src).await;
    let files_before = count_blob_files(dir.path());

    let report = promote(
        &ci,
        &src,
        &pushed.index,
        &prod,
        &dst,
        &PromoteOptions::default(),
    )
    .await
    .unwrap();

    assert_eq!(
        (
            report.blobs_mounted,
            report.blobs_streamed,
            report.bytes_streamed
        ),
        (7, 0, 0)
    );
    assert!(report.shared_storage);
    // The bytes exist once on disk: the promotion added no blob file.
    assert_eq!(count_blob_files(dir.path()), files_before);
    let mut layer = prod
        .get_blob(&dst, pushed.blobs.last().unwrap(), None)
        .await
        .unwrap();
    let mut len = 0;
    while let Some(chunk) = layer.stream.next().await {
        len += chunk.unwrap().len();
    }
    assert_eq!(len, 3 * 1024 * 1024);
}

fn count_blob_files(root: &std::path::Path) -> usize {
    fn walk(p: &std::path::Path, n: &mut usize) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), n);
            } else {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(&root.join("blobs"), &mut n);
    n
}
