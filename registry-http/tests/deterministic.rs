//! Deterministic mode: a registry with a manual clock and seeded upload ids, driven
//! through the router in process, answers a scenario (chunked and monolithic uploads,
//! pushes, an index, a referrer, tag moves, deletes, a cancelled and an expired
//! session, collections, a repository delete) with byte-identical responses and the
//! same event sequence in every run.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Method;
use common::OCI_INDEX;
use registry_core::fixtures::{self, Blob};
use registry_core::{
    Event, GcOptions, GcReport, ManualClock, MemoryStore, Registry, RepoName, Timestamp,
    UntaggedPolicy,
};
use registry_http::HttpConfig;

/// Sends requests, writing each request line and whole response (status, every header
/// in order, body) into a transcript.
struct Session {
    app: Router,
    transcript: Vec<u8>,
    n: u64,
}

impl Session {
    async fn send(
        &mut self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> common::Reply {
        self.n += 1;
        // A deterministic harness names its requests: otherwise the router makes up
        // request ids from a random per-router prefix.
        let id = format!("req-{}", self.n);
        let mut all = headers.to_vec();
        all.push(("x-request-id", &id));
        let reply = common::send(&self.app, method.clone(), uri, &all, body).await;
        self.transcript
            .extend_from_slice(format!("> {method} {uri}\n< {}\n", reply.status).as_bytes());
        for (k, v) in &reply.headers {
            self.transcript.extend_from_slice(k.as_str().as_bytes());
            self.transcript.extend_from_slice(b": ");
            self.transcript.extend_from_slice(v.as_bytes());
            self.transcript.push(b'\n');
        }
        self.transcript.extend_from_slice(&reply.body);
        self.transcript.extend_from_slice(b"\n\n");
        reply
    }

    async fn get(&mut self, uri: &str) -> common::Reply {
        self.send(Method::GET, uri, &[], Body::empty()).await
    }

    /// A blob in one request (`POST ?digest=`).
    async fn put_blob(&mut self, repo: &str, blob: &Blob) -> common::Reply {
        let uri = format!(
            "/v2/{repo}/blobs/uploads/?digest={}",
            blob.descriptor.digest
        );
        let len = blob.bytes.len().to_string();
        let headers = [
            ("content-type", "application/octet-stream"),
            ("content-length", len.as_str()),
        ];
        let reply = self
            .send(Method::POST, &uri, &headers, blob.bytes.clone())
            .await;
        assert_eq!(reply.status, 201, "{uri}");
        reply
    }

    /// A blob in two PATCH-then-PUT chunks; returns the session's Location.
    async fn put_blob_chunked(&mut self, repo: &str, blob: &Blob) -> String {
        let start = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(start.status, 202);
        let location = start.header("location").unwrap().to_owned();
        let half = blob.bytes.len() / 2;
        let first = blob.bytes.slice(..half);
        let range = format!("0-{}", half - 1);
        let patch = self
            .send(
                Method::PATCH,
                &location,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-range", &range),
                    ("content-length", &half.to_string()),
                ],
                first,
            )
            .await;
        assert_eq!(
            patch.status,
            202,
            "{}",
            String::from_utf8_lossy(&patch.body)
        );
        let next = patch.header("location").unwrap().to_owned();
        let sep = if next.contains('?') { '&' } else { '?' };
        let put = self
            .send(
                Method::PUT,
                &format!("{next}{sep}digest={}", blob.descriptor.digest),
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-length", &(blob.bytes.len() - half).to_string()),
                ],
                blob.bytes.slice(half..),
            )
            .await;
        assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
        location
    }

    async fn put_manifest(&mut self, repo: &str, reference: &str, m: &Blob) -> common::Reply {
        let reply = self
            .send(
                Method::PUT,
                &format!("/v2/{repo}/manifests/{reference}"),
                &[("content-type", &m.descriptor.media_type)],
                m.bytes.clone(),
            )
            .await;
        assert_eq!(
            reply.status,
            201,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply
    }
}

/// Everything a run produced: the HTTP transcript, the events, the collection reports
/// (without their real-time durations), and the upload session ids handed out.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    transcript: Vec<u8>,
    events: Vec<Event>,
    reports: Vec<GcReport>,
    upload_ids: Vec<String>,
}

async fn scenario(seed: u64) -> Run {
    let clock = ManualClock::new(Timestamp(1_700_000_000_000));
    let registry = Registry::builder(MemoryStore::new())
        .with_clock(Arc::new(clock.clone()))
        .with_id_seed(seed)
        .build();
    let mut events = registry.subscribe();
    let mut s = Session {
        app: registry_http::router(registry.clone(), HttpConfig::default()),
        transcript: Vec::new(),
        n: 0,
    };
    let repo = "det/app";
    let mut upload_ids = Vec::new();

    assert_eq!(s.get("/v2/").await.status, 200);

    // Image v1: its big layer chunked, the rest in one request each.
    let v1 = fixtures::image()
        .layers([3000, 500])
        .seed(1)
        .build()
        .unwrap();
    let loc = s.put_blob_chunked(repo, &v1.layers[0]).await;
    upload_ids.push(loc.rsplit('/').next().unwrap().to_owned());
    s.put_blob(repo, &v1.layers[1]).await;
    s.put_blob(repo, &v1.config).await;
    s.put_manifest(repo, "v1", &v1.manifest).await;
    clock.advance(Duration::from_secs(1));

    // Image v2 shares v1's first layer (same seed); `latest` follows v1, then v2.
    let v2 = fixtures::image()
        .layers([3000, 800])
        .seed(1)
        .build()
        .unwrap();
    s.put_blob(repo, &v2.layers[1]).await;
    s.put_blob(repo, &v2.config).await;
    s.put_manifest(repo, "v2", &v2.manifest).await;
    s.put_manifest(repo, "latest", &v1.manifest).await;
    clock.advance(Duration::from_secs(1));
    s.put_manifest(repo, "latest", &v2.manifest).await;

    // A multi-platform index (children by digest) and a signature of v2.
    let index = fixtures::index().seed(3).layers([700]).build().unwrap();
    for child in &index.images {
        for blob in child.layers.iter().chain([&child.config]) {
            s.put_blob(repo, blob).await;
        }
        let digest = child.manifest.descriptor.digest.to_string();
        s.put_manifest(repo, &digest, &child.manifest).await;
    }
    s.put_manifest(repo, "multi", &index.index).await;
    let sig = fixtures::signature(&v2.manifest.descriptor)
        .build()
        .unwrap();
    for blob in [&sig.config].into_iter().chain(&sig.blobs) {
        s.put_blob(repo, blob).await;
    }
    let sig_ref = sig.manifest.descriptor.digest.to_string();
    let pushed = s.put_manifest(repo, &sig_ref, &sig.manifest).await;
    assert!(pushed.header("oci-subject").is_some());

    // Reads.
    s.get(&format!("/v2/{repo}/tags/list")).await;
    s.get(&format!("/v2/{repo}/tags/list?n=2")).await;
    s.get(&format!("/v2/{repo}/manifests/latest")).await;
    let by_index = s
        .send(
            Method::GET,
            &format!("/v2/{repo}/manifests/multi"),
            &[("accept", OCI_INDEX)],
            Body::empty(),
        )
        .await;
    assert_eq!(by_index.status, 200);
    s.send(
        Method::HEAD,
        &format!("/v2/{repo}/blobs/{}", v1.layers[0].descriptor.digest),
        &[],
        Body::empty(),
    )
    .await;
    let ranged = s
        .send(
            Method::GET,
            &format!("/v2/{repo}/blobs/{}", v1.layers[0].descriptor.digest),
            &[("range", "bytes=10-99")],
            Body::empty(),
        )
        .await;
    assert_eq!(ranged.status, 206);
    s.get(&format!(
        "/v2/{repo}/referrers/{}",
        v2.manifest.descriptor.digest
    ))
    .await;
    s.get("/v2/_catalog").await;

    // A cancelled session and one left to expire.
    let start = s
        .send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Body::empty(),
        )
        .await;
    let cancelled = start.header("location").unwrap().to_owned();
    upload_ids.push(cancelled.rsplit('/').next().unwrap().to_owned());
    assert_eq!(
        s.send(Method::DELETE, &cancelled, &[], Body::empty())
            .await
            .status,
        204
    );
    let start = s
        .send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Body::empty(),
        )
        .await;
    let abandoned = start.header("location").unwrap().to_owned();
    upload_ids.push(abandoned.rsplit('/').next().unwrap().to_owned());

    // Deletes: a tag, then v1 by digest (`latest` moved away from it).
    let del = s
        .send(
            Method::DELETE,
            &format!("/v2/{repo}/manifests/v2"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(del.status, 202);
    let del = s
        .send(
            Method::DELETE,
            &format!("/v2/{repo}/manifests/{}", v1.manifest.descriptor.digest),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(del.status, 202);

    // Time passes: the session expires, the collector frees v1's own blobs.
    let mut reports = Vec::new();
    clock.advance(Duration::from_secs(2 * 60 * 60));
    let expired = s.get(&abandoned).await;
    assert_eq!(expired.status, 404);
    let options = GcOptions {
        untagged: UntaggedPolicy::Collect,
        ..GcOptions::default()
    };
    reports.push(registry.collect_garbage(&options).await.unwrap());
    s.get(&format!(
        "/v2/{repo}/blobs/{}",
        v1.layers[1].descriptor.digest
    ))
    .await;

    // A second repository, deleted whole; then a collection frees its blobs.
    let other = RepoName::parse("det/other").unwrap();
    fixtures::image()
        .layers([100])
        .seed(9)
        .push(&registry, &other, "x")
        .await
        .unwrap();
    registry.delete_repository(&other).await.unwrap();
    clock.advance(Duration::from_secs(60 * 60));
    reports.push(registry.collect_garbage(&options).await.unwrap());
    s.get("/v2/_catalog").await;
    s.get(&format!("/v2/{repo}/tags/list")).await;

    for r in &mut reports {
        // Real elapsed time: the one field a deterministic run does not fix.
        r.duration = Duration::ZERO;
    }
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    Run {
        transcript: s.transcript,
        events: seen,
        reports,
        upload_ids,
    }
}

#[tokio::test]
async fn seeded_runs_are_byte_identical() {
    let first = scenario(42).await;
    let second = scenario(42).await;
    // Compared piece by piece first, for a readable failure.
    assert_eq!(first.upload_ids, second.upload_ids);
    assert_eq!(first.events, second.events);
    assert_eq!(first.reports, second.reports);
    if first.transcript != second.transcript {
        let (a, b) = (
            String::from_utf8_lossy(&first.transcript),
            String::from_utf8_lossy(&second.transcript),
        );
        let line = a
            .lines()
            .zip(b.lines())
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        panic!(
            "transcripts differ from line {line}:\n{}\n---\n{}",
            a.lines().nth(line).unwrap_or(""),
            b.lines().nth(line).unwrap_or("")
        );
    }
    assert_eq!(first, second);

    // The scenario did what it says.
    assert!(first.transcript.len() > 10_000);
    assert!(
        first
            .events
            .iter()
            .any(|e| matches!(e, Event::TagMoved { from: Some(_), .. }))
    );
    assert!(
        first
            .events
            .iter()
            .any(|e| matches!(e, Event::BlobCollected { .. }))
    );
    assert!(
        first
            .events
            .iter()
            .any(|e| matches!(e, Event::RepositoryDeleted { .. }))
    );
    assert!(first.reports.iter().all(|r| r.blobs_deleted > 0));
    assert_eq!(first.reports[0].uploads_expired, 0, "expired when touched");
    // Session ids are seeded but keep their shape: 32 hex digits and the owner's tag.
    for id in &first.upload_ids {
        let (random, owner) = id.split_once('_').expect("an owner tag");
        assert_eq!(random.len(), 32, "{id}");
        assert_eq!(owner.len(), 16, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'_'));
    }
    let ids: std::collections::HashSet<_> = first.upload_ids.iter().collect();
    assert_eq!(ids.len(), first.upload_ids.len(), "distinct ids");

    // Another seed: other session ids, hence other Location headers; the same content.
    let other = scenario(43).await;
    assert_ne!(other.upload_ids, first.upload_ids);
    assert_ne!(other.transcript, first.transcript);
    assert_eq!(other.events, first.events);
}

/// Without a seed, ids come from the operating system's generator: two registries
/// hand out different ids for their first session.
#[tokio::test]
async fn unseeded_ids_differ() {
    let repo = RepoName::parse("det/random").unwrap();
    let a = Registry::in_memory()
        .start_upload(&repo, registry_core::Algorithm::Sha256)
        .await
        .unwrap();
    let b = Registry::in_memory()
        .start_upload(&repo, registry_core::Algorithm::Sha256)
        .await
        .unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(a.id.as_str().len(), 32);
}
