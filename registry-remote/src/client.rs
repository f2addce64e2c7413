//! Transport: the hyper client, requests with authentication, retries and redirects,
//! and the mapping of a registry's answers to [`registry_core::Error`].

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use registry_core::{Digest, Error, Reference, RepoName, Result};
use tokio::sync::oneshot;

use crate::auth::{AuthState, Cached, Challenge, Credentials, Scheme, TokenResponse, challenges};
use crate::url::{Origin, describe, resolve, with_query};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request bodies: empty, whole (replayable) or streamed (sent once). Unsync because
/// a blob's `ByteStream` is `Send` but not `Sync`.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;
type HttpClient = Client<Connector, Body>;

/// Redirects followed at most for one request (blob downloads go to storage once;
/// more hops is a loop or a misconfiguration).
const MAX_REDIRECTS: u32 = 5;
/// The longest `Retry-After` honoured: a registry asking for more is better reported
/// than waited for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Backoff: the first pause, and the cap of the doubling.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Bytes of an error body read to learn its OCI error code.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Settings of a [`RemoteRegistry`](crate::RemoteRegistry).
#[derive(Clone)]
pub(crate) struct Config {
    /// `scheme://authority`, no trailing slash.
    pub(crate) base_url: String,
    pub(crate) base: Uri,
    pub(crate) origin: Origin,
    pub(crate) credentials: Credentials,
    pub(crate) retries: u32,
    pub(crate) timeout: Duration,
    pub(crate) user_agent: HeaderValue,
    pub(crate) max_manifest_size: u64,
}

/// A client's state: its settings, connection pool and what it learnt about the
/// registry's authentication.
pub(crate) struct Inner {
    pub(crate) config: Config,
    http: HttpClient,
    auth: Mutex<AuthState>,
}

/// One logical request: sent again on retries, after a 401, and to redirect targets.
pub(crate) struct Call {
    method: Method,
    uri: Uri,
    /// Token scopes the request needs (empty for `/v2/`).
    scopes: Vec<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    payload: Payload,
    follow_redirects: bool,
    /// Whether this request goes through the registry's authentication flow (token
    /// requests do not: they carry their own Basic credentials).
    authenticate: bool,
    /// Retries allowed, when not the client's setting.
    retries: Option<u32>,
}

enum Payload {
    Empty,
    Bytes(Bytes),
    /// Sent once; the receiver fires when the body has been sent whole.
    Stream(Option<(Body, oneshot::Receiver<()>)>),
}

impl Payload {
    fn replayable(&self) -> bool {
        !matches!(self, Payload::Stream(_))
    }
}

impl Call {
    pub(crate) fn new(method: Method, uri: Uri, scopes: Vec<String>) -> Self {
        Call {
            method,
            uri,
            scopes,
            headers: Vec::new(),
            payload: Payload::Empty,
            follow_redirects: false,
            authenticate: true,
            retries: None,
        }
    }

    pub(crate) fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub(crate) fn bytes(mut self, bytes: Bytes) -> Self {
        self.payload = Payload::Bytes(bytes);
        self
    }

    /// A streamed body: never sent twice, so neither retried nor re-authenticated.
    /// `sent` fires once the body has been sent whole: the response timeout starts
    /// then, not when the request starts.
    pub(crate) fn stream(mut self, body: Body, sent: oneshot::Receiver<()>) -> Self {
        self.payload = Payload::Stream(Some((body, sent)));
        self
    }

    pub(crate) fn follow_redirects(mut self) -> Self {
        self.follow_redirects = true;
        self
    }

    /// For best-effort clean-ups that are not worth waiting for.
    pub(crate) fn no_retries(mut self) -> Self {
        self.retries = Some(0);
        self
    }
}

/// A registry's answer that the transport did not handle itself.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// The URL that answered (after redirects).
    pub(crate) uri: Uri,
    /// Method and path of that request, for messages.
    pub(crate) what: String,
    body: Incoming,
    timeout: Duration,
    attempts: u32,
}

/// What a request was about, to map a 404 or an OCI error code to the right error.
#[derive(Clone, Copy)]
pub(crate) enum Subject<'a> {
    None,
    Repo(&'a RepoName),
    Manifest(&'a RepoName, &'a Reference),
    Blob(&'a RepoName, &'a Digest),
}

pub(crate) fn upstream(reason: impl Into<String>) -> Error {
    Error::Upstream {
        reason: reason.into(),
    }
}

impl Inner {
    pub(crate) fn new(config: Config) -> Self {
        let http = http_client(config.timeout);
        Inner {
            config,
            http,
            auth: Mutex::new(AuthState::default()),
        }
    }

    /// An absolute URL on the registry.
    pub(crate) fn url(&self, path_and_query: &str) -> Result<Uri> {
        format!("{}{path_and_query}", self.config.base_url)
            .parse()
            .map_err(|_| upstream(format!("cannot build a URL for {path_and_query:?}")))
    }

    fn auth(&self) -> MutexGuard<'_, AuthState> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `call` through the authentication flow: the credentials cached for its
    /// scopes, else anonymously; on a 401 (or a 403 asking for a wider token) once
    /// more with fresh credentials. A refusal of fresh credentials is
    /// [`Error::Denied`]; other answers are returned for the caller to read.
    pub(crate) async fn send(&self, mut call: Call) -> Result<Answer> {
        let key = call.scopes.join(" ");
        let mut fresh = false;
        loop {
            // Bound first: the guard must not live across the awaits below.
            let cached = self.auth().lookup(&key, &self.config.credentials);
            let authorization = match cached {
                Cached::Header(v) => Some(v),
                Cached::Nothing => None,
                Cached::Fetch { realm, service } if !fresh => {
                    // The registry wants tokens: fetch one before the first request
                    // rather than after its 401.
                    self.fetch_token(&realm, service.as_deref(), &call.scopes, &key)
                        .await?;
                    fresh = true;
                    let cached = self.auth().lookup(&key, &self.config.credentials);
                    match cached {
                        Cached::Header(v) => Some(v),
                        _ => None,
                    }
                }
                Cached::Fetch { .. } => None,
            };
            let answer = self.transport(&mut call, authorization).await?;
            let retry_auth = match answer.status {
                StatusCode::UNAUTHORIZED => true,
                // RFC 6750: a valid token lacking a scope; a wider token may do.
                StatusCode::FORBIDDEN => challenges(&answer.headers).iter().any(|c| {
                    matches!(c, Challenge::Bearer { error: Some(e), .. } if e == "insufficient_scope")
                }),
                _ => false,
            };
            if !retry_auth {
                return Ok(answer);
            }
            if !self.config.origin.contains(&answer.uri) {
                let (what, status) = (answer.what.clone(), answer.status);
                answer.discard().await;
                return Err(Error::Denied {
                    reason: format!(
                        "{what} answered {status}; credentials are only sent to the registry itself"
                    ),
                });
            }
            if fresh || !call.payload.replayable() {
                // Refused with what we just got (or cannot send again): the registry's
                // own message says why.
                return Err(match answer.fail(Subject::None).await {
                    Error::Denied { reason }
                        if self.config.credentials == Credentials::Anonymous =>
                    {
                        Error::Denied {
                            reason: format!("{reason} (no credentials are configured)"),
                        }
                    }
                    e => e,
                });
            }
            let found = challenges(&answer.headers);
            let what = answer.what.clone();
            answer.discard().await;
            self.authenticate(&found, &call.scopes, &key, &what).await?;
            fresh = true;
        }
    }

    /// Learns the scheme of a challenge and gets what it asks for.
    async fn authenticate(
        &self,
        found: &[Challenge],
        scopes: &[String],
        key: &str,
        what: &str,
    ) -> Result<()> {
        match found.first() {
            Some(Challenge::Bearer {
                realm,
                service,
                scopes: asked,
                ..
            }) => {
                let realm = resolve(&self.config.base, realm)
                    .map_err(|e| upstream(format!("{what}: token realm: {e}")))?
                    .to_string();
                self.auth().set_scheme(Scheme::Bearer {
                    realm: realm.clone(),
                    service: service.clone(),
                });
                // What the registry asked for, and what this client will need next on
                // the same repository (push after a HEAD, say).
                let mut wanted = scopes.to_vec();
                for s in asked {
                    if !wanted.contains(s) {
                        wanted.push(s.clone());
                    }
                }
                self.fetch_token(&realm, service.as_deref(), &wanted, key)
                    .await
            }
            Some(Challenge::Basic) => match self.config.credentials {
                Credentials::Anonymous => Err(Error::Denied {
                    reason: format!(
                        "{what}: the registry requires credentials (Basic) and none are configured"
                    ),
                }),
                _ => {
                    self.auth().set_scheme(Scheme::Basic);
                    Ok(())
                }
            },
            Some(Challenge::Other(scheme)) => Err(Error::Denied {
                reason: format!("{what}: unsupported authentication scheme {scheme:?}"),
            }),
            None => Err(Error::Denied {
                reason: format!("{what}: refused without an authentication challenge"),
            }),
        }
    }

    /// Gets a token for `scopes` from `realm` and caches it under `key`.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        key: &str,
    ) -> Result<()> {
        let bad_realm = |e: String| upstream(format!("token realm: {e}"));
        let mut uri: Uri = realm.parse().map_err(|_| bad_realm("not a URL".into()))?;
        if let Some(service) = service {
            uri = with_query(&uri, "service", service).map_err(bad_realm)?;
        }
        for scope in scopes {
            uri = with_query(&uri, "scope", scope).map_err(bad_realm)?;
        }
        let mut call = Call::new(Method::GET, uri, Vec::new());
        call.authenticate = false;
        let answer = self
            .transport(&mut call, self.config.credentials.basic_header())
            .await?;
        let what = answer.what.clone();
        match answer.status {
            StatusCode::OK => {}
            // 401 and 403 are refusals of the credentials (as `Denied`, with the
            // token server's message); anything else is the token server failing.
            _ => {
                return Err(match answer.fail(Subject::None).await {
                    Error::Denied { reason } => Error::Denied {
                        reason: format!("token endpoint {reason}"),
                    },
                    e => e,
                });
            }
        }
        let body = answer
            .read(ERROR_BODY_LIMIT as u64, "token response")
            .await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| upstream(format!("token endpoint {what}: not a token response: {e}")))?;
        let (token, lifetime) = parsed
            .token()
            .ok_or_else(|| upstream(format!("token endpoint {what}: no token in the response")))?;
        self.auth()
            .store(key.to_owned(), token, lifetime)
            .ok_or_else(|| {
                upstream(format!(
                    "token endpoint {what}: the token is not a header value"
                ))
            })
    }

    /// Sends `call` with `authorization` (only to the registry's own origin, unless the
    /// call is a token request), retrying connection failures, 5xx and 429 for bodies
    /// that can be sent again, and following redirects when asked to.
    async fn transport(
        &self,
        call: &mut Call,
        authorization: Option<HeaderValue>,
    ) -> Result<Answer> {
        let retries = call.retries.unwrap_or(self.config.retries);
        let mut attempt = 0u32;
        let mut uri = call.uri.clone();
        let mut method = call.method.clone();
        let mut redirects = 0;
        loop {
            let what = describe(&method, &uri);
            let (body, sent) = match &mut call.payload {
                Payload::Empty => (
                    Empty::new().map_err(|never| match never {}).boxed_unsync(),
                    None,
                ),
                Payload::Bytes(b) => (
                    Full::new(b.clone())
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                    None,
                ),
                Payload::Stream(s) => match s.take() {
                    Some((body, sent)) => (body, Some(sent)),
                    None => {
                        return Err(upstream(format!(
                            "{what}: the request body was streamed once and cannot be sent again"
                        )));
                    }
                },
            };
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .body(body)
                .map_err(|e| upstream(format!("{what}: cannot build the request: {e}")))?;
            let headers = req.headers_mut();
            headers.insert(header::USER_AGENT, self.config.user_agent.clone());
            for (name, value) in &call.headers {
                headers.insert(name.clone(), value.clone());
            }
            // Never to another host: a redirect to storage must not carry our token.
            if let Some(a) = &authorization
                && (!call.authenticate || self.config.origin.contains(&uri))
            {
                headers.insert(header::AUTHORIZATION, a.clone());
            }
            let replayable = call.payload.replayable();
            let resp = match self.exchange(req, sent).await {
                Ok(resp) => resp,
                Err(why) if replayable && attempt < retries => {
                    pause(&what, attempt, None, &why).await;
                    attempt += 1;
                    (uri, method, redirects) = (call.uri.clone(), call.method.clone(), 0);
                    continue;
                }
                Err(why) => {
                    return Err(upstream(format!("{what}: {why}{}", tries(attempt + 1))));
                }
            };
            let (parts, body) = resp.into_parts();
            let answer = Answer {
                status: parts.status,
                headers: parts.headers,
                uri: uri.clone(),
                what,
                body,
                timeout: self.config.timeout,
                attempts: attempt + 1,
            };
            let status = answer.status;
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                if replayable && attempt < retries {
                    let retry_after = answer
                        .header(header::RETRY_AFTER)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
                    let what = answer.what.clone();
                    answer.discard().await;
                    pause(&what, attempt, retry_after, &status.to_string()).await;
                    attempt += 1;
                    (uri, method, redirects) = (call.uri.clone(), call.method.clone(), 0);
                    continue;
                }
                return Err(answer.fail(Subject::None).await);
            }
            let redirect = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
            if call.follow_redirects && redirect {
                let next = answer.location()?;
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(upstream(format!(
                        "{}: more than {MAX_REDIRECTS} redirects",
                        describe(&call.method, &call.uri)
                    )));
                }
                answer.discard().await;
                if status == StatusCode::SEE_OTHER && method != Method::HEAD {
                    method = Method::GET;
                }
                uri = next;
                continue;
            }
            return Ok(answer);
        }
    }

    /// One exchange, bounded by the timeout: from the start for a whole body, from the
    /// end of the body for a streamed one (an upload takes as long as it takes).
    async fn exchange(
        &self,
        req: Request<Body>,
        sent: Option<oneshot::Receiver<()>>,
    ) -> std::result::Result<Response<Incoming>, String> {
        let timeout = self.config.timeout;
        let request = self.http.request(req);
        match sent {
            None => match tokio::time::timeout(timeout, request).await {
                Ok(r) => r.map_err(|e| error_chain(&e)),
                Err(_) => Err(format!("no response within {timeout:?}")),
            },
            Some(sent) => {
                let deadline = async move {
                    // Also when the body failed (the sender is dropped): hyper then
                    // fails the request promptly anyway.
                    let _ = sent.await;
                    tokio::time::sleep(timeout).await;
                };
                tokio::select! {
                    r = request => r.map_err(|e| error_chain(&e)),
                    () = deadline => Err(format!("no response within {timeout:?} after the body")),
                }
            }
        }
    }
}

async fn pause(what: &str, attempt: u32, retry_after: Option<Duration>, why: &str) {
    let delay = retry_after.unwrap_or_else(|| backoff(attempt));
    tracing::debug!(request = %what, attempt = attempt + 1, ?delay, reason = %why, "retrying");
    tokio::time::sleep(delay).await;
}

/// The pause before retry `attempt + 1`: 100 ms doubling up to 5 s, each drawn from
/// its upper half so that clients failing together do not retry together.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let full = FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF);
    let half = full / 2;
    half + half.mul_f64((random() % 1000) as f64 / 1000.0)
}

/// A random number for jitter, from the standard library's per-instance random hash
/// keys (no dependency for something this unimportant).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

fn tries(attempts: u32) -> String {
    if attempts > 1 {
        format!(" (after {attempts} attempts)")
    } else {
        String::new()
    }
}

/// An error and its sources, which say what failed (hyper's own message is generic).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl Answer {
    pub(crate) fn header(&self, name: HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn content_length(&self) -> Option<u64> {
        self.header(header::CONTENT_LENGTH)?.trim().parse().ok()
    }

    /// The `Location` header, resolved against the URL that answered.
    pub(crate) fn location(&self) -> Result<Uri> {
        let location = self.header(header::LOCATION).ok_or_else(|| {
            upstream(format!(
                "{} answered {} without a Location",
                self.what, self.status
            ))
        })?;
        resolve(&self.uri, location).map_err(|e| upstream(format!("{}: Location: {e}", self.what)))
    }

    /// The whole body, refused beyond `limit` bytes ([`Error::TooLarge`]).
    pub(crate) async fn read(self, limit: u64, what: &'static str) -> Result<Bytes> {
        if self.content_length().is_some_and(|len| len > limit) {
            return Err(Error::TooLarge { what, limit });
        }
        let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
        let collect = Limited::new(self.body, limit_usize).collect();
        match tokio::time::timeout(self.timeout, collect).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Err(Error::TooLarge { what, limit })
            }
            Ok(Err(e)) => Err(upstream(format!(
                "{}: reading the body failed: {}",
                self.what,
                error_chain(&*e)
            ))),
            Err(_) => Err(upstream(format!(
                "{}: the body did not arrive within {:?}",
                self.what, self.timeout
            ))),
        }
    }

    pub(crate) fn into_body(self) -> Incoming {
        self.body
    }

    /// Reads a little of the body so that the connection can be reused, then drops it.
    pub(crate) async fn discard(self) {
        let collect = Limited::new(self.body, ERROR_BODY_LIMIT).collect();
        let _ = tokio::time::timeout(self.timeout, collect).await;
    }

    /// The error this answer stands for.
    pub(crate) async fn fail(self, subject: Subject<'_>) -> Error {
        let (status, headers, what, attempts) = (
            self.status,
            self.headers.clone(),
            self.what.clone(),
            self.attempts,
        );
        let collect = Limited::new(self.body, ERROR_BODY_LIMIT).collect();
        let body = match tokio::time::timeout(self.timeout, collect).await {
            Ok(Ok(c)) => c.to_bytes(),
            _ => Bytes::new(),
        };
        error_for(status, &headers, &body, &what, subject, attempts)
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(serde::Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// The first OCI error of a body: code and message (bounded, without control
/// characters: it ends up in logs).
pub(crate) fn oci_error(body: &[u8]) -> (String, String) {
    let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
        return (String::new(), String::new());
    };
    let Some(first) = parsed.errors.into_iter().next() else {
        return (String::new(), String::new());
    };
    let clean = |s: &str, max: usize| -> String {
        s.chars()
            .filter(|c| !c.is_control())
            .take(max)
            .collect::<String>()
    };
    (
        clean(&first.code, 64).to_ascii_uppercase(),
        clean(&first.message, 300),
    )
}

/// Maps an answer that is not a success to the registry error it stands for.
pub(crate) fn error_for(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    what: &str,
    subject: Subject<'_>,
    attempts: u32,
) -> Error {
    let (code, message) = oci_error(body);
    let mut reason = format!("{what} answered {status}");
    if !code.is_empty() {
        reason.push(' ');
        reason.push_str(&code);
    }
    if !message.is_empty() {
        reason.push_str(": ");
        reason.push_str(&message);
    }
    reason.push_str(&tries(attempts));
    let repo = match subject {
        Subject::Repo(r) | Subject::Manifest(r, _) | Subject::Blob(r, _) => Some(r),
        Subject::None => None,
    };
    match (code.as_str(), subject) {
        ("MANIFEST_UNKNOWN", Subject::Manifest(_, reference)) => {
            return Error::ManifestUnknown {
                reference: reference.to_string(),
            };
        }
        ("BLOB_UNKNOWN", Subject::Blob(_, digest)) => {
            return Error::BlobUnknown {
                digest: digest.clone(),
            };
        }
        ("NAME_UNKNOWN", _) if repo.is_some() => {
            return Error::NameUnknown {
                repo: repo.cloned().expect("checked"),
            };
        }
        ("MANIFEST_INVALID", _) => {
            return Error::ManifestInvalid {
                reason: if message.is_empty() { reason } else { message },
            };
        }
        ("MANIFEST_BLOB_UNKNOWN", _) => {
            return match find_digest(&message) {
                Some(digest) => Error::ManifestBlobUnknown { digest },
                None => Error::ManifestInvalid { reason },
            };
        }
        _ => {}
    }
    if code == "DENIED" || status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
        return Error::Denied { reason };
    }
    if code == "TOOMANYREQUESTS" || status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Error::TooManyRequests {
            reason,
            retry_after,
        };
    }
    if code == "UNSUPPORTED" || status == StatusCode::METHOD_NOT_ALLOWED {
        return Error::Unsupported { what: reason };
    }
    if status == StatusCode::NOT_FOUND {
        match subject {
            Subject::Manifest(_, reference) => {
                return Error::ManifestUnknown {
                    reference: reference.to_string(),
                };
            }
            Subject::Blob(_, digest) => {
                return Error::BlobUnknown {
                    digest: digest.clone(),
                };
            }
            Subject::Repo(repo) => return Error::NameUnknown { repo: repo.clone() },
            Subject::None => {}
        }
    }
    // Any other refusal of the request itself (CNCF Distribution answers a tag delete
    // with 400 DIGEST_INVALID) is for good: the same request would be refused again.
    // `Upstream` stays for what a retry may fix (5xx, timeouts, broken connections).
    if status.is_client_error() && status != StatusCode::REQUEST_TIMEOUT {
        return Error::Unsupported { what: reason };
    }
    upstream(reason)
}

/// The first digest named in a message (`... blob sha256:abc... is ...`).
fn find_digest(message: &str) -> Option<Digest> {
    for algorithm in ["sha256:", "sha512:"] {
        if let Some(at) = message.find(algorithm) {
            let rest = &message[at + algorithm.len()..];
            let hex_len = rest.bytes().take_while(|b| b.is_ascii_hexdigit()).count();
            if let Ok(d) = Digest::parse(&message[at..at + algorithm.len() + hex_len]) {
                return Some(d);
            }
        }
    }
    None
}

fn http_client(timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    #[cfg(feature = "tls")]
    let connector = {
        http.enforce_http(false);
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config().clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http)
    };
    #[cfg(not(feature = "tls"))]
    let connector = http;
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector)
}

/// The TLS settings, made once per process: reading the system's root certificates
/// takes milliseconds, and every client uses the same ones.
#[cfg(feature = "tls")]
fn tls_config() -> &'static rustls::ClientConfig {
    static CONFIG: std::sync::OnceLock<rustls::ClientConfig> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "registry-remote: cannot read some of the system's root certificates");
        }
        let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> RepoName {
        RepoName::parse("team/app").unwrap()
    }

    fn map(status: u16, body: &str, subject: Subject<'_>) -> Error {
        error_for(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            body.as_bytes(),
            "GET /v2/team/app/x",
            subject,
            1,
        )
    }

    fn oci(code: &str, message: &str) -> String {
        serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]})
            .to_string()
    }

    #[test]
    fn errors_map_to_registry_errors() {
        let r = repo();
        let tag = Reference::parse("v1").unwrap();
        let d = Digest::sha256(b"x");
        let m = Subject::Manifest(&r, &tag);
        let b = Subject::Blob(&r, &d);
        assert!(
            matches!(map(404, &oci("MANIFEST_UNKNOWN", ""), m), Error::ManifestUnknown { reference } if reference == "v1")
        );
        assert!(matches!(map(404, "", m), Error::ManifestUnknown { .. }));
        assert!(
            matches!(map(404, &oci("BLOB_UNKNOWN", ""), b), Error::BlobUnknown { digest } if digest == d)
        );
        assert!(matches!(map(404, "", b), Error::BlobUnknown { .. }));
        assert!(matches!(
            map(404, &oci("NAME_UNKNOWN", ""), m),
            Error::NameUnknown { .. }
        ));
        assert!(
            matches!(map(403, &oci("DENIED", "no"), m), Error::Denied { reason } if reason.contains("no"))
        );
        assert!(matches!(map(429, "", m), Error::TooManyRequests { .. }));
        assert!(matches!(
            map(405, &oci("UNSUPPORTED", ""), m),
            Error::Unsupported { .. }
        ));
        assert!(
            matches!(map(400, &oci("MANIFEST_INVALID", "bad"), m), Error::ManifestInvalid { reason } if reason == "bad")
        );
        let missing = format!("manifest references blob {d}, which is not in the repository");
        assert!(
            matches!(map(400, &oci("MANIFEST_BLOB_UNKNOWN", &missing), m), Error::ManifestBlobUnknown { digest } if digest == d)
        );
        let e = map(503, "<html>", Subject::None);
        assert!(
            matches!(&e, Error::Upstream { reason } if reason.contains("GET /v2/team/app/x") && reason.contains("503")),
            "{e}"
        );
        // Refusals for good, which a retry cannot fix (a 404 of no known subject: not a
        // registry API; Distribution's answer to a tag delete).
        assert!(matches!(
            map(404, "", Subject::None),
            Error::Unsupported { .. }
        ));
        assert!(matches!(
            map(400, &oci("DIGEST_INVALID", "invalid digest"), m),
            Error::Unsupported { .. }
        ));
        assert!(matches!(map(408, "", m), Error::Upstream { .. }));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        for attempt in 0..20 {
            let d = backoff(attempt);
            let full = FIRST_BACKOFF
                .saturating_mul(1 << attempt.min(16))
                .min(MAX_BACKOFF);
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
        }
        assert!(backoff(30) <= MAX_BACKOFF);
    }
}
