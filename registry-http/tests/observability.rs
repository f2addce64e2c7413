//! Observability: the audit log holds exactly one line per acknowledged change (written
//! before the acknowledgement) and one per refused credential; metrics series do not
//! grow with repositories; request ids, health endpoints, the access log, the metrics
//! endpoints and the collector's metrics and audit lines.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use base64::Engine as _;
use bytes::Bytes;
use common::{OCI_MANIFEST, Reply};
use http_body_util::BodyExt;
use registry_core::access::{Action, Grantee, PrefixRules};
use registry_core::{Digest, GcOptions, ManualClock, MemoryStore, Registry, TagPattern, Timestamp};
use registry_http::{
    AccessLog, AuditLog, Auth, HttpConfig, Metrics, MetricsOptions, TokenIssuer,
    instrument_storage, metrics_router,
};
use tower::ServiceExt;

const PEER: &str = "192.0.2.7:40123";

/// One request through `app` as if from [`PEER`] (the built-in server puts the
/// client's address in the request's extensions, as done here).
async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    headers: &[(&str, String)],
    body: impl Into<Body>,
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let mut req = req.body(body.into()).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(PEER.parse::<SocketAddr>().unwrap()));
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

fn basic(user: &str, password: &str) -> (&'static str, String) {
    let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    ("authorization", format!("Basic {v}"))
}

fn image(config: &[u8], layers: &[&[u8]]) -> String {
    let desc = |media: &str, b: &[u8]| {
        format!(
            r#"{{"mediaType":"{media}","digest":"{}","size":{}}}"#,
            Digest::sha256(b),
            b.len()
        )
    };
    let layers: Vec<String> = layers
        .iter()
        .map(|l| desc("application/vnd.oci.image.layer.v1.tar", l))
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{}]}}"#,
        desc("application/vnd.oci.image.config.v1+json", config),
        layers.join(",")
    )
}

/// The lines of the audit file, parsed.
fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is a JSON object"))
        .collect()
}

#[tokio::test]
async fn audit_log_has_exactly_one_line_per_acknowledged_change_and_refused_credential() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let policy = PrefixRules::new()
        .grant(Grantee::user("ci"), "", Action::ALL)
        .grant(Grantee::user("reader"), "", Action::READ);
    let auth = Auth::new(policy)
        .with_user("ci", "ci-password")
        .with_user("reader", "reader-password")
        .with_token_issuer(TokenIssuer::new("test"));
    let registry = Registry::builder(MemoryStore::new())
        .with_immutable_tags(TagPattern::parse("release-*").unwrap())
        .build();
    let config = HttpConfig::default()
        .with_auth(auth)
        .with_audit(AuditLog::open(&path).unwrap());
    let app = registry_http::router(registry, config);
    let ci = [basic("ci", "ci-password")];

    // Every request below is followed by a check of the file: an acknowledged change
    // has its line by the time the client has the response, a refusal adds none.
    let mut expected: Vec<(&str, String)> = Vec::new();
    let mut acknowledged =
        |r: &Reply, status: StatusCode, event: Option<(&'static str, String)>| {
            assert_eq!(r.status, status, "{:?}", r.error());
            if let Some(e) = event {
                expected.push(e);
            }
            let lines = audit_lines(&path);
            assert_eq!(
                lines.len(),
                expected.len(),
                "after a {} the file holds {lines:?}",
                r.status
            );
            let last = lines.last().cloned();
            (expected.len(), last)
        };

    let (config_a, layer_1, layer_2) = (&b"{}"[..], &b"layer one"[..], &b"layer two"[..]);
    // A monolithic blob push.
    let d = Digest::sha256(config_a);
    let r = call(
        &app,
        Method::POST,
        &format!("/v2/app/blobs/uploads/?digest={d}"),
        &ci,
        config_a,
    )
    .await;
    acknowledged(
        &r,
        StatusCode::CREATED,
        Some(("blob_upload", d.to_string())),
    );
    // A session push: POST (no line), PUT (the line).
    for layer in [layer_1, layer_2] {
        let r = call(
            &app,
            Method::POST,
            "/v2/app/blobs/uploads/",
            &ci,
            Body::empty(),
        )
        .await;
        acknowledged(&r, StatusCode::ACCEPTED, None);
        let location = r.header("location").unwrap().to_owned();
        let d = Digest::sha256(layer);
        let with_length = [ci[0].clone(), ("content-length", layer.len().to_string())];
        let r = call(
            &app,
            Method::PUT,
            &format!("{location}?digest={d}"),
            &with_length,
            layer,
        )
        .await;
        acknowledged(
            &r,
            StatusCode::CREATED,
            Some(("blob_upload", d.to_string())),
        );
    }
    let ct = [ci[0].clone(), ("content-type", OCI_MANIFEST.to_owned())];
    let m1 = image(config_a, &[layer_1]);
    let m2 = image(config_a, &[layer_2]);
    let (d1, d2) = (Digest::sha256(m1.as_bytes()), Digest::sha256(m2.as_bytes()));
    // Push by tag, then move the tag to another manifest, then point a second tag at
    // the first, then a multi-tag push by digest.
    let r = call(&app, Method::PUT, "/v2/app/manifests/v1", &ct, m1.clone()).await;
    let (_, line) = acknowledged(
        &r,
        StatusCode::CREATED,
        Some(("manifest_push", d1.to_string())),
    );
    let line = line.unwrap();
    assert_eq!(line["tags"], serde_json::json!(["v1"]));
    assert_eq!(line["identity"], "ci");
    assert_eq!(line["source"], PEER);
    assert_eq!(line["repository"], "app");
    assert_eq!(line["request_id"], r.header("x-request-id").unwrap());
    let r = call(&app, Method::PUT, "/v2/app/manifests/v1", &ct, m2.clone()).await;
    acknowledged(
        &r,
        StatusCode::CREATED,
        Some(("manifest_push", d2.to_string())),
    );
    let r = call(
        &app,
        Method::PUT,
        "/v2/app/manifests/latest",
        &ct,
        m1.clone(),
    )
    .await;
    acknowledged(
        &r,
        StatusCode::CREATED,
        Some(("manifest_push", d1.to_string())),
    );
    let r = call(
        &app,
        Method::PUT,
        &format!("/v2/app/manifests/{d1}?tag=a&tag=b"),
        &ct,
        m1.clone(),
    )
    .await;
    let (_, line) = acknowledged(
        &r,
        StatusCode::CREATED,
        Some(("manifest_push", d1.to_string())),
    );
    assert_eq!(line.unwrap()["tags"], serde_json::json!(["a", "b"]));
    let r = call(
        &app,
        Method::PUT,
        "/v2/app/manifests/release-1",
        &ct,
        m1.clone(),
    )
    .await;
    acknowledged(
        &r,
        StatusCode::CREATED,
        Some(("manifest_push", d1.to_string())),
    );
    // Refused changes leave no line: an immutable tag, a manifest with a missing blob.
    let r = call(
        &app,
        Method::PUT,
        "/v2/app/manifests/release-1",
        &ct,
        m2.clone(),
    )
    .await;
    acknowledged(&r, StatusCode::FORBIDDEN, None);
    let r = call(
        &app,
        Method::PUT,
        "/v2/app/manifests/broken",
        &ct,
        image(config_a, &[b"nowhere"]),
    )
    .await;
    acknowledged(&r, StatusCode::BAD_REQUEST, None);
    // A mount, and one that falls back to an upload session (no change, no line).
    let dl1 = Digest::sha256(layer_1);
    let r = call(
        &app,
        Method::POST,
        &format!("/v2/copy/blobs/uploads/?mount={dl1}&from=app"),
        &ci,
        Body::empty(),
    )
    .await;
    let (_, line) = acknowledged(
        &r,
        StatusCode::CREATED,
        Some(("blob_mount", dl1.to_string())),
    );
    assert_eq!(line.unwrap()["from"], "app");
    let unknown = Digest::sha256(b"unknown");
    let r = call(
        &app,
        Method::POST,
        &format!("/v2/copy/blobs/uploads/?mount={unknown}&from=app"),
        &ci,
        Body::empty(),
    )
    .await;
    acknowledged(&r, StatusCode::ACCEPTED, None);
    // Deletes: a tag, a manifest, a blob.
    let r = call(
        &app,
        Method::DELETE,
        "/v2/app/manifests/latest",
        &ci,
        Body::empty(),
    )
    .await;
    let (_, line) = acknowledged(
        &r,
        StatusCode::ACCEPTED,
        Some(("tag_delete", "latest".to_owned())),
    );
    assert_eq!(line.unwrap()["tag"], "latest");
    let r = call(
        &app,
        Method::DELETE,
        &format!("/v2/app/manifests/{d2}"),
        &ci,
        Body::empty(),
    )
    .await;
    acknowledged(
        &r,
        StatusCode::ACCEPTED,
        Some(("manifest_delete", d2.to_string())),
    );
    let r = call(
        &app,
        Method::DELETE,
        &format!("/v2/copy/blobs/{dl1}"),
        &ci,
        Body::empty(),
    )
    .await;
    acknowledged(
        &r,
        StatusCode::ACCEPTED,
        Some(("blob_delete", dl1.to_string())),
    );
    // Reads change nothing.
    let r = call(
        &app,
        Method::GET,
        "/v2/app/manifests/v1",
        &ci,
        Body::empty(),
    )
    .await;
    acknowledged(&r, StatusCode::NOT_FOUND, None); // v1 went with manifest 2
    let r = call(&app, Method::GET, "/v2/app/manifests/a", &ci, Body::empty()).await;
    acknowledged(&r, StatusCode::OK, None);

    // Every rejected credential has its line; an anonymous challenge has none.
    let r = call(&app, Method::GET, "/v2/app/tags/list", &[], Body::empty()).await;
    acknowledged(&r, StatusCode::UNAUTHORIZED, None);
    for wrong in ["wrong", "", "ci-password "] {
        let r = call(
            &app,
            Method::GET,
            "/v2/app/tags/list",
            &[basic("ci", wrong)],
            Body::empty(),
        )
        .await;
        let (_, line) = acknowledged(
            &r,
            StatusCode::UNAUTHORIZED,
            Some(("auth_failure", "ci".to_owned())),
        );
        let line = line.unwrap();
        assert_eq!(line["claimed_user"], "ci");
        assert!(line["identity"].is_null());
        assert_eq!(line["repository"], "app");
        // Never the password.
        assert!(!line.to_string().contains("wrong") && !line.to_string().contains("ci-password"));
    }
    let bad_token = [("authorization", "Bearer not-a-token".to_owned())];
    let r = call(
        &app,
        Method::GET,
        "/v2/app/tags/list",
        &bad_token,
        Body::empty(),
    )
    .await;
    let (_, line) = acknowledged(
        &r,
        StatusCode::UNAUTHORIZED,
        Some(("auth_failure", String::new())),
    );
    assert_eq!(line.unwrap()["reason"], "invalid token");
    let form = [(
        "content-type",
        "application/x-www-form-urlencoded".to_owned(),
    )];
    let r = call(
        &app,
        Method::POST,
        "/token",
        &form,
        "grant_type=password&username=nobody&password=x&service=test",
    )
    .await;
    let (_, line) = acknowledged(
        &r,
        StatusCode::UNAUTHORIZED,
        Some(("auth_failure", "nobody".to_owned())),
    );
    assert_eq!(line.unwrap()["claimed_user"], "nobody");
    // A known user the policy refuses: one access_denied line.
    let reader = [
        basic("reader", "reader-password"),
        ("content-type", OCI_MANIFEST.to_owned()),
    ];
    let r = call(
        &app,
        Method::PUT,
        "/v2/app/manifests/v9",
        &reader,
        m1.clone(),
    )
    .await;
    let (_, line) = acknowledged(
        &r,
        StatusCode::FORBIDDEN,
        Some(("access_denied", String::new())),
    );
    let line = line.unwrap();
    assert_eq!(
        (line["identity"].as_str(), line["action"].as_str()),
        (Some("reader"), Some("push"))
    );

    // The whole file, in order: exactly the expected lines.
    let lines = audit_lines(&path);
    let got: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            let event = l["event"].as_str().unwrap().to_owned();
            let what = match event.as_str() {
                "tag_delete" => l["tag"].as_str(),
                "auth_failure" => l["claimed_user"].as_str(),
                "access_denied" => None,
                _ => l["digest"].as_str(),
            };
            (event, what.unwrap_or("").to_owned())
        })
        .collect();
    let want: Vec<(String, String)> = expected
        .iter()
        .map(|(e, w)| (e.to_string(), w.clone()))
        .collect();
    assert_eq!(got, want);
    let changes = lines
        .iter()
        .filter(|l| !l["event"].as_str().unwrap().starts_with("a"))
        .count();
    assert_eq!(
        changes, 12,
        "3 uploads, 5 pushes, 1 mount, 3 deletes: {lines:?}"
    );
    for l in &lines {
        assert_eq!(l["source"], PEER);
        assert!(l["request_id"].as_str().is_some_and(|id| !id.is_empty()));
        assert!(l["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}

/// A writer that always fails, like a full disk.
struct Broken;
impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("disk full"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_change_whose_audit_line_cannot_be_written_is_not_acknowledged() {
    let app = registry_http::router(
        Registry::in_memory(),
        HttpConfig::default().with_audit(AuditLog::writer(Broken)),
    );
    let d = Digest::sha256(b"x");
    let r = call(
        &app,
        Method::POST,
        &format!("/v2/r/blobs/uploads/?digest={d}"),
        &[],
        "x",
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.code(), "UNKNOWN");
}

/// Non-comment lines of an exposition: one per series.
fn series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect()
}

async fn push_repo(app: &Router, repo: &str, layer: &[u8]) {
    let config = b"{}";
    for blob in [&config[..], layer] {
        let d = Digest::sha256(blob);
        let r = call(
            app,
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            &[],
            blob.to_vec(),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let ct = [("content-type", OCI_MANIFEST.to_owned())];
    let r = call(
        app,
        Method::PUT,
        &format!("/v2/{repo}/manifests/v1"),
        &ct,
        image(config, &[layer]),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = call(
        app,
        Method::GET,
        &format!("/v2/{repo}/manifests/v1"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(
        app,
        Method::GET,
        &format!("/v2/{repo}/blobs/{}", Digest::sha256(layer)),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(
        app,
        Method::GET,
        &format!("/v2/{repo}/manifests/nothing"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn series_do_not_grow_with_repositories() {
    let metrics = Metrics::with_options(MetricsOptions {
        // Read the store at every scrape.
        storage_refresh: Duration::ZERO,
        ..MetricsOptions::default()
    });
    let storage = instrument_storage(MemoryStore::new().into_storage(), Some(&metrics), None);
    let registry = Registry::builder(storage).build();
    let app = registry_http::router(registry, HttpConfig::default().with_metrics(metrics));
    for i in 0..10 {
        push_repo(
            &app,
            &format!("warmup/r{i}"),
            format!("layer {i}").as_bytes(),
        )
        .await;
    }
    // The first scrape counts itself once answered: its series are there from the
    // second on.
    call(&app, Method::GET, "/metrics", &[], Body::empty()).await;
    let before = call(&app, Method::GET, "/metrics", &[], Body::empty()).await;
    assert_eq!(before.status, StatusCode::OK);
    let before = String::from_utf8(before.body.to_vec()).unwrap();
    for i in 0..1000 {
        push_repo(
            &app,
            &format!("many/repo-{i}"),
            format!("many {i}").as_bytes(),
        )
        .await;
    }
    let after = call(&app, Method::GET, "/metrics", &[], Body::empty()).await;
    let after = String::from_utf8(after.body.to_vec()).unwrap();
    let (b, a) = (series(&before), series(&after));
    assert_eq!(
        a.len(),
        b.len(),
        "series appeared: {:?}",
        a.iter()
            .filter(|l| {
                let name = l.split(' ').next().unwrap();
                !b.iter().any(|x| x.split(' ').next().unwrap() == name)
            })
            .collect::<Vec<_>>()
    );
    assert!(!after.contains("repo-"), "a repository name in a label");
    assert!(
        after.contains("registry_storage_repositories 1010"),
        "{after}"
    );
    assert!(after.contains("registry_pushes_total{kind=\"manifest\"} 1010"));
    assert!(after.contains("registry_pulls_total{kind=\"blob\"} 1010"));
    assert!(after.contains("registry_upload_sessions_open 0"));
    assert!(after.contains("registry_storage_operation_duration_seconds_count{store=\"metadata\",operation=\"put_manifest\"} 1010"));
    // Series of one route template, whatever the repository.
    assert!(after.contains(
        "registry_http_requests_total{route=\"/v2/{name}/manifests/{reference}\",method=\"GET\",status=\"4xx\"} 1010"
    ));
}

#[tokio::test]
async fn request_ids_are_echoed_when_sane_and_made_otherwise() {
    let app = registry_http::router(Registry::in_memory(), HttpConfig::default());
    let r = call(
        &app,
        Method::GET,
        "/v2/",
        &[("x-request-id", "trace-42".to_owned())],
        Body::empty(),
    )
    .await;
    assert_eq!(r.header("x-request-id"), Some("trace-42"));
    let r = call(
        &app,
        Method::GET,
        "/v2/",
        &[("x-request-id", "bad id\"<x>".to_owned())],
        Body::empty(),
    )
    .await;
    let made = r.header("x-request-id").unwrap().to_owned();
    assert!(!made.is_empty() && made != "bad id\"<x>");
    let again = call(&app, Method::GET, "/nowhere", &[], Body::empty()).await;
    assert_ne!(again.header("x-request-id").unwrap(), made);
}

/// `/readyz` answers 503 while the storage fails its metadata reads (and `/healthz`,
/// about the process only, stays 200), then 200 again once the storage recovers.
#[tokio::test]
async fn readyz_follows_the_storage() {
    use registry_core::fault::{Faults, Rule};
    let faults = Faults::new(1).with(Rule::error("meta.list_repositories"));
    let registry = Registry::builder(faults.wrap(MemoryStore::new())).build();
    let app = registry_http::router(registry, HttpConfig::default());
    let get = |path: &'static str| {
        let app = app.clone();
        async move {
            call(&app, Method::GET, path, &[], Body::empty())
                .await
                .status
        }
    };
    assert_eq!(get("/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get("/healthz").await, StatusCode::OK);
    faults.set_enabled(false);
    assert_eq!(get("/readyz").await, StatusCode::OK);
}

#[tokio::test]
async fn health_endpoints_need_no_credentials() {
    let auth = Auth::new(PrefixRules::new()).with_user("u", "p");
    let app = registry_http::router(Registry::in_memory(), HttpConfig::default().with_auth(auth));
    assert_eq!(
        call(&app, Method::GET, "/healthz", &[], Body::empty())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, Method::GET, "/readyz", &[], Body::empty())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, Method::GET, "/v2/", &[], Body::empty())
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // Off on request, for applications that have their own.
    let app = registry_http::router(
        Registry::in_memory(),
        HttpConfig::default().with_health_endpoints(false),
    );
    assert_eq!(
        call(&app, Method::GET, "/healthz", &[], Body::empty())
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn metrics_need_credentials_on_the_registry_router_but_not_on_their_own() {
    let metrics = Metrics::new();
    let auth = Auth::new(PrefixRules::new().grant(Grantee::user("u"), "", Action::ALL))
        .with_user("u", "p");
    let registry = Registry::in_memory();
    let config = HttpConfig::default()
        .with_auth(auth)
        .with_metrics(metrics.clone());
    let app = registry_http::router(registry.clone(), config);
    let r = call(&app, Method::GET, "/metrics", &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(
        &app,
        Method::GET,
        "/metrics",
        &[basic("u", "p")],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        text.contains("registry_auth_requests_total{result=\"challenge\"} 1"),
        "{text}"
    );
    assert!(text.contains("registry_auth_requests_total{result=\"success\"} 1"));
    #[cfg(target_os = "linux")]
    assert!(text.contains("process_resident_memory_bytes"));

    let own = metrics_router(registry, metrics);
    let r = call(
        &own,
        Method::GET,
        "/metrics",
        &[(
            "accept",
            "application/openmetrics-text;version=1.0.0".to_owned(),
        )],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(r.body.ends_with(b"# EOF\n"));
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            call(&own, Method::GET, path, &[], Body::empty())
                .await
                .status,
            StatusCode::OK
        );
    }
    // Without `with_metrics`, no route.
    let plain = registry_http::router(Registry::in_memory(), HttpConfig::default());
    assert_eq!(
        call(&plain, Method::GET, "/metrics", &[], Body::empty())
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn refusals_and_operations_are_counted_by_kind() {
    let metrics = Metrics::with_options(MetricsOptions {
        process: false,
        ..MetricsOptions::default()
    });
    let storage = instrument_storage(MemoryStore::new().into_storage(), Some(&metrics), None);
    let registry = Registry::builder(storage)
        .with_immutable_tags(TagPattern::parse("v*").unwrap())
        .with_max_manifest_size(10_000)
        .build();
    let app = registry_http::router(
        registry,
        HttpConfig::default()
            .with_metrics(metrics.clone())
            .with_deletes(false),
    );
    push_repo(&app, "a", b"one").await;
    let ct = [("content-type", OCI_MANIFEST.to_owned())];
    let other = image(b"{}", &[]);
    let r = call(&app, Method::PUT, "/v2/a/manifests/v1", &ct, other).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = call(
        &app,
        Method::PUT,
        "/v2/a/manifests/big",
        &ct,
        vec![b' '; 20_000],
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = call(
        &app,
        Method::PUT,
        "/v2/a/manifests/gap",
        &ct,
        image(b"{}", &[b"missing"]),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = call(
        &app,
        Method::DELETE,
        "/v2/a/manifests/v1",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let d = Digest::sha256(b"one");
    let r = call(
        &app,
        Method::POST,
        &format!("/v2/b/blobs/uploads/?mount={d}&from=a"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let text = metrics.encode_prometheus();
    for want in [
        "registry_refusals_total{reason=\"immutable_tag\"} 1",
        "registry_refusals_total{reason=\"size_limit\"} 1",
        "registry_refusals_total{reason=\"missing_blob\"} 1",
        "registry_refusals_total{reason=\"deletes_disabled\"} 1",
        "registry_refusals_total{reason=\"quota\"} 0",
        "registry_mounts_total{result=\"mounted\"} 1",
        "registry_pushes_total{kind=\"blob\"} 2",
        "registry_pushes_total{kind=\"manifest\"} 1",
        "registry_pulls_total{kind=\"manifest\"} 1",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    // Refusals decided inside the store's atomic change are not store errors.
    assert!(
        !text.contains("registry_storage_operation_errors_total{"),
        "{text}"
    );
    assert!(text.contains("operation=\"put_manifest\""));
    // Bytes in and out, per route template.
    let bytes_in = text
        .lines()
        .find(|l| l.starts_with("registry_http_request_bytes_total{route=\"/v2/{name}/manifests/{reference}\",method=\"PUT\"}"))
        .unwrap();
    assert!(!bytes_in.ends_with(" 0"), "{bytes_in}");
}

#[tokio::test]
async fn collections_are_measured_and_their_removals_audited() {
    let metrics = Metrics::with_options(MetricsOptions {
        process: false,
        ..MetricsOptions::default()
    });
    let out = Shared::default();
    let audit = AuditLog::writer(out.clone());
    let clock = ManualClock::new(Timestamp::from_system_time(SystemTime::now()));
    let storage = instrument_storage(
        MemoryStore::new().into_storage(),
        Some(&metrics),
        Some(&audit),
    );
    let registry = Registry::builder(storage)
        .with_clock(Arc::new(clock.clone()))
        .with_protection_window(Duration::from_secs(60))
        .build();
    let app = registry_http::router(registry.clone(), HttpConfig::default().with_audit(audit));
    let d = Digest::sha256(b"orphaned");
    let r = call(
        &app,
        Method::POST,
        &format!("/v2/r/blobs/uploads/?digest={d}"),
        &[],
        "orphaned",
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    clock.advance(Duration::from_secs(120));
    let result = registry.collect_garbage(&GcOptions::default()).await;
    metrics.record_gc(&result);
    let report = result.unwrap();
    assert_eq!((report.links_removed, report.blobs_deleted), (1, 1));
    let text = out.text();
    let events: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        events,
        ["blob_upload", "gc_link_removed", "blob_bytes_deleted"]
    );
    let exposition = metrics.encode_prometheus();
    for want in [
        "registry_gc_runs_total{result=\"ok\"} 1",
        "registry_gc_removed_total{kind=\"links\"} 1",
        "registry_gc_removed_total{kind=\"blobs\"} 1",
        "registry_gc_bytes_freed_total 8",
        "registry_gc_duration_seconds_count 1",
    ] {
        assert!(
            exposition.contains(want),
            "{want} missing from\n{exposition}"
        );
    }
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);
impl Shared {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}
impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_access_log_has_a_line_per_request_with_its_fields() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let out = Shared::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone()),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let app = registry_http::router(
            Registry::in_memory(),
            HttpConfig::default().with_access_log(Some(AccessLog::tracing())),
        );
        let d = Digest::sha256(b"hello");
        let r = call(
            &app,
            Method::POST,
            &format!("/v2/some/repo/blobs/uploads/?digest={d}"),
            &[("x-request-id", "req-1".to_owned())],
            "hello",
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
        let r = call(
            &app,
            Method::GET,
            &format!("/v2/some/repo/blobs/{d}"),
            &[],
            Body::empty(),
        )
        .await;
        assert_eq!(r.body, Bytes::from_static(b"hello"));
    });
    let text = out.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("registry_http::access"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for want in [
        "method=POST",
        "route=/v2/{name}/blobs/uploads/",
        "repository=some/repo",
        "status=201",
        "bytes_in=5",
        "request_id=req-1",
        "peer=192.0.2.7:40123",
    ] {
        assert!(lines[0].contains(want), "{want} missing from {}", lines[0]);
    }
    for want in ["method=GET", "status=200", "bytes_out=5", "complete=true"] {
        assert!(lines[1].contains(want), "{want} missing from {}", lines[1]);
    }
}

/// The line the router writes itself: every field, in order, one line per request;
/// a user name that would break the `key=value` form is quoted.
#[tokio::test]
async fn the_access_log_written_by_the_router_is_one_logfmt_line_per_request() {
    let out = Shared::default();
    let auth = Auth::new(PrefixRules::new().grant(Grantee::user("ci bot"), "", Action::ALL))
        .with_user("ci bot", "p");
    let config = HttpConfig::default()
        .with_auth(auth)
        .with_access_log(Some(AccessLog::writer(out.clone())));
    let app = registry_http::router(Registry::in_memory(), config);
    let d = Digest::sha256(b"hello");
    let r = call(
        &app,
        Method::POST,
        &format!("/v2/some/repo/blobs/uploads/?digest={d}"),
        &[("x-request-id", "req-1".to_owned()), basic("ci bot", "p")],
        "hello",
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = call(&app, Method::GET, "/v2/", &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let text = out.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let fields = |line: &str| -> String {
        // The time and the timings change from run to run.
        let (time, rest) = line.split_once("  INFO registry_http::access: ").unwrap();
        assert!(time.ends_with('Z') && time.len() == 24, "{line}");
        rest.split(' ')
            .map(|kv| match kv.split_once('=') {
                Some((k @ ("latency_ms" | "duration_ms"), v)) => {
                    let (ms, frac) = v.split_once('.').unwrap();
                    assert!(ms.parse::<u64>().is_ok() && frac.len() == 3, "{line}");
                    format!("{k}=T")
                }
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        fields(lines[0]),
        "method=POST route=/v2/{name}/blobs/uploads/ repository=some/repo status=201 \
         bytes_in=5 bytes_out=0 latency_ms=T duration_ms=T request_id=req-1 \
         identity=\"ci bot\" peer=192.0.2.7:40123 complete=true"
    );
    let second = fields(lines[1]);
    assert!(
        second.starts_with("method=GET route=/v2/ repository=- status=401 bytes_in=0 bytes_out="),
        "{second}"
    );
    assert!(
        second.ends_with(" identity=- peer=192.0.2.7:40123 complete=true"),
        "{second}"
    );
}
