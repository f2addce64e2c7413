//! Promotion ([`registry_core::promote`]) through its public API: what is copied,
//! streamed, mounted or skipped, how failures are typed, and that blobs stream without
//! being buffered. (The one test that needs the private referrer page size stays inline
//! in `src/promote.rs`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use registry_core::events::Event;
use registry_core::manifest::media_type;
use registry_core::memory::MemoryStore;
use registry_core::promote::{PromoteError, PromoteOptions, PromoteReport, promote, same_storage};
use registry_core::store::{
    BlobRead, BlobStore, ByteRange, ByteStream, CommitOutcome, Storage, UploadId, UploadInfo,
};
use registry_core::testkit::{
    body, image_manifest_with, index_manifest, push_blob, read_blob, repo, tag, tag_ref,
};
use registry_core::time::Timestamp;
use registry_core::{
    Digest, Error, ListOptions, PutManifestOptions, Reference, Registry, RepoName,
};

/// Pushes a manifest by digest; returns its digest and size.
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

/// Pushes an image manifest and its blobs.
async fn push_image(
    r: &Registry,
    repo: &RepoName,
    config: &[u8],
    layers: &[&[u8]],
    subject: Option<&(Digest, u64)>,
    artifact_type: Option<&str>,
) -> (Digest, u64) {
    push_blob(r, repo, config).await;
    for l in layers {
        push_blob(r, repo, l).await;
    }
    let json = image_manifest_with(config, layers, subject.map(|(d, s)| (d, *s)), artifact_type);
    push_manifest(r, repo, media_type::OCI_MANIFEST, json).await
}

/// A two-platform image with a signature on the index, an SBOM on one child and a
/// signature on that SBOM.
struct MultiArch {
    index: (Digest, u64),
    amd64: (Digest, u64),
    arm64: (Digest, u64),
    index_signature: Digest,
    sbom: Digest,
    sbom_signature: Digest,
    /// Every blob, once each.
    blobs: Vec<Digest>,
    blob_bytes: u64,
}

impl MultiArch {
    fn manifests(&self) -> Vec<Digest> {
        vec![
            self.index.0.clone(),
            self.amd64.0.clone(),
            self.arm64.0.clone(),
            self.index_signature.clone(),
            self.sbom.clone(),
            self.sbom_signature.clone(),
        ]
    }
}

const BLOBS: [&[u8]; 9] = [
    b"base layer shared by both platforms",
    b"amd64 layer",
    b"arm64 layer!",
    br#"{"architecture":"amd64"}"#,
    br#"{"architecture":"arm64"}"#,
    b"{}",
    b"signature of the index",
    b"spdx document",
    b"signature of the sbom",
];

async fn push_multi_arch(r: &Registry, repo: &RepoName) -> MultiArch {
    let [
        base,
        amd64_layer,
        arm64_layer,
        amd64_cfg,
        arm64_cfg,
        empty,
        sig,
        sbom,
        sbom_sig,
    ] = BLOBS;
    let amd64 = push_image(r, repo, amd64_cfg, &[base, amd64_layer], None, None).await;
    let arm64 = push_image(r, repo, arm64_cfg, &[base, arm64_layer], None, None).await;
    let index_json = index_manifest(&[(&amd64.0, amd64.1), (&arm64.0, arm64.1)]);
    let index = push_manifest(r, repo, media_type::OCI_INDEX, index_json).await;
    let signature_type = Some("application/vnd.example.signature");
    let index_signature = push_image(r, repo, empty, &[sig], Some(&index), signature_type).await;
    let sbom = push_image(
        r,
        repo,
        empty,
        &[sbom],
        Some(&amd64),
        Some("application/spdx+json"),
    )
    .await;
    let sbom_signature = push_image(r, repo, empty, &[sbom_sig], Some(&sbom), signature_type).await;
    MultiArch {
        index,
        amd64,
        arm64,
        index_signature: index_signature.0,
        sbom: sbom.0,
        sbom_signature: sbom_signature.0,
        blobs: BLOBS.iter().map(|b| Digest::sha256(b)).collect(),
        blob_bytes: BLOBS.iter().map(|b| b.len() as u64).sum(),
    }
}

/// Every manifest and blob reads back from the destination byte for byte as from
/// the source (reads are verified against their digests on both sides).
async fn assert_same_content(
    from: &Registry,
    from_repo: &RepoName,
    to: &Registry,
    to_repo: &RepoName,
    manifests: &[Digest],
    blobs: &[Digest],
) {
    for m in manifests {
        let r = Reference::Digest(m.clone());
        let a = from
            .get_manifest(from_repo, &r)
            .await
            .expect("source manifest");
        let b = to.get_manifest(to_repo, &r).await.expect("copied manifest");
        assert_eq!(a, b, "manifest {m}");
    }
    for d in blobs {
        let a = read_blob(from, from_repo, d).await.expect("source blob");
        let b = read_blob(to, to_repo, d).await.expect("copied blob");
        assert_eq!(a, b, "blob {d}");
    }
}

async fn referrer_digests(r: &Registry, repo: &RepoName, subject: &Digest) -> Vec<Digest> {
    let page = r
        .referrers(repo, subject, None, &ListOptions::default())
        .await
        .expect("referrers");
    page.items.into_iter().map(|d| d.digest).collect()
}

fn drain(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        out.push(e);
    }
    out
}

#[tokio::test]
async fn single_arch_image_is_streamed_and_tagged() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let (config, layers): (&[u8], [&[u8]; 2]) =
        (b"{\"os\":\"linux\"}", [b"layer one", b"layer two"]);
    let (image, _) = push_image(&ci, &src, config, &layers, None, None).await;

    let options = PromoteOptions::default().with_tag(tag("v1"));
    let report = promote(&ci, &src, &image, &prod, &dst, &options)
        .await
        .unwrap();

    let bytes = (config.len() + layers[0].len() + layers[1].len()) as u64;
    assert_eq!(
        report,
        PromoteReport {
            manifests_copied: 1,
            blobs_streamed: 3,
            bytes_streamed: bytes,
            tagged: Some(tag("v1")),
            ..PromoteReport::default()
        }
    );
    let tagged = prod.stat_manifest(&dst, &tag_ref("v1")).await.unwrap();
    assert_eq!(tagged.digest, image);
    let blobs: Vec<Digest> = [config, layers[0], layers[1]]
        .iter()
        .map(|b| Digest::sha256(b))
        .collect();
    assert_same_content(&ci, &src, &prod, &dst, &[image], &blobs).await;
}

#[tokio::test]
async fn multi_arch_index_children_and_referrers_are_copied() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let img = push_multi_arch(&ci, &src).await;

    let options = PromoteOptions::default().with_tag(tag("stable"));
    let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap();

    // The shared base layer and the referrers' shared empty config go over once.
    assert_eq!(
        report,
        PromoteReport {
            manifests_copied: 6,
            blobs_streamed: 9,
            bytes_streamed: img.blob_bytes,
            tagged: Some(tag("stable")),
            ..PromoteReport::default()
        }
    );
    assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;
    // The destination indexed the referrers under their subjects.
    assert_eq!(
        referrer_digests(&prod, &dst, &img.index.0).await,
        vec![img.index_signature.clone()]
    );
    assert_eq!(
        referrer_digests(&prod, &dst, &img.amd64.0).await,
        vec![img.sbom.clone()]
    );
    assert_eq!(
        referrer_digests(&prod, &dst, &img.sbom).await,
        vec![img.sbom_signature.clone()]
    );
    assert!(referrer_digests(&prod, &dst, &img.arm64.0).await.is_empty());
    let tagged = prod.stat_manifest(&dst, &tag_ref("stable")).await.unwrap();
    assert_eq!(tagged.digest, img.index.0);
}

#[tokio::test]
async fn referrers_can_be_left_behind() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let img = push_multi_arch(&ci, &src).await;

    let options = PromoteOptions::default().with_referrers(false);
    let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap();

    assert_eq!((report.manifests_copied, report.blobs_streamed), (3, 5));
    for referrer in [&img.index_signature, &img.sbom, &img.sbom_signature] {
        let missing = prod
            .stat_manifest(&dst, &Reference::Digest(referrer.clone()))
            .await;
        assert!(
            matches!(missing, Err(Error::ManifestUnknown { .. })),
            "{referrer}"
        );
    }
    assert!(referrer_digests(&prod, &dst, &img.index.0).await.is_empty());
    // A later promotion with referrers adds just them.
    let report = promote(
        &ci,
        &src,
        &img.index.0,
        &prod,
        &dst,
        &PromoteOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            report.manifests_copied,
            report.manifests_skipped,
            report.blobs_streamed
        ),
        (3, 3, 4)
    );
    assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;
}

#[tokio::test]
async fn a_referrer_listing_the_promoted_index_is_put_after_it() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let img = push_multi_arch(&ci, &src).await;
    // A referrer of a child that is itself an index listing the whole image (as an
    // attestation bundle might): it can only be put once the image's index is in.
    let bundle_json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"application/vnd.example.bundle","manifests":[{{"mediaType":"{}","digest":"{}","size":{}}}],"subject":{{"mediaType":"{}","digest":"{}","size":{}}}}}"#,
        media_type::OCI_INDEX,
        media_type::OCI_INDEX,
        img.index.0,
        img.index.1,
        media_type::OCI_MANIFEST,
        img.arm64.0,
        img.arm64.1,
    );
    let (bundle, _) = push_manifest(&ci, &src, media_type::OCI_INDEX, bundle_json).await;

    let options = PromoteOptions::default().with_tag(tag("v1"));
    let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap();

    assert_eq!(report.manifests_copied, 7);
    let mut all = img.manifests();
    all.push(bundle.clone());
    assert_same_content(&ci, &src, &prod, &dst, &all, &img.blobs).await;
    assert_eq!(
        referrer_digests(&prod, &dst, &img.arm64.0).await,
        vec![bundle]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_promotions_of_one_image_both_succeed() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let img = push_multi_arch(&ci, &src).await;
    let options = PromoteOptions::default().with_tag(tag("v1"));

    let (a, b) = tokio::join!(
        promote(&ci, &src, &img.index.0, &prod, &dst, &options),
        promote(&ci, &src, &img.index.0, &prod, &dst, &options),
    );

    let (a, b) = (a.unwrap(), b.unwrap());
    // Between them every manifest was put at least once; each saw all six.
    for r in [&a, &b] {
        assert_eq!(r.manifests_copied + r.manifests_skipped, 6, "{r:?}");
    }
    assert!(a.manifests_copied + b.manifests_copied >= 6);
    assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;
    let tagged = prod.stat_manifest(&dst, &tag_ref("v1")).await.unwrap();
    assert_eq!(tagged.digest, img.index.0);
    let audit = prod.storage().metadata.audit(false).await.unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
}

#[tokio::test]
async fn artifact_manifest_blobs_are_copied() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/chart"), repo("prod/chart"));
    let (image, image_size) = push_image(
        &ci,
        &src,
        b"{\"os\":\"linux\"}",
        &[b"the layer"],
        None,
        None,
    )
    .await;
    // An artifact manifest lists plain blobs (no config, no layers) and refers to the
    // image; none of its blobs is referenced by anything else.
    let data: [&[u8]; 2] = [b"provenance statement", b"a detached signature"];
    for b in data {
        push_blob(&ci, &src, b).await;
    }
    let artifact_json = format!(
        r#"{{"mediaType":"{}","artifactType":"application/vnd.example.provenance","blobs":[{},{}],"subject":{{"mediaType":"{}","digest":"{image}","size":{image_size}}}}}"#,
        media_type::OCI_ARTIFACT_MANIFEST,
        format_args!(
            r#"{{"mediaType":"application/vnd.example.statement","digest":"{}","size":{}}}"#,
            Digest::sha256(data[0]),
            data[0].len()
        ),
        format_args!(
            r#"{{"mediaType":"application/vnd.example.sig","digest":"{}","size":{}}}"#,
            Digest::sha256(data[1]),
            data[1].len()
        ),
        media_type::OCI_MANIFEST,
    );
    let (artifact, _) =
        push_manifest(&ci, &src, media_type::OCI_ARTIFACT_MANIFEST, artifact_json).await;

    let report = promote(&ci, &src, &image, &prod, &dst, &PromoteOptions::default())
        .await
        .unwrap();

    assert_eq!((report.manifests_copied, report.blobs_streamed), (2, 4));
    let data_digests: Vec<Digest> = data.iter().map(|b| Digest::sha256(b)).collect();
    assert_same_content(
        &ci,
        &src,
        &prod,
        &dst,
        &[image.clone(), artifact.clone()],
        &data_digests,
    )
    .await;
    assert_eq!(
        referrer_digests(&prod, &dst, &image).await,
        vec![artifact.clone()]
    );

    // The artifact can be promoted on its own, too.
    let other = repo("prod/provenance");
    let report = promote(
        &ci,
        &src,
        &artifact,
        &prod,
        &other,
        &PromoteOptions::default(),
    )
    .await
    .unwrap();
    // Its blobs are already in the destination (in prod/chart): mounted, not streamed.
    assert_eq!(
        (
            report.manifests_copied,
            report.blobs_mounted,
            report.blobs_streamed
        ),
        (1, 2, 0)
    );
    assert_same_content(&ci, &src, &prod, &other, &[artifact], &data_digests).await;
}

#[tokio::test]
async fn second_promotion_skips_everything_and_changes_nothing() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let img = push_multi_arch(&ci, &src).await;
    let options = PromoteOptions::default().with_tag(tag("v2"));
    promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap();
    let stats_before = prod.storage().metadata.stats().await.unwrap();
    let mut events = prod.subscribe();

    let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap();

    assert_eq!(
        report,
        PromoteReport {
            manifests_skipped: 6,
            blobs_skipped: 9,
            tagged: Some(tag("v2")),
            ..PromoteReport::default()
        }
    );
    assert_eq!(
        drain(&mut events),
        Vec::new(),
        "a repeated promotion changes nothing"
    );
    assert_eq!(prod.storage().metadata.stats().await.unwrap(), stats_before);
}

#[tokio::test]
async fn shared_storage_mounts_and_separate_storage_streams() {
    let storage = MemoryStore::new().into_storage();
    let ci = Registry::builder(storage.clone()).build();
    let prod = Registry::builder(storage.clone()).build();
    let separate = Registry::in_memory();
    assert!(same_storage(&ci, &prod));
    assert!(!same_storage(&ci, &separate));
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let img = push_multi_arch(&ci, &src).await;
    let mut events = prod.subscribe();

    let options = PromoteOptions::default().with_tag(tag("v1"));
    let shared = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap();

    assert_eq!(
        shared,
        PromoteReport {
            manifests_copied: 6,
            blobs_mounted: 9,
            shared_storage: true,
            tagged: Some(tag("v1")),
            ..PromoteReport::default()
        }
    );
    let mounted_from_source = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::BlobMounted { from, .. } if from == &src))
        .count();
    assert_eq!(mounted_from_source, 9);
    assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;

    let streamed = promote(&ci, &src, &img.index.0, &separate, &dst, &options)
        .await
        .unwrap();
    assert_eq!((streamed.blobs_mounted, streamed.blobs_streamed), (0, 9));
    assert_eq!(streamed.bytes_streamed, img.blob_bytes);
    assert!(!streamed.shared_storage);
    assert_same_content(&ci, &src, &separate, &dst, &img.manifests(), &img.blobs).await;
}

#[tokio::test]
async fn sharing_only_the_blob_store_is_not_shared_storage() {
    let a = MemoryStore::new().into_storage();
    let b = MemoryStore::new().into_storage();
    let ci = Registry::builder(a.clone()).build();
    // Same bytes, separate metadata: the destination's collector would not count
    // links held in the source's metadata, so nothing may be linked across.
    let prod = Registry::builder(Storage {
        blobs: a.blobs.clone(),
        metadata: b.metadata.clone(),
    })
    .build();
    assert!(!same_storage(&ci, &prod));
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let (image, _) = push_image(&ci, &src, b"{}", &[b"only layer"], None, None).await;

    let report = promote(&ci, &src, &image, &prod, &dst, &PromoteOptions::default())
        .await
        .unwrap();

    assert_eq!((report.blobs_mounted, report.blobs_streamed), (0, 2));
    assert!(!report.shared_storage);
    // The destination's own metadata now records the blobs.
    assert!(
        prod.storage()
            .metadata
            .blob_link(&dst, &Digest::sha256(b"only layer"))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn blobs_the_destination_holds_elsewhere_are_mounted() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let base: &[u8] = b"a base layer production already has";
    push_blob(&prod, &repo("prod/base"), base).await;
    let (image, _) = push_image(&ci, &src, b"{}", &[base, b"app layer"], None, None).await;

    let report = promote(&ci, &src, &image, &prod, &dst, &PromoteOptions::default())
        .await
        .unwrap();

    assert_eq!((report.blobs_mounted, report.blobs_streamed), (1, 2));
    assert_eq!(report.bytes_streamed, (2 + b"app layer".len()) as u64);
    let blobs = [Digest::sha256(base), Digest::sha256(b"app layer")];
    assert_same_content(&ci, &src, &prod, &dst, &[image], &blobs).await;
}

#[tokio::test]
async fn missing_source_blob_fails_typed_without_tagging_and_a_retry_resumes() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let img = push_multi_arch(&ci, &src).await;
    // Production's tag points at an older release; a failed promotion leaves it.
    let (old, _) = push_image(&prod, &dst, b"{}", &[b"old release"], None, None).await;
    prod.tag_manifest(&dst, &tag("stable"), &old).await.unwrap();
    // The source lost the bytes of the arm64 layer.
    let lost: &[u8] = BLOBS[2];
    let lost_digest = Digest::sha256(lost);
    assert!(ci.storage().blobs.delete(&lost_digest).await.unwrap());

    let options = PromoteOptions::default().with_tag(tag("stable"));
    let err = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap_err();

    match &err {
        PromoteError::SourceBlobMissing {
            repo,
            digest,
            referenced_by,
        } => {
            assert_eq!(
                (repo, digest, referenced_by),
                (&src, &lost_digest, &img.arm64.0)
            );
        }
        other => panic!("expected SourceBlobMissing, got {other:?}"),
    }
    assert!(err.to_string().contains(lost_digest.as_str()), "{err}");
    assert_eq!(
        prod.stat_manifest(&dst, &tag_ref("stable"))
            .await
            .unwrap()
            .digest,
        old
    );
    let index = prod
        .stat_manifest(&dst, &Reference::Digest(img.index.0.clone()))
        .await;
    assert!(matches!(index, Err(Error::ManifestUnknown { .. })));

    // Once the source has the bytes again, a retry finishes, reusing what was copied.
    push_blob(&ci, &src, lost).await;
    let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap();
    assert_eq!(report.manifests_copied + report.manifests_skipped, 6);
    assert_eq!(report.blobs_streamed + report.blobs_skipped, 9);
    assert_eq!(
        prod.stat_manifest(&dst, &tag_ref("stable"))
            .await
            .unwrap()
            .digest,
        img.index.0
    );
    assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;
}

#[tokio::test]
async fn failure_after_the_root_is_copied_still_leaves_it_untagged() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let img = push_multi_arch(&ci, &src).await;
    // The index's signature is copied after the index itself (subject first).
    let lost = Digest::sha256(BLOBS[6]);
    assert!(ci.storage().blobs.delete(&lost).await.unwrap());

    let options = PromoteOptions::default().with_tag(tag("stable"));
    let err = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap_err();

    assert!(
        matches!(&err, PromoteError::SourceBlobMissing { digest, referenced_by, .. }
            if digest == &lost && referenced_by == &img.index_signature),
        "{err:?}"
    );
    // The index made it into the destination, but by digest only.
    let root = Reference::Digest(img.index.0.clone());
    assert!(prod.stat_manifest(&dst, &root).await.is_ok());
    assert!(matches!(
        prod.stat_manifest(&dst, &tag_ref("stable")).await,
        Err(Error::ManifestUnknown { .. })
    ));
}

#[tokio::test]
async fn a_referrer_the_source_cannot_serve_fails_the_promotion() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let img = push_multi_arch(&ci, &src).await;
    // The source still lists the signature but lost its bytes: promoting without it
    // would silently drop a signature, so the promotion fails and names it.
    assert!(
        ci.storage()
            .blobs
            .delete(&img.index_signature)
            .await
            .unwrap()
    );

    let options = PromoteOptions::default().with_tag(tag("v1"));
    let err = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap_err();

    assert!(
        matches!(&err, PromoteError::SourceManifestMissing { digest, referenced_by: Some(s), .. }
            if digest == &img.index_signature && s == &img.index.0),
        "{err:?}"
    );
    assert!(prod.stat_manifest(&dst, &tag_ref("v1")).await.is_err());
}

#[tokio::test]
async fn missing_source_manifests_are_typed_errors() {
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let unknown = Digest::sha256(b"never pushed");
    let options = PromoteOptions::default().with_tag(tag("v1"));
    let err = promote(&ci, &src, &unknown, &prod, &dst, &options)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PromoteError::SourceManifestMissing { digest, referenced_by: None, .. } if digest == &unknown),
        "{err:?}"
    );
    assert!(matches!(Error::from(err), Error::ManifestUnknown { .. }));
    assert!(matches!(
        prod.list_tags(&dst, &ListOptions::default()).await,
        Err(Error::NameUnknown { .. })
    ));

    // An index child whose bytes the source lost is named with the index listing it.
    let img = push_multi_arch(&ci, &src).await;
    assert!(ci.storage().blobs.delete(&img.amd64.0).await.unwrap());
    let err = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PromoteError::SourceManifestMissing { digest, referenced_by: Some(p), .. }
            if digest == &img.amd64.0 && p == &img.index.0),
        "{err:?}"
    );
    assert!(prod.stat_manifest(&dst, &tag_ref("v1")).await.is_err());
}

#[tokio::test]
async fn destination_refusal_is_passed_through_unchanged() {
    let ci = Registry::in_memory();
    let prod = Registry::builder(MemoryStore::new())
        .with_max_blob_size(16)
        .build();
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    let (old, _) = push_image(&prod, &dst, b"{}", &[b"small"], None, None).await;
    prod.tag_manifest(&dst, &tag("v1"), &old).await.unwrap();
    let big: &[u8] = b"a layer longer than sixteen bytes";
    let (image, _) = push_image(&ci, &src, b"{}", &[big], None, None).await;

    let options = PromoteOptions::default().with_tag(tag("v1"));
    let err = promote(&ci, &src, &image, &prod, &dst, &options)
        .await
        .unwrap_err();

    assert!(
        matches!(
            err.destination_error(),
            Some(Error::TooLarge {
                what: "blob",
                limit: 16
            })
        ),
        "{err:?}"
    );
    assert!(
        matches!(&err, PromoteError::Destination { digest, .. } if digest == &Digest::sha256(big))
    );
    assert!(matches!(Error::from(err), Error::TooLarge { .. }));
    assert_eq!(
        prod.stat_manifest(&dst, &tag_ref("v1"))
            .await
            .unwrap()
            .digest,
        old
    );
    assert!(
        prod.stat_manifest(&dst, &Reference::Digest(image))
            .await
            .is_err()
    );
}

/// Replaces the stored bytes of `digest` with `bytes` (same length) behind the
/// registry's back, as disk corruption would.
async fn corrupt(storage: &Storage, src: &RepoName, digest: &Digest, bytes: &[u8]) {
    let blobs = &storage.blobs;
    assert!(blobs.delete(digest).await.unwrap());
    let id = UploadId::random();
    blobs.create_upload(&id, src, Timestamp(0)).await.unwrap();
    blobs
        .append_upload(&id, 0, body(&[bytes]), Timestamp(0))
        .await
        .unwrap();
    blobs
        .commit_upload(&id, digest, bytes.len() as u64)
        .await
        .unwrap();
    blobs.delete_upload(&id).await.unwrap();
}

#[tokio::test]
async fn corrupt_source_bytes_are_a_source_error_whether_or_not_the_source_verifies() {
    for verify_reads in [true, false] {
        let storage = MemoryStore::new().into_storage();
        let ci = Registry::builder(storage.clone())
            .with_verify_reads(verify_reads)
            .build();
        let prod = Registry::in_memory();
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let layer: &[u8] = b"the genuine layer";
        let (image, _) = push_image(&ci, &src, b"{}", &[layer], None, None).await;
        let layer_digest = Digest::sha256(layer);
        corrupt(&storage, &src, &layer_digest, b"a tampered layer!").await;

        let options = PromoteOptions::default().with_tag(tag("v1"));
        let err = promote(&ci, &src, &image, &prod, &dst, &options)
            .await
            .unwrap_err();

        assert!(
            matches!(&err, PromoteError::Source { digest, .. } if digest == &layer_digest),
            "verify_reads {verify_reads}: {err:?}"
        );
        assert!(prod.stat_blob(&dst, &layer_digest).await.is_err());
        assert!(prod.stat_manifest(&dst, &tag_ref("v1")).await.is_err());
    }
}

/// Counts bytes read from one store and bytes consumed by another, to measure how
/// far reading runs ahead of writing.
#[derive(Default)]
struct Flow {
    produced: AtomicU64,
    consumed: AtomicU64,
    max_ahead: AtomicU64,
}

/// A blob store that reports its reads and appends to a [`Flow`].
struct Spy {
    inner: Arc<dyn BlobStore>,
    flow: Arc<Flow>,
}

#[async_trait]
impl BlobStore for Spy {
    async fn stat(&self, digest: &Digest) -> registry_core::Result<Option<u64>> {
        self.inner.stat(digest).await
    }
    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> registry_core::Result<Option<BlobRead>> {
        let Some(mut read) = self.inner.read(digest, range).await? else {
            return Ok(None);
        };
        let flow = self.flow.clone();
        read.stream = read
            .stream
            .inspect(move |chunk| {
                if let Ok(c) = chunk {
                    let produced =
                        flow.produced.fetch_add(c.len() as u64, Ordering::SeqCst) + c.len() as u64;
                    let ahead = produced - flow.consumed.load(Ordering::SeqCst);
                    flow.max_ahead.fetch_max(ahead, Ordering::SeqCst);
                }
            })
            .boxed();
        Ok(Some(read))
    }
    async fn delete(&self, digest: &Digest) -> registry_core::Result<bool> {
        self.inner.delete(digest).await
    }
    async fn list(
        &self,
    ) -> registry_core::Result<BoxStream<'static, registry_core::Result<Digest>>> {
        self.inner.list().await
    }
    async fn create_upload(
        &self,
        id: &UploadId,
        repo: &RepoName,
        now: Timestamp,
    ) -> registry_core::Result<()> {
        self.inner.create_upload(id, repo, now).await
    }
    async fn upload_info(&self, id: &UploadId) -> registry_core::Result<Option<UploadInfo>> {
        self.inner.upload_info(id).await
    }
    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        data: ByteStream,
        now: Timestamp,
    ) -> registry_core::Result<u64> {
        let flow = self.flow.clone();
        let data = data
            .inspect(move |chunk| {
                if let Ok(c) = chunk {
                    flow.consumed.fetch_add(c.len() as u64, Ordering::SeqCst);
                }
            })
            .boxed();
        self.inner.append_upload(id, offset, data, now).await
    }
    async fn read_upload(&self, id: &UploadId) -> registry_core::Result<ByteStream> {
        self.inner.read_upload(id).await
    }
    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> registry_core::Result<CommitOutcome> {
        self.inner.commit_upload(id, digest, len).await
    }
    async fn delete_upload(&self, id: &UploadId) -> registry_core::Result<bool> {
        self.inner.delete_upload(id).await
    }
    async fn list_uploads(&self) -> registry_core::Result<Vec<UploadInfo>> {
        self.inner.list_uploads().await
    }
}

fn spied(flow: &Arc<Flow>) -> Storage {
    let s = MemoryStore::new().into_storage();
    Storage {
        blobs: Arc::new(Spy {
            inner: s.blobs,
            flow: flow.clone(),
        }),
        metadata: s.metadata,
    }
}

#[tokio::test]
async fn blobs_stream_chunk_by_chunk_without_buffering() {
    let flow = Arc::new(Flow::default());
    let ci = Registry::builder(spied(&flow)).build();
    let prod = Registry::builder(spied(&flow)).build();
    let (src, dst) = (repo("ci/app"), repo("prod/app"));
    const CHUNK: usize = 64 * 1024;
    let chunks: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; CHUNK]).collect();
    let whole: Vec<u8> = chunks.concat();
    let layer = Digest::sha256(&whole);
    let parts: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    ci.put_blob(&src, &layer, Some(whole.len() as u64), body(&parts))
        .await
        .unwrap();
    push_blob(&ci, &src, b"{}").await;
    let json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{}}}]}}"#,
        media_type::OCI_MANIFEST,
        Digest::sha256(b"{}"),
        whole.len()
    );
    let (image, manifest_size) = push_manifest(&ci, &src, media_type::OCI_MANIFEST, json).await;
    for counter in [&flow.produced, &flow.consumed, &flow.max_ahead] {
        counter.store(0, Ordering::SeqCst);
    }

    let report = promote(&ci, &src, &image, &prod, &dst, &PromoteOptions::default())
        .await
        .unwrap();

    assert_eq!(report.bytes_streamed, whole.len() as u64 + 2);
    // The destination received the blobs' bytes and the manifest's, nothing else.
    assert_eq!(
        flow.consumed.load(Ordering::SeqCst),
        whole.len() as u64 + 2 + manifest_size
    );
    // At most one chunk is read before the destination has taken the one before it:
    // memory per blob is one chunk, not the blob (4 MiB here). The manifest, read
    // first and put after its blobs, is the only other thing held.
    let ahead = flow.max_ahead.load(Ordering::SeqCst);
    assert!(
        ahead > manifest_size && ahead <= CHUNK as u64 + manifest_size,
        "read ran {ahead} bytes ahead"
    );
    assert_eq!(read_blob(&prod, &dst, &layer).await.unwrap(), whole);
}

#[tokio::test]
async fn sync_copies_every_tag_of_a_repository_and_a_second_sync_copies_nothing() {
    use registry_core::{Tag, fixtures};
    let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
    let (src, dst) = (repo("ci/app"), repo("mirror/app"));
    let mut expected = Vec::new();
    for (i, tag) in ["v1", "v2", "latest"].into_iter().enumerate() {
        let image = fixtures::image()
            .seed(i as u64)
            .push(&ci, &src, tag)
            .await
            .unwrap();
        expected.push((Tag::parse(tag).unwrap(), image.manifest.digest));
    }
    // Through the trait objects, as with a remote registry on either side.
    let report = registry_core::sync(&ci, &src, &prod, &dst, &PromoteOptions::default())
        .await
        .unwrap();
    expected.sort();
    let mut synced = report.tags.clone();
    synced.sort();
    assert_eq!(synced, expected);
    assert_eq!(report.totals.manifests_copied, 3);
    for (tag, digest) in &expected {
        let got = prod
            .get_manifest(&dst, &Reference::Tag(tag.clone()))
            .await
            .unwrap();
        assert_eq!(&got.meta.digest, digest);
    }
    let again = registry_core::sync(&ci, &src, &prod, &dst, &PromoteOptions::default())
        .await
        .unwrap();
    assert_eq!(again.totals.manifests_copied, 0);
    assert_eq!(again.totals.bytes_streamed, 0);

    let missing = registry_core::sync(
        &ci,
        &repo("ci/none"),
        &prod,
        &dst,
        &PromoteOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(missing, PromoteError::SourceTags { tag: None, .. }),
        "{missing:?}"
    );
}
