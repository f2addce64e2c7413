//! `/healthz`, `/readyz` and `/metrics`: on the registry's router, and on a router of
//! their own for a separate listener ([`metrics_router`](crate::metrics_router)).
//!
//! - `/healthz`: the process is up and serving: always 200.
//! - `/readyz`: the storage answers a cheap metadata read (one repository listed)
//!   within two seconds: 200, otherwise 503 (the cause goes to the log, not to the
//!   unauthenticated caller).
//! - `/metrics`: reads the storage gauges ([`Metrics::refresh_storage`]) then encodes
//!   everything: OpenMetrics when the client asks for it (Prometheus does), otherwise
//!   the Prometheus text format.

use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use registry_core::Registry;

use crate::metrics::{Metrics, OPENMETRICS_TEXT, PROMETHEUS_TEXT};
use crate::routes::AppState;

/// How long `/readyz` waits for the storage.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

fn text(status: StatusCode, body: &'static str) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /healthz`.
pub(crate) async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

/// `GET /readyz` for `registry`.
pub(crate) async fn ready(registry: &Registry) -> Response {
    let metadata = registry.storage().metadata;
    match tokio::time::timeout(READY_TIMEOUT, metadata.list_repositories(None, 1)).await {
        Ok(Ok(_)) => text(StatusCode::OK, "ready\n"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check: storage read failed");
            text(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable\n")
        }
        Err(_) => {
            tracing::warn!(timeout = ?READY_TIMEOUT, "readiness check: storage read timed out");
            text(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable\n")
        }
    }
}

/// `GET /metrics` for `registry`.
pub(crate) async fn scrape(
    registry: &Registry,
    metrics: &Metrics,
    headers: &HeaderMap,
) -> Response {
    metrics.refresh_storage(registry).await;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (body, content_type) = if openmetrics {
        (metrics.encode_openmetrics(), OPENMETRICS_TEXT)
    } else {
        (metrics.encode_prometheus(), PROMETHEUS_TEXT)
    };
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /readyz` on the registry's router.
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    ready(&state.registry).await
}

/// `GET /metrics` on the registry's router. With authentication on, only for callers
/// with valid credentials (as `/v2/`): the metrics name quota prefixes and traffic. A
/// scraper without credentials uses the separate listener of [`metrics_router`].
pub(crate) async fn metrics(State(state): State<AppState>, req: Request) -> Response {
    let Some(m) = state.observer.metrics.clone() else {
        return crate::error::no_such_endpoint().await.into_response();
    };
    if let Err(e) = state
        .check_credentials(crate::access_log::ReqView::of(&req))
        .await
    {
        return e.into_response();
    }
    scrape(&state.registry, &m, req.headers()).await
}

/// The router of a separate metrics listener: `GET /metrics`, `/healthz`, `/readyz`,
/// with no authentication (bind it where only the scraper reaches it).
pub fn metrics_router(registry: Registry, metrics: Metrics) -> Router {
    #[derive(Clone)]
    struct Own {
        registry: Registry,
        metrics: Metrics,
    }
    async fn own_metrics(State(s): State<Own>, headers: HeaderMap) -> Response {
        scrape(&s.registry, &s.metrics, &headers).await
    }
    async fn own_ready(State(s): State<Own>) -> Response {
        ready(&s.registry).await
    }
    Router::new()
        .route("/metrics", get(own_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(own_ready))
        .with_state(Own { registry, metrics })
}
