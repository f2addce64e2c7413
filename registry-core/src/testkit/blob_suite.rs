//! Blobs and upload sessions: monolithic, chunked and resumed uploads, ranges, limits,
//! isolation, mounts; run by every store as part of the shared suite (re-exported from
//! [`super::suite`]).

use std::time::Duration;

use futures::StreamExt;

use super::suite::put_manifest;
use super::*;
use crate::digest::Algorithm;
use crate::manifest::media_type::OCI_MANIFEST;
use crate::registry::RangeRequest;
use crate::store::{UploadId, UploadOwner};

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

/// One owner (identity, or address when anonymous) cannot take more than its share of
/// sessions: others still get theirs, and the refusal says when a slot frees up.
pub async fn upload_sessions_are_limited_per_owner(f: Fixture) {
    let (b, clock) = f.builder();
    let r = b
        .with_max_open_uploads_per_owner(2)
        .with_empty_upload_expiry(Duration::from_secs(60))
        .build();
    let (mallory, alice) = (
        UploadOwner::new("user:mallory"),
        UploadOwner::new("user:alice"),
    );
    let (a, b) = (repo("suite/owner-a"), repo("suite/owner-b"));
    let m1 = r
        .start_upload_for(&a, Algorithm::Sha256, &mallory)
        .await
        .unwrap();
    let m2 = r
        .start_upload_for(&b, Algorithm::Sha256, &mallory)
        .await
        .unwrap();
    assert!(
        m1.id.is_for(&mallory) && !m1.id.is_for(&alice),
        "{:?}",
        m1.id
    );
    let retry_after = |e: Error| match e {
        Error::TooManyRequests { retry_after, .. } => retry_after,
        other => panic!("expected TooManyRequests, got {other:?}"),
    };
    // Over the owner's limit, in any repository: its empty sessions free up when they
    // have been idle for the empty-session expiry.
    let e = r
        .start_upload_for(&a, Algorithm::Sha256, &mallory)
        .await
        .unwrap_err();
    assert_eq!(retry_after(e), Some(Duration::from_secs(60)));
    clock.advance(Duration::from_secs(20));
    let e = r
        .put_blob_for(&b, &Digest::sha256(b"m"), None, body(&[b"m"]), &mallory)
        .await
        .unwrap_err();
    assert_eq!(retry_after(e), Some(Duration::from_secs(40)));
    // Others are not affected.
    let a1 = r
        .start_upload_for(&a, Algorithm::Sha256, &alice)
        .await
        .unwrap();
    let unowned = r.start_upload(&a, Algorithm::Sha256).await.unwrap();
    // A session receiving bytes is likely to finish soon: retry in seconds.
    r.append_upload(&b, &m2.id, Some(0), None, body(&[b"bytes"]))
        .await
        .unwrap();
    let e = r
        .start_upload_for(&a, Algorithm::Sha256, &mallory)
        .await
        .unwrap_err();
    assert_eq!(retry_after(e), Some(Duration::from_secs(5)));
    // The empty session goes once idle long enough, under pressure; the used one stays.
    clock.advance(Duration::from_secs(41));
    let m3 = r
        .start_upload_for(&a, Algorithm::Sha256, &mallory)
        .await
        .unwrap();
    assert!(matches!(
        r.upload_status(&a, &m1.id).await,
        Err(Error::UploadUnknown { .. })
    ));
    // A registry opened later over the same storage counts each owner's sessions.
    let (b2, _) = f.builder();
    let r2 = b2.with_max_open_uploads_per_owner(2).build();
    assert!(matches!(
        r2.start_upload_for(&b, Algorithm::Sha256, &mallory).await,
        Err(Error::TooManyRequests { .. })
    ));
    for (repo, id) in [(&b, &m2.id), (&a, &m3.id), (&a, &a1.id), (&a, &unowned.id)] {
        r.cancel_upload(repo, id).await.unwrap();
    }
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
