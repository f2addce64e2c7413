//! Manifests: push (validated, committed like a blob, linked with its references in
//! one atomic change), read, delete, tag: `docs/design.md` §4.2 and §4.4.

use super::*;

impl Registry {
    // ----- manifests -----

    /// Pushes a manifest: `bytes` exactly as received with its `Content-Type`. When
    /// `reference` is a digest the bytes must hash to it; when it is a tag the tag
    /// points at the manifest. Every referenced blob and child manifest must be in the
    /// repository (the `subject` need not exist).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: &str,
        bytes: Bytes,
        options: PutManifestOptions,
    ) -> Result<PutManifestResult> {
        self.check_push(repo, "manifest push")?;
        self.store_manifest(repo, reference, content_type, bytes, options)
            .await
    }

    /// [`put_manifest`](Self::put_manifest) without the pull-through cache's refusal:
    /// how the cache itself stores what it fetched.
    pub(crate) async fn store_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: &str,
        bytes: Bytes,
        options: PutManifestOptions,
    ) -> Result<PutManifestResult> {
        self.check_writable("manifest push")?;
        let limit = self.inner.config.max_manifest_size;
        if bytes.len() as u64 > limit {
            return Err(Error::TooLarge {
                what: "manifest",
                limit,
            });
        }
        let info = ManifestInfo::inspect(content_type, &bytes)?;
        let digest = match reference {
            Reference::Digest(d) => {
                let actual = Digest::compute(d.algorithm(), &bytes);
                if &actual != d {
                    return Err(Error::DigestMismatch {
                        expected: d.clone(),
                        actual,
                    });
                }
                actual
            }
            Reference::Tag(_) => Digest::sha256(&bytes),
        };
        let mut tags: Vec<Tag> = match reference {
            Reference::Tag(t) => vec![t.clone()],
            Reference::Digest(_) => Vec::new(),
        };
        for t in options.tags {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let size = bytes.len() as u64;
        let subject = info.subject.as_ref().map(|s| s.digest.clone());
        let referrer = subject.as_ref().map(|_| Descriptor {
            media_type: info.media_type.clone(),
            digest: digest.clone(),
            size,
            artifact_type: info.effective_artifact_type().map(str::to_owned),
            annotations: info.annotations.clone(),
            urls: Vec::new(),
        });
        let manifest = NewManifest {
            record: ManifestRecord {
                digest: digest.clone(),
                media_type: info.media_type.clone(),
                size,
                blobs: info.blob_references(),
                children: info.manifest_references(),
                subject: subject.clone(),
                tags: 0,
                parents: 0,
                pushed_at: self.now(),
                sparse: false,
            },
            referrer,
            tags: tags.clone(),
        };
        if self.inner.meta.manifest(repo, &digest).await?.is_some() {
            // Pushed again (CI does this constantly): the references are there; only
            // the tags may move. The bytes should be there too, unless a crash or an
            // outside hand removed them (R1 in docs/design.md): the record pins them
            // (no deletion lease while it exists), so storing them again is safe, and
            // a client repairs the manifest by pushing it again, as for a blob.
            if self.inner.blobs.stat(&digest).await?.is_none() {
                tracing::warn!(%digest, %repo, "manifest pushed again had no bytes: restored");
                self.inner
                    .blobs
                    .put_bytes(repo, &digest, bytes.clone(), self.now())
                    .await?;
            }
            for tag in &tags {
                self.tag_manifest(repo, tag, &digest).await?;
            }
            return Ok(PutManifestResult {
                digest,
                subject,
                tags,
            });
        }
        self.check_descriptor_sizes(repo, &info).await?;
        // The bytes are all here: stored in one call, no upload session (on the fs
        // store that is two fsyncs instead of six).
        let len = bytes.len() as u64;
        self.commit_and_link(
            Source::Bytes {
                repo,
                bytes: &bytes,
            },
            &digest,
            LinkStep::Manifest {
                repo,
                manifest: &manifest,
            },
            len,
        )
        .await?;
        self.emit(Event::ManifestPut {
            repo: repo.clone(),
            digest: digest.clone(),
            media_type: info.media_type,
            subject: subject.clone(),
            size: len,
        });
        Ok(PutManifestResult {
            digest,
            subject,
            tags,
        })
    }

    /// Refuses a manifest whose descriptors give a size other than that of the blob or
    /// child manifest the repository holds under that digest: a client trusting the
    /// descriptor would read a truncated or overlong body. Sizes of content-addressed
    /// bytes never change, so this check outside the atomic change cannot go stale;
    /// presence is checked again inside it (a missing reference stays
    /// `ManifestBlobUnknown`, decided there).
    async fn check_descriptor_sizes(&self, repo: &RepoName, info: &ManifestInfo) -> Result<()> {
        let meta = &self.inner.meta;
        let mismatch = |what: &str, d: &Descriptor, actual: u64| Error::ManifestInvalid {
            reason: format!(
                "{what} {} is {actual} bytes, but its descriptor says {}",
                d.digest, d.size
            ),
        };
        // The lookups are independent: made at once, they cost one round trip on a
        // networked metadata store instead of one per descriptor.
        let blobs: Vec<&Descriptor> = info
            .config
            .iter()
            .chain(&info.layers)
            .filter(|d| !d.is_external())
            .collect();
        let (links, children) = futures::future::try_join(
            futures::future::try_join_all(blobs.iter().map(|d| meta.blob_link(repo, &d.digest))),
            futures::future::try_join_all(
                info.manifests
                    .iter()
                    .map(|d| meta.manifest(repo, &d.digest)),
            ),
        )
        .await?;
        for (d, link) in blobs.iter().zip(links) {
            if let Some(link) = link
                && link.size != d.size
            {
                return Err(mismatch("blob", d, link.size));
            }
        }
        for (d, child) in info.manifests.iter().zip(children) {
            if let Some(child) = child
                && child.size != d.size
            {
                return Err(mismatch("manifest", d, child.size));
            }
        }
        Ok(())
    }

    async fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestRecord> {
        let unknown = || Error::ManifestUnknown {
            reference: reference.to_string(),
        };
        match reference {
            Reference::Digest(d) => self.inner.meta.manifest(repo, d).await,
            Reference::Tag(t) => self.inner.meta.tagged_manifest(repo, t).await,
        }?
        .ok_or_else(unknown)
    }

    /// A manifest's digest, media type and size.
    pub async fn stat_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<ManifestMeta> {
        if let Some(upstream) = self.upstream_for(repo) {
            self.refresh_manifest(upstream, repo, reference).await?;
        }
        let rec = self.resolve(repo, reference).await?;
        Ok(ManifestMeta {
            digest: rec.digest,
            media_type: rec.media_type,
            size: rec.size,
        })
    }

    /// A manifest with its exact bytes, verified against its digest.
    pub async fn get_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        if let Some(upstream) = self.upstream_for(repo) {
            self.refresh_manifest(upstream, repo, reference).await?;
        }
        let rec = self.resolve(repo, reference).await?;
        let missing = || Error::ManifestUnknown {
            reference: reference.to_string(),
        };
        let Some(read) = self.inner.blobs.read(&rec.digest, None).await? else {
            tracing::warn!(digest = %rec.digest, "manifest has metadata but no bytes");
            return Err(missing());
        };
        let mut buf = BytesMut::with_capacity(rec.size as usize);
        let mut stream = read.stream;
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.map_err(Error::storage)?);
        }
        let bytes = buf.freeze();
        if !rec.digest.verify(&bytes) {
            tracing::error!(digest = %rec.digest, "stored manifest bytes do not match their digest");
            return Err(Error::storage(format!(
                "stored manifest {} is corrupt",
                rec.digest
            )));
        }
        Ok(Manifest {
            meta: ManifestMeta {
                digest: rec.digest,
                media_type: rec.media_type,
                size: rec.size,
            },
            bytes,
        })
    }

    /// Deletes by tag (only the tag goes) or by digest (the manifest and every tag
    /// pointing at it go). Refused ([`Error::InUse`]) for a manifest an index of the
    /// repository still lists.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        self.check_writable("manifest delete")?;
        let unknown = || Error::ManifestUnknown {
            reference: reference.to_string(),
        };
        match reference {
            Reference::Tag(tag) => {
                let digest = self
                    .inner
                    .meta
                    .delete_tag(repo, tag, self.policy())
                    .await?
                    .ok_or_else(unknown)?;
                self.emit(Event::TagDeleted {
                    repo: repo.clone(),
                    tag: tag.clone(),
                    digest,
                });
            }
            Reference::Digest(d) => {
                let deleted = self
                    .inner
                    .meta
                    .delete_manifest(repo, d, self.policy())
                    .await?
                    .ok_or_else(unknown)?;
                self.emit(Event::ManifestDeleted {
                    repo: repo.clone(),
                    digest: d.clone(),
                    tags: deleted.tags,
                });
            }
        }
        Ok(())
    }

    /// Points `tag` at a manifest already in `repo`.
    pub async fn tag_manifest(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<()> {
        self.check_push(repo, "tag")?;
        self.set_tag(repo, tag, digest).await
    }

    /// [`tag_manifest`](Self::tag_manifest) without the pull-through cache's refusal.
    pub(crate) async fn set_tag(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<()> {
        self.check_writable("tag")?;
        let from = self
            .inner
            .meta
            .set_tag(repo, tag, digest, self.now(), self.policy())
            .await?;
        if from.as_ref() != Some(digest) {
            self.emit(Event::TagMoved {
                repo: repo.clone(),
                tag: tag.clone(),
                from,
                to: digest.clone(),
            });
        }
        Ok(())
    }
}
