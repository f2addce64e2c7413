//! The outermost layer of the router: a request id for every request, the HTTP
//! metrics, and the access log.
//!
//! - **Request id**: an incoming `X-Request-Id` is kept when it is sane (1 to 128
//!   characters of `[A-Za-z0-9._:-]`, so it can go into logs and headers as it is),
//!   otherwise one is made (a random per-router prefix and a counter: unique, and no
//!   system call per request). It is returned in the response's `X-Request-Id`, and
//!   handlers find it, with the client's address and (once authenticated) identity, in
//!   the request's [`RequestContext`].
//! - **Metrics**: the route *template* and method are known before the handler runs,
//!   the status when the headers are ready; body bytes are counted as they pass, so a
//!   long download shows in the byte rate while it streams.
//! - **Access log**: one `info` event of the target `registry_http::access` per
//!   request, when its response body has been sent (or the client went away): method,
//!   route, repository, status, bytes in and out, latency (to the headers) and duration
//!   (to the last byte), request id, identity, client address, and whether the body
//!   was sent whole.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use registry_core::RepoName;
use registry_core::access::Identity;

use crate::audit::AuditLog;
use crate::metrics::{MethodLabel, Metrics, Refusal, Route, outcome_of, query_has};

/// The response header carrying the request id.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";

/// What the observing layer needs; shared by the layer and the handlers.
#[derive(Debug)]
pub(crate) struct Observer {
    pub(crate) metrics: Option<Metrics>,
    pub(crate) audit: Option<AuditLog>,
    pub(crate) access_log: bool,
    ids: RequestIds,
}

impl Observer {
    pub(crate) fn new(metrics: Option<Metrics>, audit: Option<AuditLog>, access_log: bool) -> Self {
        Observer {
            metrics,
            audit,
            access_log,
            ids: RequestIds::new(),
        }
    }
}

/// Request ids made here: a random prefix per router and a counter.
#[derive(Debug)]
struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut b = [0u8; 4];
        // A failing random source only makes ids less unique across restarts.
        let _ = getrandom::fill(&mut b);
        RequestIds {
            prefix: u32::from_le_bytes(b),
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> Box<str> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{n:010x}", self.prefix).into()
    }
}

/// A client's `X-Request-Id`, if it is one we can pass on as it is.
fn incoming_id(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(REQUEST_ID_HEADER)?.to_str().ok()?;
    let sane = (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    sane.then_some(v)
}

/// Per-request facts the handlers share with the layer, in the request's extensions.
#[derive(Clone, Debug)]
pub(crate) struct RequestContext(Arc<Ctx>);

#[derive(Debug)]
struct Ctx {
    id: Box<str>,
    peer: Option<SocketAddr>,
    identity: OnceLock<Identity>,
    bytes_in: AtomicU64,
}

impl RequestContext {
    fn new(id: Box<str>, peer: Option<SocketAddr>) -> Self {
        RequestContext(Arc::new(Ctx {
            id,
            peer,
            identity: OnceLock::new(),
            bytes_in: AtomicU64::new(0),
        }))
    }

    /// The request id.
    pub(crate) fn id(&self) -> &str {
        &self.0.id
    }

    /// The client's address, when the server provides it.
    pub(crate) fn peer(&self) -> Option<SocketAddr> {
        self.0.peer
    }

    /// Who the request authenticated as, once it has.
    pub(crate) fn identity(&self) -> Option<&Identity> {
        self.0.identity.get()
    }

    /// Records who the request authenticated as (the first call wins).
    pub(crate) fn set_identity(&self, identity: &Identity) {
        if self.0.identity.get().is_none() {
            let _ = self.0.identity.set(identity.clone());
        }
    }

    /// The context of `req`, if the observing layer runs.
    pub(crate) fn of(req: &Request) -> Option<RequestContext> {
        req.extensions().get::<RequestContext>().cloned()
    }
}

/// What the handlers' logging needs from a request, borrowed field by field: a
/// `&Request` held across an `await` would make the handler's future not `Send` (a
/// body is not `Sync`).
#[derive(Clone, Copy)]
pub(crate) struct ReqView<'a> {
    pub(crate) headers: &'a HeaderMap,
    pub(crate) uri: &'a axum::http::Uri,
    pub(crate) ctx: Option<&'a RequestContext>,
}

impl<'a> ReqView<'a> {
    pub(crate) fn of(req: &'a Request) -> Self {
        ReqView {
            headers: req.headers(),
            uri: req.uri(),
            ctx: req.extensions().get::<RequestContext>(),
        }
    }
}

/// The repository a path names, if it names a valid one.
pub(crate) fn repository_of(path: &str) -> Option<RepoName> {
    crate::routes::path_repository(path.strip_prefix("/v2/")?)
}

/// The layer itself (`axum::middleware::from_fn_with_state`).
pub(crate) async fn observe(
    State(obs): State<Arc<Observer>>,
    mut req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let route = Route::of(req.uri().path());
    let method = MethodLabel::of(req.method());
    let id = match incoming_id(req.headers()) {
        Some(id) => id.into(),
        None => obs.ids.next(),
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ctx = RequestContext::new(id, peer);
    req.extensions_mut().insert(ctx.clone());

    let counters = obs.metrics.as_ref().map(|m| m.byte_counters(route, method));
    // What the outcome needs from the request, taken before the handler consumes it.
    let mount = route == Route::Uploads && query_has(req.uri().query(), "mount");
    let digest_reference = route == Route::Manifest
        && req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .is_some_and(|r| r.contains(':'));
    // Only when the line would be written: with the target filtered out (a log level
    // above info), the request and response bodies are not wrapped at all.
    let logging =
        obs.access_log && tracing::enabled!(target: "registry_http::access", tracing::Level::INFO);
    let access = logging.then(|| AccessStart {
        method: req.method().clone(),
        repository: repository_of(req.uri().path()),
    });
    if counters.is_some() || access.is_some() {
        let received = counters.as_ref().map(|(received, _)| received.clone());
        let body = std::mem::take(req.body_mut());
        *req.body_mut() = Body::new(CountedRequest {
            inner: body,
            counter: received,
            ctx: ctx.clone(),
        });
    }

    let in_flight = obs.metrics.as_ref().map(InFlight::enter);
    let mut resp = next.run(req).await;
    drop(in_flight);
    let latency = start.elapsed();
    let status = resp.status();
    if let Ok(v) = HeaderValue::from_str(ctx.id()) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    if let Some(m) = &obs.metrics {
        m.request(route, method, status, latency);
        if let Some(refusal) = resp.extensions().get::<Refusal>() {
            m.refusal(*refusal);
        }
        if let Some(outcome) = outcome_of(route, method, status, mount, digest_reference) {
            m.outcome(outcome);
        }
    }
    if counters.is_some() || access.is_some() {
        let body = std::mem::take(resp.body_mut());
        *resp.body_mut() = Body::new(CountedResponse {
            inner: body,
            sent: 0,
            complete: false,
            counter: counters.map(|(_, sent)| sent),
            access: access.map(|a| AccessLine {
                start: a,
                route,
                status,
                latency,
                started: start,
                ctx,
            }),
        });
    }
    resp
}

/// Counts a request in flight until its response headers are ready, or until the
/// handler is dropped (the client went away).
struct InFlight(Metrics);

impl InFlight {
    fn enter(m: &Metrics) -> Self {
        m.in_flight().inc();
        InFlight(m.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight().dec();
    }
}

/// What the access log line takes from the request.
struct AccessStart {
    method: Method,
    repository: Option<RepoName>,
}

struct AccessLine {
    start: AccessStart,
    route: Route,
    status: StatusCode,
    latency: Duration,
    started: Instant,
    ctx: RequestContext,
}

impl AccessLine {
    fn emit(self, bytes_out: u64, complete: bool) {
        let identity = self.ctx.identity().and_then(Identity::name).unwrap_or("-");
        let repository = self.start.repository.as_ref().map_or("-", RepoName::as_str);
        let peer = self
            .ctx
            .peer()
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        tracing::info!(
            target: "registry_http::access",
            method = %self.start.method,
            route = %self.route.as_str(),
            repository = %repository,
            status = self.status.as_u16(),
            bytes_in = self.ctx.0.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            latency_ms = millis(self.latency),
            duration_ms = millis(self.started.elapsed()),
            request_id = %self.ctx.id(),
            identity = %identity,
            peer = %peer,
            complete,
            "request"
        );
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A request body that counts its bytes as the handler reads them.
struct CountedRequest {
    inner: Body,
    counter: Option<Counter>,
    ctx: RequestContext,
}

impl http_body::Body for CountedRequest {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            this.ctx.0.bytes_in.fetch_add(n, Ordering::Relaxed);
            if let Some(c) = &this.counter {
                c.inc_by(n);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts its bytes as they are sent, and writes the access log
/// line when it is dropped: after the last byte, or when the client went away.
struct CountedResponse {
    inner: Body,
    sent: u64,
    complete: bool,
    counter: Option<Counter>,
    access: Option<AccessLine>,
}

impl http_body::Body for CountedResponse {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.sent += n;
                    if let Some(c) = &this.counter {
                        c.inc_by(n);
                    }
                }
            }
            Poll::Ready(None) => this.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountedResponse {
    fn drop(&mut self) {
        if let Some(line) = self.access.take() {
            // A body that was empty from the start (HEAD, 201, 204) is complete unread.
            let complete = self.complete || self.inner.is_end_stream();
            line.emit(self.sent, complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_ids_are_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        assert_eq!(incoming_id(&h), None);
        h.insert(REQUEST_ID_HEADER, "abc-123_x.y:z".parse().unwrap());
        assert_eq!(incoming_id(&h), Some("abc-123_x.y:z"));
        h.insert(REQUEST_ID_HEADER, "has space".parse().unwrap());
        assert_eq!(incoming_id(&h), None);
        h.insert(REQUEST_ID_HEADER, "x".repeat(129).parse().unwrap());
        assert_eq!(incoming_id(&h), None);
        h.insert(REQUEST_ID_HEADER, "".parse().unwrap());
        assert_eq!(incoming_id(&h), None);
    }

    #[test]
    fn made_ids_are_unique() {
        let ids = RequestIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert!(a.len() <= 128);
    }
}
