//! [`LayoutError`]: why an import or export failed, naming the file at fault.

use std::path::PathBuf;

use registry_core::{Digest, RepoName};

/// Why an import or an export failed.
///
/// Every variant about the layout names the file (or archive entry) at fault. An import
/// that fails leaves the registry as it was: it is refused before anything is pushed,
/// or what it pushed is removed again (see [`import_layout`](crate::import_layout)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A file the layout must have is not there (`oci-layout`, `index.json`, a blob).
    #[error("{path}: missing{}", needed_by(.referenced_by))]
    MissingFile {
        /// The file that should exist.
        path: PathBuf,
        /// The file whose descriptor names it, if any.
        referenced_by: Option<PathBuf>,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the layout does not parse or lacks a required field.
    #[error("{path}: not valid JSON for this file: {reason}")]
    BadJson {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// `oci-layout` names a layout version other than 1.0.0.
    #[error("{path}: imageLayoutVersion {found:?} is not supported (only \"1.0.0\")")]
    UnsupportedVersion {
        /// The `oci-layout` file.
        path: PathBuf,
        /// The version it names.
        found: String,
    },
    /// A descriptor's digest is not a valid digest of a supported algorithm. Blobs are
    /// only ever looked up as `blobs/<algorithm>/<hex>` of a parsed digest, so a digest
    /// that tries to name another path ends here.
    #[error("{path}: {value:?} is not a valid digest (sha256 or sha512, lower-case hex)")]
    InvalidDigest {
        /// The file holding the descriptor.
        path: PathBuf,
        /// The digest as written.
        value: String,
    },
    /// A file's size differs from the size its descriptor gives.
    #[error("{path}: {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        /// The blob file.
        path: PathBuf,
        /// The descriptor's size.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// A file's content does not hash to the digest it is stored under.
    #[error("{path}: content hashes to {actual}, not to its name {expected}")]
    DigestMismatch {
        /// The blob file.
        path: PathBuf,
        /// The digest it is stored (and referenced) under.
        expected: Digest,
        /// The digest of its bytes.
        actual: Digest,
    },
    /// A manifest the registry would refuse (bad media type, missing fields, ...).
    #[error("{path}: invalid manifest: {source}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// Why it is invalid.
        #[source]
        source: registry_core::Error,
    },
    /// A manifest (or `index.json`) is larger than the registry accepts.
    #[error("{path}: {size} bytes, larger than the limit of {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A name that would lead outside the layout: an archive entry with `..` or an
    /// absolute path, a link entry, or a blob that is a symbolic link out of the layout.
    #[error("{path}: {name:?} is refused: {reason}")]
    UnsafePath {
        /// The layout directory or archive.
        path: PathBuf,
        /// The offending name.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An `org.opencontainers.image.ref.name` annotation that gives no valid tag.
    #[error("{path}: ref name {name:?} gives no valid tag: {reason}")]
    InvalidRefName {
        /// `index.json`.
        path: PathBuf,
        /// The annotation's value.
        name: String,
        /// Why.
        reason: String,
    },
    /// Two entries of `index.json` selected for one import give the same tag to
    /// different manifests.
    #[error("{path}: tag {tag} names both {first} and {second}")]
    AmbiguousTag {
        /// `index.json`.
        path: PathBuf,
        /// The tag.
        tag: String,
        /// One manifest.
        first: Digest,
        /// The other.
        second: Digest,
    },
    /// A tag asked for is not in `index.json`.
    #[error("{path}: no entry is named {tag:?}")]
    TagNotFound {
        /// `index.json`.
        path: PathBuf,
        /// The tag asked for.
        tag: String,
    },
    /// An index nests deeper than any real image does.
    #[error("{path}: image indexes nest more than {limit} levels deep")]
    TooDeep {
        /// The manifest at which the limit was reached.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// Several untagged entries would all get the one tag given for untagged entries.
    #[error("{path}: {count} untagged entries, but one tag for them")]
    UntaggedAmbiguous {
        /// `index.json`.
        path: PathBuf,
        /// How many untagged, non-referrer entries there are.
        count: usize,
    },
    /// The registry refused or failed an operation. For an import, what the import had
    /// pushed was removed again before this was returned.
    #[error("registry: {what}: {source}")]
    Registry {
        /// What was being done (a digest, a tag, a listing).
        what: String,
        /// The registry's error, unchanged.
        #[source]
        source: registry_core::Error,
    },
    /// An export's destination exists, is not empty and is not an image layout (it has
    /// no `oci-layout` file): nothing is written into it.
    #[error("{path}: not empty and not an image layout (no oci-layout file)")]
    NotALayout {
        /// The directory or file.
        path: PathBuf,
    },
    /// A repository asked to be exported does not exist.
    #[error("repository {repo} is not in the registry")]
    RepositoryUnknown {
        /// The repository.
        repo: RepoName,
    },
    /// A blob the registry served did not have the size or digest the manifest gives.
    #[error("registry served {digest} with {reason}")]
    ServedWrong {
        /// The blob.
        digest: Digest,
        /// What was wrong.
        reason: String,
    },
}

fn needed_by(by: &Option<PathBuf>) -> String {
    by.as_ref()
        .map(|p| format!(" (referenced by {})", p.display()))
        .unwrap_or_default()
}

impl LayoutError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LayoutError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn registry(what: impl std::fmt::Display, source: registry_core::Error) -> Self {
        LayoutError::Registry {
            what: what.to_string(),
            source,
        }
    }

    /// The same error with every file path passed through `f` (an archive's staged
    /// files are named as entries of the archive).
    pub(crate) fn map_paths(self, f: impl Fn(PathBuf) -> PathBuf) -> Self {
        match self {
            Self::MissingFile {
                path,
                referenced_by,
            } => Self::MissingFile {
                path: f(path),
                referenced_by: referenced_by.map(&f),
            },
            Self::Io { path, source } => Self::Io {
                path: f(path),
                source,
            },
            Self::BadJson { path, reason } => Self::BadJson {
                path: f(path),
                reason,
            },
            Self::UnsupportedVersion { path, found } => Self::UnsupportedVersion {
                path: f(path),
                found,
            },
            Self::InvalidDigest { path, value } => Self::InvalidDigest {
                path: f(path),
                value,
            },
            Self::SizeMismatch {
                path,
                expected,
                actual,
            } => Self::SizeMismatch {
                path: f(path),
                expected,
                actual,
            },
            Self::DigestMismatch {
                path,
                expected,
                actual,
            } => Self::DigestMismatch {
                path: f(path),
                expected,
                actual,
            },
            Self::BadManifest { path, source } => Self::BadManifest {
                path: f(path),
                source,
            },
            Self::TooLarge { path, size, limit } => Self::TooLarge {
                path: f(path),
                size,
                limit,
            },
            Self::UnsafePath { path, name, reason } => Self::UnsafePath {
                path: f(path),
                name,
                reason,
            },
            Self::InvalidRefName { path, name, reason } => Self::InvalidRefName {
                path: f(path),
                name,
                reason,
            },
            Self::AmbiguousTag {
                path,
                tag,
                first,
                second,
            } => Self::AmbiguousTag {
                path: f(path),
                tag,
                first,
                second,
            },
            Self::TagNotFound { path, tag } => Self::TagNotFound { path: f(path), tag },
            Self::TooDeep { path, limit } => Self::TooDeep {
                path: f(path),
                limit,
            },
            Self::UntaggedAmbiguous { path, count } => Self::UntaggedAmbiguous {
                path: f(path),
                count,
            },
            other => other,
        }
    }
}
