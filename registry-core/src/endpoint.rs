//! The two sides of an image copy, whatever holds the image: [`ImageSource`] (what can
//! be read from) and [`ImageSink`] (what can be written to).
//!
//! A [`Registry`] in this process is both. So is a remote registry reached over HTTP
//! (the `registry-remote` crate's `RemoteRegistry`). Code written against these traits
//! works the same way in process and across the network:
//! [`transfer`](crate::promote::transfer) copies an image from any source to any sink
//! ([`promote`](crate::promote::promote) is its registry-to-registry form),
//! [`sync`](crate::promote::sync) copies every tag of a repository, and a pull-through
//! cache ([`Upstream`](crate::proxy::Upstream)) fetches what it misses from an
//! `ImageSource`.
//!
//! Both traits speak [`Error`]: a missing manifest is [`Error::ManifestUnknown`], a
//! missing blob [`Error::BlobUnknown`], a remote that cannot be reached or answers
//! with a server error [`Error::Upstream`].

use async_trait::async_trait;
use bytes::Bytes;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::Descriptor;
use crate::names::{Reference, RepoName, Tag};
use crate::registry::{
    AllowAll, BlobBody, BlobInfo, ListOptions, Manifest, ManifestMeta, Page, PutManifestOptions,
    Registry,
};
use crate::store::ByteStream;

/// Something images can be read from: a local [`Registry`] or a remote one.
#[async_trait]
pub trait ImageSource: Send + Sync {
    /// A manifest's digest, media type and size, without its bytes.
    async fn stat_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestMeta>;

    /// A manifest with its exact bytes. Implementations verify the bytes against their
    /// digest (the reference's, when it is a digest) before returning them.
    async fn get_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest>;

    /// A blob's size.
    async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobInfo>;

    /// A whole blob. The stream fails, rather than end, when the bytes turn out not to
    /// hash to `digest` or differ in length from `size`: a consumer that reaches the end
    /// of the stream without an error has the verified blob.
    async fn get_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobBody>;

    /// One page of the manifests that refer to `subject`.
    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        options: &ListOptions,
    ) -> Result<Page<Descriptor>>;

    /// One page of a repository's tags, sorted.
    async fn list_tags(&self, repo: &RepoName, options: &ListOptions) -> Result<Page<Tag>>;
}

/// What a sink knows of a manifest it holds: what the manifest references.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldManifest {
    /// Blobs (config, layers) it references.
    pub blobs: Vec<Digest>,
    /// Manifests (index children) it references.
    pub children: Vec<Digest>,
}

/// Something images can be written to: a local [`Registry`] or a remote one.
///
/// A sink is expected to accept a manifest only once what it references is present (or
/// to accept it sparse, by its own policy): writers put blobs and children first.
#[async_trait]
pub trait ImageSink: Send + Sync {
    /// `None` if `repo` lacks manifest `digest`; otherwise what it references.
    async fn held_manifest(&self, repo: &RepoName, digest: &Digest)
    -> Result<Option<HeldManifest>>;

    /// Whether `repo` holds blob `digest`. A registry also keeps it from collection for
    /// a while, as for a client's HEAD before it pushes the manifest that references it.
    async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool>;

    /// Links blob `digest` into `repo` from another repository of this same sink
    /// (`from`, or any that holds it when `None`) without transferring bytes. `false`:
    /// not done, the bytes must be put.
    async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool>;

    /// Stores a blob of `size` bytes from `body`, refused unless the bytes hash to
    /// `digest`. Returns the size stored.
    async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<u64>;

    /// Stores a manifest by digest.
    async fn put_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<()>;

    /// The manifest `tag` points at, if any.
    async fn tagged(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>>;

    /// Points `tag` at manifest `digest`, which `repo` holds.
    async fn tag_manifest(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<()>;

    /// Deletes a tag (by tag) or a manifest and its tags (by digest).
    async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()>;
}

#[async_trait]
impl ImageSource for Registry {
    async fn stat_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestMeta> {
        Registry::stat_manifest(self, repo, reference).await
    }

    async fn get_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        Registry::get_manifest(self, repo, reference).await
    }

    async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobInfo> {
        Registry::stat_blob(self, repo, digest).await
    }

    async fn get_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobBody> {
        Registry::get_blob(self, repo, digest, None).await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        options: &ListOptions,
    ) -> Result<Page<Descriptor>> {
        Registry::referrers(self, repo, subject, None, options).await
    }

    async fn list_tags(&self, repo: &RepoName, options: &ListOptions) -> Result<Page<Tag>> {
        Registry::list_tags(self, repo, options).await
    }
}

#[async_trait]
impl ImageSink for Registry {
    async fn held_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<HeldManifest>> {
        Ok(self
            .inner
            .meta
            .manifest(repo, digest)
            .await?
            .map(|record| HeldManifest {
                blobs: record.blobs,
                children: record.children,
            }))
    }

    async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        if self.inner.meta.blob_link(repo, digest).await?.is_none() {
            return Ok(false);
        }
        // A stat as a client's HEAD would do: it refreshes the link's protection. The
        // link can vanish between the two reads.
        match Registry::stat_blob(self, repo, digest).await {
            Ok(_) => Ok(true),
            Err(Error::BlobUnknown { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool> {
        Registry::mount_blob(self, repo, digest, from, &AllowAll).await
    }

    async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<u64> {
        Ok(Registry::put_blob(self, repo, digest, Some(size), body)
            .await?
            .size)
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<()> {
        Registry::put_manifest(
            self,
            repo,
            &Reference::Digest(digest.clone()),
            media_type,
            bytes,
            PutManifestOptions::default(),
        )
        .await
        .map(|_| ())
    }

    async fn tagged(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        self.inner.meta.tag(repo, tag).await
    }

    async fn tag_manifest(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<()> {
        Registry::tag_manifest(self, repo, tag, digest).await
    }

    async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        Registry::delete_manifest(self, repo, reference).await
    }
}
