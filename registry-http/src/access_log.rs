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
//! - **Access log** ([`AccessLog`]): one line per request, when its response body has
//!   been sent (or the client went away): method, route, repository, status, bytes in
//!   and out, latency (to the headers) and duration (to the last byte), request id,
//!   identity, client address, and whether the body was sent whole. Formatted here
//!   into a buffer each thread reuses and written whole to a file or stdout, or
//!   emitted as a `tracing` event with the same fields.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use registry_core::RepoName;
use registry_core::access::Identity;

use crate::audit::{AuditLog, json_str, write_addr, write_rfc3339_millis};
use crate::metrics::{
    METHODS, MethodLabel, Metrics, ROUTES, Refusal, Route, outcome_of, query_has, route_index,
};

/// The response header carrying the request id.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";

/// The tracing target of the access log (also named in the lines written directly).
const TARGET: &str = "registry_http::access";

/// Where the access log goes: a line per request, written by the router itself to a
/// file, stdout or any writer, or a `tracing` event for a subscriber of your own.
///
/// A line (one per request, when its response has been sent or the client went away):
///
/// ```text
/// 2026-01-02T03:04:05.678Z  INFO registry_http::access: method=GET route=/v2/{name}/manifests/{reference} repository=team/app status=200 bytes_in=0 bytes_out=527 latency_ms=0.412 duration_ms=0.530 request_id=3f2a9c1e-0000000042 identity=ci peer=10.0.0.7:51334 complete=true
/// ```
///
/// `key=value` pairs (logfmt) after the prefix a `tracing_subscriber` fmt layer writes,
/// so that the lines sit well among a process's other log lines; `-` for an unknown
/// repository, identity (anonymous) or client address; `latency_ms` is the time to the
/// response headers, `duration_ms` to the last byte; `complete=false`: the client went
/// away before the whole body was sent. Only `identity` is free text (a user name, a
/// token's subject): it is quoted and escaped as a JSON string when it holds a space,
/// `=`, a quote, a backslash or a control character. Every other value comes from a
/// checked grammar (methods, route templates, repository names, request ids) or is a
/// number, and is written as it is.
///
/// Why the router formats the line itself: through a `tracing_subscriber` fmt layer, the
/// line's 13 fields cost 20,000 to 33,000 instructions a request (+24% to +38% on a mix
/// of small manifest requests, `benches/callgrind-overhead.sh`), far more than the
/// request itself; written by hand into a reused buffer they cost about 750. Each line
/// is one `write` call, and no lock is held while it is formatted.
///
/// ```no_run
/// # fn main() -> std::io::Result<()> {
/// use registry_http::{AccessLog, HttpConfig};
///
/// let config = HttpConfig::default().with_access_log(Some(AccessLog::stdout()));
/// let to_file = HttpConfig::default()
///     .with_access_log(Some(AccessLog::open("/var/log/registry/access.log")?));
/// # let _ = (config, to_file);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct AccessLog {
    sink: Arc<Sink>,
}

struct Sink {
    kind: SinkKind,
    /// Whether a write already failed: the failure is reported once, not per request.
    failed: AtomicBool,
}

enum SinkKind {
    Tracing,
    Stdout(std::io::Stdout),
    File { path: PathBuf, file: std::fs::File },
    Writer(Mutex<Box<dyn Write + Send>>),
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sink = match &self.sink.kind {
            SinkKind::Tracing => format!("tracing target {TARGET}"),
            SinkKind::Stdout(_) => "stdout".to_owned(),
            SinkKind::File { path, .. } => format!("file {}", path.display()),
            SinkKind::Writer(_) => "writer".to_owned(),
        };
        f.debug_struct("AccessLog").field("sink", &sink).finish()
    }
}

impl AccessLog {
    fn new(kind: SinkKind) -> Self {
        AccessLog {
            sink: Arc::new(Sink {
                kind,
                failed: AtomicBool::new(false),
            }),
        }
    }

    /// Writes lines to the process's standard output, one `write` call per line.
    ///
    /// On Unix through a duplicate of its descriptor: no lock (`std::io::Stdout`'s
    /// lock and line buffer cost a line about 250 instructions, and two threads
    /// writing lines wait for each other). A line written whole by one `write` does
    /// not interleave with the lines of other threads, or with the process's other
    /// log lines written whole to stdout (as `tracing_subscriber`'s fmt layer and
    /// `println!` do).
    pub fn stdout() -> Self {
        #[cfg(unix)]
        {
            use std::os::fd::AsFd as _;
            if let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() {
                return AccessLog::new(SinkKind::File {
                    path: PathBuf::from("/dev/stdout"),
                    file: std::fs::File::from(fd),
                });
            }
        }
        AccessLog::new(SinkKind::Stdout(std::io::stdout()))
    }

    /// Appends lines to the file at `path` (created if missing), one `write` call per
    /// line on a file opened for appending: lines of concurrent requests never
    /// interleave, and no lock is taken.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_owned();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(AccessLog::new(SinkKind::File { path, file }))
    }

    /// Writes lines to `writer` (behind a mutex taken for the write of a finished line,
    /// then flushed).
    pub fn writer(writer: impl Write + Send + 'static) -> Self {
        AccessLog::new(SinkKind::Writer(Mutex::new(Box::new(writer))))
    }

    /// Emits each request as an `info` event of the tracing target
    /// `registry_http::access`, the line's values as the event's fields (`status`,
    /// `bytes_in`, `bytes_out` and `complete` as numbers and booleans): for a
    /// subscriber of your own (JSON, OpenTelemetry...). Nothing is done for a request
    /// when the subscriber does not want the target at `info`. The cost per line is
    /// then the subscriber's.
    pub fn tracing() -> Self {
        AccessLog::new(SinkKind::Tracing)
    }

    /// Whether a line would be written now.
    fn enabled(&self) -> bool {
        match self.sink.kind {
            SinkKind::Tracing => tracing::enabled!(target: TARGET, tracing::Level::INFO),
            _ => true,
        }
    }

    fn write_line(&self, line: &[u8]) {
        let result = match &self.sink.kind {
            SinkKind::Tracing => unreachable!("tracing events are not lines"),
            SinkKind::Stdout(out) => out.lock().write_all(line),
            SinkKind::File { file, .. } => (&*file).write_all(line),
            SinkKind::Writer(w) => {
                let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                w.write_all(line).and_then(|()| w.flush())
            }
        };
        if let Err(e) = result
            && !self.sink.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %e, sink = ?self, "the access log could not be written (reported once)");
        }
    }
}

/// What the observing layer needs; shared by the layer and the handlers.
#[derive(Debug)]
pub(crate) struct Observer {
    pub(crate) metrics: Option<Metrics>,
    pub(crate) audit: Option<AuditLog>,
    access_log: Option<AccessLog>,
    ids: RequestIds,
}

impl Observer {
    pub(crate) fn new(
        metrics: Option<Metrics>,
        audit: Option<AuditLog>,
        access_log: Option<AccessLog>,
    ) -> Self {
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
    /// The length of the repository name the handler parsed from the path (which
    /// starts with it, after `/v2/`); 0 while none. For the access log: a number, where
    /// a copy of the name cost a line an allocation.
    repository_len: AtomicUsize,
    bytes_in: AtomicU64,
    /// The path's route, the length of the repository name it starts with (after
    /// `/v2/`), and the path's length: the layer classifies the path once, and the
    /// handler takes its parse from here.
    route: Route,
    name_len: usize,
    path_len: usize,
}

impl RequestContext {
    fn new(
        id: Box<str>,
        peer: Option<SocketAddr>,
        path: &str,
        (route, name_len): (Route, usize),
    ) -> Self {
        RequestContext(Arc::new(Ctx {
            id,
            peer,
            identity: OnceLock::new(),
            repository_len: AtomicUsize::new(0),
            bytes_in: AtomicU64::new(0),
            route,
            name_len,
            path_len: path.len(),
        }))
    }

    /// The route of `path` and the length of the repository name after `/v2/`, as the
    /// layer found them, if `path` is the path it classified.
    pub(crate) fn classified(&self, path: &str) -> Option<(Route, usize)> {
        (self.0.path_len == path.len()).then_some((self.0.route, self.0.name_len))
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

    /// Records that the request's path names `repo` (right after `/v2/`), for its
    /// access log line: the path is parsed once, by the handler.
    pub(crate) fn set_repository(&self, repo: &RepoName) {
        self.0
            .repository_len
            .store(repo.as_str().len(), Ordering::Relaxed);
    }

    /// The repository the request's `path` names, as the handler found it.
    fn repository<'p>(&self, path: &'p str) -> Option<&'p str> {
        match self.0.repository_len.load(Ordering::Relaxed) {
            0 => None,
            len => path.get(4..4 + len),
        }
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
    let metrics = obs.metrics.as_ref();
    // Only when the line would be written: with the tracing target filtered out (a log
    // level above info), the request and response bodies are not wrapped at all.
    let log = obs.access_log.as_ref().filter(|l| l.enabled());
    let observed = metrics.is_some() || log.is_some();
    // Classified here for every request, observed or not: the handler takes its parse
    // of the path from the request's context instead of parsing it again.
    let classified = Route::classify(req.uri().path());
    let route = classified.0;
    let method = MethodLabel::of(req.method());
    let id = match incoming_id(req.headers()) {
        Some(id) => id.into(),
        None => obs.ids.next(),
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ctx = RequestContext::new(id, peer, req.uri().path(), classified);
    req.extensions_mut().insert(ctx.clone());

    // What the outcome needs from the request, taken before the handler consumes it.
    let mount = route == Route::Uploads && query_has(req.uri().query(), "mount");
    let digest_reference = route == Route::Manifest
        && method == MethodLabel::Delete
        && req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .is_some_and(|r| r.contains(':'));
    let access = log.map(|log| AccessStart {
        log: log.clone(),
        method: req.method().clone(),
        method_label: method,
        path: req.uri().path_and_query().cloned(),
    });
    // Found (and their series created, at zero) for every request, so that the
    // exposition does not depend on which bodies were empty.
    let counters = metrics.map(|m| (m.bytes_received(route, method), m.bytes_sent(route, method)));
    // A body that is empty from the start (most GETs) has no bytes to count: it is not
    // wrapped (a wrapper costs a boxed body per request).
    if observed && !req.body().is_end_stream() {
        let body = std::mem::take(req.body_mut());
        *req.body_mut() = Body::new(CountedRequest {
            inner: body,
            counter: counters.map(|(received, _)| received.clone()),
            ctx: ctx.clone(),
        });
    }

    let in_flight = metrics.map(InFlight::enter);
    let mut resp = next.run(req).await;
    drop(in_flight);
    let headers_at = Instant::now();
    let latency = headers_at - start;
    let status = resp.status();
    if let Ok(v) = HeaderValue::from_str(ctx.id()) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    if let Some(m) = metrics {
        m.request(route, method, status, latency);
        if let Some(refusal) = resp.extensions().get::<Refusal>() {
            m.refusal(*refusal);
        }
        if let Some(outcome) = outcome_of(route, method, status, mount, digest_reference) {
            m.outcome(outcome);
        }
    }
    let access = access.map(|a| AccessLine {
        start: a,
        route,
        status,
        latency,
        started: start,
        ctx,
    });
    if resp.body().is_end_stream() {
        // Nothing to send (HEAD, 201, 202, 204...): the request is done as far as its
        // body goes, and the body stays as it is.
        if let Some(line) = access {
            line.emit(0, true, headers_at);
        }
    } else if observed {
        let body = std::mem::take(resp.body_mut());
        *resp.body_mut() = Body::new(CountedResponse {
            inner: body,
            sent: 0,
            complete: false,
            counter: counters.map(|(_, sent)| sent.clone()),
            access,
        });
    }
    resp
}

/// Counts a request in flight until its response headers are ready, or until the
/// handler is dropped (the client went away).
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(m: &'a Metrics) -> Self {
        let gauge = m.in_flight();
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the access log line takes from the request.
struct AccessStart {
    log: AccessLog,
    method: Method,
    method_label: MethodLabel,
    /// The request's path (a reference count, not a copy): it holds the repository.
    /// Not the whole `Uri`: a line's data is moved into the response body, and the
    /// URI's scheme and authority (empty here) would be cloned and dropped for nothing.
    path: Option<PathAndQuery>,
}

impl AccessStart {
    fn path(&self) -> &str {
        self.path.as_ref().map_or("/", PathAndQuery::path)
    }
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
    /// Writes the line of a request that ended at `end`.
    fn emit(self, bytes_out: u64, complete: bool, end: Instant) {
        let duration = end.saturating_duration_since(self.started);
        if !matches!(self.start.log.sink.kind, SinkKind::Tracing) {
            with_line_state(|state| {
                let LineState { line, clock } = state;
                let n = self.write_line(line, clock, end, bytes_out, duration, complete);
                self.start.log.write_line(&line[..n]);
                // A rare huge line (a very long user name) is not kept around.
                if line.len() > 4096 {
                    *line = Vec::new();
                }
            });
            return;
        }
        let identity = self.ctx.identity().and_then(Identity::name).unwrap_or("-");
        let repository = self.ctx.repository(self.start.path()).unwrap_or("-");
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
            duration_ms = millis(duration),
            request_id = %self.ctx.id(),
            identity = %identity,
            peer = %peer,
            complete,
            "request"
        );
    }

    /// Writes the request's line (see [`AccessLog`]), newline included, at the start
    /// of `line`; returns its length. `line` is the thread's buffer: it only grows (and
    /// is zeroed) when a line needs more room than it has, not per line.
    ///
    /// Written through a [`Cursor`] over the buffer sized for the whole line first:
    /// every append is then a copy into a slice, with the cursor's position in a
    /// register, where appending to the `Vec` reloaded and checked its length and
    /// capacity each time (measured with callgrind, that and out-of-line number
    /// formatting were most of a line's cost).
    fn write_line(
        &self,
        line: &mut Vec<u8>,
        clock: &mut WallClock,
        end: Instant,
        bytes_out: u64,
        duration: Duration,
        complete: bool,
    ) -> usize {
        let method = self.start.method.as_str().as_bytes();
        let route = self.route.as_str().as_bytes();
        let repository = self.ctx.repository(self.start.path());
        let id = self.ctx.id().as_bytes();
        let identity = self.ctx.identity().and_then(Identity::name);
        let identity = match identity {
            Some(name) if logfmt_plain(name) => std::borrow::Cow::Borrowed(name.as_bytes()),
            Some(name) => std::borrow::Cow::Owned(quoted(name)),
            None => std::borrow::Cow::Borrowed(&b"-"[..]),
        };
        let time = clock.time_text(end);
        let bytes_in = self.ctx.0.bytes_in.load(Ordering::Relaxed);
        // The constant parts (154 bytes), the time (24), the numbers (five of at most
        // 20 digits, two with 4 bytes of decimals), the address (at most 56 bytes) and
        // the variable parts; more room is made if this falls short.
        let mut room = 192
            + 24
            + 5 * 20
            + 8
            + 64
            + method.len()
            + route.len()
            + repository.map_or(1, str::len)
            + id.len()
            + identity.len();
        let parts = LineParts {
            time,
            prefix: line_prefix(self.start.method_label, self.route),
            method,
            route,
            repository: repository.map_or(b"-", str::as_bytes),
            status: self.status.as_u16(),
            bytes_in,
            bytes_out,
            latency: self.latency,
            duration,
            id,
            identity: &identity,
            peer: self.ctx.peer(),
            complete,
        };
        loop {
            if line.len() < room {
                line.resize(room, 0);
            }
            match parts.fill(line) {
                Some(n) => return n,
                None => room *= 2,
            }
        }
    }
}

/// What a line says, gathered for [`LineParts::fill`].
struct LineParts<'a> {
    time: [u8; 24],
    /// What follows the time up to the repository's value, when the method is one of
    /// the [`MethodLabel`]s (see [`line_prefix`]); otherwise it is put together from
    /// `method` and `route`.
    prefix: Option<&'static [u8]>,
    method: &'a [u8],
    route: &'a [u8],
    repository: &'a [u8],
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    latency: Duration,
    duration: Duration,
    id: &'a [u8],
    identity: &'a [u8],
    peer: Option<SocketAddr>,
    complete: bool,
}

impl LineParts<'_> {
    /// Writes the line at the start of `buf`; its length, or `None` if it did not fit.
    /// Not inlined into the caller's loop, which would compute every digit of every
    /// number ahead, whatever their length.
    #[inline(never)]
    fn fill(&self, buf: &mut [u8]) -> Option<usize> {
        let mut c = Cursor {
            buf,
            n: 0,
            short: false,
        };
        c.put(&self.time);
        match self.prefix {
            Some(prefix) => c.put(prefix),
            None => {
                c.put(LINE_START);
                c.put(self.method);
                c.put(b" route=");
                c.put(self.route);
                c.put(b" repository=");
            }
        }
        c.put(self.repository);
        c.put(b" status=");
        c.num(u64::from(self.status));
        c.put(b" bytes_in=");
        c.num(self.bytes_in);
        c.put(b" bytes_out=");
        c.num(self.bytes_out);
        c.put(b" latency_ms=");
        c.millis(self.latency);
        c.put(b" duration_ms=");
        c.millis(self.duration);
        c.put(b" request_id=");
        c.put(self.id);
        c.put(b" identity=");
        c.put(self.identity);
        c.put(b" peer=");
        match self.peer {
            Some(SocketAddr::V4(a)) => {
                let [a0, a1, a2, a3] = a.ip().octets();
                c.num(a0.into());
                c.put(b".");
                c.num(a1.into());
                c.put(b".");
                c.num(a2.into());
                c.put(b".");
                c.num(a3.into());
                c.put(b":");
                c.num(a.port().into());
            }
            Some(addr) => {
                let mut text = Vec::with_capacity(56);
                write_addr(&mut text, addr);
                c.put(&text);
            }
            None => c.put(b"-"),
        }
        c.put(if self.complete {
            b" complete=true\n"
        } else {
            b" complete=false\n"
        });
        (!c.short).then_some(c.n)
    }
}

/// What every line has after its time, up to the method.
const LINE_START: &[u8] = b"  INFO registry_http::access: method=";

/// `  INFO registry_http::access: method=M route=R repository=` for a method and route,
/// made once: one copy per line instead of five (methods other than the labelled
/// ones, written as they came, have none).
fn line_prefix(method: MethodLabel, route: Route) -> Option<&'static [u8]> {
    static PREFIXES: OnceLock<Box<[Box<[u8]>]>> = OnceLock::new();
    if method == MethodLabel::Other {
        return None;
    }
    let prefixes = PREFIXES.get_or_init(|| {
        let mut all = Vec::with_capacity(ROUTES * METHODS);
        for route in Route::ALL {
            for method in MethodLabel::ALL {
                debug_assert_eq!(all.len(), route_index(route, method));
                all.push(
                    [
                        LINE_START,
                        method.as_str().as_bytes(),
                        b" route=",
                        route.as_str().as_bytes(),
                        b" repository=",
                    ]
                    .concat()
                    .into_boxed_slice(),
                );
            }
        }
        all.into_boxed_slice()
    });
    prefixes.get(route_index(route, method)).map(|p| &p[..])
}

/// Writes from the start of a buffer made long enough beforehand (see
/// [`AccessLine::write_line`]): `n` bytes written so far; `short` once something did
/// not fit (the caller then starts again with more room).
struct Cursor<'a> {
    buf: &'a mut [u8],
    n: usize,
    short: bool,
}

impl Cursor<'_> {
    #[inline(always)]
    fn put(&mut self, s: &[u8]) {
        let end = self.n.wrapping_add(s.len());
        match self.buf.get_mut(self.n..end) {
            Some(to) => {
                to.copy_from_slice(s);
                self.n = end;
            }
            None => self.short = true,
        }
    }

    /// `n` in decimal. Most numbers of a line are short (statuses, milliseconds, small
    /// bodies, address octets): these take no loop and no call.
    #[inline(always)]
    fn num(&mut self, n: u64) {
        let d = |x: u64| b'0' + (x % 10) as u8;
        match n {
            0..10 => self.put(&[d(n)]),
            10..100 => self.put(&[d(n / 10), d(n)]),
            100..1000 => self.put(&[d(n / 100), d(n / 10), d(n)]),
            1000..10_000 => self.put(&[d(n / 1000), d(n / 100), d(n / 10), d(n)]),
            10_000..100_000 => self.put(&[d(n / 10_000), d(n / 1000), d(n / 100), d(n / 10), d(n)]),
            _ => self.put(&long_num(n)[..]),
        }
    }

    /// `d` in milliseconds with three decimals (microseconds).
    #[inline(always)]
    fn millis(&mut self, d: Duration) {
        // Not through `as_micros`: its `u128` division is a library call.
        let micros = d.subsec_micros();
        self.num(
            d.as_secs()
                .saturating_mul(1000)
                .saturating_add(u64::from(micros / 1000)),
        );
        let frac = micros % 1000;
        self.put(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }
}

/// `n` in decimal, for the long numbers.
#[inline(never)]
fn long_num(mut n: u64) -> Vec<u8> {
    let mut digits = Vec::with_capacity(20);
    loop {
        digits.push(b'0' + (n % 10) as u8);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    digits
}

/// What each thread keeps for its lines: a buffer, and the wall clock.
struct LineState {
    line: Vec<u8>,
    clock: WallClock,
}

/// Calls `f` with this thread's [`LineState`].
fn with_line_state(f: impl FnOnce(&mut LineState)) {
    thread_local! {
        static STATE: std::cell::RefCell<LineState> = const {
            std::cell::RefCell::new(LineState {
                line: Vec::new(),
                clock: WallClock::new(),
            })
        };
    }
    STATE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut state) => f(&mut state),
        // A writer that ends a request on this thread while writing a line (only a
        // custom writer could): a state of its own.
        Err(_) => f(&mut LineState {
            line: Vec::new(),
            clock: WallClock::new(),
        }),
    })
}

/// The time of day of a line, from the `Instant` the request ended at (read anyway,
/// for its duration): the system clock is read once a second per thread, and the
/// date and time to the second are formatted once a second too.
struct WallClock {
    /// An `Instant` and the system time (since the epoch) read just after it.
    base: Option<(Instant, Duration)>,
    /// The second that `text` shows, and `YYYY-MM-DDTHH:MM:SS.` for it.
    second: u64,
    text: [u8; 20],
}

impl WallClock {
    const fn new() -> Self {
        WallClock {
            base: None,
            second: u64::MAX,
            text: [0; 20],
        }
    }

    /// `at` as RFC 3339 UTC with milliseconds.
    fn time_text(&mut self, at: Instant) -> [u8; 24] {
        let since_epoch = match self.base {
            // Within a second of the last reading of the system clock (and not before
            // it: another thread's `Instant`): close enough for a log line, and it
            // follows the system clock's steps and slews within a second.
            Some((instant, wall))
                if let Some(since) = at.checked_duration_since(instant)
                    && since < Duration::from_secs(1) =>
            {
                wall + since
            }
            _ => {
                let wall = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                self.base = Some((at, wall));
                wall
            }
        };
        let second = since_epoch.as_secs();
        if second != self.second {
            let mut text = Vec::with_capacity(24);
            write_rfc3339_millis(
                &mut text,
                SystemTime::UNIX_EPOCH + Duration::from_secs(second),
            );
            self.text.copy_from_slice(&text[..20]);
            self.second = second;
        }
        let ms = since_epoch.subsec_millis();
        let mut out = [0; 24];
        out[..20].copy_from_slice(&self.text);
        out[20..].copy_from_slice(&[
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
        out
    }
}

/// Whether a value can go into a line as it is: it holds nothing that would end it or
/// confuse a reader. Otherwise it is quoted and escaped as a JSON string ([`quoted`]).
fn logfmt_plain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b > b' ' && b != b'"' && b != b'\\' && b != b'=' && b != 0x7f)
}

/// `s` quoted and escaped as a JSON string.
fn quoted(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    json_str(&mut out, s);
    out
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
            line.emit(self.sent, complete, Instant::now());
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

    /// What `f` writes through a cursor.
    fn written(f: impl FnOnce(&mut Cursor<'_>)) -> String {
        let mut buf = vec![0; 64];
        let mut c = Cursor {
            buf: &mut buf,
            n: 0,
            short: false,
        };
        f(&mut c);
        assert!(!c.short);
        let n = c.n;
        buf.truncate(n);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn line_prefixes_are_what_the_parts_make() {
        for route in Route::ALL {
            for method in MethodLabel::ALL {
                let expected = format!(
                    "  INFO registry_http::access: method={} route={} repository=",
                    method.as_str(),
                    route.as_str()
                );
                let prefix = line_prefix(method, route).map(|p| String::from_utf8_lossy(p));
                if method == MethodLabel::Other {
                    // Written as the method came, not as its label.
                    assert_eq!(prefix, None);
                } else {
                    assert_eq!(prefix.as_deref(), Some(expected.as_str()));
                }
            }
        }
    }

    #[test]
    fn numbers_durations_and_values_are_written_as_logfmt_wants_them() {
        for n in [
            0,
            7,
            10,
            99,
            100,
            999,
            1000,
            4096,
            9999,
            10_000,
            65_535,
            99_999,
            100_000,
            u64::MAX,
        ] {
            assert_eq!(written(|c| c.num(n)), n.to_string());
        }
        for (d, want) in [
            (Duration::ZERO, "0.000"),
            (Duration::from_micros(1), "0.001"),
            (Duration::from_nanos(12_345_678), "12.345"),
            (
                Duration::from_secs(3) + Duration::from_micros(40),
                "3000.040",
            ),
        ] {
            assert_eq!(written(|c| c.millis(d)), want);
        }
        for (v, plain) in [
            ("ci", true),
            ("ci bot", false),
            ("a=b", false),
            ("q\"uote\n", false),
            ("", false),
            ("é", true),
        ] {
            assert_eq!(logfmt_plain(v), plain, "{v:?}");
        }
        assert_eq!(quoted("q\"uote\n"), b"\"q\\\"uote\\n\"");
        // What does not fit is not written, and says so.
        let mut buf = vec![0; 4];
        let mut c = Cursor {
            buf: &mut buf,
            n: 0,
            short: false,
        };
        c.put(b"abc");
        c.put(b"de");
        assert_eq!((c.n, c.short), (3, true));
    }

    #[test]
    fn the_time_of_day_follows_the_system_clock() {
        let mut clock = WallClock::new();
        let before = SystemTime::now();
        let out = String::from_utf8(clock.time_text(Instant::now()).to_vec()).unwrap();
        let mut want = Vec::new();
        write_rfc3339_millis(&mut want, before);
        // Same format, and the same time to within the second it may have crossed.
        assert_eq!(out[..16], String::from_utf8(want).unwrap()[..16], "{out}");
        assert_eq!(out.as_bytes()[23], b'Z');
    }

    #[test]
    fn made_ids_are_unique() {
        let ids = RequestIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert!(a.len() <= 128);
    }
}
