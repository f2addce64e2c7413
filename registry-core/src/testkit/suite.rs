//! The behaviours. Each takes a fresh [`Fixture`] and ends with [`assert_cleans_up`].

use bytes::Bytes;
use futures::StreamExt;

use super::*;
use crate::digest::Algorithm;
use crate::events::Event;
use crate::manifest::media_type::{OCI_INDEX, OCI_MANIFEST};
use crate::store::UploadId;

pub use super::blob_suite::*;
pub use super::collection_suite::*;
pub use super::outbox_suite::*;
pub use super::policy_suite::*;
pub use super::refusal_suite::*;
pub use super::repo_suite::*;

fn put_options() -> PutManifestOptions {
    PutManifestOptions::default()
}

pub(super) async fn put_manifest(
    registry: &Registry,
    repo: &RepoName,
    reference: &Reference,
    content_type: &str,
    body: &str,
) -> Result<crate::registry::PutManifestResult, Error> {
    registry
        .put_manifest(
            repo,
            reference,
            content_type,
            Bytes::from(body.to_owned()),
            put_options(),
        )
        .await
}

/// A manifest reads back byte for byte, by tag and digest, with its media type.
pub async fn manifest_round_trip(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/manifest");
    let (d, size) = push_image(&r, &repo, "v1", b"{\"os\":\"linux\"}", &[b"l1", b"l2"]).await;
    for reference in [tag_ref("v1"), Reference::Digest(d.clone())] {
        let m = r.get_manifest(&repo, &reference).await.unwrap();
        assert_eq!(m.meta.digest, d);
        assert_eq!(m.meta.media_type, OCI_MANIFEST);
        assert_eq!(m.meta.size, size);
        assert!(d.verify(&m.bytes));
        let s = r.stat_manifest(&repo, &reference).await.unwrap();
        assert_eq!(s, m.meta);
    }
    // Whitespace and key order are preserved: bytes are never re-serialised.
    let cfg = b"{}";
    push_blob(&r, &repo, cfg).await;
    let odd = format!(
        "{{\n  \"layers\": [],\n  \"config\": {{\"size\": 2, \"digest\": \"{}\", \"mediaType\": \"application/vnd.oci.image.config.v1+json\"}},\n  \"schemaVersion\": 2\n}}\n",
        Digest::sha256(cfg)
    );
    let res = put_manifest(
        &r,
        &repo,
        &tag_ref("odd"),
        "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
        &odd,
    )
    .await
    .unwrap();
    let got = r.get_manifest(&repo, &tag_ref("odd")).await.unwrap();
    assert_eq!(got.bytes, odd.as_bytes());
    assert_eq!(got.meta.digest, res.digest);
    assert_eq!(
        got.meta.media_type, OCI_MANIFEST,
        "parameters are not stored"
    );
    // Manifests are readable through the blobs endpoint too.
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap().len() as u64, size);
    assert!(matches!(
        r.get_manifest(&repo, &tag_ref("nope")).await,
        Err(Error::ManifestUnknown { .. })
    ));
    assert_cleans_up(&r).await;
}

/// A manifest referencing a missing blob is refused and stores nothing.
pub async fn manifest_missing_blob_changes_nothing(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/missing");
    push_blob(&r, &repo, b"cfg").await;
    let before = r.storage().metadata.stats().await.unwrap();
    let m = image_manifest(b"cfg", &[b"never uploaded"]);
    let e = put_manifest(&r, &repo, &tag_ref("v1"), OCI_MANIFEST, &m)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ManifestBlobUnknown { digest } if *digest == Digest::sha256(b"never uploaded")),
        "{e:?}"
    );
    assert_eq!(r.storage().metadata.stats().await.unwrap(), before);
    assert!(matches!(
        r.get_manifest(&repo, &tag_ref("v1")).await,
        Err(Error::ManifestUnknown { .. })
    ));
    let link = r
        .storage()
        .metadata
        .blob_link(&repo, &Digest::sha256(b"cfg"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        link.manifest_refs, 0,
        "a refused manifest holds no reference"
    );
    assert_cleans_up(&r).await;
}

/// Manifests over the limit are refused.
pub async fn manifest_too_large(f: Fixture) {
    let (b, _) = f.builder();
    let r = b.with_max_manifest_size(256).build();
    let repo = repo("suite/big");
    push_blob(&r, &repo, b"{}").await;
    let m = image_manifest(b"{}", &[]);
    assert!(m.len() > 256);
    let e = put_manifest(&r, &repo, &tag_ref("v1"), OCI_MANIFEST, &m)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                what: "manifest",
                limit: 256
            }
        ),
        "{e:?}"
    );
    assert_cleans_up(&r).await;
}

/// The manifest's own mediaType must agree with the Content-Type.
pub async fn manifest_content_type_mismatch(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/ctype");
    push_blob(&r, &repo, b"{}").await;
    let m = image_manifest(b"{}", &[]);
    let e = put_manifest(&r, &repo, &tag_ref("v1"), OCI_INDEX, &m)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ManifestInvalid { .. }), "{e:?}");
    assert_cleans_up(&r).await;
}

/// A push by digest must match the bytes.
pub async fn manifest_digest_reference_must_match(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/by-digest");
    push_blob(&r, &repo, b"{}").await;
    let m = image_manifest(b"{}", &[]);
    let wrong = Digest::sha256(b"something else");
    let e = put_manifest(&r, &repo, &Reference::Digest(wrong), OCI_MANIFEST, &m)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
    let right = Digest::sha256(m.as_bytes());
    put_manifest(
        &r,
        &repo,
        &Reference::Digest(right.clone()),
        OCI_MANIFEST,
        &m,
    )
    .await
    .unwrap();
    // Pushed by digest: untagged.
    let tags = r.list_tags(&repo, &ListOptions::default()).await.unwrap();
    assert!(tags.items.is_empty());
    assert!(
        r.get_manifest(&repo, &Reference::Digest(right))
            .await
            .is_ok()
    );
    assert_cleans_up(&r).await;
}

/// Invalid JSON and structurally invalid manifests are refused.
pub async fn manifest_invalid_json(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/invalid");
    for (ct, body) in [
        (OCI_MANIFEST, "{"),
        (OCI_MANIFEST, "[]"),
        (OCI_MANIFEST, r#"{"schemaVersion":2,"layers":[]}"#),
        (
            OCI_INDEX,
            r#"{"schemaVersion":2,"manifests":[{"digest":"sha256:zz","size":1,"mediaType":"x"}]}"#,
        ),
        ("", "null"),
    ] {
        let e = put_manifest(&r, &repo, &tag_ref("v1"), ct, body)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::ManifestInvalid { .. }), "{body}: {e:?}");
    }
    assert_eq!(
        r.storage().metadata.stats().await.unwrap(),
        MetaStats::default()
    );
    assert_cleans_up(&r).await;
}

/// Unknown media types are stored opaquely as long as they are JSON.
pub async fn manifest_opaque_media_type(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/opaque");
    let body = r#"{"anything":["goes",1,true]}"#;
    let res = put_manifest(
        &r,
        &repo,
        &tag_ref("v1"),
        "application/vnd.example.thing+json",
        body,
    )
    .await
    .unwrap();
    let got = r.get_manifest(&repo, &tag_ref("v1")).await.unwrap();
    assert_eq!(got.meta.media_type, "application/vnd.example.thing+json");
    assert_eq!(got.bytes, body.as_bytes());
    assert_eq!(got.meta.digest, res.digest);
    assert_cleans_up(&r).await;
}

/// A descriptor whose size differs from the blob's or child's real size is refused
/// (MANIFEST_INVALID), and the refusal changes nothing.
pub async fn manifest_descriptor_size_must_match(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/sizes");
    push_blob(&r, &repo, b"{}").await;
    push_blob(&r, &repo, b"layer").await;
    let right = image_manifest(b"{}", &[b"layer"]);
    let layer = Digest::sha256(b"layer");
    let wrong = right.replace(
        &format!(r#""digest":"{layer}","size":5"#),
        &format!(r#""digest":"{layer}","size":4"#),
    );
    assert_ne!(wrong, right);
    let e = put_manifest(&r, &repo, &tag_ref("v1"), OCI_MANIFEST, &wrong)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ManifestInvalid { .. }), "{e:?}");
    let child = put_manifest(&r, &repo, &tag_ref("v1"), OCI_MANIFEST, &right)
        .await
        .unwrap();
    let size = right.len() as u64;
    let bad_index = index_manifest(&[(&child.digest, size + 1)]);
    let e = put_manifest(&r, &repo, &tag_ref("idx"), OCI_INDEX, &bad_index)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ManifestInvalid { .. }), "{e:?}");
    put_manifest(
        &r,
        &repo,
        &tag_ref("idx"),
        OCI_INDEX,
        &index_manifest(&[(&child.digest, size)]),
    )
    .await
    .unwrap();
    assert_cleans_up(&r).await;
}

/// A manifest whose bytes went missing (a crash inside the re-commit window, or an
/// outside hand) reads as unknown, and pushing it again restores it.
pub async fn manifest_repush_restores_missing_bytes(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/restore");
    let (d, _) = push_image(&r, &repo, "v1", b"{}", &[b"layer"]).await;
    assert!(r.storage().blobs.delete(&d).await.unwrap());
    assert!(matches!(
        r.get_manifest(&repo, &tag_ref("v1")).await,
        Err(Error::ManifestUnknown { .. })
    ));
    let m = image_manifest(b"{}", &[b"layer"]);
    put_manifest(&r, &repo, &tag_ref("v1"), OCI_MANIFEST, &m)
        .await
        .unwrap();
    let got = r.get_manifest(&repo, &tag_ref("v1")).await.unwrap();
    assert_eq!(got.bytes, m.as_bytes());
    assert_cleans_up(&r).await;
}

/// Pushing the same manifest again changes no counts; moving a tag does.
pub async fn manifest_repush_is_idempotent(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/repush");
    let (d1, _) = push_image(&r, &repo, "v1", b"{\"n\":1}", &[b"a"]).await;
    let before = r.storage().metadata.stats().await.unwrap();
    let (d1b, _) = push_image(&r, &repo, "v1", b"{\"n\":1}", &[b"a"]).await;
    assert_eq!(d1, d1b);
    assert_eq!(r.storage().metadata.stats().await.unwrap(), before);
    let rec = r
        .storage()
        .metadata
        .manifest(&repo, &d1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.tags, 1);
    let link = r
        .storage()
        .metadata
        .blob_link(&repo, &Digest::sha256(b"a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(link.manifest_refs, 1);
    // Move the tag to a new manifest: the old one stays, untagged.
    let (d2, _) = push_image(&r, &repo, "v1", b"{\"n\":2}", &[b"a"]).await;
    assert_eq!(
        r.stat_manifest(&repo, &tag_ref("v1")).await.unwrap().digest,
        d2
    );
    let old = r
        .storage()
        .metadata
        .manifest(&repo, &d1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.tags, 0);
    assert!(r.get_manifest(&repo, &Reference::Digest(d1)).await.is_ok());
    assert_cleans_up(&r).await;
}

/// Extra tags in one push are applied atomically with the manifest.
pub async fn manifest_multi_tag_push(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/multitag");
    push_blob(&r, &repo, b"{}").await;
    let m = image_manifest(b"{}", &[]);
    let d = Digest::sha256(m.as_bytes());
    let res = r
        .put_manifest(
            &repo,
            &Reference::Digest(d.clone()),
            OCI_MANIFEST,
            Bytes::from(m),
            PutManifestOptions {
                tags: vec![tag("a"), tag("b"), tag("a")],
            },
        )
        .await
        .unwrap();
    assert_eq!(res.tags, vec![tag("a"), tag("b")]);
    let tags = r.list_tags(&repo, &ListOptions::default()).await.unwrap();
    assert_eq!(tags.items, vec![tag("a"), tag("b")]);
    assert_eq!(
        r.storage()
            .metadata
            .manifest(&repo, &d)
            .await
            .unwrap()
            .unwrap()
            .tags,
        2
    );
    assert_cleans_up(&r).await;
}

/// An index needs its children in the repository; a child listed by an index cannot be
/// deleted before the index.
pub async fn index_requires_children(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/index");
    let (child, size) = push_image(&r, &repo, "amd64", b"{\"arch\":\"amd64\"}", &[b"x"]).await;
    let missing = Digest::sha256(b"missing child");
    let bad = index_manifest(&[(&child, size), (&missing, 10)]);
    let e = put_manifest(&r, &repo, &tag_ref("multi"), OCI_INDEX, &bad)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ManifestBlobUnknown { digest } if *digest == missing),
        "{e:?}"
    );
    let good = index_manifest(&[(&child, size)]);
    let idx = put_manifest(&r, &repo, &tag_ref("multi"), OCI_INDEX, &good)
        .await
        .unwrap();
    assert_eq!(
        r.storage()
            .metadata
            .manifest(&repo, &child)
            .await
            .unwrap()
            .unwrap()
            .parents,
        1
    );
    let e = r
        .delete_manifest(&repo, &Reference::Digest(child.clone()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InUse { .. }), "{e:?}");
    r.delete_manifest(&repo, &Reference::Digest(idx.digest))
        .await
        .unwrap();
    r.delete_manifest(&repo, &Reference::Digest(child))
        .await
        .unwrap();
    assert_cleans_up(&r).await;
}

/// Delete by tag removes the tag only; delete by digest removes the manifest and every
/// tag pointing at it.
pub async fn delete_semantics(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/delete");
    let (d, _) = push_image(&r, &repo, "v1", b"{}", &[b"l"]).await;
    r.tag_manifest(&repo, &tag("v2"), &d).await.unwrap();
    r.tag_manifest(&repo, &tag("v3"), &d).await.unwrap();
    r.delete_manifest(&repo, &tag_ref("v1")).await.unwrap();
    assert!(matches!(
        r.stat_manifest(&repo, &tag_ref("v1")).await,
        Err(Error::ManifestUnknown { .. })
    ));
    assert!(matches!(
        r.delete_manifest(&repo, &tag_ref("v1")).await,
        Err(Error::ManifestUnknown { .. })
    ));
    assert!(
        r.stat_manifest(&repo, &Reference::Digest(d.clone()))
            .await
            .is_ok()
    );
    r.delete_manifest(&repo, &Reference::Digest(d.clone()))
        .await
        .unwrap();
    for reference in [tag_ref("v2"), tag_ref("v3"), Reference::Digest(d.clone())] {
        assert!(matches!(
            r.stat_manifest(&repo, &reference).await,
            Err(Error::ManifestUnknown { .. })
        ));
    }
    assert!(matches!(
        r.delete_manifest(&repo, &Reference::Digest(d)).await,
        Err(Error::ManifestUnknown { .. })
    ));
    assert!(
        r.list_tags(&repo, &ListOptions::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    // Tagging a manifest the repository lacks is refused.
    assert!(matches!(
        r.tag_manifest(&repo, &tag("x"), &Digest::sha256(b"none"))
            .await,
        Err(Error::ManifestUnknown { .. })
    ));
    assert_cleans_up(&r).await;
}

fn list(n: Option<usize>, last: Option<&str>) -> ListOptions {
    ListOptions {
        n,
        last: last.map(str::to_owned),
    }
}

/// Tag pages: sorted, `n` caps, `n=0` is empty without a next page, `last` is
/// exclusive, an exact final page has no next page, `last` past the end is empty.
pub async fn tag_listing_pagination(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/tags");
    assert!(matches!(
        r.list_tags(&repo, &ListOptions::default()).await,
        Err(Error::NameUnknown { .. })
    ));
    let (d, _) = push_image(&r, &repo, "b", b"{}", &[]).await;
    for t in ["a", "c", "d", "e"] {
        r.tag_manifest(&repo, &tag(t), &d).await.unwrap();
    }
    let names =
        |p: &crate::registry::Page<Tag>| p.items.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    let all = r.list_tags(&repo, &list(None, None)).await.unwrap();
    assert_eq!(names(&all), ["a", "b", "c", "d", "e"]);
    assert_eq!(all.next, None);
    let p = r.list_tags(&repo, &list(Some(0), None)).await.unwrap();
    assert!(p.items.is_empty() && p.next.is_none());
    let p = r.list_tags(&repo, &list(Some(2), None)).await.unwrap();
    assert_eq!(
        (names(&p), p.next.as_deref()),
        (vec!["a".into(), "b".into()], Some("b"))
    );
    let p = r.list_tags(&repo, &list(Some(2), Some("b"))).await.unwrap();
    assert_eq!(
        (names(&p), p.next.as_deref()),
        (vec!["c".into(), "d".into()], Some("d"))
    );
    let p = r.list_tags(&repo, &list(Some(1), Some("d"))).await.unwrap();
    assert_eq!(names(&p), ["e"]);
    assert_eq!(p.next, None, "an exact last page has no next page");
    let p = r.list_tags(&repo, &list(Some(5), None)).await.unwrap();
    assert_eq!(p.next, None);
    let p = r
        .list_tags(&repo, &list(Some(10), Some("zzz")))
        .await
        .unwrap();
    assert!(p.items.is_empty() && p.next.is_none());
    let p = r.list_tags(&repo, &list(None, Some("bb"))).await.unwrap();
    assert_eq!(
        names(&p),
        ["c", "d", "e"],
        "last need not be an existing tag"
    );
    assert!(matches!(
        r.list_tags(&repo, &list(None, Some("bad/tag"))).await,
        Err(Error::Invalid(_))
    ));
    assert_cleans_up(&r).await;
}

/// A tag listing shows every change acknowledged before it, however listings are
/// kept between requests: new, moved and deleted tags, a manifest deleted with its
/// tags, the repository deleted; with listings running alongside the changes.
pub async fn tag_lists_follow_every_change(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/tag-changes");
    let names = |r: Registry, repo: RepoName| async move {
        let page = r.list_tags(&repo, &ListOptions::default()).await?;
        Ok::<_, Error>(page.items.iter().map(|t| t.to_string()).collect::<Vec<_>>())
    };
    let (a, _) = push_image(&r, &repo, "a", b"{\"n\":1}", &[b"la"]).await;
    assert_eq!(names(r.clone(), repo.clone()).await.unwrap(), ["a"]);
    assert_eq!(names(r.clone(), repo.clone()).await.unwrap(), ["a"]);
    r.tag_manifest(&repo, &tag("b"), &a).await.unwrap();
    assert_eq!(names(r.clone(), repo.clone()).await.unwrap(), ["a", "b"]);
    // A change elsewhere, and one that touches no tag.
    push_image(&r, &self::repo("suite/tag-changes-other"), "x", b"{}", &[]).await;
    push_blob(&r, &repo, b"untagged").await;
    assert_eq!(names(r.clone(), repo.clone()).await.unwrap(), ["a", "b"]);
    let (c, _) = push_image(&r, &repo, "c", b"{\"n\":2}", &[b"lc"]).await;
    r.tag_manifest(&repo, &tag("b"), &c).await.unwrap();
    assert_eq!(
        names(r.clone(), repo.clone()).await.unwrap(),
        ["a", "b", "c"]
    );
    let b = r.stat_manifest(&repo, &tag_ref("b")).await.unwrap();
    assert_eq!(b.digest, c, "the moved tag reads the new manifest");
    r.delete_manifest(&repo, &tag_ref("a")).await.unwrap();
    assert_eq!(names(r.clone(), repo.clone()).await.unwrap(), ["b", "c"]);
    r.delete_manifest(&repo, &Reference::Digest(c))
        .await
        .unwrap();
    assert!(names(r.clone(), repo.clone()).await.unwrap().is_empty());

    // Listings alongside: each tag is listed by the first listing after it is
    // acknowledged, whatever the listings running meanwhile kept.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (r, repo, stop) = (r.clone(), repo.clone(), stop.clone());
            tokio::spawn(async move {
                let mut listings = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = names(r.clone(), repo.clone()).await.unwrap();
                    assert!(got.is_sorted(), "{got:?}");
                    listings += 1;
                    tokio::task::yield_now().await;
                }
                listings
            })
        })
        .collect();
    for i in 0..60 {
        let t = format!("t{i:03}");
        r.tag_manifest(&repo, &tag(&t), &a).await.unwrap();
        let got = names(r.clone(), repo.clone()).await.unwrap();
        assert_eq!(got.len(), i + 1, "{got:?}");
        assert!(got.contains(&t), "{t} acknowledged, not listed: {got:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        assert!(reader.await.unwrap() > 0);
    }
    r.delete_repository(&repo).await.unwrap();
    assert!(matches!(
        names(r.clone(), repo.clone()).await,
        Err(Error::NameUnknown { .. })
    ));
    r.delete_repository(&self::repo("suite/tag-changes-other"))
        .await
        .unwrap();
    assert_cleans_up(&r).await;
}

/// The catalog pages like tags and lists only repositories that hold something.
pub async fn catalog_pagination(f: Fixture) {
    let (r, _) = f.registry();
    let all = || ListOptions::default();
    assert!(
        r.list_repositories(&all(), &crate::AllowAll)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    for name in ["c/x", "a", "b/y/z", "a/b"] {
        push_blob(&r, &repo(name), name.as_bytes()).await;
    }
    let names = |p: crate::registry::Page<RepoName>| {
        p.items.iter().map(|t| t.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(
        names(r.list_repositories(&all(), &crate::AllowAll).await.unwrap()),
        ["a", "a/b", "b/y/z", "c/x"]
    );
    let p = r
        .list_repositories(&list(Some(2), None), &crate::AllowAll)
        .await
        .unwrap();
    assert_eq!(p.next.as_deref(), Some("a/b"));
    let p = r
        .list_repositories(&list(Some(2), Some("a/b")), &crate::AllowAll)
        .await
        .unwrap();
    assert_eq!(p.next, None);
    assert_eq!(names(p), ["b/y/z", "c/x"]);
    let only_a = |repo: &RepoName| repo.as_str().starts_with('a');
    assert_eq!(
        names(r.list_repositories(&all(), &only_a).await.unwrap()),
        ["a", "a/b"]
    );
    assert!(
        r.list_repositories(&list(Some(0), None), &crate::AllowAll)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_cleans_up(&r).await;
}

/// Referrers: a subject need not exist; listing and artifactType filter; a deleted
/// referrer disappears from the index.
pub async fn referrers_and_filter(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/referrers");
    let subject = Digest::sha256(b"not pushed yet");
    assert!(
        r.referrers(&repo, &subject, None, &ListOptions::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    push_blob(&r, &repo, b"{}").await;
    let sig = image_manifest_with(
        b"{}",
        &[],
        Some((&subject, 123)),
        Some("application/vnd.example.sig"),
    );
    let res = put_manifest(
        &r,
        &repo,
        &Reference::Digest(Digest::sha256(sig.as_bytes())),
        OCI_MANIFEST,
        &sig,
    )
    .await
    .unwrap();
    assert_eq!(res.subject.as_ref(), Some(&subject));
    let sbom = image_manifest_with(b"{}", &[], Some((&subject, 123)), None);
    put_manifest(
        &r,
        &repo,
        &Reference::Digest(Digest::sha256(sbom.as_bytes())),
        OCI_MANIFEST,
        &sbom,
    )
    .await
    .unwrap();
    let all = r
        .referrers(&repo, &subject, None, &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(all.items.len(), 2);
    let sig_desc = all.items.iter().find(|d| d.digest == res.digest).unwrap();
    assert_eq!(
        sig_desc.artifact_type.as_deref(),
        Some("application/vnd.example.sig")
    );
    assert_eq!(sig_desc.media_type, OCI_MANIFEST);
    assert_eq!(sig_desc.size, sig.len() as u64);
    assert_eq!(
        sig_desc
            .annotations
            .get("org.example.test")
            .map(String::as_str),
        Some("yes")
    );
    let sbom_desc = all.items.iter().find(|d| d.digest != res.digest).unwrap();
    assert_eq!(
        sbom_desc.artifact_type.as_deref(),
        Some("application/vnd.oci.image.config.v1+json"),
        "without artifactType, the config media type is reported"
    );
    let filtered = r
        .referrers(
            &repo,
            &subject,
            Some("application/vnd.example.sig"),
            &ListOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(filtered.items.len(), 1);
    assert_eq!(filtered.items[0].digest, res.digest);
    let page = r
        .referrers(&repo, &subject, None, &list(Some(1), None))
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.next.is_some());
    // Other repositories do not see them.
    assert!(
        r.referrers(
            &self::repo("suite/elsewhere"),
            &subject,
            None,
            &ListOptions::default()
        )
        .await
        .unwrap()
        .items
        .is_empty()
    );
    r.delete_manifest(&repo, &Reference::Digest(res.digest))
        .await
        .unwrap();
    assert_eq!(
        r.referrers(&repo, &subject, None, &ListOptions::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_cleans_up(&r).await;
}

/// Reference counts follow links exactly, across repositories.
pub async fn reference_counts(f: Fixture) {
    let (r, _) = f.registry();
    let meta = r.storage().metadata;
    let (a, b) = (repo("suite/rc-a"), repo("suite/rc-b"));
    let base = Digest::sha256(b"base");
    let (m1, _) = push_image(&r, &a, "one", b"{\"i\":1}", &[b"base", b"top1"]).await;
    let (m2, _) = push_image(&r, &a, "two", b"{\"i\":2}", &[b"base", b"top2"]).await;
    assert!(
        r.mount_blob(&b, &base, Some(&a), &crate::AllowAll)
            .await
            .unwrap()
    );
    assert_eq!(
        meta.blob_link(&a, &base)
            .await
            .unwrap()
            .unwrap()
            .manifest_refs,
        2
    );
    assert_eq!(
        meta.blob_link(&b, &base)
            .await
            .unwrap()
            .unwrap()
            .manifest_refs,
        0
    );
    assert_eq!(meta.blob(&base).await.unwrap().unwrap().links, 2);
    assert_eq!(
        meta.blob(&m1).await.unwrap().unwrap().links,
        1,
        "manifest bytes are linked once"
    );
    r.delete_manifest(&a, &Reference::Digest(m1)).await.unwrap();
    assert_eq!(
        meta.blob_link(&a, &base)
            .await
            .unwrap()
            .unwrap()
            .manifest_refs,
        1
    );
    let top1 = meta
        .blob_link(&a, &Digest::sha256(b"top1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(top1.manifest_refs, 0);
    r.delete_manifest(&a, &tag_ref("two")).await.unwrap();
    assert_eq!(meta.manifest(&a, &m2).await.unwrap().unwrap().tags, 0);
    let repo_rec = meta.repository(&a).await.unwrap().unwrap();
    assert_eq!((repo_rec.blobs, repo_rec.manifests), (5, 1));
    assert_cleans_up(&r).await;
}

/// Embedders see every change as a typed event.
pub async fn events_are_emitted(f: Fixture) {
    let (r, _) = f.registry();
    let mut rx = r.subscribe();
    let repo = repo("suite/events");
    let cfg = push_blob(&r, &repo, b"{}").await;
    let m = image_manifest(b"{}", &[]);
    let res = put_manifest(&r, &repo, &tag_ref("v1"), OCI_MANIFEST, &m)
        .await
        .unwrap();
    r.delete_manifest(&repo, &tag_ref("v1")).await.unwrap();
    r.delete_manifest(&repo, &Reference::Digest(res.digest.clone()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Ok(e) = rx.try_recv() {
        seen.push(e);
    }
    assert_eq!(
        seen,
        vec![
            Event::BlobStored {
                repo: repo.clone(),
                digest: cfg,
                size: 2
            },
            Event::TagMoved {
                repo: repo.clone(),
                tag: tag("v1"),
                from: None,
                to: res.digest.clone()
            },
            Event::ManifestPut {
                repo: repo.clone(),
                digest: res.digest.clone(),
                media_type: OCI_MANIFEST.into(),
                subject: None,
                size: m.len() as u64
            },
            Event::TagDeleted {
                repo: repo.clone(),
                tag: tag("v1"),
                digest: res.digest.clone()
            },
            Event::ManifestDeleted {
                repo: repo.clone(),
                digest: res.digest,
                tags: vec![]
            },
        ]
    );
    assert_cleans_up(&r).await;
}

/// A commit publishes exactly the bytes that were hashed: if the session grew since
/// (an append through another request or process), the store refuses and nothing
/// becomes readable under the digest.
pub async fn commit_refuses_a_session_that_grew(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/grown");
    let blobs = r.storage().blobs;
    let id = UploadId::random();
    blobs.create_upload(&id, &repo, Timestamp(0)).await.unwrap();
    blobs
        .append_upload(&id, 0, body(&[b"hashed"]), Timestamp(0))
        .await
        .unwrap();
    blobs
        .append_upload(&id, 6, body(&[b" and more"]), Timestamp(0))
        .await
        .unwrap();
    let hashed = Digest::sha256(b"hashed");
    let err = blobs.commit_upload(&id, &hashed, 6).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::UploadOffset {
                expected: 15,
                got: 6
            }
        ),
        "{err:?}"
    );
    assert_eq!(blobs.stat(&hashed).await.unwrap(), None);
    let whole = Digest::sha256(b"hashed and more");
    assert_eq!(
        blobs.commit_upload(&id, &whole, 15).await.unwrap(),
        crate::store::CommitOutcome::Stored
    );
    assert_eq!(blobs.stat(&whole).await.unwrap(), Some(15));
    blobs.delete_upload(&id).await.unwrap();
    assert!(blobs.delete(&whole).await.unwrap());
    assert_cleans_up(&r).await;
}

/// `put_bytes` stores whole bytes as a blob in one call (what a manifest push uses):
/// readable at once, `AlreadyPresent` when repeated, and no upload session left behind.
pub async fn put_bytes_commits_in_one_call(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/put-bytes");
    let blobs = r.storage().blobs;
    let data = Bytes::from_static(b"whole bytes, held in memory");
    let d = Digest::sha256(&data);
    assert_eq!(
        blobs
            .put_bytes(&repo, &d, data.clone(), Timestamp(0))
            .await
            .unwrap(),
        crate::store::CommitOutcome::Stored
    );
    assert_eq!(blobs.stat(&d).await.unwrap(), Some(data.len() as u64));
    let mut read = Vec::new();
    let mut s = blobs.read(&d, None).await.unwrap().unwrap().stream;
    while let Some(c) = s.next().await {
        read.extend_from_slice(&c.unwrap());
    }
    assert_eq!(read, data);
    assert_eq!(
        blobs
            .put_bytes(&repo, &d, data.clone(), Timestamp(0))
            .await
            .unwrap(),
        crate::store::CommitOutcome::AlreadyPresent
    );
    assert!(blobs.list_uploads().await.unwrap().is_empty());
    assert!(blobs.delete(&d).await.unwrap());
    assert_cleans_up(&r).await;
}

/// Orphan bytes (committed, never linked: a crash between commit and link) are found
/// and deleted by the orphan scan; linked blobs are not touched.
pub async fn collection_finds_orphans(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/orphans");
    let kept = push_blob(&r, &repo, b"linked").await;
    let blobs = r.storage().blobs;
    let id = UploadId::random();
    blobs.create_upload(&id, &repo, Timestamp(0)).await.unwrap();
    blobs
        .append_upload(&id, 0, body(&[b"orphan"]), Timestamp(0))
        .await
        .unwrap();
    let orphan = Digest::sha256(b"orphan");
    blobs.commit_upload(&id, &orphan, 6).await.unwrap();
    blobs.delete_upload(&id).await.unwrap();
    let without = r.collect_garbage(&GcOptions::default()).await.unwrap();
    assert_eq!(without.orphans_deleted, 0, "only on request");
    let options = GcOptions {
        orphans: true,
        ..GcOptions::default()
    };
    let dry = r
        .collect_garbage(&GcOptions {
            dry_run: true,
            ..options.clone()
        })
        .await
        .unwrap();
    assert_eq!(dry.orphans_deleted, 1);
    assert!(blobs.stat(&orphan).await.unwrap().is_some());
    let report = r.collect_garbage(&options).await.unwrap();
    assert_eq!((report.orphans_deleted, report.bytes_freed), (1, 6));
    assert!(blobs.stat(&orphan).await.unwrap().is_none());
    assert!(r.storage().metadata.blob(&orphan).await.unwrap().is_none());
    assert_eq!(read_blob(&r, &repo, &kept).await.unwrap(), b"linked");
    assert_cleans_up(&r).await;
}

/// After deleting everything and collecting, nothing is left: no records, no bytes.
pub async fn cleanup_leaves_store_empty(f: Fixture) {
    let (r, _) = f.registry();
    for i in 0..3 {
        let repo = repo(&format!("suite/cleanup{i}"));
        let (child, size) = push_image(
            &r,
            &repo,
            "v1",
            format!("{{\"i\":{i}}}").as_bytes(),
            &[b"shared", b"x"],
        )
        .await;
        let idx = index_manifest(&[(&child, size)]);
        put_manifest(&r, &repo, &tag_ref("idx"), OCI_INDEX, &idx)
            .await
            .unwrap();
        let referrer = image_manifest_with(b"{}", &[], Some((&child, size)), Some("a/b"));
        push_blob(&r, &repo, b"{}").await;
        put_manifest(&r, &repo, &tag_ref("ref"), OCI_MANIFEST, &referrer)
            .await
            .unwrap();
        r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    }
    assert!(r.storage().metadata.stats().await.unwrap().blobs > 0);
    assert_cleans_up(&r).await;
}
