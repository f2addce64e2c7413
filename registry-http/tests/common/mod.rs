//! Helpers shared by the in-process HTTP tests: one request through the router, and
//! what came back.

// Each test binary uses its own subset; `pub` is for the binaries including this.
#![allow(dead_code, unreachable_pub)]

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A response, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first OCI error code of the body ("" if none).
    pub fn code(&self) -> String {
        self.error().0
    }

    /// The first OCI error's code and message ("" for what is missing).
    pub fn error(&self) -> (String, String) {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        let field = |f: &str| v["errors"][0][f].as_str().unwrap_or("").to_owned();
        (field("code"), field("message"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

/// Sends one request through `app` (in process, no socket) and reads the whole reply.
/// It carries `Host: localhost` unless `headers` name a host (an HTTP/1.1 request
/// without one is a 400); [`send_raw`] sends exactly the headers given.
pub async fn send(
    app: &Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Reply {
    let mut all = headers.to_vec();
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        all.push(("host", "localhost"));
    }
    send_raw(app, method, uri, &all, body).await
}

/// Sends one request with exactly `headers` (no default `Host`).
pub async fn send_raw(
    app: &Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Method::GET, uri, &[], Body::empty()).await
}
