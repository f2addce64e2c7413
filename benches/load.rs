//! `load`: an HTTP load generator for OCI registries, loopback only.
//!
//! `benches/compare.sh` runs it against our `serve` example and against CNCF
//! Distribution; `benches/README.md` describes the workloads. Each invocation runs
//! one workload and prints one JSON object on stdout (ops, requests, bytes, seconds,
//! MB/s with MB = 10^6 bytes, ops/s, p50/p99 latency in ms, errors with samples).
//!
//! Blob content is generated deterministically from `--seed`, the blob's index and
//! its size with a counter-based PRNG (splitmix64), so a later `pull` invocation
//! with the same flags knows the digests of what an earlier `push-mono` stored, and
//! every blob is distinct and incompressible. Every loop is bounded in count and in
//! time (`--max-seconds`, `--request-timeout`).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";
/// Size of the pieces a generated (not pre-generated) body is produced in.
const PIECE: usize = 256 << 10;
/// How many error descriptions a report keeps.
const MAX_SAMPLES: usize = 8;

#[derive(Parser, Debug)]
#[command(about = "HTTP load generator for OCI registries (loopback only)")]
struct Args {
    /// Base URL of the registry: http://127.0.0.1:PORT (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:5000")]
    url: String,
    /// The workload to run.
    #[arg(long, value_enum)]
    workload: Workload,
    /// Name printed in the JSON (default: the workload's).
    #[arg(long)]
    name: Option<String>,
    /// Repository (for ci-mix: prefix of the repositories).
    #[arg(long, default_value = "bench/blobs")]
    repo: String,
    /// Blob size (push/pull) or bytes to copy (tcp-baseline); suffixes K, M, G (binary).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    size: u64,
    /// PATCH chunk size for push-chunked (a multiple of 8).
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    chunk: u64,
    /// Number of operations (blobs, manifests, requests, images).
    #[arg(long, default_value_t = 100)]
    count: u64,
    /// Concurrent operations (one keep-alive connection each).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Seed of the generated content; push and pull of the same blobs share it.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop starting new operations after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    max_seconds: f64,
    /// Give up on one request (and its body) after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    request_timeout: f64,
    /// Do not hash pulled blobs and manifests (and tcp-baseline: do not hash).
    #[arg(long)]
    no_verify: bool,
    /// Keep push bodies in memory when count x size is at most this (else generate
    /// them while sending).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pregen_limit: u64,
    /// tag-list: how many tags the list must hold (0: do not check).
    #[arg(long, default_value_t = 0)]
    tags: u64,
    /// Manifest workloads: index of the first manifest (manifest i is tagged
    /// `t` + i, zero-padded to 5 digits); the flatness mode of compare.sh puts and reads
    /// the manifests of one store in slices.
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Manifest GET/HEAD workloads: when positive, op i reads a manifest picked
    /// pseudo-randomly (from --seed and i) among `--offset .. --offset + --spread`
    /// instead of manifest `--offset + i`: reads spread over a large store.
    #[arg(long, default_value_t = 0)]
    spread: u64,
    /// ci-mix: number of repositories the images are spread over.
    #[arg(long, default_value_t = 10)]
    repos: u64,
    /// wait-ready: when the server was started, in seconds since the epoch (bash's
    /// $EPOCHREALTIME); the report gives the time from then to the first 200.
    #[arg(long)]
    since: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// POST an upload, then PUT ?digest= with the whole blob.
    PushMono,
    /// POST, PATCH chunks (Content-Range, Content-Length), then PUT ?digest=.
    PushChunked,
    /// GET blobs pushed with the same --seed/--size/--count/--repo, digests verified.
    Pull,
    /// Push a config and a layer, then PUT --count manifests, each with a tag.
    ManifestPut,
    /// GET the manifests of manifest-put by tag.
    ManifestGetTag,
    /// GET the manifests of manifest-put by digest.
    ManifestGetDigest,
    /// HEAD the manifests of manifest-put by tag.
    ManifestHead,
    /// GET the tag list --count times (following Link pages).
    TagList,
    /// --count images of 5 layers sharing base layers across --repos repositories:
    /// HEAD each blob, mount across repositories, upload, PUT the manifest.
    CiMix,
    /// One loopback TCP stream copying --size bytes (no HTTP, no registry).
    TcpBaseline,
    /// Poll GET /v2/ until it answers 200; report the time since --since.
    WaitReady,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?} (examples: 4096, 512K, 64M, 1G)"))
}

// ---------------------------------------------------------------- content

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Bytes `off..off + buf.len()` of the stream named `key`; `off` is a multiple of 8.
fn fill(key: u64, off: u64, buf: &mut [u8]) {
    debug_assert_eq!(off % 8, 0);
    let mut k = off / 8;
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&mix(key.wrapping_add(k.wrapping_mul(GOLDEN))).to_le_bytes());
        k += 1;
    }
    let rest = words.into_remainder();
    if !rest.is_empty() {
        let w = mix(key.wrapping_add(k.wrapping_mul(GOLDEN))).to_le_bytes();
        rest.copy_from_slice(&w[..rest.len()]);
    }
}

fn blob_key(seed: u64, index: u64, size: u64) -> u64 {
    mix(mix(seed ^ 0x0B10_B5EE_D000_0000).wrapping_add(index) ^ size.rotate_left(29))
}

fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[usize::from(b >> 4)] as char);
        s.push(H[usize::from(b & 15)] as char);
    }
    s
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// A blob: generated from `key` (or given bytes), with its digest.
struct Blob {
    key: u64,
    size: u64,
    digest: String,
    /// The content, when kept in memory.
    data: Option<Bytes>,
}

impl Blob {
    fn generated(key: u64, size: u64, keep: bool) -> Blob {
        if keep {
            let mut v = vec![0u8; size as usize];
            fill(key, 0, &mut v);
            let digest = sha256_digest(&v);
            return Blob {
                key,
                size,
                digest,
                data: Some(Bytes::from(v)),
            };
        }
        let mut h = Sha256::new();
        let mut buf = vec![0u8; PIECE];
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(PIECE as u64) as usize;
            fill(key, off, &mut buf[..n]);
            h.update(&buf[..n]);
            off += n as u64;
        }
        Blob {
            key,
            size,
            digest: format!("sha256:{}", hex(&h.finalize())),
            data: None,
        }
    }

    fn from_bytes(data: Vec<u8>) -> Blob {
        Blob {
            key: 0,
            size: data.len() as u64,
            digest: sha256_digest(&data),
            data: Some(Bytes::from(data)),
        }
    }

    /// The bytes `off..off + len` as a request body.
    fn body(&self, off: u64, len: u64) -> ReqBody {
        match &self.data {
            Some(d) => full(d.slice(off as usize..(off + len) as usize)),
            None => GenBody {
                key: self.key,
                pos: off,
                end: off + len,
            }
            .boxed(),
        }
    }
}

/// `count` blobs of `size` bytes, generated and hashed on all cores.
fn make_blobs(seed: u64, count: u64, size: u64, keep: bool) -> Vec<Arc<Blob>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mut out: Vec<Option<Arc<Blob>>> = (0..count).map(|_| None).collect();
    std::thread::scope(|s| {
        let per = count.div_ceil(threads.max(1)).max(1) as usize;
        for (t, slot) in out.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (j, b) in slot.iter_mut().enumerate() {
                    let i = (t * per + j) as u64;
                    *b = Some(Arc::new(Blob::generated(
                        blob_key(seed, i, size),
                        size,
                        keep,
                    )));
                }
            });
        }
    });
    out.into_iter().map(|b| b.expect("generated")).collect()
}

type ReqBody = BoxBody<Bytes, Infallible>;

fn full(b: Bytes) -> ReqBody {
    Full::new(b).boxed()
}

fn empty() -> ReqBody {
    full(Bytes::new())
}

/// A body produced piece by piece from the PRNG while it is sent.
struct GenBody {
    key: u64,
    pos: u64,
    end: u64,
}

impl Body for GenBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        let n = (this.end - this.pos).min(PIECE as u64) as usize;
        let mut v = vec![0u8; n];
        fill(this.key, this.pos, &mut v);
        this.pos += n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(v)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.pos)
    }
}

// ---------------------------------------------------------------- HTTP

/// Shared client state and counters.
struct Ctx {
    client: Client<HttpConnector, ReqBody>,
    base: String,
    timeout: Duration,
    verify: bool,
    requests: AtomicU64,
    warnings: AtomicU64,
    samples: Mutex<Vec<String>>,
    warning_samples: Mutex<Vec<String>>,
}

type Headers<'a> = &'a [(&'a str, &'a str)];

impl Ctx {
    fn new(base: String, timeout: Duration, verify: bool) -> Ctx {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        Ctx {
            client,
            base,
            timeout,
            verify,
            requests: AtomicU64::new(0),
            warnings: AtomicU64::new(0),
            samples: Mutex::new(Vec::new()),
            warning_samples: Mutex::new(Vec::new()),
        }
    }

    fn record_error(&self, e: String) {
        let mut s = self.samples.lock().expect("samples");
        if s.len() < MAX_SAMPLES {
            s.push(e);
        }
    }

    fn warn(&self, w: String) {
        self.warnings.fetch_add(1, Relaxed);
        let mut s = self.warning_samples.lock().expect("warnings");
        if s.len() < MAX_SAMPLES && !s.contains(&w) {
            s.push(w);
        }
    }

    async fn send(
        &self,
        method: &Method,
        path: &str,
        headers: Headers<'_>,
        body: ReqBody,
    ) -> Result<Response<Incoming>, String> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(format!("{}{}", self.base, path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(body)
            .map_err(|e| format!("{method} {path}: cannot build the request: {e}"))?;
        self.requests.fetch_add(1, Relaxed);
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Err(format!(
                "{method} {path}: no response in {:?}",
                self.timeout
            )),
            Ok(Err(e)) => Err(format!("{method} {path}: {e} ({e:?})")),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Sends, and requires the status `want`; else describes the exchange.
    async fn expect(
        &self,
        method: &Method,
        path: &str,
        headers: Headers<'_>,
        body: ReqBody,
        want: StatusCode,
    ) -> Result<Response<Incoming>, String> {
        let resp = self.send(method, path, headers, body).await?;
        if resp.status() == want {
            return Ok(resp);
        }
        Err(describe(method, path, headers, resp, &format!("wanted {want}")).await)
    }

    /// The whole body, within the request timeout.
    async fn read(&self, resp: Response<Incoming>, what: &str) -> Result<Bytes, String> {
        match tokio::time::timeout(self.timeout, resp.into_body().collect()).await {
            Err(_) => Err(format!("{what}: body not read in {:?}", self.timeout)),
            Ok(Err(e)) => Err(format!("{what}: reading the body: {e}")),
            Ok(Ok(c)) => Ok(c.to_bytes()),
        }
    }

    /// Streams the body through, hashing it when verifying; returns its length and
    /// digest (empty when not verifying).
    async fn stream(&self, resp: Response<Incoming>, what: &str) -> Result<(u64, String), String> {
        let verify = self.verify;
        let mut body = resp.into_body();
        let work = async move {
            let mut h = verify.then(Sha256::new);
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("{what}: reading the body: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    n += data.len() as u64;
                    if let Some(h) = h.as_mut() {
                        h.update(&data);
                    }
                }
            }
            Ok((
                n,
                h.map(|h| format!("sha256:{}", hex(&h.finalize())))
                    .unwrap_or_default(),
            ))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Err(_) => Err(format!("{what}: body not read in {:?}", self.timeout)),
            Ok(r) => r,
        }
    }

    /// Reads and drops a (small) body so that the connection goes back to the pool.
    async fn drain(&self, resp: Response<Incoming>, what: &str) -> Result<(), String> {
        self.read(resp, what).await.map(drop)
    }

    /// Checks `Docker-Content-Digest`: a wrong one is an error, a missing one a warning.
    fn check_digest(
        &self,
        resp: &Response<Incoming>,
        want: &str,
        what: &str,
    ) -> Result<(), String> {
        match resp.headers().get("docker-content-digest") {
            None => {
                self.warn(format!("{what}: no Docker-Content-Digest"));
                Ok(())
            }
            Some(v) if v.as_bytes() == want.as_bytes() => Ok(()),
            Some(v) => Err(format!(
                "{what} -> {}: Docker-Content-Digest {v:?}, wanted {want}",
                resp.status()
            )),
        }
    }
}

fn fmt_headers(h: &hyper::HeaderMap) -> String {
    h.iter()
        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One line telling the request and the unexpected response (status, headers, body).
async fn describe(
    method: &Method,
    path: &str,
    req_headers: Headers<'_>,
    resp: Response<Incoming>,
    why: &str,
) -> String {
    let status = resp.status();
    let headers = fmt_headers(resp.headers());
    let body = match tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await
    {
        Ok(Ok(c)) => {
            let b = c.to_bytes();
            let cut = b.len().min(600);
            String::from_utf8_lossy(&b[..cut]).into_owned()
        }
        Ok(Err(e)) => format!("<error reading body: {e}>"),
        Err(_) => "<body not read in 5 s>".to_owned(),
    };
    let rh = req_headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ");
    format!("{method} {path} [{rh}] -> {status} ({why}); headers [{headers}]; body {body:?}")
}

/// The path (and query) of a `Location`, absolute or relative; the host is ignored so
/// that traffic stays on the loopback address given by --url.
fn location(resp: &Response<Incoming>, what: &str) -> Result<String, String> {
    let loc = resp
        .headers()
        .get("location")
        .ok_or_else(|| format!("{what} -> {}: no Location", resp.status()))?
        .to_str()
        .map_err(|_| format!("{what}: Location is not text"))?;
    if loc.starts_with('/') {
        return Ok(loc.to_owned());
    }
    for scheme in ["http://", "https://"] {
        if let Some(rest) = loc.strip_prefix(scheme) {
            return Ok(rest
                .find('/')
                .map_or("/".to_owned(), |i| rest[i..].to_owned()));
        }
    }
    Err(format!("{what}: cannot use Location {loc:?}"))
}

fn with_query(loc: &str, kv: &str) -> String {
    if loc.contains('?') {
        format!("{loc}&{kv}")
    } else {
        format!("{loc}?{kv}")
    }
}

// ---------------------------------------------------------------- operations

/// POST an upload session; its Location.
async fn start_upload(ctx: &Ctx, repo: &str) -> Result<String, String> {
    let path = format!("/v2/{repo}/blobs/uploads/");
    let r = ctx
        .expect(
            &Method::POST,
            &path,
            &[("content-length", "0")],
            empty(),
            StatusCode::ACCEPTED,
        )
        .await?;
    let loc = location(&r, &format!("POST {path}"))?;
    ctx.drain(r, &path).await?;
    Ok(loc)
}

/// PUT the whole blob to an upload session's Location.
async fn finish_upload(ctx: &Ctx, loc: &str, blob: &Blob) -> Result<u64, String> {
    let path = with_query(loc, &format!("digest={}", blob.digest));
    let len = blob.size.to_string();
    let r = ctx
        .expect(
            &Method::PUT,
            &path,
            &[
                ("content-type", "application/octet-stream"),
                ("content-length", &len),
            ],
            blob.body(0, blob.size),
            StatusCode::CREATED,
        )
        .await?;
    ctx.check_digest(&r, &blob.digest, &format!("PUT {path}"))?;
    ctx.drain(r, &path).await?;
    Ok(blob.size)
}

async fn push_mono(ctx: &Ctx, repo: &str, blob: &Blob) -> Result<u64, String> {
    let loc = start_upload(ctx, repo).await?;
    finish_upload(ctx, &loc, blob).await
}

async fn push_chunked(ctx: &Ctx, repo: &str, blob: &Blob, chunk: u64) -> Result<u64, String> {
    let mut loc = start_upload(ctx, repo).await?;
    let mut off = 0u64;
    while off < blob.size {
        let len = chunk.min(blob.size - off);
        let range = format!("{}-{}", off, off + len - 1);
        let cl = len.to_string();
        let headers = [
            ("content-type", "application/octet-stream"),
            ("content-range", range.as_str()),
            ("content-length", cl.as_str()),
        ];
        let r = ctx
            .expect(
                &Method::PATCH,
                &loc,
                &headers,
                blob.body(off, len),
                StatusCode::ACCEPTED,
            )
            .await?;
        let what = format!("PATCH {loc} ({range})");
        let want_range = format!("0-{}", off + len - 1);
        match r.headers().get("range") {
            Some(v) if v.as_bytes() == want_range.as_bytes() => {}
            other => ctx.warn(format!("{what}: Range {other:?}, wanted {want_range}")),
        }
        let next = location(&r, &what)?;
        ctx.drain(r, &what).await?;
        loc = next;
        off += len;
    }
    let path = with_query(&loc, &format!("digest={}", blob.digest));
    let r = ctx
        .expect(
            &Method::PUT,
            &path,
            &[("content-length", "0")],
            empty(),
            StatusCode::CREATED,
        )
        .await?;
    ctx.check_digest(&r, &blob.digest, &format!("PUT {path}"))?;
    ctx.drain(r, &path).await?;
    Ok(blob.size)
}

async fn pull(ctx: &Ctx, repo: &str, blob: &Blob) -> Result<u64, String> {
    let path = format!("/v2/{repo}/blobs/{}", blob.digest);
    let r = ctx
        .expect(&Method::GET, &path, &[], empty(), StatusCode::OK)
        .await?;
    let what = format!("GET {path}");
    let (n, digest) = ctx.stream(r, &what).await?;
    if n != blob.size {
        return Err(format!("{what}: {n} bytes, wanted {}", blob.size));
    }
    if ctx.verify && digest != blob.digest {
        return Err(format!("{what}: content hashes to {digest}"));
    }
    Ok(n)
}

/// HEAD the blob; push it when missing. Not timed (setup).
async fn ensure_blob(ctx: &Ctx, repo: &str, blob: &Blob) -> Result<(), String> {
    let path = format!("/v2/{repo}/blobs/{}", blob.digest);
    let r = ctx.send(&Method::HEAD, &path, &[], empty()).await?;
    match r.status() {
        StatusCode::OK => ctx.drain(r, &path).await,
        StatusCode::NOT_FOUND => {
            ctx.drain(r, &path).await?;
            push_mono(ctx, repo, blob).await.map(drop)
        }
        _ => Err(describe(&Method::HEAD, &path, &[], r, "wanted 200 or 404").await),
    }
}

/// An OCI image manifest, serialized (keys sorted, so deterministic).
fn image_manifest(config: &Blob, layers: &[&Blob], annotation: &str) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|l| json!({"mediaType": OCI_LAYER, "digest": l.digest, "size": l.size}))
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
        "layers": layers,
        "annotations": {"org.example.bench": annotation},
    }))
    .expect("manifest serializes")
}

fn config_blob(label: &str, layers: &[&Blob]) -> Blob {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    Blob::from_bytes(
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"bench": label}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("config serializes"),
    )
}

/// The manifests of the manifest workloads: one config and one layer; manifest i
/// differs from the others by an annotation and is tagged `t00000`... (`t` and i,
/// zero-padded to 5 digits).
struct ManifestSet {
    config: Blob,
    layer: Blob,
    items: Vec<(String, Bytes, String)>,
}

/// Manifests `offset..offset + count`, or with `spread > 0`, `count` manifests picked
/// pseudo-randomly among `offset..offset + spread` (repeats allowed).
fn manifest_set(seed: u64, count: u64, offset: u64, spread: u64) -> ManifestSet {
    let layer = Blob::generated(blob_key(seed, u64::MAX, 4096), 4096, true);
    let config = config_blob(&format!("manifests-{seed}"), &[&layer]);
    let items = (0..count)
        .map(|j| {
            let i = if spread > 0 {
                offset + mix(seed ^ 0x5EED_5EED ^ j.wrapping_mul(GOLDEN)) % spread
            } else {
                offset + j
            };
            let m = image_manifest(&config, &[&layer], &format!("{seed}-{i}"));
            let d = sha256_digest(&m);
            (format!("t{i:05}"), Bytes::from(m), d)
        })
        .collect();
    ManifestSet {
        config,
        layer,
        items,
    }
}

async fn put_manifest(
    ctx: &Ctx,
    repo: &str,
    tag: &str,
    body: &Bytes,
    digest: &str,
) -> Result<u64, String> {
    let path = format!("/v2/{repo}/manifests/{tag}");
    let len = body.len().to_string();
    let r = ctx
        .expect(
            &Method::PUT,
            &path,
            &[("content-type", OCI_MANIFEST), ("content-length", &len)],
            full(body.clone()),
            StatusCode::CREATED,
        )
        .await?;
    ctx.check_digest(&r, digest, &format!("PUT {path}"))?;
    ctx.drain(r, &path).await?;
    Ok(body.len() as u64)
}

async fn get_manifest(
    ctx: &Ctx,
    repo: &str,
    reference: &str,
    digest: &str,
    len: usize,
) -> Result<u64, String> {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let r = ctx
        .expect(
            &Method::GET,
            &path,
            &[("accept", ACCEPT_MANIFESTS)],
            empty(),
            StatusCode::OK,
        )
        .await?;
    let what = format!("GET {path}");
    ctx.check_digest(&r, digest, &what)?;
    let body = ctx.read(r, &what).await?;
    if body.len() != len {
        return Err(format!("{what}: {} bytes, wanted {len}", body.len()));
    }
    if ctx.verify && sha256_digest(&body) != digest {
        return Err(format!("{what}: content does not hash to {digest}"));
    }
    Ok(body.len() as u64)
}

async fn head_manifest(
    ctx: &Ctx,
    repo: &str,
    reference: &str,
    digest: &str,
    len: usize,
) -> Result<u64, String> {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let r = ctx
        .expect(
            &Method::HEAD,
            &path,
            &[("accept", ACCEPT_MANIFESTS)],
            empty(),
            StatusCode::OK,
        )
        .await?;
    let what = format!("HEAD {path}");
    ctx.check_digest(&r, digest, &what)?;
    let cl = r
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if cl != Some(len) {
        ctx.warn(format!("{what}: Content-Length {cl:?}, wanted {len}"));
    }
    ctx.drain(r, &what).await?;
    Ok(0)
}

/// GET the whole tag list, following `Link` (at most 10,000 pages); the number of tags.
async fn tag_list(ctx: &Ctx, repo: &str, want: u64) -> Result<u64, String> {
    let mut path = format!("/v2/{repo}/tags/list");
    let mut tags = 0u64;
    let mut bytes = 0u64;
    for _ in 0..10_000 {
        let r = ctx
            .expect(&Method::GET, &path, &[], empty(), StatusCode::OK)
            .await?;
        let what = format!("GET {path}");
        let next = r
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Some(v[v.find('<')? + 1..v.find('>')?].to_owned()));
        let body = ctx.read(r, &what).await?;
        bytes += body.len() as u64;
        // Borrowed from the body, no value per tag: the client's own cost per listing
        // is paid for every server alike and would otherwise cap the ratio.
        #[derive(serde::Deserialize)]
        struct TagList<'a> {
            #[serde(borrow, default)]
            tags: Option<Vec<std::borrow::Cow<'a, str>>>,
        }
        let list: TagList =
            serde_json::from_slice(&body).map_err(|e| format!("{what}: bad JSON: {e}"))?;
        tags += list.tags.map_or(0, |t| t.len() as u64);
        match next {
            Some(n) if n.starts_with('/') => path = n,
            Some(n) => return Err(format!("{what}: cannot follow Link {n:?}")),
            None => {
                if want > 0 && tags != want {
                    return Err(format!("{what}: {tags} tags, wanted {want}"));
                }
                return Ok(bytes);
            }
        }
    }
    Err(format!("GET /v2/{repo}/tags/list: more than 10,000 pages"))
}

// ---------------------------------------------------------------- CI mix

/// An image of the CI mix: its repository, tag, blobs (layers, then config), manifest.
struct CiImage {
    repo: String,
    tag: String,
    blobs: Vec<Arc<Blob>>,
    manifest: Bytes,
    digest: String,
}

/// What the CI mix did, blob by blob.
#[derive(Default)]
struct CiCounters {
    head_hits: AtomicU64,
    mounts: AtomicU64,
    mount_fallbacks: AtomicU64,
    uploads: AtomicU64,
}

/// Images `0..images` spread over `repos` repositories; layers: one of 2 OS bases
/// (8 MiB), one of 3 runtimes (4 MiB), the repository's dependencies (2 MiB), the
/// image's own code (256 KiB) and metadata (16 KiB), plus its config.
fn ci_images(prefix: &str, seed: u64, images: u64, repos: u64) -> Vec<CiImage> {
    let pool = |kind: u64, n: u64, size: u64| -> Vec<Arc<Blob>> {
        (0..n)
            .map(|i| {
                Arc::new(Blob::generated(
                    blob_key(seed ^ kind.wrapping_mul(GOLDEN), i, size),
                    size,
                    true,
                ))
            })
            .collect()
    };
    let os = pool(1, 2, 8 << 20);
    let runtime = pool(2, 3, 4 << 20);
    let deps = pool(3, repos, 2 << 20);
    let code = pool(4, images, 256 << 10);
    let meta = pool(5, images, 16 << 10);
    (0..images)
        .map(|i| {
            let r = i % repos;
            let layers = [
                os[(i % 2) as usize].clone(),
                runtime[(i % 3) as usize].clone(),
                deps[r as usize].clone(),
                code[i as usize].clone(),
                meta[i as usize].clone(),
            ];
            let refs: Vec<&Blob> = layers.iter().map(|b| b.as_ref()).collect();
            let config = config_blob(&format!("ci-{seed}-{i}"), &refs);
            let manifest = image_manifest(&config, &refs, &format!("ci-{seed}-{i}"));
            let mut blobs = layers.to_vec();
            blobs.push(Arc::new(config));
            CiImage {
                repo: format!("{prefix}/app{r}"),
                tag: format!("build{i}"),
                blobs,
                digest: sha256_digest(&manifest),
                manifest: Bytes::from(manifest),
            }
        })
        .collect()
}

/// HEAD; if missing, mount from a repository known to hold it, else (or on 202)
/// upload. The bytes uploaded.
async fn ci_blob(
    ctx: &Ctx,
    repo: &str,
    blob: &Blob,
    known: &Mutex<HashMap<String, String>>,
    n: &CiCounters,
) -> Result<u64, String> {
    let path = format!("/v2/{repo}/blobs/{}", blob.digest);
    let r = ctx.send(&Method::HEAD, &path, &[], empty()).await?;
    match r.status() {
        StatusCode::OK => {
            ctx.drain(r, &path).await?;
            n.head_hits.fetch_add(1, Relaxed);
            return Ok(0);
        }
        StatusCode::NOT_FOUND => ctx.drain(r, &path).await?,
        _ => return Err(describe(&Method::HEAD, &path, &[], r, "wanted 200 or 404").await),
    }
    let from = known
        .lock()
        .expect("known")
        .get(&blob.digest)
        .filter(|r| r.as_str() != repo)
        .cloned();
    let loc = match from {
        None => start_upload(ctx, repo).await?,
        Some(from) => {
            let path = format!(
                "/v2/{repo}/blobs/uploads/?mount={}&from={from}",
                blob.digest
            );
            let r = ctx
                .send(&Method::POST, &path, &[("content-length", "0")], empty())
                .await?;
            let what = format!("POST {path}");
            match r.status() {
                StatusCode::CREATED => {
                    ctx.drain(r, &what).await?;
                    n.mounts.fetch_add(1, Relaxed);
                    return Ok(0);
                }
                StatusCode::ACCEPTED => {
                    let loc = location(&r, &what)?;
                    ctx.drain(r, &what).await?;
                    n.mount_fallbacks.fetch_add(1, Relaxed);
                    loc
                }
                _ => {
                    let hs = [("content-length", "0")];
                    return Err(describe(&Method::POST, &path, &hs, r, "wanted 201 or 202").await);
                }
            }
        }
    };
    let sent = finish_upload(ctx, &loc, blob).await?;
    n.uploads.fetch_add(1, Relaxed);
    known
        .lock()
        .expect("known")
        .insert(blob.digest.clone(), repo.to_owned());
    Ok(sent)
}

async fn ci_push(
    ctx: &Ctx,
    img: &CiImage,
    known: &Mutex<HashMap<String, String>>,
    n: &CiCounters,
) -> Result<u64, String> {
    let mut sent = 0;
    for b in &img.blobs {
        sent += ci_blob(ctx, &img.repo, b, known, n).await?;
    }
    sent += put_manifest(ctx, &img.repo, &img.tag, &img.manifest, &img.digest).await?;
    Ok(sent)
}

// ---------------------------------------------------------------- driver

/// What a workload did.
#[derive(Default)]
struct Outcome {
    ops: u64,
    errors: u64,
    bytes: u64,
    seconds: f64,
    lat_ms: Vec<f64>,
    timed_out: bool,
}

/// Runs `op(0..count)` on `concurrency` tasks, stopping new operations at `deadline`.
async fn run_ops<F, Fut>(
    ctx: &Arc<Ctx>,
    count: u64,
    concurrency: usize,
    max: Duration,
    op: F,
) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64, String>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + max;
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (op, next, ctx) = (op.clone(), next.clone(), ctx.clone());
            tokio::spawn(async move {
                let mut o = Outcome::default();
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= count {
                        break;
                    }
                    if Instant::now() >= deadline {
                        o.timed_out = true;
                        break;
                    }
                    let t = Instant::now();
                    match op(i).await {
                        Ok(b) => {
                            o.ops += 1;
                            o.bytes += b;
                            o.lat_ms.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        Err(e) => {
                            o.errors += 1;
                            ctx.record_error(e);
                        }
                    }
                }
                o
            })
        })
        .collect();
    let mut all = Outcome::default();
    for t in tasks {
        match t.await {
            Ok(o) => {
                all.ops += o.ops;
                all.errors += o.errors;
                all.bytes += o.bytes;
                all.lat_ms.extend(o.lat_ms);
                all.timed_out |= o.timed_out;
            }
            Err(e) => {
                all.errors += 1;
                ctx.record_error(format!("task failed: {e}"));
            }
        }
    }
    all.seconds = start.elapsed().as_secs_f64();
    all
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn report(name: &str, args: &Args, o: &mut Outcome, ctx: Option<&Ctx>, extra: Value) -> Value {
    o.lat_ms.sort_by(f64::total_cmp);
    let secs = o.seconds.max(1e-9);
    let requests = ctx.map_or(o.ops, |c| c.requests.load(Relaxed));
    let mut v = json!({
        "workload": name,
        "kind": args.workload.to_possible_value().map(|p| p.get_name().to_owned()),
        "ops": o.ops,
        "requests": requests,
        "bytes": o.bytes,
        "seconds": round3(o.seconds),
        "mb_per_s": round3(o.bytes as f64 / secs / 1e6),
        "ops_per_s": round3(o.ops as f64 / secs),
        "req_per_s": round3(requests as f64 / secs),
        "p50_ms": round3(percentile(&o.lat_ms, 0.50)),
        "p99_ms": round3(percentile(&o.lat_ms, 0.99)),
        "max_ms": round3(o.lat_ms.last().copied().unwrap_or(0.0)),
        "errors": o.errors,
        "timed_out": o.timed_out,
        "count": args.count,
        "offset": args.offset,
        "spread": args.spread,
        "concurrency": args.concurrency,
        "size": args.size,
        "verified": !args.no_verify,
    });
    if let Some(c) = ctx {
        v["error_samples"] = json!(*c.samples.lock().expect("samples"));
        v["warnings"] = json!(c.warnings.load(Relaxed));
        v["warning_samples"] = json!(*c.warning_samples.lock().expect("warnings"));
    }
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

/// Checks that --url is plain HTTP on a loopback address; the base without a slash.
fn loopback_base(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url {url:?}: only http:// is supported"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rfind(':') {
        Some(i) if !authority.ends_with(']') => &authority[..i],
        _ => authority,
    };
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        return Err(format!("--url {url:?}: traffic must stay on 127.0.0.1"));
    }
    Ok((format!("http://{authority}"), authority.to_owned()))
}

/// One TCP stream over loopback: a thread writes `size` bytes, this one reads them.
fn tcp_baseline(args: &Args) -> Result<Outcome, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let size = args.size;
    let mut block = vec![0u8; 1 << 20];
    fill(blob_key(args.seed, 0, 1 << 20), 0, &mut block);
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            s.write_all(&block[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let deadline = Instant::now() + Duration::from_secs_f64(args.max_seconds);
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs_f64(args.request_timeout)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 << 10];
    let mut h = (!args.no_verify).then(Sha256::new);
    let mut got = 0u64;
    let mut o = Outcome::default();
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if let Some(h) = h.as_mut() {
            h.update(&buf[..n]);
        }
        got += n as u64;
        if Instant::now() >= deadline {
            o.timed_out = true;
            break;
        }
    }
    o.seconds = start.elapsed().as_secs_f64();
    let _digest = h.map(|h| h.finalize());
    drop(s);
    let _ = writer.join();
    o.ops = 1;
    o.bytes = got;
    o.lat_ms.push(o.seconds * 1e3);
    if got != size && !o.timed_out {
        o.errors = 1;
    }
    Ok(o)
}

/// Polls `GET /v2/` every millisecond until it answers 200.
fn wait_ready(args: &Args, authority: &str) -> Result<Value, String> {
    let now_epoch = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let since = args.since.unwrap_or_else(now_epoch);
    let deadline = Instant::now() + Duration::from_secs_f64(args.max_seconds);
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    let mut attempts = 0u64;
    let mut last = String::from("never tried");
    while Instant::now() < deadline {
        attempts += 1;
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(authority)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(request.as_bytes())?;
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                let k = s.read(&mut buf[n..])?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })();
        match attempt {
            Ok(line) if line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200") => {
                let ms = (now_epoch() - since) * 1e3;
                return Ok(
                    json!({"workload": "ready", "ready_ms": round3(ms), "attempts": attempts}),
                );
            }
            Ok(line) => last = format!("answered {line:?}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Err(format!("not ready after {} s: {last}", args.max_seconds))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<Value, String> {
    let name = args
        .name
        .clone()
        .or_else(|| {
            args.workload
                .to_possible_value()
                .map(|p| p.get_name().to_owned())
        })
        .unwrap_or_default();
    let (base, authority) = loopback_base(&args.url)?;
    if args.max_seconds <= 0.0 || args.request_timeout <= 0.0 {
        return Err("--max-seconds and --request-timeout must be positive".into());
    }
    match args.workload {
        Workload::TcpBaseline => {
            let mut o = tcp_baseline(args)?;
            return Ok(report(&name, args, &mut o, None, json!({})));
        }
        Workload::WaitReady => return wait_ready(args, &authority),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let ctx = Arc::new(Ctx::new(
        base,
        Duration::from_secs_f64(args.request_timeout),
        !args.no_verify,
    ));
    let max = Duration::from_secs_f64(args.max_seconds);
    let (count, conc, repo) = (args.count, args.concurrency, Arc::new(args.repo.clone()));
    rt.block_on(async {
        let mut extra = json!({});
        let mut o = match args.workload {
            Workload::PushMono | Workload::PushChunked => {
                if args.chunk == 0 || !args.chunk.is_multiple_of(8) {
                    return Err("--chunk must be a positive multiple of 8".to_owned());
                }
                let keep = count.saturating_mul(args.size) <= args.pregen_limit;
                let blobs = Arc::new(make_blobs(args.seed, count, args.size, keep));
                extra = json!({"pregenerated": keep});
                let (chunk, mono) = (args.chunk, args.workload == Workload::PushMono);
                run_ops(&ctx, count, conc, max, {
                    let ctx = ctx.clone();
                    move |i| {
                        let (ctx, blobs, repo) = (ctx.clone(), blobs.clone(), repo.clone());
                        async move {
                            let b = &blobs[i as usize];
                            if mono {
                                push_mono(&ctx, &repo, b).await
                            } else {
                                push_chunked(&ctx, &repo, b, chunk).await
                            }
                        }
                    }
                })
                .await
            }
            Workload::Pull => {
                let blobs = Arc::new(make_blobs(args.seed, count, args.size, false));
                run_ops(&ctx, count, conc, max, {
                    let ctx = ctx.clone();
                    move |i| {
                        let (ctx, blobs, repo) = (ctx.clone(), blobs.clone(), repo.clone());
                        async move { pull(&ctx, &repo, &blobs[i as usize]).await }
                    }
                })
                .await
            }
            Workload::ManifestPut
            | Workload::ManifestGetTag
            | Workload::ManifestGetDigest
            | Workload::ManifestHead => {
                let spread = if args.workload == Workload::ManifestPut {
                    0
                } else {
                    args.spread
                };
                let set = manifest_set(args.seed, count, args.offset, spread);
                if args.workload == Workload::ManifestPut {
                    ensure_blob(&ctx, &repo, &set.layer).await?;
                    ensure_blob(&ctx, &repo, &set.config).await?;
                    ctx.requests.store(0, Relaxed);
                }
                let items = Arc::new(set.items);
                let w = args.workload;
                run_ops(&ctx, count, conc, max, {
                    let ctx = ctx.clone();
                    move |i| {
                        let (ctx, items, repo) = (ctx.clone(), items.clone(), repo.clone());
                        async move {
                            let (tag, body, digest) = &items[i as usize];
                            match w {
                                Workload::ManifestPut => {
                                    put_manifest(&ctx, &repo, tag, body, digest).await
                                }
                                Workload::ManifestGetTag => {
                                    get_manifest(&ctx, &repo, tag, digest, body.len()).await
                                }
                                Workload::ManifestGetDigest => {
                                    get_manifest(&ctx, &repo, digest, digest, body.len()).await
                                }
                                _ => head_manifest(&ctx, &repo, tag, digest, body.len()).await,
                            }
                        }
                    }
                })
                .await
            }
            Workload::TagList => {
                let want = args.tags;
                run_ops(&ctx, count, conc, max, {
                    let ctx = ctx.clone();
                    move |_| {
                        let (ctx, repo) = (ctx.clone(), repo.clone());
                        async move { tag_list(&ctx, &repo, want).await }
                    }
                })
                .await
            }
            Workload::CiMix => {
                if args.repos == 0 {
                    return Err("--repos must be positive".to_owned());
                }
                let images = Arc::new(ci_images(&args.repo, args.seed, count, args.repos));
                let known = Arc::new(Mutex::new(HashMap::new()));
                let counters = Arc::new(CiCounters::default());
                let o = run_ops(&ctx, count, conc, max, {
                    let (ctx, counters) = (ctx.clone(), counters.clone());
                    move |i| {
                        let (ctx, images, known, counters) =
                            (ctx.clone(), images.clone(), known.clone(), counters.clone());
                        async move { ci_push(&ctx, &images[i as usize], &known, &counters).await }
                    }
                })
                .await;
                extra = json!({
                    "head_hits": counters.head_hits.load(Relaxed),
                    "mounts": counters.mounts.load(Relaxed),
                    "mount_fallbacks": counters.mount_fallbacks.load(Relaxed),
                    "uploads": counters.uploads.load(Relaxed),
                    "repos": args.repos,
                });
                o
            }
            Workload::TcpBaseline | Workload::WaitReady => unreachable!("handled above"),
        };
        Ok(report(&name, args, &mut o, Some(&ctx), extra))
    })
}
