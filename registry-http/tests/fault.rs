//! The HTTP fault layer: injected statuses (before and after the registry did the
//! work), cut responses and requests, delays, and oci-client meeting them.
//!
//! oci-client 0.18 does not retry by itself: every injected fault surfaces as an
//! error of the call that met it (the test prints them). The tests retry as a client
//! would, and check on the registry side that each fault changed nothing stored
//! (a refusal before the registry: nothing; a lost acknowledgement: exactly the
//! acknowledged write, which the retry then repeats idempotently).

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{OCI_MANIFEST, send};
use http_body_util::BodyExt;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference as OciReference};
use registry_core::{Digest, ListOptions, Reference, Registry, RepoName, Tag, fixtures};
use registry_http::{HttpConfig, HttpFault, HttpFaults, HttpRule, serve_local};
use tower::ServiceExt;

fn tag_ref(t: &str) -> Reference {
    Reference::Tag(Tag::parse(t).unwrap())
}

/// Each fault kind through the router in process, with what it leaves in storage.
#[tokio::test]
async fn injected_faults_and_what_they_leave() {
    let registry = Registry::in_memory();
    let faults = HttpFaults::new(1);
    let app = registry_http::router(
        registry.clone(),
        HttpConfig::default().with_faults(faults.clone()),
    );
    let repo = RepoName::parse("faults/app").unwrap();
    let v1 = fixtures::image().layers([20_000]).seed(1).build().unwrap();
    let v2 = fixtures::image().layers([20_000]).seed(2).build().unwrap();
    for img in [&v1, &v2] {
        for b in img.layers.iter().chain([&img.config]) {
            let body = futures::stream::iter([Ok(b.bytes.clone())]);
            let body = futures::StreamExt::boxed(body);
            registry
                .put_blob(&repo, &b.descriptor.digest, None, body)
                .await
                .unwrap();
        }
    }
    let put = |tag: &'static str, m: &fixtures::Blob| {
        let (app, bytes) = (app.clone(), m.bytes.clone());
        async move {
            send(
                &app,
                Method::PUT,
                &format!("/v2/faults/app/manifests/{tag}"),
                &[("content-type", OCI_MANIFEST)],
                bytes,
            )
            .await
        }
    };

    // A 503 before the registry: nothing stored; the retry goes through.
    faults.add(
        HttpRule::new(
            "/v2/*/manifests/*",
            HttpFault::Status(StatusCode::SERVICE_UNAVAILABLE),
        )
        .method(Method::PUT)
        .times(1),
    );
    let stats = registry.stats().await.unwrap().metadata;
    let refused = put("v1", &v1.manifest).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.code(), "UNAVAILABLE");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(registry.stats().await.unwrap().metadata, stats);
    assert!(registry.stat_manifest(&repo, &tag_ref("v1")).await.is_err());
    assert_eq!(put("v1", &v1.manifest).await.status, 201);
    faults.clear();

    // A 500 after the registry did the work: the manifest is there although the client
    // was told otherwise; the retry is idempotent (same digest, one manifest more).
    faults.add(
        HttpRule::new(
            "/v2/*/manifests/*",
            HttpFault::StatusAfter(StatusCode::INTERNAL_SERVER_ERROR),
        )
        .method(Method::PUT)
        .times(1),
    );
    let before = registry.stats().await.unwrap().metadata;
    let lost = put("v2", &v2.manifest).await;
    assert_eq!(lost.status, 500);
    let stored = registry.stat_manifest(&repo, &tag_ref("v2")).await.unwrap();
    assert_eq!(stored.digest, v2.manifest.descriptor.digest);
    let retried = put("v2", &v2.manifest).await;
    assert_eq!(retried.status, 201);
    assert_eq!(
        retried.header("docker-content-digest"),
        Some(v2.manifest.descriptor.digest.as_str())
    );
    let after = registry.stats().await.unwrap().metadata;
    assert_eq!(after.manifests, before.manifests + 1);
    assert_eq!(after.tags, before.tags + 1);
    faults.clear();

    // A download cut after 1 KiB: the headers promise the whole blob, the body fails.
    let layer = &v1.layers[0].descriptor.digest;
    faults.add(
        HttpRule::new(
            "/v2/*/blobs/sha256:*",
            HttpFault::CutResponse { after: 1024 },
        )
        .method(Method::GET)
        .times(1),
    );
    let uri = format!("/v2/faults/app/blobs/{layer}");
    let req = Request::get(&uri)
        .header("host", "localhost")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "20000");
    assert!(resp.into_body().collect().await.is_err(), "the body is cut");
    let whole = common::get(&app, &uri).await;
    assert!(layer.verify(&whole.body));

    // A monolithic upload whose request body is cut: refused, nothing stored, no
    // session left behind.
    let blob = fixtures::image()
        .layers([5000])
        .seed(3)
        .build()
        .unwrap()
        .layers[0]
        .clone();
    faults.add(
        HttpRule::new(
            "/v2/*/blobs/uploads/*",
            HttpFault::CutRequest { after: 1000 },
        )
        .method(Method::POST)
        .times(1),
    );
    let len = blob.bytes.len().to_string();
    let upload = |app: axum::Router| {
        let (bytes, len, d) = (
            blob.bytes.clone(),
            len.clone(),
            blob.descriptor.digest.clone(),
        );
        async move {
            send(
                &app,
                Method::POST,
                &format!("/v2/faults/app/blobs/uploads/?digest={d}"),
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-length", &len),
                ],
                bytes,
            )
            .await
        }
    };
    let cut = upload(app.clone()).await;
    assert_eq!(cut.status, 400);
    assert_eq!(cut.code(), "BLOB_UPLOAD_INVALID");
    assert!(
        registry
            .stat_blob(&repo, &blob.descriptor.digest)
            .await
            .is_err()
    );
    assert!(
        registry
            .storage()
            .blobs
            .list_uploads()
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(upload(app.clone()).await.status, 201);

    // A chunk whose body is cut: the session keeps its length (appends are
    // all-or-nothing), and the client resends the chunk.
    faults.add(
        HttpRule::new("/v2/*/blobs/uploads/*", HttpFault::CutRequest { after: 10 })
            .method(Method::PATCH)
            .times(1),
    );
    let start = send(
        &app,
        Method::POST,
        "/v2/faults/app/blobs/uploads/",
        &[],
        Body::empty(),
    )
    .await;
    let location = start.header("location").unwrap().to_owned();
    let chunk = bytes::Bytes::from_static(b"0123456789abcdefghij");
    let patch = |app: axum::Router| {
        let (location, chunk) = (location.clone(), chunk.clone());
        async move {
            send(
                &app,
                Method::PATCH,
                &location,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-range", "0-19"),
                    ("content-length", "20"),
                ],
                chunk,
            )
            .await
        }
    };
    assert_eq!(patch(app.clone()).await.status, 400);
    let status = common::get(&app, &location).await;
    assert_eq!(status.status, 204);
    assert_eq!(
        status.header("range"),
        Some("0-0"),
        "nothing of the cut chunk kept"
    );
    let resent = patch(app.clone()).await;
    assert_eq!(resent.status, 202);
    assert_eq!(resent.header("range"), Some("0-19"));

    // A delay: the request goes through, late.
    faults.add(HttpRule::new("/v2/", HttpFault::Delay(Duration::from_millis(60))).times(1));
    let started = Instant::now();
    assert_eq!(common::get(&app, "/v2/").await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(60));

    let kinds: Vec<HttpFault> = faults.injected().into_iter().map(|i| i.fault).collect();
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    let audit = registry.storage().metadata.audit(false).await.unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
}

fn client() -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: true,
        ..Default::default()
    })
}

/// Runs `attempt` until it succeeds (at most `max` times), as a client's retry loop
/// would; returns the result and the error of every failed attempt.
async fn retry<T, F, Fut>(max: usize, mut attempt: F) -> (T, Vec<String>)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = oci_client::errors::Result<T>>,
{
    let mut errors = Vec::new();
    for _ in 0..max {
        match attempt().await {
            Ok(v) => return (v, errors),
            Err(e) => errors.push(e.to_string()),
        }
    }
    panic!("still failing after {max} attempts: {errors:#?}");
}

/// oci-client against a served registry with faults: a cut upload body, a 503 and a
/// lost acknowledgement on the manifest, a download cut mid-body. oci-client fails
/// each call that meets a fault (it does not retry); retried, the push and the pull
/// come out right, and the registry holds exactly the image, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_client_retries_through_faults() {
    let registry = Registry::in_memory();
    let faults = HttpFaults::new(11)
        // Attempt 1: the first blob PUT arrives cut (the client's data never whole).
        .with(
            HttpRule::new(
                "/v2/*/blobs/uploads/*",
                HttpFault::CutRequest { after: 1000 },
            )
            .method(Method::PUT)
            .times(1),
        )
        // Attempt 2: the manifest PUT is refused before reaching the registry.
        .with(
            HttpRule::new(
                "/v2/*/manifests/*",
                HttpFault::Status(StatusCode::SERVICE_UNAVAILABLE),
            )
            .method(Method::PUT)
            .times(1),
        )
        // Attempt 3: the manifest is stored, but the answer is a 500. (Each rule counts
        // every manifest PUT, including the one the rule above refused.)
        .with(
            HttpRule::new(
                "/v2/*/manifests/*",
                HttpFault::StatusAfter(StatusCode::INTERNAL_SERVER_ERROR),
            )
            .method(Method::PUT)
            .after(1)
            .times(1),
        );
    let server = serve_local(
        registry.clone(),
        HttpConfig::default().with_faults(faults.clone()),
    )
    .await
    .unwrap();
    let host = server.url().trim_start_matches("http://").to_owned();
    let image: OciReference = format!("{host}/faults/oci:v1").parse().unwrap();
    let repo = RepoName::parse("faults/oci").unwrap();
    let anon = RegistryAuth::Anonymous;
    let layer_bytes = fixtures::image()
        .layers([300_000])
        .seed(4)
        .build()
        .unwrap()
        .layers[0]
        .bytes
        .to_vec();
    let layers = vec![ImageLayer::oci_v1(layer_bytes.clone(), None)];
    let config = || Config::oci_v1(b"{\"faults\":true}".to_vec(), None);

    let mut attempt = 0;
    let (_, push_errors) = retry(5, || {
        attempt += 1;
        let (client, image, layers, config, anon) = (client(), &image, &layers, config(), &anon);
        let registry = registry.clone();
        let repo = repo.clone();
        let n = attempt;
        async move {
            let result = client.push(image, layers, config, anon, None).await;
            // What each fault left in the registry, right after it.
            let tags = registry.list_tags(&repo, &ListOptions::default()).await;
            let tagged = tags.is_ok_and(|t| !t.items.is_empty());
            match n {
                // The cut blob, or the refused manifest: no manifest stored.
                1 | 2 => assert!(!tagged, "attempt {n}: nothing tagged"),
                // The lost acknowledgement: stored, although the client got a 500.
                3 => assert!(tagged, "attempt {n}: the manifest is stored"),
                _ => {}
            }
            result
        }
    })
    .await;
    println!("oci-client push errors, one per attempt: {push_errors:#?}");
    assert_eq!(push_errors.len(), 3, "{push_errors:#?}");
    assert!(
        push_errors[1].contains("503") || push_errors[1].to_lowercase().contains("unavailable")
    );
    assert!(push_errors[2].contains("500") || push_errors[2].contains("injected fault"));

    // Pull through a layer download cut mid-body (after 4 KiB of 300 KB), then whole.
    let layer_digest = Digest::sha256(&layer_bytes);
    faults.add(
        HttpRule::new(
            &format!("/v2/*/blobs/{layer_digest}"),
            HttpFault::CutResponse { after: 4096 },
        )
        .method(Method::GET)
        .times(1),
    );
    let (pulled, pull_errors) = retry(3, || {
        let (client, image, anon) = (client(), &image, &anon);
        async move { client.pull(image, anon, vec![IMAGE_LAYER_MEDIA_TYPE]).await }
    })
    .await;
    println!("oci-client pull errors: {pull_errors:#?}");
    assert_eq!(pull_errors.len(), 1, "{pull_errors:#?}");
    assert_eq!(pulled.layers[0].data.to_vec(), layer_bytes);

    // The registry side: one image, whole; nothing left over by the faults but the
    // session the cut upload abandoned (the client moved on; it expires).
    let tags = registry
        .list_tags(&repo, &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(tags.items, [Tag::parse("v1").unwrap()]);
    let manifests = registry
        .list_manifests(&repo, &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(manifests.items.len(), 1);
    let blobs = registry
        .list_blobs(&repo, &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(blobs.items.len(), 2, "the layer and the config");
    assert!(blobs.items.iter().any(|b| b.digest == layer_digest));
    assert!(registry.storage().blobs.list_uploads().await.unwrap().len() <= 1);
    let audit = registry.storage().metadata.audit(false).await.unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    assert_eq!(faults.injected().len(), 4);
    server.shutdown().await;
}
