//! Fault injection at the HTTP edge: a tower [`Layer`] that slows responses down,
//! answers 5xx, or cuts connections mid-body, by rule, so that a client's retry logic
//! can be tested against a misbehaving registry (or a misbehaving proxy in front of
//! one). Storage-level faults are `registry_core::fault`.
//!
//! Install it with [`HttpConfig::with_faults`](crate::HttpConfig::with_faults) (the
//! router and the built-in server then run behind it), or put it on any axum router
//! yourself with `Router::layer`. It is the outermost layer: a fault decided before
//! the request reaches the registry ([`HttpFault::Status`], [`HttpFault::Delay`])
//! never shows in the access log or metrics, as a failing proxy's would not.
//!
//! ```
//! use std::time::Duration;
//! use axum::http::{Method, StatusCode};
//! use registry_http::{HttpConfig, HttpFault, HttpFaults, HttpRule};
//!
//! let faults = HttpFaults::new(7)
//!     // The first two manifest PUTs get a 503 and never reach the registry.
//!     .with(HttpRule::new("/v2/*/manifests/*", HttpFault::Status(StatusCode::SERVICE_UNAVAILABLE))
//!         .method(Method::PUT)
//!         .times(2))
//!     // One blob download in five is cut after 1 KiB.
//!     .with(HttpRule::new("/v2/*/blobs/sha256:*", HttpFault::CutResponse { after: 1024 })
//!         .method(Method::GET)
//!         .probability(0.2))
//!     .with(HttpRule::new("/v2/*", HttpFault::Delay(Duration::from_millis(20))).after(100));
//! let config = HttpConfig::default().with_faults(faults.clone());
//! let _app = registry_http::router(registry_core::Registry::in_memory(), config);
//! // ... run the client, then look at `faults.injected()`.
//! ```

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{Stream, StreamExt};
use tower::{Layer, Service};

use crate::error::ApiError;

/// What a rule does to a request it fires on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFault {
    /// Wait this long before passing the request on.
    Delay(Duration),
    /// Answer with this status (and an OCI error body) without passing the request on:
    /// nothing happens in the registry. A 429 or 503 carries `Retry-After: 1`.
    Status(StatusCode),
    /// Pass the request on, let the registry do the work, then answer with this status
    /// instead of its response: a lost acknowledgement, the case that tests whether a
    /// client's retry is idempotent.
    StatusAfter(StatusCode),
    /// Pass the request on and send the registry's response, but cut the connection
    /// after `after` bytes of its body (halfway through a body shorter than that, once
    /// its length is known). The status and headers arrive, the body does not.
    CutResponse {
        /// Body bytes sent before the cut.
        after: u64,
    },
    /// Pass the request on with its body cut after `after` bytes, as if the client's
    /// connection broke mid-upload: the registry sees the body fail.
    CutRequest {
        /// Body bytes the registry receives before the cut.
        after: u64,
    },
}

/// When to inject an [`HttpFault`]: requests whose path matches a glob (`*` any run of
/// characters, `/` included; `?` one character), optionally of one method. Each rule
/// counts the requests it matches, lets the first [`after`](Self::after) pass, then
/// fires with its [`probability`](Self::probability) (from the seeded generator of its
/// [`HttpFaults`]), at most [`times`](Self::times) times. The first rule that fires
/// decides.
#[derive(Debug, Clone)]
pub struct HttpRule {
    path: String,
    method: Option<Method>,
    probability: f64,
    after: u64,
    times: Option<u64>,
    fault: HttpFault,
}

impl HttpRule {
    /// Injects `fault` into every request whose path matches `path_glob`.
    pub fn new(path_glob: &str, fault: HttpFault) -> HttpRule {
        HttpRule {
            path: path_glob.to_owned(),
            method: None,
            probability: 1.0,
            after: 0,
            times: None,
            fault,
        }
    }
    /// Only requests of this method.
    pub fn method(mut self, method: Method) -> HttpRule {
        self.method = Some(method);
        self
    }
    /// Fires on a matching request with probability `p` (clamped to `[0, 1]`).
    pub fn probability(mut self, p: f64) -> HttpRule {
        self.probability = p.clamp(0.0, 1.0);
        self
    }
    /// Lets the first `n` matching requests pass untouched.
    pub fn after(mut self, n: u64) -> HttpRule {
        self.after = n;
        self
    }
    /// Fires at most `m` times.
    pub fn times(mut self, m: u64) -> HttpRule {
        self.times = Some(m);
        self
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && glob(self.path.as_bytes(), path.as_bytes())
    }
}

/// `*` matches any run of bytes, `?` one byte, anything else itself.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative, with one backtrack point (the last `*`): linear in practice.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One injected fault, as [`HttpFaults::injected`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpInjection {
    /// The request's method.
    pub method: Method,
    /// The request's path.
    pub path: String,
    /// The fault.
    pub fault: HttpFault,
}

struct RuleState {
    rule: HttpRule,
    seen: u64,
    fired: u64,
}

struct State {
    rules: Vec<RuleState>,
    rng: u64,
    log: Vec<HttpInjection>,
}

impl State {
    /// SplitMix64, as `registry_core`'s seeded generator (kept here: a dozen lines
    /// are cheaper than a public RNG in the core's API).
    fn next_f64(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A set of HTTP fault rules, and the tower [`Layer`] that applies them. Cheap to
/// clone; clones share rules, counts, generator and log, so a test keeps one to change
/// the rules while the server runs and to read what was injected.
#[derive(Clone)]
pub struct HttpFaults {
    state: Arc<Mutex<State>>,
    enabled: Arc<AtomicBool>,
}

impl std::fmt::Debug for HttpFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("HttpFaults")
            .field(
                "rules",
                &s.rules.iter().map(|r| &r.rule).collect::<Vec<_>>(),
            )
            .field("injected", &s.log.len())
            .finish()
    }
}

impl HttpFaults {
    /// No rules yet; probabilities are drawn from a generator seeded with `seed`, so a
    /// client making the same requests in the same order meets the same faults.
    pub fn new(seed: u64) -> HttpFaults {
        HttpFaults {
            state: Arc::new(Mutex::new(State {
                rules: Vec::new(),
                rng: seed,
                log: Vec::new(),
            })),
            enabled: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Adds `rule` after the others, builder style.
    pub fn with(self, rule: HttpRule) -> HttpFaults {
        self.add(rule);
        self
    }

    /// Adds `rule` after the others, also while requests are being served.
    pub fn add(&self, rule: HttpRule) {
        self.lock().rules.push(RuleState {
            rule,
            seen: 0,
            fired: 0,
        });
    }

    /// Removes every rule (the log stays).
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Turns injection off (requests pass untouched and uncounted) or back on.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Every fault injected so far, in order.
    pub fn injected(&self) -> Vec<HttpInjection> {
        self.lock().log.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Counts and a log: a panic elsewhere cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn decide(&self, method: &Method, path: &str) -> Option<HttpFault> {
        if !self.enabled.load(Ordering::SeqCst) {
            return None;
        }
        let mut state = self.lock();
        let mut decided = None;
        for i in 0..state.rules.len() {
            let r = &mut state.rules[i];
            if !r.rule.matches(method, path) {
                continue;
            }
            r.seen += 1;
            if decided.is_some()
                || r.seen <= r.rule.after
                || r.rule.times.is_some_and(|m| r.fired >= m)
            {
                continue;
            }
            let p = r.rule.probability;
            // Draw only for a real coin toss (rules of probability 1 leave the stream).
            if p < 1.0 && state.next_f64() >= p {
                continue;
            }
            let r = &mut state.rules[i];
            r.fired += 1;
            let fault = r.rule.fault;
            decided = Some(fault);
            state.log.push(HttpInjection {
                method: method.clone(),
                path: path.to_owned(),
                fault,
            });
        }
        decided
    }
}

impl<S> Layer<S> for HttpFaults {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> FaultService<S> {
        FaultService {
            inner,
            faults: self.clone(),
        }
    }
}

/// The service [`HttpFaults`] wraps around a router.
#[derive(Clone, Debug)]
pub struct FaultService<S> {
    inner: S,
    faults: HttpFaults,
}

/// The answer of [`HttpFault::Status`] and [`HttpFault::StatusAfter`]: an OCI error,
/// with `Retry-After` where the status invites a retry.
fn injected_status(status: StatusCode) -> Response {
    let code = match status {
        StatusCode::TOO_MANY_REQUESTS => "TOOMANYREQUESTS",
        StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
        _ => "UNKNOWN",
    };
    let mut resp = ApiError::new(status, code, "injected fault").into_response();
    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        resp.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    }
    resp
}

fn cut_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "injected fault: connection cut",
    )
}

/// The first `keep` bytes of `data`, then an error (also when `data` ends sooner).
fn cut<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    data: impl Stream<Item = Result<Bytes, E>> + Send + 'static,
    keep: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(
        (Box::pin(data), keep, false),
        |(mut data, left, done)| async move {
            if done {
                return None;
            }
            if left == 0 {
                return Some((Err(cut_error()), (data, 0, true)));
            }
            match data.next().await {
                Some(Ok(chunk)) => {
                    let take = (chunk.len() as u64).min(left);
                    Some((Ok(chunk.slice(..take as usize)), (data, left - take, false)))
                }
                Some(Err(e)) => Some((Err(std::io::Error::other(e)), (data, 0, true))),
                None => Some((Err(cut_error()), (data, 0, true))),
            }
        },
    )
}

impl<S> Service<Request<Body>> for FaultService<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let fault = self.faults.decide(req.method(), req.uri().path());
        // The service that was made ready is the one to call; leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            match fault {
                None => inner.call(req).await,
                Some(HttpFault::Delay(d)) => {
                    tokio::time::sleep(d).await;
                    inner.call(req).await
                }
                Some(HttpFault::Status(status)) => Ok(injected_status(status)),
                Some(HttpFault::StatusAfter(status)) => {
                    // The registry's response is dropped unread: for a write, the
                    // work is done once the status is known.
                    drop(inner.call(req).await?);
                    Ok(injected_status(status))
                }
                Some(HttpFault::CutResponse { after }) => {
                    let resp = inner.call(req).await?;
                    let (parts, body) = resp.into_parts();
                    // The length the client expects: a streamed body only announces it
                    // in its header. Cutting at or past it would cut nothing the
                    // client notices.
                    let declared = parts
                        .headers
                        .get(axum::http::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    let length = http_body::Body::size_hint(&body).exact().or(declared);
                    let keep = match length {
                        Some(len) if len <= after => len / 2,
                        _ => after,
                    };
                    let body = Body::from_stream(cut(body.into_data_stream(), keep));
                    Ok(Response::from_parts(parts, body))
                }
                Some(HttpFault::CutRequest { after }) => {
                    let (parts, body) = req.into_parts();
                    let body = Body::from_stream(cut(body.into_data_stream(), after));
                    inner.call(Request::from_parts(parts, body)).await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"/v2/*/manifests/*", b"/v2/a/b/manifests/v1"));
        assert!(glob(b"/v2/*", b"/v2/"));
        assert!(glob(b"*", b""));
        assert!(glob(b"/v2/?/x", b"/v2/a/x"));
        assert!(!glob(b"/v2/?/x", b"/v2/ab/x"));
        assert!(!glob(b"/v2/*/manifests/*", b"/v2/a/blobs/sha256:1"));
        assert!(glob(b"*sha256:*", b"/v2/a/blobs/sha256:1"));
        assert!(!glob(b"/v2", b"/v2/"));
    }

    #[test]
    fn rules_count_and_replay() {
        let run = |seed| {
            let f = HttpFaults::new(seed)
                .with(
                    HttpRule::new("/v2/*", HttpFault::Status(StatusCode::BAD_GATEWAY))
                        .method(Method::PUT)
                        .after(1)
                        .times(2),
                )
                .with(HttpRule::new("/v2/*", HttpFault::Delay(Duration::ZERO)).probability(0.5));
            (0..10)
                .map(|i| {
                    let m = if i % 2 == 0 { Method::PUT } else { Method::GET };
                    f.decide(&m, "/v2/x/manifests/y")
                })
                .collect::<Vec<_>>()
        };
        let a = run(3);
        assert_eq!(a, run(3));
        let puts: Vec<_> = a.iter().step_by(2).collect();
        let bad = Some(HttpFault::Status(StatusCode::BAD_GATEWAY));
        assert_ne!(puts[0], &bad);
        assert_eq!((puts[1], puts[2]), (&bad, &bad));
        assert!(puts[3..].iter().all(|f| **f != bad));
    }
}
