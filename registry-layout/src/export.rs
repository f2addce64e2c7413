//! Export: repositories of a registry into an image layout or an archive.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::path::Path;

use registry_core::{
    AllowAll, Digest, Error, ListOptions, ManifestInfo, Reference, Registry, RepoName, Tag,
};

use crate::LayoutError;
use crate::archive::TarSink;
use crate::format::Entry;
use crate::sink::{DirSink, Sink};

/// Page size of tag, repository and referrer listings.
const PAGE: usize = 1000;

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportSelection {
    /// Every tag of every repository.
    Registry,
    /// These repositories.
    Repositories(Vec<RepoSelection>),
}

/// One repository to export, and which of its tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSelection {
    /// The repository.
    pub repo: RepoName,
    /// Its tags to export; empty: all of them.
    pub tags: Vec<Tag>,
}

impl ExportSelection {
    /// One repository: `tags` of it, or all its tags when `tags` is empty.
    pub fn repository(repo: RepoName, tags: Vec<Tag>) -> Self {
        ExportSelection::Repositories(vec![RepoSelection { repo, tags }])
    }
}

/// How entries of `index.json` are named (`org.opencontainers.image.ref.name`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefNames {
    /// `tag` for an export of one repository, `repo:tag` otherwise.
    #[default]
    Auto,
    /// Always `tag` (tags of different repositories may then collide: the last one
    /// written wins).
    Tag,
    /// Always `repo:tag`, as `skopeo copy ... oci:DIR:repo:tag` names them.
    RepoTag,
}

/// How to export. Built with [`ExportOptions::default`] and the `with_*` methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExportOptions {
    /// Export the referrers of everything exported, recursively (default: yes).
    pub referrers: bool,
    /// How entries are named.
    pub ref_names: RefNames,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            referrers: true,
            ref_names: RefNames::Auto,
        }
    }
}

impl ExportOptions {
    /// Exports referrers (`true`, the default) or not.
    pub fn with_referrers(mut self, on: bool) -> Self {
        self.referrers = on;
        self
    }
    /// Names entries this way.
    pub fn with_ref_names(mut self, names: RefNames) -> Self {
        self.ref_names = names;
        self
    }
}

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportReport {
    /// Named entries written to `index.json` (`tag` or `repo:tag`), with their manifest.
    pub entries: Vec<(String, Digest)>,
    /// Referrers listed in `index.json`.
    pub referrers: u64,
    /// Manifests written (as blobs).
    pub manifests_written: u64,
    /// Blobs written (layers, configs).
    pub blobs_written: u64,
    /// Blobs and manifests not written because the destination had them already
    /// (from before, or from earlier in this export: shared blobs are written once).
    pub present: u64,
    /// Bytes of blobs written.
    pub bytes_written: u64,
}

impl fmt::Display for ExportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} entries, {} referrers; {} manifests and {} blobs written ({} bytes), {} already there",
            self.entries.len(),
            self.referrers,
            self.manifests_written,
            self.blobs_written,
            self.bytes_written,
            self.present,
        )
    }
}

/// Exports `selection` of `registry` into the image layout directory `dir`.
///
/// - The directory may be new (created), empty, or an existing layout: then the
///   export adds to it. Blobs it already has (same name and size) are not written
///   again; an `index.json` entry with the same name as a new one is replaced (the name
///   moves, as a tag does); other entries are kept.
/// - `index.json` names each exported tag with `org.opencontainers.image.ref.name`:
///   the tag alone for one repository, `repo:tag` for several or the whole registry
///   (the `oci:DIR:repo:tag` convention of skopeo), unless
///   [`ExportOptions::ref_names`] says otherwise. Referrers of everything exported
///   (recursively, also of index children) are exported and listed as unnamed entries,
///   which [`import_layout`](crate::import_layout) picks up.
/// - Blobs stream from the registry into a temporary file beside their final name,
///   are fsynced, then renamed; sizes are checked, and digests too when the registry
///   does not verify its own reads. After all blobs, each blob directory is fsynced
///   once, then `index.json` is replaced the same way. A crash or an error leaves the
///   old layout readable as it was (plus, at most, complete blobs nothing names yet).
pub async fn export_layout(
    registry: &Registry,
    selection: &ExportSelection,
    dir: impl AsRef<Path>,
    options: &ExportOptions,
) -> Result<ExportReport, LayoutError> {
    let sink = Sink::Dir(DirSink::open(dir.as_ref()).await?);
    export_into(registry, selection, sink, options).await
}

/// Exports `selection` of `registry` into the `oci-archive` (a tar of an image layout)
/// `archive`, like [`export_layout`]. Entries are streamed into a temporary file beside
/// `archive`, renamed over it at the end. An existing archive is added to: its entries
/// are copied into the new one first (streamed too).
pub async fn export_archive(
    registry: &Registry,
    selection: &ExportSelection,
    archive: impl AsRef<Path>,
    options: &ExportOptions,
) -> Result<ExportReport, LayoutError> {
    let sink = Sink::Tar(Box::new(TarSink::open(archive.as_ref()).await?));
    export_into(registry, selection, sink, options).await
}

async fn export_into(
    registry: &Registry,
    selection: &ExportSelection,
    mut sink: Sink,
    options: &ExportOptions,
) -> Result<ExportReport, LayoutError> {
    let repos = match selection {
        ExportSelection::Registry => all_repositories(registry)
            .await?
            .into_iter()
            .map(|repo| RepoSelection {
                repo,
                tags: Vec::new(),
            })
            .collect(),
        ExportSelection::Repositories(repos) => repos.clone(),
    };
    let qualified = match options.ref_names {
        RefNames::Auto => matches!(selection, ExportSelection::Registry) || repos.len() > 1,
        RefNames::Tag => false,
        RefNames::RepoTag => true,
    };
    let mut run = Export {
        registry,
        sink: &mut sink,
        referrers: options.referrers,
        hash: !registry.config().verify_reads,
        report: ExportReport::default(),
    };
    for selected in &repos {
        let tags = match selected.tags.is_empty() {
            true => all_tags(registry, &selected.repo).await?,
            false => selected.tags.clone(),
        };
        let mut visited = HashSet::new();
        for tag in tags {
            let name = match qualified {
                true => format!("{}:{tag}", selected.repo),
                false => tag.to_string(),
            };
            let meta = registry
                .stat_manifest(&selected.repo, &Reference::Tag(tag.clone()))
                .await
                .map_err(|e| LayoutError::registry(format!("{}:{tag}", selected.repo), e))?;
            run.graph(&selected.repo, &meta.digest, &mut visited)
                .await?;
            run.sink.index().add(Entry::new(
                &meta.media_type,
                &meta.digest,
                meta.size,
                Some(name.clone()),
                None,
            ));
            run.report.entries.push((name, meta.digest));
        }
    }
    let report = run.report;
    sink.finish().await?;
    Ok(report)
}

async fn all_repositories(registry: &Registry) -> Result<Vec<RepoName>, LayoutError> {
    let mut out = Vec::new();
    let mut last = None;
    loop {
        let page = registry
            .list_repositories(
                &ListOptions {
                    n: Some(PAGE),
                    last,
                },
                &AllowAll,
            )
            .await
            .map_err(|e| LayoutError::registry("repository listing", e))?;
        out.extend(page.items);
        match page.next {
            Some(next) => last = Some(next),
            None => return Ok(out),
        }
    }
}

async fn all_tags(registry: &Registry, repo: &RepoName) -> Result<Vec<Tag>, LayoutError> {
    let mut out = Vec::new();
    let mut last = None;
    loop {
        let page = match registry
            .list_tags(
                repo,
                &ListOptions {
                    n: Some(PAGE),
                    last,
                },
            )
            .await
        {
            Ok(page) => page,
            Err(Error::NameUnknown { .. }) => {
                return Err(LayoutError::RepositoryUnknown { repo: repo.clone() });
            }
            Err(e) => return Err(LayoutError::registry(format!("tags of {repo}"), e)),
        };
        out.extend(page.items);
        match page.next {
            Some(next) => last = Some(next),
            None => return Ok(out),
        }
    }
}

struct Export<'a> {
    registry: &'a Registry,
    sink: &'a mut Sink,
    referrers: bool,
    hash: bool,
    report: ExportReport,
}

impl Export<'_> {
    /// Writes manifest `root` of `repo`, everything it references and (if asked) its
    /// referrers, recursively. `visited` holds the manifests of `repo` done already.
    async fn graph(
        &mut self,
        repo: &RepoName,
        root: &Digest,
        visited: &mut HashSet<Digest>,
    ) -> Result<(), LayoutError> {
        // An explicit queue, not recursion: referrers of referrers may chain deeply.
        let mut queue = VecDeque::from([root.clone()]);
        while let Some(digest) = queue.pop_front() {
            if !visited.insert(digest.clone()) {
                continue;
            }
            let manifest = self
                .registry
                .get_manifest(repo, &Reference::Digest(digest.clone()))
                .await
                .map_err(|e| LayoutError::registry(format!("{repo}@{digest}"), e))?;
            let info = ManifestInfo::inspect(&manifest.meta.media_type, &manifest.bytes)
                .map_err(|e| LayoutError::registry(format!("{repo}@{digest}"), e))?;
            for d in info.config.iter().chain(&info.layers) {
                if !d.is_external() {
                    self.blob(repo, &d.digest, d.size).await?;
                }
            }
            // Children may be written after their index: nothing reads a layout's blobs
            // but through index.json, which is replaced last of all.
            queue.extend(info.manifests.iter().map(|d| d.digest.clone()));
            if self.sink.has(&digest, manifest.meta.size).await? {
                self.report.present += 1;
            } else {
                self.sink.put_bytes(&digest, manifest.bytes).await?;
                self.report.manifests_written += 1;
            }
            if self.referrers {
                self.referrers_of(repo, &digest, &mut queue).await?;
            }
        }
        Ok(())
    }

    async fn referrers_of(
        &mut self,
        repo: &RepoName,
        subject: &Digest,
        queue: &mut VecDeque<Digest>,
    ) -> Result<(), LayoutError> {
        let mut last = None;
        loop {
            let page = self
                .registry
                .referrers(
                    repo,
                    subject,
                    None,
                    &ListOptions {
                        n: Some(PAGE),
                        last,
                    },
                )
                .await
                .map_err(|e| LayoutError::registry(format!("referrers of {repo}@{subject}"), e))?;
            for r in page.items {
                let before = self.sink.index().entries.len();
                self.sink.index().add(Entry::new(
                    &r.media_type,
                    &r.digest,
                    r.size,
                    None,
                    r.artifact_type.as_deref(),
                ));
                if self.sink.index().entries.len() > before {
                    self.report.referrers += 1;
                }
                queue.push_back(r.digest);
            }
            match page.next {
                Some(next) => last = Some(next),
                None => return Ok(()),
            }
        }
    }

    async fn blob(
        &mut self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), LayoutError> {
        if self.sink.has(digest, size).await? {
            self.report.present += 1;
            return Ok(());
        }
        let body = self
            .registry
            .get_blob(repo, digest, None)
            .await
            .map_err(|e| LayoutError::registry(format!("{repo}@{digest}"), e))?;
        if body.size != size {
            return Err(LayoutError::ServedWrong {
                digest: digest.clone(),
                reason: format!("{} bytes where its descriptor says {size}", body.size),
            });
        }
        self.sink.put(digest, size, body.stream, self.hash).await?;
        self.report.blobs_written += 1;
        self.report.bytes_written += size;
        Ok(())
    }
}
