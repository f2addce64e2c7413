//! Errors of the registry core. Only `registry-http` maps them to OCI error codes.

use crate::digest::Digest;
use crate::names::{RepoName, Tag};

/// Input that does not parse: a name, tag, digest or algorithm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    /// Not a valid `algorithm:hex` digest.
    #[error("invalid digest {0:?}")]
    Digest(String),
    /// A digest algorithm the registry does not support.
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// Not a valid repository name.
    #[error("invalid repository name {0:?}")]
    RepoName(String),
    /// Not a valid tag.
    #[error("invalid tag {0:?}")]
    Tag(String),
    /// A policy setting that does not parse (a tag pattern, a quota, a retention rule).
    #[error("invalid policy: {0}")]
    Policy(String),
}

/// What went wrong in a registry operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name, tag or digest failed validation.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The blob is not known in this repository.
    #[error("blob {digest} is not known in this repository")]
    BlobUnknown {
        /// The digest asked for.
        digest: Digest,
    },
    /// No upload session with this id exists in this repository (or it expired).
    #[error("upload session {id:?} is not known")]
    UploadUnknown {
        /// The session id asked for.
        id: String,
    },
    /// A chunk did not start where the upload currently ends.
    #[error("chunk starts at {got}, but the upload is {expected} bytes long")]
    UploadOffset {
        /// The current length of the upload.
        expected: u64,
        /// The offset the chunk claimed.
        got: u64,
    },
    /// The bytes do not hash to the digest the client claimed.
    #[error("content hashes to {actual}, not {expected}")]
    DigestMismatch {
        /// The digest the client claimed.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// The number of bytes received differs from the number declared.
    #[error("expected {expected} bytes, received {actual}")]
    SizeMismatch {
        /// Bytes declared.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// A blob or manifest exceeds a configured limit.
    #[error("{what} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was too large ("manifest", "blob").
        what: &'static str,
        /// The limit in bytes.
        limit: u64,
    },
    /// No manifest for this tag or digest in this repository.
    #[error("manifest {reference} is not known in this repository")]
    ManifestUnknown {
        /// The tag or digest asked for.
        reference: String,
    },
    /// The manifest is not acceptable (bad JSON, media type disagreement, ...).
    #[error("invalid manifest: {reason}")]
    ManifestInvalid {
        /// Why it was refused.
        reason: String,
    },
    /// The manifest references a blob the repository does not have.
    #[error("manifest references blob {digest}, which is not in the repository")]
    ManifestBlobUnknown {
        /// The missing blob or child manifest.
        digest: Digest,
    },
    /// The blob or manifest is still referenced and cannot be deleted.
    #[error("{digest} is in use: {reason}")]
    InUse {
        /// What was to be deleted.
        digest: Digest,
        /// What still references it.
        reason: String,
    },
    /// The requested byte range lies outside the blob.
    #[error("range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable {
        /// The blob's size.
        size: u64,
    },
    /// The repository does not exist.
    #[error("repository {repo} is not known")]
    NameUnknown {
        /// The repository asked for.
        repo: RepoName,
    },
    /// The operation is switched off in this registry (deletes, writes).
    #[error("operation not supported: {what}")]
    Unsupported {
        /// What was refused.
        what: String,
    },
    /// The caller may not do this.
    #[error("access denied: {reason}")]
    Denied {
        /// Why.
        reason: String,
    },
    /// A limit on concurrent work (upload sessions, ...) was reached; retry later.
    #[error("too many requests: {reason}")]
    TooManyRequests {
        /// Which limit.
        reason: String,
        /// When a retry can succeed, if known (HTTP `Retry-After`).
        retry_after: Option<std::time::Duration>,
    },
    /// The tag is immutable (it matches an immutable-tag pattern) and already points at
    /// another manifest: it cannot be moved or deleted.
    #[error(
        "tag {tag} of {repo} is immutable: it points at {current} and cannot be moved or deleted"
    )]
    ImmutableTag {
        /// The repository.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// The manifest it points at, for good.
        current: Digest,
    },
    /// Linking the blob or manifest would take the repositories under `prefix` past
    /// their storage quota. Nothing was linked.
    #[error(
        "storage quota of {prefix} exceeded: {used} of {limit} bytes used, {size} more needed for {digest}"
    )]
    QuotaExceeded {
        /// The quota's repository prefix.
        prefix: RepoName,
        /// The quota in bytes.
        limit: u64,
        /// Bytes counted against it before this push.
        used: u64,
        /// The blob or manifest refused.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// The registry is read-only: every write is refused.
    #[error("the registry is read-only: {operation} refused")]
    ReadOnly {
        /// What was refused.
        operation: &'static str,
    },
    /// The caller's body stream failed before it ended (an HTTP client that stopped
    /// sending, or whose connection broke): the client's fault, not storage's. Nothing
    /// of the failed body was kept.
    #[error("the request body did not arrive: {reason}")]
    BodyIncomplete {
        /// What the body stream reported.
        reason: String,
    },
    /// A remote registry this one reads from or writes to (an upstream of a
    /// pull-through cache, a mirror's target) could not be reached, answered with a
    /// server error, or served bytes that do not match their digest. Nothing it sent
    /// was kept.
    #[error("upstream registry failed: {reason}")]
    Upstream {
        /// What failed, for the log and the client.
        reason: String,
    },
    /// The storage backend failed.
    #[error("storage error: {0}")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// Wraps any backend error.
    pub fn storage(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Storage(e.into())
    }
}

/// Result with the registry [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
