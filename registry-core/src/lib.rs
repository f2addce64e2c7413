//! # registry-core
//!
//! The heart of an embeddable OCI registry: validated names and digests, manifest
//! inspection, the storage contract ([`BlobStore`], [`MetadataStore`]), the [`Registry`]
//! that implements the OCI distribution semantics over any storage, and the in-memory
//! store that is the embedded default.
//!
//! ```
//! use bytes::Bytes;
//! use futures::stream::{self, StreamExt};
//! use registry_core::{Digest, Reference, Registry, RepoName, Tag, PutManifestOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), registry_core::Error> {
//! let registry = Registry::in_memory(); // ready in microseconds, no port, no task
//! let repo = RepoName::parse("demo/app")?;
//!
//! // Push a config blob and a layer, then a manifest referencing them.
//! let config = Bytes::from_static(b"{}");
//! let layer = Bytes::from_static(b"hello, layer");
//! for blob in [&config, &layer] {
//!     let body = stream::iter([Ok(blob.clone())]).boxed();
//!     registry.put_blob(&repo, &Digest::sha256(blob), Some(blob.len() as u64), body).await?;
//! }
//! let manifest = format!(
//!     r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
//!        "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},
//!        "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
//!     Digest::sha256(&config), config.len(), Digest::sha256(&layer), layer.len(),
//! );
//! let tag = Reference::Tag(Tag::parse("v1")?);
//! let pushed = registry
//!     .put_manifest(&repo, &tag, "application/vnd.oci.image.manifest.v1+json",
//!                   Bytes::from(manifest.clone()), PutManifestOptions::default())
//!     .await?;
//!
//! // Pull it back by tag: the exact bytes, verified against their digest.
//! let pulled = registry.get_manifest(&repo, &tag).await?;
//! assert_eq!(pulled.meta.digest, pushed.digest);
//! assert_eq!(pulled.bytes, manifest.as_bytes());
//! # Ok(())
//! # }
//! ```
//!
//! Storage adapters implement [`BlobStore`] and [`MetadataStore`] (usually through
//! [`kv::KvMetadata`] over a transactional key-value engine) and prove themselves with
//! the shared behaviour suite behind the `testkit` feature.
//!
//! For test harnesses and tool authors: [`fixtures`] builds and pushes known images,
//! indexes, artifacts and signatures in one call; a [`ManualClock`] and
//! [`RegistryBuilder::with_id_seed`] make a scenario replay exactly; [`fault`] wraps
//! any storage to inject errors, latency and torn writes.
//!
//! Registries that talk to other registries: [`ImageSource`] and [`ImageSink`] are
//! what an image copy reads from and writes to, a local [`Registry`] or a remote one
//! (crate `registry-remote`); [`transfer`] and [`sync`] copy between any two;
//! [`proxy`] makes a repository prefix a pull-through cache of an upstream, and
//! [`mirror`] copies every push under a prefix to another registry, from the outbox.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod access;
pub mod digest;
pub mod endpoint;
pub mod error;
pub mod events;
pub mod fault;
pub mod fixtures;
pub mod gc;
pub mod kv;
pub mod manifest;
pub mod memory;
pub mod mirror;
pub mod names;
pub mod policy;
pub mod promote;
pub mod proxy;
pub mod registry;
mod rng;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;

pub use digest::{Algorithm, Digest, Hasher};
pub use endpoint::{HeldManifest, ImageSink, ImageSource};
pub use error::{Error, InvalidInput, Result};
pub use events::{ConsumerRecord, Event, EventPage, StoredEvent};
pub use gc::{GcOptions, GcReport, RetentionRemoval, UntaggedPolicy};
pub use manifest::{Descriptor, ManifestInfo, ManifestKind, media_type};
pub use memory::{MemoryBlobStore, MemoryKv, MemoryStore};
pub use mirror::{Mirror, MirrorStatus, MirrorTarget, MirrorWatch};
pub use names::{Reference, RepoName, Tag};
pub use policy::{Keep, Policy, Quota, RetentionRule, TagPattern};
pub use promote::{
    PromoteError, PromoteOptions, PromoteReport, SyncReport, promote, same_storage, sync, transfer,
};
pub use proxy::{ProxyStats, PruneReport, Upstream};
pub use registry::{
    AllowAll, BlobBody, BlobInfo, ListOptions, Manifest, ManifestEntry, ManifestMeta, Page,
    PutManifestOptions, PutManifestResult, RangeRequest, ReadAccess, Registry, RegistryBuilder,
    RegistryConfig, RegistryStats, RepositoryDeletion, UploadStatus,
};
pub use store::{
    BlobStore, ByteRange, ByteStream, CommitLog, MetadataStore, Storage, TagEntry, UploadId,
    UploadOwner,
};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
