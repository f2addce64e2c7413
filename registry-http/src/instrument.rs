//! A storage wrapper that times every call and reports what only the store sees: the
//! open upload sessions, and the collector's removals for the audit log.
//!
//! It forwards every method of [`BlobStore`] and [`MetadataStore`], the ones with
//! default implementations too: a store's own `read_verified`, `put_bytes` or
//! `tagged_manifest` is usually faster than the default, and must stay in use.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use async_trait::async_trait;
use futures::stream::BoxStream;
use registry_core::error::{Error, Result};
use registry_core::policy::Policy;
use registry_core::store::*;
use registry_core::{Digest, RepoName, Tag, Timestamp};

use crate::audit::{AuditLog, Record};
use crate::metrics::{Metrics, StoreOp};

/// Wraps `storage` so that every call is timed into `metrics`
/// (`registry_storage_operation_duration_seconds{store, operation}`, and
/// `registry_storage_operation_errors_total` for calls that fail with
/// [`Error::Storage`]), upload sessions are counted
/// (`registry_upload_sessions_open`), and the collector's removals are written to
/// `audit` (`gc_tag_removed`, `gc_manifest_removed`, `gc_link_removed`,
/// `blob_bytes_deleted`). Build the [`Registry`](registry_core::Registry) over what it
/// returns. With neither, `storage` is returned as it is.
///
/// The cost per call is a boxed future, two clock reads and one histogram update
/// (atomics, its series found by index); labels are the operation's name, a fixed set.
pub fn instrument_storage(
    storage: Storage,
    metrics: Option<&Metrics>,
    audit: Option<&AuditLog>,
) -> Storage {
    if metrics.is_none() && audit.is_none() {
        return storage;
    }
    if let Some(m) = metrics {
        m.uploads().track();
    }
    let observe = Observe {
        metrics: metrics.cloned(),
        audit: audit.cloned(),
    };
    Storage {
        blobs: Arc::new(TimedBlobs {
            inner: storage.blobs,
            observe: observe.clone(),
        }),
        metadata: Arc::new(TimedMeta {
            inner: storage.metadata,
            observe,
        }),
    }
}

#[derive(Clone)]
struct Observe {
    metrics: Option<Metrics>,
    audit: Option<AuditLog>,
}

impl Observe {
    /// `call`, timed into the metrics when there are any. A future of its own rather
    /// than an `async fn`: one state machine less per storage call (the stores'
    /// futures are boxed, so `Unpin`).
    fn time<F>(&self, op: StoreOp, call: F) -> Timed<'_, F> {
        Timed {
            call,
            metrics: self.metrics.as_ref().map(|m| (m, Instant::now())),
            op,
        }
    }

    /// Writes a collector's removal. The change is made: a failure to record it is
    /// logged (with the line) and does not fail the collection.
    async fn audit(&self, record: Record<'_>) {
        if let Some(audit) = &self.audit {
            let _ = audit.write_or_log(&record).await;
        }
    }
}

/// A storage call being timed: see [`Observe::time`].
struct Timed<'a, F> {
    call: F,
    /// Where to record it, and when it started.
    metrics: Option<(&'a Metrics, Instant)>,
    op: StoreOp,
}

impl<T, F: Future<Output = Result<T>> + Unpin> Future for Timed<'_, F> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        let result = ready!(Pin::new(&mut this.call).poll(cx));
        if let Some((m, start)) = this.metrics {
            // Only a failure of the store is an error here: a refusal decided inside
            // the atomic change (an immutable tag, a quota, a missing blob) is the
            // store working as it should, and is counted as a refusal by the router.
            let failed = matches!(result, Err(Error::Storage(_)));
            m.storage_call(this.op, start.elapsed(), !failed);
        }
        Poll::Ready(result)
    }
}

struct TimedBlobs {
    inner: Arc<dyn BlobStore>,
    observe: Observe,
}

struct TimedMeta {
    inner: Arc<dyn MetadataStore>,
    observe: Observe,
}

#[async_trait]
impl BlobStore for TimedBlobs {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        self.observe
            .time(StoreOp::Stat, self.inner.stat(digest))
            .await
    }
    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobRead>> {
        self.observe
            .time(StoreOp::Read, self.inner.read(digest, range))
            .await
    }
    async fn read_verified(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        verify: bool,
    ) -> Result<Option<BlobRead>> {
        self.observe
            .time(
                StoreOp::Read,
                self.inner.read_verified(digest, range, verify),
            )
            .await
    }
    async fn delete(&self, digest: &Digest) -> Result<bool> {
        self.observe
            .time(StoreOp::Delete, self.inner.delete(digest))
            .await
    }
    async fn list(&self) -> Result<BoxStream<'static, Result<Digest>>> {
        self.observe.time(StoreOp::List, self.inner.list()).await
    }
    async fn create_upload(&self, id: &UploadId, repo: &RepoName, now: Timestamp) -> Result<()> {
        let result = self
            .observe
            .time(
                StoreOp::CreateUpload,
                self.inner.create_upload(id, repo, now),
            )
            .await;
        if let (Ok(()), Some(m)) = (&result, &self.observe.metrics) {
            m.uploads().created(id);
        }
        result
    }
    async fn upload_info(&self, id: &UploadId) -> Result<Option<UploadInfo>> {
        self.observe
            .time(StoreOp::UploadInfo, self.inner.upload_info(id))
            .await
    }
    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        data: ByteStream,
        now: Timestamp,
    ) -> Result<u64> {
        // Includes receiving the bytes from the client: the stream is the request body.
        self.observe
            .time(
                StoreOp::AppendUpload,
                self.inner.append_upload(id, offset, data, now),
            )
            .await
    }
    async fn read_upload(&self, id: &UploadId) -> Result<ByteStream> {
        self.observe
            .time(StoreOp::ReadUpload, self.inner.read_upload(id))
            .await
    }
    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<CommitOutcome> {
        self.observe
            .time(
                StoreOp::CommitUpload,
                self.inner.commit_upload(id, digest, len),
            )
            .await
    }
    async fn delete_upload(&self, id: &UploadId) -> Result<bool> {
        let result = self
            .observe
            .time(StoreOp::DeleteUpload, self.inner.delete_upload(id))
            .await;
        if let (Ok(true), Some(m)) = (&result, &self.observe.metrics) {
            m.uploads().deleted(id);
        }
        result
    }
    async fn put_bytes(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: bytes::Bytes,
        now: Timestamp,
    ) -> Result<CommitOutcome> {
        self.observe
            .time(
                StoreOp::PutBytes,
                self.inner.put_bytes(repo, digest, bytes, now),
            )
            .await
    }
    async fn list_uploads(&self) -> Result<Vec<UploadInfo>> {
        let result = self
            .observe
            .time(StoreOp::ListUploads, self.inner.list_uploads())
            .await;
        if let (Ok(list), Some(m)) = (&result, &self.observe.metrics) {
            m.uploads().listed(list.iter().map(|u| &u.id));
        }
        result
    }
    // Not timed: signing is mostly local computation (S3, Azure with a key), not a
    // request to the store.
    async fn presigned_get(
        &self,
        digest: &Digest,
        ttl: std::time::Duration,
    ) -> Result<Option<String>> {
        self.inner.presigned_get(digest, ttl).await
    }
}

#[async_trait]
impl MetadataStore for TimedMeta {
    async fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        self.observe
            .time(StoreOp::Blob, self.inner.blob(digest))
            .await
    }
    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobLink>> {
        self.observe
            .time(StoreOp::BlobLink, self.inner.blob_link(repo, digest))
            .await
    }
    async fn blob_repositories(
        &self,
        digest: &Digest,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        self.observe
            .time(
                StoreOp::BlobRepositories,
                self.inner.blob_repositories(digest, after, limit),
            )
            .await
    }
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        self.observe
            .time(StoreOp::Manifest, self.inner.manifest(repo, digest))
            .await
    }
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        self.observe
            .time(StoreOp::Tag, self.inner.tag(repo, tag))
            .await
    }
    async fn tagged_manifest(&self, repo: &RepoName, tag: &Tag) -> Result<Option<ManifestRecord>> {
        self.observe
            .time(
                StoreOp::TaggedManifest,
                self.inner.tagged_manifest(repo, tag),
            )
            .await
    }
    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoRecord>> {
        self.observe
            .time(StoreOp::Repository, self.inner.repository(repo))
            .await
    }
    async fn list_tags(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<(Tag, Digest)>> {
        self.observe
            .time(StoreOp::ListTags, self.inner.list_tags(repo, after, limit))
            .await
    }
    async fn list_tag_names(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<Tag>> {
        self.observe
            .time(
                StoreOp::ListTagNames,
                self.inner.list_tag_names(repo, after, limit),
            )
            .await
    }
    async fn list_tag_entries(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<TagEntry>> {
        self.observe
            .time(
                StoreOp::ListTagEntries,
                self.inner.list_tag_entries(repo, after, limit),
            )
            .await
    }
    async fn quota_usage(&self, prefix: &RepoName) -> Result<Option<u64>> {
        self.observe
            .time(StoreOp::QuotaUsage, self.inner.quota_usage(prefix))
            .await
    }
    async fn list_manifests(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<ManifestRecord>> {
        self.observe
            .time(
                StoreOp::ListManifests,
                self.inner.list_manifests(repo, after, limit),
            )
            .await
    }
    async fn list_blob_links(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobLink)>> {
        self.observe
            .time(
                StoreOp::ListBlobLinks,
                self.inner.list_blob_links(repo, after, limit),
            )
            .await
    }
    async fn list_repositories(
        &self,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        self.observe
            .time(
                StoreOp::ListRepositories,
                self.inner.list_repositories(after, limit),
            )
            .await
    }
    async fn list_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<Referrer>> {
        self.observe
            .time(
                StoreOp::ListReferrers,
                self.inner.list_referrers(repo, subject, after, limit),
            )
            .await
    }
    async fn unreferenced_blob_links(
        &self,
        after: Option<(&RepoName, &Digest)>,
        limit: usize,
    ) -> Result<Vec<(RepoName, Digest, BlobLink)>> {
        self.observe
            .time(
                StoreOp::UnreferencedBlobLinks,
                self.inner.unreferenced_blob_links(after, limit),
            )
            .await
    }
    async fn unlinked_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobRecord)>> {
        self.observe
            .time(
                StoreOp::UnlinkedBlobs,
                self.inner.unlinked_blobs(after, limit),
            )
            .await
    }
    async fn stats(&self) -> Result<MetaStats> {
        self.observe.time(StoreOp::Stats, self.inner.stats()).await
    }
    async fn audit(&self, repair: bool) -> Result<AuditReport> {
        self.observe
            .time(StoreOp::Audit, self.inner.audit(repair))
            .await
    }
    async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<LinkOutcome> {
        self.observe
            .time(
                StoreOp::LinkBlob,
                self.inner.link_blob(repo, digest, size, now, policy),
            )
            .await
    }
    async fn mount_blob(
        &self,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<LinkOutcome>> {
        self.observe
            .time(
                StoreOp::MountBlob,
                self.inner.mount_blob(from, to, digest, now, policy),
            )
            .await
    }
    async fn touch_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        now: Timestamp,
    ) -> Result<bool> {
        self.observe
            .time(
                StoreOp::TouchBlobLink,
                self.inner.touch_blob_link(repo, digest, now),
            )
            .await
    }
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.observe
            .time(StoreOp::UnlinkBlob, self.inner.unlink_blob(repo, digest))
            .await
    }
    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<PutManifestOutcome>> {
        self.observe
            .time(
                StoreOp::PutManifest,
                self.inner.put_manifest(repo, manifest, now, policy),
            )
            .await
    }
    async fn set_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<Digest>> {
        self.observe
            .time(
                StoreOp::SetTag,
                self.inner.set_tag(repo, tag, digest, now, policy),
            )
            .await
    }
    async fn delete_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        policy: &Policy,
    ) -> Result<Option<Digest>> {
        self.observe
            .time(StoreOp::DeleteTag, self.inner.delete_tag(repo, tag, policy))
            .await
    }
    async fn delete_tag_if(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        tagged_at: Timestamp,
        policy: &Policy,
    ) -> Result<bool> {
        // Only the collector's retention removes tags this way.
        let removed = self
            .observe
            .time(
                StoreOp::DeleteTagIf,
                self.inner
                    .delete_tag_if(repo, tag, digest, tagged_at, policy),
            )
            .await?;
        if removed {
            self.observe
                .audit(
                    Record::new("gc_tag_removed")
                        .repository(Some(repo))
                        .tag(tag.as_str())
                        .digest(digest),
                )
                .await;
        }
        Ok(removed)
    }
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        policy: &Policy,
    ) -> Result<Option<DeletedManifest>> {
        self.observe
            .time(
                StoreOp::DeleteManifest,
                self.inner.delete_manifest(repo, digest, policy),
            )
            .await
    }
    async fn collect_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        rule: ManifestCollectRule,
    ) -> Result<Option<DeletedManifest>> {
        let removed = self
            .observe
            .time(
                StoreOp::CollectManifest,
                self.inner.collect_manifest(repo, digest, rule),
            )
            .await?;
        if let Some(deleted) = &removed {
            self.observe
                .audit(
                    Record::new("gc_manifest_removed")
                        .repository(Some(repo))
                        .digest(digest)
                        .tags(&deleted.tags),
                )
                .await;
        }
        Ok(removed)
    }
    async fn collect_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        cutoff: Timestamp,
    ) -> Result<bool> {
        let removed = self
            .observe
            .time(
                StoreOp::CollectBlobLink,
                self.inner.collect_blob_link(repo, digest, cutoff),
            )
            .await?;
        if removed {
            self.observe
                .audit(
                    Record::new("gc_link_removed")
                        .repository(Some(repo))
                        .digest(digest),
                )
                .await;
        }
        Ok(removed)
    }
    async fn begin_blob_deletion(
        &self,
        digest: &Digest,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<BlobRecord>> {
        self.observe
            .time(
                StoreOp::BeginBlobDeletion,
                self.inner.begin_blob_deletion(digest, now, lease),
            )
            .await
    }
    async fn finish_blob_deletion(&self, digest: &Digest, since: Timestamp) -> Result<bool> {
        // The bytes are gone once this is called: the one way bytes are ever deleted
        // (`registry_core::store::delete_unlinked_bytes`).
        let finished = self
            .observe
            .time(
                StoreOp::FinishBlobDeletion,
                self.inner.finish_blob_deletion(digest, since),
            )
            .await?;
        if finished {
            self.observe
                .audit(Record::new("blob_bytes_deleted").digest(digest))
                .await;
        }
        Ok(finished)
    }
}
