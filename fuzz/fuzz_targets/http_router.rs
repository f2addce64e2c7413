//! The whole HTTP router, driven in-process (tower `oneshot`) by arbitrary request
//! sequences over a small world of repositories, tags, blobs, manifests and upload
//! sessions, so that requests often hit real state instead of 404s.
//!
//! Checked after every response: no 5xx; every error has a status the spec uses and an
//! OCI error body with a code from the spec's list; a failed request changed no
//! metadata; a blob or manifest served in full hashes to its digest. Checked after the
//! sequence: the mark-and-sweep audit finds no drift, and deleting everything then
//! collecting leaves storage empty.
#![no_main]

use std::cell::RefCell;

use arbitrary::Arbitrary;
use axum::body::Body;
use axum::http::{Method, Request};
use bytes::Bytes;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use registry_core::{Digest, Registry, media_type, testkit};
use registry_http::HttpConfig;
use tower::ServiceExt;

/// Most requests in one sequence: long enough for push, tag, mount, delete, GC chains.
const MAX_REQUESTS: usize = 24;

/// Repositories: a few shapes, and those the recorded traces use.
const REPOS: [&str; 6] = [
    "a",
    "b/c",
    "a/blobs/x",
    "org.one/app_2",
    "seed/img",
    "seed/copy",
];

/// Real client traffic (skopeo, recorded by `make-seeds.sh`), in the order that builds
/// state: push an OCI image, push it as Docker v2s2, copy it to another repository
/// (cross-repository mount), pull it, delete the copy. An input's first byte `k`
/// replays the first `k` of them before its own requests.
const TRACES: [&str; 5] = [
    include_str!("../traces/push-oci.jsonl"),
    include_str!("../traces/push-docker.jsonl"),
    include_str!("../traces/copy-mount.jsonl"),
    include_str!("../traces/pull.jsonl"),
    include_str!("../traces/delete.jsonl"),
];
const TAGS: [&str; 3] = ["latest", "v1", "v1.0-rc_1"];
const BLOBS: [&[u8]; 4] = [b"", b"{}", b"hello layer", b"another layer, a bit longer"];

/// Error codes of the OCI distribution spec v1.1 (its "Error Codes" section).
const CODES: [&str; 14] = [
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

/// Error statuses the spec's endpoints answer with; 409 is this registry's answer to
/// deleting a manifest an index still references (DENIED), tested in spec.rs.
const STATUSES: [u16; 10] = [400, 401, 403, 404, 405, 409, 413, 414, 416, 429];

const CONTENT_TYPES: [&str; 8] = [
    media_type::OCI_MANIFEST,
    media_type::OCI_INDEX,
    media_type::DOCKER_MANIFEST,
    media_type::DOCKER_MANIFEST_LIST,
    media_type::OCI_ARTIFACT_MANIFEST,
    "application/octet-stream",
    "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
    "application/vnd.example.thing+json",
];

#[derive(Arbitrary, Debug)]
enum RepoSel {
    Known(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum DigestSel {
    Blob(u8),
    /// A blob stored earlier in the sequence (by a trace or a fuzzed request).
    Stored(u8),
    Manifest(u8),
    Sha512(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum RefSel {
    Tag(u8),
    Digest(DigestSel),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum SessionSel {
    Known(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum PathSel {
    Base,
    Catalog,
    Blob(RepoSel, DigestSel),
    Uploads(RepoSel),
    Upload(RepoSel, SessionSel),
    Manifest(RepoSel, RefSel),
    Tags(RepoSel),
    Referrers(RepoSel, DigestSel),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum MethodSel {
    Get,
    Head,
    Put,
    Post,
    Patch,
    Delete,
    Options,
}

#[derive(Arbitrary, Debug)]
enum QueryKey {
    N,
    Last,
    Digest,
    Mount,
    From,
    Tag,
    ArtifactType,
    DigestAlgorithm,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum QueryVal {
    Num(u16),
    Huge,
    Max,
    Digest(DigestSel),
    Repo(RepoSel),
    Tag(u8),
    ContentType(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum ManifestSel {
    /// An image manifest over the known blobs (config index, layer indexes).
    Image {
        config: u8,
        layers: Vec<u8>,
        subject: Option<u8>,
        artifact_type: bool,
    },
    /// An index over manifests pushed earlier in the sequence.
    Index { children: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
enum BodySel {
    Empty,
    Blob(u8),
    Manifest(ManifestSel),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum ContentTypeSel {
    None,
    /// The media type that fits the body (for manifests), so pushes can succeed.
    Auto,
    Known(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum LenSel {
    None,
    Exact,
    Value(u64),
}

#[derive(Arbitrary, Debug)]
enum ContentRangeSel {
    None,
    /// From the session's current offset over the body: the well-behaved client.
    Exact,
    Values(u64, u64),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum RangeSel {
    None,
    FromTo(u64, u64),
    From(u64),
    Suffix(u64),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct Req {
    method: MethodSel,
    path: PathSel,
    query: Vec<(QueryKey, QueryVal)>,
    body: BodySel,
    content_type: ContentTypeSel,
    content_length: LenSel,
    content_range: ContentRangeSel,
    range: RangeSel,
}

/// What the sequence has learnt so far: sessions opened, manifests pushed.
#[derive(Default)]
struct World {
    /// Upload session ids from `Location` headers, with the bytes sent to each.
    sessions: Vec<(String, u64)>,
    /// Manifests accepted: digest, size, media type.
    manifests: Vec<(Digest, u64, &'static str)>,
    /// Blobs stored.
    blobs: Vec<Digest>,
}

fn pick<T: Copy>(items: &[T], i: u8) -> T {
    items[i as usize % items.len()]
}

/// Percent-encodes everything but unreserved characters, so that a raw string can sit
/// in a query value.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl World {
    fn repo(&self, r: &RepoSel) -> String {
        match r {
            RepoSel::Known(i) => pick(&REPOS, *i).to_owned(),
            RepoSel::Raw(s) => s.clone(),
        }
    }

    fn digest(&self, d: &DigestSel) -> String {
        match d {
            DigestSel::Blob(i) => Digest::sha256(pick(&BLOBS, *i)).to_string(),
            DigestSel::Stored(i) if !self.blobs.is_empty() => {
                self.blobs[*i as usize % self.blobs.len()].to_string()
            }
            DigestSel::Stored(i) => Digest::sha256(&[*i]).to_string(),
            DigestSel::Manifest(i) if !self.manifests.is_empty() => self.manifests
                [*i as usize % self.manifests.len()]
            .0
            .to_string(),
            DigestSel::Manifest(i) => Digest::sha256(&[*i]).to_string(),
            DigestSel::Sha512(i) => {
                Digest::compute(registry_core::Algorithm::Sha512, pick(&BLOBS, *i)).to_string()
            }
            DigestSel::Raw(s) => s.clone(),
        }
    }

    fn session(&self, s: &SessionSel) -> Option<usize> {
        match s {
            SessionSel::Known(i) if !self.sessions.is_empty() => {
                Some(*i as usize % self.sessions.len())
            }
            _ => None,
        }
    }

    fn path(&self, p: &PathSel) -> String {
        match p {
            PathSel::Base => "/v2/".to_owned(),
            PathSel::Catalog => "/v2/_catalog".to_owned(),
            PathSel::Blob(r, d) => format!("/v2/{}/blobs/{}", self.repo(r), self.digest(d)),
            PathSel::Uploads(r) => format!("/v2/{}/blobs/uploads/", self.repo(r)),
            PathSel::Upload(r, s) => {
                let id = match (self.session(s), s) {
                    (Some(i), _) => self.sessions[i].0.clone(),
                    (None, SessionSel::Raw(raw)) => raw.clone(),
                    (None, SessionSel::Known(_)) => "0".to_owned(),
                };
                format!("/v2/{}/blobs/uploads/{id}", self.repo(r))
            }
            PathSel::Manifest(r, reference) => {
                let reference = match reference {
                    RefSel::Tag(i) => pick(&TAGS, *i).to_owned(),
                    RefSel::Digest(d) => self.digest(d),
                    RefSel::Raw(s) => s.clone(),
                };
                format!("/v2/{}/manifests/{reference}", self.repo(r))
            }
            PathSel::Tags(r) => format!("/v2/{}/tags/list", self.repo(r)),
            PathSel::Referrers(r, d) => {
                format!("/v2/{}/referrers/{}", self.repo(r), self.digest(d))
            }
            PathSel::Raw(s) => format!("/v2/{s}"),
        }
    }

    fn query_value(&self, v: &QueryVal) -> String {
        match v {
            QueryVal::Num(n) => n.to_string(),
            QueryVal::Huge => "99999999999999999999999".to_owned(),
            QueryVal::Max => u64::MAX.to_string(),
            QueryVal::Digest(d) => encode(&self.digest(d)),
            QueryVal::Repo(r) => encode(&self.repo(r)),
            QueryVal::Tag(i) => pick(&TAGS, *i).to_owned(),
            QueryVal::ContentType(i) => encode(pick(&CONTENT_TYPES, *i)),
            QueryVal::Raw(s) => encode(s),
        }
    }

    /// The body bytes and the media type that fits them.
    fn body(&self, b: &BodySel) -> (Vec<u8>, Option<&'static str>) {
        match b {
            BodySel::Empty => (Vec::new(), None),
            BodySel::Blob(i) => (pick(&BLOBS, *i).to_vec(), None),
            BodySel::Raw(v) => (v.clone(), None),
            BodySel::Manifest(ManifestSel::Image {
                config,
                layers,
                subject,
                artifact_type,
            }) => {
                let layers: Vec<&[u8]> = layers.iter().take(4).map(|l| pick(&BLOBS, *l)).collect();
                let subject = subject.and_then(|s| {
                    (!self.manifests.is_empty()).then(|| {
                        let (d, size, _) = &self.manifests[s as usize % self.manifests.len()];
                        (d, *size)
                    })
                });
                let m = testkit::image_manifest_with(
                    pick(&BLOBS, *config),
                    &layers,
                    subject,
                    artifact_type.then_some("application/vnd.example.sig"),
                );
                (m.into_bytes(), Some(media_type::OCI_MANIFEST))
            }
            BodySel::Manifest(ManifestSel::Index { children }) => {
                let children: Vec<(&Digest, u64)> = if self.manifests.is_empty() {
                    Vec::new()
                } else {
                    children
                        .iter()
                        .take(4)
                        .map(|c| {
                            let (d, size, _) = &self.manifests[*c as usize % self.manifests.len()];
                            (d, *size)
                        })
                        .collect()
                };
                let m = testkit::index_manifest(&children);
                (m.into_bytes(), Some(media_type::OCI_INDEX))
            }
        }
    }
}

/// Builds the request; `None` when the fuzzer's raw strings make no valid URI or header.
fn build(world: &World, r: &Req) -> Option<(Request<Body>, Option<usize>, u64)> {
    let method = match r.method {
        MethodSel::Get => Method::GET,
        MethodSel::Head => Method::HEAD,
        MethodSel::Put => Method::PUT,
        MethodSel::Post => Method::POST,
        MethodSel::Patch => Method::PATCH,
        MethodSel::Delete => Method::DELETE,
        MethodSel::Options => Method::OPTIONS,
    };
    let mut uri = world.path(&r.path);
    let session = match &r.path {
        PathSel::Upload(_, s) => world.session(s),
        _ => None,
    };
    for (i, (k, v)) in r.query.iter().take(6).enumerate() {
        let key = match k {
            QueryKey::N => "n".to_owned(),
            QueryKey::Last => "last".to_owned(),
            QueryKey::Digest => "digest".to_owned(),
            QueryKey::Mount => "mount".to_owned(),
            QueryKey::From => "from".to_owned(),
            QueryKey::Tag => "tag".to_owned(),
            QueryKey::ArtifactType => "artifactType".to_owned(),
            QueryKey::DigestAlgorithm => "digest-algorithm".to_owned(),
            QueryKey::Raw(s) => encode(s),
        };
        uri.push(if i == 0 { '?' } else { '&' });
        uri.push_str(&key);
        uri.push('=');
        uri.push_str(&world.query_value(v));
    }
    let (body, fitting_type) = world.body(&r.body);
    let len = body.len() as u64;
    // An HTTP/1.1 request without Host is refused before it reaches any endpoint.
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost");
    match &r.content_type {
        ContentTypeSel::None => {}
        ContentTypeSel::Auto => {
            if let Some(t) = fitting_type {
                b = b.header("content-type", t);
            }
        }
        ContentTypeSel::Known(i) => b = b.header("content-type", pick(&CONTENT_TYPES, *i)),
        ContentTypeSel::Raw(s) => b = b.header("content-type", s.as_str()),
    }
    match r.content_length {
        LenSel::None => {}
        LenSel::Exact => b = b.header("content-length", len),
        LenSel::Value(v) => b = b.header("content-length", v),
    }
    let offset = session.map_or(0, |i| world.sessions[i].1);
    match &r.content_range {
        ContentRangeSel::None => {}
        ContentRangeSel::Exact if len > 0 => {
            b = b.header(
                "content-range",
                format!("{offset}-{}", offset + len - 1).as_str(),
            )
        }
        ContentRangeSel::Exact => {}
        ContentRangeSel::Values(x, y) => b = b.header("content-range", format!("{x}-{y}")),
        ContentRangeSel::Raw(s) => b = b.header("content-range", s.as_str()),
    }
    match &r.range {
        RangeSel::None => {}
        RangeSel::FromTo(x, y) => b = b.header("range", format!("bytes={x}-{y}")),
        RangeSel::From(x) => b = b.header("range", format!("bytes={x}-")),
        RangeSel::Suffix(n) => b = b.header("range", format!("bytes=-{n}")),
        RangeSel::Raw(s) => b = b.header("range", s.as_str()),
    }
    let req = b.body(Body::from(body)).ok()?;
    Some((req, session, len))
}

/// One request of a recorded trace, as `record_trace.py` writes it.
#[derive(serde::Deserialize)]
struct TraceLine {
    method: String,
    path: String,
    query: String,
    headers: std::collections::BTreeMap<String, String>,
    body: String,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("trace body is hex"))
        .collect()
}

/// A recorded request, aimed at this registry's latest upload session.
fn replay(world: &World, line: &str) -> (Request<Body>, Option<usize>, u64) {
    let t: TraceLine = serde_json::from_str(line).expect("trace line");
    let session = (!world.sessions.is_empty()).then(|| world.sessions.len() - 1);
    let id = session.map_or("0", |i| world.sessions[i].0.as_str());
    let mut uri = t.path.replace("{upload}", id);
    if !t.query.is_empty() {
        uri = format!("{uri}?{}", t.query);
    }
    let body = unhex(&t.body);
    let len = body.len() as u64;
    let mut b = Request::builder()
        .method(t.method.as_str())
        .uri(uri.as_str())
        .header("host", "localhost");
    for (k, v) in &t.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    (
        b.body(Body::from(body)).expect("trace request"),
        session,
        len,
    )
}

/// The registry under test: defaults, or (by the input's `config` bits) tiny limits,
/// deletes switched off, read-only mode, unlimited pages, so that limit paths are
/// fuzzed too.
fn registry_for(config: u8) -> (Registry, HttpConfig) {
    let mut builder = Registry::builder(registry_core::MemoryStore::new());
    if config & 1 != 0 {
        builder = builder
            .with_max_manifest_size(700)
            .with_max_blob_size(16)
            .with_max_open_uploads(4, 2)
            .with_max_page_size(2);
    }
    if config & 8 != 0 {
        // "Unlimited" pages: the edge of every page size computation.
        builder = builder.with_max_page_size(usize::MAX);
    }
    let http = HttpConfig::default()
        .with_deletes(config & 2 == 0)
        .with_read_only(config & 4 != 0);
    (builder.build(), http)
}

async fn run(input: &Input) {
    let (registry, http) = registry_for(input.config);
    let app = registry_http::router(registry.clone(), http);
    let meta = registry.storage().metadata;
    let mut world = World::default();
    let traced = TRACES[..input.prelude as usize % (TRACES.len() + 1)]
        .iter()
        .flat_map(|t| t.lines())
        .map(Step::Trace);
    let fuzzed = input.requests.iter().take(MAX_REQUESTS).map(Step::Fuzzed);
    for step in traced.chain(fuzzed) {
        let (req, session, len) = match step {
            Step::Trace(line) => replay(&world, line),
            Step::Fuzzed(r) => match build(&world, r) {
                Some(built) => built,
                None => continue,
            },
        };
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let described = format!("{method} {}", req.uri());
        let sent_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(registry_core::manifest::essence)
            .map(str::to_owned);
        let before = meta.stats().await.expect("stats");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        if debug() {
            eprintln!("{described} -> {status}");
        }
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_else(|e| {
                // A failing full read is the "served bytes match" check doing its job
                // on corrupted storage; the in-memory store never corrupts.
                panic!("{described}: body failed: {e}")
            });
        assert!(
            !status.is_server_error(),
            "{described}: {status} for client input: {}",
            String::from_utf8_lossy(&body)
        );
        if status.is_client_error() {
            assert!(
                STATUSES.contains(&status.as_u16()),
                "{described}: status {status} is not one the spec uses"
            );
            if method != Method::HEAD {
                check_error_body(&described, &body);
            }
            let after = meta.stats().await.expect("stats");
            assert_eq!(
                before, after,
                "{described}: failed with {status} but changed metadata"
            );
            continue;
        }
        check_success(&described, &method, &path, &headers, &body, status.as_u16());
        // Track sessions and manifests so that later requests can build on them.
        if let Some(loc) = headers.get("location").and_then(|v| v.to_str().ok()) {
            if let Some((_, id)) = loc.rsplit_once("/blobs/uploads/") {
                if !world.sessions.iter().any(|(s, _)| s == id) {
                    world.sessions.push((id.to_owned(), 0));
                }
            }
        }
        if status.as_u16() == 201 && matches!(endpoint(&path), Some(("/blobs/", _))) {
            if let Some(d) = headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok())
            {
                if !world.blobs.contains(&d) {
                    world.blobs.push(d);
                }
            }
        }
        if method == Method::PATCH && status.as_u16() == 202 {
            if let Some(i) = session {
                world.sessions[i].1 += len;
            }
        }
        if method == Method::PUT
            && status.as_u16() == 201
            && matches!(endpoint(&path), Some(("/manifests/", _)))
        {
            let d = headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok())
                .expect("201 manifest PUT carries Docker-Content-Digest");
            let mt = match sent_type.as_deref() {
                Some(media_type::OCI_INDEX) => media_type::OCI_INDEX,
                _ => media_type::OCI_MANIFEST,
            };
            if !world.manifests.iter().any(|(m, _, _)| *m == d) {
                world.manifests.push((d, len, mt));
            }
        }
    }
    let audit = meta.audit(false).await.expect("audit");
    assert!(
        audit.problems.is_empty(),
        "audit found drift: {:?}",
        audit.problems
    );
    testkit::assert_cleans_up(&registry).await;
}

fn check_error_body(described: &str, body: &[u8]) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{described}: error body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    let errors = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{described}: no errors array: {v}"));
    assert!(!errors.is_empty(), "{described}: empty errors array");
    for e in errors {
        let code = e["code"].as_str().unwrap_or_default();
        assert!(
            CODES.contains(&code),
            "{described}: code {code:?} is not in the spec"
        );
        assert!(e["message"].is_string(), "{described}: no message: {e}");
    }
}

fn check_success(
    described: &str,
    method: &Method,
    path: &str,
    headers: &axum::http::HeaderMap,
    body: &Bytes,
    status: u16,
) {
    let endpoint = endpoint(path);
    let content = matches!(endpoint, Some(("/blobs/", t)) if t.starts_with("sha"))
        || matches!(endpoint, Some(("/manifests/", _)));
    if (method == Method::GET || method == Method::HEAD) && content && status / 100 == 2 {
        assert!(
            headers.contains_key("docker-content-digest"),
            "{described}: no Docker-Content-Digest"
        );
        assert!(
            headers.contains_key("content-length"),
            "{described}: no Content-Length"
        );
    }
    if method == Method::HEAD {
        assert!(body.is_empty(), "{described}: HEAD answered with a body");
    }
    if status == 202 && path.contains("/blobs/uploads/") && method != Method::DELETE {
        assert!(
            headers.contains_key("location"),
            "{described}: 202 without Location"
        );
    }
    if method != Method::GET || status != 200 {
        return;
    }
    if let Some(("/blobs/", d)) = endpoint {
        if let Ok(d) = Digest::parse(d) {
            assert!(
                d.verify(body),
                "{described}: served bytes do not hash to {d}"
            );
        }
    }
    if let Some(("/manifests/", r)) = endpoint {
        let d = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok())
            .unwrap_or_else(|| panic!("{described}: no Docker-Content-Digest"));
        assert!(
            d.verify(body),
            "{described}: manifest bytes do not hash to {d}"
        );
        if let Ok(asked) = Digest::parse(r) {
            assert_eq!(asked, d, "{described}: served another manifest");
        }
    }
}

/// The endpoint a path names, as the router reads it: the last of the markers (names
/// may contain the markers' words), with what follows it; `None` for tag lists and
/// anything else.
fn endpoint(path: &str) -> Option<(&'static str, &str)> {
    if path.ends_with("/tags/list") {
        return None;
    }
    ["/blobs/", "/manifests/", "/referrers/"]
        .into_iter()
        .filter_map(|m| path.rfind(m).map(|i| (i, m)))
        .max_by_key(|(i, _)| *i)
        .map(|(i, m)| (m, &path[i + m.len()..]))
}

/// An input: how many recorded traces to replay first, then fuzzed requests.
#[derive(Arbitrary, Debug)]
struct Input {
    prelude: u8,
    config: u8,
    requests: Vec<Req>,
}

enum Step<'a> {
    Trace(&'a str),
    Fuzzed(&'a Req),
}

/// `HTTP_ROUTER_DEBUG=1` prints every exchange (for reading a crash or a seed).
fn debug() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HTTP_ROUTER_DEBUG").is_some())
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fuzz_target!(|input: Input| {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime")
        });
        rt.block_on(run(&input));
    });
});
