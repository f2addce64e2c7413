//! Helpers shared by the integration tests: names, byte streams, servers on loopback
//! ports, and a deep comparison of two registries' copies of an image.

// Each test file uses a different subset of these.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use registry_core::{
    ByteStream, Digest, ImageSource, ListOptions, ManifestInfo, PromoteOptions, Reference,
    RepoName, Tag,
};
use registry_remote::Credentials;

pub(crate) fn repo(s: &str) -> RepoName {
    RepoName::parse(s).unwrap()
}

pub(crate) fn tag(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

pub(crate) fn tagged(t: &str) -> PromoteOptions {
    PromoteOptions::default().with_tag(tag(t))
}

pub(crate) fn body_of(bytes: &'static [u8]) -> ByteStream {
    futures::stream::iter([Ok(Bytes::from_static(bytes))]).boxed()
}

pub(crate) async fn read_all(mut stream: ByteStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// Serves `app` on an ephemeral loopback port; returns its base URL.
pub(crate) async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Asserts that `b` holds what `a` holds of manifest `digest`: the same manifest bytes
/// and media type, the same blob bytes, the same children and referrers, recursively.
pub(crate) async fn assert_same(
    a: &dyn ImageSource,
    a_repo: &RepoName,
    b: &dyn ImageSource,
    b_repo: &RepoName,
    digest: &Digest,
) {
    let mut todo = vec![digest.clone()];
    let mut seen = HashSet::new();
    while let Some(d) = todo.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let r = Reference::Digest(d.clone());
        let ma = a.get_manifest(a_repo, &r).await.unwrap();
        let mb = b.get_manifest(b_repo, &r).await.unwrap();
        assert_eq!(ma, mb, "manifest {d}");
        let info = ManifestInfo::inspect(&ma.meta.media_type, &ma.bytes).unwrap();
        for blob in info.blob_references() {
            let x = read_all(a.get_blob(a_repo, &blob).await.unwrap().stream).await;
            let y = read_all(b.get_blob(b_repo, &blob).await.unwrap().stream).await;
            assert_eq!(x.unwrap(), y.unwrap(), "blob {blob}");
        }
        todo.extend(info.manifest_references());
        let options = ListOptions::default();
        let ra = a.referrers(a_repo, &d, &options).await.unwrap().items;
        let rb = b.referrers(b_repo, &d, &options).await.unwrap().items;
        assert_eq!(ra, rb, "referrers of {d}");
        todo.extend(ra.into_iter().map(|r| r.digest));
    }
}

/// A user of the authenticated test registries.
pub(crate) const ALICE: (&str, &str) = ("alice", "wonderland-7");

pub(crate) fn alice() -> Credentials {
    Credentials::basic(ALICE.0, ALICE.1)
}

/// The path of a request, and the response the test server gives it.
pub(crate) type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

pub(crate) async fn serve_fn(handler: Handler) -> String {
    serve(Router::new().fallback(move |req: Request| {
        let handler = handler.clone();
        async move { handler(&req) }
    }))
    .await
}

pub(crate) fn respond(
    status: StatusCode,
    headers: &[(&str, String)],
    body: impl Into<Body>,
) -> Response {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(body.into()).unwrap()
}
