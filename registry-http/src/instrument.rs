//! A storage wrapper that times every call and reports what only the store sees: the
//! open upload sessions, and the collector's removals for the audit log.
//!
//! It forwards every method of [`BlobStore`] and [`MetadataStore`], the ones with
//! default implementations too: a store's own `read_verified`, `put_bytes` or
//! `tagged_manifest` is usually faster than the default, and must stay in use.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use futures::future::BoxFuture;
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
        // Returned as it was polled: taking the result out and wrapping it again in
        // `Poll::Ready` moved it twice (a `memcpy` per call for the larger records).
        let polled = Pin::new(&mut this.call).poll(cx);
        if let (Poll::Ready(result), Some((m, start))) = (&polled, this.metrics) {
            // Only a failure of the store is an error here: a refusal decided inside
            // the atomic change (an immutable tag, a quota, a missing blob) is the
            // store working as it should, and is counted as a refusal by the router.
            let failed = matches!(result, Err(Error::Storage(_)));
            m.storage_call(this.op, start.elapsed(), !failed);
        }
        polled
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

/// Forwards the calls that need nothing but their timing: plain functions returning
/// `Box::pin(Timed)`, where an `async fn` (through `async_trait`) would box a state
/// machine holding the arguments and the `Timed` and poll one more layer (measured with
/// callgrind: about a fifth of what timing a call cost). The signatures are those
/// `async_trait` gives the trait's methods: a lifetime per reference, bounded by the
/// future's.
macro_rules! timed {
    ($(
        fn $name:ident<$($lt:lifetime),*>(&$s:lifetime self $(, $arg:ident: $ty:ty)* $(,)?)
            -> $ret:ty = $op:ident;
    )*) => {$(
        fn $name<$($lt,)* 'fut>(&$s self $(, $arg: $ty)*) -> BoxFuture<'fut, Result<$ret>>
        where
            $($lt: 'fut,)*
            Self: 'fut,
        {
            Box::pin(self.observe.time(StoreOp::$op, self.inner.$name($($arg),*)))
        }
    )*};
}

#[async_trait]
impl BlobStore for TimedBlobs {
    timed! {
        fn stat<'a, 'b>(&'a self, digest: &'b Digest) -> Option<u64> = Stat;
        fn read<'a, 'b>(&'a self, digest: &'b Digest, range: Option<ByteRange>)
            -> Option<BlobRead> = Read;
        fn read_verified<'a, 'b>(
            &'a self,
            digest: &'b Digest,
            range: Option<ByteRange>,
            verify: bool,
        ) -> Option<BlobRead> = Read;
        fn delete<'a, 'b>(&'a self, digest: &'b Digest) -> bool = Delete;
        fn list<'a>(&'a self) -> BoxStream<'static, Result<Digest>> = List;
        fn upload_info<'a, 'b>(&'a self, id: &'b UploadId) -> Option<UploadInfo> = UploadInfo;
        // Includes receiving the bytes from the client: the stream is the request body.
        fn append_upload<'a, 'b>(
            &'a self,
            id: &'b UploadId,
            offset: u64,
            data: ByteStream,
            now: Timestamp,
        ) -> u64 = AppendUpload;
        fn read_upload<'a, 'b>(&'a self, id: &'b UploadId) -> ByteStream = ReadUpload;
        fn commit_upload<'a, 'b, 'c>(&'a self, id: &'b UploadId, digest: &'c Digest, len: u64)
            -> CommitOutcome = CommitUpload;
        fn put_bytes<'a, 'b, 'c>(
            &'a self,
            repo: &'b RepoName,
            digest: &'c Digest,
            bytes: bytes::Bytes,
            now: Timestamp,
        ) -> CommitOutcome = PutBytes;
        fn put_bytes_before_link<'a, 'b, 'c>(
            &'a self,
            repo: &'b RepoName,
            digest: &'c Digest,
            bytes: bytes::Bytes,
            now: Timestamp,
        ) -> CommitOutcome = PutBytes;
    }
    fn commit_log(&self) -> Option<CommitLog> {
        self.inner.commit_log()
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
    fn commit_log(&self) -> Option<CommitLog> {
        self.inner.commit_log()
    }
    timed! {
        fn blob<'a, 'b>(&'a self, digest: &'b Digest) -> Option<BlobRecord> = Blob;
        fn blob_link<'a, 'b, 'c>(&'a self, repo: &'b RepoName, digest: &'c Digest)
            -> Option<BlobLink> = BlobLink;
        fn blob_repositories<'a, 'b, 'c>(
            &'a self,
            digest: &'b Digest,
            after: Option<&'c RepoName>,
            limit: usize,
        ) -> Vec<RepoName> = BlobRepositories;
        fn manifest<'a, 'b, 'c>(&'a self, repo: &'b RepoName, digest: &'c Digest)
            -> Option<ManifestRecord> = Manifest;
        fn tag<'a, 'b, 'c>(&'a self, repo: &'b RepoName, tag: &'c Tag) -> Option<Digest> = Tag;
        fn tagged_manifest<'a, 'b, 'c>(&'a self, repo: &'b RepoName, tag: &'c Tag)
            -> Option<ManifestRecord> = TaggedManifest;
        fn repository<'a, 'b>(&'a self, repo: &'b RepoName) -> Option<RepoRecord> = Repository;
        fn list_tags<'a, 'b, 'c>(
            &'a self,
            repo: &'b RepoName,
            after: Option<&'c Tag>,
            limit: usize,
        ) -> Vec<(Tag, Digest)> = ListTags;
        fn list_tag_names<'a, 'b, 'c>(
            &'a self,
            repo: &'b RepoName,
            after: Option<&'c Tag>,
            limit: usize,
        ) -> Vec<Tag> = ListTagNames;
        fn list_tag_entries<'a, 'b, 'c>(
            &'a self,
            repo: &'b RepoName,
            after: Option<&'c Tag>,
            limit: usize,
        ) -> Vec<TagEntry> = ListTagEntries;
        fn quota_usage<'a, 'b>(&'a self, prefix: &'b RepoName) -> Option<u64> = QuotaUsage;
        fn list_manifests<'a, 'b, 'c>(
            &'a self,
            repo: &'b RepoName,
            after: Option<&'c Digest>,
            limit: usize,
        ) -> Vec<ManifestRecord> = ListManifests;
        fn list_blob_links<'a, 'b, 'c>(
            &'a self,
            repo: &'b RepoName,
            after: Option<&'c Digest>,
            limit: usize,
        ) -> Vec<(Digest, BlobLink)> = ListBlobLinks;
        fn list_repositories<'a, 'b>(&'a self, after: Option<&'b RepoName>, limit: usize)
            -> Vec<RepoName> = ListRepositories;
        fn list_referrers<'a, 'b, 'c, 'd>(
            &'a self,
            repo: &'b RepoName,
            subject: &'c Digest,
            after: Option<&'d Digest>,
            limit: usize,
        ) -> Vec<Referrer> = ListReferrers;
        fn unreferenced_blob_links<'a, 'b, 'c>(
            &'a self,
            after: Option<(&'b RepoName, &'c Digest)>,
            limit: usize,
        ) -> Vec<(RepoName, Digest, BlobLink)> = UnreferencedBlobLinks;
        fn unlinked_blobs<'a, 'b>(&'a self, after: Option<&'b Digest>, limit: usize)
            -> Vec<(Digest, BlobRecord)> = UnlinkedBlobs;
        fn stats<'a>(&'a self) -> MetaStats = Stats;
        fn audit<'a>(&'a self, repair: bool) -> AuditReport = Audit;
        fn link_blob<'a, 'b, 'c, 'd>(
            &'a self,
            repo: &'b RepoName,
            digest: &'c Digest,
            size: u64,
            now: Timestamp,
            policy: &'d Policy,
        ) -> LinkOutcome = LinkBlob;
        fn mount_blob<'a, 'b, 'c, 'd, 'e>(
            &'a self,
            from: &'b RepoName,
            to: &'c RepoName,
            digest: &'d Digest,
            now: Timestamp,
            policy: &'e Policy,
        ) -> Option<LinkOutcome> = MountBlob;
        fn touch_blob_link<'a, 'b, 'c>(
            &'a self,
            repo: &'b RepoName,
            digest: &'c Digest,
            now: Timestamp,
        ) -> bool = TouchBlobLink;
        fn unlink_blob<'a, 'b, 'c>(&'a self, repo: &'b RepoName, digest: &'c Digest)
            -> bool = UnlinkBlob;
        fn put_manifest<'a, 'b, 'c>(
            &'a self,
            repo: &'b RepoName,
            manifest: NewManifest,
            now: Timestamp,
            policy: &'c Policy,
        ) -> Option<PutManifestOutcome> = PutManifest;
        fn set_tag<'a, 'b, 'c, 'd, 'e>(
            &'a self,
            repo: &'b RepoName,
            tag: &'c Tag,
            digest: &'d Digest,
            now: Timestamp,
            policy: &'e Policy,
        ) -> Option<Digest> = SetTag;
        fn delete_tag<'a, 'b, 'c, 'd>(
            &'a self,
            repo: &'b RepoName,
            tag: &'c Tag,
            policy: &'d Policy,
        ) -> Option<Digest> = DeleteTag;
        fn delete_manifest<'a, 'b, 'c, 'd>(
            &'a self,
            repo: &'b RepoName,
            digest: &'c Digest,
            policy: &'d Policy,
        ) -> Option<DeletedManifest> = DeleteManifest;
        fn begin_blob_deletion<'a, 'b>(
            &'a self,
            digest: &'b Digest,
            now: Timestamp,
            lease: std::time::Duration,
        ) -> Option<BlobRecord> = BeginBlobDeletion;
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

    // The outbox is read by delivery, not by requests: not timed.
    async fn events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<registry_core::events::OutboxRead> {
        self.inner.events_after(after, limit).await
    }

    async fn outbox_settled(&self, horizon: u64) -> Result<bool> {
        self.inner.outbox_settled(horizon).await
    }

    async fn events_head(&self) -> Result<u64> {
        self.inner.events_head().await
    }

    async fn claim_consumer(
        &self,
        name: &str,
        owner: &str,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<u64>> {
        self.inner.claim_consumer(name, owner, now, lease).await
    }

    async fn ack_consumer(
        &self,
        name: &str,
        owner: &str,
        cursor: u64,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<bool> {
        self.inner
            .ack_consumer(name, owner, cursor, now, lease)
            .await
    }

    async fn consumers(&self) -> Result<Vec<(String, registry_core::events::ConsumerRecord)>> {
        self.inner.consumers().await
    }

    async fn trim_events(
        &self,
        now: Timestamp,
        retention: std::time::Duration,
        max_events: u64,
    ) -> Result<u64> {
        self.inner.trim_events(now, retention, max_events).await
    }
}
