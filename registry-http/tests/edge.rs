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
