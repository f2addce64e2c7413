//! Import, second half: pushes what `plan.rs` decided, children first and tags last,
//! and takes everything back out if any push fails.

use std::fmt;
use std::path::{Path, PathBuf};

use registry_core::{
    AllowAll, Digest, Error, PutManifestOptions, Reference, Registry, RepoName, Tag,
};

use crate::LayoutError;
use crate::plan::{BlobFile, Loaded, Plan, plan};
use crate::stream::file_stream;

/// What to import from a layout. Built with [`ImportOptions::default`] and the
/// `with_*` methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ImportOptions {
    /// Tags to import (matched against the tag part of each entry's
    /// `org.opencontainers.image.ref.name`). Empty: every named entry, and the unnamed
    /// entries that are not referrers (by digest).
    pub tags: Vec<Tag>,
    /// Only entries named `source_repo:tag`, as a multi-repository export writes them
    /// (unnamed entries then come in only as referrers). `None`: any entry whose tag
    /// part matches, whatever repository it names; two that give one tag to different
    /// manifests are refused ([`LayoutError::AmbiguousTag`]).
    pub source_repo: Option<String>,
    /// Tag for the one unnamed, non-referrer entry of an import of everything (it is
    /// imported by digest only otherwise).
    pub untagged_tag: Option<Tag>,
    /// Import the referrers `index.json` lists of everything imported (default: yes).
    pub referrers: bool,
    /// Where an archive is unpacked before its import (default: the system's
    /// temporary directory). It needs room for the archive's size, which is memory
    /// where that directory is a tmpfs: then point this at a disk.
    pub staging_dir: Option<PathBuf>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            tags: Vec::new(),
            source_repo: None,
            untagged_tag: None,
            referrers: true,
            staging_dir: None,
        }
    }
}

impl ImportOptions {
    /// Imports only these tags (and what they reference, and their referrers).
    pub fn with_tags(mut self, tags: impl IntoIterator<Item = Tag>) -> Self {
        self.tags = tags.into_iter().collect();
        self
    }
    /// Imports only the entries named `repo:tag`.
    pub fn with_source_repo(mut self, repo: impl Into<String>) -> Self {
        self.source_repo = Some(repo.into());
        self
    }
    /// Tags the one unnamed entry of the layout.
    pub fn with_untagged_tag(mut self, tag: Tag) -> Self {
        self.untagged_tag = Some(tag);
        self
    }
    /// Imports referrers (`true`, the default) or not.
    pub fn with_referrers(mut self, on: bool) -> Self {
        self.referrers = on;
        self
    }
    /// Unpacks archives under `dir`.
    pub fn with_staging_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.staging_dir = Some(dir.into());
        self
    }
}

/// What an import did. Importing the same layout again pushes nothing and reports
/// everything as present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportReport {
    /// Manifests pushed (images, indexes and their children, referrers).
    pub manifests_pushed: u64,
    /// Manifests the repository already had.
    pub manifests_present: u64,
    /// Blobs streamed from the layout into the registry.
    pub blobs_uploaded: u64,
    /// Blobs linked from another repository of the registry, without reading them.
    pub blobs_mounted: u64,
    /// Blobs the repository already had.
    pub blobs_present: u64,
    /// Bytes streamed.
    pub bytes_uploaded: u64,
    /// Tags pointed, with their manifests.
    pub tagged: Vec<(Tag, Digest)>,
    /// Entries imported by digest only.
    pub untagged: Vec<Digest>,
    /// Referrers imported.
    pub referrers: Vec<Digest>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tags, {} untagged, {} referrers; manifests {} pushed, {} present; \
             blobs {} uploaded ({} bytes), {} mounted, {} present",
            self.tagged.len(),
            self.untagged.len(),
            self.referrers.len(),
            self.manifests_pushed,
            self.manifests_present,
            self.blobs_uploaded,
            self.bytes_uploaded,
            self.blobs_mounted,
            self.blobs_present,
        )
    }
}

/// Imports the image layout directory `dir` into `repo` of `registry`.
///
/// - **Checked first**: the whole layout is read and checked ([`LayoutError`] names
///   the file) before anything is pushed: `oci-layout` and its version, `index.json`,
///   every manifest's digest and JSON, every descriptor's size against its file, blobs
///   that are links out of the layout.
/// - **Streamed**: blobs go from their file into [`Registry::put_blob`] a chunk at a
///   time, whatever their size; the registry hashes them and refuses a mismatch.
///   Manifests (bounded by the registry's manifest limit) are read whole. A blob the
///   registry already holds in another repository is mounted instead of read.
/// - **Order**: every blob first (so a blob whose bytes do not match, found only by
///   hashing it on the way in, fails the import before any manifest is pushed), then
///   manifests, index children before their index, referrers after everything else;
///   tags last. The registry never holds a manifest whose references are not in, and no
///   tag points anywhere before all is in.
/// - **Referrers**: those `index.json` lists (unnamed entries whose manifest has a
///   `subject`) whose subject is imported, recursively. Referrers present only as
///   blobs, not listed in `index.json`, are not looked for: finding them would mean
///   reading every blob of the layout.
/// - **Nothing taken back**: what the import pushed before a failure stays, complete
///   (the order above); it is never deleted again, since a client may have pushed the
///   same content meanwhile and been told it is stored. Failures that can be known
///   before pushing are found before it: the layout checks above, and a tag that an
///   immutable-tag policy would refuse to move. A blob failing its digest leaves the
///   blobs uploaded before it as unreferenced links, which the collector removes after
///   the protection window. Importing again after a failure finishes the job
///   (whatever is present is skipped).
pub async fn import_layout(
    registry: &Registry,
    repo: &RepoName,
    dir: impl AsRef<Path>,
    options: &ImportOptions,
) -> Result<ImportReport, LayoutError> {
    let dir = dir.as_ref().to_owned();
    let max = registry.config().max_manifest_size;
    let opts = options.clone();
    let plan = tokio::task::spawn_blocking(move || plan(&dir, &opts, max))
        .await
        .map_err(|e| LayoutError::io("(import)", std::io::Error::other(e)))??;
    let mut run = Import {
        registry,
        repo,
        report: ImportReport::default(),
    };
    run.push(plan).await?;
    Ok(run.report)
}

struct Import<'a> {
    registry: &'a Registry,
    repo: &'a RepoName,
    report: ImportReport,
}

impl Import<'_> {
    async fn push(&mut self, plan: Plan) -> Result<(), LayoutError> {
        // Tags an immutable-tag policy would refuse to move: refused before anything is
        // pushed (a concurrent push can still create one meanwhile; then the tags
        // pointed before it stay, like the rest of what this import pushed).
        let policy = &self.registry.config().policy;
        for (tag, digest) in &plan.tags {
            if !policy.is_immutable(self.repo, tag) {
                continue;
            }
            if let Some(current) = self.tagged(tag).await?
                && &current != digest
            {
                let e = Error::ImmutableTag {
                    repo: self.repo.clone(),
                    tag: tag.clone(),
                    current,
                };
                return Err(LayoutError::registry(format!("tag {tag} -> {digest}"), e));
            }
        }
        let mut seen_blobs = std::collections::HashSet::new();
        for manifest in &plan.manifests {
            for blob in &manifest.blobs {
                if seen_blobs.insert(blob.digest.clone()) {
                    self.blob(blob).await?;
                }
            }
        }
        for manifest in &plan.manifests {
            self.manifest(manifest).await?;
        }
        for (tag, digest) in &plan.tags {
            if self.tagged(tag).await?.as_ref() == Some(digest) {
                continue;
            }
            self.registry
                .tag_manifest(self.repo, tag, digest)
                .await
                .map_err(|e| LayoutError::registry(format!("tag {tag} -> {digest}"), e))?;
        }
        self.report.tagged = plan.tags;
        self.report.untagged = plan.untagged;
        self.report.referrers = plan.referrers;
        Ok(())
    }

    async fn blob(&mut self, blob: &BlobFile) -> Result<(), LayoutError> {
        let (registry, repo, digest) = (self.registry, self.repo, &blob.digest);
        match registry.stat_blob(repo, digest).await {
            Ok(_) => {
                self.report.blobs_present += 1;
                return Ok(());
            }
            Err(Error::BlobUnknown { .. }) => {}
            Err(e) => return Err(LayoutError::registry(digest, e)),
        }
        if registry
            .mount_blob(repo, digest, None, &AllowAll)
            .await
            .map_err(|e| LayoutError::registry(digest, e))?
        {
            self.report.blobs_mounted += 1;
            return Ok(());
        }
        let body = file_stream(&blob.path).await?;
        match registry.put_blob(repo, digest, Some(blob.size), body).await {
            Ok(_) => {}
            Err(Error::DigestMismatch { actual, .. }) => {
                return Err(LayoutError::DigestMismatch {
                    path: blob.path.clone(),
                    expected: digest.clone(),
                    actual,
                });
            }
            // The file changed size since it was checked.
            Err(Error::SizeMismatch { expected, actual }) => {
                return Err(LayoutError::SizeMismatch {
                    path: blob.path.clone(),
                    expected,
                    actual,
                });
            }
            Err(e) => return Err(LayoutError::registry(digest, e)),
        }
        self.report.blobs_uploaded += 1;
        self.report.bytes_uploaded += blob.size;
        Ok(())
    }

    async fn manifest(&mut self, m: &Loaded) -> Result<(), LayoutError> {
        let reference = Reference::Digest(m.digest.clone());
        match self.registry.stat_manifest(self.repo, &reference).await {
            Ok(_) => {
                self.report.manifests_present += 1;
                return Ok(());
            }
            Err(Error::ManifestUnknown { .. } | Error::NameUnknown { .. }) => {}
            Err(e) => return Err(LayoutError::registry(&m.digest, e)),
        }
        self.registry
            .put_manifest(
                self.repo,
                &reference,
                &m.media_type,
                m.bytes.clone(),
                PutManifestOptions::default(),
            )
            .await
            .map_err(|source| match source {
                Error::ManifestInvalid { .. } => LayoutError::BadManifest {
                    path: m.path.clone(),
                    source,
                },
                other => LayoutError::registry(&m.digest, other),
            })?;
        self.report.manifests_pushed += 1;
        Ok(())
    }

    /// Where `tag` points now, if anywhere.
    async fn tagged(&self, tag: &Tag) -> Result<Option<Digest>, LayoutError> {
        match self
            .registry
            .stat_manifest(self.repo, &Reference::Tag(tag.clone()))
            .await
        {
            Ok(meta) => Ok(Some(meta.digest)),
            Err(Error::ManifestUnknown { .. } | Error::NameUnknown { .. }) => Ok(None),
            Err(e) => Err(LayoutError::registry(format!("tag {tag}"), e)),
        }
    }
}
