//! Webhook notifications: every change the registry commits, POSTed to HTTP endpoints,
//! at least once, in order.
//!
//! The source is the registry's transactional outbox
//! ([`Registry::events_after`]): each change writes its events in the same atomic
//! metadata change that makes it, numbered, so an event exists if and only if its
//! change was committed, whichever process made it. A [`Notifier`] runs one task per
//! [`Endpoint`]. The task claims the endpoint's *consumer* in the store
//! ([`Registry::claim_events`]; the consumer is named after the URL, `webhook:URL`),
//! so that of several processes sharing one storage exactly one delivers to an
//! endpoint at a time and all of them share its cursor: the lease holder reads events
//! after the cursor, drops those the endpoint's [`EventFilter`] refuses, POSTs the
//! others in batches in sequence order, and stores the cursor
//! ([`Registry::ack_events`]) after each `2xx`. A failed POST is retried with the same
//! body (same event ids, same delivery id) after an exponential backoff with jitter
//! (capped at [`NotifyConfig::backoff_max`]), renewing the lease meanwhile, for as long
//! as it takes: nothing after it is sent before it (strict order per endpoint, so per
//! repository too). A process that dies while holding the lease leaves it to expire
//! ([`NotifyConfig::lease`]); another process then resends from the stored cursor:
//! receivers must drop duplicates by event id.
//!
//! A new endpoint starts at the newest event (no history). A process wakes up as soon
//! as it writes an event itself; events of other processes are seen by polling
//! ([`NotifyConfig::poll`]). Once caught up, a task waits [`NotifyConfig::linger`]
//! (25 ms) before reading again, so a burst of pushes travels in a few requests rather
//! than one per push (a request costs the registry about as much as a push). A
//! periodic [`Registry::trim_events`] removes events that every consumer has
//! acknowledged and that are older than the registry's
//! [`event_retention`](registry_core::RegistryConfig::event_retention) (or beyond its
//! `max_events`), as the collector does on each run.
//!
//! # Requests
//!
//! `POST` to the endpoint's URL, with:
//!
//! | header | value |
//! |---|---|
//! | `Content-Type` | the [`PayloadFormat`]'s media type |
//! | [`SIGNATURE_HEADER`] (`X-Registry-Signature`) | `sha256=` and the lowercase hex HMAC-SHA256 of the exact body with the endpoint's secret (absent without a secret) |
//! | [`DELIVERY_HEADER`] (`X-Registry-Delivery`) | an id of the request's content: the same on every retry of one batch, and in every process |
//! | [`ATTEMPT_HEADER`] (`X-Registry-Delivery-Attempt`) | 1 on the first attempt, then 2, 3, ... |
//! | `User-Agent` | `registry-http/VERSION` |
//!
//! Verify a signature by computing the HMAC over the raw body bytes (before any JSON
//! parsing) and comparing in constant time (`scripts/e2e/receiver.py` does).
//!
//! Formats ([`PayloadFormat`]):
//! - `distribution` (the default): CNCF Distribution's envelope,
//!   `{"events":[...]}`, so receivers written for Distribution work unchanged. Each
//!   event has `id` (the outbox id, stable in every process: drop duplicates by it),
//!   `timestamp` (RFC 3339), `action` (`push`, `delete`, `mount`), `target` (`mediaType`,
//!   `digest`, `size`, `length`, `repository`, `fromRepository`, `url`, `tag` where they
//!   apply, as Distribution sets them), `request` and `actor` (empty: the outbox does
//!   not keep request data) and `source` (`addr`, `instanceID` of the delivering
//!   process). A manifest pushed by tag is one `push` event carrying the tag (the
//!   manifest event and its tag move are merged, as Distribution reports them); a tag
//!   moved to a manifest pushed earlier is a `push` with its tag too. Events
//!   Distribution has no form for (a repository's creation, the collector's deletion
//!   of a blob's bytes) are not sent in this format. Content type
//!   `application/vnd.docker.distribution.events.v1+json` (Distribution 2.x);
//!   `distribution-v2` sends the same body as
//!   `application/vnd.docker.distribution.events.v2+json` (what Distribution 3 sends);
//! - `cloudevents`: one CloudEvents 1.0 event per request, structured mode
//!   (`application/cloudevents+json`);
//! - `cloudevents-batch`: a JSON array of them (`application/cloudevents-batch+json`).
//!
//! A CloudEvent has `id` (the outbox id), `source` ([`NotifyConfig::with_source`]), `type`
//! (`oci.registry.` and the event kind: `oci.registry.manifest_put`,
//! `oci.registry.tag_moved`, ...), `time`, `subject` (`repo@digest`, `repo:tag`,
//! `repo`, or the digest of a collected blob) and `data`: `{"seq": N, "action":
//! "push", "mediaType": ..., "event": {...}}`, with `seq` its number in the outbox,
//! `mediaType` that of the manifest a tag moved to (tag moves only), and `event` the
//! event as [`registry_core::Event`] serializes it (`kind`, `repo`, `digest`, `tag`,
//! `to`, ...).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{self, HeaderValue, Request, StatusCode, Uri};
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full, Limited};
use registry_core::{Event, Reference, Registry, RepoName, StoredEvent};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The request header with the body's signature: `sha256=` and the lowercase hex
/// HMAC-SHA256 of the exact body bytes, keyed with the endpoint's secret.
pub const SIGNATURE_HEADER: &str = "x-registry-signature";
/// The request header with the delivery id: the same on every retry of one batch and
/// in every process, different for different batches.
pub const DELIVERY_HEADER: &str = "x-registry-delivery";
/// The request header with the attempt number of this delivery (1, 2, ...).
pub const ATTEMPT_HEADER: &str = "x-registry-delivery-attempt";

/// Distribution's envelope media type, as Distribution 2.x sends it.
pub const DISTRIBUTION_EVENTS_V1: &str = "application/vnd.docker.distribution.events.v1+json";
/// Distribution's envelope media type, as Distribution 3 sends it (same body).
pub const DISTRIBUTION_EVENTS_V2: &str = "application/vnd.docker.distribution.events.v2+json";
/// A CloudEvent in structured mode.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
/// A batch of CloudEvents.
pub const CLOUDEVENTS_BATCH_JSON: &str = "application/cloudevents-batch+json";
/// The prefix of CloudEvents' `type`: `oci.registry.manifest_put`, ...
pub const CLOUDEVENTS_TYPE_PREFIX: &str = "oci.registry.";

/// The media type Distribution gives blobs in push events.
const BLOB_MEDIA_TYPE: &str = "application/octet-stream";

/// At most how long a delivering process keeps delivered events unacknowledged (see
/// `Worker::ack_every`).
const ACK_EVERY: Duration = Duration::from_secs(1);

type HmacSha256 = hmac::Hmac<Sha256>;

// ------------------------------------------------------------------ configuration

/// How an endpoint's requests are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadFormat {
    /// Distribution's envelope, `application/vnd.docker.distribution.events.v1+json`.
    #[default]
    Distribution,
    /// Distribution's envelope, `application/vnd.docker.distribution.events.v2+json`.
    DistributionV2,
    /// One CloudEvent per request, `application/cloudevents+json`.
    CloudEvents,
    /// CloudEvents in batches, `application/cloudevents-batch+json`.
    CloudEventsBatch,
}

impl PayloadFormat {
    /// The `Content-Type` of its requests.
    pub fn content_type(self) -> &'static str {
        match self {
            PayloadFormat::Distribution => DISTRIBUTION_EVENTS_V1,
            PayloadFormat::DistributionV2 => DISTRIBUTION_EVENTS_V2,
            PayloadFormat::CloudEvents => CLOUDEVENTS_JSON,
            PayloadFormat::CloudEventsBatch => CLOUDEVENTS_BATCH_JSON,
        }
    }

    /// Its name in `--notify` specs.
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadFormat::Distribution => "distribution",
            PayloadFormat::DistributionV2 => "distribution-v2",
            PayloadFormat::CloudEvents => "cloudevents",
            PayloadFormat::CloudEventsBatch => "cloudevents-batch",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "distribution" => PayloadFormat::Distribution,
            "distribution-v2" => PayloadFormat::DistributionV2,
            "cloudevents" => PayloadFormat::CloudEvents,
            "cloudevents-batch" => PayloadFormat::CloudEventsBatch,
            _ => {
                return Err(format!(
                    "unknown format {s:?}: expected distribution, distribution-v2, \
                     cloudevents or cloudevents-batch"
                ));
            }
        })
    }

    fn is_distribution(self) -> bool {
        matches!(
            self,
            PayloadFormat::Distribution | PayloadFormat::DistributionV2
        )
    }
}

/// An event's action, as Distribution names them: what [`EventFilter::actions`]
/// selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotifyAction {
    /// Manifest and blob pushes, tag moves, a repository's creation.
    Push,
    /// Deletes of manifests, tags, blob links and repositories, and the collector's
    /// removals.
    Delete,
    /// Blob mounts.
    Mount,
}

impl NotifyAction {
    /// `push`, `delete` or `mount`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyAction::Push => "push",
            NotifyAction::Delete => "delete",
            NotifyAction::Mount => "mount",
        }
    }

    /// The action of `event`.
    pub fn of(event: &Event) -> NotifyAction {
        match event {
            Event::BlobMounted { .. } => NotifyAction::Mount,
            Event::BlobDeleted { .. }
            | Event::TagDeleted { .. }
            | Event::ManifestDeleted { .. }
            | Event::LinkCollected { .. }
            | Event::RepositoryDeleted { .. }
            | Event::BlobCollected { .. } => NotifyAction::Delete,
            _ => NotifyAction::Push,
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "push" => Ok(NotifyAction::Push),
            "delete" => Ok(NotifyAction::Delete),
            "mount" => Ok(NotifyAction::Mount),
            _ => Err(format!(
                "unknown action {s:?}: expected push, delete or mount"
            )),
        }
    }
}

/// Which events an endpoint gets. Each list that is not empty must match: an event
/// passes when its repository is under one of `prefixes`, its action is one of
/// `actions`, and its target's media type is one of `media_types` (events without one,
/// such as deletes and mounts, do not pass a media type filter).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Repository prefixes, whole path components (`team-a` and `team-a/` cover
    /// `team-a` and `team-a/app`, not `team-ab`). Registry-wide events (a collected
    /// blob's bytes) have no repository and do not pass.
    pub prefixes: Vec<String>,
    /// Actions.
    pub actions: Vec<NotifyAction>,
    /// Media types of the target: manifests' own (also of tag moves), and
    /// `application/octet-stream` for blob pushes.
    pub media_types: Vec<String>,
}

impl EventFilter {
    /// Whether `event`, whose target has `media_type`, passes.
    pub fn matches(&self, event: &Event, media_type: Option<&str>) -> bool {
        if !self.prefixes.is_empty() {
            let Some(repo) = event.repository() else {
                return false;
            };
            if !self
                .prefixes
                .iter()
                .any(|p| registry_core::access::under_prefix(repo.as_str(), p))
            {
                return false;
            }
        }
        if !self.actions.is_empty() && !self.actions.contains(&NotifyAction::of(event)) {
            return false;
        }
        if !self.media_types.is_empty() {
            let Some(mt) = media_type else {
                return false;
            };
            if !self.media_types.iter().any(|m| m == mt) {
                return false;
            }
        }
        true
    }
}

/// A secret for signatures; never printed.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// A secret of these bytes.
    pub fn new(bytes: impl AsRef<[u8]>) -> Secret {
        Secret(Arc::from(bytes.as_ref()))
    }

    /// Reads a secret file: its content without the trailing line break. An empty
    /// secret is refused.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> std::io::Result<Secret> {
        let bytes = std::fs::read(path)?;
        let mut end = bytes.len();
        while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        if end == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the secret file is empty",
            ));
        }
        Ok(Secret::new(&bytes[..end]))
    }

    /// The signature header's value for `body`: `sha256=` and the hex HMAC-SHA256.
    pub fn sign(&self, body: &[u8]) -> String {
        // HMAC takes keys of any length.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("any key length");
        mac.update(body);
        format!(
            "sha256={}",
            data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes())
        )
    }

    /// Whether `header` (a [`SIGNATURE_HEADER`] value) is the signature of `body`,
    /// compared in constant time: for receivers written in Rust.
    pub fn verify(&self, body: &[u8], header: &str) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.sign(body);
        want.len() == header.len() && bool::from(want.as_bytes().ct_eq(header.as_bytes()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A webhook endpoint: where, which events, in which format, signed with what.
#[derive(Debug, Clone)]
pub struct Endpoint {
    url: Uri,
    /// Which events it gets.
    pub filter: EventFilter,
    /// How its requests are written.
    pub format: PayloadFormat,
    /// The signature key; `None` sends no signature.
    pub secret: Option<Secret>,
    /// At most this many events per request (default 100; `cloudevents` sends one).
    pub max_batch: usize,
    /// Time allowed for a request, from connecting to the end of the response
    /// (default 10 s); longer counts as a failure and is retried.
    pub timeout: Duration,
}

impl Endpoint {
    /// An endpoint at `url` (`http://`, or `https://` with the `tls` feature), every
    /// event, Distribution's format, unsigned.
    pub fn new(url: &str) -> Result<Endpoint, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") if cfg!(feature = "tls") => {}
            Some("https") => {
                return Err(format!(
                    "{url:?}: https endpoints need registry-http's `tls` feature"
                ));
            }
            _ => return Err(format!("{url:?}: expected an http:// or https:// URL")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{url:?}: the URL has no host"));
        }
        Ok(Endpoint {
            url: uri,
            filter: EventFilter::default(),
            format: PayloadFormat::default(),
            secret: None,
            max_batch: 100,
            timeout: Duration::from_secs(10),
        })
    }

    /// Parses `URL[,OPTION...]`, the value of `serve --notify`. Options, each
    /// repeatable: `prefix=REPO_PREFIX`, `actions=push+delete+mount`,
    /// `media=MEDIA_TYPE`, `format=distribution|distribution-v2|cloudevents|cloudevents-batch`,
    /// `batch=N` (events per request), `timeout=DURATION`. A comma followed by
    /// something that is not one of these options belongs to the URL.
    pub fn parse(spec: &str) -> Result<Endpoint, String> {
        const KEYS: [&str; 6] = ["prefix", "actions", "media", "format", "batch", "timeout"];
        let mut url = String::new();
        let mut options = Vec::new();
        for (i, part) in spec.split(',').enumerate() {
            let option = part
                .split_once('=')
                .filter(|(k, _)| KEYS.contains(k) && i > 0);
            match option {
                Some(kv) => options.push(kv),
                None if options.is_empty() => {
                    if i > 0 {
                        url.push(',');
                    }
                    url.push_str(part);
                }
                None => {
                    return Err(format!(
                        "{spec:?}: {part:?} is not an option (expected prefix=, \
                         actions=, media=, format=, batch= or timeout=)"
                    ));
                }
            }
        }
        let mut endpoint = Endpoint::new(&url)?;
        for (key, value) in options {
            match key {
                "prefix" => endpoint
                    .filter
                    .prefixes
                    .push(value.trim_end_matches('/').to_owned()),
                "actions" => {
                    for a in value.split('+').filter(|a| !a.is_empty()) {
                        let a = NotifyAction::parse(a)?;
                        if !endpoint.filter.actions.contains(&a) {
                            endpoint.filter.actions.push(a);
                        }
                    }
                }
                "media" if !value.is_empty() => endpoint.filter.media_types.push(value.to_owned()),
                "media" => return Err(format!("{spec:?}: media= needs a media type")),
                "format" => endpoint.format = PayloadFormat::parse(value)?,
                "batch" => {
                    endpoint.max_batch = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("{spec:?}: batch= needs a positive number"))?
                }
                "timeout" => {
                    endpoint.timeout = humantime::parse_duration(value)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| format!("{spec:?}: timeout= needs a duration such as 10s"))?
                }
                _ => unreachable!("only known keys are options"),
            }
        }
        Ok(endpoint)
    }

    /// The URL.
    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// The outbox consumer it delivers for: `webhook:` and the URL. Every process
    /// configured with the same URL shares its cursor and its lease.
    pub fn consumer(&self) -> String {
        format!("webhook:{}", self.url)
    }

    /// Sets the filter.
    pub fn with_filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }
    /// Sets the format.
    pub fn with_format(mut self, format: PayloadFormat) -> Self {
        self.format = format;
        self
    }
    /// Signs requests with `secret`.
    pub fn with_secret(mut self, secret: Option<Secret>) -> Self {
        self.secret = secret;
        self
    }
    /// Sets the largest batch (at least 1).
    pub fn with_max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }
    /// Sets the request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn batch_limit(&self) -> usize {
        match self.format {
            PayloadFormat::CloudEvents => 1,
            _ => self.max_batch.max(1),
        }
    }
}

/// What a [`Notifier`] delivers and how.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Where to.
    pub endpoints: Vec<Endpoint>,
    /// How often the outbox is read when this process wrote nothing (other processes'
    /// events are only seen this way). Default 2 s.
    pub poll: Duration,
    /// How long a lease lasts without renewal: a process that stops delivering (a
    /// crash) is replaced after at most this long. Renewed every third of it. Default
    /// 30 s.
    pub lease: Duration,
    /// The first retry's delay (doubled on each failure, with jitter). Default 1 s.
    pub backoff_initial: Duration,
    /// The longest delay between retries. Default 60 s.
    pub backoff_max: Duration,
    /// How often to trim the outbox with the registry's
    /// [`event_retention`](registry_core::RegistryConfig::event_retention) and
    /// `max_events`; `None` leaves it to the collector. Default 5 min.
    pub trim_interval: Option<Duration>,
    /// The registry's address for Distribution's `source.addr` (`host:port`).
    pub source_addr: String,
    /// The registry's URL: Distribution's `target.url` starts with it, and it is the
    /// CloudEvents `source`. Default `http://localhost:5000`.
    pub base_url: String,
    /// This process's id: Distribution's `source.instanceID`, and the lease owner.
    /// Default: random, new on each start.
    pub instance_id: String,
    /// How long a worker that has caught up waits before reading again, so that the
    /// events of a burst travel together: at most one request per endpoint per
    /// `linger` while pushes trickle in, instead of one per push. It is the delay a
    /// receiver may see on top of the request itself. Zero reads again at once.
    /// Default 25 ms.
    pub linger: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            endpoints: Vec::new(),
            poll: Duration::from_secs(2),
            lease: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            trim_interval: Some(Duration::from_secs(300)),
            source_addr: "localhost:5000".to_owned(),
            base_url: "http://localhost:5000".to_owned(),
            instance_id: random_id(),
            linger: Duration::from_millis(25),
        }
    }
}

impl NotifyConfig {
    /// Delivers to `endpoint` too.
    pub fn with_endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }
    /// Sets the poll interval.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }
    /// Sets the wait after catching up (see [`linger`](Self::linger)).
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }
    /// Sets the lease.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
    /// Sets the backoff between retries.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }
    /// Sets how often to trim the outbox (`None`: never, leave it to the collector).
    pub fn with_trim_interval(mut self, every: Option<Duration>) -> Self {
        self.trim_interval = every;
        self
    }
    /// Sets the registry's address and URL as receivers see them.
    pub fn with_source(mut self, addr: impl Into<String>, base_url: impl Into<String>) -> Self {
        self.source_addr = addr.into();
        self.base_url = base_url.into().trim_end_matches('/').to_owned();
        self
    }
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    data_encoding::HEXLOWER.encode(&b)
}

fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// The delay before retry number `failures` (1 for the first): `initial * 2^(n-1)`,
/// capped at `max`, of which the second half is random (so that many endpoints, or
/// processes, failing together do not retry together).
pub(crate) fn backoff(failures: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let d = exp.min(max);
    d / 2 + d.mul_f64(random_unit() / 2.0)
}

// ------------------------------------------------------------------ payloads

/// An event ready to be rendered: the stored event, its target's media type and size
/// when it has one, and the tag it carries when a manifest push and its tag move are
/// reported as one (Distribution's format).
#[derive(Debug, Clone)]
pub(crate) struct Prepared<'a> {
    pub(crate) stored: &'a StoredEvent,
    /// [`StoredEvent::id`], computed once: the payload and the delivery id both need
    /// it, and it hashes the event.
    pub(crate) id: String,
    pub(crate) media_type: Option<Cow<'a, str>>,
    pub(crate) size: Option<u64>,
}

/// What the payload needs to know about the registry.
#[derive(Debug, Clone)]
pub(crate) struct Source<'a> {
    pub(crate) addr: &'a str,
    pub(crate) base_url: &'a str,
    pub(crate) instance_id: &'a str,
}

/// Distribution's envelope as serde writes it: what [`write_envelope`] must match
/// (tested).
#[cfg(test)]
#[derive(Serialize)]
struct Envelope<'a> {
    events: Vec<DistributionEvent<'a>>,
}

/// `{"events":[...]}`, written by hand: the same bytes as serde_json writes for
/// [`DistributionEvent`] (a test compares them for every event kind), at about half
/// the cost, which matters since every delivered event is written this way. Names,
/// digests, tags, ids and times come from checked grammars and need no escaping; media
/// types, URLs and the source's fields are escaped.
fn write_envelope(out: &mut Vec<u8>, events: &[DistributionEvent<'_>]) {
    use crate::audit::{json_str, plain_str as plain, write_num};
    out.extend_from_slice(b"{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        plain(out, e.id);
        out.extend_from_slice(b",\"timestamp\":");
        plain(out, &e.timestamp);
        out.extend_from_slice(b",\"action\":");
        plain(out, e.action);
        out.extend_from_slice(b",\"target\":{");
        let t = &e.target;
        let mut first = true;
        let mut key = |out: &mut Vec<u8>, name: &[u8]| {
            if !first {
                out.push(b',');
            }
            first = false;
            out.push(b'"');
            out.extend_from_slice(name);
            out.extend_from_slice(b"\":");
        };
        if let Some(mt) = t.media_type {
            key(out, b"mediaType");
            json_str(out, mt);
        }
        if let Some(d) = t.digest {
            key(out, b"digest");
            plain(out, d);
        }
        if let Some(n) = t.size {
            key(out, b"size");
            write_num(out, n);
        }
        if let Some(n) = t.length {
            key(out, b"length");
            write_num(out, n);
        }
        key(out, b"repository");
        plain(out, t.repository);
        if let Some(from) = t.from_repository {
            key(out, b"fromRepository");
            plain(out, from);
        }
        if let Some(url) = &t.url {
            key(out, b"url");
            url.write_json(out);
        }
        if let Some(tag) = t.tag {
            key(out, b"tag");
            plain(out, tag);
        }
        out.extend_from_slice(b"},\"request\":{},\"actor\":{},\"source\":{\"addr\":");
        json_str(out, e.source.addr);
        out.extend_from_slice(b",\"instanceID\":");
        json_str(out, e.source.instance_id);
        out.extend_from_slice(b"}}");
    }
    out.extend_from_slice(b"]}");
}

#[derive(Serialize)]
struct DistributionEvent<'a> {
    id: &'a str,
    timestamp: String,
    action: &'static str,
    target: Target<'a>,
    request: Empty,
    actor: Empty,
    source: SourceRecord<'a>,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SourceRecord<'a> {
    addr: &'a str,
    #[serde(rename = "instanceID")]
    instance_id: &'a str,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Target<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    media_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    length: Option<u64>,
    repository: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_repository: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<TargetUrl<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<&'a str>,
}

fn rfc3339(at: registry_core::Timestamp) -> String {
    let mut out = Vec::with_capacity(24);
    crate::audit::write_rfc3339_millis(&mut out, at.to_system_time());
    String::from_utf8(out).unwrap_or_default()
}

/// `{base}/v2/{repo}/{kind}/{reference}`, kept in parts and written straight into the
/// payload (formatting it into a `String` first was a third of an event's payload).
#[derive(Clone, Copy)]
struct TargetUrl<'a> {
    base: &'a str,
    repo: &'a str,
    kind: &'static str,
    reference: &'a str,
}

impl fmt::Display for TargetUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let TargetUrl {
            base,
            repo,
            kind,
            reference,
        } = self;
        write!(f, "{base}/v2/{repo}/{kind}/{reference}")
    }
}

impl Serialize for TargetUrl<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl TargetUrl<'_> {
    /// As a JSON string. Only the base (configuration) may need escaping: the repository
    /// and the reference (a digest) come from checked grammars.
    fn write_json(&self, out: &mut Vec<u8>) {
        use crate::audit::json_str;
        json_str(out, self.base);
        out.pop(); // the base's closing quote: the path follows inside the string
        for part in ["/v2/", self.repo, "/", self.kind, "/", self.reference] {
            out.extend_from_slice(part.as_bytes());
        }
        out.push(b'"');
    }
}

fn url_of<'a>(
    base: &'a str,
    repo: &'a RepoName,
    kind: &'static str,
    reference: &'a str,
) -> TargetUrl<'a> {
    TargetUrl {
        base,
        repo: repo.as_str(),
        kind,
        reference,
    }
}

/// The Distribution event of `p`, or `None` when Distribution has no form for it.
fn distribution_event<'a>(p: &'a Prepared<'a>, src: &Source<'a>) -> Option<DistributionEvent<'a>> {
    let ev = &p.stored.event;
    let mt = p.media_type.as_deref();
    let target = match ev {
        Event::ManifestPut {
            repo, digest, size, ..
        } => Target {
            media_type: mt,
            digest: Some(digest.as_str()),
            size: Some(*size),
            length: Some(*size),
            repository: repo.as_str(),
            url: Some(url_of(src.base_url, repo, "manifests", digest.as_str())),
            ..Target::default()
        },
        Event::TagMoved { repo, tag, to, .. } => Target {
            media_type: mt,
            digest: Some(to.as_str()),
            size: p.size,
            length: p.size,
            repository: repo.as_str(),
            url: Some(url_of(src.base_url, repo, "manifests", to.as_str())),
            tag: Some(tag.as_str()),
            ..Target::default()
        },
        Event::BlobStored { repo, digest, size } => Target {
            media_type: Some(BLOB_MEDIA_TYPE),
            digest: Some(digest.as_str()),
            size: Some(*size),
            length: Some(*size),
            repository: repo.as_str(),
            url: Some(url_of(src.base_url, repo, "blobs", digest.as_str())),
            ..Target::default()
        },
        Event::BlobMounted { repo, from, digest } => Target {
            digest: Some(digest.as_str()),
            repository: repo.as_str(),
            from_repository: Some(from.as_str()),
            url: Some(url_of(src.base_url, repo, "blobs", digest.as_str())),
            ..Target::default()
        },
        Event::BlobDeleted { repo, digest }
        | Event::LinkCollected { repo, digest }
        | Event::ManifestDeleted { repo, digest, .. } => Target {
            digest: Some(digest.as_str()),
            repository: repo.as_str(),
            ..Target::default()
        },
        // Distribution's tag delete carries no digest (receivers tell a manifest
        // delete from a tag delete by it).
        Event::TagDeleted { repo, tag, .. } => Target {
            repository: repo.as_str(),
            tag: Some(tag.as_str()),
            ..Target::default()
        },
        Event::RepositoryDeleted { repo } => Target {
            repository: repo.as_str(),
            ..Target::default()
        },
        _ => return None,
    };
    Some(DistributionEvent {
        id: &p.id,
        timestamp: rfc3339(p.stored.at),
        action: NotifyAction::of(ev).as_str(),
        target,
        request: Empty {},
        actor: Empty {},
        source: SourceRecord {
            addr: src.addr,
            instance_id: src.instance_id,
        },
    })
}

#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    kind: String,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    datacontenttype: &'static str,
    data: CloudEventData<'a>,
}

#[derive(Serialize)]
struct CloudEventData<'a> {
    seq: u64,
    action: &'static str,
    #[serde(rename = "mediaType", skip_serializing_if = "Option::is_none")]
    media_type: Option<&'a str>,
    event: &'a Event,
}

fn event_kind(event: &Event) -> String {
    // The serde tag (`kind`), so that names follow the events as they are added.
    match serde_json::to_value(event) {
        Ok(serde_json::Value::Object(map)) => map
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("unknown")
            .to_owned(),
        _ => "unknown".to_owned(),
    }
}

fn subject_of(event: &Event) -> Option<String> {
    Some(match event {
        Event::BlobStored { repo, digest, .. }
        | Event::BlobMounted { repo, digest, .. }
        | Event::BlobDeleted { repo, digest }
        | Event::ManifestPut { repo, digest, .. }
        | Event::ManifestDeleted { repo, digest, .. }
        | Event::LinkCollected { repo, digest } => format!("{repo}@{digest}"),
        Event::TagMoved { repo, tag, .. } | Event::TagDeleted { repo, tag, .. } => {
            format!("{repo}:{tag}")
        }
        Event::BlobCollected { digest, .. } => digest.to_string(),
        other => other.repository()?.to_string(),
    })
}

fn cloud_event<'a>(p: &'a Prepared<'a>, src: &Source<'a>) -> CloudEvent<'a> {
    let ev = &p.stored.event;
    CloudEvent {
        specversion: "1.0",
        id: &p.id,
        source: src.base_url,
        kind: format!("{CLOUDEVENTS_TYPE_PREFIX}{}", event_kind(ev)),
        time: rfc3339(p.stored.at),
        subject: subject_of(ev),
        datacontenttype: "application/json",
        data: CloudEventData {
            seq: p.stored.seq,
            action: NotifyAction::of(ev).as_str(),
            media_type: match ev {
                Event::TagMoved { .. } => p.media_type.as_deref(),
                _ => None,
            },
            event: ev,
        },
    }
}

/// One request's body; `None` when none of `events` has a form in `format`.
pub(crate) fn render(
    format: PayloadFormat,
    events: &[Prepared<'_>],
    src: &Source<'_>,
) -> Option<Vec<u8>> {
    let body = match format {
        PayloadFormat::Distribution | PayloadFormat::DistributionV2 => {
            let events: Vec<_> = events
                .iter()
                .filter_map(|p| distribution_event(p, src))
                .collect();
            if events.is_empty() {
                return None;
            }
            // Sized for the usual event (about 600 bytes): no regrowth while writing.
            let mut body = Vec::with_capacity(700 * events.len());
            write_envelope(&mut body, &events);
            Ok(body)
        }
        PayloadFormat::CloudEvents => serde_json::to_vec(&cloud_event(events.first()?, src)),
        PayloadFormat::CloudEventsBatch => {
            if events.is_empty() {
                return None;
            }
            let all: Vec<_> = events.iter().map(|p| cloud_event(p, src)).collect();
            serde_json::to_vec(&all)
        }
    };
    // Serializing these structs cannot fail (string keys, no floats).
    body.ok()
}

/// Whether `format` has a form for `event`.
fn has_form(format: PayloadFormat, event: &Event) -> bool {
    !format.is_distribution()
        || !matches!(
            event,
            Event::RepositoryCreated { .. } | Event::BlobCollected { .. }
        )
}

/// Manifest media types and sizes by digest (and the repository that pushed it), from
/// the manifest pushes seen, so that tag moves can carry them without reading the
/// store.
#[derive(Default)]
pub(crate) struct ManifestCache {
    // By digest alone, the repository checked on a hit: a lookup then needs no key
    // built (cloning both names per lookup cost more than the lookup). A digest pushed
    // to two repositories keeps the later one; a tag move in the other reads the store.
    map: HashMap<registry_core::Digest, (RepoName, String, u64)>,
}

impl ManifestCache {
    const MAX: usize = 10_000;

    fn learn(&mut self, event: &Event) {
        if let Event::ManifestPut {
            repo,
            digest,
            media_type,
            size,
            ..
        } = event
        {
            if self.map.len() >= Self::MAX {
                self.map.clear();
            }
            self.map
                .insert(digest.clone(), (repo.clone(), media_type.clone(), *size));
        }
    }

    fn get(&self, repo: &RepoName, digest: &registry_core::Digest) -> Option<(String, u64)> {
        self.map
            .get(digest)
            .filter(|(r, _, _)| r == repo)
            .map(|(_, mt, size)| (mt.clone(), *size))
    }
}

/// Turns a page of events into what `endpoint` gets: media types resolved (tag moves
/// from `cache`, else from `registry`), filtered, and in Distribution's format a
/// manifest push that a tag move of the same change follows merged into it.
pub(crate) async fn prepare<'a>(
    events: &'a [StoredEvent],
    endpoint: &Endpoint,
    cache: &mut ManifestCache,
    registry: Option<&Registry>,
) -> Vec<Prepared<'a>> {
    let mut out = Vec::with_capacity(events.len());
    for (i, stored) in events.iter().enumerate() {
        cache.learn(&stored.event);
        if endpoint.format.is_distribution() && merged_into_tag_move(events, i) {
            continue;
        }
        if !has_form(endpoint.format, &stored.event) {
            continue;
        }
        let (media_type, size) = match &stored.event {
            Event::ManifestPut {
                media_type, size, ..
            } => (Some(Cow::Borrowed(media_type.as_str())), Some(*size)),
            Event::BlobStored { size, .. } => (Some(Cow::Borrowed(BLOB_MEDIA_TYPE)), Some(*size)),
            Event::TagMoved { repo, to, .. } => {
                let found = match cache.get(repo, to) {
                    Some(hit) => Some(hit),
                    None => match registry {
                        Some(r) => r
                            .stat_manifest(repo, &Reference::Digest(to.clone()))
                            .await
                            .ok()
                            .map(|m| (m.media_type, m.size)),
                        None => None,
                    },
                };
                match found {
                    Some((mt, size)) => (Some(Cow::Owned(mt)), Some(size)),
                    None => (None, None),
                }
            }
            _ => (None, None),
        };
        if !endpoint
            .filter
            .matches(&stored.event, media_type.as_deref())
        {
            continue;
        }
        out.push(Prepared {
            stored,
            id: stored.id(),
            media_type,
            size,
        });
    }
    out
}

/// Whether `events[i]` is a manifest push reported by the tag moves around it (pushed
/// by tag): the nearest events before and after it, skipping repository creations and
/// other tag moves of the repository, include a move of a tag of its repository to it.
fn merged_into_tag_move(events: &[StoredEvent], i: usize) -> bool {
    let Event::ManifestPut { repo, digest, .. } = &events[i].event else {
        return false;
    };
    let related = |e: &StoredEvent| match &e.event {
        Event::TagMoved { repo: r, to, .. } => Some(r == repo && to == digest),
        Event::RepositoryCreated { repo: r } if r == repo => Some(false),
        _ => None,
    };
    let after = events[i + 1..].iter().map(related);
    let before = events[..i].iter().rev().map(related);
    for side in [
        Box::new(after) as Box<dyn Iterator<Item = Option<bool>>>,
        Box::new(before),
    ] {
        for r in side {
            match r {
                Some(true) => return true,
                Some(false) => continue,
                None => break,
            }
        }
    }
    false
}

/// The delivery id of a request carrying `events` to `consumer`: a hash of both, the
/// same on every retry and in every process.
fn delivery_id(consumer: &str, events: &[Prepared<'_>]) -> String {
    let mut h = Sha256::new();
    h.update(consumer.as_bytes());
    for p in events {
        h.update(b"\n");
        h.update(p.id.as_bytes());
    }
    data_encoding::HEXLOWER.encode(&h.finalize()[..16])
}

// ------------------------------------------------------------------ HTTP client

// hyper-util's legacy client rather than reqwest: hyper and hyper-util are already
// here for the server, so a client is two features (`client`, `client-legacy`) and no
// new crate; reqwest, even without default features, adds its own crate, `url`,
// `serde_urlencoded` wiring and a redirect/cookie layer this POST does not want
// (Distribution follows no redirects either for a delivery to count).
#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = hyper_util::client::legacy::connect::HttpConnector;
type Client = hyper_util::client::legacy::Client<Connector, Full<Bytes>>;

/// The client for every endpoint; `https` says whether any endpoint needs TLS.
fn client(https: bool) -> Client {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.set_nodelay(true);
    #[cfg(not(feature = "tls"))]
    let _ = https;
    #[cfg(feature = "tls")]
    let connector = {
        http.enforce_http(false);
        let mut roots = rustls::RootCertStore::empty();
        // Only for https endpoints: reading and parsing the system's roots takes tens of
        // milliseconds (about 18 million instructions), a process's whole start.
        if https {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::warn!(error = %e, "webhooks: cannot read some of the system's root certificates");
            }
            let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http)
    };
    #[cfg(not(feature = "tls"))]
    let connector = http;
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Why a POST did not count as delivered.
#[derive(Debug)]
enum PostError {
    /// The endpoint answered, not with 2xx; `retry_after` from its `Retry-After`.
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        body: String,
    },
    /// No answer: connection refused, reset, timed out.
    Transport(String),
}

impl fmt::Display for PostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostError::Status { status, body, .. } if body.is_empty() => {
                write!(f, "answered {status}")
            }
            PostError::Status { status, body, .. } => write!(f, "answered {status}: {body}"),
            PostError::Transport(e) => f.write_str(e),
        }
    }
}

struct Post<'a> {
    endpoint: &'a Endpoint,
    body: Bytes,
    signature: Option<HeaderValue>,
    delivery: HeaderValue,
    attempt: u32,
}

async fn post(client: &Client, p: &Post<'_>) -> Result<(), PostError> {
    let mut req = Request::post(p.endpoint.url.clone())
        .header(http::header::CONTENT_TYPE, p.endpoint.format.content_type())
        .header(
            http::header::USER_AGENT,
            concat!("registry-http/", env!("CARGO_PKG_VERSION")),
        )
        .header(DELIVERY_HEADER, p.delivery.clone())
        .header(ATTEMPT_HEADER, p.attempt)
        .body(Full::new(p.body.clone()))
        .map_err(|e| PostError::Transport(format!("cannot build the request: {e}")))?;
    if let Some(sig) = &p.signature {
        req.headers_mut().insert(SIGNATURE_HEADER, sig.clone());
    }
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| PostError::Transport(error_chain(&e)))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read (a little of) the body: it lets the connection be reused, and says why
        // in the log when it failed.
        let body = Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned();
            Err(PostError::Status {
                status,
                retry_after,
                body: text,
            })
        }
    };
    match tokio::time::timeout(p.endpoint.timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(PostError::Transport(format!(
            "no answer within {:?}",
            p.endpoint.timeout
        ))),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

// ------------------------------------------------------------------ counters

/// The state of one endpoint's delivery, as this process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    /// The endpoint's URL.
    pub url: String,
    /// Its outbox consumer.
    pub consumer: String,
    /// Whether this process holds the lease (delivers) now.
    pub delivering: bool,
    /// Every event up to here was delivered (or filtered out), when this process held
    /// the lease. The cursor stored for other processes trails it by at most a second.
    pub cursor: u64,
    /// Events written and not delivered yet (head minus cursor; skipped numbers count
    /// too), as last seen by this process while it held the lease (read from the store
    /// at least once a second while events flow, and whenever it is idle); 0 otherwise.
    pub lag: u64,
    /// Events delivered (acknowledged by a 2xx) by this process.
    pub delivered_events: u64,
    /// Requests answered 2xx.
    pub delivered_requests: u64,
    /// Requests that failed (and were retried).
    pub failed_requests: u64,
    /// Events trimmed before this process read them (the cursor was behind the
    /// retention): they were never delivered.
    pub missed_events: u64,
    /// The last failure, if the last request failed.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    delivering: AtomicBool,
    cursor: AtomicU64,
    lag: AtomicU64,
    delivered_events: AtomicU64,
    delivered_requests: AtomicU64,
    failed_requests: AtomicU64,
    missed_events: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Counters {
    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
}

/// A [`Notifier`]'s counters as Prometheus metrics, labelled by endpoint URL (a
/// closed set: the configured endpoints): `registry_notify_lag_events` (gauge: events
/// written and not acknowledged, as the delivering process sees it; 0 in the others),
/// `registry_notify_delivered_events_total`, `registry_notify_requests_total{result}`
/// (`delivered`, `failed`), `registry_notify_missed_events_total`,
/// `registry_notify_delivering` (1 in the process holding the lease). Register it in a
/// `prometheus_client` registry: `registry.register_collector(Box::new(notifier.collector()))`.
#[derive(Clone)]
pub struct NotifyCollector {
    endpoints: Vec<(String, Arc<Counters>)>,
}

impl fmt::Debug for NotifyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifyCollector").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for NotifyCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> fmt::Result {
        self.encode_to(&mut encoder)
    }
}

impl NotifyCollector {
    /// Writes the metrics into `encoder`: what the `Collector` implementation does,
    /// for [`Metrics::register_encoder`](crate::Metrics::register_encoder).
    pub fn encode_to(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        type Read = fn(&Counters) -> u64;
        let gauges: [(&str, &str, Read); 2] = [
            (
                "registry_notify_lag_events",
                "Webhook events written and not acknowledged yet (in the delivering process)",
                |c| c.lag.load(Ordering::Relaxed),
            ),
            (
                "registry_notify_delivering",
                "Whether this process holds the webhook's delivery lease",
                |c| u64::from(c.delivering.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, read) in gauges {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (url, c) in &self.endpoints {
                let g = ConstGauge::new(read(c) as i64);
                g.encode(m.encode_family(&[("endpoint", url.as_str())])?)?;
            }
        }
        let counters: [(&str, &str, Read); 2] = [
            (
                "registry_notify_delivered_events",
                "Webhook events delivered (acknowledged by a 2xx) by this process",
                |c| c.delivered_events.load(Ordering::Relaxed),
            ),
            (
                "registry_notify_missed_events",
                "Webhook events trimmed from the outbox before they were delivered",
                |c| c.missed_events.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, read) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (url, c) in &self.endpoints {
                let v = ConstCounter::new(read(c));
                v.encode(m.encode_family(&[("endpoint", url.as_str())])?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "registry_notify_requests",
            "Webhook requests by result (delivered: 2xx; failed: retried)",
            None,
            MetricType::Counter,
        )?;
        for (url, c) in &self.endpoints {
            for (result, v) in [
                ("delivered", c.delivered_requests.load(Ordering::Relaxed)),
                ("failed", c.failed_requests.load(Ordering::Relaxed)),
            ] {
                ConstCounter::new(v)
                    .encode(m.encode_family(&[("endpoint", url.as_str()), ("result", result)])?)?;
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ the notifier

/// Delivers the registry's events to webhook endpoints, in tasks of its own (see the
/// [module documentation](self)). Stop it with [`Notifier::shutdown`]; dropping it
/// stops the tasks too, without waiting.
///
/// ```no_run
/// # async fn demo(registry: registry_core::Registry) -> Result<(), String> {
/// use registry_http::notify::{Endpoint, Notifier, NotifyConfig, Secret};
///
/// let endpoint = Endpoint::parse("http://hooks.internal/registry,prefix=team-a,actions=push")?
///     .with_secret(Some(Secret::new("shared secret")));
/// let notifier = Notifier::start(
///     registry,
///     NotifyConfig::default()
///         .with_endpoint(endpoint)
///         .with_source("registry.example:443", "https://registry.example"),
/// );
/// // ... serve ...
/// notifier.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct Notifier {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    endpoints: Vec<(Endpoint, Arc<Counters>)>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field(
                "endpoints",
                &self
                    .endpoints
                    .iter()
                    .map(|(e, _)| e.url.to_string())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// Starts delivering (one task per endpoint, and one trimming the outbox when
    /// [`NotifyConfig::trim_interval`] is set) on the current tokio runtime.
    pub fn start(registry: Registry, config: NotifyConfig) -> Notifier {
        let (stop, stop_rx) = watch::channel(false);
        let config = Arc::new(config);
        let https = config
            .endpoints
            .iter()
            .any(|e| e.url.scheme_str() == Some("https"));
        let client = client(https);
        let mut tasks = Vec::new();
        let mut endpoints = Vec::new();
        for endpoint in &config.endpoints {
            let counters = Arc::new(Counters::default());
            endpoints.push((endpoint.clone(), counters.clone()));
            let worker = Worker {
                registry: registry.clone(),
                config: config.clone(),
                endpoint: endpoint.clone(),
                consumer: endpoint.consumer(),
                counters,
                client: client.clone(),
                stop: stop_rx.clone(),
                signal: registry.event_signal(),
                cache: ManifestCache::default(),
            };
            tasks.push(tokio::spawn(worker.run()));
        }
        if let Some(every) = config.trim_interval {
            tasks.push(tokio::spawn(trim_loop(registry, every, stop_rx)));
        }
        Notifier {
            stop,
            tasks,
            endpoints,
        }
    }

    /// Each endpoint's state, in configuration order.
    pub fn status(&self) -> Vec<EndpointStatus> {
        self.endpoints
            .iter()
            .map(|(e, c)| EndpointStatus {
                url: e.url.to_string(),
                consumer: e.consumer(),
                delivering: c.delivering.load(Ordering::Relaxed),
                cursor: c.cursor.load(Ordering::Relaxed),
                lag: c.lag.load(Ordering::Relaxed),
                delivered_events: c.delivered_events.load(Ordering::Relaxed),
                delivered_requests: c.delivered_requests.load(Ordering::Relaxed),
                failed_requests: c.failed_requests.load(Ordering::Relaxed),
                missed_events: c.missed_events.load(Ordering::Relaxed),
                last_error: c
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            })
            .collect()
    }

    /// Its counters as Prometheus metrics (see [`NotifyCollector`]).
    pub fn collector(&self) -> NotifyCollector {
        NotifyCollector {
            endpoints: self
                .endpoints
                .iter()
                .map(|(e, c)| (e.url.to_string(), c.clone()))
                .collect(),
        }
    }

    /// Stops: a request in flight is finished (within its endpoint's timeout) and
    /// acknowledged, then each lease is given up so that another process takes over
    /// at once.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn trim_loop(registry: Registry, interval: Duration, mut stop: watch::Receiver<bool>) {
    let retention = registry.config().event_retention;
    let max_events = registry.config().max_events;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match registry.trim_events(retention, max_events).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(trimmed = n, "outbox trimmed"),
            Err(e) => tracing::warn!(error = %e, "cannot trim the outbox; will retry"),
        }
    }
}

/// Why a lease holder stopped delivering.
enum Exit {
    /// Shutdown; the cursor is acknowledged up to here.
    Stopped(u64),
    /// Another process took the lease over: claim again.
    LeaseLost,
    /// The store failed.
    Failed(registry_core::Error),
}

struct Worker {
    registry: Registry,
    config: Arc<NotifyConfig>,
    endpoint: Endpoint,
    consumer: String,
    counters: Arc<Counters>,
    client: Client,
    stop: watch::Receiver<bool>,
    /// Changes when this process commits a change.
    signal: watch::Receiver<u64>,
    cache: ManifestCache,
}

impl Worker {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d`; `true` if stopped meanwhile.
    async fn sleep(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => true,
            _ = tokio::time::sleep(d) => false,
        }
    }

    fn renew_every(&self) -> Duration {
        self.config.lease / 3
    }

    /// How often the cursor is stored while events flow. Storing it is a durable
    /// metadata write (an fsync on the fs store): once per delivered batch, it doubled
    /// the write transactions of a registry taking a manifest push per batch, about 10%
    /// of manifest PUT throughput. Delivered events whose acknowledgement has not been
    /// stored yet are sent again after a crash or a lease takeover: duplicates, which
    /// at-least-once delivery allows, never a loss.
    fn ack_every(&self) -> Duration {
        ACK_EVERY.min(self.renew_every())
    }

    async fn run(mut self) {
        let mut failures = 0u32;
        let owner = self.config.instance_id.clone();
        tracing::info!(endpoint = %self.endpoint.url, format = self.endpoint.format.as_str(), "webhook endpoint configured");
        while !self.stopped() {
            let claimed = self
                .registry
                .claim_events(&self.consumer, &owner, self.config.lease)
                .await;
            match claimed {
                Ok(Some(cursor)) => {
                    failures = 0;
                    self.counters.delivering.store(true, Ordering::Relaxed);
                    self.counters.cursor.store(cursor, Ordering::Relaxed);
                    tracing::debug!(endpoint = %self.endpoint.url, cursor, "webhook lease claimed");
                    let exit = self.hold(&owner, cursor).await;
                    self.counters.delivering.store(false, Ordering::Relaxed);
                    self.counters.lag.store(0, Ordering::Relaxed);
                    match exit {
                        Exit::Stopped(cursor) => {
                            // Give the lease up: another process takes over at once.
                            let _ = self
                                .registry
                                .ack_events(&self.consumer, &owner, cursor, Duration::ZERO)
                                .await;
                            return;
                        }
                        Exit::LeaseLost => {
                            tracing::info!(endpoint = %self.endpoint.url, "webhook lease lost to another process");
                        }
                        Exit::Failed(e) => {
                            failures += 1;
                            tracing::warn!(endpoint = %self.endpoint.url, error = %e, "webhook delivery: the store failed; will retry");
                            let d = backoff(
                                failures,
                                self.config.backoff_initial,
                                self.config.backoff_max,
                            );
                            if self.sleep(d).await {
                                return;
                            }
                        }
                    }
                }
                Ok(None) => {
                    failures = 0;
                    // Another process delivers; take over if it stops renewing.
                    let d = self
                        .config
                        .poll
                        .min(self.renew_every())
                        .max(Duration::from_millis(10));
                    if self.sleep(d).await {
                        return;
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(endpoint = %self.endpoint.url, error = %e, "webhook delivery: cannot claim the lease; will retry");
                    let d = backoff(
                        failures,
                        self.config.backoff_initial,
                        self.config.backoff_max,
                    );
                    if self.sleep(d).await {
                        return;
                    }
                }
            }
        }
    }

    /// Acknowledges `cursor` (renewing the lease); `Err` to leave the holder loop.
    async fn ack(&self, owner: &str, cursor: u64) -> Result<(), Exit> {
        match self
            .registry
            .ack_events(&self.consumer, owner, cursor, self.config.lease)
            .await
        {
            Ok(true) => {
                self.counters.cursor.store(cursor, Ordering::Relaxed);
                Ok(())
            }
            Ok(false) => Err(Exit::LeaseLost),
            Err(e) => Err(Exit::Failed(e)),
        }
    }

    async fn update_lag(&self, cursor: u64) {
        if let Ok(head) = self.registry.events_head().await {
            self.counters
                .lag
                .store(head.saturating_sub(cursor), Ordering::Relaxed);
        }
    }

    /// Delivers while holding the lease. `cursor` is what was delivered, `acked` what is
    /// stored (at most [`ack_every`](Self::ack_every) behind).
    async fn hold(&mut self, owner: &str, mut cursor: u64) -> Exit {
        let mut renewed = Instant::now();
        let mut acked = cursor;
        let mut lag_updated: Option<Instant> = None;
        // A page holds a few batches: enough to keep requests full, little enough to
        // renew the lease in time.
        let page_limit = self
            .endpoint
            .batch_limit()
            .saturating_mul(4)
            .clamp(16, 1000);
        // The last read returned less than a full page: there is time to let a few
        // more events join the next request (see `NotifyConfig::linger`).
        let mut caught_up = false;
        loop {
            if self.stopped() {
                return Exit::Stopped(cursor);
            }
            if caught_up && !self.config.linger.is_zero() && self.sleep(self.config.linger).await {
                return Exit::Stopped(cursor);
            }
            // Marked before reading: a change committed after this point wakes us.
            self.signal.mark_unchanged();
            let page = match self.registry.events_after(cursor, page_limit).await {
                Ok(p) => p,
                Err(e) => return Exit::Failed(e),
            };
            if page.missed_through > cursor {
                let missed = page.missed_through - cursor;
                self.counters
                    .missed_events
                    .fetch_add(missed, Ordering::Relaxed);
                tracing::warn!(endpoint = %self.endpoint.url, from = cursor + 1, through = page.missed_through,
                    "webhook delivery: events were trimmed before they were delivered");
            }
            let mut events = page.events;
            let mut next_after = page.next_after;
            caught_up = events.len() < page_limit;
            // A full page ending with a manifest push: its tag move may be the next
            // page's first event; leave it for the next page, so the two are merged.
            if events.len() >= page_limit
                && events.len() > 1
                && matches!(
                    events.last().map(|e| &e.event),
                    Some(Event::ManifestPut { .. })
                )
            {
                let last = events.pop().map(|e| e.seq).unwrap_or(next_after);
                next_after = last - 1;
            }
            if events.is_empty() {
                cursor = cursor.max(next_after);
                let due = (cursor > acked && renewed.elapsed() >= self.ack_every())
                    || renewed.elapsed() >= self.renew_every();
                if due {
                    if let Err(exit) = self.ack(owner, cursor).await {
                        return exit;
                    }
                    acked = cursor;
                    renewed = Instant::now();
                }
                // Caught up: on the engines whose numbers appear in order, nothing is
                // after the cursor, so the lag is zero without reading the head (a read
                // per batch delivered). The head is still read once a second, for the
                // engines where a number may be pending behind a gap (PostgreSQL).
                if lag_updated.is_none_or(|t| t.elapsed() >= ACK_EVERY) {
                    self.update_lag(cursor).await;
                    lag_updated = Some(Instant::now());
                } else {
                    self.counters.lag.store(0, Ordering::Relaxed);
                }
                // Wake for new events, for the next poll, or when the stored cursor is
                // due, whichever comes first.
                let mut wait = self.config.poll.min(self.renew_every());
                if cursor > acked {
                    wait = wait.min(self.ack_every().saturating_sub(renewed.elapsed()));
                }
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Exit::Stopped(cursor),
                    _ = tokio::time::timeout(wait, self.signal.changed()) => {}
                }
                continue;
            }
            let prepared = prepare(
                &events,
                &self.endpoint,
                &mut self.cache,
                Some(&self.registry),
            )
            .await;
            if lag_updated.is_none_or(|t| t.elapsed() >= ACK_EVERY) {
                self.update_lag(cursor).await;
                lag_updated = Some(Instant::now());
            } else {
                // At least what this page holds, without a read of the head.
                self.counters
                    .lag
                    .fetch_max(next_after.saturating_sub(cursor), Ordering::Relaxed);
            }
            let limit = self.endpoint.batch_limit();
            let chunks: Vec<&[Prepared<'_>]> = prepared.chunks(limit).collect();
            let config = self.config.clone();
            let source = Source {
                addr: &config.source_addr,
                base_url: &config.base_url,
                instance_id: &config.instance_id,
            };
            for (i, chunk) in chunks.iter().enumerate() {
                // Everything up to the chunk's last event was delivered or filtered
                // out once it is delivered; after the last chunk, the whole page was.
                let ack_to = if i + 1 == chunks.len() {
                    next_after
                } else {
                    chunk.last().map(|p| p.stored.seq).unwrap_or(cursor)
                };
                let Some(body) = render(self.endpoint.format, chunk, &source) else {
                    continue;
                };
                let body = Bytes::from(body);
                let signature = self
                    .endpoint
                    .secret
                    .as_ref()
                    .and_then(|s| HeaderValue::from_str(&s.sign(&body)).ok());
                let delivery = HeaderValue::from_str(&delivery_id(&self.consumer, chunk))
                    .unwrap_or_else(|_| HeaderValue::from_static("-"));
                let mut attempt = 0u32;
                loop {
                    attempt += 1;
                    if renewed.elapsed() >= self.renew_every() {
                        if let Err(exit) = self.ack(owner, cursor).await {
                            return exit;
                        }
                        acked = cursor;
                        renewed = Instant::now();
                    }
                    let request = Post {
                        endpoint: &self.endpoint,
                        body: body.clone(),
                        signature: signature.clone(),
                        delivery: delivery.clone(),
                        attempt,
                    };
                    match post(&self.client, &request).await {
                        Ok(()) => {
                            self.counters
                                .delivered_requests
                                .fetch_add(1, Ordering::Relaxed);
                            self.counters
                                .delivered_events
                                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                            self.counters.set_error(None);
                            break;
                        }
                        Err(e) => {
                            self.counters
                                .failed_requests
                                .fetch_add(1, Ordering::Relaxed);
                            let mut delay = backoff(
                                attempt,
                                self.config.backoff_initial,
                                self.config.backoff_max,
                            );
                            if let PostError::Status {
                                retry_after: Some(after),
                                ..
                            } = &e
                            {
                                delay = delay.max((*after).min(self.config.backoff_max));
                            }
                            tracing::warn!(endpoint = %self.endpoint.url, attempt, error = %e,
                                retry_in_ms = delay.as_millis() as u64, "webhook delivery failed; will retry");
                            self.counters.set_error(Some(e.to_string()));
                            // Sleep, renewing the lease meanwhile.
                            let until = Instant::now() + delay;
                            loop {
                                let now = Instant::now();
                                if now >= until {
                                    break;
                                }
                                let step = (until - now).min(self.renew_every());
                                if self.sleep(step).await {
                                    return Exit::Stopped(cursor);
                                }
                                if renewed.elapsed() >= self.renew_every() {
                                    if let Err(exit) = self.ack(owner, cursor).await {
                                        return exit;
                                    }
                                    acked = cursor;
                                    renewed = Instant::now();
                                }
                            }
                        }
                    }
                }
                cursor = ack_to;
                self.counters.cursor.store(cursor, Ordering::Relaxed);
                if renewed.elapsed() >= self.ack_every() {
                    if let Err(exit) = self.ack(owner, cursor).await {
                        return exit;
                    }
                    acked = cursor;
                    renewed = Instant::now();
                }
            }
            if chunks.is_empty() || cursor < next_after {
                // Nothing to send in this page (all filtered out), or the last chunk
                // had no form: move past it.
                if let Err(exit) = self.ack(owner, next_after).await {
                    return exit;
                }
                cursor = next_after;
                renewed = Instant::now();
            }
            self.update_lag(cursor).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_core::{Digest, Tag, Timestamp};

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }
    fn digest(s: &str) -> Digest {
        Digest::sha256(s.as_bytes())
    }
    fn stored(seq: u64, event: Event) -> StoredEvent {
        StoredEvent {
            seq,
            at: Timestamp(1_700_000_000_123),
            event,
        }
    }
    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

    fn push_by_tag(seq: u64, r: &str, tag: &str, body: &str) -> Vec<StoredEvent> {
        vec![
            stored(
                seq,
                Event::ManifestPut {
                    repo: repo(r),
                    digest: digest(body),
                    media_type: OCI_MANIFEST.to_owned(),
                    subject: None,
                    size: body.len() as u64,
                },
            ),
            stored(
                seq + 1,
                Event::TagMoved {
                    repo: repo(r),
                    tag: Tag::parse(tag).unwrap(),
                    from: None,
                    to: digest(body),
                },
            ),
        ]
    }

    fn src() -> Source<'static> {
        Source {
            addr: "reg.example:5000",
            base_url: "https://reg.example",
            instance_id: "i-1",
        }
    }

    async fn prep<'a>(events: &'a [StoredEvent], ep: &Endpoint) -> Vec<Prepared<'a>> {
        prepare(events, ep, &mut ManifestCache::default(), None).await
    }

    fn json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    #[tokio::test]
    async fn distribution_envelope_of_a_push_by_tag() {
        let events = push_by_tag(7, "team/app", "v1", "manifest");
        let ep = Endpoint::new("http://hook.example/x").unwrap();
        let p = prep(&events, &ep).await;
        assert_eq!(p.len(), 1, "the manifest push is merged into its tag move");
        let body = json(&render(ep.format, &p, &src()).unwrap());
        let e = &body["events"][0];
        assert_eq!(e["id"], events[1].id());
        assert_eq!(e["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(e["action"], "push");
        let t = &e["target"];
        assert_eq!(t["mediaType"], OCI_MANIFEST);
        assert_eq!(t["digest"], digest("manifest").to_string());
        assert_eq!(t["size"], 8);
        assert_eq!(t["length"], 8);
        assert_eq!(t["repository"], "team/app");
        assert_eq!(t["tag"], "v1");
        assert_eq!(
            t["url"],
            format!(
                "https://reg.example/v2/team/app/manifests/{}",
                digest("manifest")
            )
        );
        assert_eq!(e["source"]["addr"], "reg.example:5000");
        assert_eq!(e["source"]["instanceID"], "i-1");
        assert!(e["request"].is_object() && e["actor"].is_object());
    }

    /// One event of each shape Distribution's format has to handle, and two it has no
    /// form for (a repository's creation, collected bytes), all about blob `d`.
    fn distribution_samples(d: &Digest) -> Vec<StoredEvent> {
        vec![
            stored(1, Event::RepositoryCreated { repo: repo("a/b") }),
            stored(
                2,
                Event::BlobStored {
                    repo: repo("a/b"),
                    digest: d.clone(),
                    size: 4,
                },
            ),
            stored(
                3,
                Event::BlobMounted {
                    repo: repo("c"),
                    from: repo("a/b"),
                    digest: d.clone(),
                },
            ),
            stored(
                4,
                Event::TagDeleted {
                    repo: repo("a/b"),
                    tag: Tag::parse("v1").unwrap(),
                    digest: d.clone(),
                },
            ),
            stored(
                5,
                Event::ManifestDeleted {
                    repo: repo("a/b"),
                    digest: d.clone(),
                    tags: vec![],
                },
            ),
            stored(
                6,
                Event::BlobCollected {
                    digest: d.clone(),
                    size: 4,
                },
            ),
            stored(
                7,
                Event::ManifestPut {
                    repo: repo("a/b"),
                    digest: d.clone(),
                    media_type: OCI_MANIFEST.to_owned(),
                    subject: None,
                    size: 3,
                },
            ),
        ]
    }

    #[tokio::test]
    async fn distribution_event_shapes() {
        let d = digest("blob");
        let events = distribution_samples(&d);
        let ep = Endpoint::new("http://hook.example/x").unwrap();
        let p = prep(&events, &ep).await;
        let body = json(&render(ep.format, &p, &src()).unwrap());
        let evs = body["events"].as_array().unwrap();
        // Repository creation and the collected bytes have no Distribution form.
        assert_eq!(evs.len(), 5);
        assert_eq!(evs[0]["action"], "push");
        assert_eq!(evs[0]["target"]["mediaType"], BLOB_MEDIA_TYPE);
        assert!(
            evs[0]["target"]["url"]
                .as_str()
                .unwrap()
                .contains("/blobs/")
        );
        assert_eq!(evs[1]["action"], "mount");
        assert_eq!(evs[1]["target"]["fromRepository"], "a/b");
        assert_eq!(evs[2]["action"], "delete");
        assert_eq!(evs[2]["target"]["tag"], "v1");
        assert!(evs[2]["target"].get("digest").is_none());
        assert_eq!(evs[3]["action"], "delete");
        assert_eq!(evs[3]["target"]["digest"], d.to_string());
        assert!(evs[3]["target"].get("mediaType").is_none());
        // Pushed by digest: no tag.
        assert_eq!(evs[4]["action"], "push");
        assert!(evs[4]["target"].get("tag").is_none());
    }

    /// The hand-written envelope is byte for byte what serde_json writes, for every
    /// event with a Distribution form, a merged push by tag, and fields that need
    /// escaping.
    #[tokio::test]
    async fn hand_written_envelope_matches_serde() {
        let d = digest("blob");
        let mut events = distribution_samples(&d);
        for event in [
            Event::BlobDeleted {
                repo: repo("c"),
                digest: d.clone(),
            },
            Event::LinkCollected {
                repo: repo("c"),
                digest: d.clone(),
            },
            Event::ManifestDeleted {
                repo: repo("a/b"),
                digest: d.clone(),
                tags: vec![Tag::parse("v1").unwrap()],
            },
            Event::RepositoryDeleted { repo: repo("a/b") },
            Event::ManifestPut {
                repo: repo("x"),
                digest: d.clone(),
                media_type: "odd/\"type\"\\\n\u{1}é".to_owned(),
                subject: None,
                size: u64::MAX,
            },
        ] {
            events.push(stored(20 + events.len() as u64, event));
        }
        events.extend(push_by_tag(10, "team/app", "v1", "m"));
        let ep = Endpoint::new("http://hook.example/x").unwrap();
        let p = prep(&events, &ep).await;
        let odd = Source {
            addr: "host \"q\"",
            base_url: "https://reg.example/a\\b",
            instance_id: "i\t1",
        };
        for src in [src(), odd] {
            let all: Vec<_> = p
                .iter()
                .filter_map(|p| distribution_event(p, &src))
                .collect();
            // Two samples have no form, and one push by tag is merged.
            assert_eq!(all.len(), events.len() - 3);
            let mut ours = Vec::new();
            write_envelope(&mut ours, &all);
            let theirs = serde_json::to_vec(&Envelope { events: all }).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
        }
    }

    #[tokio::test]
    async fn cloudevents_single_and_batch() {
        let events = push_by_tag(10, "team/app", "v1", "m");
        let ep = Endpoint::new("http://h/x")
            .unwrap()
            .with_format(PayloadFormat::CloudEventsBatch);
        let p = prep(&events, &ep).await;
        assert_eq!(p.len(), 2, "CloudEvents keep every event");
        let body = json(&render(ep.format, &p, &src()).unwrap());
        let arr = body.as_array().unwrap();
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[0]["specversion"], "1.0");
        assert_eq!(arr[0]["id"], events[0].id());
        assert_eq!(arr[0]["type"], "oci.registry.manifest_put");
        assert_eq!(arr[0]["source"], "https://reg.example");
        assert_eq!(arr[0]["subject"], format!("team/app@{}", digest("m")));
        assert_eq!(arr[0]["data"]["seq"], 10);
        assert_eq!(arr[0]["data"]["event"]["repo"], "team/app");
        assert_eq!(arr[0]["data"]["event"]["kind"], "manifest_put");
        assert_eq!(arr[1]["data"]["event"]["tag"], "v1");
        assert_eq!(arr[1]["type"], "oci.registry.tag_moved");
        assert_eq!(arr[1]["subject"], "team/app:v1");
        assert_eq!(arr[1]["data"]["mediaType"], OCI_MANIFEST);
        assert_eq!(arr[1]["data"]["action"], "push");

        let ep = ep.with_format(PayloadFormat::CloudEvents);
        assert_eq!(ep.batch_limit(), 1);
        let one = json(&render(ep.format, &p[1..], &src()).unwrap());
        assert_eq!(one["id"], events[1].id());
        assert_eq!(one["time"], "2023-11-14T22:13:20.123Z");
    }

    #[tokio::test]
    async fn filters() {
        let mut events = push_by_tag(1, "team-a/app", "v1", "x");
        events.extend(push_by_tag(3, "team-ab/app", "v1", "y"));
        events.push(stored(
            5,
            Event::TagDeleted {
                repo: repo("team-a/app"),
                tag: Tag::parse("v1").unwrap(),
                digest: digest("x"),
            },
        ));
        events.push(stored(
            6,
            Event::BlobCollected {
                digest: digest("z"),
                size: 1,
            },
        ));
        let seqs = |p: Vec<Prepared<'_>>| p.iter().map(|p| p.stored.seq).collect::<Vec<_>>();
        let ep = Endpoint::parse("http://h/x,prefix=team-a/,format=cloudevents-batch").unwrap();
        assert_eq!(seqs(prep(&events, &ep).await), [1, 2, 5]);
        let ep = Endpoint::parse("http://h/x,actions=delete,format=cloudevents-batch").unwrap();
        assert_eq!(seqs(prep(&events, &ep).await), [5, 6]);
        let ep = Endpoint::parse(&format!(
            "http://h/x,media={OCI_MANIFEST},format=cloudevents-batch"
        ))
        .unwrap();
        assert_eq!(seqs(prep(&events, &ep).await), [1, 2, 3, 4]);
        let ep = Endpoint::parse("http://h/x,media=application/other").unwrap();
        assert!(prep(&events, &ep).await.is_empty());
        // Distribution: merged pushes, deletes by prefix.
        let ep = Endpoint::parse("http://h/x,prefix=team-a").unwrap();
        assert_eq!(seqs(prep(&events, &ep).await), [2, 5]);
    }

    #[tokio::test]
    async fn tag_move_to_an_earlier_manifest_gets_its_media_type_from_the_cache() {
        let events = push_by_tag(1, "r", "v1", "m");
        let later = vec![stored(
            9,
            Event::TagMoved {
                repo: repo("r"),
                tag: Tag::parse("latest").unwrap(),
                from: None,
                to: digest("m"),
            },
        )];
        let ep = Endpoint::new("http://h/x").unwrap();
        let mut cache = ManifestCache::default();
        let _ = prepare(&events, &ep, &mut cache, None).await;
        let p = prepare(&later, &ep, &mut cache, None).await;
        assert_eq!(p[0].media_type.as_deref(), Some(OCI_MANIFEST));
        assert_eq!(p[0].size, Some(1));
    }

    #[test]
    fn parse_specs() {
        let ep = Endpoint::parse(
            "http://h:8080/hook?a=1,b=2,prefix=team-a/,actions=push+delete,media=application/vnd.oci.image.manifest.v1+json,format=cloudevents,batch=5,timeout=3s",
        )
        .unwrap();
        assert_eq!(ep.url().to_string(), "http://h:8080/hook?a=1,b=2");
        assert_eq!(ep.consumer(), "webhook:http://h:8080/hook?a=1,b=2");
        assert_eq!(ep.filter.prefixes, ["team-a"]);
        assert_eq!(
            ep.filter.actions,
            [NotifyAction::Push, NotifyAction::Delete]
        );
        assert_eq!(ep.filter.media_types, [OCI_MANIFEST]);
        assert_eq!(ep.format, PayloadFormat::CloudEvents);
        assert_eq!(ep.max_batch, 5);
        assert_eq!(ep.timeout, Duration::from_secs(3));
        assert!(Endpoint::parse("ftp://h/x").is_err());
        assert!(Endpoint::parse("not a url").is_err());
        assert!(Endpoint::parse("http://h/x,actions=pull").is_err());
        assert!(Endpoint::parse("http://h/x,format=xml").is_err());
        assert!(Endpoint::parse("http://h/x,batch=0").is_err());
        assert!(Endpoint::parse("http://h/x,prefix=a,junk").is_err());
        let d = Endpoint::parse("http://h/x").unwrap();
        assert_eq!(d.format, PayloadFormat::Distribution);
        assert_eq!(d.format.content_type(), DISTRIBUTION_EVENTS_V1);
        assert_eq!(
            PayloadFormat::DistributionV2.content_type(),
            DISTRIBUTION_EVENTS_V2
        );
    }

    #[test]
    fn signatures() {
        // RFC 4231 test case 2.
        let s = Secret::new("Jefe");
        let sig = s.sign(b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(s.verify(b"what do ya want for nothing?", &sig));
        assert!(!s.verify(b"what do ya want for nothing!", &sig));
        assert!(!Secret::new("other").verify(b"what do ya want for nothing?", &sig));
        assert_eq!(format!("{s:?}"), "Secret(..)");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "Jefe\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().sign(b"x"), s.sign(b"x"));
        std::fs::write(&path, "\n").unwrap();
        assert!(Secret::from_file(&path).is_err());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(60));
        for n in 1..40 {
            let d = backoff(n, i, m);
            let full = i.saturating_mul(1 << (n - 1).min(20)).min(m);
            assert!(d >= full / 2 && d <= full, "{n}: {d:?} vs {full:?}");
        }
        assert!(backoff(100, i, m) <= m);
    }

    #[test]
    fn collector_encodes_every_endpoint() {
        let c = Arc::new(Counters::default());
        c.lag.store(7, Ordering::Relaxed);
        c.failed_requests.store(2, Ordering::Relaxed);
        let collector = NotifyCollector {
            endpoints: vec![("http://h/x".to_owned(), c)],
        };
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(collector));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(
            out.contains("registry_notify_lag_events{endpoint=\"http://h/x\"} 7"),
            "{out}"
        );
        assert!(
            out.contains(
                "registry_notify_requests_total{endpoint=\"http://h/x\",result=\"failed\"} 2"
            ),
            "{out}"
        );
    }

    #[test]
    fn delivery_ids_are_stable_and_distinct() {
        let events = push_by_tag(1, "r", "v1", "m");
        let p: Vec<_> = events
            .iter()
            .map(|stored| Prepared {
                stored,
                id: stored.id(),
                media_type: None,
                size: None,
            })
            .collect();
        assert_eq!(delivery_id("c", &p), delivery_id("c", &p));
        assert_ne!(delivery_id("c", &p), delivery_id("c", &p[..1]));
        assert_ne!(delivery_id("c", &p), delivery_id("d", &p));
    }
}
