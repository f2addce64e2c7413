//! Memory taken by manifest bodies is bounded whatever clients do: concurrent bodies
//! share a byte budget (beyond it: 429 with Retry-After), and a body trickling in has a
//! deadline. Every wait is bounded.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use bytes::Bytes;
use common::{OCI_MANIFEST, send};
use futures::StreamExt;
use registry_core::Registry;
use registry_http::{HttpConfig, router};

const BOUND: Duration = Duration::from_secs(20);

/// A body that sends `first` and then nothing until `rest` is fed or dropped.
fn stalled_body(first: &'static [u8]) -> (Body, futures::channel::mpsc::Sender<Bytes>) {
    let (tx, rx) = futures::channel::mpsc::channel::<Bytes>(1);
    let stream = futures::stream::once(async move { Bytes::from_static(first) })
        .chain(rx)
        .map(Ok::<_, std::io::Error>);
    (Body::from_stream(stream), tx)
}

#[tokio::test]
async fn concurrent_manifest_bodies_share_a_byte_budget() {
    let app = router(
        Registry::in_memory(),
        HttpConfig::default().with_manifest_buffer_budget(8 * 1024),
    );
    // A client announces a 6 KiB manifest and trickles it: 6 of the 8 KiB are taken.
    let (body, feed) = stalled_body(b"{");
    let slow = tokio::spawn({
        let app = app.clone();
        async move {
            send(
                &app,
                Method::PUT,
                "/v2/budget/manifests/slow",
                &[("content-type", OCI_MANIFEST), ("content-length", "6144")],
                body,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another 6 KiB manifest does not fit beside it: refused after a short wait.
    let big = vec![b' '; 6144];
    let refused = tokio::time::timeout(
        BOUND,
        send(
            &app,
            Method::PUT,
            "/v2/budget/manifests/second",
            &[("content-type", OCI_MANIFEST)],
            big,
        ),
    )
    .await
    .expect("the second push waited without bound");
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.code(), "TOOMANYREQUESTS");
    assert!(refused.header("retry-after").is_some());
    // Once the slow client goes away its share is free again.
    drop(feed);
    let _ = tokio::time::timeout(BOUND, slow)
        .await
        .expect("slow push ended");
    let small = send(
        &app,
        Method::PUT,
        "/v2/budget/manifests/third",
        &[("content-type", OCI_MANIFEST)],
        vec![b' '; 6144],
    )
    .await;
    // Not valid JSON, but received and parsed: the budget let it in.
    assert_eq!(small.code(), "MANIFEST_INVALID", "{:?}", small.body);
}

#[tokio::test]
async fn a_trickling_manifest_body_has_a_deadline() {
    let app = router(
        Registry::in_memory(),
        HttpConfig::default().with_manifest_body_deadline(Duration::from_millis(300)),
    );
    let (body, _feed) = stalled_body(b"{");
    let reply = tokio::time::timeout(
        BOUND,
        send(
            &app,
            Method::PUT,
            "/v2/budget/manifests/trickle",
            &[("content-type", OCI_MANIFEST)],
            body,
        ),
    )
    .await
    .expect("a stalled manifest body was waited for without bound");
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.code(), "MANIFEST_INVALID");
}
