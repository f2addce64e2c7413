//! Pause points injected into any storage, for deterministic interleavings of races.
//!
//! [`Hooks::wrap`] returns a [`Storage`] that forwards every call to the inner one, but
//! stops before a call named by [`Hooks::arm`] (for example `"blobs.delete"` or
//! `"meta.collect_blob_link"`) until the test releases it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::oneshot;

use crate::digest::Digest;
use crate::error::Result;
use crate::names::{RepoName, Tag};
use crate::policy::Policy;
use crate::store::*;
use crate::time::Timestamp;

type Armed = HashMap<&'static str, (oneshot::Sender<()>, oneshot::Receiver<()>)>;

/// A set of pause points shared by wrapped stores.
#[derive(Clone, Default)]
pub struct Hooks {
    armed: Arc<Mutex<Armed>>,
}

/// A pause point armed by [`Hooks::arm`]: the next call through it stops until released.
pub struct Pause {
    reached: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

impl Pause {
    /// Waits until a call has reached the pause point.
    pub async fn reached(&mut self) {
        (&mut self.reached).await.expect("pause point dropped");
    }

    /// Lets the paused call go on.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

impl Hooks {
    /// No pause points armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms a pause point: the next call of `name` stops before doing anything.
    pub fn arm(&self, name: &'static str) -> Pause {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.armed
            .lock()
            .expect("hooks lock")
            .insert(name, (reached_tx, release_rx));
        Pause {
            reached: reached_rx,
            release: release_tx,
        }
    }

    async fn point(&self, name: &'static str) {
        let entry = self.armed.lock().expect("hooks lock").remove(name);
        if let Some((reached, release)) = entry {
            let _ = reached.send(());
            // A dropped `Pause` releases the call, so abandoned tests do not hang.
            let _ = release.await;
        }
    }

    /// Wraps a storage so that its calls go through these pause points.
    pub fn wrap(&self, storage: Storage) -> Storage {
        Storage {
            blobs: Arc::new(HookedBlobs {
                inner: storage.blobs,
                hooks: self.clone(),
            }),
            metadata: Arc::new(HookedMeta {
                inner: storage.metadata,
                hooks: self.clone(),
            }),
        }
    }
}

struct HookedBlobs {
    inner: Arc<dyn BlobStore>,
    hooks: Hooks,
}

struct HookedMeta {
    inner: Arc<dyn MetadataStore>,
    hooks: Hooks,
}

#[async_trait]
impl BlobStore for HookedBlobs {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        self.hooks.point("blobs.stat").await;
        self.inner.stat(digest).await
    }
    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobRead>> {
        self.hooks.point("blobs.read").await;
        self.inner.read(digest, range).await
    }
    async fn delete(&self, digest: &Digest) -> Result<bool> {
        self.hooks.point("blobs.delete").await;
        self.inner.delete(digest).await
    }
    async fn list(&self) -> Result<BoxStream<'static, Result<Digest>>> {
        self.hooks.point("blobs.list").await;
        self.inner.list().await
    }
    async fn create_upload(&self, id: &UploadId, repo: &RepoName, now: Timestamp) -> Result<()> {
        self.hooks.point("blobs.create_upload").await;
        self.inner.create_upload(id, repo, now).await
    }
    async fn upload_info(&self, id: &UploadId) -> Result<Option<UploadInfo>> {
        self.inner.upload_info(id).await
    }
    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        data: ByteStream,
        now: Timestamp,
    ) -> Result<u64> {
        self.hooks.point("blobs.append_upload").await;
        self.inner.append_upload(id, offset, data, now).await
    }
    async fn read_upload(&self, id: &UploadId) -> Result<ByteStream> {
        self.inner.read_upload(id).await
    }
    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<CommitOutcome> {
        self.hooks.point("blobs.commit_upload").await;
        self.inner.commit_upload(id, digest, len).await
    }
    async fn delete_upload(&self, id: &UploadId) -> Result<bool> {
        self.inner.delete_upload(id).await
    }
    // Forwarded, not left to the trait's default: the races must run the store's own
    // one-call commit, as production does.
    async fn put_bytes(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: bytes::Bytes,
        now: Timestamp,
    ) -> Result<CommitOutcome> {
        self.hooks.point("blobs.put_bytes").await;
        self.inner.put_bytes(repo, digest, bytes, now).await
    }
    fn commit_log(&self) -> Option<CommitLog> {
        self.inner.commit_log()
    }
    // The same step as `put_bytes` for the races (bytes stored before their link).
    async fn put_bytes_before_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: bytes::Bytes,
        now: Timestamp,
    ) -> Result<CommitOutcome> {
        self.hooks.point("blobs.put_bytes").await;
        self.inner
            .put_bytes_before_link(repo, digest, bytes, now)
            .await
    }
    async fn list_uploads(&self) -> Result<Vec<UploadInfo>> {
        self.inner.list_uploads().await
    }
    async fn presigned_get(
        &self,
        digest: &Digest,
        ttl: std::time::Duration,
    ) -> Result<Option<String>> {
        self.inner.presigned_get(digest, ttl).await
    }
}

#[async_trait]
impl MetadataStore for HookedMeta {
    fn commit_log(&self) -> Option<CommitLog> {
        self.inner.commit_log()
    }
    async fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        self.inner.blob(digest).await
    }
    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobLink>> {
        self.inner.blob_link(repo, digest).await
    }
    async fn blob_repositories(
        &self,
        digest: &Digest,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        self.inner.blob_repositories(digest, after, limit).await
    }
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        self.inner.manifest(repo, digest).await
    }
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        self.inner.tag(repo, tag).await
    }
    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoRecord>> {
        self.inner.repository(repo).await
    }
    async fn list_tags(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<(Tag, Digest)>> {
        self.inner.list_tags(repo, after, limit).await
    }
    async fn list_tag_names(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<Tag>> {
        self.inner.list_tag_names(repo, after, limit).await
    }
    async fn list_tag_entries(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<TagEntry>> {
        self.inner.list_tag_entries(repo, after, limit).await
    }
    async fn quota_usage(&self, prefix: &RepoName) -> Result<Option<u64>> {
        self.inner.quota_usage(prefix).await
    }
    async fn list_manifests(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<ManifestRecord>> {
        self.inner.list_manifests(repo, after, limit).await
    }
    async fn list_blob_links(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobLink)>> {
        self.inner.list_blob_links(repo, after, limit).await
    }
    async fn list_repositories(
        &self,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        self.inner.list_repositories(after, limit).await
    }
    async fn list_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<Referrer>> {
        self.inner.list_referrers(repo, subject, after, limit).await
    }
    async fn unreferenced_blob_links(
        &self,
        after: Option<(&RepoName, &Digest)>,
        limit: usize,
    ) -> Result<Vec<(RepoName, Digest, BlobLink)>> {
        self.inner.unreferenced_blob_links(after, limit).await
    }
    async fn unlinked_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobRecord)>> {
        self.inner.unlinked_blobs(after, limit).await
    }
    async fn stats(&self) -> Result<MetaStats> {
        self.inner.stats().await
    }
    async fn audit(&self, repair: bool) -> Result<AuditReport> {
        self.inner.audit(repair).await
    }
    async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<LinkOutcome> {
        self.hooks.point("meta.link_blob").await;
        self.inner.link_blob(repo, digest, size, now, policy).await
    }
    async fn mount_blob(
        &self,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<LinkOutcome>> {
        self.hooks.point("meta.mount_blob").await;
        self.inner.mount_blob(from, to, digest, now, policy).await
    }
    async fn touch_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        now: Timestamp,
    ) -> Result<bool> {
        self.inner.touch_blob_link(repo, digest, now).await
    }
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.hooks.point("meta.unlink_blob").await;
        self.inner.unlink_blob(repo, digest).await
    }
    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<PutManifestOutcome>> {
        self.hooks.point("meta.put_manifest").await;
        self.inner.put_manifest(repo, manifest, now, policy).await
    }
    async fn set_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<Digest>> {
        self.hooks.point("meta.set_tag").await;
        self.inner.set_tag(repo, tag, digest, now, policy).await
    }
    async fn delete_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        policy: &Policy,
    ) -> Result<Option<Digest>> {
        self.inner.delete_tag(repo, tag, policy).await
    }
    async fn delete_tag_if(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        tagged_at: Timestamp,
        policy: &Policy,
    ) -> Result<bool> {
        self.hooks.point("meta.delete_tag_if").await;
        self.inner
            .delete_tag_if(repo, tag, digest, tagged_at, policy)
            .await
    }
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        policy: &Policy,
    ) -> Result<Option<DeletedManifest>> {
        self.inner.delete_manifest(repo, digest, policy).await
    }
    async fn collect_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        rule: ManifestCollectRule,
    ) -> Result<Option<DeletedManifest>> {
        self.hooks.point("meta.collect_manifest").await;
        self.inner.collect_manifest(repo, digest, rule).await
    }
    async fn collect_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        cutoff: Timestamp,
    ) -> Result<bool> {
        self.hooks.point("meta.collect_blob_link").await;
        self.inner.collect_blob_link(repo, digest, cutoff).await
    }
    async fn begin_blob_deletion(
        &self,
        digest: &Digest,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<BlobRecord>> {
        self.hooks.point("meta.begin_blob_deletion").await;
        self.inner.begin_blob_deletion(digest, now, lease).await
    }
    async fn finish_blob_deletion(&self, digest: &Digest, since: Timestamp) -> Result<bool> {
        self.hooks.point("meta.finish_blob_deletion").await;
        self.inner.finish_blob_deletion(digest, since).await
    }
    async fn events_after(&self, after: u64, limit: usize) -> Result<crate::events::OutboxRead> {
        self.hooks.point("meta.events_after").await;
        self.inner.events_after(after, limit).await
    }

    async fn outbox_settled(&self, horizon: u64) -> Result<bool> {
        self.hooks.point("meta.outbox_settled").await;
        self.inner.outbox_settled(horizon).await
    }

    async fn events_head(&self) -> Result<u64> {
        self.hooks.point("meta.events_head").await;
        self.inner.events_head().await
    }

    async fn claim_consumer(
        &self,
        name: &str,
        owner: &str,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<u64>> {
        self.hooks.point("meta.claim_consumer").await;
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
        self.hooks.point("meta.ack_consumer").await;
        self.inner
            .ack_consumer(name, owner, cursor, now, lease)
            .await
    }

    async fn consumers(&self) -> Result<Vec<(String, crate::events::ConsumerRecord)>> {
        self.hooks.point("meta.consumers").await;
        self.inner.consumers().await
    }

    async fn trim_events(
        &self,
        now: Timestamp,
        retention: std::time::Duration,
        max_events: u64,
    ) -> Result<u64> {
        self.hooks.point("meta.trim_events").await;
        self.inner.trim_events(now, retention, max_events).await
    }
}
