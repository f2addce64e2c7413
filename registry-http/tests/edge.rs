//! The HTTP edge (issue 17), in process through `tower::ServiceExt::oneshot`: headers
//! every response carries, what a client-supplied `Host` may reach, `Link` header
//! encoding, invalid manifest references, `Host` requirements and range edge cases.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, Version};
use registry_core::access::AuthenticatedOnly;
use registry_core::{Digest, Registry};
use registry_http::{
    Auth, HttpConfig, TokenClaims, TokenError, TokenIssuer, TokenVerifier, router,
};
use tower::ServiceExt;

mod common;
use common::{OCI_MANIFEST, Reply, get, send, send_raw};

fn app() -> Router {
    router(Registry::in_memory(), HttpConfig::default())
}

fn sha(data: &[u8]) -> String {
    Digest::sha256(data).to_string()
}

async fn push_blob(app: &Router, repo: &str, data: &[u8]) -> String {
    let d = sha(data);
    let r = send(
        app,
        Method::POST,
        &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
        &[("content-length", &data.len().to_string())],
        data.to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    d
}

/// Pushes an image manifest (config `{}`, no layers) with `extra` JSON members; returns
/// its digest and size.
async fn push_manifest(app: &Router, repo: &str, reference: &str, extra: &str) -> (String, usize) {
    let config = push_blob(app, repo, b"{}").await;
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[]{extra}}}"#
    );
    let r = send(
        app,
        Method::PUT,
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("content-type", OCI_MANIFEST)],
        m.clone(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    (sha(m.as_bytes()), m.len())
}

fn assert_nosniff(r: &Reply, what: &str) {
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{what}: {}",
        r.status
    );
}

// 1. X-Content-Type-Options.

#[tokio::test]
async fn every_response_says_nosniff() {
    let app = app();
    let d = push_blob(&app, "r", b"<html><script>alert(1)</script>").await;
    assert_nosniff(&get(&app, "/v2/").await, "base");
    assert_nosniff(&get(&app, &format!("/v2/r/blobs/{d}")).await, "blob");
    assert_nosniff(&get(&app, "/v2/_catalog").await, "catalog");
    assert_nosniff(
        &get(&app, &format!("/v2/r/blobs/{}", sha(b"x"))).await,
        "404",
    );
    assert_nosniff(&get(&app, "/elsewhere").await, "fallback");
    assert_nosniff(
        &send(&app, Method::DELETE, "/v2/", &[], Body::empty()).await,
        "method fallback",
    );
    assert_nosniff(
        &get(&app, "/v2/BAD/tags/list").await,
        "invalid repository name",
    );
    let r = send_raw(&app, Method::GET, "/v2/", &[], Body::empty()).await;
    assert_nosniff(&r, "missing Host");
}

// 2. The WWW-Authenticate realm.

fn auth_app(base_url: Option<&str>) -> Router {
    let auth = Auth::new(AuthenticatedOnly)
        .with_user("u", "p")
        .with_token_issuer(TokenIssuer::new("registry"));
    router(
        Registry::in_memory(),
        HttpConfig::default()
            .with_base_url(base_url.map(str::to_owned))
            .with_auth(auth),
    )
}

#[tokio::test]
async fn a_hostile_host_cannot_inject_into_the_realm() {
    let app = auth_app(None);
    for host in [
        r#"evil",error="x"#,
        "evil.example/path",
        "a b",
        "a,b",
        "user@evil.example",
        "evil.example:80x",
        "",
    ] {
        let r = send(&app, Method::GET, "/v2/", &[("host", host)], Body::empty()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "Host {host:?}");
        assert_eq!(r.code(), "UNSUPPORTED", "Host {host:?}");
        assert!(r.header("www-authenticate").is_none(), "Host {host:?}");
    }
    // Valid authorities are used as they are.
    for host in [
        "registry.test",
        "registry.test:5000",
        "[::1]:5000",
        "10.0.0.1",
        "my_reg",
    ] {
        let r = send(&app, Method::GET, "/v2/", &[("host", host)], Body::empty()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "Host {host:?}");
        assert_eq!(
            r.header("www-authenticate"),
            Some(format!(r#"Bearer realm="http://{host}/token",service="registry""#).as_str())
        );
    }
}

#[tokio::test]
async fn the_realm_comes_from_the_base_url_when_configured() {
    let app = auth_app(Some("https://registry.example.com/"));
    let r = send(
        &app,
        Method::GET,
        "/v2/r/tags/list",
        &[("host", "attacker.example")],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("www-authenticate"),
        Some(
            r#"Bearer realm="https://registry.example.com/token",service="registry",scope="repository:r:pull""#
        )
    );
}

struct NoTokens;

impl TokenVerifier for NoTokens {
    fn verify(&self, _: &str) -> Result<TokenClaims, TokenError> {
        Err(TokenError::Invalid)
    }
}

#[tokio::test]
async fn challenge_values_are_quote_escaped() {
    let auth = Auth::new(AuthenticatedOnly).with_token_verifier(
        NoTokens,
        r#"https://auth.example/token?a="b""#,
        r#"svc\"x"#,
    );
    let app = router(Registry::in_memory(), HttpConfig::default().with_auth(auth));
    let r = get(&app, "/v2/").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer realm="https://auth.example/token?a=\"b\"",service="svc\\\"x""#)
    );
}

// 3. Link headers.

/// The URL of a `Link: <URL>; rel="next"` header, checked to be exactly that shape.
fn link_url(r: &Reply) -> String {
    let link = r.header("link").expect("a Link header");
    let url = link
        .strip_prefix('<')
        .and_then(|l| l.strip_suffix(r#">; rel="next""#))
        .unwrap_or_else(|| panic!("malformed Link {link:?}"));
    assert!(
        !url.contains(['<', '>', '"', '#', ' ', '\r', '\n', ',', ';']),
        "unescaped characters in {url:?}"
    );
    url.to_owned()
}

#[tokio::test]
async fn referrers_links_encode_the_artifact_type() {
    let app = app();
    let (subject, size) = push_manifest(&app, "r", "v1", "").await;
    for (weird, encoded) in [
        (
            r#"application/vnd.x&n=9#y>; rel=\"prev\""#,
            "application%2Fvnd.x%26n%3D9%23y%3E%3B%20rel%3D%22prev%22",
        ),
        (
            r"a/b+json\r\nx-injected: 1",
            "a%2Fb%2Bjson%0D%0Ax-injected%3A%201",
        ),
    ] {
        for i in 0..3 {
            push_manifest(
                &app,
                "r",
                &sha(format!("{weird}{i}").as_bytes())[7..20],
                &format!(
                    r#","artifactType":"{weird}","annotations":{{"i":"{i}"}},"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":{size}}}"#
                ),
            )
            .await;
        }
        let plain: String = serde_json::from_str(&format!("\"{weird}\"")).unwrap();
        let mut url = format!("/v2/r/referrers/{subject}?n=1&artifactType={encoded}");
        let mut seen = 0;
        loop {
            let r = get(&app, &url).await;
            assert_eq!(r.status, StatusCode::OK, "{url}");
            let page = r.json()["manifests"].as_array().unwrap().clone();
            assert!(page.len() <= 1);
            for m in &page {
                assert_eq!(m["artifactType"].as_str(), Some(plain.as_str()));
            }
            seen += page.len();
            if r.header("link").is_none() {
                break;
            }
            url = link_url(&r);
            assert!(url.contains("artifactType="), "{url}");
        }
        assert_eq!(seen, 3, "{weird}");
    }
}

#[tokio::test]
async fn links_carry_the_base_url() {
    let app = router(
        Registry::in_memory(),
        HttpConfig::default().with_base_url(Some("https://registry.example.com".into())),
    );
    push_manifest(&app, "r", "a", "").await;
    push_manifest(&app, "r", "b", "").await;
    push_blob(&app, "s", b"x").await;
    let r = get(&app, "/v2/r/tags/list?n=1").await;
    assert_eq!(
        link_url(&r),
        "https://registry.example.com/v2/r/tags/list?n=1&last=a"
    );
    let r = get(&app, "/v2/_catalog?n=1").await;
    assert_eq!(
        link_url(&r),
        "https://registry.example.com/v2/_catalog?n=1&last=r"
    );
}

// 4. Invalid manifest references.

#[tokio::test]
async fn reading_an_invalid_reference_is_manifest_unknown() {
    let app = app();
    push_manifest(&app, "r", "v1", "").await;
    let long = "t".repeat(200);
    for reference in [
        "-bad",
        ".bad",
        "sha256:xyz",
        "sha256:",
        "bad:ref",
        long.as_str(),
    ] {
        for method in [Method::GET, Method::HEAD] {
            let r = send(
                &app,
                method.clone(),
                &format!("/v2/r/manifests/{reference}"),
                &[],
                Body::empty(),
            )
            .await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {reference}");
            if method == Method::GET {
                assert_eq!(r.code(), "MANIFEST_UNKNOWN", "{reference}");
            }
        }
    }
    // Pushing with an invalid tag stays a 400.
    let r = send(
        &app,
        Method::PUT,
        "/v2/r/manifests/-bad",
        &[("content-type", OCI_MANIFEST)],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

// 5. The Host header.

#[tokio::test]
async fn http11_requests_need_exactly_one_host() {
    let app = app();
    let r = send_raw(&app, Method::GET, "/v2/", &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "UNSUPPORTED");
    let r = send_raw(
        &app,
        Method::GET,
        "/v2/",
        &[("host", "a.example"), ("host", "b.example")],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let ok = send_raw(
        &app,
        Method::GET,
        "/v2/",
        &[("host", "a.example")],
        Body::empty(),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    // HTTP/1.0 has no Host requirement.
    let req = Request::get("/v2/")
        .version(Version::HTTP_10)
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

// 6. Ranges.

#[tokio::test]
async fn range_edges_clamp_or_name_the_size() {
    let app = app();
    let data: Vec<u8> = (0..100u8).collect();
    let d = push_blob(&app, "r", &data).await;
    for method in [Method::GET, Method::HEAD] {
        for range in [
            "bytes=0-99999999999999999999",
            "bytes=90-18446744073709551615",
        ] {
            let r = send(
                &app,
                method.clone(),
                &format!("/v2/r/blobs/{d}"),
                &[("range", range)],
                Body::empty(),
            )
            .await;
            assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{method} {range}");
            let start = if range.starts_with("bytes=0") { 0 } else { 90 };
            assert_eq!(
                r.header("content-range"),
                Some(format!("bytes {start}-99/100").as_str()),
                "{method} {range}"
            );
            if method == Method::GET {
                assert_eq!(&r.body[..], &data[start..]);
            }
        }
        for range in [
            "bytes=abc",
            "bytes=-",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=99999999999999999999-",
            "bytes=100-",
            "bytes=5-1",
            "bytes=-0",
        ] {
            let r = send(
                &app,
                method.clone(),
                &format!("/v2/r/blobs/{d}"),
                &[("range", range)],
                Body::empty(),
            )
            .await;
            assert_eq!(
                r.status,
                StatusCode::RANGE_NOT_SATISFIABLE,
                "{method} {range}"
            );
            assert_eq!(
                r.header("content-range"),
                Some("bytes */100"),
                "{method} {range}"
            );
        }
    }
    // A malformed range on a blob that is not there is a 404.
    let r = send(
        &app,
        Method::GET,
        &format!("/v2/r/blobs/{}", sha(b"missing")),
        &[("range", "bytes=x")],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// The official conformance suite's optional "sparse" data set, step by step (the suite
/// itself is Go, which this machine cannot fetch modules for): an image pushed without
/// one of its layers and an index with a child that was never pushed. Refused with
/// MANIFEST_BLOB_UNKNOWN by default; with the opt-in, pushed, listed, read by tag and
/// digest, and deleted, while what is missing answers 404.
#[tokio::test]
async fn the_sparse_data_set_passes_with_the_opt_in() {
    let sparse_app = |allow: bool| {
        let mut b = Registry::builder(registry_core::MemoryStore::new());
        if allow {
            b = b.with_sparse_manifests(Some(
                registry_core::RepoName::parse("conformance").unwrap(),
            ));
        }
        router(b.build(), HttpConfig::default())
    };
    let put = |app: Router, reference: String, media_type: &'static str, body: String| async move {
        send(
            &app,
            Method::PUT,
            &format!("/v2/conformance/repo1/manifests/{reference}"),
            &[("content-type", media_type)],
            body,
        )
        .await
    };
    let image = |config: &str, layers: &[(String, usize)]| {
        let layers: Vec<String> = layers
            .iter()
            .map(|(d, n)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{n}}}"#))
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{}]}}"#,
            layers.join(",")
        )
    };
    for allow in [false, true] {
        let app = sparse_app(allow);
        let config = push_blob(&app, "conformance/repo1", b"{}").await;
        let pushed = push_blob(&app, "conformance/repo1", b"layer one").await;
        let missing = sha(b"layer two, never pushed");
        let sparse_image = image(&config, &[(pushed.clone(), 9), (missing.clone(), 23)]);
        let r = put(
            app.clone(),
            "sparse-image".into(),
            OCI_MANIFEST,
            sparse_image.clone(),
        )
        .await;
        if !allow {
            assert_eq!(r.status, StatusCode::BAD_REQUEST);
            assert_eq!(r.code(), "MANIFEST_BLOB_UNKNOWN");
            continue;
        }
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        // The index: one full image and a child digest with nothing behind it.
        let full = image(&config, &[(pushed.clone(), 9)]);
        let full_digest = sha(full.as_bytes());
        assert_eq!(
            put(app.clone(), full_digest.clone(), OCI_MANIFEST, full.clone())
                .await
                .status,
            StatusCode::CREATED
        );
        let absent = sha(b"1024 random bytes");
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{full_digest}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{absent}","size":1024,"platform":{{"architecture":"arm64","os":"linux"}}}}]}}"#,
            full.len()
        );
        let index_type = "application/vnd.oci.image.index.v1+json";
        let r = put(
            app.clone(),
            "sparse-index".into(),
            index_type,
            index.clone(),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let tags = get(&app, "/v2/conformance/repo1/tags/list").await.json();
        assert_eq!(
            tags["tags"],
            serde_json::json!(["sparse-image", "sparse-index"])
        );
        for (reference, body, media_type) in [
            ("sparse-image".to_owned(), &sparse_image, OCI_MANIFEST),
            (sha(sparse_image.as_bytes()), &sparse_image, OCI_MANIFEST),
            ("sparse-index".to_owned(), &index, index_type),
            (sha(index.as_bytes()), &index, index_type),
        ] {
            for method in [Method::HEAD, Method::GET] {
                let r = send(
                    &app,
                    method.clone(),
                    &format!("/v2/conformance/repo1/manifests/{reference}"),
                    &[],
                    Body::empty(),
                )
                .await;
                assert_eq!(r.status, StatusCode::OK, "{method} {reference}");
                assert_eq!(r.header("content-type"), Some(media_type));
                assert_eq!(
                    r.header("docker-content-digest"),
                    Some(sha(body.as_bytes()).as_str())
                );
                if method == Method::GET {
                    assert_eq!(&r.body[..], body.as_bytes());
                }
            }
        }
        let r = get(&app, &format!("/v2/conformance/repo1/blobs/{missing}")).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
        );
        let r = get(&app, &format!("/v2/conformance/repo1/manifests/{absent}")).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
        );
        let referrers = get(
            &app,
            &format!("/v2/conformance/repo1/referrers/{}", sha(index.as_bytes())),
        )
        .await;
        assert_eq!(referrers.status, StatusCode::OK);
        // Deletes, index first, as the suite does.
        for reference in [
            "sparse-index".to_owned(),
            sha(index.as_bytes()),
            full_digest.clone(),
            "sparse-image".to_owned(),
            sha(sparse_image.as_bytes()),
        ] {
            let r = send(
                &app,
                Method::DELETE,
                &format!("/v2/conformance/repo1/manifests/{reference}"),
                &[],
                Body::empty(),
            )
            .await;
            assert_eq!(
                r.status,
                StatusCode::ACCEPTED,
                "DELETE {reference}: {:?}",
                r.body
            );
        }
        let r = get(
            &app,
            &format!("/v2/conformance/repo1/manifests/{}", sha(index.as_bytes())),
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
}
