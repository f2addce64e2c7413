//! A storage whose every call first yields to the scheduler a number of times drawn
//! from a seeded sequence, so that two operations joined in one task interleave at
//! storage-call boundaries, differently for each seed (deterministically on stores
//! whose calls complete without waiting, such as the in-memory one). With jitter (the
//! stress test), some calls also sleep a few milliseconds, so that concurrent tasks on
//! other threads overtake them, even where a store's calls take milliseconds.
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::digest::Digest;
use crate::error::Result;
use crate::names::{RepoName, Tag};
use crate::policy::Policy;
use crate::store::*;
use crate::time::Timestamp;

#[derive(Default)]
struct State {
    /// xorshift state; 0: no yields.
    rng: u64,
    /// One call in this many also sleeps; 0: none does.
    sleep_one_in: u64,
    /// Moving average of the wrapped calls' durations, in microseconds.
    mean_us: u64,
}

/// The yields to come; seed 0: none.
#[derive(Clone, Default)]
pub(crate) struct Schedule(Arc<Mutex<State>>);

impl Schedule {
    /// From now on, yields drawn from `seed` (0: none, and no sleeps), and one call
    /// in `sleep_one_in` (0: none) also sleeps (see [`around`](Self::around)).
    pub(crate) fn set(&self, seed: u64, sleep_one_in: u64) {
        let mut s = self.0.lock().expect("schedule lock");
        // Never 0 while racing (xorshift would stay there).
        s.rng = if seed == 0 { 0 } else { seed | 1 };
        s.sleep_one_in = sleep_one_in;
    }

    /// A schedule [`set`](Self::set) to `seed` and `sleep_one_in`.
    pub(crate) fn jitter(seed: u64, sleep_one_in: u64) -> Self {
        let s = Schedule::default();
        s.set(seed, sleep_one_in);
        s
    }

    /// Runs one storage call: first 0 to 3 yields, and for one call in
    /// `sleep_one_in` a sleep of 1 to 4 units, a unit being the store's mean call
    /// duration (at least 1 ms): long enough, on any store, for another task's calls
    /// to overtake this one.
    async fn around<T>(&self, call: impl Future<Output = T>) -> T {
        self.point(1).await;
        self.timed(call).await
    }

    /// Runs a byte deletion: sleeps 8 times as often and up to 16 units, widening
    /// the window between a decision to delete and the deletion, where lost-update
    /// bugs live.
    async fn around_destructive<T>(&self, call: impl Future<Output = T>) -> T {
        self.point(8).await;
        self.timed(call).await
    }

    async fn timed<T>(&self, call: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = call.await;
        let us = started.elapsed().as_micros().min(u64::MAX as u128) as u64;
        let mut s = self.0.lock().expect("schedule lock");
        s.mean_us = (s.mean_us * 7 + us) / 8;
        out
    }

    async fn point(&self, boost: u64) {
        let (yields, sleep) = {
            let mut s = self.0.lock().expect("schedule lock");
            if s.rng == 0 {
                (0, Duration::ZERO)
            } else {
                s.rng ^= s.rng << 13;
                s.rng ^= s.rng >> 7;
                s.rng ^= s.rng << 17;
                let one_in = (s.sleep_one_in / boost).max(1);
                let sleep = s.sleep_one_in > 0 && (s.rng >> 8).is_multiple_of(one_in);
                let unit = Duration::from_micros(s.mean_us.max(1000));
                let units = 1 + (s.rng >> 16) % (4 * boost.min(4));
                let sleep = if sleep {
                    unit * units as u32
                } else {
                    Duration::ZERO
                };
                (s.rng % 4, sleep)
            }
        };
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        if !sleep.is_zero() {
            tokio::time::sleep(sleep).await;
        }
    }

    /// `storage`, every call of which goes through this schedule first.
    pub(crate) fn wrap(&self, storage: Storage) -> Storage {
        Storage {
            blobs: Arc::new(Blobs {
                inner: storage.blobs,
                s: self.clone(),
            }),
            metadata: Arc::new(Meta {
                inner: storage.metadata,
                s: self.clone(),
            }),
        }
    }
}

struct Blobs {
    inner: Arc<dyn BlobStore>,
    s: Schedule,
}

struct Meta {
    inner: Arc<dyn MetadataStore>,
    s: Schedule,
}

#[async_trait]
impl BlobStore for Blobs {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        self.s.around(self.inner.stat(digest)).await
    }
    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobRead>> {
        self.s.around(self.inner.read(digest, range)).await
    }
    async fn read_verified(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        verify: bool,
    ) -> Result<Option<BlobRead>> {
        self.s
            .around(self.inner.read_verified(digest, range, verify))
            .await
    }
    async fn delete(&self, digest: &Digest) -> Result<bool> {
        self.s.around_destructive(self.inner.delete(digest)).await
    }
    async fn list(&self) -> Result<BoxStream<'static, Result<Digest>>> {
        self.s.around(self.inner.list()).await
    }
    async fn create_upload(&self, id: &UploadId, repo: &RepoName, now: Timestamp) -> Result<()> {
        self.s.around(self.inner.create_upload(id, repo, now)).await
    }
    async fn upload_info(&self, id: &UploadId) -> Result<Option<UploadInfo>> {
        self.s.around(self.inner.upload_info(id)).await
    }
    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        data: ByteStream,
        now: Timestamp,
    ) -> Result<u64> {
        self.s
            .around(self.inner.append_upload(id, offset, data, now))
            .await
    }
    async fn read_upload(&self, id: &UploadId) -> Result<ByteStream> {
        self.s.around(self.inner.read_upload(id)).await
    }
    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<CommitOutcome> {
        self.s
            .around(self.inner.commit_upload(id, digest, len))
            .await
    }
    async fn delete_upload(&self, id: &UploadId) -> Result<bool> {
        self.s.around(self.inner.delete_upload(id)).await
    }
    async fn put_bytes(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        now: Timestamp,
    ) -> Result<CommitOutcome> {
        self.s
            .around(self.inner.put_bytes(repo, digest, bytes, now))
            .await
    }
    fn commit_log(&self) -> Option<CommitLog> {
        self.inner.commit_log()
    }
    async fn put_bytes_before_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        now: Timestamp,
    ) -> Result<CommitOutcome> {
        self.s
            .around(self.inner.put_bytes_before_link(repo, digest, bytes, now))
            .await
    }
    async fn list_uploads(&self) -> Result<Vec<UploadInfo>> {
        self.s.around(self.inner.list_uploads()).await
    }
    async fn presigned_get(
        &self,
        digest: &Digest,
        ttl: std::time::Duration,
    ) -> Result<Option<String>> {
        self.s.around(self.inner.presigned_get(digest, ttl)).await
    }
}

#[async_trait]
impl MetadataStore for Meta {
    fn commit_log(&self) -> Option<CommitLog> {
        self.inner.commit_log()
    }
    async fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        self.s.around(self.inner.blob(digest)).await
    }
    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobLink>> {
        self.s.around(self.inner.blob_link(repo, digest)).await
    }
    async fn blob_repositories(
        &self,
        digest: &Digest,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        self.s
            .around(self.inner.blob_repositories(digest, after, limit))
            .await
    }
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        self.s.around(self.inner.manifest(repo, digest)).await
    }
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        self.s.around(self.inner.tag(repo, tag)).await
    }
    async fn tagged_manifest(&self, repo: &RepoName, tag: &Tag) -> Result<Option<ManifestRecord>> {
        self.s.around(self.inner.tagged_manifest(repo, tag)).await
    }
    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoRecord>> {
        self.s.around(self.inner.repository(repo)).await
    }
    async fn list_tags(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<(Tag, Digest)>> {
        self.s
            .around(self.inner.list_tags(repo, after, limit))
            .await
    }
    async fn list_tag_names(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<Tag>> {
        self.s
            .around(self.inner.list_tag_names(repo, after, limit))
            .await
    }
    async fn list_tag_entries(
        &self,
        repo: &RepoName,
        after: Option<&Tag>,
        limit: usize,
    ) -> Result<Vec<TagEntry>> {
        self.s
            .around(self.inner.list_tag_entries(repo, after, limit))
            .await
    }
    async fn quota_usage(&self, prefix: &RepoName) -> Result<Option<u64>> {
        self.s.around(self.inner.quota_usage(prefix)).await
    }
    async fn list_manifests(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<ManifestRecord>> {
        self.s
            .around(self.inner.list_manifests(repo, after, limit))
            .await
    }
    async fn list_blob_links(
        &self,
        repo: &RepoName,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobLink)>> {
        self.s
            .around(self.inner.list_blob_links(repo, after, limit))
            .await
    }
    async fn list_repositories(
        &self,
        after: Option<&RepoName>,
        limit: usize,
    ) -> Result<Vec<RepoName>> {
        self.s
            .around(self.inner.list_repositories(after, limit))
            .await
    }
    async fn list_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<Referrer>> {
        self.s
            .around(self.inner.list_referrers(repo, subject, after, limit))
            .await
    }
    async fn unreferenced_blob_links(
        &self,
        after: Option<(&RepoName, &Digest)>,
        limit: usize,
    ) -> Result<Vec<(RepoName, Digest, BlobLink)>> {
        self.s
            .around(self.inner.unreferenced_blob_links(after, limit))
            .await
    }
    async fn unlinked_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobRecord)>> {
        self.s.around(self.inner.unlinked_blobs(after, limit)).await
    }
    async fn stats(&self) -> Result<MetaStats> {
        self.s.around(self.inner.stats()).await
    }
    async fn audit(&self, repair: bool) -> Result<AuditReport> {
        self.s.around(self.inner.audit(repair)).await
    }
    async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<LinkOutcome> {
        self.s
            .around(self.inner.link_blob(repo, digest, size, now, policy))
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
        self.s
            .around(self.inner.mount_blob(from, to, digest, now, policy))
            .await
    }
    async fn touch_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        now: Timestamp,
    ) -> Result<bool> {
        self.s
            .around(self.inner.touch_blob_link(repo, digest, now))
            .await
    }
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.s.around(self.inner.unlink_blob(repo, digest)).await
    }
    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Option<PutManifestOutcome>> {
        self.s
            .around(self.inner.put_manifest(repo, manifest, now, policy))
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
        self.s
            .around(self.inner.set_tag(repo, tag, digest, now, policy))
            .await
    }
    async fn delete_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        policy: &Policy,
    ) -> Result<Option<Digest>> {
        self.s
            .around(self.inner.delete_tag(repo, tag, policy))
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
        self.s
            .around(
                self.inner
                    .delete_tag_if(repo, tag, digest, tagged_at, policy),
            )
            .await
    }
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        policy: &Policy,
    ) -> Result<Option<DeletedManifest>> {
        self.s
            .around(self.inner.delete_manifest(repo, digest, policy))
            .await
    }
    async fn collect_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        rule: ManifestCollectRule,
    ) -> Result<Option<DeletedManifest>> {
        self.s
            .around(self.inner.collect_manifest(repo, digest, rule))
            .await
    }
    async fn collect_blob_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        cutoff: Timestamp,
    ) -> Result<bool> {
        self.s
            .around(self.inner.collect_blob_link(repo, digest, cutoff))
            .await
    }
    async fn begin_blob_deletion(
        &self,
        digest: &Digest,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<BlobRecord>> {
        self.s
            .around(self.inner.begin_blob_deletion(digest, now, lease))
            .await
    }
    async fn finish_blob_deletion(&self, digest: &Digest, since: Timestamp) -> Result<bool> {
        self.s
            .around(self.inner.finish_blob_deletion(digest, since))
            .await
    }
    async fn events_after(&self, after: u64, limit: usize) -> Result<crate::events::OutboxRead> {
        self.s.around(self.inner.events_after(after, limit)).await
    }

    async fn outbox_settled(&self, horizon: u64) -> Result<bool> {
        self.s.around(self.inner.outbox_settled(horizon)).await
    }

    async fn events_head(&self) -> Result<u64> {
        self.s.around(self.inner.events_head()).await
    }

    async fn claim_consumer(
        &self,
        name: &str,
        owner: &str,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<Option<u64>> {
        self.s
            .around(self.inner.claim_consumer(name, owner, now, lease))
            .await
    }

    async fn ack_consumer(
        &self,
        name: &str,
        owner: &str,
        cursor: u64,
        now: Timestamp,
        lease: std::time::Duration,
    ) -> Result<bool> {
        self.s
            .around(self.inner.ack_consumer(name, owner, cursor, now, lease))
            .await
    }

    async fn consumers(&self) -> Result<Vec<(String, crate::events::ConsumerRecord)>> {
        self.s.around(self.inner.consumers()).await
    }

    async fn trim_events(
        &self,
        now: Timestamp,
        retention: std::time::Duration,
        max_events: u64,
    ) -> Result<u64> {
        self.s
            .around(self.inner.trim_events(now, retention, max_events))
            .await
    }
}
