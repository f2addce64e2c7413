//! The audit log: one JSON line per change to the registry's content and per refused
//! credential or access, with who, from where, and what.
//!
//! Guarantee: the line of a change made through the HTTP API is written (and, with
//! [`AuditLog::with_fsync`], synced) *before* the success response is sent; if it
//! cannot be written, the client gets a 500 instead of the acknowledgement. So every
//! change a client saw acknowledged has its line. The other way round is not
//! guaranteed: a crash between the storage commit and the line leaves a change that no
//! client saw acknowledged and that has no line (`docs/design.md`, "Audit log").
//!
//! Lines (fields absent when they do not apply):
//!
//! | field | what |
//! |---|---|
//! | `time` | RFC 3339 UTC, milliseconds |
//! | `event` | `manifest_push`, `tag_delete`, `manifest_delete`, `blob_delete`, `blob_upload`, `blob_mount`; `auth_failure` (credentials that do not verify), `access_denied` (the policy or the token's scope refuses); `gc_tag_removed`, `gc_manifest_removed`, `gc_link_removed`, `blob_bytes_deleted` (the collector, and the clean-up of bytes a refused push left) |
//! | `request_id` | the request's `X-Request-Id` (null for the collector) |
//! | `identity` | the verified user name; null for anonymous callers and the collector |
//! | `claimed_user` | `auth_failure` only: the user name of refused Basic credentials |
//! | `source` | the client's address and port (null when the server does not provide it) |
//! | `repository`, `digest` | what changed |
//! | `tags` | `manifest_push`: every tag now pointing at the manifest through this push (a tag move is a push by tag) |
//! | `tag` | `tag_delete`, `gc_tag_removed` |
//! | `from` | `blob_mount`: the source repository, when the client named one |
//! | `subject` | `manifest_push` of a referrer |
//! | `action`, `reason` | `access_denied`, `auth_failure`: what was asked, and why it was refused |

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use registry_core::access::Identity;
use registry_core::{Digest, RepoName, Tag};

use crate::access_log::{ReqView, RequestContext};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::metrics::AuthResult;
use crate::routes::AppState;

/// Where audit lines go: a file, a tracing target, or any writer.
///
/// ```no_run
/// # fn main() -> std::io::Result<()> {
/// use registry_http::{AuditLog, HttpConfig};
///
/// let audit = AuditLog::open("/var/log/registry/audit.jsonl")?.with_fsync(true);
/// let config = HttpConfig::default().with_audit(audit);
/// # let _ = config;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct AuditLog {
    sink: Arc<Sink>,
    fsync: bool,
}

enum Sink {
    File {
        path: PathBuf,
        file: Mutex<std::fs::File>,
    },
    Tracing,
    Writer(Mutex<Box<dyn Write + Send>>),
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sink = match &*self.sink {
            Sink::File { path, .. } => format!("file {}", path.display()),
            Sink::Tracing => "tracing target registry_http::audit".to_owned(),
            Sink::Writer(_) => "writer".to_owned(),
        };
        f.debug_struct("AuditLog")
            .field("sink", &sink)
            .field("fsync", &self.fsync)
            .finish()
    }
}

impl AuditLog {
    /// Appends JSON lines to the file at `path` (created if missing). Each line is
    /// written with one `write` call, so lines of concurrent requests never interleave
    /// and a line is in the kernel's hands before the response goes out; add
    /// [`with_fsync`](Self::with_fsync) to have it on disk too.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_owned();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(AuditLog {
            sink: Arc::new(Sink::File {
                path,
                file: Mutex::new(file),
            }),
            fsync: false,
        })
    }

    /// Emits each line as an `info` event of the tracing target
    /// `registry_http::audit`, the JSON object as its message: for processes that ship
    /// their logs elsewhere. Delivery is then the subscriber's business.
    pub fn tracing() -> Self {
        AuditLog {
            sink: Arc::new(Sink::Tracing),
            fsync: false,
        }
    }

    /// Writes JSON lines to `writer` (flushed after each line).
    pub fn writer(writer: impl Write + Send + 'static) -> Self {
        AuditLog {
            sink: Arc::new(Sink::Writer(Mutex::new(Box::new(writer)))),
            fsync: false,
        }
    }

    /// For a file: also `fdatasync` each line before the response goes out, so that an
    /// acknowledged change has its line even after a power loss (costs a disk flush
    /// per change; the change itself was already flushed by a durable store).
    pub fn with_fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// Writes one record; returns once the line is written (and synced, if asked).
    pub(crate) async fn write(&self, record: &Record<'_>) -> std::io::Result<()> {
        match &*self.sink {
            Sink::Tracing => {
                record.with_line(|line| {
                    let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                    tracing::info!(target: "registry_http::audit", "{text}");
                });
                Ok(())
            }
            Sink::Writer(w) => record.with_line(|line| {
                let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                w.write_all(line)?;
                w.flush()
            }),
            Sink::File { .. } if self.fsync => {
                let line = record.with_line(<[u8]>::to_vec);
                // A disk flush can take milliseconds: not on the runtime's threads.
                let sink = self.sink.clone();
                tokio::task::spawn_blocking(move || {
                    let Sink::File { file, .. } = &*sink else {
                        unreachable!("matched above")
                    };
                    let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                    file.write_all(&line)?;
                    file.sync_data()
                })
                .await
                .map_err(std::io::Error::other)?
            }
            // One `write` of a few hundred bytes to the page cache: no need to leave the
            // runtime's thread for it.
            Sink::File { file, .. } => record.with_line(|line| {
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                file.write_all(line)
            }),
        }
    }

    /// Writes `record`; a failure is logged with the line itself (so the record is at
    /// least in the process log) and returned.
    pub(crate) async fn write_or_log(&self, record: &Record<'_>) -> std::io::Result<()> {
        let result = self.write(record).await;
        if let Err(e) = &result {
            let line = record.with_line(|l| String::from_utf8_lossy(l).trim_end().to_owned());
            tracing::error!(error = %e, audit = %line, "the audit log could not be written");
        }
        result
    }
}

/// One audit line.
#[derive(Debug)]
pub(crate) struct Record<'a> {
    time: SystemTime,
    event: &'static str,
    request_id: Option<&'a str>,
    identity: Option<&'a str>,
    claimed_user: Option<&'a str>,
    source: Option<SocketAddr>,
    repository: Option<&'a str>,
    digest: Option<&'a str>,
    tags: Option<&'a [Tag]>,
    tag: Option<&'a str>,
    from: Option<&'a str>,
    subject: Option<&'a str>,
    action: Option<&'a str>,
    reason: Option<&'a str>,
}

impl<'a> Record<'a> {
    /// A record of `event`, now, with no request (the collector's changes).
    pub(crate) fn new(event: &'static str) -> Self {
        Record {
            time: SystemTime::now(),
            event,
            request_id: None,
            identity: None,
            claimed_user: None,
            source: None,
            repository: None,
            digest: None,
            tags: None,
            tag: None,
            from: None,
            subject: None,
            action: None,
            reason: None,
        }
    }
    /// A record of `event` made by the request of `ctx`.
    pub(crate) fn request(event: &'static str, ctx: Option<&'a RequestContext>) -> Self {
        let mut r = Record::new(event);
        if let Some(ctx) = ctx {
            r.request_id = Some(ctx.id());
            r.source = ctx.peer();
            r.identity = ctx.identity().and_then(Identity::name);
        }
        r
    }

    pub(crate) fn identity(mut self, identity: &'a Identity) -> Self {
        self.identity = identity.name();
        self
    }

    pub(crate) fn claimed_user(mut self, user: Option<&'a str>) -> Self {
        self.claimed_user = user;
        self
    }

    pub(crate) fn repository(mut self, repo: Option<&'a RepoName>) -> Self {
        self.repository = repo.map(RepoName::as_str);
        self
    }

    pub(crate) fn digest(mut self, digest: &'a Digest) -> Self {
        self.digest = Some(digest.as_str());
        self
    }

    pub(crate) fn tags(mut self, tags: &'a [Tag]) -> Self {
        self.tags = Some(tags);
        self
    }

    pub(crate) fn tag(mut self, tag: &'a str) -> Self {
        self.tag = Some(tag);
        self
    }

    pub(crate) fn from(mut self, from: Option<&'a RepoName>) -> Self {
        self.from = from.map(RepoName::as_str);
        self
    }

    pub(crate) fn subject(mut self, subject: Option<&'a Digest>) -> Self {
        self.subject = subject.map(Digest::as_str);
        self
    }

    pub(crate) fn action(mut self, action: &'a str) -> Self {
        self.action = Some(action);
        self
    }

    pub(crate) fn reason(mut self, reason: &'a str) -> Self {
        self.reason = Some(reason);
        self
    }

    /// Calls `f` with the record as one JSON line, newline included. Written by hand
    /// into a buffer that each thread reuses: with `serde_json` and a fresh buffer the
    /// line cost a small manifest push about 2% more instructions (callgrind, `benches/
    /// callgrind-overhead.sh`), mostly escaping strings that never need it.
    fn with_line<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        thread_local! {
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                self.write_json(&mut line);
                let result = f(&line);
                // A rare huge line (a push with thousands of tags) is not kept around.
                if line.capacity() > 64 * 1024 {
                    *line = Vec::new();
                }
                result
            }
            // `f` writing another record on this thread (a tracing subscriber that
            // audits): a buffer of its own.
            Err(_) => {
                let mut line = Vec::new();
                self.write_json(&mut line);
                f(&line)
            }
        })
    }

    /// Appends the JSON object and a newline to `out`: the fields in a fixed order,
    /// `request_id`, `identity` and `source` as `null` when unknown, the others only
    /// when they apply.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        write_time(out, self.time);
        out.extend_from_slice(b"\",\"event\":");
        plain_str(out, self.event);
        out.extend_from_slice(b",\"request_id\":");
        match self.request_id {
            Some(id) => plain_str(out, id),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"identity\":");
        match self.identity {
            Some(name) => json_str(out, name),
            None => out.extend_from_slice(b"null"),
        }
        if let Some(user) = self.claimed_user {
            out.extend_from_slice(b",\"claimed_user\":");
            json_str(out, user);
        }
        out.extend_from_slice(b",\"source\":");
        match self.source {
            Some(addr) => {
                out.push(b'"');
                write_addr(out, addr);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        if let Some(repo) = self.repository {
            out.extend_from_slice(b",\"repository\":");
            plain_str(out, repo);
        }
        if let Some(digest) = self.digest {
            out.extend_from_slice(b",\"digest\":");
            plain_str(out, digest);
        }
        if let Some(tags) = self.tags {
            out.extend_from_slice(b",\"tags\":[");
            for (i, tag) in tags.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                plain_str(out, tag.as_str());
            }
            out.push(b']');
        }
        if let Some(tag) = self.tag {
            out.extend_from_slice(b",\"tag\":");
            json_str(out, tag);
        }
        if let Some(from) = self.from {
            out.extend_from_slice(b",\"from\":");
            plain_str(out, from);
        }
        if let Some(subject) = self.subject {
            out.extend_from_slice(b",\"subject\":");
            plain_str(out, subject);
        }
        if let Some(action) = self.action {
            out.extend_from_slice(b",\"action\":");
            json_str(out, action);
        }
        if let Some(reason) = self.reason {
            out.extend_from_slice(b",\"reason\":");
            json_str(out, reason);
        }
        out.extend_from_slice(b"}\n");
    }
}

/// Whether `s` needs escaping in a JSON string.
fn needs_escape(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// A string whose grammar leaves nothing to escape: event names, request ids (checked
/// or made by the router), repository names, digests and tags (parsed types). Copied
/// as it is: most of a line, and checking it byte by byte was most of its cost.
pub(crate) fn plain_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(!needs_escape(s), "{s:?} needs escaping");
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// A JSON string, escaped as `serde_json` escapes it (`"`, `\\` and control
/// characters; everything else as it is, UTF-8 included).
pub(crate) fn json_str(out: &mut Vec<u8>, s: &str) {
    if !needs_escape(s) {
        plain_str(out, s);
        return;
    }
    out.push(b'"');
    for b in s.bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b if b < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            b => out.push(b),
        }
    }
    out.push(b'"');
}

/// `t` as [`write_rfc3339_millis`] writes it, the date and time to the second
/// formatted once a second per thread (the civil date computation was a third of a
/// line's cost).
fn write_time(out: &mut Vec<u8>, t: SystemTime) {
    thread_local! {
        /// The second last formatted on this thread, and `YYYY-MM-DDTHH:MM:SS.` for it.
        static SECOND: std::cell::Cell<(u64, [u8; 20])> =
            const { std::cell::Cell::new((u64::MAX, [0; 20])) };
    }
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let second = since.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != second {
        let mut full = Vec::with_capacity(24);
        write_rfc3339_millis(
            &mut full,
            UNIX_EPOCH + std::time::Duration::from_secs(second),
        );
        text.copy_from_slice(&full[..20]);
        SECOND.set((second, text));
    }
    let ms = since.subsec_millis();
    out.extend_from_slice(&text);
    out.extend_from_slice(&[
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ]);
}

/// `n` in decimal; the short numbers (address octets, ports) without a loop.
#[inline]
pub(crate) fn write_num(out: &mut Vec<u8>, n: u64) {
    let d = |x: u64| b'0' + (x % 10) as u8;
    match n {
        0..10 => out.push(d(n)),
        10..100 => out.extend_from_slice(&[d(n / 10), d(n)]),
        100..1000 => out.extend_from_slice(&[d(n / 100), d(n / 10), d(n)]),
        1000..10_000 => out.extend_from_slice(&[d(n / 1000), d(n / 100), d(n / 10), d(n)]),
        10_000..100_000 => {
            out.extend_from_slice(&[d(n / 10_000), d(n / 1000), d(n / 100), d(n / 10), d(n)])
        }
        _ => write_long_num(out, n),
    }
}

fn write_long_num(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `t` as RFC 3339 UTC with milliseconds (`2024-05-01T12:34:56.789Z`), as
/// `humantime::format_rfc3339_millis` writes it, for the years it can write (1970 to
/// 9999; earlier times are written as 1970).
pub(crate) fn write_rfc3339_millis(out: &mut Vec<u8>, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's `civil_from_days`), for days >= 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut text = *b"0000-00-00T00:00:00.000Z";
    let mut digits = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    digits(0, 4, year.min(9999));
    digits(5, 2, month);
    digits(8, 2, day);
    digits(11, 2, rem / 3_600);
    digits(14, 2, rem % 3_600 / 60);
    digits(17, 2, rem % 60);
    digits(20, 3, u64::from(since.subsec_millis()));
    out.extend_from_slice(&text);
}

/// A client's address as `Display` writes it (`127.0.0.1:5000`, `[::1]:5000`).
pub(crate) fn write_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_num(out, u64::from(octet));
            }
            out.push(b':');
            write_num(out, u64::from(a.port()));
        }
        // Writing into a Vec cannot fail.
        SocketAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// How the handlers report to the metrics and the audit log: kept here, beside the
/// records, so that the request handling in `routes.rs` stays about requests.
impl AppState {
    /// Counts verified credentials and notes who they belong to.
    pub(crate) fn authenticated(&self, req: ReqView<'_>, caller: &Caller) {
        if let Some(m) = &self.observer.metrics {
            m.auth(AuthResult::Success);
        }
        if let Some(ctx) = req.ctx {
            ctx.set_identity(&caller.identity);
        }
    }

    /// Counts refused credentials and writes an `auth_failure` line (a failure to
    /// write it is logged; the request is refused either way).
    pub(crate) async fn credentials_refused(
        &self,
        req: ReqView<'_>,
        claimed: Option<&str>,
        e: &ApiError,
    ) {
        if let Some(m) = &self.observer.metrics {
            m.auth(AuthResult::InvalidCredentials);
        }
        if let Some(audit) = &self.observer.audit {
            let repo = crate::access_log::repository_of(req.uri.path());
            let record = Record::request("auth_failure", req.ctx)
                .claimed_user(claimed)
                .repository(repo.as_ref())
                .reason(e.message());
            let _ = audit.write_or_log(&record).await;
        }
    }

    /// Counts credentials held back by the failed-authentication throttle and writes an
    /// `auth_throttled` line naming what is locked (`identity` or `address`).
    pub(crate) async fn credentials_throttled(
        &self,
        req: ReqView<'_>,
        claimed: Option<&str>,
        locked_by: &str,
        e: &ApiError,
    ) {
        if let Some(m) = &self.observer.metrics {
            m.auth(AuthResult::Throttled);
        }
        tracing::warn!(
            claimed_user = claimed,
            source = ?req.ctx.and_then(|c| c.peer()),
            locked_by,
            "authentication throttled after repeated failures"
        );
        if let Some(audit) = &self.observer.audit {
            let repo = crate::access_log::repository_of(req.uri.path());
            let record = Record::request("auth_throttled", req.ctx)
                .claimed_user(claimed)
                .repository(repo.as_ref())
                .action(locked_by)
                .reason(e.message());
            let _ = audit.write_or_log(&record).await;
        }
    }

    /// Counts an authorization refusal: a 401 asks an anonymous caller for credentials
    /// (a challenge, the normal first step of a client's handshake); a 403 refuses a
    /// known caller or a token's scope, and is written to the audit log.
    pub(crate) async fn access_refused(
        &self,
        req: ReqView<'_>,
        caller: &Caller,
        repo: Option<&RepoName>,
        action: &str,
        e: &ApiError,
    ) {
        let challenge = e.status() == StatusCode::UNAUTHORIZED;
        if let Some(m) = &self.observer.metrics {
            m.auth(if challenge {
                AuthResult::Challenge
            } else {
                AuthResult::Denied
            });
        }
        if challenge {
            return;
        }
        if let Some(audit) = &self.observer.audit {
            let record = Record::request("access_denied", req.ctx)
                .identity(&caller.identity)
                .repository(repo)
                .action(action)
                .reason(e.message());
            let _ = audit.write_or_log(&record).await;
        }
    }

    /// Writes the audit line of a change the registry has made, before its success
    /// response goes out. If the line cannot be written the client gets a 500: an
    /// acknowledged change always has its line.
    pub(crate) async fn audit(&self, record: Record<'_>) -> Result<(), ApiError> {
        let Some(audit) = &self.observer.audit else {
            return Ok(());
        };
        audit.write_or_log(&record).await.map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "the audit log could not be written",
            )
        })
    }
}

/// The user name of Basic credentials, for the `claimed_user` of a refused login
/// (never the password). At most 256 bytes of it: the field is the client's to fill.
pub(crate) fn claimed_user(headers: &axum::http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
    let mut end = user.len().min(256);
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    Some(user[..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn lines_are_json_with_only_the_fields_that_apply() {
        let out = Shared::default();
        let log = AuditLog::writer(out.clone());
        let repo = RepoName::parse("a/b").unwrap();
        let digest = Digest::sha256(b"x");
        let tags = [Tag::parse("v1").unwrap()];
        let user = Identity::user("ci");
        let mut record = Record::new("manifest_push")
            .identity(&user)
            .repository(Some(&repo))
            .digest(&digest)
            .tags(&tags)
            .action("push \"x\"\n");
        record.source = Some("[::1]:5000".parse().unwrap());
        log.write(&record).await.unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["event"], "manifest_push");
        assert_eq!(v["identity"], "ci");
        assert_eq!(v["repository"], "a/b");
        assert_eq!(v["tags"], serde_json::json!(["v1"]));
        assert_eq!(v["action"], "push \"x\"\n");
        assert_eq!(v["source"], "[::1]:5000");
        assert!(v["request_id"].is_null());
        assert!(v.get("tag").is_none() && v.get("reason").is_none());
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn times_are_written_as_humantime_writes_them() {
        let mut ms: u64 = 0;
        let fixed = [0, 951_782_400_000, 1_709_164_799_999, 4_102_444_800_001];
        for i in 0..2_000u64 {
            // Fixed edges (leap days, centuries), then pseudo-random times up to 9999.
            ms = match fixed.get(i as usize) {
                Some(&t) => t,
                None => {
                    ms.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i) % 253_402_300_799_999
                }
            };
            let t = UNIX_EPOCH + std::time::Duration::from_millis(ms);
            let want = humantime::format_rfc3339_millis(t).to_string();
            let mut out = Vec::new();
            write_rfc3339_millis(&mut out, t);
            assert_eq!(String::from_utf8(out).unwrap(), want);
            // The same through the per-thread cache of the second, twice (a miss,
            // then a hit), and a millisecond later within the same second.
            for _ in 0..2 {
                let mut out = Vec::new();
                write_time(&mut out, t);
                assert_eq!(String::from_utf8(out).unwrap(), want);
            }
            let next = t + std::time::Duration::from_millis(1);
            let mut out = Vec::new();
            write_time(&mut out, next);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                humantime::format_rfc3339_millis(next).to_string()
            );
        }
        for n in [
            0,
            9,
            10,
            99,
            100,
            999,
            1000,
            9999,
            10_000,
            65_535,
            99_999,
            100_000,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            write_num(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
    }

    #[test]
    fn strings_and_addresses_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "plain/repo",
            "q\"uote",
            "back\\slash",
            "l\ni\r\tn\u{8}\u{c}",
            "\u{1}\u{1f}\u{7f}",
            "ünï ✓",
        ] {
            let mut out = Vec::new();
            json_str(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
        for addr in [
            "127.0.0.1:5000",
            "10.255.0.9:1",
            "[::1]:443",
            "[fe80::1%2]:80",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            write_addr(&mut out, addr);
            assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
        }
    }

    #[test]
    fn claimed_users_come_from_basic_credentials_only() {
        use base64::Engine as _;
        let mut h = axum::http::HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode("ci:secret");
        h.insert("authorization", format!("Basic {v}").parse().unwrap());
        assert_eq!(claimed_user(&h).as_deref(), Some("ci"));
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(claimed_user(&h), None);
    }
}
