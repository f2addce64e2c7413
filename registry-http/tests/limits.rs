//! Resource limits at the HTTP edge: every limit answers with the status and OCI error
//! code the spec asks for, and a refused request changes nothing.
//!
//! Most tests call the router in process; the body timeout and header size tests need a
//! real socket (hyper's connection handling is what they check) and use `serve_local`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use bytes::Bytes;
use futures::StreamExt as _;
use registry_core::testkit::{image_manifest, image_manifest_with};
use registry_core::{Digest, ManualClock, MemoryStore, Registry, RegistryBuilder, Timestamp};
use registry_http::{HttpConfig, router, serve_local};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::{OCI_MANIFEST, Reply, get, send};

fn builder() -> (RegistryBuilder, ManualClock) {
    let clock = ManualClock::new(Timestamp(1_700_000_000_000));
    let b = Registry::builder(MemoryStore::new()).with_clock(Arc::new(clock.clone()));
    (b, clock)
}

async fn push_blob(app: &Router, repo: &str, data: &[u8]) -> String {
    let d = Digest::sha256(data).to_string();
    let r = send(
        app,
        Method::POST,
        &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
        &[("content-length", &data.len().to_string())],
        data.to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "blob push: {:?}", r.body);
    d
}

async fn push_manifest(app: &Router, repo: &str, reference: &str, m: &str) -> Reply {
    send(
        app,
        Method::PUT,
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("content-type", OCI_MANIFEST)],
        m.to_owned(),
    )
    .await
}

async fn start_upload(app: &Router, repo: &str) -> Reply {
    send(
        app,
        Method::POST,
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        Body::empty(),
    )
    .await
}

/// A body that yields `first` and then never ends: a client that stopped sending.
fn stalled_body(first: &'static [u8]) -> Body {
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) })
        .chain(futures::stream::pending());
    Body::from_stream(stream)
}

#[tokio::test]
async fn manifest_over_the_size_limit_is_413_and_stores_nothing() {
    let (b, _clock) = builder();
    let registry = b.with_max_manifest_size(1024).build();
    let app = router(registry.clone(), HttpConfig::default());
    push_blob(&app, "m/limit", b"{}").await;
    push_blob(&app, "m/limit", b"layer").await;
    let small = image_manifest(b"{}", &[b"layer"]);
    assert!(
        small.len() <= 1024,
        "the accepted manifest must fit the limit"
    );
    let big = image_manifest_with(
        b"{}",
        &[b"layer"],
        None,
        Some(&format!("application/vnd.example.{}", "x".repeat(1100))),
    );
    assert!(big.len() > 1024);
    let stats_before = registry.storage().metadata.stats().await.unwrap();

    // Declared too large: refused before reading the body.
    let r = push_manifest(&app, "m/limit", "v1", &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "MANIFEST_INVALID");
    // Not declared (chunked): refused once the bytes pass the limit.
    let chunks: Vec<Result<Bytes, std::io::Error>> = big
        .as_bytes()
        .chunks(64)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let r = send(
        &app,
        Method::PUT,
        "/v2/m/limit/manifests/v1",
        &[("content-type", OCI_MANIFEST)],
        Body::from_stream(futures::stream::iter(chunks)),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "MANIFEST_INVALID");
    // A lying Content-Length under the limit does not let more bytes through.
    let r = send(
        &app,
        Method::PUT,
        "/v2/m/limit/manifests/v1",
        &[("content-type", OCI_MANIFEST), ("content-length", "10")],
        big.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

    assert_eq!(
        get(&app, "/v2/m/limit/manifests/v1").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        registry.storage().metadata.stats().await.unwrap(),
        stats_before,
        "a refused manifest changed metadata"
    );
    // The limit is a limit, not a ban: a manifest under it goes in.
    let r = push_manifest(&app, "m/limit", "v1", &small).await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn blob_over_the_size_limit_is_413_size_invalid_and_stores_nothing() {
    let (b, _clock) = builder();
    let registry = b.with_max_blob_size(10).build();
    let app = router(registry.clone(), HttpConfig::default());
    let big = b"eleven byte";
    let d = Digest::sha256(big);

    // Monolithic upload.
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/b/limit/blobs/uploads/?digest={d}"),
        &[("content-length", "11")],
        big.to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "SIZE_INVALID");
    assert_eq!(
        get(&app, &format!("/v2/b/limit/blobs/{d}")).await.status,
        StatusCode::NOT_FOUND
    );

    // Chunked: the chunk that crosses the limit is refused; what came before stays.
    let loc = start_upload(&app, "b/limit")
        .await
        .header("location")
        .unwrap()
        .to_owned();
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "0-5")],
        &big[..6],
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "6-10")],
        &big[6..],
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "SIZE_INVALID");
    let r = get(&app, &loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.header("range"), Some("0-5"), "the refused chunk was kept");
    let r = send(
        &app,
        Method::PUT,
        &format!("{loc}?digest={d}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "six bytes do not hash to the eleven"
    );
    assert_eq!(registry.storage().metadata.stats().await.unwrap().blobs, 0);

    // Exactly at the limit is fine.
    push_blob(&app, "b/limit", b"ten bytes!").await;
}

#[tokio::test]
async fn open_upload_sessions_are_limited_per_repository_and_in_total() {
    let (b, _clock) = builder();
    let app = router(b.with_max_open_uploads(3, 2).build(), HttpConfig::default());
    let first = start_upload(&app, "s/one").await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(
        start_upload(&app, "s/one").await.status,
        StatusCode::ACCEPTED
    );
    let r = start_upload(&app, "s/one").await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "per-repository limit"
    );
    assert_eq!(r.code(), "TOOMANYREQUESTS");
    assert!(r.header("retry-after").is_some(), "429 carries Retry-After");
    // A monolithic upload opens a session too.
    let d = Digest::sha256(b"x");
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/s/one/blobs/uploads/?digest={d}"),
        &[],
        &b"x"[..],
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);

    assert_eq!(
        start_upload(&app, "s/two").await.status,
        StatusCode::ACCEPTED
    );
    let r = start_upload(&app, "s/three").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "total limit");
    assert_eq!(r.code(), "TOOMANYREQUESTS");

    // Cancelling one frees its slot.
    let loc = first.header("location").unwrap().to_owned();
    let r = send(&app, Method::DELETE, &loc, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        start_upload(&app, "s/three").await.status,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn idle_upload_sessions_expire() {
    let (b, clock) = builder();
    let app = router(
        b.with_upload_expiry(Duration::from_secs(60)).build(),
        HttpConfig::default(),
    );
    let loc = start_upload(&app, "e/x")
        .await
        .header("location")
        .unwrap()
        .to_owned();
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "0-2")],
        &b"abc"[..],
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // Activity keeps the session alive: idle time counts from the last chunk.
    clock.advance(Duration::from_secs(50));
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "3-5")],
        &b"def"[..],
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    clock.advance(Duration::from_secs(50));
    assert_eq!(get(&app, &loc).await.status, StatusCode::NO_CONTENT);
    clock.advance(Duration::from_secs(11));
    for r in [
        get(&app, &loc).await,
        send(
            &app,
            Method::PATCH,
            &loc,
            &[("content-range", "6-6")],
            &b"g"[..],
        )
        .await,
        send(
            &app,
            Method::PUT,
            &format!("{loc}?digest={}", Digest::sha256(b"abcdef")),
            &[],
            Body::empty(),
        )
        .await,
    ] {
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    }
}

/// Regression: sessions idle past the expiry kept counting against the open-session
/// limits until a garbage collection ran, so abandoned sessions locked clients out.
#[tokio::test]
async fn expired_sessions_do_not_count_against_the_limits() {
    let (b, clock) = builder();
    let registry = b
        .with_upload_expiry(Duration::from_secs(60))
        .with_max_open_uploads(2, 1)
        .build();
    let app = router(registry.clone(), HttpConfig::default());
    let abandoned = start_upload(&app, "x/a")
        .await
        .header("location")
        .unwrap()
        .to_owned();
    assert_eq!(start_upload(&app, "x/b").await.status, StatusCode::ACCEPTED);
    assert_eq!(
        start_upload(&app, "x/a").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    clock.advance(Duration::from_secs(61));
    assert_eq!(start_upload(&app, "x/a").await.status, StatusCode::ACCEPTED);
    assert_eq!(get(&app, &abandoned).await.status, StatusCode::NOT_FOUND);
    // Both old sessions expired, so the total has room again too.
    assert_eq!(start_upload(&app, "x/c").await.status, StatusCode::ACCEPTED);
    assert_eq!(
        registry.storage().blobs.list_uploads().await.unwrap().len(),
        2
    );
}

/// Checks one paged listing under a page size limit of 2 with three items.
async fn check_paging(app: &Router, path: &str, items: impl Fn(&Reply) -> Vec<String>) {
    let all = get(app, &format!("{path}?n=3")).await;
    assert_eq!(all.status, StatusCode::OK, "{path}: {:?}", all.body);
    assert_eq!(
        items(&all).len(),
        2,
        "{path}: n above the maximum is capped"
    );
    assert!(
        all.header("link").is_some(),
        "{path}: a capped page links the rest"
    );
    let default = get(app, path).await;
    assert_eq!(
        items(&default).len(),
        2,
        "{path}: the default page is the maximum"
    );
    // Regression: an `n` too big for a usize was refused with a code outside the spec
    // (PAGINATION_NUMBER_INVALID); it is a request for "everything", capped like any
    // other.
    let huge = get(app, &format!("{path}?n=99999999999999999999999")).await;
    assert_eq!(huge.status, StatusCode::OK, "{path}: {:?}", huge.body);
    assert_eq!(items(&huge), items(&all));
    let bad = get(app, &format!("{path}?n=ten")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.code(), "UNSUPPORTED");
    let bad = get(app, &format!("{path}?n=-1")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    // Following the links reaches every item exactly once.
    let mut seen = items(&all);
    let mut link = all.header("link").map(str::to_owned);
    while let Some(l) = link {
        let next = l
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_owned();
        let r = get(app, &next).await;
        assert_eq!(r.status, StatusCode::OK);
        seen.extend(items(&r));
        link = r.header("link").map(str::to_owned);
    }
    assert_eq!(seen.len(), 3, "{path}: {seen:?}");
}

#[tokio::test]
async fn listing_page_sizes_are_capped() {
    let (b, _clock) = builder();
    let app = router(b.with_max_page_size(2).build(), HttpConfig::default());
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    for repo in ["p/a", "p/b", "p/c"] {
        push_blob(&app, repo, b"{}").await;
    }
    push_blob(&app, "p/a", b"layer").await;
    let subject = image_manifest(b"{}", &[b"layer"]);
    let r = push_manifest(&app, "p/a", "t1", &subject).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let subject_digest = Digest::sha256(subject.as_bytes());
    for (i, tag) in ["t2", "t3"].iter().enumerate() {
        // Distinct manifests that refer to the first: tags and referrers at once.
        let m = image_manifest_with(
            b"{}",
            &[b"layer"],
            Some((&subject_digest, subject.len() as u64)),
            Some(&format!("application/vnd.example.{i}")),
        );
        assert_eq!(
            push_manifest(&app, "p/a", tag, &m).await.status,
            StatusCode::CREATED
        );
    }
    let m = image_manifest_with(
        b"layer",
        &[b"{}"],
        Some((&subject_digest, subject.len() as u64)),
        None,
    );
    assert_eq!(
        push_manifest(&app, "p/a", "t4", &m).await.status,
        StatusCode::CREATED
    );

    check_paging(&app, "/v2/_catalog", |r| strings(&r.json()["repositories"])).await;
    // Four tags: check the cap with n, then the page walk over the first three only
    // would be wrong, so count all four here.
    let r = get(&app, "/v2/p/a/tags/list?n=100").await;
    assert_eq!(strings(&r.json()["tags"]).len(), 2);
    let huge = get(&app, "/v2/p/a/tags/list?n=99999999999999999999999").await;
    assert_eq!(huge.status, StatusCode::OK);
    assert_eq!(strings(&huge.json()["tags"]).len(), 2);
    let bad = get(&app, "/v2/p/a/tags/list?n=ten").await;
    assert_eq!(
        (bad.status, bad.code().as_str()),
        (StatusCode::BAD_REQUEST, "UNSUPPORTED")
    );
    check_paging(&app, &format!("/v2/p/a/referrers/{subject_digest}"), |r| {
        r.json()["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap().to_owned())
            .collect()
    })
    .await;
}

#[tokio::test]
async fn a_stalled_body_times_out_with_a_client_error_and_changes_nothing() {
    let (b, _clock) = builder();
    let registry = b.build();
    let config = HttpConfig::default().with_body_idle_timeout(Duration::from_millis(200));
    let app = router(registry.clone(), config);

    // Chunk upload: the session stays where it was.
    let loc = start_upload(&app, "t/o")
        .await
        .header("location")
        .unwrap()
        .to_owned();
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "0-99"), ("content-length", "100")],
        stalled_body(b"0123456789"),
    )
    .await;
    // Regression: the body's failure reached the store as a storage error: 500.
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.code(), "BLOB_UPLOAD_INVALID");
    assert_eq!(get(&app, &loc).await.header("range"), Some("0-0"));
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "0-2")],
        &b"abc"[..],
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "the session still starts at 0"
    );

    // Monolithic upload.
    let d = Digest::sha256(b"whatever");
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/t/o/blobs/uploads/?digest={d}"),
        &[],
        stalled_body(b"what"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.code(), "BLOB_UPLOAD_INVALID");

    // Manifest.
    let r = send(
        &app,
        Method::PUT,
        "/v2/t/o/manifests/v1",
        &[("content-type", OCI_MANIFEST)],
        stalled_body(b"{\"schemaVersion\":"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "MANIFEST_INVALID");
    let stats = registry.storage().metadata.stats().await.unwrap();
    assert_eq!((stats.blobs, stats.manifests), (0, 0));
    // The failed monolithic upload left no session behind; the chunked one remains.
    assert_eq!(
        registry.storage().blobs.list_uploads().await.unwrap().len(),
        1
    );
}

/// Sends raw bytes on a fresh connection (from a task, so that a server answering
/// before it has read everything does not block us) and reads one response, bounded in
/// time so that a hang fails the test instead of blocking it.
async fn raw_exchange(addr: std::net::SocketAddr, request: Vec<u8>) -> String {
    let (mut reader, mut writer) = TcpStream::connect(addr).await.unwrap().into_split();
    // The write half stays open after sending: a stalled client does not close.
    let sender = tokio::spawn(async move {
        let _ = writer.write_all(&request).await;
        std::future::pending::<()>().await;
        drop(writer);
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !complete_response(&out) {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), read).await;
    sender.abort();
    outcome.expect("the server neither answered nor closed the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `out` holds a whole response head and its `Content-Length` bytes of body.
fn complete_response(out: &[u8]) -> bool {
    let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    out.len() >= end + 4 + len
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

#[tokio::test]
async fn a_client_that_stops_sending_mid_body_gets_an_answer_over_tcp() {
    let (b, _clock) = builder();
    let registry = b.build();
    let config = HttpConfig::default().with_body_idle_timeout(Duration::from_millis(300));
    let server = serve_local(registry.clone(), config).await.unwrap();
    let d = Digest::sha256(b"never complete");
    let head = format!(
        "POST /v2/tcp/x/blobs/uploads/?digest={d} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789"
    );
    let started = std::time::Instant::now();
    let response = raw_exchange(server.addr(), head.into_bytes()).await;
    assert_eq!(status_of(&response), 400, "{response}");
    assert!(response.contains("BLOB_UPLOAD_INVALID"), "{response}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the idle timeout, not the test's, ended the request"
    );
    assert_eq!(registry.storage().metadata.stats().await.unwrap().blobs, 0);
    assert!(
        registry
            .storage()
            .blobs
            .list_uploads()
            .await
            .unwrap()
            .is_empty()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_headers_are_refused_not_hung() {
    let server = serve_local(Registry::in_memory(), HttpConfig::default())
        .await
        .unwrap();
    // One huge header value (1 MiB, well past the server's header buffer).
    let huge = format!(
        "GET /v2/ HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let response = raw_exchange(server.addr(), huge.into_bytes()).await;
    assert_eq!(status_of(&response), 431, "{response}");
    // Too many headers.
    let mut many = String::from("GET /v2/ HTTP/1.1\r\nhost: x\r\n");
    for i in 0..500 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let response = raw_exchange(server.addr(), many.into_bytes()).await;
    assert_eq!(status_of(&response), 431, "{response}");
    // The server is still fine afterwards.
    let ok = raw_exchange(
        server.addr(),
        b"GET /v2/ HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(status_of(&ok), 200, "{ok}");
    server.shutdown().await;
}

/// Regression (fuzzing): a Content-Range ending at u64::MAX made the chunk length
/// computation overflow, a panic in debug builds.
#[tokio::test]
async fn content_range_at_the_end_of_u64_is_refused() {
    let app = router(Registry::in_memory(), HttpConfig::default());
    let loc = start_upload(&app, "c/r")
        .await
        .header("location")
        .unwrap()
        .to_owned();
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", &format!("0-{}", u64::MAX))],
        &b"abc"[..],
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.code(), "BLOB_UPLOAD_INVALID");
    assert_eq!(get(&app, &loc).await.header("range"), Some("0-0"));
}

/// Regression (fuzzing): methods an endpoint does not serve and paths outside the API
/// were answered by axum with an empty body instead of an OCI error.
#[tokio::test]
async fn unrouted_requests_get_oci_errors() {
    let app = router(Registry::in_memory(), HttpConfig::default());
    for (method, path, status, code) in [
        (Method::POST, "/v2/", 405, "UNSUPPORTED"),
        (Method::DELETE, "/v2/_catalog", 405, "UNSUPPORTED"),
        (Method::GET, "/v3/", 404, "NAME_UNKNOWN"),
        (Method::GET, "/", 404, "NAME_UNKNOWN"),
    ] {
        let r = send(&app, method.clone(), path, &[], Body::empty()).await;
        assert_eq!(r.status.as_u16(), status, "{method} {path}");
        assert_eq!(r.code(), code, "{method} {path}: {:?}", r.body);
    }
}

/// Regression (fuzzing, `http_router`): with the page size limit set to `usize::MAX`
/// ("unlimited"), a listing without `n`, or with `n` of `usize::MAX` or more digits, made
/// the `n + 1` look-ahead overflow: a panic in debug builds, an empty page in release.
#[tokio::test]
async fn unlimited_page_size_with_the_largest_n_lists_everything() {
    let (b, _clock) = builder();
    let app = router(
        b.with_max_page_size(usize::MAX).build(),
        HttpConfig::default(),
    );
    push_blob(&app, "u/a", b"{}").await;
    push_blob(&app, "u/a", b"layer").await;
    let subject = image_manifest(b"{}", &[b"layer"]);
    assert_eq!(
        push_manifest(&app, "u/a", "t1", &subject).await.status,
        StatusCode::CREATED
    );
    let subject_digest = Digest::sha256(subject.as_bytes());
    let referrer = image_manifest_with(
        b"{}",
        &[b"layer"],
        Some((&subject_digest, subject.len() as u64)),
        Some("application/vnd.example.sig"),
    );
    assert_eq!(
        push_manifest(&app, "u/a", "t2", &referrer).await.status,
        StatusCode::CREATED
    );
    // Found by fuzzing: no `n` at all asks for a page of the limit, overflowing too.
    for query in [
        "",
        &format!("?n={}", usize::MAX),
        "?n=99999999999999999999999",
    ] {
        let r = get(&app, &format!("/v2/u/a/tags/list{query}")).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.json()["tags"], serde_json::json!(["t1", "t2"]));
        assert!(r.header("link").is_none());
        let r = get(&app, &format!("/v2/_catalog{query}")).await;
        assert_eq!(r.json()["repositories"], serde_json::json!(["u/a"]));
        let r = get(&app, &format!("/v2/u/a/referrers/{subject_digest}{query}")).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 1);
    }
}

/// Sends a POST opening an upload session from `source` (any 127.0.0.0/8 address) and
/// returns the status and the Retry-After header.
async fn open_session_from(server: std::net::SocketAddr, source: [u8; 4]) -> (u16, Option<String>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind((std::net::Ipv4Addr::from(source), 0).into())
        .unwrap();
    let mut stream = socket.connect(server).await.unwrap();
    stream
        .write_all(b"POST /v2/per/addr/blobs/uploads/ HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let retry_after = out.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after:")
            .map(|v| v.trim().to_owned())
    });
    (status_of(&out), retry_after)
}

/// Regression: one anonymous client could open every upload session of the registry
/// (10 repositories x 1,000 POSTs), and everyone's pushes then got 429 with a
/// `Retry-After: 1` that held for an hour. Sessions are now limited per client address
/// too, and the refusal says when the client's own oldest empty session can go.
#[tokio::test]
async fn anonymous_upload_sessions_are_limited_per_address_over_tcp() {
    let (b, _clock) = builder();
    let registry = b.with_max_open_uploads_per_owner(2).build();
    let server = serve_local(registry.clone(), HttpConfig::default())
        .await
        .unwrap();
    let greedy = [127, 0, 0, 1];
    assert_eq!(open_session_from(server.addr(), greedy).await.0, 202);
    assert_eq!(open_session_from(server.addr(), greedy).await.0, 202);
    let (status, retry_after) = open_session_from(server.addr(), greedy).await;
    assert_eq!(status, 429);
    // Its sessions are empty: they can be reclaimed after the 5-minute empty expiry.
    assert_eq!(retry_after.as_deref(), Some("300"));
    // Another client (another address) is not locked out.
    assert_eq!(
        open_session_from(server.addr(), [127, 0, 0, 2]).await.0,
        202
    );
    assert_eq!(
        registry.storage().blobs.list_uploads().await.unwrap().len(),
        3
    );
    server.shutdown().await;
}
