//! Policy refusals of the core (immutable tags, quotas, read-only mode) as OCI errors,
//! in process through `tower::ServiceExt::oneshot`.

use axum::Router;
use axum::http::{Method, StatusCode};
use registry_core::{Digest, MemoryStore, Registry, RegistryBuilder, RepoName, TagPattern};
use registry_http::{HttpConfig, router};

mod common;
use common::{OCI_MANIFEST, Reply};

fn builder() -> RegistryBuilder {
    Registry::builder(MemoryStore::new())
}

async fn send(app: &Router, method: Method, uri: &str, ct: Option<&str>, body: Vec<u8>) -> Reply {
    let len = body.len().to_string();
    let mut headers = Vec::new();
    headers.extend(ct.map(|ct| ("content-type", ct)));
    if !body.is_empty() {
        headers.push(("content-length", len.as_str()));
    }
    common::send(app, method, uri, &headers, body).await
}

async fn post_blob(app: &Router, repo: &str, data: &[u8]) -> Reply {
    let uri = format!("/v2/{repo}/blobs/uploads/?digest={}", Digest::sha256(data));
    send(app, Method::POST, &uri, None, data.to_vec()).await
}

fn manifest(config: &[u8], layer: &[u8]) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        Digest::sha256(config),
        config.len(),
        Digest::sha256(layer),
        layer.len()
    )
}

async fn put_manifest(app: &Router, repo: &str, reference: &str, body: &str) -> Reply {
    let uri = format!("/v2/{repo}/manifests/{reference}");
    send(
        app,
        Method::PUT,
        &uri,
        Some(OCI_MANIFEST),
        body.as_bytes().to_vec(),
    )
    .await
}

/// Moving or deleting an immutable tag is 403 DENIED with a message naming the tag;
/// pushing the same manifest again is 201; the tag still serves the first manifest.
#[tokio::test]
async fn immutable_tag_refusals_are_403_denied() {
    let app = router(
        builder()
            .with_immutable_tags(TagPattern::parse("v*").unwrap())
            .build(),
        HttpConfig::default(),
    );
    for blob in [&b"{}"[..], b"{\"b\":1}", b"layer"] {
        assert_eq!(
            post_blob(&app, "app", blob).await.status,
            StatusCode::CREATED
        );
    }
    let first = manifest(b"{}", b"layer");
    let second = manifest(b"{\"b\":1}", b"layer");
    let r = put_manifest(&app, "app", "v1", &first).await;
    assert_eq!(r.status, StatusCode::CREATED);

    let r = put_manifest(&app, "app", "v1", &second).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let (code, message) = r.error();
    assert_eq!(code, "DENIED");
    assert!(
        message.contains("tag v1 of app is immutable"),
        "message: {message}"
    );

    let r = put_manifest(&app, "app", "v1", &first).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "the same manifest again is fine"
    );

    let r = send(
        &app,
        Method::DELETE,
        "/v2/app/manifests/v1",
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error().0, "DENIED");
    let by_digest = format!("/v2/app/manifests/{}", Digest::sha256(first.as_bytes()));
    let r = send(&app, Method::DELETE, &by_digest, None, Vec::new()).await;
    assert_eq!(
        (r.status, r.error().0.as_str()),
        (StatusCode::FORBIDDEN, "DENIED")
    );

    let r = send(&app, Method::GET, "/v2/app/manifests/v1", None, Vec::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(Digest::sha256(first.as_bytes()).to_string().as_str())
    );
}

/// A push past a quota is 403 DENIED naming the quota, by every upload path; exactly
/// at the quota is 201; nothing refused becomes readable.
#[tokio::test]
async fn quota_refusals_are_403_denied() {
    let app = router(
        builder()
            .with_quota(RepoName::parse("team").unwrap(), 10)
            .with_quota(RepoName::parse("tiny").unwrap(), 7)
            .build(),
        HttpConfig::default(),
    );
    let r = post_blob(&app, "team/app", b"eleven byte").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let (code, message) = r.error();
    assert_eq!(code, "DENIED");
    assert!(
        message.contains("storage quota of team exceeded") && message.contains("10 bytes"),
        "message: {message}"
    );
    let head = format!("/v2/team/app/blobs/{}", Digest::sha256(b"eleven byte"));
    assert_eq!(
        send(&app, Method::HEAD, &head, None, Vec::new())
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    assert_eq!(
        post_blob(&app, "team/app", b"ten bytes!").await.status,
        StatusCode::CREATED,
        "exactly at the quota"
    );

    // Chunked: the refusal comes with the closing PUT.
    let r = send(
        &app,
        Method::POST,
        "/v2/team/web/blobs/uploads/",
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let location = r.headers["location"].to_str().unwrap().to_owned();
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = format!("{location}{sep}digest={}", Digest::sha256(b"x"));
    let r = send(&app, Method::PUT, &put, None, b"x".to_vec()).await;
    assert_eq!(
        (r.status, r.error().0.as_str()),
        (StatusCode::FORBIDDEN, "DENIED")
    );

    // A manifest counts too: config and layer fit exactly, the manifest does not.
    for blob in [&b"{}"[..], b"layer"] {
        assert_eq!(
            post_blob(&app, "tiny", blob).await.status,
            StatusCode::CREATED
        );
    }
    let r = put_manifest(&app, "tiny", "v1", &manifest(b"{}", b"layer")).await;
    assert_eq!(
        (r.status, r.error().0.as_str()),
        (StatusCode::FORBIDDEN, "DENIED")
    );
    let r = send(&app, Method::GET, "/v2/tiny/manifests/v1", None, Vec::new()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Outside the prefix: no quota.
    assert_eq!(
        post_blob(&app, "other", b"eleven byte").await.status,
        StatusCode::CREATED
    );
}

/// A read-only core answers writes exactly as `HttpConfig::with_read_only` does:
/// 405 UNSUPPORTED. Reads still work.
#[tokio::test]
async fn core_read_only_matches_http_read_only() {
    let core_ro = router(builder().read_only(true).build(), HttpConfig::default());
    let http_ro = router(
        builder().build(),
        HttpConfig::default().with_read_only(true),
    );
    for app in [&core_ro, &http_ro] {
        let r = post_blob(app, "app", b"data").await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        let (code, message) = r.error();
        assert_eq!(code, "UNSUPPORTED");
        assert!(message.contains("read-only"), "message: {message}");
        let r = put_manifest(app, "app", "v1", &manifest(b"{}", b"layer")).await;
        assert_eq!(
            (r.status, r.error().0.as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
        );
        let r = send(app, Method::GET, "/v2/", None, Vec::new()).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    // The core's answer names what was refused.
    let r = send(
        &core_ro,
        Method::DELETE,
        "/v2/app/manifests/v1",
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        r.error().1.contains("manifest delete refused"),
        "{:?}",
        r.error()
    );
}
