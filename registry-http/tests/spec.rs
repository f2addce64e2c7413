//! Every endpoint of the OCI distribution spec v1.1 (the tests are numbered after the
//! spec's endpoint table: `end-1`, `end-2`, ...), in process (no socket), through
//! `tower::ServiceExt::oneshot`.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use registry_core::{Algorithm, Digest, Registry};
use registry_http::{HttpConfig, router};

mod common;
use common::{OCI_INDEX, OCI_MANIFEST, get, send};

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
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    d
}

fn manifest(config: &[u8], layers: &[&[u8]], extra: &str) -> String {
    let layers: Vec<String> = layers
        .iter()
        .map(|l| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}"#, sha(l), l.len()))
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]{extra}}}"#,
        sha(config),
        config.len(),
        layers.join(",")
    )
}

async fn push_image(app: &Router, repo: &str, tag: &str) -> (String, String) {
    push_blob(app, repo, b"{}").await;
    push_blob(app, repo, b"layer").await;
    let m = manifest(b"{}", &[b"layer"], "");
    let r = send(
        app,
        Method::PUT,
        &format!("/v2/{repo}/manifests/{tag}"),
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
    (r.header("docker-content-digest").unwrap().to_owned(), m)
}

#[tokio::test]
async fn end_1_base() {
    let app = app();
    let r = get(&app, "/v2/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), serde_json::json!({}));
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

#[tokio::test]
async fn end_2_blob_get_head_range() {
    let app = app();
    let data: Vec<u8> = (0..100u8).collect();
    let d = push_blob(&app, "r", &data).await;
    let r = get(&app, &format!("/v2/r/blobs/{d}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], &data[..]);
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(r.header("content-length"), Some("100"));
    let h = send(
        &app,
        Method::HEAD,
        &format!("/v2/r/blobs/{d}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(h.status, StatusCode::OK);
    assert!(h.body.is_empty());
    assert_eq!(h.header("content-length"), Some("100"));
    assert_eq!(h.header("content-type"), Some("application/octet-stream"));
    for (range, expected, cr) in [
        ("bytes=10-19", &data[10..20], "bytes 10-19/100"),
        ("bytes=90-", &data[90..], "bytes 90-99/100"),
        ("bytes=-5", &data[95..], "bytes 95-99/100"),
        ("bytes=95-1000", &data[95..], "bytes 95-99/100"),
    ] {
        let r = send(
            &app,
            Method::GET,
            &format!("/v2/r/blobs/{d}"),
            &[("range", range)],
            Body::empty(),
        )
        .await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(&r.body[..], expected, "{range}");
        assert_eq!(r.header("content-range"), Some(cr));
    }
    let r = send(
        &app,
        Method::GET,
        &format!("/v2/r/blobs/{d}"),
        &[("range", "bytes=100-")],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range"), Some("bytes */100"));
    let r = get(&app, &format!("/v2/r/blobs/{}", sha(b"missing"))).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );
    let r = get(&app, "/v2/r/blobs/sha256:nothex").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
}

#[tokio::test]
async fn end_3_and_7_manifests() {
    let app = app();
    let (d, m) = push_image(&app, "a/b", "v1").await;
    for reference in ["v1", d.as_str()] {
        let r = get(&app, &format!("/v2/a/b/manifests/{reference}")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], m.as_bytes());
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
        let h = send(
            &app,
            Method::HEAD,
            &format!("/v2/a/b/manifests/{reference}"),
            &[],
            Body::empty(),
        )
        .await;
        assert_eq!(h.status, StatusCode::OK);
        assert!(h.body.is_empty());
        assert_eq!(
            h.header("content-length"),
            Some(m.len().to_string().as_str())
        );
    }
    let r = get(&app, "/v2/a/b/manifests/nope").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    // PUT answers with Location and the digest.
    let r = send(
        &app,
        Method::PUT,
        "/v2/a/b/manifests/v2",
        &[("content-type", OCI_MANIFEST)],
        m.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/a/b/manifests/{d}").as_str())
    );
    // Failures.
    let bad = manifest(b"{}", &[b"never pushed"], "");
    let r = send(
        &app,
        Method::PUT,
        "/v2/a/b/manifests/x",
        &[("content-type", OCI_MANIFEST)],
        bad,
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    let r = send(
        &app,
        Method::PUT,
        "/v2/a/b/manifests/x",
        &[("content-type", OCI_MANIFEST)],
        "{not json",
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID")
    );
    let r = send(
        &app,
        Method::PUT,
        "/v2/a/b/manifests/x",
        &[("content-type", OCI_INDEX)],
        m.clone(),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
        "media type mismatch"
    );
    let r = send(
        &app,
        Method::PUT,
        &format!("/v2/a/b/manifests/{}", sha(b"other")),
        &[("content-type", OCI_MANIFEST)],
        m.clone(),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(5 * 1024 * 1024));
    let r = send(
        &app,
        Method::PUT,
        "/v2/a/b/manifests/x",
        &[("content-type", "application/x-thing+json")],
        huge,
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = get(&app, "/v2/a/b/manifests/x").await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "nothing partial became visible"
    );
    // Parameters on the request's Content-Type are ignored; the stored one is served.
    let r = send(
        &app,
        Method::PUT,
        "/v2/a/b/manifests/v3",
        &[(
            "content-type",
            "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
        )],
        m,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        get(&app, "/v2/a/b/manifests/v3")
            .await
            .header("content-type"),
        Some(OCI_MANIFEST)
    );
}

#[tokio::test]
async fn end_4_5_6_13_14_uploads() {
    let app = app();
    // 4a: start.
    let r = send(
        &app,
        Method::POST,
        "/v2/u/blobs/uploads/",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let loc = r.header("location").unwrap().to_owned();
    assert!(loc.starts_with("/v2/u/blobs/uploads/"));
    assert!(r.header("docker-upload-uuid").is_some());
    // 5: chunks.
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "0-4"), ("content-length", "5")],
        "hello",
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.header("range"), Some("0-4"));
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "0-4"), ("content-length", "5")],
        "hello",
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::RANGE_NOT_SATISFIABLE,
        "repeated chunk"
    );
    assert_eq!(r.header("range"), Some("0-4"));
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "7-9"), ("content-length", "3")],
        "abc",
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "gap");
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "5-9"), ("content-length", "3")],
        "abc",
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "SIZE_INVALID"),
        "Content-Length disagrees"
    );
    let r = send(
        &app,
        Method::PATCH,
        &loc,
        &[("content-range", "garbage")],
        "abc",
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    // Streamed chunk without Content-Range (skopeo).
    let r = send(&app, Method::PATCH, &loc, &[], " world").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.header("range"), Some("0-10"));
    // 13: status.
    let r = get(&app, &loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.header("range"), Some("0-10"));
    // 6: finish with a last chunk; wrong digest first.
    let r = send(
        &app,
        Method::PUT,
        &format!("{loc}?digest={}", sha(b"wrong")),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    let r = get(&app, &loc).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "a refused digest ends the session"
    );
    let r = send(
        &app,
        Method::POST,
        "/v2/u/blobs/uploads/",
        &[],
        Body::empty(),
    )
    .await;
    let loc = r.header("location").unwrap().to_owned();
    send(&app, Method::PATCH, &loc, &[], "hello").await;
    let d = sha(b"hello world");
    let r = send(
        &app,
        Method::PUT,
        &format!("{loc}?digest={d}"),
        &[("content-range", "5-10"), ("content-length", "6")],
        " world",
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/u/blobs/{d}").as_str())
    );
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(
        &get(&app, &format!("/v2/u/blobs/{d}")).await.body[..],
        b"hello world"
    );
    // A final chunk at the wrong offset is 416.
    let r = send(
        &app,
        Method::POST,
        "/v2/u/blobs/uploads/",
        &[],
        Body::empty(),
    )
    .await;
    let loc = r.header("location").unwrap().to_owned();
    let r = send(
        &app,
        Method::PUT,
        &format!("{loc}?digest={}", sha(b"x")),
        &[("content-range", "3-3"), ("content-length", "1")],
        "x",
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    let r = send(&app, Method::PUT, &loc, &[], Body::empty()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        "digest is required"
    );
    // 14: cancel.
    let r = send(&app, Method::DELETE, &loc, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = get(&app, &loc).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
    let r = send(&app, Method::DELETE, &loc, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send(
        &app,
        Method::PATCH,
        "/v2/u/blobs/uploads/nosuchsession",
        &[],
        "x",
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
    let r = send(
        &app,
        Method::PATCH,
        "/v2/u/blobs/uploads/../../etc",
        &[],
        "x",
    )
    .await;
    assert!(r.status.is_client_error());
}

#[tokio::test]
async fn end_4b_4c_monolithic_and_algorithms() {
    let app = app();
    let d = sha(b"mono");
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/m/blobs/uploads/?digest={d}"),
        &[],
        "mono",
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/m/blobs/{d}").as_str())
    );
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/m/blobs/uploads/?digest={}", sha(b"x")),
        &[],
        "mono",
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    let r = send(
        &app,
        Method::POST,
        "/v2/m/blobs/uploads/?digest=md5:abc",
        &[],
        "mono",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Lying Content-Length.
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/m/blobs/uploads/?digest={d}"),
        &[("content-length", "10")],
        "mono",
    )
    .await;
    assert!(r.status.is_client_error(), "{:?}", r.status);
    // sha512 sessions.
    let r = send(
        &app,
        Method::POST,
        "/v2/m/blobs/uploads/?digest-algorithm=sha512",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let loc = r.header("location").unwrap().to_owned();
    let d512 = Digest::compute(Algorithm::Sha512, b"long hash").to_string();
    let r = send(
        &app,
        Method::PUT,
        &format!("{loc}?digest={d512}"),
        &[("content-length", "9")],
        "long hash",
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        &get(&app, &format!("/v2/m/blobs/{d512}")).await.body[..],
        b"long hash"
    );
    let r = send(
        &app,
        Method::POST,
        "/v2/m/blobs/uploads/?digest-algorithm=md5",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn end_7b_multi_tag_and_subject() {
    let app = app();
    push_blob(&app, "t", b"{}").await;
    let m = manifest(b"{}", &[], "");
    let d = sha(m.as_bytes());
    let r = send(
        &app,
        Method::PUT,
        &format!("/v2/t/manifests/{d}?tag=a&tag=b"),
        &[("content-type", OCI_MANIFEST)],
        m,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let tags: Vec<&str> = r
        .headers
        .get_all("oci-tag")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(tags, ["a", "b"]);
    let r = send(
        &app,
        Method::PUT,
        &format!("/v2/t/manifests/{d}?tag=bad/tag"),
        &[("content-type", OCI_MANIFEST)],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // A referrer of a subject that does not exist yet is accepted, with OCI-Subject.
    let subject = sha(b"future subject");
    let referrer = manifest(
        b"{}",
        &[],
        &format!(
            r#","artifactType":"x/sig","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":1}}"#
        ),
    );
    let rd = sha(referrer.as_bytes());
    let r = send(
        &app,
        Method::PUT,
        &format!("/v2/t/manifests/{rd}"),
        &[("content-type", OCI_MANIFEST)],
        referrer,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("oci-subject"), Some(subject.as_str()));
    // end-12: referrers.
    let r = get(&app, &format!("/v2/t/referrers/{subject}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    let j = r.json();
    assert_eq!(j["mediaType"], OCI_INDEX);
    assert_eq!(j["manifests"][0]["digest"], rd.as_str());
    assert_eq!(j["manifests"][0]["artifactType"], "x/sig");
    let r = get(
        &app,
        &format!("/v2/t/referrers/{subject}?artifactType=x/sig"),
    )
    .await;
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 1);
    let r = get(
        &app,
        &format!("/v2/t/referrers/{subject}?artifactType=other"),
    )
    .await;
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 0);
    let r = get(&app, &format!("/v2/t/referrers/{}", sha(b"none"))).await;
    assert_eq!(r.status, StatusCode::OK, "never 404");
    assert_eq!(r.json()["manifests"], serde_json::json!([]));
    let r = get(&app, "/v2/t/referrers/sha256:bad").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn end_8_tags_and_catalog_pagination() {
    let app = app();
    let r = get(&app, "/v2/none/tags/list").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    let (d, _) = push_image(&app, "p", "t0").await;
    // 10,000 tags.
    let registry_tags: Vec<String> = (1..10_000).map(|i| format!("t{i:05}")).collect();
    for t in &registry_tags {
        let r = send(
            &app,
            Method::PUT,
            &format!("/v2/p/manifests/{d}?tag={t}"),
            &[("content-type", OCI_MANIFEST)],
            manifest(b"{}", &[b"layer"], ""),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let r = get(&app, "/v2/p/tags/list").await;
    assert_eq!(r.json()["tags"].as_array().unwrap().len(), 10_000);
    assert_eq!(r.json()["name"], "p");
    let mut seen = 0;
    let mut uri = "/v2/p/tags/list?n=999".to_owned();
    loop {
        let r = get(&app, &uri).await;
        assert_eq!(r.status, StatusCode::OK);
        let page = r.json()["tags"].as_array().unwrap().len();
        seen += page;
        match r.header("link") {
            Some(link) => {
                assert!(link.ends_with(">; rel=\"next\""));
                uri = link
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_owned();
            }
            None => break,
        }
    }
    assert_eq!(seen, 10_000);
    let r = get(&app, "/v2/p/tags/list?n=0").await;
    assert_eq!(r.json()["tags"], serde_json::json!([]));
    assert!(r.header("link").is_none());
    let r = get(&app, "/v2/p/tags/list?n=2&last=t09998").await;
    assert_eq!(r.json()["tags"], serde_json::json!(["t09999"]));
    assert!(r.header("link").is_none());
    let r = get(&app, "/v2/p/tags/list?n=x").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    push_blob(&app, "q/r", b"x").await;
    let r = get(&app, "/v2/_catalog?n=1").await;
    assert_eq!(r.json()["repositories"], serde_json::json!(["p"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/_catalog?n=1&last=p>; rel=\"next\"")
    );
    let r = get(&app, "/v2/_catalog?n=1&last=p").await;
    assert_eq!(r.json()["repositories"], serde_json::json!(["q/r"]));
    assert!(r.header("link").is_none());
}

#[tokio::test]
async fn end_9_10_deletes() {
    let app = app();
    let (d, _) = push_image(&app, "del", "v1").await;
    let r = send(
        &app,
        Method::DELETE,
        "/v2/del/manifests/v1",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        get(&app, "/v2/del/manifests/v1").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&app, &format!("/v2/del/manifests/{d}")).await.status,
        StatusCode::OK
    );
    let layer = sha(b"layer");
    let r = send(
        &app,
        Method::DELETE,
        &format!("/v2/del/blobs/{layer}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "referenced by a manifest");
    let r = send(
        &app,
        Method::DELETE,
        &format!("/v2/del/manifests/{d}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        get(&app, &format!("/v2/del/manifests/{d}")).await.status,
        StatusCode::NOT_FOUND
    );
    let r = send(
        &app,
        Method::DELETE,
        &format!("/v2/del/manifests/{d}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let r = send(
        &app,
        Method::DELETE,
        &format!("/v2/del/blobs/{layer}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        get(&app, &format!("/v2/del/blobs/{layer}")).await.status,
        StatusCode::NOT_FOUND
    );
    let r = send(
        &app,
        Method::DELETE,
        &format!("/v2/del/blobs/{layer}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );
    // Deletes switched off; read-only.
    let off = router(
        Registry::in_memory(),
        HttpConfig::default().with_deletes(false),
    );
    let (d, _) = push_image(&off, "x", "v1").await;
    let r = send(
        &off,
        Method::DELETE,
        &format!("/v2/x/manifests/{d}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
    );
    let ro = router(
        Registry::in_memory(),
        HttpConfig::default().with_read_only(true),
    );
    let r = send(
        &ro,
        Method::POST,
        "/v2/x/blobs/uploads/",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
    );
    let r = send(
        &ro,
        Method::PUT,
        "/v2/x/manifests/v1",
        &[("content-type", OCI_MANIFEST)],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn end_11_mount() {
    let app = app();
    let d = push_blob(&app, "src", b"shared").await;
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/dst/blobs/uploads/?mount={d}&from=src"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/dst/blobs/{d}").as_str())
    );
    assert_eq!(
        &get(&app, &format!("/v2/dst/blobs/{d}")).await.body[..],
        b"shared"
    );
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/other/blobs/uploads/?mount={d}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "anonymous mount");
    let missing = sha(b"missing");
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/dst/blobs/uploads/?mount={missing}&from=src"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "falls back to an upload");
    assert!(
        r.header("location")
            .unwrap()
            .starts_with("/v2/dst/blobs/uploads/")
    );
}

#[tokio::test]
async fn hostile_names_and_paths() {
    let app = app();
    let long = "a".repeat(300);
    for uri in [
        "/v2/UPPER/tags/list".to_owned(),
        "/v2/a//b/tags/list".to_owned(),
        "/v2/../tags/list".to_owned(),
        "/v2/a/../b/tags/list".to_owned(),
        format!("/v2/{long}/tags/list"),
        "/v2/-a/manifests/v1".to_owned(),
    ] {
        let r = get(&app, &uri).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            "{uri}"
        );
    }
    let r = get(&app, "/v2/a/b/unknown-endpoint").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send(&app, Method::PUT, "/v2/a/manifests/bad:tag:x", &[], "{}").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = send(&app, Method::POST, "/v2/a/manifests/v1", &[], "{}").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
    );
}

#[tokio::test]
async fn hostile_trickling_body_times_out_and_changes_nothing() {
    let app = router(
        Registry::in_memory(),
        HttpConfig::default().with_body_idle_timeout(Duration::from_millis(100)),
    );
    let d = sha(b"slow body");
    let trickle = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"slow "))])
        .chain(futures::stream::once(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(Bytes::from_static(b"body"))
        }));
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/s/blobs/uploads/?digest={d}"),
        &[],
        Body::from_stream(trickle),
    )
    .await;
    assert!(
        r.status.is_client_error() || r.status.is_server_error(),
        "{:?}",
        r.status
    );
    assert!(!r.code().is_empty(), "an OCI error body");
    assert_eq!(
        get(&app, &format!("/v2/s/blobs/{d}")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn serve_local_over_a_real_socket() {
    let server = registry_http::serve_local(Registry::in_memory(), HttpConfig::default())
        .await
        .unwrap();
    assert!(server.url().starts_with("http://127.0.0.1:"));
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    server.shutdown().await;
}
