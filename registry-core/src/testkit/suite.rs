//! The behaviours. Each takes a fresh [`Fixture`] and ends with [`assert_cleans_up`].

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream;

use super::*;
use crate::digest::Algorithm;
use crate::events::Event;
use crate::manifest::media_type::{OCI_INDEX, OCI_MANIFEST};
use crate::registry::RangeRequest;
use crate::store::{BlobState, UploadId};
use crate::testkit::hooks;
use crate::time::ManualClock;
use std::sync::Arc;

pub use super::policy_suite::*;
pub use super::refusal_suite::*;

fn put_options() -> PutManifestOptions {
    PutManifestOptions::default()
}

async fn put_manifest(
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

/// A blob pushed in one request reads back exactly, with its size.
pub async fn blob_monolithic_round_trip(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/mono");
    let data = b"hello monolithic world".repeat(1000);
    let d = push_blob(&r, &repo, &data).await;
    assert_eq!(
        r.stat_blob(&repo, &d).await.unwrap().size,
        data.len() as u64
    );
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    // Pushing the same bytes again is fine and changes nothing.
    push_blob(&r, &repo, &data).await;
    assert_eq!(r.storage().metadata.stats().await.unwrap().blobs, 1);
    // An empty blob is a blob.
    let empty = push_blob(&r, &repo, b"").await;
    assert_eq!(read_blob(&r, &repo, &empty).await.unwrap(), b"");
    assert_cleans_up(&r).await;
}

/// Chunks appended in order make one blob; status reports progress.
pub async fn blob_chunked_upload(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/chunked");
    let parts: [&[u8]; 3] = [b"first chunk|", b"second chunk|", b"third"];
    let whole: Vec<u8> = parts.concat();
    let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    assert_eq!(s.offset, 0);
    let mut offset = 0u64;
    for p in &parts[..2] {
        let st = r
            .append_upload(&repo, &s.id, Some(offset), Some(p.len() as u64), body(&[p]))
            .await
            .unwrap();
        offset += p.len() as u64;
        assert_eq!(st.offset, offset);
        assert_eq!(r.upload_status(&repo, &s.id).await.unwrap().offset, offset);
    }
    let d = Digest::sha256(&whole);
    // Not visible before it is finished.
    assert!(matches!(
        r.stat_blob(&repo, &d).await,
        Err(Error::BlobUnknown { .. })
    ));
    let info = r
        .finish_upload(&repo, &s.id, &d, Some((body(&[parts[2]]), None)))
        .await
        .unwrap();
    assert_eq!(info.size, whole.len() as u64);
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), whole);
    // The session is gone.
    assert!(matches!(
        r.upload_status(&repo, &s.id).await,
        Err(Error::UploadUnknown { .. })
    ));
    assert_cleans_up(&r).await;
}

/// sha512 digests work end to end, for blobs and manifests.
pub async fn blob_sha512_upload(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/sha512");
    let data = b"sha512 content";
    let d = Digest::compute(Algorithm::Sha512, data);
    let s = r.start_upload(&repo, Algorithm::Sha512).await.unwrap();
    r.append_upload(&repo, &s.id, Some(0), None, body(&[data]))
        .await
        .unwrap();
    r.finish_upload(&repo, &s.id, &d, None).await.unwrap();
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), data);
    // A session hashed as sha256 can still be finished with a sha512 digest.
    let other = b"other content";
    let d2 = Digest::compute(Algorithm::Sha512, other);
    let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    r.finish_upload(&repo, &s.id, &d2, Some((body(&[other]), None)))
        .await
        .unwrap();
    assert_eq!(read_blob(&r, &repo, &d2).await.unwrap(), other);
    // A manifest pushed by a sha512 digest.
    let cfg = b"{}";
    push_blob(&r, &repo, cfg).await;
    let m = image_manifest(cfg, &[]);
    let md = Digest::compute(Algorithm::Sha512, m.as_bytes());
    let res = put_manifest(&r, &repo, &Reference::Digest(md.clone()), OCI_MANIFEST, &m)
        .await
        .unwrap();
    assert_eq!(res.digest, md);
    let got = r.get_manifest(&repo, &Reference::Digest(md)).await.unwrap();
    assert_eq!(got.bytes, m.as_bytes());
    assert_cleans_up(&r).await;
}

async fn read_range(
    r: &Registry,
    repo: &RepoName,
    d: &Digest,
    range: RangeRequest,
) -> Result<Vec<u8>, Error> {
    let mut b = r.get_blob(repo, d, Some(range)).await?;
    let mut out = Vec::new();
    while let Some(c) = b.stream.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    Ok(out)
}

/// Byte ranges: explicit, open, suffix, clamped, and unsatisfiable.
pub async fn blob_range_reads(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/range");
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    // Several chunks, so ranges cross chunk boundaries in stores that keep them.
    let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    let chunks: Vec<&[u8]> = data.chunks(3000).collect();
    r.append_upload(&repo, &s.id, Some(0), None, body(&chunks))
        .await
        .unwrap();
    let d = Digest::sha256(&data);
    r.finish_upload(&repo, &s.id, &d, None).await.unwrap();
    let cases = [
        (RangeRequest::FromTo(0, 0), &data[0..1]),
        (RangeRequest::FromTo(2990, 3010), &data[2990..3011]),
        (RangeRequest::FromTo(9000, 20_000), &data[9000..]),
        (RangeRequest::From(5000), &data[5000..]),
        (RangeRequest::Suffix(10), &data[9990..]),
        (RangeRequest::Suffix(50_000), &data[..]),
    ];
    for (range, expected) in cases {
        assert_eq!(
            read_range(&r, &repo, &d, range).await.unwrap(),
            expected,
            "{range:?}"
        );
    }
    for bad in [
        RangeRequest::FromTo(10_000, 10_001),
        RangeRequest::From(10_000),
        RangeRequest::FromTo(5, 4),
        RangeRequest::Suffix(0),
    ] {
        assert!(
            matches!(
                read_range(&r, &repo, &d, bad).await,
                Err(Error::RangeNotSatisfiable { size: 10_000 })
            ),
            "{bad:?}"
        );
    }
    assert_cleans_up(&r).await;
}

/// A chunk must start where the upload ends: out-of-order and repeated chunks are
/// refused and change nothing.
pub async fn upload_offset_checks(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/offsets");
    let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    r.append_upload(&repo, &s.id, Some(0), None, body(&[b"0123456789"]))
        .await
        .unwrap();
    for (offset, what) in [(0, "repeated chunk"), (5, "overlap"), (11, "gap")] {
        let e = r
            .append_upload(&repo, &s.id, Some(offset), None, body(&[b"xxxxx"]))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::UploadOffset { expected: 10, got } if got == offset),
            "{what}: {e:?}"
        );
    }
    assert_eq!(r.upload_status(&repo, &s.id).await.unwrap().offset, 10);
    let d = Digest::sha256(b"0123456789abc");
    r.finish_upload(&repo, &s.id, &d, Some((body(&[b"abc"]), Some(3))))
        .await
        .unwrap();
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), b"0123456789abc");
    assert_cleans_up(&r).await;
}

/// A wrong digest at the end is refused; the blob never becomes visible.
pub async fn upload_digest_mismatch_changes_nothing(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/mismatch");
    let claimed = Digest::sha256(b"what the client claims");
    let e = r
        .put_blob(&repo, &claimed, None, body(&[b"what it sends"]))
        .await
        .unwrap_err();
    match e {
        Error::DigestMismatch { expected, actual } => {
            assert_eq!(expected, claimed);
            assert_eq!(actual, Digest::sha256(b"what it sends"));
        }
        e => panic!("expected DigestMismatch, got {e:?}"),
    }
    for d in [&claimed, &Digest::sha256(b"what it sends")] {
        assert!(matches!(
            r.stat_blob(&repo, d).await,
            Err(Error::BlobUnknown { .. })
        ));
    }
    assert_eq!(
        r.storage().metadata.stats().await.unwrap(),
        MetaStats::default()
    );
    assert!(r.storage().blobs.list_uploads().await.unwrap().is_empty());
    assert_cleans_up(&r).await;
}

/// A body shorter or longer than declared is refused and the upload keeps its length.
pub async fn upload_size_mismatch_changes_nothing(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/size");
    let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    r.append_upload(&repo, &s.id, Some(0), Some(4), body(&[b"abcd"]))
        .await
        .unwrap();
    for (declared, sent) in [(10u64, &b"short"[..]), (2, &b"longer"[..])] {
        let e = r
            .append_upload(&repo, &s.id, Some(4), Some(declared), body(&[sent]))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::SizeMismatch { expected, .. } if expected == declared),
            "{e:?}"
        );
        assert_eq!(r.upload_status(&repo, &s.id).await.unwrap().offset, 4);
    }
    // A failing body (the client went away) also leaves the upload as it was.
    let failing: ByteStream = stream::iter(vec![
        Ok(Bytes::from_static(b"partial")),
        Err(std::io::Error::other("connection reset")),
    ])
    .boxed();
    // It is the caller's failure, not storage's (HTTP answers 400, not 500).
    let e = r
        .append_upload(&repo, &s.id, Some(4), None, failing)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BodyIncomplete { .. }), "{e:?}");
    assert_eq!(r.upload_status(&repo, &s.id).await.unwrap().offset, 4);
    let d = Digest::sha256(b"abcdef");
    r.finish_upload(&repo, &s.id, &d, Some((body(&[b"ef"]), None)))
        .await
        .unwrap();
    assert_eq!(read_blob(&r, &repo, &d).await.unwrap(), b"abcdef");
    assert_cleans_up(&r).await;
}

/// Unknown session ids, and sessions of another repository, are unknown.
pub async fn upload_unknown_and_wrong_repo(f: Fixture) {
    let (r, _) = f.registry();
    let (a, b) = (repo("suite/a"), repo("suite/b"));
    let unknown = UploadId::random();
    assert!(matches!(
        r.upload_status(&a, &unknown).await,
        Err(Error::UploadUnknown { .. })
    ));
    assert!(matches!(
        r.append_upload(&a, &unknown, None, None, body(&[b"x"]))
            .await,
        Err(Error::UploadUnknown { .. })
    ));
    let s = r.start_upload(&a, Algorithm::Sha256).await.unwrap();
    assert!(matches!(
        r.upload_status(&b, &s.id).await,
        Err(Error::UploadUnknown { .. })
    ));
    assert!(matches!(
        r.finish_upload(&b, &s.id, &Digest::sha256(b""), None).await,
        Err(Error::UploadUnknown { .. })
    ));
    assert!(matches!(
        r.cancel_upload(&b, &s.id).await,
        Err(Error::UploadUnknown { .. })
    ));
    r.cancel_upload(&a, &s.id).await.unwrap();
    assert_cleans_up(&r).await;
}

/// A cancelled session is gone and its bytes freed.
pub async fn upload_cancel(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/cancel");
    let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    r.append_upload(&repo, &s.id, None, None, body(&[b"some bytes"]))
        .await
        .unwrap();
    r.cancel_upload(&repo, &s.id).await.unwrap();
    assert!(matches!(
        r.upload_status(&repo, &s.id).await,
        Err(Error::UploadUnknown { .. })
    ));
    assert!(matches!(
        r.cancel_upload(&repo, &s.id).await,
        Err(Error::UploadUnknown { .. })
    ));
    assert!(r.storage().blobs.list_uploads().await.unwrap().is_empty());
    assert_cleans_up(&r).await;
}

/// Idle sessions expire; active ones do not.
pub async fn upload_expiry(f: Fixture) {
    let (b, clock) = f.builder();
    let r = b.with_upload_expiry(Duration::from_secs(60)).build();
    let repo = repo("suite/expiry");
    let idle = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    let active = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    clock.advance(Duration::from_secs(45));
    r.append_upload(&repo, &active.id, None, None, body(&[b"still here"]))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(30));
    assert!(matches!(
        r.upload_status(&repo, &idle.id).await,
        Err(Error::UploadUnknown { .. })
    ));
    assert_eq!(r.upload_status(&repo, &active.id).await.unwrap().offset, 10);
    clock.advance(Duration::from_secs(120));
    let report = r.collect_garbage(&GcOptions::default()).await.unwrap();
    assert_eq!(report.uploads_expired, 1);
    assert!(r.storage().blobs.list_uploads().await.unwrap().is_empty());
    assert_cleans_up(&r).await;
}

/// A session continued by another registry instance (no hash state in memory, as after
/// a restart) is re-hashed from storage and finishes correctly.
pub async fn upload_resumes_without_hash_state(f: Fixture) {
    let (r1, _) = f.registry();
    let repo = repo("suite/resume");
    let s = r1.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    r1.append_upload(&repo, &s.id, Some(0), None, body(&[b"before restart, "]))
        .await
        .unwrap();
    let (r2, _) = f.registry();
    let st = r2.upload_status(&repo, &s.id).await.unwrap();
    assert_eq!(st.offset, 16);
    r2.append_upload(&repo, &s.id, Some(16), None, body(&[b"after restart"]))
        .await
        .unwrap();
    let d = Digest::sha256(b"before restart, after restart");
    r2.finish_upload(&repo, &s.id, &d, None).await.unwrap();
    assert_eq!(
        read_blob(&r1, &repo, &d).await.unwrap(),
        b"before restart, after restart"
    );
    assert_cleans_up(&r2).await;
}

/// Open upload sessions are limited per repository and in total; finishing or
/// cancelling one frees its slot.
pub async fn upload_session_limits(f: Fixture) {
    let (b, _) = f.builder();
    let r = b.with_max_open_uploads(3, 2).build();
    let (a, b) = (repo("suite/limits-a"), repo("suite/limits-b"));
    let a1 = r.start_upload(&a, Algorithm::Sha256).await.unwrap();
    let _a2 = r.start_upload(&a, Algorithm::Sha256).await.unwrap();
    let e = r.start_upload(&a, Algorithm::Sha256).await.unwrap_err();
    assert!(matches!(e, Error::TooManyRequests { .. }), "{e:?}");
    let b1 = r.start_upload(&b, Algorithm::Sha256).await.unwrap();
    let e = r.start_upload(&b, Algorithm::Sha256).await.unwrap_err();
    assert!(matches!(e, Error::TooManyRequests { .. }), "total: {e:?}");
    r.cancel_upload(&a, &a1.id).await.unwrap();
    let d = Digest::sha256(b"x");
    r.finish_upload(&b, &b1.id, &d, Some((body(&[b"x"]), None)))
        .await
        .unwrap();
    // A refused digest frees its slot too.
    let e = r
        .put_blob(&b, &Digest::sha256(b"y"), None, body(&[b"z"]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
    r.start_upload(&a, Algorithm::Sha256).await.unwrap();
    r.start_upload(&b, Algorithm::Sha256).await.unwrap();
    // A registry opened later over the same storage counts the sessions still open.
    let (b2, _) = f.builder();
    let r2 = b2.with_max_open_uploads(3, 2).build();
    assert!(matches!(
        r2.start_upload(&a, Algorithm::Sha256).await,
        Err(Error::TooManyRequests { .. })
    ));
    assert_cleans_up(&r).await;
}

/// One client filling the session limits with sessions it never uses locks others out
/// only until those sessions have been idle for `empty_upload_expiry`; sessions that
/// received bytes keep the full `upload_expiry`.
pub async fn empty_upload_sessions_are_reclaimed_under_pressure(f: Fixture) {
    let (b, clock) = f.builder();
    let r = b
        .with_max_open_uploads(100, 2)
        .with_empty_upload_expiry(Duration::from_secs(60))
        .build();
    let a = repo("suite/empty-sessions");
    let used = r.start_upload(&a, Algorithm::Sha256).await.unwrap();
    r.append_upload(&a, &used.id, Some(0), None, body(&[b"some bytes"]))
        .await
        .unwrap();
    let _unused = r.start_upload(&a, Algorithm::Sha256).await.unwrap();
    let e = r.start_upload(&a, Algorithm::Sha256).await.unwrap_err();
    assert!(matches!(e, Error::TooManyRequests { .. }), "{e:?}");
    clock.advance(Duration::from_secs(61));
    // The empty one goes; the one with bytes stays (it is resumable for an hour).
    let fresh = r.start_upload(&a, Algorithm::Sha256).await.unwrap();
    let e = r.start_upload(&a, Algorithm::Sha256).await.unwrap_err();
    assert!(matches!(e, Error::TooManyRequests { .. }), "{e:?}");
    assert_eq!(r.upload_status(&a, &used.id).await.unwrap().offset, 10);
    r.cancel_upload(&a, &used.id).await.unwrap();
    r.cancel_upload(&a, &fresh.id).await.unwrap();
    assert_cleans_up(&r).await;
}

/// Blobs over the configured limit are refused, monolithic or chunked.
pub async fn blob_size_limit(f: Fixture) {
    let (b, _) = f.builder();
    let r = b.with_max_blob_size(8).build();
    let repo = repo("suite/limit");
    let e = r
        .put_blob(
            &repo,
            &Digest::sha256(b"123456789"),
            None,
            body(&[b"12345", b"6789"]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                what: "blob",
                limit: 8
            }
        ),
        "{e:?}"
    );
    let s = r.start_upload(&repo, Algorithm::Sha256).await.unwrap();
    r.append_upload(&repo, &s.id, None, None, body(&[b"12345678"]))
        .await
        .unwrap();
    let e = r
        .append_upload(&repo, &s.id, None, None, body(&[b"9"]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    assert_eq!(r.upload_status(&repo, &s.id).await.unwrap().offset, 8);
    r.cancel_upload(&repo, &s.id).await.unwrap();
    assert_cleans_up(&r).await;
}

/// A blob uploaded to one repository is not readable through another.
pub async fn blob_isolation_between_repositories(f: Fixture) {
    let (r, _) = f.registry();
    let (a, b) = (repo("suite/private"), repo("suite/other"));
    let d = push_blob(&r, &a, b"secret layer").await;
    assert!(matches!(
        r.stat_blob(&b, &d).await,
        Err(Error::BlobUnknown { .. })
    ));
    assert!(matches!(
        r.get_blob(&b, &d, None).await,
        Err(Error::BlobUnknown { .. })
    ));
    // Nor can a manifest in `b` reference it without uploading or mounting it.
    let m = image_manifest(b"secret layer", &[]);
    assert!(matches!(
        put_manifest(&r, &b, &tag_ref("x"), OCI_MANIFEST, &m).await,
        Err(Error::ManifestBlobUnknown { .. })
    ));
    assert_cleans_up(&r).await;
}

/// Deleting a blob link: unknown → BlobUnknown; referenced by a manifest → InUse;
/// otherwise gone from the repository (and only from it).
pub async fn blob_delete_semantics(f: Fixture) {
    let (r, _) = f.registry();
    let (a, b) = (repo("suite/del-a"), repo("suite/del-b"));
    let (md, _) = push_image(&r, &a, "v1", b"{\"c\":1}", &[b"layer-1"]).await;
    let layer = Digest::sha256(b"layer-1");
    push_blob(&r, &b, b"layer-1").await;
    assert!(matches!(
        r.delete_blob(&a, &layer).await,
        Err(Error::InUse { .. })
    ));
    r.delete_blob(&b, &layer).await.unwrap();
    assert!(matches!(
        r.stat_blob(&b, &layer).await,
        Err(Error::BlobUnknown { .. })
    ));
    assert!(matches!(
        r.delete_blob(&b, &layer).await,
        Err(Error::BlobUnknown { .. })
    ));
    assert_eq!(read_blob(&r, &a, &layer).await.unwrap(), b"layer-1");
    r.delete_manifest(&a, &Reference::Digest(md)).await.unwrap();
    r.delete_blob(&a, &layer).await.unwrap();
    assert_cleans_up(&r).await;
}

/// Mount from a named repository, from any readable one, never from an unreadable one.
pub async fn mount_with_and_without_source(f: Fixture) {
    let (r, _) = f.registry();
    let (src, dst, hidden) = (repo("suite/src"), repo("suite/dst"), repo("suite/hidden"));
    let d = push_blob(&r, &src, b"shared layer").await;
    let h = push_blob(&r, &hidden, b"hidden layer").await;
    assert!(
        r.mount_blob(&dst, &d, Some(&src), &crate::AllowAll)
            .await
            .unwrap()
    );
    assert_eq!(read_blob(&r, &dst, &d).await.unwrap(), b"shared layer");
    // From a repository that lacks it: no mount.
    assert!(
        !r.mount_blob(&dst, &h, Some(&src), &crate::AllowAll)
            .await
            .unwrap()
    );
    // The caller may not read the source: no mount, even though it has the blob.
    let deny_hidden = |repo: &RepoName| repo.as_str() != "suite/hidden";
    assert!(
        !r.mount_blob(&dst, &h, Some(&hidden), &deny_hidden)
            .await
            .unwrap()
    );
    assert!(!r.mount_blob(&dst, &h, None, &deny_hidden).await.unwrap());
    assert!(matches!(
        r.stat_blob(&dst, &h).await,
        Err(Error::BlobUnknown { .. })
    ));
    // Anonymous mount finds a readable holder.
    let other = repo("suite/anon");
    assert!(
        r.mount_blob(&other, &h, None, &crate::AllowAll)
            .await
            .unwrap()
    );
    assert_eq!(read_blob(&r, &other, &h).await.unwrap(), b"hidden layer");
    // Unknown blob: no mount.
    assert!(
        !r.mount_blob(&other, &Digest::sha256(b"nope"), None, &crate::AllowAll)
            .await
            .unwrap()
    );
    assert_cleans_up(&r).await;
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
                subject: None
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
