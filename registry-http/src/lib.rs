//! # registry-http
//!
//! The OCI distribution spec v1.1 as an axum [`Router`] over any
//! [`registry_core::Registry`]: mount it in your own server, or serve it on a loopback
//! port for tests. It knows OCI HTTP, never storage; registry errors become OCI error
//! codes in one place ([`ApiError`]).
//!
//! Use it in your integration tests:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use registry_core::Registry;
//! use registry_http::{HttpConfig, serve_local};
//!
//! let server = serve_local(Registry::in_memory(), HttpConfig::default()).await?;
//! println!("push to {}", server.url()); // http://127.0.0.1:PORT, e.g. for skopeo or oras
//! // ... run your client against server.url() ...
//! server.shutdown().await; // or just drop it
//! # Ok(())
//! # }
//! ```
//!
//! Or mount it in your own axum application (it serves `/v2/...`):
//!
//! ```
//! let app = axum::Router::new()
//!     .route("/health", axum::routing::get(|| async { "ok" }))
//!     .merge(registry_http::router(
//!         registry_core::Registry::in_memory(),
//!         registry_http::HttpConfig::default(),
//!     ));
//! # let _ = app;
//! ```

#![forbid(unsafe_code)]

mod access_log;
mod audit;
mod auth;
mod error;
mod fault;
mod health;
mod htpasswd;
mod instrument;
pub mod jwt;
mod metrics;
pub mod notify;
mod process_metrics;
pub mod range;
pub mod remote_metrics;
mod routes;
mod server;
mod throttle;
#[cfg(feature = "tls")]
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use registry_core::Registry;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use access_log::AccessLog;
pub use audit::AuditLog;
pub use auth::{Auth, Resource, Scope, TokenClaims, TokenError, TokenVerifier};
pub use error::ApiError;
pub use fault::{FaultService, HttpFault, HttpFaults, HttpInjection, HttpRule};
pub use health::metrics_router;
pub use htpasswd::Htpasswd;
pub use instrument::instrument_storage;
pub use jwt::{JwtVerifier, SigningKey, TokenIssuer, VerificationKey};
pub use metrics::{Metrics, MetricsEncoder, MetricsOptions};
pub use notify::{Notifier, NotifyConfig};
pub use remote_metrics::{mirror_metrics, proxy_metrics};
pub use server::ServerLimits;
pub use throttle::ThrottleConfig;
#[cfg(feature = "tls")]
pub use tls::TlsFiles;

/// HTTP-level configuration. Storage limits (manifest and blob size, upload expiry)
/// live in [`registry_core::RegistryConfig`].
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Prefix for `Location` headers (for example `https://registry.example.com`);
    /// `None` sends paths, which clients resolve against the request URL.
    pub base_url: Option<String>,
    /// Whether manifest and blob deletes are allowed (otherwise 405 UNSUPPORTED).
    pub deletes: bool,
    /// Refuse every write with 405 UNSUPPORTED.
    pub read_only: bool,
    /// A request body that sends nothing for this long fails.
    pub body_idle_timeout: Duration,
    /// Authentication and authorization; `None` lets everyone do everything (the
    /// embedded default, for loopback test registries).
    pub auth: Option<Arc<Auth>>,
    /// Bytes of manifest bodies buffered at once, over all requests (a manifest is
    /// parsed whole, so it is held in memory): a push that would exceed it waits up to
    /// a second for others to finish, then gets 429 with `Retry-After`. Bounds the
    /// memory concurrent manifest pushes take, whatever clients do. Default 64 MiB.
    pub manifest_buffer_budget: u64,
    /// Time allowed to receive a whole manifest body (a body trickling in holds its
    /// share of the budget meanwhile). Default 60 s.
    pub manifest_body_deadline: Duration,
    /// Connection limits of the built-in server ([`serve_on`], [`serve_local`]); a
    /// router mounted on another server does not use them.
    pub server: ServerLimits,
    /// Where HTTP, registry and connection metrics are recorded; `None` records none.
    /// See [`HttpConfig::with_metrics`].
    pub metrics: Option<Metrics>,
    /// Whether the router serves `GET /metrics` when [`metrics`](Self::metrics) is set
    /// (default true). Off when a separate listener serves them ([`metrics_router`]).
    pub metrics_route: bool,
    /// `GET /healthz` and `GET /readyz`, unauthenticated (default true). Turn them off
    /// to merge the router into an application that has its own.
    pub health_endpoints: bool,
    /// Where a line per request goes (see [`AccessLog`]); `None` (the default: an
    /// embedded test registry stays quiet) logs nothing.
    pub access_log: Option<AccessLog>,
    /// Where every change and every refused credential is recorded; `None` records
    /// nothing. See [`AuditLog`].
    pub audit: Option<AuditLog>,
    /// Faults injected in front of everything else (slow responses, 5xx, cut
    /// connections), to test clients' retry logic; `None` (the default) injects none.
    /// See [`HttpFaults`].
    pub faults: Option<HttpFaults>,
    /// Answer a blob `GET` (whole blob, no `Range`) with `307 Temporary Redirect` to a
    /// presigned storage URL valid this long, when the storage can presign (object
    /// storage: S3, Azure, GCS); `None` (the default) streams every blob through the
    /// registry. Only after authorization and the check that the repository holds the
    /// blob. `HEAD` and `Range` requests are always answered here.
    pub redirect_blobs: Option<Duration>,
    /// Whether clients reach the router over HTTPS: the token realm of challenges is
    /// then `https://HOST/token` (without [`base_url`](Self::base_url)). Set by
    /// `serve_tls_on` (feature `tls`); set it when TLS ends in front of a mounted router.
    pub https: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            base_url: None,
            deletes: true,
            read_only: false,
            body_idle_timeout: Duration::from_secs(30),
            auth: None,
            server: ServerLimits::default(),
            manifest_buffer_budget: 64 * 1024 * 1024,
            manifest_body_deadline: Duration::from_secs(60),
            metrics: None,
            metrics_route: true,
            health_endpoints: true,
            access_log: None,
            audit: None,
            faults: None,
            redirect_blobs: None,
            https: false,
        }
    }
}

impl HttpConfig {
    /// Sets the prefix of `Location` headers.
    pub fn with_base_url(mut self, base_url: Option<String>) -> Self {
        self.base_url = base_url;
        self
    }
    /// Allows or refuses deletes.
    pub fn with_deletes(mut self, on: bool) -> Self {
        self.deletes = on;
        self
    }
    /// Turns read-only mode on or off.
    pub fn with_read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }
    /// Sets the request body idle timeout.
    pub fn with_body_idle_timeout(mut self, timeout: Duration) -> Self {
        self.body_idle_timeout = timeout;
        self
    }
    /// Sets the bytes of manifest bodies buffered at once (see
    /// [`HttpConfig::manifest_buffer_budget`]).
    pub fn with_manifest_buffer_budget(mut self, bytes: u64) -> Self {
        self.manifest_buffer_budget = bytes;
        self
    }
    /// Sets the time allowed to receive a whole manifest body.
    pub fn with_manifest_body_deadline(mut self, deadline: Duration) -> Self {
        self.manifest_body_deadline = deadline;
        self
    }
    /// Sets the built-in server's connection limits.
    pub fn with_server_limits(mut self, limits: ServerLimits) -> Self {
        self.server = limits;
        self
    }
    /// Requires authentication and checks every request against `auth`'s policy.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = Some(Arc::new(auth));
        self
    }
    /// Records metrics into `metrics` and serves them at `GET /metrics` (with
    /// authentication on, to callers with valid credentials only). Pass the same
    /// `metrics` to [`instrument_storage`] for store latency and upload sessions.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }
    /// Serves `GET /metrics` on this router or not (see [`HttpConfig::metrics_route`]).
    pub fn with_metrics_route(mut self, on: bool) -> Self {
        self.metrics_route = on;
        self
    }
    /// Serves `GET /healthz` and `GET /readyz` or not.
    pub fn with_health_endpoints(mut self, on: bool) -> Self {
        self.health_endpoints = on;
        self
    }
    /// Writes the access log to `log` (see [`AccessLog`]); `None` turns it off.
    pub fn with_access_log(mut self, log: Option<AccessLog>) -> Self {
        self.access_log = log;
        self
    }
    /// Writes the audit log to `audit`.
    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = Some(audit);
        self
    }
    /// Injects the faults of `faults` in front of the router (for tests of clients'
    /// retry logic; keep a clone to change the rules or read what was injected).
    pub fn with_faults(mut self, faults: HttpFaults) -> Self {
        self.faults = Some(faults);
        self
    }
    /// Redirects blob `GET`s to presigned storage URLs valid for `ttl` (see
    /// [`HttpConfig::redirect_blobs`]); `None` turns it off.
    pub fn with_redirect_blobs(mut self, ttl: Option<Duration>) -> Self {
        self.redirect_blobs = ttl;
        self
    }
}

/// The OCI distribution API over `registry`, as an axum router serving `/v2/...`
/// (and `/token` when [`Auth`] has a [`TokenIssuer`]; `/healthz` and `/readyz` unless
/// turned off; `/metrics` with [`HttpConfig::with_metrics`]).
///
/// Every response carries `X-Content-Type-Options: nosniff` and an `X-Request-Id`
/// (the client's own when it sends a sane one). An HTTP/1.1 request needs
/// exactly one valid `Host` header (RFC 9112), also when driven in process with
/// `tower::ServiceExt::oneshot`; others get 400. The connection limits of
/// [`ServerLimits`] belong to [`serve_on`], not to the router: a server that mounts it
/// sets its own.
pub fn router(registry: Registry, config: HttpConfig) -> Router {
    let token_endpoint = config
        .auth
        .as_ref()
        .is_some_and(|a| a.token_issuer().is_some());
    let health = config.health_endpoints;
    let metrics_route = config.metrics.is_some() && config.metrics_route;
    let faults = config.faults.clone();
    let state = routes::AppState::new(registry, config);
    let observer = state.observer.clone();
    let mut app = Router::new()
        .route("/v2/", get(routes::base).head(routes::base))
        .route("/v2", get(routes::base).head(routes::base))
        .route("/v2/_catalog", get(routes::catalog))
        .route("/v2/{*rest}", axum::routing::any(routes::dispatch));
    if token_endpoint {
        app = app.route("/token", get(routes::token).post(routes::token_form));
    }
    if health {
        app = app
            .route("/healthz", get(health::healthz))
            .route("/readyz", get(health::readyz));
    }
    if metrics_route {
        app = app.route("/metrics", get(health::metrics));
    }
    let app = app
        .fallback(error::no_such_endpoint)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn(routes::check_host))
        .layer(axum::middleware::from_fn(routes::api_version_header))
        // Outermost: it sees every response, the Host check's 400s included.
        .layer(axum::middleware::from_fn_with_state(
            observer,
            access_log::observe,
        ))
        .with_state(state);
    // In front of everything, the access log included: injected faults play a failing
    // network or proxy, which the registry would not see either.
    match faults {
        Some(faults) => app.layer(faults),
        None => app,
    }
}

/// A registry served on a loopback port, shut down gracefully when dropped.
#[derive(Debug)]
pub struct LocalServer {
    addr: SocketAddr,
    url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl LocalServer {
    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections and waits for those in flight to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves `registry` on `127.0.0.1` with an ephemeral port, in a task on the current
/// tokio runtime.
pub async fn serve_local(registry: Registry, config: HttpConfig) -> std::io::Result<LocalServer> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    serve_on(listener, registry, config).await
}

/// Serves `registry` on an already bound listener, in a task on the current runtime,
/// with the connection limits of [`HttpConfig::server`].
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    registry: Registry,
    config: HttpConfig,
) -> std::io::Result<LocalServer> {
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let limits = config.server.clone();
    let connections = config.metrics.as_ref().map(Metrics::connections);
    let app = router(registry, config);
    let task = tokio::spawn(server::run(listener, app, limits, connections, None, rx));
    Ok(LocalServer {
        addr,
        url: format!("http://{addr}"),
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// [`serve_on`] over TLS (feature `tls`): the certificate chain and key of `tls`,
/// re-read when their files change. The server's [`LocalServer::url`] is `https://`.
#[cfg(feature = "tls")]
pub async fn serve_tls_on(
    listener: tokio::net::TcpListener,
    registry: Registry,
    config: HttpConfig,
    tls: TlsFiles,
) -> std::io::Result<LocalServer> {
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let limits = config.server.clone();
    let connections = config.metrics.as_ref().map(Metrics::connections);
    let app = router(
        registry,
        HttpConfig {
            https: true,
            ..config
        },
    );
    let acceptor = tls.acceptor()?;
    let task = tokio::spawn(server::run(
        listener,
        app,
        limits,
        connections,
        Some(acceptor),
        rx,
    ));
    Ok(LocalServer {
        addr,
        url: format!("https://{addr}"),
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// Serves [`metrics_router`] (`/metrics`, `/healthz`, `/readyz`, no authentication)
/// on an already bound listener, in a task on the current runtime: the separate
/// metrics listener of `serve --metrics-addr`, so a scraper needs no registry
/// credentials. Its own connections are not counted in the registry's connection
/// metrics.
pub async fn serve_metrics_on(
    listener: tokio::net::TcpListener,
    registry: Registry,
    metrics: Metrics,
) -> std::io::Result<LocalServer> {
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let app = metrics_router(registry, metrics);
    let task = tokio::spawn(server::run(
        listener,
        app,
        ServerLimits::default(),
        None,
        None,
        rx,
    ));
    Ok(LocalServer {
        addr,
        url: format!("http://{addr}"),
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// The README's examples, compiled and run as doc tests so they never rot. They are
/// complete programs (their own `fn main`): a forge renders the README as it is, so it
/// must not rely on rustdoc's hidden `# ` lines.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
mod readme {}
