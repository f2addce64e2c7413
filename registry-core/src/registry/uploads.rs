//! Upload sessions and the commit protocol (bytes first, then the link; wait for the
//! collector): `docs/design.md` §4.1 and §4.3.

use super::*;

impl Registry {
    // ----- uploads -----

    /// Starts an upload session in `repo`, hashing with `algorithm` (the digest the
    /// client will claim at the end normally uses it; another algorithm still works, at
    /// the cost of re-reading the upload).
    pub async fn start_upload(
        &self,
        repo: &RepoName,
        algorithm: Algorithm,
    ) -> Result<UploadStatus> {
        self.check_push(repo, "blob upload")?;
        self.open_session(repo, algorithm, self.new_upload_id(None))
            .await
    }

    /// Starts an upload session for `owner`: it counts against the owner's limit
    /// ([`RegistryConfig::max_open_uploads_per_owner`]) and its id carries the owner's
    /// tag ([`UploadId::is_for`]). What `registry-http` calls for every client.
    pub async fn start_upload_for(
        &self,
        repo: &RepoName,
        algorithm: Algorithm,
        owner: &UploadOwner,
    ) -> Result<UploadStatus> {
        self.check_push(repo, "blob upload")?;
        self.open_session(repo, algorithm, self.new_upload_id(Some(owner)))
            .await
    }

    async fn open_session(
        &self,
        repo: &RepoName,
        algorithm: Algorithm,
        id: UploadId,
    ) -> Result<UploadStatus> {
        self.check_writable("blob upload")?;
        self.reserve_upload_slot(repo, &id).await?;
        if let Err(e) = self.inner.blobs.create_upload(&id, repo, self.now()).await {
            self.release_upload_slot(repo, &id).await;
            return Err(e);
        }
        self.hashers().insert(id.clone(), Hasher::new(algorithm));
        Ok(UploadStatus { id, offset: 0 })
    }

    async fn reserve_upload_slot(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        let mut open = self.inner.open_uploads.lock().await;
        if open.is_none() {
            let mut counts = OpenUploads::default();
            for u in self.inner.blobs.list_uploads().await? {
                counts.add(&u.repo, &u.id);
            }
            *open = Some(counts);
        }
        let counts = open.as_mut().expect("initialised above");
        let config = &self.inner.config;
        let owner = id.owner_tag();
        if counts.full(repo, owner, config).is_none() {
            counts.add(repo, id);
            return Ok(());
        }
        // Sessions idle past the expiry count until a collection removes them; reclaim
        // them now, or abandoned sessions would lock clients out until then. Sessions
        // that never received a byte go sooner: opening sessions is cheap for a client,
        // so they are what fills the limits on purpose. Meanwhile, note when a slot of
        // each limit will free up at the latest, for the refusal's Retry-After.
        let now = self.now();
        let mut soonest = [None::<Duration>; 3];
        for u in self.inner.blobs.list_uploads().await? {
            let idle = now.since(u.updated_at);
            let expired =
                idle > config.upload_expiry || (u.len == 0 && idle > config.empty_upload_expiry);
            if expired && self.inner.blobs.delete_upload(&u.id).await? {
                self.hashers().remove(&u.id);
                counts.remove(&u.repo, &u.id);
                continue;
            }
            let frees_in = if u.len == 0 {
                config.empty_upload_expiry.saturating_sub(idle)
            } else if idle < ACTIVE_SESSION {
                // Receiving bytes: likely to finish (and free its slot) any moment.
                FINISHING_SESSION_RETRY
            } else {
                config.upload_expiry.saturating_sub(idle)
            };
            let scopes = [
                true,
                &u.repo == repo,
                owner.is_some() && u.id.owner_tag() == owner,
            ];
            for (s, in_scope) in soonest.iter_mut().zip(scopes) {
                if in_scope {
                    *s = Some(s.map_or(frees_in, |d| d.min(frees_in)));
                }
            }
        }
        if let Some((limit, reason)) = counts.full(repo, owner, config) {
            let retry_after = soonest[limit as usize]
                .unwrap_or(FINISHING_SESSION_RETRY)
                .max(Duration::from_secs(1));
            return Err(Error::TooManyRequests {
                reason,
                retry_after: Some(retry_after),
            });
        }
        counts.add(repo, id);
        Ok(())
    }

    async fn release_upload_slot(&self, repo: &RepoName, id: &UploadId) {
        if let Some(counts) = self.inner.open_uploads.lock().await.as_mut() {
            counts.remove(repo, id);
        }
    }

    async fn session(&self, repo: &RepoName, id: &UploadId) -> Result<UploadInfo> {
        let unknown = || Error::UploadUnknown { id: id.to_string() };
        let info = self
            .inner
            .blobs
            .upload_info(id)
            .await?
            .ok_or_else(unknown)?;
        if &info.repo != repo {
            return Err(unknown());
        }
        if self.now().since(info.updated_at) > self.inner.config.upload_expiry {
            // A read-only registry reports the session gone but leaves it to a writer.
            if !self.inner.config.read_only {
                self.discard_upload(repo, id).await?;
            }
            return Err(unknown());
        }
        Ok(info)
    }

    pub(crate) async fn discard_upload(&self, repo: &RepoName, id: &UploadId) -> Result<bool> {
        self.hashers().remove(id);
        let existed = self.inner.blobs.delete_upload(id).await?;
        if existed {
            self.release_upload_slot(repo, id).await;
        }
        Ok(existed)
    }

    /// The progress of an upload session.
    pub async fn upload_status(&self, repo: &RepoName, id: &UploadId) -> Result<UploadStatus> {
        let info = self.session(repo, id).await?;
        Ok(UploadStatus {
            id: id.clone(),
            offset: info.len,
        })
    }

    /// Appends a chunk. `offset`, when given, must equal the bytes received so far
    /// ([`Error::UploadOffset`] otherwise); `declared_len`, when given, must equal the
    /// chunk's length ([`Error::SizeMismatch`]). A failed append changes nothing.
    pub async fn append_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        offset: Option<u64>,
        declared_len: Option<u64>,
        data: ByteStream,
    ) -> Result<UploadStatus> {
        self.check_writable("blob upload")?;
        let info = self.session(repo, id).await?;
        if let Some(o) = offset
            && o != info.len
        {
            return Err(Error::UploadOffset {
                expected: info.len,
                got: o,
            });
        }
        let hasher = self.hashers().remove(id).filter(|h| h.len() == info.len);
        let hasher = Arc::new(Mutex::new(hasher));
        let failure = FailureCell::default();
        let stream = self.guard_stream(
            data,
            info.len,
            declared_len,
            hasher.clone(),
            failure.clone(),
        );
        let result = self
            .inner
            .blobs
            .append_upload(id, info.len, stream, self.now())
            .await;
        let new_len = match result {
            Ok(len) => len,
            Err(e) => return Err(take_failure(&failure).unwrap_or(e)),
        };
        let hasher = hasher.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = hasher.filter(|h| h.len() == new_len) {
            self.hashers().insert(id.clone(), h);
        }
        Ok(UploadStatus {
            id: id.clone(),
            offset: new_len,
        })
    }

    /// Wraps incoming bytes: enforces the declared length and the blob size limit, and
    /// feeds the session's hasher as bytes pass.
    fn guard_stream(
        &self,
        data: ByteStream,
        already: u64,
        declared_len: Option<u64>,
        hasher: Arc<Mutex<Option<Hasher>>>,
        failure: FailureCell,
    ) -> ByteStream {
        let limit = self.inner.config.max_blob_size;
        let fail = move |e: Error| {
            let msg = e.to_string();
            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            std::io::Error::other(msg)
        };
        // State: the body, bytes received, and whether the stream has ended.
        stream::unfold((data, 0u64, false), move |(mut data, received, done)| {
            let (hasher, fail) = (hasher.clone(), fail.clone());
            async move {
                if done {
                    return None;
                }
                let chunk = match data.next().await {
                    Some(Ok(chunk)) => chunk,
                    // Recorded so that the caller sees its own stream's failure,
                    // not the storage error the store makes of it.
                    Some(Err(e)) => {
                        let e = Error::BodyIncomplete {
                            reason: e.to_string(),
                        };
                        return Some((Err(fail(e)), (data, received, true)));
                    }
                    None => {
                        return match declared_len {
                            Some(expected) if expected != received => Some((
                                Err(fail(Error::SizeMismatch {
                                    expected,
                                    actual: received,
                                })),
                                (data, received, true),
                            )),
                            _ => None,
                        };
                    }
                };
                let received = received + chunk.len() as u64;
                if let Some(expected) = declared_len.filter(|&d| received > d) {
                    let e = Error::SizeMismatch {
                        expected,
                        actual: received,
                    };
                    return Some((Err(fail(e)), (data, received, true)));
                }
                if already.saturating_add(received) > limit {
                    let e = Error::TooLarge {
                        what: "blob",
                        limit,
                    };
                    return Some((Err(fail(e)), (data, received, true)));
                }
                if let Some(h) = hasher.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    h.update(&chunk);
                }
                Some((Ok(chunk), (data, received, false)))
            }
        })
        .boxed()
    }

    /// Finishes an upload: appends `last_chunk` if given, checks that everything received
    /// hashes to `digest`, and makes the blob visible in `repo`.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
        last_chunk: Option<(ByteStream, Option<u64>)>,
    ) -> Result<BlobInfo> {
        match last_chunk {
            Some((data, declared_len)) => {
                self.finish_upload_with_chunk(repo, id, digest, None, declared_len, data)
                    .await
            }
            None => {
                self.check_writable("blob upload")?;
                let len = self.session(repo, id).await?.len;
                self.commit_session(repo, id, digest, len).await
            }
        }
    }

    /// [`finish_upload`](Self::finish_upload) with a last chunk that may claim its
    /// position: `offset`, when given, must equal the bytes received so far, as in
    /// [`append_upload`](Self::append_upload) (the final `PUT` of the distribution
    /// spec, with its optional `Content-Range`).
    pub async fn finish_upload_with_chunk(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
        offset: Option<u64>,
        declared_len: Option<u64>,
        data: ByteStream,
    ) -> Result<BlobInfo> {
        self.check_writable("blob upload")?;
        // The append looked the session up and has just written to it: its length is
        // the session's, without a second lookup (the commit checks it again anyway).
        let len = self
            .append_upload(repo, id, offset, declared_len, data)
            .await?
            .offset;
        self.commit_session(repo, id, digest, len).await
    }

    /// Checks that the session's `len` bytes hash to `digest`, commits them and links
    /// the blob into `repo`.
    async fn commit_session(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<BlobInfo> {
        let hasher = self
            .hashers()
            .remove(id)
            .filter(|h| h.len() == len && h.algorithm() == digest.algorithm());
        let actual = match hasher {
            Some(h) => h.finish(),
            None => self.rehash_upload(id, digest.algorithm(), len).await?,
        };
        if &actual != digest {
            self.discard_upload(repo, id).await?;
            return Err(Error::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let linked = self
            .commit_and_link(
                Source::Upload(id),
                digest,
                LinkStep::Blob { repo, size: len },
                len,
            )
            .await;
        if let Err(e) = linked {
            if matches!(e, Error::QuotaExceeded { .. }) {
                // Retrying cannot succeed until something is deleted: free the session
                // now rather than at expiry, so a refusal leaves nothing behind.
                self.discard_upload(repo, id).await?;
            }
            return Err(e);
        }
        self.release_upload_slot(repo, id).await;
        self.emit(Event::BlobStored {
            repo: repo.clone(),
            digest: digest.clone(),
            size: len,
        });
        Ok(BlobInfo {
            digest: digest.clone(),
            size: len,
        })
    }

    /// Hashes the first `len` bytes of an upload (the length the commit will publish;
    /// an append landing meanwhile makes the commit fail rather than change the bytes).
    async fn rehash_upload(&self, id: &UploadId, algorithm: Algorithm, len: u64) -> Result<Digest> {
        let mut stream = self.inner.blobs.read_upload(id).await?;
        let mut h = Hasher::new(algorithm);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(Error::storage)?;
            let want = (len - h.len()).min(chunk.len() as u64) as usize;
            h.update(&chunk[..want]);
            if h.len() == len {
                break;
            }
        }
        if h.len() != len {
            return Err(Error::UploadOffset {
                expected: h.len(),
                got: len,
            });
        }
        Ok(h.finish())
    }

    /// Cancels an upload session and frees what it received.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        self.check_writable("upload cancel")?;
        self.session(repo, id).await?;
        self.discard_upload(repo, id).await?;
        Ok(())
    }

    /// Uploads a whole blob in one call (the single-request `POST ?digest=` upload).
    pub async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        declared_len: Option<u64>,
        data: ByteStream,
    ) -> Result<BlobInfo> {
        self.check_push(repo, "blob upload")?;
        let id = self.new_upload_id(None);
        self.put_blob_in(repo, digest, declared_len, data, id).await
    }

    /// [`put_blob`](Self::put_blob) for `owner`: its session, while the bytes arrive,
    /// counts against the owner's limit as in [`start_upload_for`](Self::start_upload_for).
    pub async fn put_blob_for(
        &self,
        repo: &RepoName,
        digest: &Digest,
        declared_len: Option<u64>,
        data: ByteStream,
        owner: &UploadOwner,
    ) -> Result<BlobInfo> {
        self.check_push(repo, "blob upload")?;
        self.put_blob_in(
            repo,
            digest,
            declared_len,
            data,
            self.new_upload_id(Some(owner)),
        )
        .await
    }

    /// [`put_blob`](Self::put_blob) without the pull-through cache's refusal: how the
    /// cache itself stores what it fetched.
    pub(crate) async fn store_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        declared_len: Option<u64>,
        data: ByteStream,
    ) -> Result<BlobInfo> {
        let id = self.new_upload_id(None);
        self.put_blob_in(repo, digest, declared_len, data, id).await
    }

    async fn put_blob_in(
        &self,
        repo: &RepoName,
        digest: &Digest,
        declared_len: Option<u64>,
        data: ByteStream,
        id: UploadId,
    ) -> Result<BlobInfo> {
        let status = self.open_session(repo, digest.algorithm(), id).await?;
        let result = self
            .finish_upload(repo, &status.id, digest, Some((data, declared_len)))
            .await;
        if result.is_err() {
            self.discard_upload(repo, &status.id).await?;
        }
        result
    }

    /// Commits `source` as blob `digest` and links it, following the protocol of
    /// `docs/design.md` §4.3 (bytes first; wait out a collector's deletion lease on the
    /// same digest; confirm the bytes after linking, since a link pins them).
    pub(super) async fn commit_and_link(
        &self,
        source: Source<'_>,
        digest: &Digest,
        step: LinkStep<'_>,
        len: u64,
    ) -> Result<()> {
        let blobs = &self.inner.blobs;
        // Bytes and metadata in one commit log: the link's durable commit, which comes
        // after, makes the bytes durable too, so their own fsync is not waited for. Only
        // before the link: bytes stored again after it get their own.
        let one_log =
            blobs.commit_log().is_some() && blobs.commit_log() == self.inner.meta.commit_log();
        let commit = |linked: bool| async move {
            match source {
                Source::Upload(id) => blobs.commit_upload(id, digest, len).await,
                Source::Bytes { repo, bytes } if one_log && !linked => {
                    blobs
                        .put_bytes_before_link(repo, digest, bytes.clone(), self.now())
                        .await
                }
                Source::Bytes { repo, bytes } => {
                    blobs
                        .put_bytes(repo, digest, bytes.clone(), self.now())
                        .await
                }
            }
        };
        let mut linked = None;
        for _ in 0..COMMIT_ATTEMPTS {
            self.wait_for_deletion(digest).await?;
            let committed = commit(false).await?;
            let done = match self.link_step(digest, &step).await {
                Ok(done) => done,
                Err(e) => {
                    self.drop_unlinked_bytes(digest, committed).await;
                    return Err(e);
                }
            };
            let done = match done {
                Some(outcome) => {
                    linked = outcome;
                    true
                }
                None => false,
            };
            if done {
                // The link now pins the record; if a collection deleted the bytes between
                // our commit and our link, commit them again (the source is still there).
                if blobs.stat(digest).await?.is_none() {
                    commit(true).await?;
                }
                if let Source::Upload(id) = source {
                    blobs.delete_upload(id).await?;
                }
                if let (Some(outcome), LinkStep::Manifest { repo, .. }) = (linked, &step) {
                    for (tag, from) in outcome.moved_tags {
                        self.emit(Event::TagMoved {
                            repo: (*repo).clone(),
                            tag,
                            from,
                            to: digest.clone(),
                        });
                    }
                }
                return Ok(());
            }
        }
        Err(Error::storage(format!(
            "blob {digest} kept being collected while it was committed; retry the upload"
        )))
    }

    /// Runs the metadata half of a commit. `Ok(None)`: the bytes are being collected;
    /// finish that and retry. `Ok(Some(outcome))`: linked (`outcome` for manifests).
    async fn link_step(
        &self,
        digest: &Digest,
        step: &LinkStep<'_>,
    ) -> Result<Option<Option<crate::store::PutManifestOutcome>>> {
        let meta = &self.inner.meta;
        match step {
            LinkStep::Blob { repo, size } => Ok(
                match meta
                    .link_blob(repo, digest, *size, self.now(), self.policy())
                    .await?
                {
                    LinkOutcome::Linked { .. } => Some(None),
                    LinkOutcome::BlobDeleting => None,
                },
            ),
            LinkStep::Manifest { repo, manifest } => Ok(meta
                .put_manifest(repo, (*manifest).clone(), self.now(), self.policy())
                .await?
                .map(Some)),
        }
    }

    /// After a refused link (a manifest with a missing blob, say), removes the bytes this
    /// commit stored, so a refusal leaves nothing behind, through the deletion lease like
    /// any byte deletion ([`crate::store::delete_unlinked_bytes`]): a concurrent
    /// committer of the same bytes that linked first keeps them (the lease is refused
    /// while a link exists); one that links after waits for the deletion and commits its
    /// bytes again (§4.3 of `docs/design.md`).
    async fn drop_unlinked_bytes(&self, digest: &Digest, committed: crate::store::CommitOutcome) {
        if committed != crate::store::CommitOutcome::Stored {
            return;
        }
        if let Err(e) = self.delete_unlinked_blob(digest).await {
            // Orphaned bytes are harmless; the collector's orphan scan reclaims them.
            tracing::warn!(%digest, error = %e, "could not remove bytes of a refused commit");
        }
    }

    /// Waits while another collector holds a fresh deletion lease on `digest`; takes over
    /// (and finishes) a stale one, whose holder is presumed dead.
    ///
    /// Time here is of two kinds. Whether a lease is stale is decided by the registry's
    /// [`Clock`] (`begin_blob_deletion` compares the lease with `self.now()`), so a
    /// test with a [`ManualClock`](crate::ManualClock) decides takeovers by moving its
    /// clock. The pause between polls and the bound on the whole wait stay in real
    /// time, on purpose: they pace a wait for another task's progress, which happens in
    /// real time, and bound how long a client's request is held, which the client
    /// measures in real time. On a manual clock that nobody moves, a Clock-based wait
    /// would never end, and a sleep on it could not wake up.
    async fn wait_for_deletion(&self, digest: &Digest) -> Result<()> {
        let lease = self.inner.config.deletion_lease;
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            match self.inner.meta.blob(digest).await? {
                Some(rec) if rec.state.is_deleting() => {}
                _ => return Ok(()),
            }
            if self.delete_unlinked_blob(digest).await?.is_some() {
                continue;
            }
            // A lease is held for one byte deletion; waiting longer than the lease (in
            // real time) means something is wrong: give up and let the client retry.
            if started.elapsed() > lease + Duration::from_secs(1) {
                return Err(Error::TooManyRequests {
                    reason: format!("blob {digest} is being deleted; retry shortly"),
                    retry_after: None,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Deletes the bytes of a blob with no links if this caller obtains the deletion
    /// lease; returns the size freed.
    pub(crate) async fn delete_unlinked_blob(&self, digest: &Digest) -> Result<Option<u64>> {
        crate::store::delete_unlinked_bytes(
            self.inner.blobs.as_ref(),
            self.inner.meta.as_ref(),
            digest,
            self.now(),
            self.inner.config.deletion_lease,
        )
        .await
    }
}

/// A session that received bytes this recently is taken to be in use.
const ACTIVE_SESSION: Duration = Duration::from_secs(60);
/// Retry-After when a limit is full of sessions in use: they finish in seconds usually.
const FINISHING_SESSION_RETRY: Duration = Duration::from_secs(5);

/// The limits on open upload sessions, in the order [`OpenUploads::full`] checks them.
#[derive(Clone, Copy)]
enum Limit {
    Total = 0,
    Repo = 1,
    Owner = 2,
}

/// Open upload sessions counted per repository and per owner tag.
#[derive(Default)]
pub(crate) struct OpenUploads {
    total: u64,
    per_repo: HashMap<RepoName, u64>,
    per_owner: HashMap<Box<str>, u64>,
}

impl OpenUploads {
    /// Sessions open in total (for [`Registry::stats`]).
    pub(super) fn total(&self) -> u64 {
        self.total
    }

    fn add(&mut self, repo: &RepoName, id: &UploadId) {
        self.total += 1;
        *self.per_repo.entry(repo.clone()).or_default() += 1;
        if let Some(tag) = id.owner_tag() {
            *self.per_owner.entry(tag.into()).or_default() += 1;
        }
    }

    fn remove(&mut self, repo: &RepoName, id: &UploadId) {
        fn decrement<K: std::hash::Hash + Eq + ?Sized>(
            map: &mut HashMap<impl std::borrow::Borrow<K> + std::hash::Hash + Eq, u64>,
            k: &K,
        ) {
            if let Some(n) = map.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(k);
                }
            }
        }
        self.total = self.total.saturating_sub(1);
        decrement(&mut self.per_repo, repo);
        if let Some(tag) = id.owner_tag() {
            decrement(&mut self.per_owner, tag);
        }
    }

    /// The first limit a new session of `owner` in `repo` would exceed, and why.
    fn full(
        &self,
        repo: &RepoName,
        owner: Option<&str>,
        config: &RegistryConfig,
    ) -> Option<(Limit, String)> {
        if self.total >= config.max_open_uploads {
            return Some((
                Limit::Total,
                format!(
                    "{} upload sessions are open; finish or cancel some",
                    self.total
                ),
            ));
        }
        let here = self.per_repo.get(repo).copied().unwrap_or(0);
        if here >= config.max_open_uploads_per_repo {
            return Some((
                Limit::Repo,
                format!("{here} upload sessions are open in {repo}; finish or cancel some"),
            ));
        }
        let mine = owner
            .and_then(|o| self.per_owner.get(o))
            .copied()
            .unwrap_or(0);
        if owner.is_some() && mine >= config.max_open_uploads_per_owner {
            return Some((
                Limit::Owner,
                format!("you have {mine} upload sessions open; finish or cancel some"),
            ));
        }
        None
    }
}
