//! Request parsing and handlers: parse, call the core, render.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use registry_core::{
    Algorithm, ByteStream, Digest, ListOptions, PutManifestOptions, Reference, Registry, RepoName,
    Tag, UploadId, UploadOwner,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use registry_core::access::{Action, Identity};

use crate::HttpConfig;
use crate::access_log::{Observer, ReqView, RequestContext};
use crate::audit::Record;
use crate::auth::Caller;
use crate::error::{ApiError, upload_range};
use crate::metrics::{Refusal, Route};
use crate::range::{parse_content_range, parse_range};

/// Shared state of the router.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) registry: Registry,
    /// Shared: the state is cloned for every request, and cloning the configuration
    /// (its metrics, audit log, authentication...) showed in instruction counts.
    pub(crate) config: Arc<HttpConfig>,
    /// The manifest buffer budget, in KiB (a semaphore counts in `u32` steps).
    manifest_budget: Arc<Semaphore>,
    /// Metrics, audit log and access log (`access_log.rs`).
    pub(crate) observer: Arc<Observer>,
}

impl AppState {
    pub(crate) fn new(registry: Registry, config: HttpConfig) -> Self {
        let kib = (config.manifest_buffer_budget / 1024).clamp(1, Semaphore::MAX_PERMITS as u64);
        let observer = Arc::new(Observer::new(
            config.metrics.clone(),
            config.audit.clone(),
            config.access_log.clone(),
        ));
        AppState {
            registry,
            config: Arc::new(config),
            manifest_budget: Arc::new(Semaphore::new(kib as usize)),
            observer,
        }
    }

    /// Reserves room for a manifest body of up to `bytes`; waits a second at most.
    async fn reserve_manifest_buffer(&self, bytes: u64) -> Result<OwnedSemaphorePermit, ApiError> {
        let budget = self.config.manifest_buffer_budget;
        let kib = bytes.div_ceil(1024).clamp(1, (budget / 1024).max(1)) as u32;
        let wait = self.manifest_budget.clone().acquire_many_owned(kib);
        match tokio::time::timeout(Duration::from_secs(1), wait).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                tracing::warn!(
                    bytes,
                    budget,
                    "manifest buffer budget exhausted: push refused"
                );
                Err(registry_core::Error::TooManyRequests {
                    reason: format!(
                        "{budget} bytes of manifest bodies are being received; retry shortly"
                    ),
                    retry_after: None,
                }
                .into())
            }
        }
    }
}

type ApiResult = Result<Response, ApiError>;

const DIGEST_HEADER: &str = "docker-content-digest";
const UPLOAD_UUID_HEADER: &str = "docker-upload-uuid";

/// What a `/v2/...` path names, with the repository name parsed out of it.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Blob(&'a str),
    Uploads(Option<&'a str>),
    Manifest(&'a str),
    Tags,
    Referrers(&'a str),
}

/// Splits `<name>/<kind>/<rest>` at the last marker: repository names may contain any of
/// the markers' words as components, but never after the endpoint.
/// Borrows from `rest`: every request is classified (by the router, and by the metrics
/// for their route label), and copying its parts showed in instruction counts.
fn parse_path(rest: &str) -> Option<(&str, Target<'_>)> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some((name, Target::Tags));
    }
    // The last marker is the one whose closing `/` comes last (a marker has no `/`
    // inside): a walk back over the path segments, which usually stops at the first
    // (three `rfind`s cost about 2,000 instructions a request under callgrind).
    let bytes = rest.as_bytes();
    let mut end = bytes.len();
    let (idx, tail_start, kind) = loop {
        let close = bytes[..end].iter().rposition(|&b| b == b'/')?;
        let open = bytes[..close].iter().rposition(|&b| b == b'/')?;
        let kind = match &bytes[open + 1..close] {
            b"blobs" => 0u8,
            b"manifests" => 1,
            b"referrers" => 2,
            _ => {
                end = close;
                continue;
            }
        };
        break (open, close + 1, kind);
    };
    let name = &rest[..idx];
    let tail = &rest[tail_start..];
    let target = match kind {
        0 => match tail.strip_prefix("uploads") {
            Some("") | Some("/") => Target::Uploads(None),
            Some(id) if id.starts_with('/') && !id[1..].contains('/') => {
                Target::Uploads(Some(&id[1..]))
            }
            _ if tail.contains('/') => return None,
            _ => Target::Blob(tail),
        },
        1 if !tail.contains('/') => Target::Manifest(tail),
        2 if !tail.contains('/') => Target::Referrers(tail),
        _ => return None,
    };
    Some((name, target))
}

/// The route template of `/v2/<rest>` (the metrics' `route` label and the access log's
/// `route`) and the length of the repository name it starts with. The observing layer
/// classifies every request's path once; the handler rebuilds its [`Target`] from this
/// with [`target_at`] rather than parsing the path again.
pub(crate) fn path_kind(rest: &str) -> Option<(Route, usize)> {
    let (name, target) = parse_path(rest)?;
    let route = match target {
        Target::Blob(_) => Route::Blob,
        Target::Uploads(None) => Route::Uploads,
        Target::Uploads(Some(_)) => Route::Upload,
        Target::Manifest(_) => Route::Manifest,
        Target::Tags => Route::Tags,
        Target::Referrers(_) => Route::Referrers,
    };
    Some((route, name.len()))
}

/// What [`parse_path`] returns for `rest`, from what [`path_kind`] found in it.
fn target_at(rest: &str, name_len: usize, route: Route) -> Option<(&str, Target<'_>)> {
    let name = rest.get(..name_len)?;
    let after = &rest[name_len..];
    let target = match route {
        Route::Blob => Target::Blob(after.strip_prefix("/blobs/")?),
        Route::Uploads => Target::Uploads(None),
        Route::Upload => Target::Uploads(Some(after.strip_prefix("/blobs/uploads/")?)),
        Route::Manifest => Target::Manifest(after.strip_prefix("/manifests/")?),
        Route::Tags => Target::Tags,
        Route::Referrers => Target::Referrers(after.strip_prefix("/referrers/")?),
        _ => return None,
    };
    Some((name, target))
}

/// The repository `/v2/<rest>` names, if it is a valid name (for the access log).
pub(crate) fn path_repository(rest: &str) -> Option<RepoName> {
    RepoName::parse(parse_path(rest)?.0).ok()
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such endpoint")
}

/// The query string's `key=value` pairs, decoded, in order; repeated keys (`tag=`,
/// `scope=`) are all kept.
fn query_pairs(req: &Request) -> Vec<(String, String)> {
    req.uri().query().map(parse_query).unwrap_or_default()
}

/// Decodes a query string with `serde_urlencoded` (the WHATWG
/// `application/x-www-form-urlencoded` parser: `%XX` escapes decoded, malformed ones kept
/// as they are, invalid UTF-8 replaced), except that a `+` stays a `+` rather than
/// becoming a space: media types in `artifactType` contain `+`, never spaces, and
/// clients send them unescaped. Request bodies that are forms use
/// [`serde_urlencoded`] as it is ([`token_form`]).
fn parse_query(query: &str) -> Vec<(String, String)> {
    // Decoding into owned string pairs cannot fail: every input is some list of pairs.
    serde_urlencoded::from_str(&query.replace('+', "%2B")).unwrap_or_default()
}

fn first<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn content_length(h: &HeaderMap) -> Result<Option<u64>, ApiError> {
    match header_str(h, "content-length") {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request("SIZE_INVALID", "invalid Content-Length")),
    }
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// Turns a request body into a byte stream that fails if no data arrives for `idle`.
fn body_stream(body: Body, idle: Duration) -> ByteStream {
    let data = body.into_data_stream();
    stream::unfold(Some(data), move |state| async move {
        let mut data = state?;
        match tokio::time::timeout(idle, data.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(data))),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "request body idle timeout",
                )),
                None,
            )),
        }
    })
    .boxed()
}

impl AppState {
    fn location(&self, path: &str) -> String {
        match &self.config.base_url {
            Some(base) => format!("{}{path}", base.trim_end_matches('/')),
            None => path.to_owned(),
        }
    }

    /// Where this registry is reachable, for the token realm in challenges: the
    /// configured base URL, or the address the client used when it is a valid
    /// authority ([`check_host`] refuses other requests before they get here). Without
    /// either the realm is relative, resolved by clients against the request URL.
    fn realm_base(&self, headers: &HeaderMap) -> String {
        match &self.config.base_url {
            Some(base) => base.trim_end_matches('/').to_owned(),
            None => header_str(headers, "host")
                .filter(|h| valid_authority(h))
                .map(|h| {
                    let scheme = if self.config.https { "https" } else { "http" };
                    format!("{scheme}://{h}")
                })
                .unwrap_or_default(),
        }
    }

    /// Who is calling; everyone is anonymous when authentication is off. Verified
    /// credentials are counted and their identity noted for the logs; refused ones are
    /// counted and written to the audit log.
    pub(crate) async fn caller(&self, req: ReqView<'_>) -> Result<Caller, ApiError> {
        let Some(auth) = &self.config.auth else {
            return Ok(Caller::anonymous());
        };
        let headers = req.headers;
        if !headers.contains_key(axum::http::header::AUTHORIZATION) {
            return Ok(Caller::anonymous());
        }
        // Held back before any password is checked: guessing costs time, not bcrypt.
        let claimed = crate::audit::claimed_user(headers);
        let addr = req.ctx.and_then(|c| c.peer()).map(|p| p.ip());
        if let Some(locked) = auth.throttled(claimed.as_deref(), addr) {
            let e = crate::auth::throttled_error(&locked);
            self.credentials_throttled(req, claimed.as_deref(), locked.by, &e)
                .await;
            return Err(e);
        }
        match auth.identify(headers, &self.realm_base(headers)).await {
            Ok(caller) => {
                auth.auth_succeeded(&caller.identity);
                self.authenticated(req, &caller);
                Ok(caller)
            }
            Err(e) => {
                auth.auth_failed(claimed.as_deref(), addr);
                self.credentials_refused(req, claimed.as_deref(), &e).await;
                Err(e)
            }
        }
    }

    /// For `/metrics` on the registry's router: with authentication on, valid
    /// credentials are needed (as for `/v2/`).
    pub(crate) async fn check_credentials(&self, req: ReqView<'_>) -> Result<(), ApiError> {
        let caller = self.caller(req).await?;
        if let Some(auth) = &self.config.auth
            && let Err(e) = auth.check_base(&caller, &self.realm_base(req.headers))
        {
            self.access_refused(req, &caller, None, "metrics", &e).await;
            return Err(e);
        }
        Ok(())
    }

    /// Who owns the upload sessions `caller` opens: its identity, or its network when
    /// anonymous (an IPv6 client commonly holds a whole /64, so that is one owner).
    /// Without an address (a router mounted on a server that does not provide
    /// `ConnectInfo`), anonymous clients share one owner.
    fn upload_owner(&self, caller: &Caller, req: &Request) -> UploadOwner {
        match &caller.identity {
            Identity::User(name) => UploadOwner::new(&format!("user:{name}")),
            Identity::Anonymous => match req.extensions().get::<ConnectInfo<SocketAddr>>() {
                Some(ConnectInfo(peer)) => {
                    let network = match peer.ip() {
                        IpAddr::V4(ip) => IpAddr::V4(ip),
                        IpAddr::V6(ip) => IpAddr::V6(std::net::Ipv6Addr::from(
                            u128::from(ip) & !((1u128 << 64) - 1),
                        )),
                    };
                    UploadOwner::new(&format!("addr:{network}"))
                }
                None => UploadOwner::new("anonymous"),
            },
        }
    }

    /// Refuses a session opened by another owner as unknown (its existence is not
    /// revealed). Only with authentication on: without it, every client may push, and
    /// an address can change between the requests of one push (proxies, NAT pools).
    fn check_session_owner(
        &self,
        caller: &Caller,
        req: &Request,
        id: &UploadId,
    ) -> Result<(), ApiError> {
        if self.config.auth.is_some() && !id.is_for(&self.upload_owner(caller, req)) {
            return Err(upload_unknown());
        }
        Ok(())
    }

    /// Identifies the caller and checks that it may perform `action` on `repo`.
    async fn authorize(
        &self,
        req: ReqView<'_>,
        repo: &RepoName,
        action: Action,
    ) -> Result<Caller, ApiError> {
        let caller = self.caller(req).await?;
        if let Some(auth) = &self.config.auth
            && let Err(e) = auth.check(&caller, repo, action, &self.realm_base(req.headers))
        {
            self.access_refused(req, &caller, Some(repo), action.as_str(), &e)
                .await;
            return Err(e);
        }
        Ok(caller)
    }

    /// Whether `caller` may read `repo` (mount sources, listings); always with auth off.
    fn may(&self, caller: &Caller, repo: &RepoName, action: Action) -> bool {
        self.config
            .auth
            .as_ref()
            .is_none_or(|auth| auth.may(caller, repo, action))
    }

    /// Whether `caller` may see `repo` in the catalog; always with auth off.
    fn may_list(&self, caller: &Caller, repo: &RepoName) -> bool {
        self.config.auth.as_ref().is_none_or(|auth| {
            auth.authorizer()
                .allows(&caller.identity, repo, Action::List)
        })
    }

    fn check_write(&self) -> Result<(), ApiError> {
        if self.config.read_only {
            return Err(
                ApiError::unsupported("this registry is read-only").with_refusal(Refusal::ReadOnly)
            );
        }
        Ok(())
    }

    fn check_delete(&self) -> Result<(), ApiError> {
        self.check_write()?;
        if !self.config.deletes {
            return Err(
                ApiError::unsupported("deletes are disabled on this registry")
                    .with_refusal(Refusal::DeletesDisabled),
            );
        }
        Ok(())
    }
}

/// `GET /v2/`.
pub(crate) async fn base(State(state): State<AppState>, req: Request) -> ApiResult {
    let view = ReqView::of(&req);
    let caller = state.caller(view).await?;
    if let Some(auth) = &state.config.auth
        && let Err(e) = auth.check_base(&caller, &state.realm_base(view.headers))
    {
        state.access_refused(view, &caller, None, "base", &e).await;
        return Err(e);
    }
    let mut r = (StatusCode::OK, axum::Json(serde_json::json!({}))).into_response();
    set(
        r.headers_mut(),
        "docker-distribution-api-version",
        "registry/2.0",
    );
    Ok(r)
}

/// The `Link` header of a listing's next page: `path` (prefixed with the base URL when
/// one is configured) with `n`, `last` and the `extra` query parameters, every value
/// percent-encoded so that nothing in it can end the URL or the header.
fn link_header(
    state: &AppState,
    path: &str,
    n: usize,
    next: &str,
    extra: &[(&str, &str)],
) -> String {
    let mut url = format!(
        "{}?n={n}&last={}",
        state.location(path),
        encode_query_value(next)
    );
    for (k, v) in extra {
        url.push_str(&format!("&{k}={}", encode_query_value(v)));
    }
    format!("<{url}>; rel=\"next\"")
}

/// Percent-encodes a query value: everything but RFC 3986's unreserved characters and
/// `/`, `:` and `@` (allowed in a query, and common in names and digests) is escaped,
/// so `&`, `=`, `+`, `#`, `>`, quotes, spaces and control characters never appear raw.
fn encode_query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn list_options(q: &[(String, String)]) -> Result<ListOptions, ApiError> {
    let n = match first(q, "n") {
        None | Some("") => None,
        // Digits too many for a usize ask for "everything": the page size caps them.
        Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
            Some(v.parse::<usize>().unwrap_or(usize::MAX))
        }
        // The spec has no pagination code; UNSUPPORTED covers "an invalid set of
        // parameters".
        Some(_) => return Err(ApiError::bad_request("UNSUPPORTED", "invalid n")),
    };
    Ok(ListOptions {
        n,
        last: first(q, "last")
            .filter(|l| !l.is_empty())
            .map(str::to_owned),
    })
}

/// `GET /v2/_catalog`.
pub(crate) async fn catalog(State(state): State<AppState>, req: Request) -> ApiResult {
    let view = ReqView::of(&req);
    let caller = state.caller(view).await?;
    if let Some(auth) = &state.config.auth
        && let Err(e) = auth.check_catalog(&caller, &state.realm_base(view.headers))
    {
        state
            .access_refused(view, &caller, None, "catalog", &e)
            .await;
        return Err(e);
    }
    let q = query_pairs(&req);
    let options = list_options(&q)?;
    // Only what the caller may see; paging runs over the filtered listing.
    // The token's `registry:catalog:*` scope admits the caller; the policy filters.
    let visible = |r: &RepoName| state.may_list(&caller, r);
    let page = state.registry.list_repositories(&options, &visible).await?;
    let names: Vec<String> = page.items.iter().map(|r| r.to_string()).collect();
    let mut r = axum::Json(serde_json::json!({ "repositories": names })).into_response();
    if let Some(next) = &page.next {
        let n = options.n.unwrap_or(page.items.len());
        set(
            r.headers_mut(),
            "link",
            &link_header(&state, "/v2/_catalog", n, next, &[]),
        );
    }
    Ok(r)
}

/// Everything under `/v2/<name>/...`.
pub(crate) async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    match route(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn route(state: AppState, req: Request) -> ApiResult {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/v2/").ok_or_else(not_found)?;
    let ctx = RequestContext::of(&req);
    // Classified by the observing layer already (for the same path), or not.
    let parsed = match ctx.as_ref().and_then(|c| c.classified(&path)) {
        Some((route, name_len)) => target_at(rest, name_len, route),
        None => parse_path(rest),
    };
    let (name, target) = parsed.ok_or_else(not_found)?;
    let repo = RepoName::parse(name).map_err(registry_core::Error::from)?;
    let method = req.method().clone();
    if let Some(ctx) = &ctx {
        ctx.set_repository(&repo);
    }
    let caller = match required_action(&target, &method) {
        Some(action) => state.authorize(ReqView::of(&req), &repo, action).await?,
        // The method is refused below whoever asks.
        None => Caller::anonymous(),
    };
    match (target, method) {
        (Target::Blob(d), m) if m == Method::GET || m == Method::HEAD => {
            get_blob(&state, &repo, d, req).await
        }
        (Target::Blob(d), Method::DELETE) => {
            state.check_delete()?;
            let d = Digest::parse(d).map_err(registry_core::Error::from)?;
            state.registry.delete_blob(&repo, &d).await?;
            state
                .audit(
                    Record::request("blob_delete", ctx.as_ref())
                        .repository(Some(&repo))
                        .digest(&d),
                )
                .await?;
            Ok(accepted())
        }
        (Target::Uploads(None), Method::POST) => {
            state.check_write()?;
            start_upload(&state, &repo, &caller, req).await
        }
        (Target::Uploads(Some(id)), m) => {
            let id = UploadId::parse(id).ok_or_else(upload_unknown)?;
            state.check_session_owner(&caller, &req, &id)?;
            match m {
                Method::GET => upload_status(&state, &repo, &id).await,
                Method::PATCH => {
                    state.check_write()?;
                    patch_upload(&state, &repo, &id, req).await
                }
                Method::PUT => {
                    state.check_write()?;
                    finish_upload(&state, &repo, &id, req).await
                }
                Method::DELETE => {
                    state.check_write()?;
                    state.registry.cancel_upload(&repo, &id).await?;
                    Ok(StatusCode::NO_CONTENT.into_response())
                }
                _ => Err(method_not_allowed()),
            }
        }
        (Target::Manifest(r), m) if m == Method::GET || m == Method::HEAD => {
            get_manifest(&state, &repo, r, m == Method::HEAD).await
        }
        (Target::Manifest(r), Method::PUT) => {
            state.check_write()?;
            put_manifest(&state, &repo, r, req).await
        }
        (Target::Manifest(r), Method::DELETE) => {
            state.check_delete()?;
            let reference = Reference::parse(r).map_err(registry_core::Error::from)?;
            state.registry.delete_manifest(&repo, &reference).await?;
            let record = match &reference {
                Reference::Tag(tag) => {
                    Record::request("tag_delete", ctx.as_ref()).tag(tag.as_str())
                }
                Reference::Digest(d) => Record::request("manifest_delete", ctx.as_ref()).digest(d),
            };
            state.audit(record.repository(Some(&repo))).await?;
            Ok(accepted())
        }
        (Target::Tags, Method::GET) => list_tags(&state, &repo, query_pairs(&req)).await,
        (Target::Referrers(d), Method::GET) => referrers(&state, &repo, d, query_pairs(&req)).await,
        _ => Err(method_not_allowed()),
    }
}

/// What a request does, for authorization; `None` for methods no endpoint serves.
fn required_action(target: &Target<'_>, method: &Method) -> Option<Action> {
    let read = *method == Method::GET || *method == Method::HEAD;
    Some(match target {
        Target::Blob(_) | Target::Manifest(_) if read => Action::Pull,
        Target::Blob(_) | Target::Manifest(_) if *method == Method::DELETE => Action::Delete,
        Target::Manifest(_) if *method == Method::PUT => Action::Push,
        Target::Uploads(None) if *method == Method::POST => Action::Push,
        // Even reading an upload's status is part of pushing: sessions are private.
        Target::Uploads(Some(_))
            if read || [Method::PATCH, Method::PUT, Method::DELETE].contains(method) =>
        {
            Action::Push
        }
        Target::Tags | Target::Referrers(_) if *method == Method::GET => Action::Pull,
        _ => return None,
    })
}

fn upload_unknown() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
        "unknown upload",
    )
}

fn method_not_allowed() -> ApiError {
    ApiError::unsupported("method not allowed on this endpoint")
}

fn accepted() -> Response {
    let mut r = StatusCode::ACCEPTED.into_response();
    set(r.headers_mut(), "content-length", "0");
    r
}

async fn get_blob(state: &AppState, repo: &RepoName, d: &str, req: Request) -> ApiResult {
    let digest = Digest::parse(d).map_err(registry_core::Error::from)?;
    let range = match header_str(req.headers(), "range").map(parse_range) {
        Some(Ok(r)) => r,
        // A malformed range is a 416 naming the blob's size, as any unsatisfiable one
        // (and a 404 for a blob that is not there).
        Some(Err(e)) => {
            let info = state.registry.stat_blob(repo, &digest).await?;
            return Err(e.with_header(
                axum::http::header::CONTENT_RANGE,
                format!("bytes */{}", info.size),
            ));
        }
        None => None,
    };
    let head = req.method() == Method::HEAD;
    // Whole-blob GETs only: a redirected client would have to resend `Range` itself, and
    // a HEAD costs the store nothing worth sparing.
    if let Some(ttl) = state
        .config
        .redirect_blobs
        .filter(|_| !head && range.is_none())
        && let Some(url) = state.registry.presigned_blob(repo, &digest, ttl).await?
    {
        let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
        let h = r.headers_mut();
        set(h, "location", &url);
        set(h, DIGEST_HEADER, digest.as_str());
        set(h, "content-length", "0");
        return Ok(r);
    }
    let (status, len, content_range, body) = if head {
        let info = state.registry.stat_blob(repo, &digest).await?;
        match range {
            Some(r) => {
                let r = r.resolve(info.size).map_err(ApiError::from)?;
                let cr = format!("bytes {}-{}/{}", r.start, r.end, info.size);
                (
                    StatusCode::PARTIAL_CONTENT,
                    r.len(),
                    Some(cr),
                    Body::empty(),
                )
            }
            None => (StatusCode::OK, info.size, None, Body::empty()),
        }
    } else {
        let blob = state.registry.get_blob(repo, &digest, range).await?;
        match blob.range {
            Some(r) => {
                let cr = format!("bytes {}-{}/{}", r.start, r.end, blob.size);
                (
                    StatusCode::PARTIAL_CONTENT,
                    r.len(),
                    Some(cr),
                    Body::from_stream(blob.stream),
                )
            }
            None => (
                StatusCode::OK,
                blob.size,
                None,
                Body::from_stream(blob.stream),
            ),
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    set(h, "content-type", "application/octet-stream");
    set(h, "content-length", &len.to_string());
    set(h, DIGEST_HEADER, digest.as_str());
    set(h, "accept-ranges", "bytes");
    if let Some(cr) = content_range {
        set(h, "content-range", &cr);
    }
    Ok(r)
}

fn upload_response(
    state: &AppState,
    status: StatusCode,
    repo: &RepoName,
    id: &UploadId,
    offset: u64,
) -> Response {
    let mut r = status.into_response();
    let h = r.headers_mut();
    set(
        h,
        "location",
        &state.location(&format!("/v2/{repo}/blobs/uploads/{id}")),
    );
    set(h, "range", &upload_range(offset));
    set(h, UPLOAD_UUID_HEADER, id.as_str());
    set(h, "content-length", "0");
    r
}

fn blob_created(state: &AppState, repo: &RepoName, digest: &Digest) -> Response {
    let mut r = StatusCode::CREATED.into_response();
    let h = r.headers_mut();
    set(
        h,
        "location",
        &state.location(&format!("/v2/{repo}/blobs/{digest}")),
    );
    set(h, DIGEST_HEADER, digest.as_str());
    set(h, "content-length", "0");
    r
}

async fn start_upload(
    state: &AppState,
    repo: &RepoName,
    caller: &Caller,
    req: Request,
) -> ApiResult {
    let q = query_pairs(&req);
    let ctx = RequestContext::of(&req);
    if let Some(mount) = first(&q, "mount") {
        let digest = Digest::parse(mount).map_err(registry_core::Error::from)?;
        let from = match first(&q, "from") {
            Some(f) => Some(RepoName::parse(f).map_err(registry_core::Error::from)?),
            None => None,
        };
        // A mount never takes from a repository the caller cannot pull from.
        let readable = |r: &RepoName| state.may(caller, r, Action::Pull);
        if state
            .registry
            .mount_blob(repo, &digest, from.as_ref(), &readable)
            .await?
        {
            state
                .audit(
                    Record::request("blob_mount", ctx.as_ref())
                        .repository(Some(repo))
                        .digest(&digest)
                        .from(from.as_ref()),
                )
                .await?;
            return Ok(blob_created(state, repo, &digest));
        }
        // Not mountable: fall back to a new upload session, as the spec says.
    }
    let owner = state.upload_owner(caller, &req);
    if let Some(d) = first(&q, "digest") {
        let digest = Digest::parse(d).map_err(registry_core::Error::from)?;
        let declared = content_length(req.headers())?;
        let data = body_stream(req.into_body(), state.config.body_idle_timeout);
        state
            .registry
            .put_blob_for(repo, &digest, declared, data, &owner)
            .await?;
        state
            .audit(
                Record::request("blob_upload", ctx.as_ref())
                    .repository(Some(repo))
                    .digest(&digest),
            )
            .await?;
        return Ok(blob_created(state, repo, &digest));
    }
    let algorithm = match first(&q, "digest-algorithm") {
        None => Algorithm::Sha256,
        Some(a) => a.parse().map_err(registry_core::Error::from)?,
    };
    let status = state
        .registry
        .start_upload_for(repo, algorithm, &owner)
        .await?;
    Ok(upload_response(
        state,
        StatusCode::ACCEPTED,
        repo,
        &status.id,
        0,
    ))
}

async fn upload_status(state: &AppState, repo: &RepoName, id: &UploadId) -> ApiResult {
    let status = state.registry.upload_status(repo, id).await?;
    Ok(upload_response(
        state,
        StatusCode::NO_CONTENT,
        repo,
        id,
        status.offset,
    ))
}

/// Checks `Content-Range` against the session and `Content-Length`; returns the offset
/// the chunk claims (if any) and its declared length.
fn chunk_headers(h: &HeaderMap) -> Result<(Option<u64>, Option<u64>), ApiError> {
    let declared = content_length(h)?;
    match header_str(h, "content-range") {
        None => Ok((None, declared)),
        Some(v) => {
            let (start, end) = parse_content_range(v).ok_or_else(|| {
                ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "BLOB_UPLOAD_INVALID",
                    "invalid Content-Range",
                )
            })?;
            let len = end - start + 1;
            if declared.is_some_and(|d| d != len) {
                return Err(ApiError::bad_request(
                    "SIZE_INVALID",
                    "Content-Length does not match Content-Range",
                ));
            }
            Ok((Some(start), Some(len)))
        }
    }
}

async fn patch_upload(state: &AppState, repo: &RepoName, id: &UploadId, req: Request) -> ApiResult {
    let (offset, declared) = chunk_headers(req.headers())?;
    let data = body_stream(req.into_body(), state.config.body_idle_timeout);
    let status = state
        .registry
        .append_upload(repo, id, offset, declared, data)
        .await?;
    Ok(upload_response(
        state,
        StatusCode::ACCEPTED,
        repo,
        id,
        status.offset,
    ))
}

async fn finish_upload(
    state: &AppState,
    repo: &RepoName,
    id: &UploadId,
    req: Request,
) -> ApiResult {
    let q = query_pairs(&req);
    let digest = first(&q, "digest").ok_or_else(|| {
        ApiError::bad_request("DIGEST_INVALID", "the digest query parameter is required")
    })?;
    let digest = Digest::parse(digest).map_err(registry_core::Error::from)?;
    let (offset, declared) = chunk_headers(req.headers())?;
    let ctx = RequestContext::of(&req);
    let has_body =
        declared.is_some_and(|d| d > 0) || header_str(req.headers(), "transfer-encoding").is_some();
    if has_body {
        let data = body_stream(req.into_body(), state.config.body_idle_timeout);
        state
            .registry
            .finish_upload_with_chunk(repo, id, &digest, offset, declared, data)
            .await?;
    } else {
        if let Some(o) = offset {
            // An empty final chunk may still claim a position: check it.
            let status = state.registry.upload_status(repo, id).await?;
            if o != status.offset {
                return Err(registry_core::Error::UploadOffset {
                    expected: status.offset,
                    got: o,
                }
                .into());
            }
        }
        state
            .registry
            .finish_upload(repo, id, &digest, None)
            .await?;
    }
    state
        .audit(
            Record::request("blob_upload", ctx.as_ref())
                .repository(Some(repo))
                .digest(&digest),
        )
        .await?;
    Ok(blob_created(state, repo, &digest))
}

async fn get_manifest(state: &AppState, repo: &RepoName, r: &str, head: bool) -> ApiResult {
    // A reference that is neither a tag nor a digest names no manifest: 404, as the
    // conformance suite expects (a push with such a reference stays a 400).
    let reference = Reference::parse(r).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "no manifest with this reference",
        )
    })?;
    let (meta, body) = if head {
        (
            state.registry.stat_manifest(repo, &reference).await?,
            Body::empty(),
        )
    } else {
        let m = state.registry.get_manifest(repo, &reference).await?;
        (m.meta, Body::from(m.bytes))
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    set(h, "content-type", &meta.media_type);
    set(h, "content-length", &meta.size.to_string());
    set(h, DIGEST_HEADER, meta.digest.as_str());
    Ok(resp)
}

async fn put_manifest(state: &AppState, repo: &RepoName, r: &str, req: Request) -> ApiResult {
    let reference = Reference::parse(r).map_err(registry_core::Error::from)?;
    let q = query_pairs(&req);
    let mut tags = Vec::new();
    for (k, v) in &q {
        if k == "tag" {
            tags.push(Tag::parse(v).map_err(registry_core::Error::from)?);
        }
    }
    let content_type = header_str(req.headers(), "content-type")
        .unwrap_or("")
        .to_owned();
    let ctx = RequestContext::of(&req);
    let limit = state.registry.config().max_manifest_size;
    if content_length(req.headers())?.is_some_and(|l| l > limit) {
        return Err(registry_core::Error::TooLarge {
            what: "manifest",
            limit,
        }
        .into());
    }
    // Held until the manifest is stored: parsing it takes memory too.
    let _budget = state
        .reserve_manifest_buffer(content_length(req.headers())?.unwrap_or(limit))
        .await?;
    let mut data = body_stream(req.into_body(), state.config.body_idle_timeout);
    let mut buf = BytesMut::new();
    let deadline = state.config.manifest_body_deadline;
    let received = tokio::time::timeout(deadline, async {
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request("MANIFEST_INVALID", format!("reading the body: {e}"))
            })?;
            if buf.len() as u64 + chunk.len() as u64 > limit {
                return Err(registry_core::Error::TooLarge {
                    what: "manifest",
                    limit,
                }
                .into());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok::<_, ApiError>(())
    })
    .await;
    match received {
        Ok(result) => result?,
        Err(_) => {
            return Err(ApiError::bad_request(
                "MANIFEST_INVALID",
                format!("the manifest body was not received within {deadline:?}"),
            ));
        }
    }
    let multi_tag = !tags.is_empty();
    let result = state
        .registry
        .put_manifest(
            repo,
            &reference,
            &content_type,
            Bytes::from(buf),
            PutManifestOptions { tags },
        )
        .await?;
    state
        .audit(
            Record::request("manifest_push", ctx.as_ref())
                .repository(Some(repo))
                .digest(&result.digest)
                .tags(&result.tags)
                .subject(result.subject.as_ref()),
        )
        .await?;
    let mut resp = StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    set(
        h,
        "location",
        &state.location(&format!("/v2/{repo}/manifests/{}", result.digest)),
    );
    set(h, DIGEST_HEADER, result.digest.as_str());
    set(h, "content-length", "0");
    if let Some(subject) = &result.subject {
        set(h, "oci-subject", subject.as_str());
    }
    if multi_tag {
        for t in &result.tags {
            if let Ok(v) = HeaderValue::from_str(t.as_str()) {
                h.append("oci-tag", v);
            }
        }
    }
    Ok(resp)
}

async fn list_tags(state: &AppState, repo: &RepoName, q: Vec<(String, String)>) -> ApiResult {
    let options = list_options(&q)?;
    let page = state.registry.list_tags(repo, &options).await?;
    // Written directly: neither a repository name nor a tag can hold a character JSON
    // escapes (their grammars allow ASCII letters, digits, `.`, `_`, `-` and `/`), so
    // the bytes go out as they are, sized up front so that a long list is written once.
    let tags = &page.items;
    let size =
        32 + repo.as_str().len() + tags.iter().map(|t| t.as_bytes().len() + 3).sum::<usize>();
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(b"{\"name\":\"");
    body.extend_from_slice(repo.as_str().as_bytes());
    body.extend_from_slice(b"\",\"tags\":[");
    for (i, tag) in tags.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.push(b'"');
        body.extend_from_slice(tag.as_bytes());
        body.push(b'"');
    }
    body.extend_from_slice(b"]}");
    let mut r = Response::new(Body::from(body));
    set(r.headers_mut(), "content-type", "application/json");
    if let Some(next) = &page.next {
        let n = options.n.unwrap_or(page.items.len());
        set(
            r.headers_mut(),
            "link",
            &link_header(state, &format!("/v2/{repo}/tags/list"), n, next, &[]),
        );
    }
    Ok(r)
}

async fn referrers(
    state: &AppState,
    repo: &RepoName,
    d: &str,
    q: Vec<(String, String)>,
) -> ApiResult {
    let subject = Digest::parse(d).map_err(registry_core::Error::from)?;
    let options = list_options(&q)?;
    let artifact_type = first(&q, "artifactType").filter(|a| !a.is_empty());
    let page = state
        .registry
        .referrers(repo, &subject, artifact_type, &options)
        .await?;
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": registry_core::media_type::OCI_INDEX,
        "manifests": page.items,
    });
    let mut r = Response::new(Body::from(serde_json::to_vec(&body).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string())
    })?));
    let h = r.headers_mut();
    set(h, "content-type", registry_core::media_type::OCI_INDEX);
    if artifact_type.is_some() {
        set(h, "oci-filters-applied", "artifactType");
    }
    if let Some(next) = &page.next {
        let n = options.n.unwrap_or(page.items.len());
        let extra: Vec<(&str, &str)> = artifact_type
            .map(|a| ("artifactType", a))
            .into_iter()
            .collect();
        let link = link_header(
            state,
            &format!("/v2/{repo}/referrers/{subject}"),
            n,
            next,
            &extra,
        );
        set(h, "link", &link);
    }
    Ok(r)
}

/// `GET /token?service=…&scope=…`: the Docker token flow. The client authenticates
/// with Basic credentials (or none, for anonymous access) and gets a token carrying
/// the requested scopes the policy allows.
pub(crate) async fn token(State(state): State<AppState>, req: Request) -> ApiResult {
    let auth = state.config.auth.clone().ok_or_else(not_found)?;
    let caller = state.caller(ReqView::of(&req)).await?;
    let q = query_pairs(&req);
    let scopes: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    let granted = auth.grant(&caller, first(&q, "service"), &scopes)?;
    Ok(axum::Json(granted).into_response())
}

/// `POST /token` with a form (`grant_type=password`): the OAuth2 variant some clients
/// (containerd) try first.
pub(crate) async fn token_form(State(state): State<AppState>, req: Request) -> ApiResult {
    let auth = state.config.auth.clone().ok_or_else(not_found)?;
    // The head stays, for the logs (request context, path).
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts, Body::empty());
    let body = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|_| ApiError::bad_request("UNSUPPORTED", "token request body too large"))?;
    // A body that is not UTF-8 is no form: it gets the unsupported `grant_type` error.
    // Forms encode spaces as `+`; scopes are space-separated.
    let form: Vec<(String, String)> =
        serde_urlencoded::from_str(std::str::from_utf8(&body).unwrap_or("")).unwrap_or_default();
    let caller = match first(&form, "grant_type") {
        Some("password") => {
            let user = first(&form, "username").unwrap_or("");
            let password = first(&form, "password").unwrap_or("");
            let addr = RequestContext::of(&req)
                .and_then(|c| c.peer())
                .map(|p| p.ip());
            if let Some(locked) = auth.throttled(Some(user), addr) {
                let e = crate::auth::throttled_error(&locked);
                state
                    .credentials_throttled(ReqView::of(&req), Some(user), locked.by, &e)
                    .await;
                return Err(e);
            }
            match auth.password_caller(user, password).await {
                Some(caller) => {
                    auth.auth_succeeded(&caller.identity);
                    state.authenticated(ReqView::of(&req), &caller);
                    caller
                }
                None => {
                    auth.auth_failed(Some(user), addr);
                    let e = ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "UNAUTHORIZED",
                        "invalid credentials",
                    )
                    .with_header(
                        axum::http::header::WWW_AUTHENTICATE,
                        "Basic realm=\"registry\"".to_owned(),
                    );
                    state
                        .credentials_refused(ReqView::of(&req), Some(user), &e)
                        .await;
                    return Err(e);
                }
            }
        }
        _ => {
            return Err(ApiError::bad_request(
                "UNSUPPORTED",
                "unsupported grant_type (only password is served)",
            ));
        }
    };
    let scopes: Vec<String> = first(&form, "scope")
        .map(str::to_owned)
        .into_iter()
        .collect();
    let granted = auth.grant(&caller, first(&form, "service"), &scopes)?;
    Ok(axum::Json(granted).into_response())
}

/// Adds `Docker-Distribution-API-Version` and `X-Content-Type-Options: nosniff` to
/// every response (blobs are attacker-chosen bytes: a browser must never sniff them
/// into HTML).
pub(crate) async fn api_version_header(req: Request, next: axum::middleware::Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    set(h, "docker-distribution-api-version", "registry/2.0");
    set(h, "x-content-type-options", "nosniff");
    r
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or any request with more than
/// one or an invalid one, is a 400. A request of HTTP/2 or later carries its authority
/// in the URI instead; it is copied into `Host` so that handlers see it.
pub(crate) async fn check_host(mut req: Request, next: axum::middleware::Next) -> Response {
    let bad = |why: &str| ApiError::bad_request("UNSUPPORTED", why.to_owned()).into_response();
    let mut hosts = req.headers().get_all(axum::http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return bad("more than one Host header"),
        (Some(h), None) => {
            if !h.to_str().is_ok_and(valid_authority) {
                return bad("invalid Host header");
            }
        }
        (None, _) => {
            if req.version() == axum::http::Version::HTTP_11 {
                return bad("missing Host header");
            }
            if req.version() >= axum::http::Version::HTTP_2
                && let Some(a) = req.uri().authority().map(|a| a.as_str().to_owned())
            {
                if !valid_authority(&a) {
                    return bad("invalid authority");
                }
                if let Ok(v) = HeaderValue::from_str(&a) {
                    req.headers_mut().insert(axum::http::header::HOST, v);
                }
            }
        }
    }
    next.run(req).await
}

/// Whether `s` is a `host[:port]` authority: a host name or IPv4 address (letters,
/// digits, `-`, `.`, `_`) or a bracketed IPv6 literal, and an optional port of 1 to 5
/// digits. No user info, quotes, commas, spaces or slashes: the value ends up in URLs
/// and in the `WWW-Authenticate` realm.
pub(crate) fn valid_authority(s: &str) -> bool {
    let (host_ok, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let ip_ok = !ip.is_empty()
            && ip
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        match after {
            "" => (ip_ok, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (ip_ok, Some(p)),
                None => return false,
            },
        }
    } else {
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        let ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        (ok, port)
    };
    host_ok
        && port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_at_the_last_marker() {
        assert_eq!(
            parse_path("a/b/blobs/sha256:x"),
            Some(("a/b", Target::Blob("sha256:x")))
        );
        assert_eq!(
            parse_path("a/blobs/b/manifests/v1"),
            Some(("a/blobs/b", Target::Manifest("v1")))
        );
        assert_eq!(
            parse_path("a/blobs/uploads/"),
            Some(("a", Target::Uploads(None)))
        );
        assert_eq!(
            parse_path("a/blobs/uploads"),
            Some(("a", Target::Uploads(None)))
        );
        assert_eq!(
            parse_path("a/blobs/uploads/abc"),
            Some(("a", Target::Uploads(Some("abc"))))
        );
        assert_eq!(parse_path("a/tags/list"), Some(("a", Target::Tags)));
        assert_eq!(
            parse_path("a/referrers/sha256:x"),
            Some(("a", Target::Referrers("sha256:x")))
        );
        assert_eq!(parse_path("a/manifests/v1/extra"), None);
        assert_eq!(parse_path("a/unknown"), None);
        // The handler's rebuild from the layer's classification agrees with the parse.
        for rest in [
            "a/b/blobs/sha256:x",
            "a/blobs/b/manifests/v1",
            "a/blobs/uploads/",
            "a/blobs/uploads",
            "a/blobs/uploads/abc",
            "x/tags/list",
            "a/referrers/sha256:x",
            "a/manifests/blobs/uploads/u",
        ] {
            let (route, name_len) = path_kind(rest).unwrap();
            assert_eq!(target_at(rest, name_len, route), parse_path(rest), "{rest}");
        }
    }

    #[test]
    fn query_decoding() {
        let q = parse_query;
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(q("digest=sha256%3Aab"), [pair("digest", "sha256:ab")]);
        assert_eq!(q("from=a%2Fb"), [pair("from", "a/b")]);
        // Malformed escapes are kept as they are.
        assert_eq!(q("x=%"), [pair("x", "%")]);
        assert_eq!(q("x=%zz&y=%4"), [pair("x", "%zz"), pair("y", "%4")]);
        // `+` is a `+`, escaped or not.
        assert_eq!(
            q("artifactType=application/vnd.example+json"),
            [pair("artifactType", "application/vnd.example+json")]
        );
        assert_eq!(q("a=a%2Bb"), [pair("a", "a+b")]);
        // Empty pieces are skipped, a key without `=` has an empty value, repeated keys
        // are all kept in order.
        assert_eq!(
            q("&tag=a&&tag=b&n&=v"),
            [
                pair("tag", "a"),
                pair("tag", "b"),
                pair("n", ""),
                pair("", "v")
            ]
        );
        assert_eq!(q("a=%FF"), [pair("a", "\u{FFFD}")]);
    }
}
