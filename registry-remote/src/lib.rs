//! # registry-remote
//!
//! A client for a remote OCI registry (distribution spec v1.1) that implements
//! registry-core's [`ImageSource`](registry_core::ImageSource) and
//! [`ImageSink`](registry_core::ImageSink). Whatever works on those traits works
//! across the network unchanged: [`registry_core::transfer`] copies an image (with its
//! children, blobs and referrers) between a local [`Registry`](registry_core::Registry)
//! and a remote one in either direction, [`registry_core::sync`] mirrors every tag of a
//! repository, and a pull-through cache reads what it misses from a
//! [`RemoteRegistry`].
//!
//! ```no_run
//! use registry_core::{PromoteOptions, Registry, RepoName, Tag, transfer};
//! use registry_core::{ImageSource, Reference};
//! use registry_remote::{Credentials, RemoteRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let remote = RemoteRegistry::new("https://registry.example.com")?
//!     .with_credentials(Credentials::parse_source("env:REGISTRY_AUTH")?);
//! let repo = RepoName::parse("team/app")?;
//!
//! // Resolve a tag remotely, then copy the image into a local registry.
//! let v1 = Tag::parse("v1")?;
//! let meta = remote.stat_manifest(&repo, &Reference::Tag(v1.clone())).await?;
//! let local = Registry::in_memory();
//! let options = PromoteOptions::default().with_tag(v1);
//! let report = transfer(&remote, &repo, &meta.digest, &local, &repo, &options).await?;
//! println!("{} blobs, {} bytes", report.blobs_streamed, report.bytes_streamed);
//! # Ok(())
//! # }
//! ```
//!
//! ## What it does on the wire
//!
//! - **Authentication**: anonymous first; on a 401, Basic credentials (`Basic`
//!   challenge) or a Bearer token from the challenge's realm for the scopes the request
//!   needs (`pull` for reads, `pull,push` for writes). Tokens are cached per scope set
//!   and reused before they expire; a refusal of fresh credentials is
//!   [`Error::Denied`](registry_core::Error::Denied).
//! - **Retries**: connection failures, 5xx and 429 (honouring `Retry-After` up to
//!   10 s) are retried with exponential backoff and jitter, for requests whose body
//!   can be sent again; a streamed upload is never sent twice.
//! - **Blobs** stream chunk by chunk in both directions (constant memory). Downloads
//!   follow redirects without sending credentials to another host, resume with `Range`
//!   after a broken connection, and are hashed as they arrive: the stream fails rather
//!   than end when the bytes do not match the digest or the size.
//! - **Manifests** are bounded in size and verified against the digest asked for (or
//!   the registry's `Docker-Content-Digest` for a tag).
//!
//! ## Why a client of its own
//!
//! hyper and hyper-util are already in the tree for `registry-http`'s server and
//! webhooks, so this client is a few hundred lines on them and no new HTTP stack.
//! It controls what the traits need and what general-purpose clients decide for their
//! callers: token scopes per repository and action, `Range` resumption of a download
//! mid-stream, uploads streamed from any source without buffering, and digest checks
//! of every byte. `oci-client` would bring reqwest and its own TLS and redirect
//! handling, buffers blobs or hides the connection-level events a resumption needs.

#![forbid(unsafe_code)]

mod auth;
mod blob;
mod client;
mod sink;
mod source;
mod url;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::{Method, StatusCode, Uri};
use registry_core::Result;

pub use auth::Credentials;
use client::{Call, Config, Inner, Subject, upstream};
use url::Origin;

/// Default number of retries of a failed request.
const DEFAULT_RETRIES: u32 = 4;
/// Default time allowed to connect and receive response headers.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit on the size of a manifest.
const DEFAULT_MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// A remote OCI registry, as an [`ImageSource`](registry_core::ImageSource) and an
/// [`ImageSink`](registry_core::ImageSink).
///
/// Cheap to clone: clones share the connection pool and the token cache. The
/// `with_*` methods, meant for setting a client up, return a client with its own
/// connection pool and fresh authentication state.
#[derive(Clone)]
pub struct RemoteRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for RemoteRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.inner.config;
        f.debug_struct("RemoteRegistry")
            .field("base_url", &c.base_url)
            .field("credentials", &c.credentials)
            .field("retries", &c.retries)
            .field("timeout", &c.timeout)
            .field("max_manifest_size", &c.max_manifest_size)
            .finish_non_exhaustive()
    }
}

impl RemoteRegistry {
    /// A client for the registry at `base_url`: `http://host[:port]` or
    /// `https://host[:port]` (the latter with the `tls` feature, on by default). The URL
    /// names the registry, not a repository: a path (other than `/`), a query or
    /// credentials in the URL are refused, as
    /// [`Error::Upstream`](registry_core::Error::Upstream).
    pub fn new(base_url: &str) -> Result<Self> {
        let invalid = |why: &str| {
            // A URL with credentials in it is not echoed back into logs.
            let shown = if base_url.contains('@') {
                "<URL with credentials>".to_owned()
            } else {
                format!("{base_url:?}")
            };
            upstream(format!("invalid registry URL {shown}: {why}"))
        };
        let uri: Uri = base_url.trim().parse().map_err(|_| invalid("not a URL"))?;
        let scheme = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("http") => "http",
            Some("https") if cfg!(feature = "tls") => "https",
            Some("https") => {
                return Err(invalid("https:// needs registry-remote's `tls` feature"));
            }
            _ => return Err(invalid("expected http:// or https://")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("credentials belong in Credentials, not in the URL"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid(
                "a path or query is not allowed: give the registry's root URL",
            ));
        }
        let base_url = format!("{scheme}://{}", authority.as_str().to_ascii_lowercase());
        let base: Uri = format!("{base_url}/")
            .parse()
            .map_err(|_| invalid("not a URL"))?;
        let origin = Origin::of(&base).ok_or_else(|| invalid("no host"))?;
        let config = Config {
            base_url,
            base,
            origin,
            credentials: Credentials::Anonymous,
            retries: DEFAULT_RETRIES,
            timeout: DEFAULT_TIMEOUT,
            user_agent: HeaderValue::from_static(concat!(
                "registry-remote/",
                env!("CARGO_PKG_VERSION")
            )),
            max_manifest_size: DEFAULT_MAX_MANIFEST_SIZE,
        };
        Ok(RemoteRegistry {
            inner: Arc::new(Inner::new(config)),
        })
    }

    fn reconfigure(self, change: impl FnOnce(&mut Config)) -> Self {
        let mut config = self.inner.config.clone();
        change(&mut config);
        RemoteRegistry {
            inner: Arc::new(Inner::new(config)),
        }
    }

    /// Authenticates with `credentials` (default [`Credentials::Anonymous`]).
    pub fn with_credentials(self, credentials: Credentials) -> Self {
        self.reconfigure(|c| c.credentials = credentials)
    }

    /// Retries a failed request (connection failure, 5xx, 429) up to `retries` times
    /// (default 4); also the number of `Range` resumptions of one blob download.
    pub fn with_retries(self, retries: u32) -> Self {
        self.reconfigure(|c| c.retries = retries)
    }

    /// Time allowed to connect and receive a response's headers (default 30 s); also
    /// the longest wait for the next chunk of a body, and, for an upload, for the
    /// response after the last byte was sent.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.reconfigure(|c| c.timeout = timeout)
    }

    /// Sends `user_agent` as `User-Agent` (default `registry-remote/VERSION`).
    /// Characters a header cannot carry are dropped.
    pub fn with_user_agent(self, user_agent: impl Into<String>) -> Self {
        let text: String = user_agent
            .into()
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control())
            .collect();
        match HeaderValue::from_str(&text) {
            Ok(v) if !text.is_empty() => self.reconfigure(|c| c.user_agent = v),
            _ => self,
        }
    }

    /// Refuses manifests larger than `bytes` (default 4 MiB) with
    /// [`Error::TooLarge`](registry_core::Error::TooLarge): a manifest is held in memory
    /// whole.
    pub fn with_max_manifest_size(self, bytes: u64) -> Self {
        self.reconfigure(|c| c.max_manifest_size = bytes)
    }

    /// The registry's base URL, `scheme://host[:port]`.
    pub fn base_url(&self) -> &str {
        &self.inner.config.base_url
    }

    /// Checks that the registry answers the OCI API (`GET /v2/`), authenticating as
    /// configured: `Ok` when it accepts this client.
    pub async fn ping(&self) -> Result<()> {
        let call = Call::new(Method::GET, self.inner.url("/v2/")?, Vec::new());
        let answer = self.inner.send(call).await?;
        if answer.status == StatusCode::OK {
            answer.discard().await;
            return Ok(());
        }
        if answer.status == StatusCode::NOT_FOUND {
            let what = answer.what.clone();
            answer.discard().await;
            return Err(upstream(format!(
                "{what} answered 404: not an OCI distribution registry"
            )));
        }
        Err(answer.fail(Subject::None).await)
    }
}

/// The README's example, compiled as a doc test so that it never rots.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}
