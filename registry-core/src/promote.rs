//! Promotion: copying an image by digest from one [`Registry`] to another, with
//! everything it references and everything that refers to it.
//!
//! The motivating layout is a set of registries with separate write scopes: a sandbox
//! anyone may push to, a CI pool only CI writes, and a production registry that is fed
//! only by promotion from CI. [`promote`] is that feed, for two registries in one
//! process. It only uses the destination's public operations (`put_blob`,
//! `mount_blob`, `put_manifest`, `tag_manifest`), so whatever the destination checks
//! for a client push (limits, digests, future policies) it checks for a promotion too.
//!
//! ```
//! use bytes::Bytes;
//! use futures::stream::{self, StreamExt};
//! use registry_core::promote::{PromoteOptions, promote};
//! use registry_core::{Digest, Reference, Registry, RepoName, Tag, PutManifestOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ci = Registry::in_memory();
//! let production = Registry::in_memory(); // separate storage: bytes are streamed
//! let repo = RepoName::parse("team/app")?;
//!
//! let config = Bytes::from_static(b"{}");
//! let body = stream::iter([Ok(config.clone())]).boxed();
//! ci.put_blob(&repo, &Digest::sha256(&config), Some(2), body).await?;
//! let manifest = format!(
//!     r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
//!        "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},
//!        "layers":[]}}"#,
//!     Digest::sha256(&config),
//! );
//! let pushed = ci
//!     .put_manifest(&repo, &Reference::Tag(Tag::parse("build-42")?),
//!                   "application/vnd.oci.image.manifest.v1+json",
//!                   Bytes::from(manifest), PutManifestOptions::default())
//!     .await?;
//!
//! let options = PromoteOptions::default().with_tag(Tag::parse("v1.0")?);
//! let report = promote(&ci, &repo, &pushed.digest, &production, &repo, &options).await?;
//! assert_eq!((report.manifests_copied, report.blobs_streamed, report.bytes_streamed), (1, 1, 2));
//!
//! let pulled = production.get_manifest(&repo, &Reference::Tag(Tag::parse("v1.0")?)).await?;
//! assert_eq!(pulled.meta.digest, pushed.digest);
//! # Ok(())
//! # }
//! ```

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use futures::stream::StreamExt;

use crate::digest::Digest;
use crate::error::Error;
use crate::manifest::ManifestInfo;
use crate::names::{Reference, RepoName, Tag};
use crate::registry::{AllowAll, ListOptions, PutManifestOptions, Registry};
use crate::store::ByteStream;

/// Referrers are listed from the source one page at a time, so that a subject with a
/// very large number of referrers never has to be held in memory at once.
const REFERRER_PAGE: usize = 256;

/// What to promote besides the image itself, and how to name it in the destination.
///
/// Built with [`PromoteOptions::default`] and the `with_*` methods (the struct is
/// `non_exhaustive` so that options can be added without breaking callers).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PromoteOptions {
    /// Tag to point at the root manifest in the destination, once everything else has
    /// been copied. `None`: the root is only reachable by digest.
    pub tag: Option<Tag>,
    /// Whether to copy the referrers (signatures, SBOMs, attestations) of every copied
    /// manifest, recursively. Default: yes.
    pub referrers: bool,
}

impl Default for PromoteOptions {
    fn default() -> Self {
        PromoteOptions {
            tag: None,
            referrers: true,
        }
    }
}

impl PromoteOptions {
    /// Tags the root manifest in the destination with `tag` when the promotion succeeds.
    pub fn with_tag(mut self, tag: Tag) -> Self {
        self.tag = Some(tag);
        self
    }

    /// Copies referrers (`true`, the default) or leaves them behind (`false`).
    pub fn with_referrers(mut self, on: bool) -> Self {
        self.referrers = on;
        self
    }
}

/// What a promotion did. A repeated promotion of the same image reports everything as
/// skipped and nothing copied, mounted or streamed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromoteReport {
    /// Manifests (the root, index children, referrers) put into the destination.
    pub manifests_copied: u64,
    /// Manifests the destination repository already had (their blobs and children are
    /// then present too: the destination only accepts complete manifests).
    pub manifests_skipped: u64,
    /// Blobs whose bytes were streamed from the source into the destination.
    pub blobs_streamed: u64,
    /// Blobs linked from bytes the destination's storage already held (shared storage,
    /// or another repository of the destination), without reading them.
    pub blobs_mounted: u64,
    /// Blobs the destination repository already had.
    pub blobs_skipped: u64,
    /// Bytes of blobs streamed (manifests are not counted: they are small and are
    /// always put from their source bytes, which a shared blob store deduplicates).
    pub bytes_streamed: u64,
    /// Whether the two registries were found to run over the very same storage objects
    /// (see [`same_storage`]).
    pub shared_storage: bool,
    /// The tag pointed at the root, if one was asked for.
    pub tagged: Option<Tag>,
}

/// Why a promotion failed. Whatever failed, the root was not tagged in the destination.
/// Content copied before the failure stays in the destination untagged: a retry skips
/// it, and the destination's collector treats it like any untagged push.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PromoteError {
    /// The source repository does not have a manifest the promotion needs.
    #[error("source repository {repo} has no manifest {digest}{}", needed_by(.referenced_by))]
    SourceManifestMissing {
        /// The source repository.
        repo: RepoName,
        /// The missing manifest.
        digest: Digest,
        /// The manifest that led to it: the index listing it as a child, or the subject
        /// it is a referrer of; `None` for the root.
        referenced_by: Option<Digest>,
    },
    /// The source repository does not have (or no longer has the bytes of) a blob that a
    /// manifest being promoted references.
    #[error(
        "source repository {repo} has no blob {digest} (referenced by manifest {referenced_by})"
    )]
    SourceBlobMissing {
        /// The source repository.
        repo: RepoName,
        /// The missing blob.
        digest: Digest,
        /// The manifest that references it.
        referenced_by: Digest,
    },
    /// Reading from the source failed otherwise: storage failed, or the bytes it served
    /// do not hash to their digest or differ in length from its records.
    #[error("reading {digest} from the source failed: {error}")]
    Source {
        /// The manifest or blob being read.
        digest: Digest,
        /// The source's error.
        #[source]
        error: Error,
    },
    /// The destination refused or failed an operation (a size limit, a policy, its
    /// storage). `error` is exactly what the destination returned.
    #[error("the destination refused {digest}: {error}")]
    Destination {
        /// The manifest or blob being written (the root, when tagging failed).
        digest: Digest,
        /// The destination's error, unchanged.
        #[source]
        error: Error,
    },
}

fn needed_by(parent: &Option<Digest>) -> String {
    parent
        .as_ref()
        .map(|p| format!(" (needed by {p})"))
        .unwrap_or_default()
}

impl PromoteError {
    /// The destination's own error, when the destination is what failed.
    pub fn destination_error(&self) -> Option<&Error> {
        match self {
            PromoteError::Destination { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<PromoteError> for Error {
    /// For callers that only speak [`Error`]: missing content becomes the matching
    /// "unknown" error; source and destination errors are returned as they were.
    fn from(e: PromoteError) -> Error {
        match e {
            PromoteError::SourceManifestMissing { digest, .. } => Error::ManifestUnknown {
                reference: digest.to_string(),
            },
            PromoteError::SourceBlobMissing { digest, .. } => Error::BlobUnknown { digest },
            PromoteError::Source { error, .. } | PromoteError::Destination { error, .. } => error,
        }
    }
}

/// Whether two registries run over the very same storage objects: the same blob store
/// *and* the same metadata store (pointer identity of the `Arc`s in their
/// [`Storage`](crate::Storage), as for registries built from clones of one `Storage`).
///
/// Both halves must match. Sharing only the blob store is not sharing: each registry's
/// collector counts only the links in its own metadata, so bytes one registry still
/// references can be deleted by the other's collector, and linking them across would
/// be unsound. Two handles opened separately over one location (two object-store
/// clients over one bucket) are not detected; [`promote`] still mounts for them,
/// because it asks the destination's metadata first (see its documentation).
pub fn same_storage(a: &Registry, b: &Registry) -> bool {
    // Compare data addresses only: vtable pointers of `dyn` objects may differ between
    // codegen units for one object, and both `Arc`s are alive here, so equal addresses
    // mean one object.
    std::ptr::addr_eq(Arc::as_ptr(&a.inner.blobs), Arc::as_ptr(&b.inner.blobs))
        && std::ptr::addr_eq(Arc::as_ptr(&a.inner.meta), Arc::as_ptr(&b.inner.meta))
}

/// Copies manifest `digest` of `from_repo` in `from`, with everything it references and
/// (unless turned off) every referrer, recursively, into `to_repo` of `to`; then, if
/// asked, tags it there.
///
/// - **Order**: blobs before the manifest that references them, index children before
///   their index, a subject before its referrers, and the tag last, so the destination
///   accepts every put and a failure never leaves the root tagged.
/// - **Idempotent**: a manifest the destination repository already has is not read
///   from the source (the destination only accepts complete manifests, so its blobs
///   and children are there); only its referrers are looked up, so that new
///   signatures are picked up by a second promotion. A blob already linked in the
///   destination repository is skipped. A repeated promotion writes nothing.
/// - **Mount where storage is shared, stream otherwise**: a blob the destination's own
///   metadata says it already holds (in the source repository when both registries
///   share storage, or in any repository of the destination) is mounted: linked in one
///   atomic change of the destination's metadata, without reading the bytes. Otherwise
///   the bytes stream from the source's `get_blob` into the destination's `put_blob`,
///   one chunk at a time (constant memory whatever the blob's size); the destination
///   hashes them and refuses them unless they match the digest.
/// - **Errors** are typed ([`PromoteError`]); the destination's refusals are passed
///   through unchanged.
pub async fn promote(
    from: &Registry,
    from_repo: &RepoName,
    digest: &Digest,
    to: &Registry,
    to_repo: &RepoName,
    options: &PromoteOptions,
) -> Result<PromoteReport, PromoteError> {
    let mut run = Promotion {
        from,
        from_repo,
        to,
        to_repo,
        referrers: options.referrers,
        shared: same_storage(from, to),
        manifests_seen: HashSet::new(),
        blobs_seen: HashSet::new(),
        report: PromoteReport::default(),
    };
    run.report.shared_storage = run.shared;
    run.copy_graph(digest).await?;
    if let Some(tag) = &options.tag {
        run.tag_root(tag, digest).await?;
        run.report.tagged = Some(tag.clone());
    }
    Ok(run.report)
}

/// How a manifest was reached, to name what needed it when it is missing.
#[derive(Debug, Clone)]
enum Via {
    Root,
    /// A child of this index.
    Child(Digest),
    /// A referrer of this subject.
    Referrer(Digest),
}

/// A manifest read from the source, waiting for its children to be copied first.
struct Fetched {
    digest: Digest,
    media_type: String,
    bytes: bytes::Bytes,
    blobs: Vec<Digest>,
}

/// What [`Promotion::visit`] decided for one manifest.
struct Visited {
    /// The manifest to put, when the destination does not have it yet.
    put: Option<Fetched>,
    /// Its children, to visit before it is put.
    children: Vec<Digest>,
}

/// One unit of work. The walk keeps an explicit stack rather than recursing, so a deep
/// chain of referrers (a signature of an attestation of a signature...) cannot exhaust
/// the call stack, and only the manifests on the current path of index children are
/// held in memory.
enum Step {
    /// Decide what to do with a manifest.
    Visit { digest: Digest, via: Via },
    /// Copy a fetched manifest's blobs and put it (its children are done by now).
    Put(Fetched),
    /// List one page of a manifest's referrers in the source.
    Referrers {
        subject: Digest,
        last: Option<String>,
    },
}

struct Promotion<'a> {
    from: &'a Registry,
    from_repo: &'a RepoName,
    to: &'a Registry,
    to_repo: &'a RepoName,
    referrers: bool,
    shared: bool,
    /// Manifests already handled (or in progress): an index child shared by two
    /// parents, or a manifest both a child and a referrer, is handled once.
    manifests_seen: HashSet<Digest>,
    /// Blobs already handled: a layer shared by two children is transferred once.
    blobs_seen: HashSet<Digest>,
    report: PromoteReport,
}

impl Promotion<'_> {
    async fn copy_graph(&mut self, root: &Digest) -> Result<(), PromoteError> {
        let mut stack = vec![Step::Visit {
            digest: root.clone(),
            via: Via::Root,
        }];
        // Referrer listings wait until the stack is empty, that is until every manifest
        // visited so far is in the destination. Then a manifest met again is always
        // finished, never half-way: a referrer may well list, as an index child, the
        // image it refers to (or that image's index), and must be put after it.
        let mut referrers: VecDeque<(Digest, Option<String>)> = VecDeque::new();
        loop {
            // The stack is last-in first-out: what must happen after something else is
            // pushed before it.
            let step = match stack.pop() {
                Some(step) => step,
                None => match referrers.pop_front() {
                    Some((subject, last)) => Step::Referrers { subject, last },
                    None => return Ok(()),
                },
            };
            match step {
                Step::Visit { digest, via } => {
                    if !self.manifests_seen.insert(digest.clone()) {
                        continue;
                    }
                    let visit = self.visit(&digest, via).await?;
                    if self.referrers {
                        referrers.push_back((digest.clone(), None));
                    }
                    if let Some(fetched) = visit.put {
                        stack.push(Step::Put(fetched));
                    }
                    // Children run before their parent's put.
                    for child in visit.children.into_iter().rev() {
                        stack.push(Step::Visit {
                            digest: child,
                            via: Via::Child(digest.clone()),
                        });
                    }
                }
                Step::Put(fetched) => self.put(fetched).await?,
                Step::Referrers { subject, last } => {
                    let page = self
                        .from
                        .referrers(
                            self.from_repo,
                            &subject,
                            None,
                            &ListOptions {
                                n: Some(REFERRER_PAGE),
                                last,
                            },
                        )
                        .await
                        .map_err(|error| PromoteError::Source {
                            digest: subject.clone(),
                            error,
                        })?;
                    if page.next.is_some() {
                        referrers.push_front((subject.clone(), page.next));
                    }
                    for r in page.items.into_iter().rev() {
                        stack.push(Step::Visit {
                            digest: r.digest,
                            via: Via::Referrer(subject.clone()),
                        });
                    }
                }
            }
        }
    }

    /// Looks a manifest up in the destination, else fetches it from the source. Returns
    /// the manifest to put (if it must be copied) and its children to visit first.
    async fn visit(&mut self, digest: &Digest, via: Via) -> Result<Visited, PromoteError> {
        let present = self
            .to
            .inner
            .meta
            .manifest(self.to_repo, digest)
            .await
            .map_err(|error| self.dest_error(digest, error))?;
        if let Some(record) = present {
            // Complete by the destination's invariant 2: its blobs and children are
            // there. Children are still visited, for their referrers.
            self.report.manifests_skipped += 1;
            for blob in record.blobs {
                if self.blobs_seen.insert(blob) {
                    self.report.blobs_skipped += 1;
                }
            }
            return Ok(Visited {
                put: None,
                children: record.children,
            });
        }
        let manifest = match self
            .from
            .get_manifest(self.from_repo, &Reference::Digest(digest.clone()))
            .await
        {
            Ok(m) => m,
            // Also for a referrer deleted from the source since it was listed: failing
            // is safer than promoting without a signature nobody meant to drop, and a
            // retry no longer lists it.
            Err(Error::ManifestUnknown { .. }) => {
                return Err(PromoteError::SourceManifestMissing {
                    repo: self.from_repo.clone(),
                    digest: digest.clone(),
                    referenced_by: match via {
                        Via::Child(parent) | Via::Referrer(parent) => Some(parent),
                        Via::Root => None,
                    },
                });
            }
            Err(error) => {
                return Err(PromoteError::Source {
                    digest: digest.clone(),
                    error,
                });
            }
        };
        let info =
            ManifestInfo::inspect(&manifest.meta.media_type, &manifest.bytes).map_err(|error| {
                PromoteError::Source {
                    digest: digest.clone(),
                    error,
                }
            })?;
        let fetched = Fetched {
            digest: digest.clone(),
            media_type: manifest.meta.media_type,
            bytes: manifest.bytes,
            blobs: info.blob_references(),
        };
        Ok(Visited {
            put: Some(fetched),
            children: info.manifest_references(),
        })
    }

    async fn put(&mut self, m: Fetched) -> Result<(), PromoteError> {
        for blob in &m.blobs {
            self.blob(blob, &m.digest).await?;
        }
        self.to
            .put_manifest(
                self.to_repo,
                &Reference::Digest(m.digest.clone()),
                &m.media_type,
                m.bytes,
                PutManifestOptions::default(),
            )
            .await
            .map_err(|error| self.dest_error(&m.digest, error))?;
        self.report.manifests_copied += 1;
        Ok(())
    }

    /// Makes blob `digest` (referenced by `manifest`) present in the destination
    /// repository: skip, mount, or stream, in that order of preference.
    async fn blob(&mut self, digest: &Digest, manifest: &Digest) -> Result<(), PromoteError> {
        if !self.blobs_seen.insert(digest.clone()) {
            return Ok(());
        }
        let to = self.to;
        let dest = |error| PromoteError::Destination {
            digest: digest.clone(),
            error,
        };
        if to
            .inner
            .meta
            .blob_link(self.to_repo, digest)
            .await
            .map_err(dest)?
            .is_some()
        {
            // A stat as a client's HEAD would do: it refreshes the link's protection, so
            // an unreferenced link cannot be collected before the manifest referencing
            // it is put. The link can vanish between the two reads; then transfer.
            match to.stat_blob(self.to_repo, digest).await {
                Ok(_) => {
                    self.report.blobs_skipped += 1;
                    return Ok(());
                }
                Err(Error::BlobUnknown { .. }) => {}
                Err(error) => return Err(dest(error)),
            }
        }
        // Mounts go through the destination's own metadata, which links the blob only
        // if, in the same atomic change, one of its repositories links it: that proves
        // the destination's blob store holds bytes verified against this digest, and
        // the new link is counted by the destination's collector. So a mount is sound
        // whatever the storage layout; `shared` only saves the search for a holder.
        if self.shared
            && to
                .mount_blob(self.to_repo, digest, Some(self.from_repo), &AllowAll)
                .await
                .map_err(dest)?
        {
            self.report.blobs_mounted += 1;
            return Ok(());
        }
        // Any repository of the destination will do: the caller holds the bytes (it can
        // read them from the source), so linking the destination's copy reveals
        // nothing, and it saves a transfer of, say, a base layer production already has.
        if to
            .mount_blob(self.to_repo, digest, None, &AllowAll)
            .await
            .map_err(dest)?
        {
            self.report.blobs_mounted += 1;
            return Ok(());
        }
        let size = self.stream_blob(digest, manifest).await?;
        self.report.blobs_streamed += 1;
        self.report.bytes_streamed += size;
        Ok(())
    }

    /// Streams a blob's bytes from the source into the destination; returns its size.
    async fn stream_blob(&self, digest: &Digest, manifest: &Digest) -> Result<u64, PromoteError> {
        let body = match self.from.get_blob(self.from_repo, digest, None).await {
            Ok(body) => body,
            Err(Error::BlobUnknown { .. }) => {
                return Err(PromoteError::SourceBlobMissing {
                    repo: self.from_repo.clone(),
                    digest: digest.clone(),
                    referenced_by: manifest.clone(),
                });
            }
            Err(error) => {
                return Err(PromoteError::Source {
                    digest: digest.clone(),
                    error,
                });
            }
        };
        let failure = SourceFailure::default();
        let stream = watch_source(body.stream, body.size, failure.clone());
        let result = self
            .to
            .put_blob(self.to_repo, digest, Some(body.size), stream)
            .await;
        // The destination only sees an I/O error when the source stream fails; the
        // recorded failure says whose fault it was.
        if let Some(error) = failure.take() {
            return Err(PromoteError::Source {
                digest: digest.clone(),
                error,
            });
        }
        match result {
            Ok(info) => Ok(info.size),
            // We passed the source's bytes under the source's digest, so a mismatch
            // means the source served bytes that are not what it recorded (possible
            // when it does not verify reads).
            Err(error @ Error::DigestMismatch { .. }) => Err(PromoteError::Source {
                digest: digest.clone(),
                error,
            }),
            Err(error) => Err(PromoteError::Destination {
                digest: digest.clone(),
                error,
            }),
        }
    }

    async fn tag_root(&self, tag: &Tag, root: &Digest) -> Result<(), PromoteError> {
        let current = self
            .to
            .inner
            .meta
            .tag(self.to_repo, tag)
            .await
            .map_err(|error| self.dest_error(root, error))?;
        // A repeated promotion writes nothing, not even an unchanged tag.
        if current.as_ref() == Some(root) {
            return Ok(());
        }
        self.to
            .tag_manifest(self.to_repo, tag, root)
            .await
            .map_err(|error| self.dest_error(root, error))
    }

    fn dest_error(&self, digest: &Digest, error: Error) -> PromoteError {
        PromoteError::Destination {
            digest: digest.clone(),
            error,
        }
    }
}

/// The first failure of a source stream, kept aside so that it can be reported as the
/// source's even though the destination is the one that sees the stream fail.
#[derive(Clone, Default)]
struct SourceFailure(Arc<Mutex<Option<Error>>>);

impl SourceFailure {
    fn set(&self, e: Error) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }

    fn take(&self) -> Option<Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Passes a source stream through chunk by chunk (nothing is buffered), recording a
/// failure of the source, including a stream that ends longer or shorter than the size
/// the source reported.
fn watch_source(inner: ByteStream, size: u64, failure: SourceFailure) -> ByteStream {
    futures::stream::unfold((inner, 0u64, false), move |(mut inner, seen, done)| {
        let failure = failure.clone();
        async move {
            if done {
                return None;
            }
            let io_error = |e: Error| {
                let out = std::io::Error::other(e.to_string());
                failure.set(e);
                out
            };
            match inner.next().await {
                Some(Ok(chunk)) => {
                    let seen = seen + chunk.len() as u64;
                    if seen > size {
                        let e = Error::SizeMismatch {
                            expected: size,
                            actual: seen,
                        };
                        return Some((Err(io_error(e)), (inner, seen, true)));
                    }
                    Some((Ok(chunk), (inner, seen, false)))
                }
                Some(Err(e)) => {
                    let kind = e.kind();
                    let msg = e.to_string();
                    failure.set(Error::storage(e));
                    Some((Err(std::io::Error::new(kind, msg)), (inner, seen, true)))
                }
                None if seen != size => {
                    let e = Error::SizeMismatch {
                        expected: size,
                        actual: seen,
                    };
                    Some((Err(io_error(e)), (inner, seen, true)))
                }
                None => None,
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;
    use futures::stream::BoxStream;

    use super::*;
    use crate::events::Event;
    use crate::manifest::media_type;
    use crate::memory::MemoryStore;
    use crate::store::{
        BlobRead, BlobStore, ByteRange, CommitOutcome, Storage, UploadId, UploadInfo,
    };
    use crate::testkit::{
        body, image_manifest_with, index_manifest, push_blob, read_blob, repo, tag, tag_ref,
    };
    use crate::time::Timestamp;

    /// Pushes a manifest by digest; returns its digest and size.
    async fn push_manifest(r: &Registry, repo: &RepoName, ct: &str, json: String) -> (Digest, u64) {
        let d = Digest::sha256(json.as_bytes());
        let size = json.len() as u64;
        r.put_manifest(
            repo,
            &Reference::Digest(d.clone()),
            ct,
            Bytes::from(json),
            PutManifestOptions::default(),
        )
        .await
        .expect("manifest push");
        (d, size)
    }

    /// Pushes an image manifest and its blobs.
    async fn push_image(
        r: &Registry,
        repo: &RepoName,
        config: &[u8],
        layers: &[&[u8]],
        subject: Option<&(Digest, u64)>,
        artifact_type: Option<&str>,
    ) -> (Digest, u64) {
        push_blob(r, repo, config).await;
        for l in layers {
            push_blob(r, repo, l).await;
        }
        let json =
            image_manifest_with(config, layers, subject.map(|(d, s)| (d, *s)), artifact_type);
        push_manifest(r, repo, media_type::OCI_MANIFEST, json).await
    }

    /// A two-platform image with a signature on the index, an SBOM on one child and a
    /// signature on that SBOM.
    struct MultiArch {
        index: (Digest, u64),
        amd64: (Digest, u64),
        arm64: (Digest, u64),
        index_signature: Digest,
        sbom: Digest,
        sbom_signature: Digest,
        /// Every blob, once each.
        blobs: Vec<Digest>,
        blob_bytes: u64,
    }

    impl MultiArch {
        fn manifests(&self) -> Vec<Digest> {
            vec![
                self.index.0.clone(),
                self.amd64.0.clone(),
                self.arm64.0.clone(),
                self.index_signature.clone(),
                self.sbom.clone(),
                self.sbom_signature.clone(),
            ]
        }
    }

    const BLOBS: [&[u8]; 9] = [
        b"base layer shared by both platforms",
        b"amd64 layer",
        b"arm64 layer!",
        br#"{"architecture":"amd64"}"#,
        br#"{"architecture":"arm64"}"#,
        b"{}",
        b"signature of the index",
        b"spdx document",
        b"signature of the sbom",
    ];

    async fn push_multi_arch(r: &Registry, repo: &RepoName) -> MultiArch {
        let [
            base,
            amd64_layer,
            arm64_layer,
            amd64_cfg,
            arm64_cfg,
            empty,
            sig,
            sbom,
            sbom_sig,
        ] = BLOBS;
        let amd64 = push_image(r, repo, amd64_cfg, &[base, amd64_layer], None, None).await;
        let arm64 = push_image(r, repo, arm64_cfg, &[base, arm64_layer], None, None).await;
        let index_json = index_manifest(&[(&amd64.0, amd64.1), (&arm64.0, arm64.1)]);
        let index = push_manifest(r, repo, media_type::OCI_INDEX, index_json).await;
        let signature_type = Some("application/vnd.example.signature");
        let index_signature =
            push_image(r, repo, empty, &[sig], Some(&index), signature_type).await;
        let sbom = push_image(
            r,
            repo,
            empty,
            &[sbom],
            Some(&amd64),
            Some("application/spdx+json"),
        )
        .await;
        let sbom_signature =
            push_image(r, repo, empty, &[sbom_sig], Some(&sbom), signature_type).await;
        MultiArch {
            index,
            amd64,
            arm64,
            index_signature: index_signature.0,
            sbom: sbom.0,
            sbom_signature: sbom_signature.0,
            blobs: BLOBS.iter().map(|b| Digest::sha256(b)).collect(),
            blob_bytes: BLOBS.iter().map(|b| b.len() as u64).sum(),
        }
    }

    /// Every manifest and blob reads back from the destination byte for byte as from
    /// the source (reads are verified against their digests on both sides).
    async fn assert_same_content(
        from: &Registry,
        from_repo: &RepoName,
        to: &Registry,
        to_repo: &RepoName,
        manifests: &[Digest],
        blobs: &[Digest],
    ) {
        for m in manifests {
            let r = Reference::Digest(m.clone());
            let a = from
                .get_manifest(from_repo, &r)
                .await
                .expect("source manifest");
            let b = to.get_manifest(to_repo, &r).await.expect("copied manifest");
            assert_eq!(a, b, "manifest {m}");
        }
        for d in blobs {
            let a = read_blob(from, from_repo, d).await.expect("source blob");
            let b = read_blob(to, to_repo, d).await.expect("copied blob");
            assert_eq!(a, b, "blob {d}");
        }
    }

    async fn referrer_digests(r: &Registry, repo: &RepoName, subject: &Digest) -> Vec<Digest> {
        let page = r
            .referrers(repo, subject, None, &ListOptions::default())
            .await
            .expect("referrers");
        page.items.into_iter().map(|d| d.digest).collect()
    }

    fn drain(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(e) = events.try_recv() {
            out.push(e);
        }
        out
    }

    #[tokio::test]
    async fn single_arch_image_is_streamed_and_tagged() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let (config, layers): (&[u8], [&[u8]; 2]) =
            (b"{\"os\":\"linux\"}", [b"layer one", b"layer two"]);
        let (image, _) = push_image(&ci, &src, config, &layers, None, None).await;

        let options = PromoteOptions::default().with_tag(tag("v1"));
        let report = promote(&ci, &src, &image, &prod, &dst, &options)
            .await
            .unwrap();

        let bytes = (config.len() + layers[0].len() + layers[1].len()) as u64;
        assert_eq!(
            report,
            PromoteReport {
                manifests_copied: 1,
                blobs_streamed: 3,
                bytes_streamed: bytes,
                tagged: Some(tag("v1")),
                ..PromoteReport::default()
            }
        );
        let tagged = prod.stat_manifest(&dst, &tag_ref("v1")).await.unwrap();
        assert_eq!(tagged.digest, image);
        let blobs: Vec<Digest> = [config, layers[0], layers[1]]
            .iter()
            .map(|b| Digest::sha256(b))
            .collect();
        assert_same_content(&ci, &src, &prod, &dst, &[image], &blobs).await;
    }

    #[tokio::test]
    async fn multi_arch_index_children_and_referrers_are_copied() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let img = push_multi_arch(&ci, &src).await;

        let options = PromoteOptions::default().with_tag(tag("stable"));
        let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap();

        // The shared base layer and the referrers' shared empty config go over once.
        assert_eq!(
            report,
            PromoteReport {
                manifests_copied: 6,
                blobs_streamed: 9,
                bytes_streamed: img.blob_bytes,
                tagged: Some(tag("stable")),
                ..PromoteReport::default()
            }
        );
        assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;
        // The destination indexed the referrers under their subjects.
        assert_eq!(
            referrer_digests(&prod, &dst, &img.index.0).await,
            vec![img.index_signature.clone()]
        );
        assert_eq!(
            referrer_digests(&prod, &dst, &img.amd64.0).await,
            vec![img.sbom.clone()]
        );
        assert_eq!(
            referrer_digests(&prod, &dst, &img.sbom).await,
            vec![img.sbom_signature.clone()]
        );
        assert!(referrer_digests(&prod, &dst, &img.arm64.0).await.is_empty());
        let tagged = prod.stat_manifest(&dst, &tag_ref("stable")).await.unwrap();
        assert_eq!(tagged.digest, img.index.0);
    }

    #[tokio::test]
    async fn referrers_can_be_left_behind() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let img = push_multi_arch(&ci, &src).await;

        let options = PromoteOptions::default().with_referrers(false);
        let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap();

        assert_eq!((report.manifests_copied, report.blobs_streamed), (3, 5));
        for referrer in [&img.index_signature, &img.sbom, &img.sbom_signature] {
            let missing = prod
                .stat_manifest(&dst, &Reference::Digest(referrer.clone()))
                .await;
            assert!(
                matches!(missing, Err(Error::ManifestUnknown { .. })),
                "{referrer}"
            );
        }
        assert!(referrer_digests(&prod, &dst, &img.index.0).await.is_empty());
        // A later promotion with referrers adds just them.
        let report = promote(
            &ci,
            &src,
            &img.index.0,
            &prod,
            &dst,
            &PromoteOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            (
                report.manifests_copied,
                report.manifests_skipped,
                report.blobs_streamed
            ),
            (3, 3, 4)
        );
        assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;
    }

    #[tokio::test]
    async fn a_referrer_listing_the_promoted_index_is_put_after_it() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let img = push_multi_arch(&ci, &src).await;
        // A referrer of a child that is itself an index listing the whole image (as an
        // attestation bundle might): it can only be put once the image's index is in.
        let bundle_json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"application/vnd.example.bundle","manifests":[{{"mediaType":"{}","digest":"{}","size":{}}}],"subject":{{"mediaType":"{}","digest":"{}","size":{}}}}}"#,
            media_type::OCI_INDEX,
            media_type::OCI_INDEX,
            img.index.0,
            img.index.1,
            media_type::OCI_MANIFEST,
            img.arm64.0,
            img.arm64.1,
        );
        let (bundle, _) = push_manifest(&ci, &src, media_type::OCI_INDEX, bundle_json).await;

        let options = PromoteOptions::default().with_tag(tag("v1"));
        let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap();

        assert_eq!(report.manifests_copied, 7);
        let mut all = img.manifests();
        all.push(bundle.clone());
        assert_same_content(&ci, &src, &prod, &dst, &all, &img.blobs).await;
        assert_eq!(
            referrer_digests(&prod, &dst, &img.arm64.0).await,
            vec![bundle]
        );
    }

    #[tokio::test]
    async fn referrers_beyond_one_page_are_all_copied() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let image = push_image(&ci, &src, b"{}", &[b"layer"], None, None).await;
        let count = 2 * REFERRER_PAGE + 1;
        let mut expected = Vec::new();
        for i in 0..count {
            let sig = format!("signature {i}");
            let (d, _) = push_image(
                &ci,
                &src,
                b"{}",
                &[sig.as_bytes()],
                Some(&image),
                Some("application/vnd.example.signature"),
            )
            .await;
            expected.push(d);
        }
        expected.sort();

        let report = promote(&ci, &src, &image.0, &prod, &dst, &PromoteOptions::default())
            .await
            .unwrap();

        assert_eq!(report.manifests_copied, 1 + count as u64);
        let listed = prod
            .referrers(
                &dst,
                &image.0,
                None,
                &ListOptions {
                    n: Some(count + 1),
                    last: None,
                },
            )
            .await
            .unwrap();
        let listed: Vec<Digest> = listed.items.into_iter().map(|d| d.digest).collect();
        assert_eq!(listed, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_promotions_of_one_image_both_succeed() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let img = push_multi_arch(&ci, &src).await;
        let options = PromoteOptions::default().with_tag(tag("v1"));

        let (a, b) = tokio::join!(
            promote(&ci, &src, &img.index.0, &prod, &dst, &options),
            promote(&ci, &src, &img.index.0, &prod, &dst, &options),
        );

        let (a, b) = (a.unwrap(), b.unwrap());
        // Between them every manifest was put at least once; each saw all six.
        for r in [&a, &b] {
            assert_eq!(r.manifests_copied + r.manifests_skipped, 6, "{r:?}");
        }
        assert!(a.manifests_copied + b.manifests_copied >= 6);
        assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;
        let tagged = prod.stat_manifest(&dst, &tag_ref("v1")).await.unwrap();
        assert_eq!(tagged.digest, img.index.0);
        let audit = prod.storage().metadata.audit(false).await.unwrap();
        assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    }

    #[tokio::test]
    async fn artifact_manifest_blobs_are_copied() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/chart"), repo("prod/chart"));
        let (image, image_size) = push_image(
            &ci,
            &src,
            b"{\"os\":\"linux\"}",
            &[b"the layer"],
            None,
            None,
        )
        .await;
        // An artifact manifest lists plain blobs (no config, no layers) and refers to the
        // image; none of its blobs is referenced by anything else.
        let data: [&[u8]; 2] = [b"provenance statement", b"a detached signature"];
        for b in data {
            push_blob(&ci, &src, b).await;
        }
        let artifact_json = format!(
            r#"{{"mediaType":"{}","artifactType":"application/vnd.example.provenance","blobs":[{},{}],"subject":{{"mediaType":"{}","digest":"{image}","size":{image_size}}}}}"#,
            media_type::OCI_ARTIFACT_MANIFEST,
            format_args!(
                r#"{{"mediaType":"application/vnd.example.statement","digest":"{}","size":{}}}"#,
                Digest::sha256(data[0]),
                data[0].len()
            ),
            format_args!(
                r#"{{"mediaType":"application/vnd.example.sig","digest":"{}","size":{}}}"#,
                Digest::sha256(data[1]),
                data[1].len()
            ),
            media_type::OCI_MANIFEST,
        );
        let (artifact, _) =
            push_manifest(&ci, &src, media_type::OCI_ARTIFACT_MANIFEST, artifact_json).await;

        let report = promote(&ci, &src, &image, &prod, &dst, &PromoteOptions::default())
            .await
            .unwrap();

        assert_eq!((report.manifests_copied, report.blobs_streamed), (2, 4));
        let data_digests: Vec<Digest> = data.iter().map(|b| Digest::sha256(b)).collect();
        assert_same_content(
            &ci,
            &src,
            &prod,
            &dst,
            &[image.clone(), artifact.clone()],
            &data_digests,
        )
        .await;
        assert_eq!(
            referrer_digests(&prod, &dst, &image).await,
            vec![artifact.clone()]
        );

        // The artifact can be promoted on its own, too.
        let other = repo("prod/provenance");
        let report = promote(
            &ci,
            &src,
            &artifact,
            &prod,
            &other,
            &PromoteOptions::default(),
        )
        .await
        .unwrap();
        // Its blobs are already in the destination (in prod/chart): mounted, not streamed.
        assert_eq!(
            (
                report.manifests_copied,
                report.blobs_mounted,
                report.blobs_streamed
            ),
            (1, 2, 0)
        );
        assert_same_content(&ci, &src, &prod, &other, &[artifact], &data_digests).await;
    }

    #[tokio::test]
    async fn second_promotion_skips_everything_and_changes_nothing() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let img = push_multi_arch(&ci, &src).await;
        let options = PromoteOptions::default().with_tag(tag("v2"));
        promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap();
        let stats_before = prod.storage().metadata.stats().await.unwrap();
        let mut events = prod.subscribe();

        let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap();

        assert_eq!(
            report,
            PromoteReport {
                manifests_skipped: 6,
                blobs_skipped: 9,
                tagged: Some(tag("v2")),
                ..PromoteReport::default()
            }
        );
        assert_eq!(
            drain(&mut events),
            Vec::new(),
            "a repeated promotion changes nothing"
        );
        assert_eq!(prod.storage().metadata.stats().await.unwrap(), stats_before);
    }

    #[tokio::test]
    async fn shared_storage_mounts_and_separate_storage_streams() {
        let storage = MemoryStore::new().into_storage();
        let ci = Registry::builder(storage.clone()).build();
        let prod = Registry::builder(storage.clone()).build();
        let separate = Registry::in_memory();
        assert!(same_storage(&ci, &prod));
        assert!(!same_storage(&ci, &separate));
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let img = push_multi_arch(&ci, &src).await;
        let mut events = prod.subscribe();

        let options = PromoteOptions::default().with_tag(tag("v1"));
        let shared = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap();

        assert_eq!(
            shared,
            PromoteReport {
                manifests_copied: 6,
                blobs_mounted: 9,
                shared_storage: true,
                tagged: Some(tag("v1")),
                ..PromoteReport::default()
            }
        );
        let mounted_from_source = drain(&mut events)
            .into_iter()
            .filter(|e| matches!(e, Event::BlobMounted { from, .. } if from == &src))
            .count();
        assert_eq!(mounted_from_source, 9);
        assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;

        let streamed = promote(&ci, &src, &img.index.0, &separate, &dst, &options)
            .await
            .unwrap();
        assert_eq!((streamed.blobs_mounted, streamed.blobs_streamed), (0, 9));
        assert_eq!(streamed.bytes_streamed, img.blob_bytes);
        assert!(!streamed.shared_storage);
        assert_same_content(&ci, &src, &separate, &dst, &img.manifests(), &img.blobs).await;
    }

    #[tokio::test]
    async fn sharing_only_the_blob_store_is_not_shared_storage() {
        let a = MemoryStore::new().into_storage();
        let b = MemoryStore::new().into_storage();
        let ci = Registry::builder(a.clone()).build();
        // Same bytes, separate metadata: the destination's collector would not count
        // links held in the source's metadata, so nothing may be linked across.
        let prod = Registry::builder(Storage {
            blobs: a.blobs.clone(),
            metadata: b.metadata.clone(),
        })
        .build();
        assert!(!same_storage(&ci, &prod));
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let (image, _) = push_image(&ci, &src, b"{}", &[b"only layer"], None, None).await;

        let report = promote(&ci, &src, &image, &prod, &dst, &PromoteOptions::default())
            .await
            .unwrap();

        assert_eq!((report.blobs_mounted, report.blobs_streamed), (0, 2));
        assert!(!report.shared_storage);
        // The destination's own metadata now records the blobs.
        assert!(
            prod.storage()
                .metadata
                .blob_link(&dst, &Digest::sha256(b"only layer"))
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn blobs_the_destination_holds_elsewhere_are_mounted() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let base: &[u8] = b"a base layer production already has";
        push_blob(&prod, &repo("prod/base"), base).await;
        let (image, _) = push_image(&ci, &src, b"{}", &[base, b"app layer"], None, None).await;

        let report = promote(&ci, &src, &image, &prod, &dst, &PromoteOptions::default())
            .await
            .unwrap();

        assert_eq!((report.blobs_mounted, report.blobs_streamed), (1, 2));
        assert_eq!(report.bytes_streamed, (2 + b"app layer".len()) as u64);
        let blobs = [Digest::sha256(base), Digest::sha256(b"app layer")];
        assert_same_content(&ci, &src, &prod, &dst, &[image], &blobs).await;
    }

    #[tokio::test]
    async fn missing_source_blob_fails_typed_without_tagging_and_a_retry_resumes() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let img = push_multi_arch(&ci, &src).await;
        // Production's tag points at an older release; a failed promotion leaves it.
        let (old, _) = push_image(&prod, &dst, b"{}", &[b"old release"], None, None).await;
        prod.tag_manifest(&dst, &tag("stable"), &old).await.unwrap();
        // The source lost the bytes of the arm64 layer.
        let lost: &[u8] = BLOBS[2];
        let lost_digest = Digest::sha256(lost);
        assert!(ci.storage().blobs.delete(&lost_digest).await.unwrap());

        let options = PromoteOptions::default().with_tag(tag("stable"));
        let err = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap_err();

        match &err {
            PromoteError::SourceBlobMissing {
                repo,
                digest,
                referenced_by,
            } => {
                assert_eq!(
                    (repo, digest, referenced_by),
                    (&src, &lost_digest, &img.arm64.0)
                );
            }
            other => panic!("expected SourceBlobMissing, got {other:?}"),
        }
        assert!(err.to_string().contains(lost_digest.as_str()), "{err}");
        assert_eq!(
            prod.stat_manifest(&dst, &tag_ref("stable"))
                .await
                .unwrap()
                .digest,
            old
        );
        let index = prod
            .stat_manifest(&dst, &Reference::Digest(img.index.0.clone()))
            .await;
        assert!(matches!(index, Err(Error::ManifestUnknown { .. })));

        // Once the source has the bytes again, a retry finishes, reusing what was copied.
        push_blob(&ci, &src, lost).await;
        let report = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap();
        assert_eq!(report.manifests_copied + report.manifests_skipped, 6);
        assert_eq!(report.blobs_streamed + report.blobs_skipped, 9);
        assert_eq!(
            prod.stat_manifest(&dst, &tag_ref("stable"))
                .await
                .unwrap()
                .digest,
            img.index.0
        );
        assert_same_content(&ci, &src, &prod, &dst, &img.manifests(), &img.blobs).await;
    }

    #[tokio::test]
    async fn failure_after_the_root_is_copied_still_leaves_it_untagged() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let img = push_multi_arch(&ci, &src).await;
        // The index's signature is copied after the index itself (subject first).
        let lost = Digest::sha256(BLOBS[6]);
        assert!(ci.storage().blobs.delete(&lost).await.unwrap());

        let options = PromoteOptions::default().with_tag(tag("stable"));
        let err = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap_err();

        assert!(
            matches!(&err, PromoteError::SourceBlobMissing { digest, referenced_by, .. }
                if digest == &lost && referenced_by == &img.index_signature),
            "{err:?}"
        );
        // The index made it into the destination, but by digest only.
        let root = Reference::Digest(img.index.0.clone());
        assert!(prod.stat_manifest(&dst, &root).await.is_ok());
        assert!(matches!(
            prod.stat_manifest(&dst, &tag_ref("stable")).await,
            Err(Error::ManifestUnknown { .. })
        ));
    }

    #[tokio::test]
    async fn a_referrer_the_source_cannot_serve_fails_the_promotion() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let img = push_multi_arch(&ci, &src).await;
        // The source still lists the signature but lost its bytes: promoting without it
        // would silently drop a signature, so the promotion fails and names it.
        assert!(
            ci.storage()
                .blobs
                .delete(&img.index_signature)
                .await
                .unwrap()
        );

        let options = PromoteOptions::default().with_tag(tag("v1"));
        let err = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap_err();

        assert!(
            matches!(&err, PromoteError::SourceManifestMissing { digest, referenced_by: Some(s), .. }
                if digest == &img.index_signature && s == &img.index.0),
            "{err:?}"
        );
        assert!(prod.stat_manifest(&dst, &tag_ref("v1")).await.is_err());
    }

    #[tokio::test]
    async fn missing_source_manifests_are_typed_errors() {
        let (ci, prod) = (Registry::in_memory(), Registry::in_memory());
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let unknown = Digest::sha256(b"never pushed");
        let options = PromoteOptions::default().with_tag(tag("v1"));
        let err = promote(&ci, &src, &unknown, &prod, &dst, &options)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PromoteError::SourceManifestMissing { digest, referenced_by: None, .. } if digest == &unknown),
            "{err:?}"
        );
        assert!(matches!(Error::from(err), Error::ManifestUnknown { .. }));
        assert!(matches!(
            prod.list_tags(&dst, &ListOptions::default()).await,
            Err(Error::NameUnknown { .. })
        ));

        // An index child whose bytes the source lost is named with the index listing it.
        let img = push_multi_arch(&ci, &src).await;
        assert!(ci.storage().blobs.delete(&img.amd64.0).await.unwrap());
        let err = promote(&ci, &src, &img.index.0, &prod, &dst, &options)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PromoteError::SourceManifestMissing { digest, referenced_by: Some(p), .. }
                if digest == &img.amd64.0 && p == &img.index.0),
            "{err:?}"
        );
        assert!(prod.stat_manifest(&dst, &tag_ref("v1")).await.is_err());
    }

    #[tokio::test]
    async fn destination_refusal_is_passed_through_unchanged() {
        let ci = Registry::in_memory();
        let prod = Registry::builder(MemoryStore::new())
            .with_max_blob_size(16)
            .build();
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        let (old, _) = push_image(&prod, &dst, b"{}", &[b"small"], None, None).await;
        prod.tag_manifest(&dst, &tag("v1"), &old).await.unwrap();
        let big: &[u8] = b"a layer longer than sixteen bytes";
        let (image, _) = push_image(&ci, &src, b"{}", &[big], None, None).await;

        let options = PromoteOptions::default().with_tag(tag("v1"));
        let err = promote(&ci, &src, &image, &prod, &dst, &options)
            .await
            .unwrap_err();

        assert!(
            matches!(
                err.destination_error(),
                Some(Error::TooLarge {
                    what: "blob",
                    limit: 16
                })
            ),
            "{err:?}"
        );
        assert!(
            matches!(&err, PromoteError::Destination { digest, .. } if digest == &Digest::sha256(big))
        );
        assert!(matches!(Error::from(err), Error::TooLarge { .. }));
        assert_eq!(
            prod.stat_manifest(&dst, &tag_ref("v1"))
                .await
                .unwrap()
                .digest,
            old
        );
        assert!(
            prod.stat_manifest(&dst, &Reference::Digest(image))
                .await
                .is_err()
        );
    }

    /// Replaces the stored bytes of `digest` with `bytes` (same length) behind the
    /// registry's back, as disk corruption would.
    async fn corrupt(storage: &Storage, src: &RepoName, digest: &Digest, bytes: &[u8]) {
        let blobs = &storage.blobs;
        assert!(blobs.delete(digest).await.unwrap());
        let id = UploadId::random();
        blobs.create_upload(&id, src, Timestamp(0)).await.unwrap();
        blobs
            .append_upload(&id, 0, body(&[bytes]), Timestamp(0))
            .await
            .unwrap();
        blobs
            .commit_upload(&id, digest, bytes.len() as u64)
            .await
            .unwrap();
        blobs.delete_upload(&id).await.unwrap();
    }

    #[tokio::test]
    async fn corrupt_source_bytes_are_a_source_error_whether_or_not_the_source_verifies() {
        for verify_reads in [true, false] {
            let storage = MemoryStore::new().into_storage();
            let ci = Registry::builder(storage.clone())
                .with_verify_reads(verify_reads)
                .build();
            let prod = Registry::in_memory();
            let (src, dst) = (repo("ci/app"), repo("prod/app"));
            let layer: &[u8] = b"the genuine layer";
            let (image, _) = push_image(&ci, &src, b"{}", &[layer], None, None).await;
            let layer_digest = Digest::sha256(layer);
            corrupt(&storage, &src, &layer_digest, b"a tampered layer!").await;

            let options = PromoteOptions::default().with_tag(tag("v1"));
            let err = promote(&ci, &src, &image, &prod, &dst, &options)
                .await
                .unwrap_err();

            assert!(
                matches!(&err, PromoteError::Source { digest, .. } if digest == &layer_digest),
                "verify_reads {verify_reads}: {err:?}"
            );
            assert!(prod.stat_blob(&dst, &layer_digest).await.is_err());
            assert!(prod.stat_manifest(&dst, &tag_ref("v1")).await.is_err());
        }
    }

    /// Counts bytes read from one store and bytes consumed by another, to measure how
    /// far reading runs ahead of writing.
    #[derive(Default)]
    struct Flow {
        produced: AtomicU64,
        consumed: AtomicU64,
        max_ahead: AtomicU64,
    }

    /// A blob store that reports its reads and appends to a [`Flow`].
    struct Spy {
        inner: Arc<dyn BlobStore>,
        flow: Arc<Flow>,
    }

    #[async_trait]
    impl BlobStore for Spy {
        async fn stat(&self, digest: &Digest) -> crate::Result<Option<u64>> {
            self.inner.stat(digest).await
        }
        async fn read(
            &self,
            digest: &Digest,
            range: Option<ByteRange>,
        ) -> crate::Result<Option<BlobRead>> {
            let Some(mut read) = self.inner.read(digest, range).await? else {
                return Ok(None);
            };
            let flow = self.flow.clone();
            read.stream = read
                .stream
                .inspect(move |chunk| {
                    if let Ok(c) = chunk {
                        let produced = flow.produced.fetch_add(c.len() as u64, Ordering::SeqCst)
                            + c.len() as u64;
                        let ahead = produced - flow.consumed.load(Ordering::SeqCst);
                        flow.max_ahead.fetch_max(ahead, Ordering::SeqCst);
                    }
                })
                .boxed();
            Ok(Some(read))
        }
        async fn delete(&self, digest: &Digest) -> crate::Result<bool> {
            self.inner.delete(digest).await
        }
        async fn list(&self) -> crate::Result<BoxStream<'static, crate::Result<Digest>>> {
            self.inner.list().await
        }
        async fn create_upload(
            &self,
            id: &UploadId,
            repo: &RepoName,
            now: Timestamp,
        ) -> crate::Result<()> {
            self.inner.create_upload(id, repo, now).await
        }
        async fn upload_info(&self, id: &UploadId) -> crate::Result<Option<UploadInfo>> {
            self.inner.upload_info(id).await
        }
        async fn append_upload(
            &self,
            id: &UploadId,
            offset: u64,
            data: ByteStream,
            now: Timestamp,
        ) -> crate::Result<u64> {
            let flow = self.flow.clone();
            let data = data
                .inspect(move |chunk| {
                    if let Ok(c) = chunk {
                        flow.consumed.fetch_add(c.len() as u64, Ordering::SeqCst);
                    }
                })
                .boxed();
            self.inner.append_upload(id, offset, data, now).await
        }
        async fn read_upload(&self, id: &UploadId) -> crate::Result<ByteStream> {
            self.inner.read_upload(id).await
        }
        async fn commit_upload(
            &self,
            id: &UploadId,
            digest: &Digest,
            len: u64,
        ) -> crate::Result<CommitOutcome> {
            self.inner.commit_upload(id, digest, len).await
        }
        async fn delete_upload(&self, id: &UploadId) -> crate::Result<bool> {
            self.inner.delete_upload(id).await
        }
        async fn list_uploads(&self) -> crate::Result<Vec<UploadInfo>> {
            self.inner.list_uploads().await
        }
    }

    fn spied(flow: &Arc<Flow>) -> Storage {
        let s = MemoryStore::new().into_storage();
        Storage {
            blobs: Arc::new(Spy {
                inner: s.blobs,
                flow: flow.clone(),
            }),
            metadata: s.metadata,
        }
    }

    #[tokio::test]
    async fn blobs_stream_chunk_by_chunk_without_buffering() {
        let flow = Arc::new(Flow::default());
        let ci = Registry::builder(spied(&flow)).build();
        let prod = Registry::builder(spied(&flow)).build();
        let (src, dst) = (repo("ci/app"), repo("prod/app"));
        const CHUNK: usize = 64 * 1024;
        let chunks: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; CHUNK]).collect();
        let whole: Vec<u8> = chunks.concat();
        let layer = Digest::sha256(&whole);
        let parts: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        ci.put_blob(&src, &layer, Some(whole.len() as u64), body(&parts))
            .await
            .unwrap();
        push_blob(&ci, &src, b"{}").await;
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{}}}]}}"#,
            media_type::OCI_MANIFEST,
            Digest::sha256(b"{}"),
            whole.len()
        );
        let (image, manifest_size) = push_manifest(&ci, &src, media_type::OCI_MANIFEST, json).await;
        for counter in [&flow.produced, &flow.consumed, &flow.max_ahead] {
            counter.store(0, Ordering::SeqCst);
        }

        let report = promote(&ci, &src, &image, &prod, &dst, &PromoteOptions::default())
            .await
            .unwrap();

        assert_eq!(report.bytes_streamed, whole.len() as u64 + 2);
        // The destination received the blobs' bytes and the manifest's, nothing else.
        assert_eq!(
            flow.consumed.load(Ordering::SeqCst),
            whole.len() as u64 + 2 + manifest_size
        );
        // At most one chunk is read before the destination has taken the one before it:
        // memory per blob is one chunk, not the blob (4 MiB here). The manifest, read
        // first and put after its blobs, is the only other thing held.
        let ahead = flow.max_ahead.load(Ordering::SeqCst);
        assert!(
            ahead > manifest_size && ahead <= CHUNK as u64 + manifest_size,
            "read ran {ahead} bytes ahead"
        );
        assert_eq!(read_blob(&prod, &dst, &layer).await.unwrap(), whole);
    }
}
