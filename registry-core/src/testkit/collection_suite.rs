//! Collection and its races with pushes, mounts, tags and other collectors, run by
//! every store as part of the shared suite (re-exported from [`super::suite`]). The
//! races use the pause points of [`hooks`] for deterministic
//! interleavings (`docs/design.md` §4.3 and §4.6).

use std::sync::Arc;
use std::time::Duration;

use super::suite::put_manifest;
use super::*;
use crate::manifest::media_type::{OCI_INDEX, OCI_MANIFEST};
use crate::store::BlobState;
use crate::testkit::hooks;
use crate::time::ManualClock;

/// Collection never takes a blob that a manifest references or that is inside its
/// protection window; it takes the rest.
pub async fn collection_respects_protection(f: Fixture) {
    let (b, clock) = f.builder();
    let r = b.with_protection_window(Duration::from_secs(600)).build();
    let repo = repo("suite/gc");
    let (m, _) = push_image(&r, &repo, "v1", b"{}", &[b"kept layer"]).await;
    let loose = push_blob(&r, &repo, b"uploaded, no manifest yet").await;
    let report = r.collect_garbage(&GcOptions::default()).await.unwrap();
    assert_eq!((report.links_removed, report.blobs_deleted), (0, 0));
    assert_eq!(report.links_protected, 1);
    // A HEAD (stat) late in the window extends the protection.
    clock.advance(Duration::from_secs(500));
    r.stat_blob(&repo, &loose).await.unwrap();
    clock.advance(Duration::from_secs(200));
    let report = r.collect_garbage(&GcOptions::default()).await.unwrap();
    assert_eq!(report.links_removed, 0, "refreshed by the HEAD");
    clock.advance(Duration::from_secs(601));
    let dry = r
        .collect_garbage(&GcOptions {
            dry_run: true,
            ..GcOptions::default()
        })
        .await
        .unwrap();
    assert_eq!((dry.links_removed, dry.blobs_deleted), (1, 0));
    // (Checked in the metadata: a HEAD would refresh the protection.)
    let link = r.storage().metadata.blob_link(&repo, &loose).await.unwrap();
    assert!(link.is_some(), "dry run changes nothing");
    let report = r.collect_garbage(&GcOptions::default()).await.unwrap();
    assert_eq!((report.links_removed, report.blobs_deleted), (1, 1));
    assert_eq!(report.bytes_freed, 25);
    assert!(matches!(
        r.stat_blob(&repo, &loose).await,
        Err(Error::BlobUnknown { .. })
    ));
    // The image is untouched.
    assert_eq!(
        read_blob(&r, &repo, &Digest::sha256(b"kept layer"))
            .await
            .unwrap(),
        b"kept layer"
    );
    assert!(r.get_manifest(&repo, &Reference::Digest(m)).await.is_ok());
    assert_cleans_up(&r).await;
}

fn hooked(f: &Fixture, hooks: &hooks::Hooks) -> (Registry, ManualClock) {
    let clock = ManualClock::new(Timestamp(1_700_000_000_000));
    let r = Registry::builder(hooks.wrap(f.storage.clone()))
        .with_clock(Arc::new(clock.clone()))
        .with_protection_window(Duration::ZERO)
        .build();
    (r, clock)
}

fn gc_all() -> GcOptions {
    GcOptions {
        window: Some(Duration::ZERO),
        untagged: crate::UntaggedPolicy::Collect,
        ..GcOptions::default()
    }
}

/// Race: an upload of the same bytes finishes while a collection is deleting them. The
/// uploader waits for the collector's lease, then commits again; the blob is readable
/// and live afterwards.
pub async fn race_upload_during_sweep(f: Fixture) {
    let hooks = hooks::Hooks::new();
    let (r, _) = hooked(&f, &hooks);
    let repo = repo("suite/race-upload");
    let d = push_blob(&r, &repo, b"contended bytes").await;
    r.delete_blob(&repo, &d).await.unwrap();
    let mut pause = hooks.arm("blobs.delete");
    let gc = tokio::spawn({
        let r = r.clone();
        async move { r.collect_garbage(&gc_all()).await.unwrap() }
    });
    pause.reached().await;
    let upload = tokio::spawn({
        let (r, repo) = (r.clone(), repo.clone());
        async move { push_blob(&r, &repo, b"contended bytes").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !upload.is_finished(),
        "the upload waits for the collector's lease"
    );
    pause.release();
    assert_eq!(gc.await.unwrap().blobs_deleted, 1);
    assert_eq!(upload.await.unwrap(), d);
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), b"contended bytes");
    let rec = r.storage().metadata.blob(&d).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.links), (BlobState::Live, 1));
    assert_cleans_up(&r).await;
}

/// Race: a manifest push referencing a blob whose link the collector is removing. If the
/// push comes first the collector's atomic re-check keeps the link; if the collector
/// comes first the push is refused (never accepted with a missing blob).
pub async fn race_manifest_put_vs_link_collection(f: Fixture) {
    let hooks = hooks::Hooks::new();
    let (r, _) = hooked(&f, &hooks);
    let repo = repo("suite/race-manifest");
    push_blob(&r, &repo, b"{}").await;
    push_blob(&r, &repo, b"layer").await;
    let m = image_manifest(b"{}", &[b"layer"]);
    // Push first, while the collector is paused right before removing the links.
    let mut pause = hooks.arm("meta.collect_blob_link");
    let gc = tokio::spawn({
        let r = r.clone();
        async move { r.collect_garbage(&gc_all()).await.unwrap() }
    });
    pause.reached().await;
    put_manifest(&r, &repo, &tag_ref("v1"), OCI_MANIFEST, &m)
        .await
        .unwrap();
    pause.release();
    let report = gc.await.unwrap();
    assert_eq!(report.links_removed, 0, "{report:?}");
    assert_eq!(
        read_blob(&r, &repo, &Digest::sha256(b"layer"))
            .await
            .unwrap(),
        b"layer"
    );
    // Collector first: the links go, and the push is refused.
    r.delete_manifest(&repo, &tag_ref("v1")).await.unwrap();
    r.delete_manifest(&repo, &Reference::Digest(Digest::sha256(m.as_bytes())))
        .await
        .unwrap();
    let mut pause = hooks.arm("meta.put_manifest");
    let push = tokio::spawn({
        let (r, repo, m) = (r.clone(), repo.clone(), m.clone());
        async move { put_manifest(&r, &repo, &tag_ref("v2"), OCI_MANIFEST, &m).await }
    });
    pause.reached().await;
    assert_eq!(r.collect_garbage(&gc_all()).await.unwrap().links_removed, 2);
    pause.release();
    let e = push.await.unwrap().unwrap_err();
    assert!(matches!(e, Error::ManifestBlobUnknown { .. }), "{e:?}");
    assert!(matches!(
        r.get_manifest(&repo, &tag_ref("v2")).await,
        Err(Error::ManifestUnknown { .. })
    ));
    assert_cleans_up(&r).await;
}

/// Race: a mount from a repository whose link is being deleted. Either the mount reads
/// the source link first (and then pins the blob itself) or it finds nothing and the
/// client uploads; never a link to bytes about to vanish.
pub async fn race_mount_vs_source_delete(f: Fixture) {
    let hooks = hooks::Hooks::new();
    let (r, _) = hooked(&f, &hooks);
    let (src, dst) = (repo("suite/race-src"), repo("suite/race-dst"));
    let d = push_blob(&r, &src, b"mounted").await;
    // Delete first, mount second: no mount.
    let mut pause = hooks.arm("meta.mount_blob");
    let mount = tokio::spawn({
        let (r, src, dst, d) = (r.clone(), src.clone(), dst.clone(), d.clone());
        async move {
            r.mount_blob(&dst, &d, Some(&src), &crate::AllowAll)
                .await
                .unwrap()
        }
    });
    pause.reached().await;
    r.delete_blob(&src, &d).await.unwrap();
    r.collect_garbage(&gc_all()).await.unwrap();
    pause.release();
    assert!(!mount.await.unwrap());
    assert!(matches!(
        r.stat_blob(&dst, &d).await,
        Err(Error::BlobUnknown { .. })
    ));
    // Mount first, delete second: the target keeps the blob.
    push_blob(&r, &src, b"mounted").await;
    let mut pause = hooks.arm("meta.unlink_blob");
    let delete = tokio::spawn({
        let (r, src, d) = (r.clone(), src.clone(), d.clone());
        async move { r.delete_blob(&src, &d).await }
    });
    pause.reached().await;
    assert!(
        r.mount_blob(&dst, &d, Some(&src), &crate::AllowAll)
            .await
            .unwrap()
    );
    pause.release();
    delete.await.unwrap().unwrap();
    r.collect_garbage(&GcOptions {
        window: Some(Duration::from_secs(600)),
        ..GcOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(read_blob(&r, &dst, &d).await.unwrap(), b"mounted");
    assert_cleans_up(&r).await;
}

/// Race: a tag moved onto an untagged manifest while the collector is about to delete
/// it. The collector's atomic re-check sees the tag and keeps the manifest.
pub async fn race_tag_move_during_collection(f: Fixture) {
    let hooks = hooks::Hooks::new();
    let (r, _) = hooked(&f, &hooks);
    let repo = repo("suite/race-tag");
    let (old, _) = push_image(&r, &repo, "v1", b"{\"v\":1}", &[b"l1"]).await;
    push_image(&r, &repo, "v1", b"{\"v\":2}", &[b"l2"]).await;
    // `old` is now untagged: a candidate under the collect-untagged policy.
    let mut pause = hooks.arm("meta.collect_manifest");
    let gc = tokio::spawn({
        let r = r.clone();
        async move { r.collect_garbage(&gc_all()).await.unwrap() }
    });
    pause.reached().await;
    r.tag_manifest(&repo, &tag("rollback"), &old).await.unwrap();
    pause.release();
    let report = gc.await.unwrap();
    assert_eq!(report.manifests_removed, 0, "{report:?}");
    let m = r.get_manifest(&repo, &tag_ref("rollback")).await.unwrap();
    assert_eq!(m.meta.digest, old);
    assert_eq!(
        read_blob(&r, &repo, &Digest::sha256(b"l1")).await.unwrap(),
        b"l1"
    );
    assert_cleans_up(&r).await;
}

/// Race: two collectors at once. Only the holder of the deletion lease deletes bytes;
/// the other skips them.
pub async fn race_two_collectors(f: Fixture) {
    let hooks = hooks::Hooks::new();
    let (r, _) = hooked(&f, &hooks);
    let repo = repo("suite/race-gc");
    let d = push_blob(&r, &repo, b"collected once").await;
    r.delete_blob(&repo, &d).await.unwrap();
    let mut pause = hooks.arm("blobs.delete");
    let first = tokio::spawn({
        let r = r.clone();
        async move { r.collect_garbage(&gc_all()).await.unwrap() }
    });
    pause.reached().await;
    let second = r.collect_garbage(&gc_all()).await.unwrap();
    assert_eq!(
        second.blobs_deleted, 0,
        "the lease is held by the first collector"
    );
    pause.release();
    assert_eq!(first.await.unwrap().blobs_deleted, 1);
    assert!(r.storage().metadata.blob(&d).await.unwrap().is_none());
    assert_cleans_up(&r).await;
}

/// Crash in the middle of a sweep (the collector dies holding the deletion lease, before
/// or after deleting the bytes): uploads of the same digest wait for the lease to
/// expire, take it over and succeed; the next collection finishes the rest.
pub async fn race_collector_crash_mid_sweep(f: Fixture) {
    for point in ["blobs.delete", "meta.finish_blob_deletion"] {
        let hooks = hooks::Hooks::new();
        let (r, clock) = hooked(&f, &hooks);
        let repo = repo("suite/race-crash");
        let a = push_blob(&r, &repo, b"re-uploaded after the crash").await;
        let b = push_blob(&r, &repo, b"left for the next collection").await;
        r.delete_blob(&repo, &a).await.unwrap();
        r.delete_blob(&repo, &b).await.unwrap();
        let mut pause = hooks.arm(point);
        let gc = tokio::spawn({
            let r = r.clone();
            async move { r.collect_garbage(&gc_all()).await }
        });
        pause.reached().await;
        gc.abort(); // the collector dies here
        let _ = gc.await;
        drop(pause);
        let deleting = r.storage().metadata.stats().await.unwrap().deleting;
        assert_eq!(deleting, 1, "{point}: one lease left behind");
        clock.advance(r.config().deletion_lease + Duration::from_secs(1));
        for (d, data) in [
            (&a, &b"re-uploaded after the crash"[..]),
            (&b, b"left for the next collection"),
        ] {
            if r.storage()
                .metadata
                .blob(d)
                .await
                .unwrap()
                .is_some_and(|rec| rec.state.is_deleting())
            {
                // Whichever blob the crash left mid-deletion: upload it again.
                assert_eq!(&push_blob(&r, &repo, data).await, d);
                assert_eq!(read_blob(&r, &repo, d).await.unwrap(), data);
            }
        }
        r.collect_garbage(&gc_all()).await.unwrap();
        assert_eq!(r.storage().metadata.stats().await.unwrap().deleting, 0);
        assert_cleans_up(&r).await;
    }
}

/// Policies: untagged manifests are kept by default and collected on request; children
/// of a live index and referrers of a live subject live with them; a referrer goes
/// when its subject goes.
pub async fn collection_policies(f: Fixture) {
    let (b, clock) = f.builder();
    let r = b.with_protection_window(Duration::from_secs(60)).build();
    let repo = repo("suite/policy");
    let (child, size) = push_image(&r, &repo, "child", b"{\"c\":1}", &[b"c"]).await;
    let idx = index_manifest(&[(&child, size)]);
    put_manifest(&r, &repo, &tag_ref("idx"), OCI_INDEX, &idx)
        .await
        .unwrap();
    r.delete_manifest(&repo, &tag_ref("child")).await.unwrap();
    let (subject, ssize) = push_image(&r, &repo, "subject", b"{\"s\":1}", &[b"s"]).await;
    push_blob(&r, &repo, b"{}").await;
    let sig = image_manifest_with(b"{}", &[], Some((&subject, ssize)), Some("x/sig"));
    let sig_d = Digest::sha256(sig.as_bytes());
    put_manifest(
        &r,
        &repo,
        &Reference::Digest(sig_d.clone()),
        OCI_MANIFEST,
        &sig,
    )
    .await
    .unwrap();
    let (loose, _) = push_image(&r, &repo, "loose", b"{\"l\":1}", &[b"l"]).await;
    r.delete_manifest(&repo, &tag_ref("loose")).await.unwrap();
    // A referrer pushed before its subject exists is protected by the window.
    let early_subject = Digest::sha256(b"pushed later");
    let early = image_manifest_with(b"{}", &[], Some((&early_subject, 1)), Some("x/early"));
    put_manifest(
        &r,
        &repo,
        &Reference::Digest(Digest::sha256(early.as_bytes())),
        OCI_MANIFEST,
        &early,
    )
    .await
    .unwrap();
    let exists = |d: Digest| {
        let (r, repo) = (r.clone(), repo.clone());
        async move { r.stat_manifest(&repo, &Reference::Digest(d)).await.is_ok() }
    };

    let keep = r.collect_garbage(&GcOptions::default()).await.unwrap();
    assert_eq!(keep.manifests_removed, 0, "everything is inside the window");
    clock.advance(Duration::from_secs(120));
    let keep = r.collect_garbage(&GcOptions::default()).await.unwrap();
    assert_eq!(
        keep.manifests_removed, 1,
        "only the early referrer, whose subject never came"
    );
    assert!(
        exists(loose.clone()).await,
        "untagged manifests are kept by default"
    );
    assert!(exists(child.clone()).await && exists(sig_d.clone()).await);

    let collect = GcOptions {
        untagged: crate::UntaggedPolicy::Collect,
        ..GcOptions::default()
    };
    let dry = r
        .collect_garbage(&GcOptions {
            dry_run: true,
            ..collect.clone()
        })
        .await
        .unwrap();
    assert_eq!(dry.manifests_removed, 1);
    assert!(exists(loose.clone()).await, "a dry run changes nothing");
    let report = r.collect_garbage(&collect).await.unwrap();
    assert_eq!(report.manifests_removed, 1, "{report:?}");
    assert!(!exists(loose).await);
    assert!(
        exists(child.clone()).await,
        "a child of a tagged index lives with it"
    );
    assert!(
        exists(sig_d.clone()).await,
        "a referrer of a live subject lives with it"
    );
    // The subject goes: its referrer goes with it.
    r.delete_manifest(&repo, &Reference::Digest(subject))
        .await
        .unwrap();
    r.delete_manifest(&repo, &tag_ref("idx")).await.unwrap();
    let report = r.collect_garbage(&collect).await.unwrap();
    assert!(!exists(sig_d).await, "a referrer goes with its subject");
    assert_eq!(
        report.manifests_removed, 3,
        "referrer, untagged index, then its child"
    );
    assert!(!exists(child).await);
    assert_cleans_up(&r).await;
}
