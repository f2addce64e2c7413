//! `RemoteRegistry` against small servers that misbehave on purpose: bytes that do not
//! match their digest, a connection cut in the middle of a blob, 503s and 429s, a
//! registry that is not listening, and blob redirects to another host.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use bytes::Bytes;
use futures::StreamExt;
use registry_core::{Digest, Error, ImageSource, Reference, Registry, media_type};
use registry_remote::RemoteRegistry;

use common::*;

#[tokio::test]
async fn served_bytes_that_do_not_match_their_digest_are_refused() {
    let good = Bytes::from(vec![7u8; 100_000]);
    let digest = Digest::sha256(&good);
    let mut bad = good.to_vec();
    bad[50_000] ^= 1;
    let bad = Bytes::from(bad);
    let manifest = Bytes::from_static(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#);
    let claimed = Digest::sha256(b"some other manifest");
    let (blob_path, by_digest) = (
        format!("/v2/r/blobs/{digest}"),
        format!("/v2/r/manifests/{claimed}"),
    );
    let said_digest = claimed.clone();
    let url = serve_fn(Arc::new(move |req: &Request| {
        let path = req.uri().path();
        let len = |b: &Bytes| ("content-length", b.len().to_string());
        let ct = ("content-type", media_type::OCI_INDEX.to_owned());
        if path == blob_path {
            respond(StatusCode::OK, &[len(&bad)], bad.clone())
        } else if path == by_digest {
            respond(StatusCode::OK, &[len(&manifest), ct], manifest.clone())
        } else if path == "/v2/r/manifests/t" {
            let said = ("docker-content-digest", said_digest.to_string());
            respond(
                StatusCode::OK,
                &[len(&manifest), ct, said],
                manifest.clone(),
            )
        } else {
            respond(StatusCode::NOT_FOUND, &[], "")
        }
    }))
    .await;
    let remote = RemoteRegistry::new(&url).unwrap();
    let r = repo("r");

    let blob = remote.get_blob(&r, &digest).await.unwrap();
    assert_eq!(blob.size, 100_000);
    let items: Vec<std::io::Result<Bytes>> = blob.stream.collect().await;
    let (last, chunks) = items.split_last().unwrap();
    assert!(chunks.iter().all(|c| c.is_ok()));
    let e = last.as_ref().unwrap_err();
    assert!(e.to_string().contains("hashes to"), "{e}");
    // The stream ended with the error: a consumer never sees a clean end.
    let total: usize = chunks.iter().map(|c| c.as_ref().unwrap().len()).sum();
    assert_eq!(total, 100_000);

    // Through a transfer, the source is blamed.
    let local = Registry::in_memory();
    let stream = remote.get_blob(&r, &digest).await.unwrap().stream;
    let e = local.put_blob(&r, &digest, Some(100_000), stream).await;
    assert!(e.is_err());

    let e = remote
        .get_manifest(&r, &Reference::Digest(claimed.clone()))
        .await;
    assert!(
        matches!(&e, Err(Error::Upstream { reason }) if reason.contains("hashes to")),
        "{e:?}"
    );
    let e = remote.get_manifest(&r, &Reference::Tag(tag("t"))).await;
    assert!(
        matches!(&e, Err(Error::Upstream { reason }) if reason.contains("hashes to")),
        "{e:?}"
    );
}

/// A blob server that cuts the first download after `cut` bytes, and then honours
/// `Range` (or, if `honour_range` is false, answers every later request whole).
async fn cutting_server(
    data: Bytes,
    cut: usize,
    honour_range: bool,
) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let url = serve_fn(Arc::new(move |req: &Request| {
        let range = req
            .headers()
            .get(header::RANGE)
            .map(|v| v.to_str().unwrap().to_owned());
        let first = {
            let mut log = log.lock().unwrap();
            log.push(range.clone());
            log.len() == 1
        };
        let size = ("content-length", data.len().to_string());
        if first {
            let head = data.slice(..cut);
            let stream = futures::stream::iter([Ok::<_, std::io::Error>(head)]).chain(
                futures::stream::once(async {
                    // Let the first half reach the client before the connection drops.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err(std::io::Error::other("cut"))
                }),
            );
            return respond(StatusCode::OK, &[size], Body::from_stream(stream));
        }
        match range.and_then(|r| {
            r.strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse::<usize>()
                .ok()
        }) {
            Some(start) if honour_range => respond(
                StatusCode::PARTIAL_CONTENT,
                &[
                    ("content-length", (data.len() - start).to_string()),
                    (
                        "content-range",
                        format!("bytes {start}-{}/{}", data.len() - 1, data.len()),
                    ),
                ],
                data.slice(start..),
            ),
            _ => respond(StatusCode::OK, &[size], data.clone()),
        }
    }))
    .await;
    (url, seen)
}

#[tokio::test]
async fn a_broken_download_resumes_with_range() {
    let data: Bytes = (0..300_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let digest = Digest::sha256(&data);
    for honour_range in [true, false] {
        let (url, seen) = cutting_server(data.clone(), 150_000, honour_range).await;
        let remote = RemoteRegistry::new(&url).unwrap();
        let blob = remote.get_blob(&repo("r"), &digest).await.unwrap();
        assert_eq!(blob.size, 300_000);
        let got = read_all(blob.stream).await.unwrap();
        assert!(got == data, "honour_range {honour_range}: the blob differs");
        assert_eq!(
            *seen.lock().unwrap(),
            vec![None, Some("bytes=150000-".to_owned())],
            "honour_range {honour_range}"
        );
    }
}

#[tokio::test]
async fn failures_are_retried_within_the_budget() {
    let manifest = Bytes::from_static(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#);
    let digest = Digest::sha256(&manifest);
    let server = |failures: usize, status: StatusCode| {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let manifest = manifest.clone();
        let handler: Handler = Arc::new(move |_req: &Request| {
            if counter.fetch_add(1, Ordering::SeqCst) < failures {
                return respond(status, &[("retry-after", "0".to_owned())], "busy");
            }
            respond(
                StatusCode::OK,
                &[("content-type", media_type::OCI_INDEX.to_owned())],
                manifest.clone(),
            )
        });
        (handler, hits)
    };
    let r = repo("r");
    let reference = Reference::Digest(digest.clone());

    let (handler, hits) = server(2, StatusCode::SERVICE_UNAVAILABLE);
    let remote = RemoteRegistry::new(&serve_fn(handler).await).unwrap();
    let m = remote.get_manifest(&r, &reference).await.unwrap();
    assert_eq!(m.bytes, manifest);
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    let (handler, hits) = server(usize::MAX, StatusCode::SERVICE_UNAVAILABLE);
    let remote = RemoteRegistry::new(&serve_fn(handler).await)
        .unwrap()
        .with_retries(2)
        .with_credentials(alice());
    let e = remote.get_manifest(&r, &reference).await.unwrap_err();
    match &e {
        Error::Upstream { reason } => {
            assert!(
                reason.contains("/v2/r/manifests/") && reason.contains("503"),
                "{reason}"
            );
            assert!(!reason.contains(ALICE.1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    let (handler, hits) = server(usize::MAX, StatusCode::TOO_MANY_REQUESTS);
    let remote = RemoteRegistry::new(&serve_fn(handler).await)
        .unwrap()
        .with_retries(1);
    let e = remote.get_manifest(&r, &reference).await;
    assert!(matches!(e, Err(Error::TooManyRequests { .. })), "{e:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // Nobody listening.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let remote = RemoteRegistry::new(&closed).unwrap().with_retries(1);
    let e = remote.get_manifest(&r, &reference).await;
    assert!(matches!(e, Err(Error::Upstream { .. })), "{e:?}");
}

#[tokio::test]
async fn redirects_to_another_host_carry_no_credentials() {
    let data = Bytes::from_static(b"layer bytes kept in object storage");
    let digest = Digest::sha256(&data);
    let local_data = Bytes::from_static(b"layer bytes kept on the registry's own host");
    let local_digest = Digest::sha256(&local_data);

    // The storage host: serves the bytes to anyone, records what it was sent.
    let storage_seen = Arc::new(Mutex::new(Vec::new()));
    let log = storage_seen.clone();
    let storage_data = data.clone();
    let storage = serve_fn(Arc::new(move |req: &Request| {
        log.lock()
            .unwrap()
            .push(req.headers().get(header::AUTHORIZATION).cloned());
        respond(
            StatusCode::OK,
            &[("content-length", storage_data.len().to_string())],
            storage_data.clone(),
        )
    }))
    .await;

    // The registry: Basic credentials required; blobs redirect, one to storage, one to
    // another path on itself.
    let expected = format!(
        "Basic {}",
        "YWxpY2U6d29uZGVybGFuZC03" // base64("alice:wonderland-7")
    );
    let own_data = local_data.clone();
    let registry_seen = Arc::new(Mutex::new(Vec::new()));
    let log = registry_seen.clone();
    let (blob_path, local_path) = (
        format!("/v2/r/blobs/{digest}"),
        format!("/v2/r/blobs/{local_digest}"),
    );
    let registry = serve_fn(Arc::new(move |req: &Request| {
        let auth = req.headers().get(header::AUTHORIZATION).cloned();
        log.lock()
            .unwrap()
            .push((req.uri().path().to_owned(), auth.clone()));
        if auth.as_ref().and_then(|a| a.to_str().ok()) != Some(expected.as_str()) {
            return respond(
                StatusCode::UNAUTHORIZED,
                &[("www-authenticate", "Basic realm=\"test\"".to_owned())],
                "",
            );
        }
        let path = req.uri().path();
        if path == blob_path {
            let to = format!("{storage}/bucket/blob?X-Signature=secret-signature");
            respond(StatusCode::TEMPORARY_REDIRECT, &[("location", to)], "")
        } else if path == local_path {
            respond(
                StatusCode::FOUND,
                &[("location", "/own/blob".to_owned())],
                "",
            )
        } else if path == "/own/blob" {
            respond(
                StatusCode::OK,
                &[("content-length", own_data.len().to_string())],
                own_data.clone(),
            )
        } else {
            respond(StatusCode::NOT_FOUND, &[], "")
        }
    }))
    .await;

    let remote = RemoteRegistry::new(&registry)
        .unwrap()
        .with_credentials(alice());
    let r = repo("r");
    let blob = remote.get_blob(&r, &digest).await.unwrap();
    assert_eq!(read_all(blob.stream).await.unwrap(), data);
    assert_eq!(*storage_seen.lock().unwrap(), vec![None]);
    let blob = remote.get_blob(&r, &local_digest).await.unwrap();
    assert_eq!(read_all(blob.stream).await.unwrap(), local_data);
    // On its own host the redirect target gets the credentials.
    let seen = registry_seen.lock().unwrap();
    let own = seen.iter().find(|(p, _)| p == "/own/blob").unwrap();
    assert!(own.1.is_some());
}
