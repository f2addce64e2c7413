//! Prometheus metrics of one registry: HTTP traffic, what the registry did and refused,
//! storage contents and latency, the collector, and the process.
//!
//! Each [`Metrics`] value is its own metric set (a `prometheus_client` registry of its
//! own, no global recorder), so several registries in one process, and tests running
//! in parallel, never mix their numbers. Labels take values from closed sets only
//! (route templates, methods, status classes, operation names, configured quota
//! prefixes), never from request data: the number of series does not grow with
//! repositories, tags or clients.
//!
//! Where the numbers come from:
//! - HTTP, pushes, pulls, mounts, deletes, refusals and authentication: the router's
//!   middleware and handlers, from the outcome of each request (`registry-core` has no
//!   metrics dependency);
//! - connections: the built-in server ([`serve_on`](crate::serve_on));
//! - storage counts and quota usage: read from the store when scraped
//!   ([`MetadataStore::stats`], [`MetadataStore::quota_usage`]), at most once per
//!   [`MetricsOptions::storage_refresh`];
//! - store latency and open upload sessions: the storage wrapper of
//!   [`instrument_storage`](crate::instrument_storage);
//! - the collector: [`Metrics::record_gc`], from the [`GcReport`] of each run;
//! - the process: `/proc/self` (Linux only), read when scraped.
//!
//! [`MetadataStore::stats`]: registry_core::MetadataStore::stats
//! [`MetadataStore::quota_usage`]: registry_core::MetadataStore::quota_usage

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry as PromRegistry;
use registry_core::{GcReport, Registry, UploadId};

use crate::process_metrics::ProcessCollector;

/// The `Content-Type` of the Prometheus text format (version 0.0.4).
pub(crate) const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of the OpenMetrics text format, which Prometheus asks for first.
pub(crate) const OPENMETRICS_TEXT: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Knobs of a [`Metrics`] set.
#[derive(Debug, Clone)]
pub struct MetricsOptions {
    /// Include the process metrics (`process_cpu_seconds_total`, resident memory, open
    /// file descriptors, start time; Linux only). Default on; turn it off for the
    /// second and later registries of one process, which would repeat them.
    pub process: bool,
    /// Storage counts and quota usage are read from the store when scraped, but at most
    /// once per this interval (several Prometheus servers scraping one registry cost
    /// the store one read per interval). Default 5 s.
    pub storage_refresh: Duration,
    /// How long a scrape waits for the store's counts before serving the previous
    /// values (and counting `registry_storage_refresh_errors_total`). Default 5 s.
    pub storage_timeout: Duration,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        MetricsOptions {
            process: true,
            storage_refresh: Duration::from_secs(5),
            storage_timeout: Duration::from_secs(5),
        }
    }
}

/// The metrics of one registry. Cheap to clone; clones share the numbers.
///
/// Give it to the router with [`HttpConfig::with_metrics`](crate::HttpConfig::with_metrics)
/// (which also serves `GET /metrics`), to the storage with
/// [`instrument_storage`](crate::instrument_storage) (store latency, open upload
/// sessions), or serve it on a listener of its own with
/// [`metrics_router`](crate::metrics_router).
///
/// ```
/// use registry_core::Registry;
/// use registry_http::{HttpConfig, Metrics, instrument_storage};
///
/// let metrics = Metrics::new();
/// let storage = registry_core::MemoryStore::new().into_storage();
/// let registry = Registry::builder(instrument_storage(storage, Some(&metrics), None)).build();
/// let app = registry_http::router(registry, HttpConfig::default().with_metrics(metrics));
/// # let _ = app;
/// ```
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

struct Inner {
    registry: PromRegistry,
    options: MetricsOptions,
    http: HttpMetrics,
    connections: ConnectionMetrics,
    ops: OpMetrics,
    storage: StorageMetrics,
    gc: GcMetrics,
    uploads: Arc<UploadSessions>,
    /// Collectors added after construction ([`Metrics::register_collector`]).
    added: AddedCollectors,
    /// When the storage gauges were last read; held while reading, so concurrent
    /// scrapes read the store once.
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
}

// ------------------------------------------------------------------ label values

/// A route template: the `route` label. Never the raw path, so a label value per
/// repository or digest cannot appear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Route {
    Base,
    Catalog,
    Blob,
    Uploads,
    Upload,
    Manifest,
    Tags,
    Referrers,
    Token,
    Metrics,
    Healthz,
    Readyz,
    Other,
}

impl Route {
    /// Every route, in order (its length is `ROUTES`).
    pub(crate) const ALL: [Route; ROUTES] = [
        Route::Base,
        Route::Catalog,
        Route::Blob,
        Route::Uploads,
        Route::Upload,
        Route::Manifest,
        Route::Tags,
        Route::Referrers,
        Route::Token,
        Route::Metrics,
        Route::Healthz,
        Route::Readyz,
        Route::Other,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Route::Base => "/v2/",
            Route::Catalog => "/v2/_catalog",
            Route::Blob => "/v2/{name}/blobs/{digest}",
            Route::Uploads => "/v2/{name}/blobs/uploads/",
            Route::Upload => "/v2/{name}/blobs/uploads/{uuid}",
            Route::Manifest => "/v2/{name}/manifests/{reference}",
            Route::Tags => "/v2/{name}/tags/list",
            Route::Referrers => "/v2/{name}/referrers/{digest}",
            Route::Token => "/token",
            Route::Metrics => "/metrics",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Other => "other",
        }
    }

    /// The template of a request path, split the way the router splits it.
    #[cfg(test)]
    pub(crate) fn of(path: &str) -> Route {
        Route::classify(path).0
    }

    /// The template of a request path, and for `/v2/<name>/...` routes the length of
    /// the repository name after `/v2/` (0 for the others).
    pub(crate) fn classify(path: &str) -> (Route, usize) {
        let route = match path {
            "/v2/" | "/v2" => Route::Base,
            "/v2/_catalog" => Route::Catalog,
            "/token" => Route::Token,
            "/metrics" => Route::Metrics,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            _ => {
                return path
                    .strip_prefix("/v2/")
                    .and_then(crate::routes::path_kind)
                    .unwrap_or((Route::Other, 0));
            }
        };
        (route, 0)
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// The `method` label: the methods the API serves, everything else as `OTHER`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum MethodLabel {
    Get,
    Head,
    Put,
    Post,
    Patch,
    Delete,
    Other,
}

impl MethodLabel {
    /// Every method label, in order (its length is `METHODS`).
    pub(crate) const ALL: [MethodLabel; METHODS] = [
        MethodLabel::Get,
        MethodLabel::Head,
        MethodLabel::Put,
        MethodLabel::Post,
        MethodLabel::Patch,
        MethodLabel::Delete,
        MethodLabel::Other,
    ];

    pub(crate) fn of(method: &Method) -> MethodLabel {
        match *method {
            Method::GET => MethodLabel::Get,
            Method::HEAD => MethodLabel::Head,
            Method::PUT => MethodLabel::Put,
            Method::POST => MethodLabel::Post,
            Method::PATCH => MethodLabel::Patch,
            Method::DELETE => MethodLabel::Delete,
            _ => MethodLabel::Other,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MethodLabel::Get => "GET",
            MethodLabel::Head => "HEAD",
            MethodLabel::Put => "PUT",
            MethodLabel::Post => "POST",
            MethodLabel::Patch => "PATCH",
            MethodLabel::Delete => "DELETE",
            MethodLabel::Other => "OTHER",
        }
    }
}

impl EncodeLabelValue for MethodLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// The `status` label: the class (`2xx`, `4xx`...), not the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct StatusClass(u8);

impl StatusClass {
    fn of(status: StatusCode) -> StatusClass {
        StatusClass((status.as_u16() / 100).clamp(1, 5) as u8)
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        write!(encoder, "{}xx", self.0)
    }
}

/// A policy refusal, by kind: what `registry_refusals_total{reason}` counts. Attached
/// to an error response by [`ApiError`](crate::ApiError), read by the middleware.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Refusal {
    ImmutableTag,
    Quota,
    ReadOnly,
    DeletesDisabled,
    SizeLimit,
    MissingBlob,
    TooManyRequests,
}

impl Refusal {
    const ALL: [Refusal; 7] = [
        Refusal::ImmutableTag,
        Refusal::Quota,
        Refusal::ReadOnly,
        Refusal::DeletesDisabled,
        Refusal::SizeLimit,
        Refusal::MissingBlob,
        Refusal::TooManyRequests,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refusal::ImmutableTag => "immutable_tag",
            Refusal::Quota => "quota",
            Refusal::ReadOnly => "read_only",
            Refusal::DeletesDisabled => "deletes_disabled",
            Refusal::SizeLimit => "size_limit",
            Refusal::MissingBlob => "missing_blob",
            Refusal::TooManyRequests => "too_many_requests",
        }
    }
}

/// How authentication went for one request: `registry_auth_requests_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum AuthResult {
    /// Credentials (password or token) verified.
    Success,
    /// A wrong password, or a token that does not verify.
    InvalidCredentials,
    /// Known caller (or valid token), but the policy or the token's scope refuses.
    Denied,
    /// No credentials where they are needed: the client is sent a challenge (the first
    /// step of every authenticated client's handshake, not a failure as such).
    Challenge,
    /// Credentials held back unchecked: too many failures from that identity or address.
    Throttled,
}

impl AuthResult {
    const ALL: [AuthResult; 5] = [
        AuthResult::Success,
        AuthResult::InvalidCredentials,
        AuthResult::Denied,
        AuthResult::Challenge,
        AuthResult::Throttled,
    ];

    fn as_str(self) -> &'static str {
        match self {
            AuthResult::Success => "success",
            AuthResult::InvalidCredentials => "invalid_credentials",
            AuthResult::Denied => "denied",
            AuthResult::Challenge => "challenge",
            AuthResult::Throttled => "throttled",
        }
    }
}

/// What a successful request did to the registry, derived from its route, method and
/// status by the middleware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    PushManifest,
    PushBlob,
    PullManifest,
    PullBlob,
    Mounted,
    MountFallback,
    DeleteManifest,
    DeleteTag,
    DeleteBlob,
}

/// The number of [`Outcome`]s.
const OUTCOMES: usize = 9;

impl Outcome {
    const ALL: [Outcome; OUTCOMES] = [
        Outcome::PushManifest,
        Outcome::PushBlob,
        Outcome::PullManifest,
        Outcome::PullBlob,
        Outcome::Mounted,
        Outcome::MountFallback,
        Outcome::DeleteManifest,
        Outcome::DeleteTag,
        Outcome::DeleteBlob,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    method: MethodLabel,
    status: StatusClass,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Route,
    method: MethodLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOpLabels {
    store: &'static str,
    operation: &'static str,
}

/// Declares [`StoreOp`]: every storage call the wrapper of
/// [`instrument_storage`](crate::instrument_storage) times, with its `store` and
/// `operation` labels.
macro_rules! store_ops {
    ($($op:ident => $store:literal $name:literal,)*) => {
        /// A storage call: the `store` and `operation` labels of the storage series, and
        /// the index of its series in [`Metrics`]' cache.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum StoreOp {
            $($op,)*
        }

        impl StoreOp {
            const COUNT: usize = [$($name,)*].len();

            fn labels(self) -> StoreOpLabels {
                let (store, operation) = match self {
                    $(StoreOp::$op => ($store, $name),)*
                };
                StoreOpLabels { store, operation }
            }
        }
    };
}

store_ops! {
    Stat => "blob" "stat",
    Read => "blob" "read",
    Delete => "blob" "delete",
    List => "blob" "list",
    CreateUpload => "blob" "create_upload",
    UploadInfo => "blob" "upload_info",
    AppendUpload => "blob" "append_upload",
    ReadUpload => "blob" "read_upload",
    CommitUpload => "blob" "commit_upload",
    DeleteUpload => "blob" "delete_upload",
    PutBytes => "blob" "put_bytes",
    ListUploads => "blob" "list_uploads",
    Blob => "metadata" "blob",
    BlobLink => "metadata" "blob_link",
    BlobRepositories => "metadata" "blob_repositories",
    Manifest => "metadata" "manifest",
    Tag => "metadata" "tag",
    TaggedManifest => "metadata" "tagged_manifest",
    Repository => "metadata" "repository",
    ListTags => "metadata" "list_tags",
    ListTagNames => "metadata" "list_tag_names",
    ListTagEntries => "metadata" "list_tag_entries",
    QuotaUsage => "metadata" "quota_usage",
    ListManifests => "metadata" "list_manifests",
    ListBlobLinks => "metadata" "list_blob_links",
    ListRepositories => "metadata" "list_repositories",
    ListReferrers => "metadata" "list_referrers",
    UnreferencedBlobLinks => "metadata" "unreferenced_blob_links",
    UnlinkedBlobs => "metadata" "unlinked_blobs",
    Stats => "metadata" "stats",
    Audit => "metadata" "audit",
    LinkBlob => "metadata" "link_blob",
    MountBlob => "metadata" "mount_blob",
    TouchBlobLink => "metadata" "touch_blob_link",
    UnlinkBlob => "metadata" "unlink_blob",
    PutManifest => "metadata" "put_manifest",
    SetTag => "metadata" "set_tag",
    DeleteTag => "metadata" "delete_tag",
    DeleteTagIf => "metadata" "delete_tag_if",
    DeleteManifest => "metadata" "delete_manifest",
    CollectManifest => "metadata" "collect_manifest",
    CollectBlobLink => "metadata" "collect_blob_link",
    BeginBlobDeletion => "metadata" "begin_blob_deletion",
    FinishBlobDeletion => "metadata" "finish_blob_deletion",
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrefixLabel {
    prefix: String,
}

// ------------------------------------------------------------------ metric groups

/// Seconds, from a millisecond to two minutes: registry requests range from a cached
/// HEAD to a multi-gigabyte layer upload.
const HTTP_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Seconds, from 100 µs (an in-memory or cached read) to 10 s (a slow bucket).
const STORE_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0,
];
/// Seconds, from 10 ms to an hour: a collection walks candidates, not the store.
const GC_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn http_histogram() -> Histogram {
    Histogram::new(&HTTP_BUCKETS)
}

fn store_histogram() -> Histogram {
    Histogram::new(&STORE_BUCKETS)
}

/// A histogram of durations with fixed buckets, updated with atomics: `prometheus_client`'s
/// `Histogram` takes a lock and checks for native buckets on every observation, and
/// with an observation per storage call and per request that showed in instruction
/// counts. Observations are whole nanoseconds: the bucket is found by comparing
/// integers, and the sum is one `fetch_add` (a float sum is a compare-and-swap loop).
/// Exposed the same way (through the same encoder call), in seconds.
#[derive(Clone, Debug)]
pub(crate) struct Histogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds in seconds, ascending; `+Inf` is implied.
    bounds: &'static [f64],
    /// The same bounds in nanoseconds.
    bounds_ns: Box<[u64]>,
    /// Observations per bucket (not cumulative), the last one for `+Inf`.
    counts: Box<[AtomicU64]>,
    /// The sum of the observations, in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram(Arc::new(HistogramInner {
            bounds,
            bounds_ns: bounds.iter().map(|b| (b * 1e9).round() as u64).collect(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }))
    }

    pub(crate) fn observe(&self, d: Duration) {
        let h = &*self.0;
        // Not `as_nanos`: its `u128` is wider than any duration measured here needs.
        let ns = d
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()));
        let i = h
            .bounds_ns
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(h.bounds_ns.len());
        h.counts[i].fetch_add(1, Ordering::Relaxed);
        h.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        let h = &*self.0;
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        // The count from the buckets: consistent with them under concurrent updates.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
    received: Family<RouteLabels, Counter>,
    sent: Family<RouteLabels, Counter>,
    in_flight: Gauge,
    /// The series above, by label index, filled on first use: a `Family` lookup hashes
    /// its labels under a lock, several times per request (measured with callgrind:
    /// about a third of what the metrics cost a small request), while the label sets
    /// are a few small enums. The series are created in the `Family` on first use, as
    /// before, so the exposition is the same.
    cache: HttpCache,
}

/// Route x method (x status class) indices of the per-request series (the counts of
/// the `Route` and `MethodLabel` variants; a test checks them).
pub(crate) const ROUTES: usize = 13;
pub(crate) const METHODS: usize = 7;
const STATUS_CLASSES: usize = 5;

#[derive(Default)]
struct HttpCache {
    requests: Vec<OnceLock<Counter>>,
    duration: Vec<OnceLock<Histogram>>,
    received: Vec<OnceLock<Counter>>,
    sent: Vec<OnceLock<Counter>>,
}

impl HttpCache {
    fn new() -> Self {
        fn slots<T>(n: usize) -> Vec<OnceLock<T>> {
            (0..n).map(|_| OnceLock::new()).collect()
        }
        HttpCache {
            requests: slots(ROUTES * METHODS * STATUS_CLASSES),
            duration: slots(ROUTES * METHODS),
            received: slots(ROUTES * METHODS),
            sent: slots(ROUTES * METHODS),
        }
    }
}

pub(crate) fn route_index(route: Route, method: MethodLabel) -> usize {
    route as usize * METHODS + method as usize
}

/// The built-in server's connection metrics.
#[derive(Clone)]
pub(crate) struct ConnectionMetrics {
    pub(crate) open: Gauge,
    pub(crate) accepted: Counter,
    pub(crate) evicted: Counter,
    pub(crate) header_timeouts: Counter,
}

struct OpMetrics {
    pushes: Family<KindLabel, Counter>,
    pulls: Family<KindLabel, Counter>,
    mounts: Family<ResultLabel, Counter>,
    deletes: Family<KindLabel, Counter>,
    refusals: Family<ReasonLabel, Counter>,
    auth: Family<ResultLabel, Counter>,
    /// The series above by [`Outcome`], [`Refusal`] and [`AuthResult`]: every one of
    /// them exists from the start, so they are taken from the families once, not
    /// looked up (labels hashed under a lock) per request.
    by_outcome: [Counter; OUTCOMES],
    by_refusal: [Counter; Refusal::ALL.len()],
    by_auth: [Counter; AuthResult::ALL.len()],
}

struct StorageMetrics {
    blobs: Gauge,
    blobs_deleting: Gauge,
    blob_links: Gauge,
    manifests: Gauge,
    tags: Gauge,
    referrers: Gauge,
    repositories: Gauge,
    quota_usage: Family<PrefixLabel, Gauge>,
    quota_limit: Family<PrefixLabel, Gauge>,
    refresh_errors: Counter,
    op_duration: HistogramFamily<StoreOpLabels>,
    op_errors: Family<StoreOpLabels, Counter>,
    /// `op_duration`'s series by [`StoreOp`], filled on first use (so the exposition
    /// shows the operations a store was asked for, as the family alone would): an
    /// index instead of hashing the labels under the family's lock on every call.
    op_cache: Vec<OnceLock<Histogram>>,
}

struct GcMetrics {
    runs: Family<ResultLabel, Counter>,
    removed: Family<KindLabel, Counter>,
    bytes_freed: Counter,
    duration: Histogram,
    last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Open upload sessions, as the storage wrapper sees them: sessions created and not
/// yet deleted, reset to the store's own list whenever the registry lists it (every
/// collection, and when a session limit is reached). A set of ids rather than a count,
/// so that the deletion of a session this process never saw created (it was opened
/// before a restart, or by another process on a shared bucket) changes nothing.
#[derive(Debug, Default)]
pub(crate) struct UploadSessions {
    /// `None` until the wrapper is installed and the store has been listed once.
    open: Mutex<Option<HashSet<UploadId>>>,
    /// Whether a storage wrapper reports to this set (otherwise the gauge is omitted
    /// rather than shown as a misleading zero).
    tracked: std::sync::atomic::AtomicBool,
}

impl UploadSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashSet<UploadId>>> {
        // A set of ids: a panic elsewhere cannot leave it inconsistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn track(&self) {
        self.tracked
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn created(&self, id: &UploadId) {
        if let Some(open) = self.lock().as_mut() {
            open.insert(id.clone());
        }
    }

    pub(crate) fn deleted(&self, id: &UploadId) {
        if let Some(open) = self.lock().as_mut() {
            open.remove(id);
        }
    }

    pub(crate) fn listed<'a>(&self, ids: impl Iterator<Item = &'a UploadId>) {
        *self.lock() = Some(ids.cloned().collect());
    }

    fn needs_listing(&self) -> bool {
        self.tracked.load(std::sync::atomic::Ordering::Relaxed) && self.lock().is_none()
    }
}

/// Writes metrics into a scrape: see [`Metrics::register_encoder`].
pub type MetricsEncoder =
    Box<dyn Fn(&mut DescriptorEncoder<'_>) -> fmt::Result + Send + Sync + 'static>;

/// Encoders added to a metric set already built (the registry of `prometheus_client`
/// takes collectors only before it is shared): run after the others.
#[derive(Clone, Default)]
struct AddedCollectors(Arc<std::sync::Mutex<Vec<MetricsEncoder>>>);

impl fmt::Debug for AddedCollectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddedCollectors").finish_non_exhaustive()
    }
}

impl Collector for AddedCollectors {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let added = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for encode in added.iter() {
            encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// Emits `registry_upload_sessions_open` when scraped, if a storage wrapper keeps it.
#[derive(Debug)]
struct UploadSessionsCollector(Arc<UploadSessions>);

impl Collector for UploadSessionsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(open) = self.0.lock().as_ref().map(HashSet::len) else {
            return Ok(());
        };
        let gauge = ConstGauge::new(open as i64);
        let metric = encoder.encode_descriptor(
            "registry_upload_sessions_open",
            "Upload sessions open in the store, as this process sees them",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

impl Metrics {
    /// A new, empty metric set with the default [`MetricsOptions`].
    pub fn new() -> Self {
        Self::with_options(MetricsOptions::default())
    }

    /// A new, empty metric set.
    pub fn with_options(options: MetricsOptions) -> Self {
        let mut r = PromRegistry::default();
        let http = HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(http_histogram),
            received: Family::default(),
            sent: Family::default(),
            in_flight: Gauge::default(),
            cache: HttpCache::new(),
        };
        r.register(
            "registry_http_requests",
            "HTTP requests answered, by route template, method and status class",
            http.requests.clone(),
        );
        r.register(
            "registry_http_request_duration_seconds",
            "Time from receiving a request to sending its response headers (the body of a \
             blob download streams after it), by route template and method",
            http.duration.clone(),
        );
        r.register(
            "registry_http_request_bytes",
            "Request body bytes received, by route template and method",
            http.received.clone(),
        );
        r.register(
            "registry_http_response_bytes",
            "Response body bytes sent, by route template and method",
            http.sent.clone(),
        );
        r.register(
            "registry_http_requests_in_flight",
            "Requests being handled (until their response headers are sent)",
            http.in_flight.clone(),
        );
        let connections = ConnectionMetrics {
            open: Gauge::default(),
            accepted: Counter::default(),
            evicted: Counter::default(),
            header_timeouts: Counter::default(),
        };
        r.register(
            "registry_http_open_connections",
            "Connections open on the built-in server",
            connections.open.clone(),
        );
        r.register(
            "registry_http_connections_accepted",
            "Connections accepted by the built-in server",
            connections.accepted.clone(),
        );
        r.register(
            "registry_http_connections_evicted",
            "Connections the built-in server closed to make room at its connection limit",
            connections.evicted.clone(),
        );
        r.register(
            "registry_http_header_timeouts",
            "Connections closed because no request headers arrived in time (idle \
             keep-alive or slow clients)",
            connections.header_timeouts.clone(),
        );

        // Every series of a closed set exists from the start, at zero: a rate over a
        // series that appears only with its first event misses that event.
        let (pushes, pulls, mounts, deletes) = (
            Family::<KindLabel, Counter>::default(),
            Family::<KindLabel, Counter>::default(),
            Family::<ResultLabel, Counter>::default(),
            Family::<KindLabel, Counter>::default(),
        );
        let by_outcome = Outcome::ALL.map(|outcome| {
            let (family, kind) = match outcome {
                Outcome::PushManifest => (&pushes, "manifest"),
                Outcome::PushBlob => (&pushes, "blob"),
                Outcome::PullManifest => (&pulls, "manifest"),
                Outcome::PullBlob => (&pulls, "blob"),
                Outcome::DeleteManifest => (&deletes, "manifest"),
                Outcome::DeleteTag => (&deletes, "tag"),
                Outcome::DeleteBlob => (&deletes, "blob"),
                Outcome::Mounted => {
                    return mounts
                        .get_or_create(&ResultLabel { result: "mounted" })
                        .clone();
                }
                Outcome::MountFallback => {
                    return mounts
                        .get_or_create(&ResultLabel { result: "fallback" })
                        .clone();
                }
            };
            family.get_or_create(&KindLabel { kind }).clone()
        });
        let refusals = Family::<ReasonLabel, Counter>::default();
        let by_refusal = Refusal::ALL.map(|refusal| {
            refusals
                .get_or_create(&ReasonLabel {
                    reason: refusal.as_str(),
                })
                .clone()
        });
        let auth = Family::<ResultLabel, Counter>::default();
        let by_auth = AuthResult::ALL.map(|result| {
            auth.get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .clone()
        });
        let ops = OpMetrics {
            pushes,
            pulls,
            mounts,
            deletes,
            refusals,
            auth,
            by_outcome,
            by_refusal,
            by_auth,
        };
        r.register(
            "registry_pushes",
            "Manifests and blobs pushed (acknowledged with 201), by kind",
            ops.pushes.clone(),
        );
        r.register(
            "registry_pulls",
            "Manifests and blobs served (GET answered 200 or 206), by kind",
            ops.pulls.clone(),
        );
        r.register(
            "registry_mounts",
            "Cross-repository blob mounts: mounted, or fallback to an upload",
            ops.mounts.clone(),
        );
        r.register(
            "registry_deletes",
            "Deletes acknowledged, by kind (manifest, tag, blob)",
            ops.deletes.clone(),
        );
        r.register(
            "registry_refusals",
            "Requests refused by a policy or limit, by reason",
            ops.refusals.clone(),
        );
        r.register(
            "registry_auth_requests",
            "Authentication and authorization outcomes: success (credentials verified), \
             invalid_credentials, denied (policy or token scope), challenge (no \
             credentials where needed)",
            ops.auth.clone(),
        );

        let storage = StorageMetrics {
            blobs: Gauge::default(),
            blobs_deleting: Gauge::default(),
            blob_links: Gauge::default(),
            manifests: Gauge::default(),
            tags: Gauge::default(),
            referrers: Gauge::default(),
            repositories: Gauge::default(),
            quota_usage: Family::default(),
            quota_limit: Family::default(),
            refresh_errors: Counter::default(),
            op_duration: Family::new_with_constructor(store_histogram),
            op_errors: Family::default(),
            op_cache: (0..StoreOp::COUNT).map(|_| OnceLock::new()).collect(),
        };
        for (name, help, gauge) in [
            (
                "registry_storage_blobs",
                "Blobs stored (distinct digests, manifests included)",
                &storage.blobs,
            ),
            (
                "registry_storage_blobs_deleting",
                "Blobs whose bytes a collector is deleting",
                &storage.blobs_deleting,
            ),
            (
                "registry_storage_blob_links",
                "Links from repositories to blobs",
                &storage.blob_links,
            ),
            (
                "registry_storage_manifests",
                "Manifests, counted once per repository holding them",
                &storage.manifests,
            ),
            ("registry_storage_tags", "Tags", &storage.tags),
            (
                "registry_storage_referrers",
                "Entries of the referrers index",
                &storage.referrers,
            ),
            (
                "registry_storage_repositories",
                "Repositories",
                &storage.repositories,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "registry_quota_usage_bytes",
            "Bytes counted against the quota of a configured prefix (absent until the \
             store has counted it, at the first link under the prefix)",
            storage.quota_usage.clone(),
        );
        r.register(
            "registry_quota_limit_bytes",
            "The quota of a configured prefix",
            storage.quota_limit.clone(),
        );
        r.register(
            "registry_storage_refresh_errors",
            "Scrapes that could not read the store's counts (the previous values were \
             served)",
            storage.refresh_errors.clone(),
        );
        r.register(
            "registry_storage_operation_duration_seconds",
            "Latency of storage calls, by store (blob, metadata) and operation. Reads are \
             timed until the stream opens, not until it is consumed",
            storage.op_duration.clone(),
        );
        r.register(
            "registry_storage_operation_errors",
            "Storage calls that failed, by store and operation",
            storage.op_errors.clone(),
        );

        let gc = GcMetrics {
            runs: Family::default(),
            removed: Family::default(),
            bytes_freed: Counter::default(),
            duration: Histogram::new(&GC_BUCKETS),
            last_success: Gauge::default(),
        };
        for result in ["ok", "error"] {
            let _ = gc.runs.get_or_create(&ResultLabel { result });
        }
        for kind in GC_KINDS {
            let _ = gc.removed.get_or_create(&KindLabel { kind });
        }
        r.register(
            "registry_gc_runs",
            "Garbage collections run, by result",
            gc.runs.clone(),
        );
        r.register(
            "registry_gc_removed",
            "Items garbage collection removed, by kind",
            gc.removed.clone(),
        );
        r.register(
            "registry_gc_bytes_freed",
            "Bytes garbage collection freed",
            gc.bytes_freed.clone(),
        );
        r.register(
            "registry_gc_duration_seconds",
            "Duration of successful garbage collections",
            gc.duration.clone(),
        );
        r.register(
            "registry_gc_last_success_timestamp_seconds",
            "When the last successful garbage collection ended (Unix time)",
            gc.last_success.clone(),
        );

        let uploads = Arc::new(UploadSessions::default());
        r.register_collector(Box::new(UploadSessionsCollector(uploads.clone())));
        let added = AddedCollectors::default();
        r.register_collector(Box::new(added.clone()));
        if options.process {
            r.register_collector(Box::new(ProcessCollector));
        }
        Metrics {
            inner: Arc::new(Inner {
                registry: r,
                added,
                options,
                http,
                connections,
                ops,
                storage,
                gc,
                uploads,
                last_refresh: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// Adds what `encode` writes to every later scrape: for parts built after the
    /// metric set, such as webhook delivery
    /// ([`NotifyCollector::encode_to`](crate::notify::NotifyCollector::encode_to)).
    pub fn register_encoder(&self, encode: MetricsEncoder) {
        self.inner
            .added
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(encode);
    }

    /// The metrics in the Prometheus text format (version 0.0.4), as they stand (see
    /// [`refresh_storage`](Self::refresh_storage) for the storage gauges).
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry);
        out
    }

    /// The metrics in the OpenMetrics text format (what Prometheus asks for first).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// Reads the storage gauges (counts from [`MetadataStore::stats`], quota usage of
    /// every prefix `registry` has a quota on, and the first list of upload sessions)
    /// from `registry`'s store, unless they were read less than
    /// [`MetricsOptions::storage_refresh`] ago. A failing or slow store leaves the
    /// previous values and counts `registry_storage_refresh_errors_total`. The `/metrics`
    /// endpoints call it before every scrape.
    ///
    /// [`MetadataStore::stats`]: registry_core::MetadataStore::stats
    pub async fn refresh_storage(&self, registry: &Registry) {
        let mut last = self.inner.last_refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.inner.options.storage_refresh) {
            return;
        }
        *last = Some(Instant::now());
        let storage = registry.storage();
        let timeout = self.inner.options.storage_timeout;
        let s = &self.inner.storage;
        match tokio::time::timeout(timeout, storage.metadata.stats()).await {
            Ok(Ok(stats)) => {
                s.blobs.set(gauge_value(stats.blobs));
                s.blobs_deleting.set(gauge_value(stats.deleting));
                s.blob_links.set(gauge_value(stats.blob_links));
                s.manifests.set(gauge_value(stats.manifests));
                s.tags.set(gauge_value(stats.tags));
                s.referrers.set(gauge_value(stats.referrers));
                s.repositories.set(gauge_value(stats.repositories));
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: reading the store's counts failed");
                s.refresh_errors.inc();
            }
            Err(_) => {
                tracing::warn!(?timeout, "metrics: reading the store's counts timed out");
                s.refresh_errors.inc();
            }
        }
        for quota in &registry.config().policy.quotas {
            let label = PrefixLabel {
                prefix: quota.prefix.to_string(),
            };
            s.quota_limit
                .get_or_create(&label)
                .set(gauge_value(quota.bytes));
            match tokio::time::timeout(timeout, storage.metadata.quota_usage(&quota.prefix)).await {
                Ok(Ok(Some(used))) => {
                    s.quota_usage.get_or_create(&label).set(gauge_value(used));
                }
                Ok(Ok(None)) => {
                    s.quota_usage.remove(&label);
                }
                _ => {
                    tracing::warn!(prefix = %quota.prefix, "metrics: reading quota usage failed");
                    s.refresh_errors.inc();
                }
            }
        }
        if self.inner.uploads.needs_listing() {
            // Through the wrapper, which resets the set from the list.
            if !matches!(
                tokio::time::timeout(timeout, storage.blobs.list_uploads()).await,
                Ok(Ok(_))
            ) {
                s.refresh_errors.inc();
            }
        }
    }

    /// Records one garbage collection: its result, what it removed (nothing for a dry
    /// run), the bytes it freed and how long it took. Call it with what
    /// [`Registry::collect_garbage`] returned.
    pub fn record_gc(&self, result: &registry_core::Result<GcReport>) {
        let gc = &self.inner.gc;
        let report = match result {
            Ok(report) => report,
            Err(_) => {
                gc.runs
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                return;
            }
        };
        gc.runs.get_or_create(&ResultLabel { result: "ok" }).inc();
        gc.duration.observe(report.duration);
        gc.last_success.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        if report.dry_run {
            return;
        }
        for (kind, n) in [
            ("tags", report.retention.len() as u64),
            ("manifests", report.manifests_removed),
            ("links", report.links_removed),
            ("blobs", report.blobs_deleted),
            ("orphans", report.orphans_deleted),
            ("uploads", report.uploads_expired),
        ] {
            gc.removed.get_or_create(&KindLabel { kind }).inc_by(n);
        }
        gc.bytes_freed.inc_by(report.bytes_freed);
    }

    // ----- for the router, the server and the storage wrapper -----

    pub(crate) fn connections(&self) -> ConnectionMetrics {
        self.inner.connections.clone()
    }

    pub(crate) fn uploads(&self) -> &UploadSessions {
        &self.inner.uploads
    }

    pub(crate) fn in_flight(&self) -> &Gauge {
        &self.inner.http.in_flight
    }

    /// The request body bytes of a route and method.
    pub(crate) fn bytes_received(&self, route: Route, method: MethodLabel) -> &Counter {
        let http = &self.inner.http;
        http.cache.received[route_index(route, method)].get_or_init(|| {
            http.received
                .get_or_create(&RouteLabels { route, method })
                .clone()
        })
    }

    /// The response body bytes of a route and method.
    pub(crate) fn bytes_sent(&self, route: Route, method: MethodLabel) -> &Counter {
        let http = &self.inner.http;
        http.cache.sent[route_index(route, method)].get_or_init(|| {
            http.sent
                .get_or_create(&RouteLabels { route, method })
                .clone()
        })
    }

    /// Counts a request whose response headers are ready.
    pub(crate) fn request(
        &self,
        route: Route,
        method: MethodLabel,
        status: StatusCode,
        latency: Duration,
    ) {
        let http = &self.inner.http;
        let class = StatusClass::of(status);
        let i = route_index(route, method);
        http.cache.requests[i * STATUS_CLASSES + usize::from(class.0 - 1)]
            .get_or_init(|| {
                let labels = RequestLabels {
                    route,
                    method,
                    status: class,
                };
                http.requests.get_or_create(&labels).clone()
            })
            .inc();
        http.cache.duration[i]
            .get_or_init(|| {
                http.duration
                    .get_or_create(&RouteLabels { route, method })
                    .clone()
            })
            .observe(latency);
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        self.inner.ops.by_outcome[outcome as usize].inc();
    }

    pub(crate) fn refusal(&self, refusal: Refusal) {
        self.inner.ops.by_refusal[refusal as usize].inc();
    }

    pub(crate) fn auth(&self, result: AuthResult) {
        self.inner.ops.by_auth[result as usize].inc();
    }

    /// Records one storage call.
    pub(crate) fn storage_call(&self, op: StoreOp, took: Duration, ok: bool) {
        let s = &self.inner.storage;
        s.op_cache[op as usize]
            .get_or_init(|| s.op_duration.get_or_create(&op.labels()).clone())
            .observe(took);
        if !ok {
            s.op_errors.get_or_create(&op.labels()).inc();
        }
    }
}

/// What `registry_gc_removed_total{kind}` counts.
const GC_KINDS: [&str; 6] = ["tags", "manifests", "links", "blobs", "orphans", "uploads"];

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Whether `path`'s query names `key` (`mount=` of a blob upload).
pub(crate) fn query_has(query: Option<&str>, key: &str) -> bool {
    query.is_some_and(|q| q.split('&').any(|pair| pair.split('=').next() == Some(key)))
}

/// What a request did, from its route, method and status (and, for uploads, whether it
/// asked for a mount; for manifest deletes, whether the reference is a digest).
pub(crate) fn outcome_of(
    route: Route,
    method: MethodLabel,
    status: StatusCode,
    mount: bool,
    digest_reference: bool,
) -> Option<Outcome> {
    use MethodLabel as M;
    let s = status.as_u16();
    Some(match (route, method, s) {
        (Route::Manifest, M::Put, 201) => Outcome::PushManifest,
        (Route::Manifest, M::Get, 200) => Outcome::PullManifest,
        (Route::Blob, M::Get, 200 | 206) => Outcome::PullBlob,
        (Route::Upload, M::Put, 201) => Outcome::PushBlob,
        (Route::Uploads, M::Post, 201) if mount => Outcome::Mounted,
        (Route::Uploads, M::Post, 202) if mount => Outcome::MountFallback,
        (Route::Uploads, M::Post, 201) => Outcome::PushBlob,
        (Route::Manifest, M::Delete, 202) if digest_reference => Outcome::DeleteManifest,
        (Route::Manifest, M::Delete, 202) => Outcome::DeleteTag,
        (Route::Blob, M::Delete, 202) => Outcome::DeleteBlob,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_indices_cover_every_label() {
        assert_eq!(Route::ALL.len(), ROUTES);
        assert_eq!(
            Route::ALL.iter().map(|r| *r as usize).max(),
            Some(ROUTES - 1)
        );
        assert_eq!(MethodLabel::Other as usize, METHODS - 1);
        for (i, r) in Route::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, m) in MethodLabel::ALL.iter().enumerate() {
            assert_eq!(*m as usize, i);
        }
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, a) in AuthResult::ALL.iter().enumerate() {
            assert_eq!(*a as usize, i);
        }
        for code in [100, 200, 302, 404, 503, 599] {
            let class = StatusClass::of(StatusCode::from_u16(code).unwrap());
            assert!((1..=STATUS_CLASSES as u8).contains(&class.0));
        }
    }

    #[test]
    fn histograms_are_exposed_as_prometheus_client_exposes_its_own() {
        use prometheus_client::metrics::histogram::Histogram as Reference;
        let ours = Histogram::new(&STORE_BUCKETS);
        let reference = Reference::new(STORE_BUCKETS);
        for v in [
            0.0, 0.00005, 0.0001, 0.0003, 0.007, 0.5, 0.5, 10.0, 11.0, 1e9,
        ] {
            ours.observe(Duration::from_secs_f64(v));
            reference.observe(v);
        }
        let (mut a, mut b) = (PromRegistry::default(), PromRegistry::default());
        a.register("latency_seconds", "Latency", ours);
        b.register("latency_seconds", "Latency", reference);
        // The same text, but for the sum's last digits: ours adds whole nanoseconds.
        let same = |a: &str, b: &str| {
            let (mut sum_a, mut sum_b) = (None, None);
            for (la, lb) in a.lines().zip(b.lines()) {
                if let (Some(x), Some(y)) = (
                    la.strip_prefix("latency_seconds_sum "),
                    lb.strip_prefix("latency_seconds_sum "),
                ) {
                    sum_a = x.parse::<f64>().ok();
                    sum_b = y.parse::<f64>().ok();
                } else {
                    assert_eq!(la, lb);
                }
            }
            assert_eq!(a.lines().count(), b.lines().count());
            let (x, y) = (sum_a.unwrap(), sum_b.unwrap());
            assert!((x - y).abs() <= y * 1e-12, "{x} {y}");
        };
        let (mut text_a, mut text_b) = (String::new(), String::new());
        prometheus_client::encoding::text::encode(&mut text_a, &a).unwrap();
        prometheus_client::encoding::text::encode(&mut text_b, &b).unwrap();
        same(&text_a, &text_b);
        let (mut text_a, mut text_b) = (String::new(), String::new());
        prometheus_client::encoding::prometheus_text::encode(&mut text_a, &a).unwrap();
        prometheus_client::encoding::prometheus_text::encode(&mut text_b, &b).unwrap();
        same(&text_a, &text_b);
        assert!(
            text_a.contains("latency_seconds_bucket{le=\"+Inf\"} 10"),
            "{text_a}"
        );
    }

    #[test]
    fn routes_are_templates() {
        assert_eq!(Route::of("/v2/"), Route::Base);
        assert_eq!(Route::of("/v2/a/b/manifests/v1"), Route::Manifest);
        assert_eq!(Route::of("/v2/a/blobs/sha256:ab"), Route::Blob);
        assert_eq!(Route::of("/v2/a/blobs/uploads/"), Route::Uploads);
        assert_eq!(Route::of("/v2/a/blobs/uploads/x_y"), Route::Upload);
        assert_eq!(Route::of("/v2/a/tags/list"), Route::Tags);
        assert_eq!(Route::of("/v2/a/referrers/sha256:ab"), Route::Referrers);
        assert_eq!(Route::of("/v2/a/unknown"), Route::Other);
        assert_eq!(Route::of("/anything"), Route::Other);
        for r in Route::ALL {
            assert!(!r.as_str().is_empty());
        }
    }

    #[test]
    fn outcomes() {
        use MethodLabel as M;
        let ok = StatusCode::CREATED;
        assert_eq!(
            outcome_of(Route::Uploads, M::Post, ok, true, false),
            Some(Outcome::Mounted)
        );
        assert_eq!(
            outcome_of(Route::Uploads, M::Post, StatusCode::ACCEPTED, false, false),
            None
        );
        assert_eq!(
            outcome_of(
                Route::Manifest,
                M::Delete,
                StatusCode::ACCEPTED,
                false,
                true
            ),
            Some(Outcome::DeleteManifest)
        );
        assert!(query_has(Some("from=a&mount=sha256:x"), "mount"));
        assert!(!query_has(Some("xmount=1"), "mount"));
        assert!(!query_has(None, "mount"));
    }

    #[test]
    fn exposition_has_the_closed_sets_at_zero() {
        let m = Metrics::with_options(MetricsOptions {
            process: false,
            ..MetricsOptions::default()
        });
        let text = m.encode_prometheus();
        assert!(
            text.contains("registry_refusals_total{reason=\"quota\"} 0"),
            "{text}"
        );
        assert!(text.contains("registry_auth_requests_total{result=\"challenge\"} 0"));
        assert!(!text.contains("registry_upload_sessions_open"));
        m.request(
            Route::Manifest,
            MethodLabel::Put,
            StatusCode::CREATED,
            Duration::from_millis(3),
        );
        let text = m.encode_prometheus();
        assert!(text.contains(
            "registry_http_requests_total{route=\"/v2/{name}/manifests/{reference}\",method=\"PUT\",status=\"2xx\"} 1"
        ));
        assert!(m.encode_openmetrics().ends_with("# EOF\n"));
    }
}
