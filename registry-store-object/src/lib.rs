//! # registry-store-object
//!
//! Storage for a [`registry_core::Registry`] in an object store (S3, Azure Blob, GCS,
//! or anything else behind [`object_store::ObjectStore`]), shareable by several
//! registry processes: everything lives in the bucket, every change to shared state is
//! a conditional write, and what a process keeps in memory is a cache it can lose.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use registry_core::{Registry, RepoName};
//! use registry_store_object::BucketStore;
//!
//! // Any `ObjectStore`; `from_url("s3://bucket")` builds a cloud one from the environment.
//! let bucket = Arc::new(object_store::memory::InMemory::new());
//! let first = Registry::builder(BucketStore::open(bucket.clone()).await?).build();
//! let second = Registry::builder(BucketStore::open(bucket).await?).build();
//!
//! // What one process writes, the other reads at once.
//! let repo = RepoName::parse("demo/app")?;
//! let digest = first.put_blob(&repo, &registry_core::Digest::sha256(b"hi"), None,
//!     futures::StreamExt::boxed(futures::stream::iter([Ok(bytes::Bytes::from_static(b"hi"))]))).await?.digest;
//! assert_eq!(second.stat_blob(&repo, &digest).await?.size, 2);
//! # Ok(())
//! # }
//! ```
//!
//! ## Layout in the bucket (under an optional prefix)
//! - `blobs/<algorithm>/<hex>`: blob bytes, immutable once written;
//! - `uploads/<id>/...`: upload sessions, so a chunked upload started through one
//!   process can be continued through another (see [`ObjectBlobStore`]);
//! - `meta/log/<version>`, `meta/checkpoint/<version>`: all metadata, as a log of
//!   transactions (see [`LogKv`]); `meta/trimmed`: through which version the log may
//!   have been trimmed ([`BucketOptions::log_retention`]).
//!
//! ## Checking
//! [`BucketStore::check`] verifies the store like the fs store's `check`: the metadata
//! audit (counts and indexes against the links), every blob record against its object
//! (a record whose bytes are gone is a problem), orphan objects, and optionally every
//! object's digest; with `repair` it fixes what it can.
//!
//! Metadata transactions are serialised through the log: each commit is one
//! create-if-absent write of the next entry, so the rules of `registry_core::kv` (the
//! same code the memory and redb stores run) hold across processes. `docs/design.md`
//! (section "Object storage") has the protocol, its costs and its limits.
//!
//! ## Configuration from the environment
//! [`from_url`] builds a store from `s3://BUCKET`, `az://CONTAINER` or `gs://BUCKET`
//! with the object_store builders' standard environment variables (crate features
//! `aws`, `azure`, `gcp`). S3 needs copy-if-not-exists for commits; unless
//! `AWS_COPY_IF_NOT_EXISTS` says otherwise it uses `multipart` (conditional
//! `CompleteMultipartUpload`, supported by AWS S3 and moto).

#![forbid(unsafe_code)]

mod blobs;
mod check;
mod log_kv;

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::path::Path;
use registry_core::kv::KvMetadata;
use registry_core::store::Storage;
use registry_core::{Error, Result};

pub use blobs::ObjectBlobStore;
pub use check::{CheckOptions, CheckReport, DEFAULT_ORPHAN_GRACE};
pub use log_kv::{Clock, LogKv, TrimReport};
pub use object_store;

/// Default number of log entries between metadata checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 1000;

/// Default [`BucketOptions::replay_concurrency`].
pub const DEFAULT_REPLAY_CONCURRENCY: usize = 32;

/// Default [`BucketOptions::lease`].
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

fn os_err(e: object_store::Error) -> Error {
    Error::storage(e)
}

/// Knobs for [`BucketStore::open_with`].
#[derive(Debug, Clone)]
pub struct BucketOptions {
    /// Everything is stored under this prefix ("" for the bucket's root), so that
    /// several registries can share one bucket.
    pub prefix: String,
    /// Log entries between metadata checkpoints: fewer makes opening a process faster,
    /// more writes fewer (possibly large) checkpoint objects.
    pub checkpoint_interval: u64,
    /// Log entries read at once (GETs in flight) when a process opens or catches up.
    pub replay_concurrency: usize,
    /// How long a process trusts that it was current without reading the trim
    /// watermark (one GET per lease when idle, none while busy). Every process of the
    /// bucket must use a lease of at most a third of the trimming process's
    /// [`log_retention`](Self::log_retention); `Duration::ZERO` reads the watermark
    /// after every check, relying on no clock at all. Default 30 s.
    pub lease: Duration,
    /// Delete log entries and checkpoints behind a checkpoint older than this (by the
    /// bucket's timestamps; at least three leases): the process that writes a
    /// checkpoint then runs a trim pass in the background. `None` (the default) keeps
    /// everything. Turn it on only once every process of the bucket runs a version
    /// that checks the trim watermark (this one).
    pub log_retention: Option<Duration>,
    /// Log entries deleted per trim pass at most (each later checkpoint continues).
    pub trim_batch: usize,
    /// The monotonic clock leases are measured on (tests inject one).
    pub clock: Clock,
}

impl Default for BucketOptions {
    fn default() -> Self {
        BucketOptions {
            prefix: String::new(),
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            replay_concurrency: DEFAULT_REPLAY_CONCURRENCY,
            lease: DEFAULT_LEASE,
            log_retention: None,
            trim_batch: 1000,
            clock: Clock::default(),
        }
    }
}

/// Blobs and metadata in one bucket.
#[derive(Debug, Clone)]
pub struct BucketStore {
    blobs: Arc<ObjectBlobStore>,
    metadata: Arc<KvMetadata<LogKv>>,
    /// See [`BucketStore::with_orphan_grace`].
    orphan_grace: Duration,
}

impl BucketStore {
    /// Opens the registry stored at the root of `store` (creating nothing until the first
    /// write).
    pub async fn open(store: Arc<dyn ObjectStore>) -> Result<BucketStore> {
        Self::open_with(store, BucketOptions::default()).await
    }

    /// Opens with explicit options.
    pub async fn open_with(
        store: Arc<dyn ObjectStore>,
        options: BucketOptions,
    ) -> Result<BucketStore> {
        let root = Path::from(options.prefix.as_str());
        let log_options = log_kv::LogOptions {
            checkpoint_interval: options.checkpoint_interval,
            replay_concurrency: options.replay_concurrency,
            lease: options.lease,
            retention: options.log_retention,
            trim_batch: options.trim_batch,
            clock: options.clock,
        };
        let kv = LogKv::open(store.clone(), &root.clone().join("meta"), log_options).await?;
        Ok(BucketStore {
            blobs: Arc::new(ObjectBlobStore::new(store, &root)),
            metadata: Arc::new(KvMetadata::new(kv)),
            orphan_grace: DEFAULT_ORPHAN_GRACE,
        })
    }

    /// The metadata engine (its log version, for tools and tests).
    pub fn log(&self) -> &LogKv {
        self.metadata.engine()
    }

    /// Presigns blob GETs with `signer` (the object store's own signer, built from the
    /// same configuration), so that [`BlobStore::presigned_get`] answers with URLs and
    /// `registry-http` can redirect blob downloads to the bucket.
    ///
    /// [`BlobStore::presigned_get`]: registry_core::store::BlobStore::presigned_get
    #[cfg(any(feature = "aws", feature = "azure", feature = "gcp"))]
    pub fn with_signer(mut self, signer: Arc<dyn object_store::signer::Signer>) -> Self {
        let mut blobs = (*self.blobs).clone();
        blobs.signer = Some(signer);
        self.blobs = Arc::new(blobs);
        self
    }

    /// The storage a `Registry` is built on.
    pub fn into_storage(self) -> Storage {
        Storage {
            blobs: self.blobs,
            metadata: self.metadata,
        }
    }
}

impl From<BucketStore> for Storage {
    fn from(s: BucketStore) -> Storage {
        s.into_storage()
    }
}

/// Builds an object store from a URL and the environment: `s3://BUCKET` (feature
/// `aws`; `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_REGION`, `AWS_COPY_IF_NOT_EXISTS`, ...), `az://CONTAINER` (feature `azure`;
/// `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_USE_EMULATOR`,
/// `AZURITE_BLOB_STORAGE_URL`, ...), `gs://BUCKET` (feature `gcp`;
/// `GOOGLE_SERVICE_ACCOUNT`, ...), or `memory://` (one process only). A path after the
/// bucket is returned as the prefix to store under.
pub fn from_url(url: &str) -> Result<(Arc<dyn ObjectStore>, String)> {
    from_url_inner(url).map(|(store, _, prefix)| (store, prefix))
}

/// Like [`from_url`], with the store's signer for presigned URLs (see
/// [`BucketStore::with_signer`]): `Some` for `s3://`, `az://` and `gs://`.
#[cfg(any(feature = "aws", feature = "azure", feature = "gcp"))]
pub fn from_url_with_signer(url: &str) -> Result<(Arc<dyn ObjectStore>, MaybeSigner, String)> {
    from_url_inner(url)
}

#[cfg(any(feature = "aws", feature = "azure", feature = "gcp"))]
type MaybeSigner = Option<Arc<dyn object_store::signer::Signer>>;
#[cfg(not(any(feature = "aws", feature = "azure", feature = "gcp")))]
type MaybeSigner = Option<std::convert::Infallible>;

fn from_url_inner(url: &str) -> Result<(Arc<dyn ObjectStore>, MaybeSigner, String)> {
    let bad = |why: &str| Error::storage(format!("storage URL {url:?}: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected SCHEME://BUCKET"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/').to_owned();
    if bucket.is_empty() && scheme != "memory" {
        return Err(bad("no bucket or container name"));
    }
    let (store, signer): (Arc<dyn ObjectStore>, MaybeSigner) = match scheme {
        "memory" => (Arc::new(object_store::memory::InMemory::new()), None),
        #[cfg(feature = "aws")]
        "s3" => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3CopyIfNotExists};
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if b.get_config_value(&AmazonS3ConfigKey::CopyIfNotExists)
                .is_none()
            {
                b = b.with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
            }
            let s = Arc::new(b.build().map_err(os_err)?);
            (s.clone(), Some(s))
        }
        #[cfg(feature = "azure")]
        "az" | "azure" => {
            use object_store::azure::MicrosoftAzureBuilder;
            let b = MicrosoftAzureBuilder::from_env().with_container_name(bucket);
            let s = Arc::new(b.build().map_err(os_err)?);
            (s.clone(), Some(s))
        }
        #[cfg(feature = "gcp")]
        "gs" => {
            use object_store::gcp::GoogleCloudStorageBuilder;
            let b = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
            let s = Arc::new(b.build().map_err(os_err)?);
            (s.clone(), Some(s))
        }
        // Reached only for the schemes whose feature is off.
        #[allow(unreachable_patterns)]
        "s3" | "az" | "azure" | "gs" => {
            return Err(bad(
                "this build lacks the crate feature for it (aws, azure, gcp)",
            ));
        }
        _ => return Err(bad("unknown scheme (s3, az, gs, memory)")),
    };
    Ok((store, signer, prefix))
}
