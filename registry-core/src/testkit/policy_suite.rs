//! Behaviours of the policy hooks (immutable tags, read-only mode, quotas, retention),
//! run by every store as part of the shared suite (re-exported from [`super::suite`]).

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::*;
use crate::digest::Algorithm;
use crate::manifest::media_type::OCI_MANIFEST;
use crate::policy::{RetentionRule, TagPattern};
use crate::registry::PutManifestResult;

fn pattern(s: &str) -> TagPattern {
    TagPattern::parse(s).expect("valid pattern")
}

async fn put_tagged(
    r: &Registry,
    repo: &RepoName,
    reference: &Reference,
    manifest: &str,
) -> Result<PutManifestResult, Error> {
    r.put_manifest(
        repo,
        reference,
        OCI_MANIFEST,
        Bytes::from(manifest.to_owned()),
        PutManifestOptions::default(),
    )
    .await
}

/// Everything a store holds, as text: counts, every repository with its tags (and
/// tagging times), manifests and candidate links, every blob record and byte listing,
/// open uploads and quota counters. Two equal snapshots mean nothing changed.
pub async fn snapshot(r: &Registry) -> String {
    let s = r.storage();
    let m = &s.metadata;
    let mut out = format!("{:?}\n", m.stats().await.expect("stats"));
    for repo in m.list_repositories(None, usize::MAX).await.expect("repos") {
        out += &format!(
            "repo {repo} {:?}\n",
            m.repository(&repo).await.expect("repo")
        );
        out += &format!(
            "  tags {:?}\n",
            m.list_tag_entries(&repo, None, usize::MAX)
                .await
                .expect("tags")
        );
        out += &format!(
            "  manifests {:?}\n",
            m.list_manifests(&repo, None, usize::MAX)
                .await
                .expect("manifests")
        );
        out += &format!("  quota {:?}\n", m.quota_usage(&repo).await.expect("quota"));
    }
    out += &format!(
        "unreferenced links {:?}\n",
        m.unreferenced_blob_links(None, usize::MAX)
            .await
            .expect("links")
    );
    out += &format!(
        "unlinked {:?}\n",
        m.unlinked_blobs(None, usize::MAX).await.expect("unlinked")
    );
    let mut blobs: Vec<String> = s
        .blobs
        .list()
        .await
        .expect("list")
        .map(|d| d.expect("digest").to_string())
        .collect()
        .await;
    blobs.sort();
    for d in &blobs {
        let d = Digest::parse(d).expect("digest");
        out += &format!("blob {d} {:?}\n", m.blob(&d).await.expect("record"));
    }
    let mut uploads = s.blobs.list_uploads().await.expect("uploads");
    uploads.sort_by(|a, b| a.id.cmp(&b.id));
    out += &format!("uploads {uploads:?}\n");
    out
}

/// An immutable tag cannot be moved by a push or a re-tag, nor deleted (directly or
/// with its manifest); each refusal is typed and changes nothing. Pushing the same
/// manifest again is fine; tags outside the pattern move freely; of two concurrent
/// pushes creating the same immutable tag, exactly one wins.
pub async fn policy_immutable_tags(f: Fixture) {
    let (b, _) = f.builder();
    let r = b.with_immutable_tags(pattern("v*")).build();
    let repo = repo("suite/immutable");
    let (a, _) = push_image(&r, &repo, "v1", b"{\"a\":1}", &[b"layer a"]).await;
    push_blob(&r, &repo, b"{\"b\":1}").await;
    push_blob(&r, &repo, b"layer b").await;
    let other = image_manifest(b"{\"b\":1}", &[b"layer b"]);
    let before = snapshot(&r).await;

    let refused = put_tagged(&r, &repo, &tag_ref("v1"), &other).await;
    match refused {
        Err(Error::ImmutableTag { tag, current, .. }) => {
            assert_eq!((tag.as_str(), &current), ("v1", &a));
        }
        other => panic!("expected ImmutableTag, got {other:?}"),
    }
    assert_eq!(snapshot(&r).await, before, "a refused push changes nothing");

    // The same manifest under the same tag again: idempotent.
    let again = put_tagged(
        &r,
        &repo,
        &tag_ref("v1"),
        &image_manifest(b"{\"a\":1}", &[b"layer a"]),
    )
    .await
    .expect("same digest re-push");
    assert_eq!(again.digest, a);
    assert_eq!(
        snapshot(&r).await,
        before,
        "an idempotent re-push changes nothing"
    );

    // Re-tagging and deleting are refused too.
    let b_digest = put_tagged(
        &r,
        &repo,
        &Reference::Digest(Digest::sha256(other.as_bytes())),
        &other,
    )
    .await
    .unwrap()
    .digest;
    let before = snapshot(&r).await;
    assert!(matches!(
        r.tag_manifest(&repo, &tag("v1"), &b_digest).await,
        Err(Error::ImmutableTag { .. })
    ));
    assert!(matches!(
        r.delete_manifest(&repo, &tag_ref("v1")).await,
        Err(Error::ImmutableTag { .. })
    ));
    assert!(matches!(
        r.delete_manifest(&repo, &Reference::Digest(a.clone()))
            .await,
        Err(Error::ImmutableTag { .. })
    ));
    assert_eq!(snapshot(&r).await, before, "refusals change nothing");
    assert_eq!(
        r.stat_manifest(&repo, &tag_ref("v1")).await.unwrap().digest,
        a
    );

    // Tags outside the pattern are ordinary.
    r.tag_manifest(&repo, &tag("latest"), &a).await.unwrap();
    r.tag_manifest(&repo, &tag("latest"), &b_digest)
        .await
        .unwrap();
    r.delete_manifest(&repo, &tag_ref("latest")).await.unwrap();

    // Two concurrent pushes creating the same immutable tag: one wins, one is refused.
    let mut tasks = Vec::new();
    for d in [a.clone(), b_digest.clone()] {
        let r = r.clone();
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            r.tag_manifest(&repo, &tag("v2"), &d).await.map(|()| d)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(d) => winners.push(d),
            Err(Error::ImmutableTag { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one push creates the tag");
    assert_eq!(
        r.stat_manifest(&repo, &tag_ref("v2")).await.unwrap().digest,
        winners[0]
    );
    // Cleaning up needs a registry without the policy: the tags are immutable for good.
    assert_cleans_up(&f.registry().0).await;
}

/// A read-only registry refuses every write with [`Error::ReadOnly`] and changes
/// nothing, not even protection times on reads; reads and dry-run collections work.
pub async fn policy_read_only(f: Fixture) {
    let (w, clock) = f.registry();
    let repo = repo("suite/readonly");
    let (m, _) = push_image(&w, &repo, "v1", b"{}", &[b"read only layer"]).await;
    let loose = push_blob(&w, &repo, b"loose").await;
    let open = w.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    let (b, _) = f.builder();
    let r = b
        .read_only(true)
        .with_clock(Arc::new(clock.clone()))
        .build();
    clock.advance(Duration::from_secs(3600));
    let before = snapshot(&r).await;

    fn ro<T: std::fmt::Debug>(what: &str, res: Result<T, Error>) {
        assert!(
            matches!(res, Err(Error::ReadOnly { .. })),
            "{what}: expected ReadOnly, got {res:?}"
        );
    }
    ro(
        "start_upload",
        r.start_upload(&repo, Algorithm::Sha256).await,
    );
    let d = Digest::sha256(b"new");
    ro(
        "put_blob",
        r.put_blob(&repo, &d, None, body(&[b"new"])).await,
    );
    ro(
        "append_upload",
        r.append_upload(&repo, &open.id, Some(0), None, body(&[b"x"]))
            .await,
    );
    ro(
        "finish_upload",
        r.finish_upload(&repo, &open.id, &d, Some((body(&[b"new"]), None)))
            .await,
    );
    ro("cancel_upload", r.cancel_upload(&repo, &open.id).await);
    ro(
        "mount_blob",
        r.mount_blob(
            &super::repo("suite/readonly2"),
            &loose,
            Some(&repo),
            &crate::AllowAll,
        )
        .await,
    );
    ro("delete_blob", r.delete_blob(&repo, &loose).await);
    let manifest = image_manifest(b"{}", &[b"read only layer"]);
    ro(
        "put_manifest (same)",
        put_tagged(&r, &repo, &tag_ref("v1"), &manifest).await,
    );
    ro(
        "put_manifest (new tag)",
        put_tagged(&r, &repo, &tag_ref("v2"), &manifest).await,
    );
    ro("tag_manifest", r.tag_manifest(&repo, &tag("v3"), &m).await);
    ro("delete tag", r.delete_manifest(&repo, &tag_ref("v1")).await);
    ro(
        "delete manifest",
        r.delete_manifest(&repo, &Reference::Digest(m.clone()))
            .await,
    );
    ro(
        "collect_garbage",
        r.collect_garbage(&GcOptions {
            window: Some(Duration::ZERO),
            ..GcOptions::default()
        })
        .await,
    );
    // The session has been idle past the expiry: reported gone, but not deleted.
    clock.advance(Duration::from_secs(1));
    assert!(matches!(
        r.upload_status(&repo, &open.id).await,
        Err(Error::UploadUnknown { .. })
    ));
    // Reads work and a dry run reports.
    assert!(r.get_manifest(&repo, &tag_ref("v1")).await.is_ok());
    assert_eq!(read_blob(&r, &repo, &loose).await.unwrap(), b"loose");
    r.stat_blob(&repo, &loose).await.unwrap();
    let dry = r
        .collect_garbage(&GcOptions {
            window: Some(Duration::ZERO),
            dry_run: true,
            ..GcOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(dry.links_removed, 1, "the loose blob would go");
    assert_eq!(
        snapshot(&r).await,
        before,
        "a read-only registry changed the store"
    );
    assert!(
        matches!(
            w.cancel_upload(&repo, &open.id).await,
            Err(Error::UploadUnknown { .. })
        ),
        "the writer discards the expired session"
    );
    assert_cleans_up(&w).await;
}

/// A quota counts the distinct blobs and manifests under its prefix (counting starts
/// from a scan of what is already there); reaching it exactly is allowed, one byte over
/// is refused with [`Error::QuotaExceeded`] whatever the path (monolithic or chunked
/// upload, mount, manifest), and a refusal links nothing and leaves no session.
pub async fn policy_quota_boundary(f: Fixture) {
    let team = repo("suite/quota");
    let app = repo("suite/quota/app");
    let web = repo("suite/quota/web");
    let outside = repo("suite/quotax");
    let config: &[u8] = b"{}";
    let layer = vec![7u8; 100];
    let manifest = image_manifest(config, &[&layer]);
    let m_len = manifest.len() as u64;
    let limit = 2 + 100 + m_len;

    // Pushed before the quota exists: the first link under it counts these by a scan.
    let (plain, clock) = f.registry();
    push_blob(&plain, &app, config).await;
    push_blob(&plain, &app, &layer).await;
    let (b, _) = f.builder();
    let r = b
        .with_quota(team.clone(), limit)
        .with_clock(Arc::new(clock.clone()))
        .build();
    let meta = r.storage().metadata;
    assert_eq!(meta.quota_usage(&team).await.unwrap(), None);

    // The same layer in a second repository under the prefix costs nothing.
    push_blob(&r, &web, &layer).await;
    assert_eq!(meta.quota_usage(&team).await.unwrap(), Some(102));
    assert!(
        r.mount_blob(&web, &Digest::sha256(config), Some(&app), &crate::AllowAll)
            .await
            .unwrap()
    );
    assert_eq!(meta.quota_usage(&team).await.unwrap(), Some(102));
    // One byte more makes the manifest one byte too many.
    let x = push_blob(&r, &app, b"x").await;
    assert_eq!(meta.quota_usage(&team).await.unwrap(), Some(103));
    let before = snapshot(&r).await;
    let m_digest = Digest::sha256(manifest.as_bytes());
    match put_tagged(&r, &app, &tag_ref("v1"), &manifest).await {
        Err(Error::QuotaExceeded {
            prefix,
            limit: l,
            used,
            size,
            digest,
        }) => {
            assert_eq!((prefix, l, used, size), (team.clone(), limit, 103, m_len));
            assert_eq!(digest, m_digest);
        }
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    assert_eq!(
        snapshot(&r).await,
        before,
        "a refused manifest leaves nothing"
    );
    assert!(meta.blob(&m_digest).await.unwrap().is_none());

    // Exactly at the quota is allowed.
    r.delete_blob(&app, &x).await.unwrap();
    assert_eq!(meta.quota_usage(&team).await.unwrap(), Some(102));
    put_tagged(&r, &app, &tag_ref("v1"), &manifest)
        .await
        .unwrap();
    assert_eq!(meta.quota_usage(&team).await.unwrap(), Some(limit));

    // One byte over, by every path.
    let before = snapshot(&r).await;
    let y = Digest::sha256(b"y");
    assert!(matches!(
        r.put_blob(&web, &y, Some(1), body(&[b"y"])).await,
        Err(Error::QuotaExceeded { .. })
    ));
    let s = r.start_upload(&web, Algorithm::Sha256).await.unwrap();
    r.append_upload(&web, &s.id, Some(0), None, body(&[b"y"]))
        .await
        .unwrap();
    assert!(matches!(
        r.finish_upload(&web, &s.id, &y, None).await,
        Err(Error::QuotaExceeded { .. })
    ));
    assert!(
        matches!(
            r.upload_status(&web, &s.id).await,
            Err(Error::UploadUnknown { .. })
        ),
        "the refused session is gone"
    );
    assert_eq!(
        snapshot(&r).await,
        before,
        "refused uploads leave nothing linked"
    );
    // Outside the prefix (a sibling name, not a child) the quota does not apply...
    push_blob(&r, &outside, b"y").await;
    // ...and mounting from there into it is refused.
    assert!(matches!(
        r.mount_blob(&web, &y, Some(&outside), &crate::AllowAll)
            .await,
        Err(Error::QuotaExceeded { .. })
    ));
    assert!(matches!(
        r.stat_blob(&web, &y).await,
        Err(Error::BlobUnknown { .. })
    ));
    assert_eq!(meta.quota_usage(&team).await.unwrap(), Some(limit));

    // A lowered quota (the usage is already past it): bytes already counted under the
    // prefix still cost nothing, new bytes are refused.
    let (b, _) = f.builder();
    let low = b
        .with_quota(team.clone(), 1)
        .with_clock(Arc::new(clock.clone()))
        .build();
    push_blob(&low, &repo("suite/quota/third"), &layer).await;
    assert!(matches!(
        low.put_blob(&web, &Digest::sha256(b"z"), None, body(&[b"z"]))
            .await,
        Err(Error::QuotaExceeded { limit: 1, .. })
    ));
    assert_eq!(meta.quota_usage(&team).await.unwrap(), Some(limit));
    clock.advance(Duration::from_secs(1));
    assert_cleans_up(&r).await;
    assert_eq!(
        meta.quota_usage(&team).await.unwrap(),
        None,
        "an empty prefix is no longer tracked"
    );
}

/// Concurrent pushes of distinct blobs under one quota: exactly as many succeed as
/// fit, and the usage never passes the limit.
pub async fn policy_quota_concurrent(f: Fixture) {
    let team = repo("suite/quotarace");
    let (b, _) = f.builder();
    let r = b.with_quota(team.clone(), 1000).build();
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        let r = r.clone();
        let repo = super::repo(&format!("suite/quotarace/r{}", i % 4));
        tasks.push(tokio::spawn(async move {
            let data = vec![i; 100];
            let d = Digest::sha256(&data);
            r.put_blob(&repo, &d, Some(100), body(&[&data])).await
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::QuotaExceeded { .. }) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((ok, refused), (10, 10));
    let meta = r.storage().metadata;
    assert_eq!(meta.quota_usage(&team).await.unwrap(), Some(1000));
    assert_eq!(meta.stats().await.unwrap().blob_links, 10);
    assert_cleans_up(&r).await;
}

/// Retention keeps the last N matching tags and the young ones; a dry run reports
/// exactly what the real run then removes and changes nothing; manifests left without
/// tags go with them; other tags are untouched.
pub async fn retention_keep_last_and_younger(f: Fixture) {
    let (b, clock) = f.builder();
    let r = b.with_protection_window(Duration::from_secs(60)).build();
    let repo = repo("suite/retention");
    // `v0` is matched by two rules: `keep_last` alone would remove it, but the other
    // rule keeps it, and one keeping rule is enough.
    push_image(&r, &repo, "v0", b"{\"v\":0}", &[b"base"]).await;
    clock.advance(Duration::from_secs(600));
    let mut images = Vec::new();
    for i in 1..=4 {
        let config = format!("{{\"v\":{i}}}");
        let (d, _) = push_image(&r, &repo, &format!("v{i}"), config.as_bytes(), &[b"base"]).await;
        images.push(d);
        clock.advance(Duration::from_secs(600));
    }
    // v2 also tagged `stable` (outside the rule): its manifest must stay.
    r.tag_manifest(&repo, &tag("stable"), &images[1])
        .await
        .unwrap();
    let (n_old, _) = push_image(&r, &repo, "nightly-1", b"{\"n\":1}", &[b"base"]).await;
    clock.advance(Duration::from_secs(2 * 3600));
    let (n_new, _) = push_image(&r, &repo, "nightly-2", b"{\"n\":2}", &[b"base"]).await;
    clock.advance(Duration::from_secs(120));
    let options = GcOptions {
        retention: vec![
            RetentionRule::keep_last(2, pattern("v*")),
            RetentionRule::keep_younger_than(Duration::from_secs(3600), pattern("nightly-*")),
            RetentionRule::keep_younger_than(Duration::from_secs(86_400), pattern("v0")),
            // Scoped to other repositories: no effect here.
            RetentionRule::keep_last(0, pattern("suite/elsewhere:*")),
        ],
        ..GcOptions::default()
    };

    let before = snapshot(&r).await;
    let dry = r
        .collect_garbage(&GcOptions {
            dry_run: true,
            ..options.clone()
        })
        .await
        .unwrap();
    assert_eq!(snapshot(&r).await, before, "a dry run changes nothing");
    let listed = |report: &crate::GcReport| -> Vec<(String, Digest, bool)> {
        report
            .retention
            .iter()
            .map(|e| (e.tag.to_string(), e.digest.clone(), e.manifest_removed))
            .collect()
    };
    let expected = vec![
        ("nightly-1".to_owned(), n_old.clone(), true),
        ("v1".to_owned(), images[0].clone(), true),
        ("v2".to_owned(), images[1].clone(), false),
    ];
    assert_eq!(listed(&dry), expected);
    assert_eq!(dry.manifests_removed, 2);

    let real = r.collect_garbage(&options).await.unwrap();
    assert_eq!(
        listed(&real),
        expected,
        "the real run removes what the dry run listed"
    );
    for t in ["v1", "v2", "nightly-1"] {
        assert!(matches!(
            r.stat_manifest(&repo, &tag_ref(t)).await,
            Err(Error::ManifestUnknown { .. })
        ));
    }
    for t in ["v0", "v3", "v4", "stable", "nightly-2"] {
        assert!(
            r.stat_manifest(&repo, &tag_ref(t)).await.is_ok(),
            "{t} kept"
        );
    }
    for gone in [&images[0], &n_old] {
        assert!(
            r.stat_manifest(&repo, &Reference::Digest(gone.clone()))
                .await
                .is_err()
        );
    }
    assert!(
        r.stat_manifest(&repo, &Reference::Digest(images[1].clone()))
            .await
            .is_ok()
    );
    assert_eq!(
        r.stat_manifest(&repo, &tag_ref("nightly-2"))
            .await
            .unwrap()
            .digest,
        n_new
    );
    // Removals are conditional: a tag moved (or re-tagged) since the listing stays.
    let meta = r.storage().metadata;
    let listed_v3 = meta
        .list_tag_entries(&repo, None, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.tag.as_str() == "v3")
        .unwrap();
    clock.advance(Duration::from_secs(1));
    r.tag_manifest(&repo, &tag("v3"), &images[3]).await.unwrap();
    let none = crate::Policy::default();
    assert!(
        !meta
            .delete_tag_if(
                &repo,
                &tag("v3"),
                &listed_v3.digest,
                listed_v3.tagged_at,
                &none
            )
            .await
            .unwrap(),
        "a moved tag is not removed"
    );
    r.tag_manifest(&repo, &tag("v3"), &images[2]).await.unwrap();
    assert!(
        !meta
            .delete_tag_if(
                &repo,
                &tag("v3"),
                &listed_v3.digest,
                listed_v3.tagged_at,
                &none
            )
            .await
            .unwrap(),
        "moved back, it was tagged anew: not the tag that was listed"
    );
    assert!(r.stat_manifest(&repo, &tag_ref("v3")).await.is_ok());

    // Nothing more to do: a second run removes nothing.
    assert!(
        r.collect_garbage(&options)
            .await
            .unwrap()
            .retention
            .is_empty()
    );
    assert_cleans_up(&r).await;
}

/// Retention never removes an immutable tag, even when it would otherwise.
pub async fn retention_spares_immutable_tags(f: Fixture) {
    let (b, clock) = f.builder();
    let r = b
        .with_immutable_tags(pattern("release-*"))
        .with_protection_window(Duration::ZERO)
        .build();
    let repo = repo("suite/retention-immutable");
    for (i, t) in ["release-1", "dev-1", "release-2", "dev-2"]
        .iter()
        .enumerate()
    {
        let config = format!("{{\"i\":{i}}}");
        push_image(&r, &repo, t, config.as_bytes(), &[b"l"]).await;
        clock.advance(Duration::from_secs(60));
    }
    let report = r
        .collect_garbage(&GcOptions {
            retention: vec![RetentionRule::keep_last(1, pattern("*"))],
            ..GcOptions::default()
        })
        .await
        .unwrap();
    let removed: Vec<String> = report.retention.iter().map(|e| e.tag.to_string()).collect();
    assert_eq!(removed, ["dev-1"]);
    for t in ["release-1", "release-2", "dev-2"] {
        assert!(
            r.stat_manifest(&repo, &tag_ref(t)).await.is_ok(),
            "{t} kept"
        );
    }
    // Cleaning up needs a registry without the policy (and with the same clock).
    let (plain, _) = f.builder();
    assert_cleans_up(&plain.with_clock(Arc::new(clock)).build()).await;
}

/// Sparse manifests, where the policy allows them: an image whose layer and an index
/// whose child the repository does not hold are accepted (elsewhere refused as
/// before); what is missing is not served; what arrives later is counted as
/// referenced from then on, so the collector keeps it and a child cannot be deleted
/// from under its index; deleting the sparse manifests releases everything.
pub async fn policy_sparse_manifests(f: Fixture) {
    use crate::gc::{GcOptions, UntaggedPolicy};
    let (b, _) = f.builder();
    let r = b
        .with_sparse_manifests(Some(repo("suite/mirror")))
        .with_protection_window(Duration::ZERO)
        .build();
    let (strict, mirror) = (repo("suite/strict"), repo("suite/mirror/app"));
    let image = image_manifest(b"{\"sparse\":1}", &[b"present layer", b"missing layer"]);
    for repo in [&strict, &mirror] {
        push_blob(&r, repo, b"{\"sparse\":1}").await;
        push_blob(&r, repo, b"present layer").await;
    }
    let before = snapshot(&r).await;
    let e = put_tagged(&r, &strict, &tag_ref("img"), &image)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ManifestBlobUnknown { .. }), "{e:?}");
    assert_eq!(snapshot(&r).await, before, "a refused push changes nothing");

    let img = put_tagged(&r, &mirror, &tag_ref("sparse-image"), &image)
        .await
        .expect("sparse image accepted under the prefix");
    let got = r
        .get_manifest(&mirror, &tag_ref("sparse-image"))
        .await
        .unwrap();
    assert_eq!(&got.bytes[..], image.as_bytes());
    let missing_layer = Digest::sha256(b"missing layer");
    assert!(matches!(
        read_blob(&r, &mirror, &missing_layer).await,
        Err(Error::BlobUnknown { .. })
    ));
    // An index with one child present and one that was never pushed.
    let (present, present_size) = push_image(
        &r,
        &mirror,
        "amd64",
        b"{\"arch\":\"amd64\"}",
        &[b"amd64 layer"],
    )
    .await;
    let absent_bytes = image_manifest(b"{\"arch\":\"arm64\"}", &[b"arm64 layer"]);
    let absent = Digest::sha256(absent_bytes.as_bytes());
    let index = index_manifest(&[
        (&present, present_size),
        (&absent, absent_bytes.len() as u64),
    ]);
    let idx = r
        .put_manifest(
            &mirror,
            &tag_ref("sparse-index"),
            crate::manifest::media_type::OCI_INDEX,
            Bytes::from(index.clone()),
            PutManifestOptions::default(),
        )
        .await
        .expect("sparse index accepted");
    r.delete_manifest(&mirror, &tag_ref("amd64")).await.unwrap();
    let audit = r.storage().metadata.audit(false).await.unwrap();
    assert!(audit.problems.is_empty(), "audit: {:?}", audit.problems);

    // A collection with a zero window keeps everything referenced.
    let gc = GcOptions {
        window: Some(Duration::ZERO),
        untagged: UntaggedPolicy::Collect,
        ..GcOptions::default()
    };
    r.collect_garbage(&gc).await.unwrap();
    assert_eq!(
        read_blob(&r, &mirror, &Digest::sha256(b"present layer"))
            .await
            .unwrap(),
        b"present layer"
    );
    r.get_manifest(&mirror, &Reference::Digest(present.clone()))
        .await
        .expect("a present child of a live index stays");

    // What arrives later is referenced from then on.
    push_blob(&r, &mirror, b"missing layer").await;
    let link = r
        .storage()
        .metadata
        .blob_link(&mirror, &missing_layer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        link.manifest_refs, 1,
        "the sparse image counts its late layer"
    );
    push_blob(&r, &mirror, b"{\"arch\":\"arm64\"}").await;
    push_blob(&r, &mirror, b"arm64 layer").await;
    let late = put_tagged(
        &r,
        &mirror,
        &Reference::Digest(absent.clone()),
        &absent_bytes,
    )
    .await
    .unwrap();
    assert_eq!(late.digest, absent);
    r.collect_garbage(&gc).await.unwrap();
    assert_eq!(
        read_blob(&r, &mirror, &missing_layer).await.unwrap(),
        b"missing layer"
    );
    r.get_manifest(&mirror, &Reference::Digest(absent.clone()))
        .await
        .expect("the late child is kept by its index, untagged as it is");
    let e = r
        .delete_manifest(&mirror, &Reference::Digest(absent.clone()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InUse { .. }), "{e:?}");
    let audit = r.storage().metadata.audit(false).await.unwrap();
    assert!(audit.problems.is_empty(), "audit: {:?}", audit.problems);

    // A sparse manifest whose missing parts never come releases its pending counts.
    let other = image_manifest(b"{\"sparse\":1}", &[b"present layer", b"never pushed"]);
    let never = put_tagged(&r, &mirror, &tag_ref("never"), &other)
        .await
        .unwrap();
    for d in [&never.digest, &idx.digest, &img.digest] {
        r.delete_manifest(&mirror, &Reference::Digest(d.clone()))
            .await
            .unwrap();
    }
    assert_cleans_up(&r).await;
}
