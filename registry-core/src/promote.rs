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
use crate::endpoint::{ImageSink, ImageSource};
use crate::error::Error;
use crate::manifest::ManifestInfo;
use crate::names::{Reference, RepoName, Tag};
use crate::registry::{ListOptions, Registry};
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
    /// Listing the source repository's tags, or resolving one of them, failed (in
    /// [`sync`]).
    #[error("reading the tags of {repo} from the source failed{}: {error}", at_tag(.tag))]
    SourceTags {
        /// The source repository.
        repo: RepoName,
        /// The tag being resolved; `None` while listing.
        tag: Option<Tag>,
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

fn at_tag(tag: &Option<Tag>) -> String {
    tag.as_ref().map(|t| format!(" at {t}")).unwrap_or_default()
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
            PromoteError::Source { error, .. }
            | PromoteError::SourceTags { error, .. }
            | PromoteError::Destination { error, .. } => error,
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
    run(
        from,
        from_repo,
        digest,
        to,
        to_repo,
        options,
        same_storage(from, to),
    )
    .await
}

/// [`promote`] between any [`ImageSource`] and any [`ImageSink`]: a local [`Registry`]
/// or a remote registry on either side (the `registry-remote` crate's
/// `RemoteRegistry`), with the same order, idempotence and errors. Blobs are mounted
/// where the sink already holds them in another repository (a remote sink may decline),
/// and streamed otherwise.
pub async fn transfer(
    from: &dyn ImageSource,
    from_repo: &RepoName,
    digest: &Digest,
    to: &dyn ImageSink,
    to_repo: &RepoName,
    options: &PromoteOptions,
) -> Result<PromoteReport, PromoteError> {
    run(from, from_repo, digest, to, to_repo, options, false).await
}

async fn run(
    from: &dyn ImageSource,
    from_repo: &RepoName,
    digest: &Digest,
    to: &dyn ImageSink,
    to_repo: &RepoName,
    options: &PromoteOptions,
    shared: bool,
) -> Result<PromoteReport, PromoteError> {
    let mut run = Promotion {
        from,
        from_repo,
        to,
        to_repo,
        referrers: options.referrers,
        shared,
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

/// What [`sync`] did: one promotion report per tag copied.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// Tags whose image was copied (or found present) and tagged in the sink.
    pub tags: Vec<(Tag, Digest)>,
    /// The sum of the promotions' reports.
    pub totals: PromoteReport,
}

/// Copies every tag of `from_repo` (the image it points at, with everything the image
/// references and, unless turned off, its referrers) into `to_repo`, tag by tag, with
/// [`transfer`]. Tags are read one page at a time; a tag moved or deleted in the source
/// while the sync runs is copied as it was when listed, or reported missing. The first
/// failure stops the sync; what was copied before stays, and a second run skips it.
pub async fn sync(
    from: &dyn ImageSource,
    from_repo: &RepoName,
    to: &dyn ImageSink,
    to_repo: &RepoName,
    options: &PromoteOptions,
) -> Result<SyncReport, PromoteError> {
    let mut report = SyncReport::default();
    let mut last = None;
    loop {
        let page = from
            .list_tags(
                from_repo,
                &ListOptions {
                    n: Some(REFERRER_PAGE),
                    last: last.take(),
                },
            )
            .await
            .map_err(|error| PromoteError::SourceTags {
                repo: from_repo.clone(),
                tag: None,
                error,
            })?;
        for tag in page.items {
            let meta = from
                .stat_manifest(from_repo, &Reference::Tag(tag.clone()))
                .await
                .map_err(|error| PromoteError::SourceTags {
                    repo: from_repo.clone(),
                    tag: Some(tag.clone()),
                    error,
                })?;
            let options = options.clone().with_tag(tag.clone());
            let done = transfer(from, from_repo, &meta.digest, to, to_repo, &options).await?;
            report.totals.add(&done);
            report.tags.push((tag, meta.digest));
        }
        match page.next {
            Some(next) => last = Some(next),
            None => return Ok(report),
        }
    }
}

impl PromoteReport {
    fn add(&mut self, other: &PromoteReport) {
        self.manifests_copied += other.manifests_copied;
        self.manifests_skipped += other.manifests_skipped;
        self.blobs_streamed += other.blobs_streamed;
        self.blobs_mounted += other.blobs_mounted;
        self.blobs_skipped += other.blobs_skipped;
        self.bytes_streamed += other.bytes_streamed;
    }
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
    from: &'a dyn ImageSource,
    from_repo: &'a RepoName,
    to: &'a dyn ImageSink,
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
            .held_manifest(self.to_repo, digest)
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
            .put_manifest(self.to_repo, &m.digest, &m.media_type, m.bytes)
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
        if to.has_blob(self.to_repo, digest).await.map_err(dest)? {
            self.report.blobs_skipped += 1;
            return Ok(());
        }
        // Mounts go through the destination's own metadata, which links the blob only
        // if, in the same atomic change, one of its repositories links it: that proves
        // the destination's blob store holds bytes verified against this digest, and
        // the new link is counted by the destination's collector. So a mount is sound
        // whatever the storage layout; `shared` only saves the search for a holder.
        if self.shared
            && to
                .mount_blob(self.to_repo, digest, Some(self.from_repo))
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
            .mount_blob(self.to_repo, digest, None)
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
        let body = match self.from.get_blob(self.from_repo, digest).await {
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
            .put_blob(self.to_repo, digest, body.size, stream)
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
            Ok(size) => Ok(size),
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
            .tagged(self.to_repo, tag)
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
    use bytes::Bytes;

    use super::*;
    use crate::manifest::media_type;
    use crate::registry::PutManifestOptions;
    use crate::testkit::{image_manifest_with, push_blob, repo};

    // The other promotion tests use only the public API: `tests/promote.rs`. This one
    // stays here because it pages past the private `REFERRER_PAGE`.

    /// Pushes an image manifest (by digest) and its blobs; returns its digest and size.
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
        let d = Digest::sha256(json.as_bytes());
        let size = json.len() as u64;
        r.put_manifest(
            repo,
            &Reference::Digest(d.clone()),
            media_type::OCI_MANIFEST,
            Bytes::from(json),
            PutManifestOptions::default(),
        )
        .await
        .expect("manifest push");
        (d, size)
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
}
