//! Repository-level operations: deleting a whole repository, listing a repository's
//! manifests and blobs, and the registry's counts.

use super::*;
use crate::store::MetaStats;

/// Page size of the walks below (one storage call per page).
const PAGE: usize = 512;
/// Passes [`Registry::delete_repository`] makes before giving up on a repository that
/// concurrent pushes keep filling.
const DELETE_PASSES: usize = 16;
/// Rounds of manifest deletion in one pass: each round removes at least the manifests
/// no index lists (indexes go before their children), so this bounds index nesting.
const MANIFEST_ROUNDS: usize = 64;

/// What [`Registry::delete_repository`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepositoryDeletion {
    /// Manifests deleted (indexes, images, referrers).
    pub manifests: u64,
    /// Tags deleted with them.
    pub tags: u64,
    /// Blob links removed (the bytes are the collector's to free, once no repository
    /// links them).
    pub blob_links: u64,
}

/// A manifest of a repository, as [`Registry::list_manifests`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ManifestEntry {
    /// Digest of its bytes.
    pub digest: Digest,
    /// Media type it was pushed with.
    pub media_type: String,
    /// Size of its bytes.
    pub size: u64,
    /// Its subject, if it is a referrer.
    pub subject: Option<Digest>,
    /// How many tags of the repository point at it.
    pub tags: u64,
    /// How many indexes of the repository list it.
    pub parents: u64,
    /// When it was first pushed to the repository.
    pub pushed_at: Timestamp,
}

impl From<ManifestRecord> for ManifestEntry {
    fn from(m: ManifestRecord) -> Self {
        ManifestEntry {
            digest: m.digest,
            media_type: m.media_type,
            size: m.size,
            subject: m.subject,
            tags: m.tags,
            parents: m.parents,
            pushed_at: m.pushed_at,
        }
    }
}

/// Counts of what a registry holds and does, from [`Registry::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegistryStats {
    /// Everything the metadata store counts ([`MetadataStore::stats`]): repositories,
    /// manifests, tags, blob links, blob records (and how many are being deleted),
    /// referrer entries. Shared by every process on the same storage.
    pub metadata: MetaStats,
    /// Upload sessions open, as this process counts them for its session limits;
    /// `None` until this process opens its first session (the count is then taken
    /// from storage once: listing sessions is not cheap on object storage).
    pub open_uploads: Option<u64>,
    /// Upload sessions whose incremental hash state this process holds in memory.
    pub upload_hash_states: usize,
    /// Live receivers of [`Registry::subscribe`].
    pub event_subscribers: usize,
}

impl Registry {
    /// Deletes repository `repo`: every manifest (indexes before the children they list,
    /// each with its tags and referrer entry) and every blob link. The bytes are freed
    /// by the next collection, unless another repository links them too. Returns what
    /// was removed, after emitting one `ManifestDeleted` per manifest, one `BlobDeleted`
    /// per link and a final [`Event::RepositoryDeleted`].
    ///
    /// Immutable tags are checked first: if any tag of the repository is immutable, the
    /// answer is [`Error::ImmutableTag`] and nothing is deleted. [`Error::NameUnknown`]
    /// if the repository does not exist.
    ///
    /// It is not one atomic change (a repository may hold more than one transaction
    /// should), but a sequence of the ordinary atomic deletes, so the invariants hold
    /// after each step, as if a client deleted the manifests one by one. What a push
    /// racing it does:
    ///
    /// - a manifest or blob that lands before the pass that lists it is deleted with
    ///   the rest; the deletion makes passes until the repository is empty, so one that
    ///   lands after the last pass survives, as if pushed just after the deletion (the
    ///   repository then exists again, holding only that push);
    /// - a manifest push whose blob links the deletion removed first is refused with
    ///   [`Error::ManifestBlobUnknown`] (the client uploads them again); one that linked
    ///   first pins its blobs (their unlink answers `InUse`) and goes in the next pass;
    /// - an immutable tag created during the deletion stops it at that manifest with
    ///   [`Error::ImmutableTag`]; what was deleted before stays deleted;
    /// - pushes that keep landing for 16 passes make it give up with
    ///   [`Error::TooManyRequests`], having deleted what it saw.
    ///
    /// Upload sessions open in the repository are left alone: they expire, or one that
    /// finishes links its blob and the repository exists again.
    pub async fn delete_repository(&self, repo: &RepoName) -> Result<RepositoryDeletion> {
        self.check_writable("repository delete")?;
        if self.inner.meta.repository(repo).await?.is_none() {
            return Err(Error::NameUnknown { repo: repo.clone() });
        }
        self.refuse_immutable_tags(repo).await?;
        let mut done = RepositoryDeletion::default();
        for _ in 0..DELETE_PASSES {
            self.delete_manifests_of(repo, &mut done).await?;
            self.delete_blob_links_of(repo, &mut done).await?;
            if self.inner.meta.repository(repo).await?.is_none() {
                self.emit(Event::RepositoryDeleted { repo: repo.clone() });
                return Ok(done);
            }
        }
        Err(Error::TooManyRequests {
            reason: format!("pushes to {repo} kept landing while it was being deleted; retry"),
            retry_after: None,
        })
    }

    /// [`Error::ImmutableTag`] for the first immutable tag of `repo`, before anything is
    /// deleted (the deletes check again inside their atomic changes).
    async fn refuse_immutable_tags(&self, repo: &RepoName) -> Result<()> {
        if self.policy().immutable_tags.is_empty() {
            return Ok(());
        }
        let mut after: Option<Tag> = None;
        loop {
            let page = self
                .inner
                .meta
                .list_tags(repo, after.as_ref(), PAGE)
                .await?;
            if let Some((tag, digest)) = page
                .iter()
                .find(|(t, _)| self.policy().is_immutable(repo, t))
            {
                return Err(Error::ImmutableTag {
                    repo: repo.clone(),
                    tag: tag.clone(),
                    current: digest.clone(),
                });
            }
            match page.last() {
                Some((t, _)) if page.len() == PAGE => after = Some(t.clone()),
                _ => return Ok(()),
            }
        }
    }

    /// Deletes every manifest of `repo`, in rounds: an index's children refuse
    /// (`InUse`) until the index is gone, then go in a later round.
    async fn delete_manifests_of(
        &self,
        repo: &RepoName,
        done: &mut RepositoryDeletion,
    ) -> Result<()> {
        let meta = &self.inner.meta;
        for _ in 0..MANIFEST_ROUNDS {
            let (mut deleted, mut remaining) = (0u64, 0u64);
            let mut after: Option<Digest> = None;
            loop {
                let page = meta.list_manifests(repo, after.as_ref(), PAGE).await?;
                for m in &page {
                    match meta.delete_manifest(repo, &m.digest, self.policy()).await {
                        Ok(Some(gone)) => {
                            deleted += 1;
                            done.manifests += 1;
                            done.tags += gone.tags.len() as u64;
                            self.emit(Event::ManifestDeleted {
                                repo: repo.clone(),
                                digest: m.digest.clone(),
                                tags: gone.tags,
                            });
                        }
                        // Deleted meanwhile by someone else.
                        Ok(None) => {}
                        // Listed by an index not deleted yet: next round.
                        Err(Error::InUse { .. }) => remaining += 1,
                        Err(e) => return Err(e),
                    }
                }
                match page.last() {
                    Some(last) if page.len() == PAGE => after = Some(last.digest.clone()),
                    _ => break,
                }
            }
            if remaining == 0 || deleted == 0 {
                // Done, or stuck (children of an index pushed after the listing): the
                // caller's next pass sees it.
                return Ok(());
            }
        }
        Ok(())
    }

    /// Removes every blob link of `repo`. Run after the manifests are gone, so nothing
    /// references them, except a manifest pushed meanwhile (`InUse`: next pass).
    async fn delete_blob_links_of(
        &self,
        repo: &RepoName,
        done: &mut RepositoryDeletion,
    ) -> Result<()> {
        let meta = &self.inner.meta;
        let mut after: Option<Digest> = None;
        loop {
            let page = meta.list_blob_links(repo, after.as_ref(), PAGE).await?;
            for (digest, _) in &page {
                match meta.unlink_blob(repo, digest).await {
                    Ok(true) => {
                        done.blob_links += 1;
                        self.emit(Event::BlobDeleted {
                            repo: repo.clone(),
                            digest: digest.clone(),
                        });
                    }
                    Ok(false) | Err(Error::InUse { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            match page.last() {
                Some((d, _)) if page.len() == PAGE => after = Some(d.clone()),
                _ => return Ok(()),
            }
        }
    }

    /// Manifests of `repo` (images, indexes, referrers, tagged or not), in digest order,
    /// paged like the other listings ([`ListOptions::last`] is a digest).
    /// [`Error::NameUnknown`] if the repository does not exist.
    pub async fn list_manifests(
        &self,
        repo: &RepoName,
        options: &ListOptions,
    ) -> Result<Page<ManifestEntry>> {
        if self.inner.meta.repository(repo).await?.is_none() {
            return Err(Error::NameUnknown { repo: repo.clone() });
        }
        let n = self.page_size(options.n);
        if n == 0 {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let last = options.last.as_deref().map(Digest::parse).transpose()?;
        let mut items: Vec<ManifestEntry> = self
            .inner
            .meta
            .list_manifests(repo, last.as_ref(), n + 1)
            .await?
            .into_iter()
            .map(ManifestEntry::from)
            .collect();
        Ok(paginate(&mut items, n, |m| m.digest.to_string()))
    }

    /// Blobs linked in `repo` (uploaded or mounted there: configs, layers, artifact
    /// blobs; not manifests), in digest order, paged like the other listings
    /// ([`ListOptions::last`] is a digest). [`Error::NameUnknown`] if the repository
    /// does not exist. Listing does not refresh the blobs' protection from collection.
    pub async fn list_blobs(
        &self,
        repo: &RepoName,
        options: &ListOptions,
    ) -> Result<Page<BlobInfo>> {
        if self.inner.meta.repository(repo).await?.is_none() {
            return Err(Error::NameUnknown { repo: repo.clone() });
        }
        let n = self.page_size(options.n);
        if n == 0 {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let last = options.last.as_deref().map(Digest::parse).transpose()?;
        let mut items: Vec<BlobInfo> = self
            .inner
            .meta
            .list_blob_links(repo, last.as_ref(), n + 1)
            .await?
            .into_iter()
            .map(|(digest, link)| BlobInfo {
                digest,
                size: link.size,
            })
            .collect();
        Ok(paginate(&mut items, n, |b| b.digest.to_string()))
    }

    /// Counts: the metadata store's ([`MetadataStore::stats`], one read) and this
    /// process's in-memory state (open sessions, hash states, event subscribers).
    pub async fn stats(&self) -> Result<RegistryStats> {
        let metadata = self.inner.meta.stats().await?;
        let open_uploads = self
            .inner
            .open_uploads
            .lock()
            .await
            .as_ref()
            .map(|o| o.total());
        Ok(RegistryStats {
            metadata,
            open_uploads,
            upload_hash_states: self.hashers().len(),
            event_subscribers: self
                .inner
                .events
                .get()
                .map_or(0, broadcast::Sender::receiver_count),
        })
    }
}
