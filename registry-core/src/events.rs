//! Typed events for embedders: every change the registry makes.

use crate::digest::Digest;
use crate::names::{RepoName, Tag};

/// A change made by the registry. Subscribe with
/// [`Registry::subscribe`](crate::Registry::subscribe).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A blob upload finished and was linked into a repository.
    BlobStored {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// A blob was mounted into a repository from another.
    BlobMounted {
        /// The target repository.
        repo: RepoName,
        /// The source repository.
        from: RepoName,
        /// The blob.
        digest: Digest,
    },
    /// A repository's link to a blob was deleted.
    BlobDeleted {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
    },
    /// A manifest was pushed (or pushed again) to a repository.
    ManifestPut {
        /// Where.
        repo: RepoName,
        /// Its digest.
        digest: Digest,
        /// Its media type.
        media_type: String,
        /// Its subject, if it is a referrer.
        subject: Option<Digest>,
    },
    /// A tag now points at a different manifest.
    TagMoved {
        /// Where.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// What it pointed at before, if anything.
        from: Option<Digest>,
        /// What it points at now.
        to: Digest,
    },
    /// A tag was deleted.
    TagDeleted {
        /// Where.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// What it pointed at.
        digest: Digest,
    },
    /// A manifest was deleted from a repository (its tags with it).
    ManifestDeleted {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
        /// Tags deleted with it.
        tags: Vec<Tag>,
    },
    /// The collector removed a repository's unreferenced link to a blob.
    LinkCollected {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
    },
    /// A repository was deleted by
    /// [`Registry::delete_repository`](crate::Registry::delete_repository). Each
    /// manifest (with its tags) and blob link it held was reported by its own
    /// `ManifestDeleted` or `BlobDeleted` first.
    RepositoryDeleted {
        /// The repository.
        repo: RepoName,
    },
    /// The collector deleted a blob's bytes.
    BlobCollected {
        /// What.
        digest: Digest,
        /// Bytes freed.
        size: u64,
    },
}
