//! Import, first half: reads and checks everything an import needs from the layout,
//! before anything is pushed, and decides the order of the pushes.
//!
//! Everything except the blobs' contents is checked here: the layout version, every
//! JSON file, every manifest's digest, every descriptor's size against its file, that
//! no blob is a link out of the layout. Blob contents are hashed once, by the registry
//! as they are uploaded (see `import.rs` for what happens when one does not match).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use registry_core::{Digest, ManifestInfo, Tag};
use serde::Deserialize;

use crate::LayoutError;
use crate::format::{self, Entry, INDEX_JSON, IndexFile, RefName};
use crate::import::ImportOptions;

/// Deepest nesting of indexes accepted (real images use one or two levels).
const MAX_DEPTH: usize = 16;

/// A blob file an image manifest needs.
#[derive(Debug, Clone)]
pub(crate) struct BlobFile {
    pub(crate) digest: Digest,
    pub(crate) size: u64,
    pub(crate) path: PathBuf,
}

/// A manifest, read and checked.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) digest: Digest,
    pub(crate) media_type: String,
    pub(crate) bytes: Bytes,
    pub(crate) path: PathBuf,
    pub(crate) blobs: Vec<BlobFile>,
    pub(crate) children: Vec<(String, Digest, u64)>,
    pub(crate) subject: Option<Digest>,
}

/// What to push, in order.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Children before their index; referrers after their subject.
    pub(crate) manifests: Vec<Loaded>,
    /// Tags to point once everything is in, in `index.json` order.
    pub(crate) tags: Vec<(Tag, Digest)>,
    /// Roots imported by digest only.
    pub(crate) untagged: Vec<Digest>,
    /// Referrers imported (listed in `index.json`, subject imported too).
    pub(crate) referrers: Vec<Digest>,
}

/// Just the digests of a manifest's descriptors, as strings, to name a bad one with
/// the file it is in (the registry's own parser would only say "malformed").
#[derive(Deserialize)]
struct RawDigests {
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    #[serde(default)]
    blobs: Vec<RawDescriptor>,
    #[serde(default)]
    manifests: Vec<RawDescriptor>,
    subject: Option<RawDescriptor>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    digest: Option<String>,
}

/// Tags with their manifests, and the manifests imported by digest only.
type Selected = (Vec<(Tag, Digest)>, Vec<Digest>);

struct Planner<'a> {
    root: PathBuf,
    /// The layout root with links resolved: blobs must resolve inside it.
    real_root: PathBuf,
    index_path: PathBuf,
    max_manifest: u64,
    loaded: HashMap<Digest, Loaded>,
    options: &'a ImportOptions,
}

/// Reads the layout at `root` and plans the import `options` ask for.
pub(crate) fn plan(
    root: &Path,
    options: &ImportOptions,
    max_manifest: u64,
) -> Result<Plan, LayoutError> {
    format::check_oci_layout(root)?;
    let index = IndexFile::read(root)?;
    let real_root = root.canonicalize().map_err(|e| LayoutError::io(root, e))?;
    let mut planner = Planner {
        root: root.to_owned(),
        real_root,
        index_path: root.join(INDEX_JSON),
        max_manifest,
        loaded: HashMap::new(),
        options,
    };
    // Every entry is read, even those not imported: whether an entry is a referrer of
    // what is imported is only known from its manifest's `subject`.
    let mut subjects = HashMap::new();
    for entry in &index.entries {
        let index_path = planner.index_path.clone();
        let loaded = planner.load(&entry.media_type, &entry.digest, entry.size, &index_path)?;
        subjects.insert(entry.digest.clone(), loaded.subject.clone());
    }
    let (tags, untagged) = planner.select(&index.entries, &subjects)?;

    let mut plan = Plan::default();
    let mut done = HashSet::new();
    for digest in tags.iter().map(|(_, d)| d).chain(&untagged) {
        planner.walk(digest, &mut done, &mut plan.manifests)?;
    }
    if options.referrers {
        // Referrers of anything imported, also of index children and of referrers,
        // until nothing more is found. Referrers are pushed after all the rest, so a
        // referrer that lists its subject as a child finds it in.
        let candidates: Vec<&Entry> = index
            .entries
            .iter()
            .filter(|e| e.ref_name.is_none() && subjects[&e.digest].is_some())
            .collect();
        let import_all = options.tags.is_empty() && options.source_repo.is_none();
        loop {
            let found: Vec<Digest> = candidates
                .iter()
                .filter(|e| !done.contains(&e.digest))
                .filter(|e| {
                    subjects[&e.digest]
                        .as_ref()
                        .is_some_and(|s| done.contains(s))
                })
                .map(|e| e.digest.clone())
                .collect();
            if found.is_empty() {
                break;
            }
            for d in found {
                planner.walk(&d, &mut done, &mut plan.manifests)?;
                plan.referrers.push(d);
            }
        }
        if import_all {
            // Referrers of manifests this layout does not have: the registry accepts
            // them (a referrer may arrive before its subject), and "everything" means
            // everything listed.
            for e in candidates {
                if !done.contains(&e.digest) {
                    planner.walk(&e.digest, &mut done, &mut plan.manifests)?;
                    plan.referrers.push(e.digest.clone());
                }
            }
        }
    }
    plan.tags = tags;
    plan.untagged = untagged;
    Ok(plan)
}

impl Planner<'_> {
    /// Chooses the entries to import: the tags asked for (all named entries when none
    /// was), and, when importing everything, the unnamed entries that are not referrers.
    fn select(
        &self,
        entries: &[Entry],
        subjects: &HashMap<Digest, Option<Digest>>,
    ) -> Result<Selected, LayoutError> {
        let options = self.options;
        let mut tags: Vec<(Tag, Digest)> = Vec::new();
        let mut add = |tag: Tag, digest: &Digest| -> Result<(), LayoutError> {
            match tags.iter().find(|(t, _)| *t == tag) {
                Some((_, d)) if d != digest => Err(LayoutError::AmbiguousTag {
                    path: self.index_path.clone(),
                    tag: tag.to_string(),
                    first: d.clone(),
                    second: digest.clone(),
                }),
                Some(_) => Ok(()),
                None => {
                    tags.push((tag, digest.clone()));
                    Ok(())
                }
            }
        };
        let in_repo = |name: &RefName| match (&options.source_repo, &name.repo) {
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
            (None, _) => true,
        };
        if options.tags.is_empty() {
            for e in entries {
                let Some(name) = &e.ref_name else { continue };
                let parsed =
                    RefName::parse(name).map_err(|reason| LayoutError::InvalidRefName {
                        path: self.index_path.clone(),
                        name: name.clone(),
                        reason,
                    })?;
                if in_repo(&parsed) {
                    add(parsed.tag, &e.digest)?;
                }
            }
        } else {
            for want in &options.tags {
                let mut found = false;
                for e in entries {
                    let Some(Ok(name)) = e.ref_name.as_deref().map(RefName::parse) else {
                        continue;
                    };
                    if name.tag == *want && in_repo(&name) {
                        add(name.tag, &e.digest)?;
                        found = true;
                    }
                }
                if !found {
                    return Err(LayoutError::TagNotFound {
                        path: self.index_path.clone(),
                        tag: match &options.source_repo {
                            Some(repo) => format!("{repo}:{want}"),
                            None => want.to_string(),
                        },
                    });
                }
            }
        }
        let mut untagged = Vec::new();
        if options.tags.is_empty() && options.source_repo.is_none() {
            for e in entries {
                if e.ref_name.is_none()
                    && subjects[&e.digest].is_none()
                    && !untagged.contains(&e.digest)
                {
                    untagged.push(e.digest.clone());
                }
            }
        }
        if let Some(tag) = &options.untagged_tag {
            match untagged.len() {
                0 => {}
                1 => add(tag.clone(), &untagged[0])?,
                count => {
                    return Err(LayoutError::UntaggedAmbiguous {
                        path: self.index_path.clone(),
                        count,
                    });
                }
            }
        }
        Ok((tags, untagged))
    }

    /// Appends `root` and everything under it to `order`, children first, skipping
    /// what is `done`. An explicit stack: no recursion on input-controlled depth.
    fn walk(
        &mut self,
        root: &Digest,
        done: &mut HashSet<Digest>,
        order: &mut Vec<Loaded>,
    ) -> Result<(), LayoutError> {
        // (digest, children pushed already, depth)
        let mut stack = vec![(root.clone(), false, 0usize)];
        while let Some((digest, expanded, depth)) = stack.pop() {
            if done.contains(&digest) {
                continue;
            }
            let loaded = self.loaded[&digest].clone();
            if expanded {
                done.insert(digest);
                order.push(loaded);
                continue;
            }
            if depth >= MAX_DEPTH {
                return Err(LayoutError::TooDeep {
                    path: loaded.path,
                    limit: MAX_DEPTH,
                });
            }
            stack.push((digest, true, depth));
            for (media_type, child, size) in loaded.children.iter().rev() {
                if !done.contains(child) {
                    self.load(media_type, child, *size, &loaded.path)?;
                    stack.push((child.clone(), false, depth + 1));
                }
            }
        }
        Ok(())
    }

    /// Reads and checks manifest `digest` (once; later calls return the first result).
    fn load(
        &mut self,
        media_type: &str,
        digest: &Digest,
        size: u64,
        referenced_by: &Path,
    ) -> Result<&Loaded, LayoutError> {
        if let Some(loaded) = self.loaded.get(digest) {
            // Every descriptor's size is checked, also the second one naming a manifest.
            if loaded.bytes.len() as u64 != size {
                return Err(LayoutError::SizeMismatch {
                    path: loaded.path.clone(),
                    expected: size,
                    actual: loaded.bytes.len() as u64,
                });
            }
            return Ok(&self.loaded[digest]);
        }
        let path = format::blob_path(&self.root, digest);
        self.check_inside(&path, referenced_by)?;
        let bytes = format::read_bounded(&path, self.max_manifest, Some(referenced_by))?;
        if bytes.len() as u64 != size {
            return Err(LayoutError::SizeMismatch {
                path,
                expected: size,
                actual: bytes.len() as u64,
            });
        }
        let actual = Digest::compute(digest.algorithm(), &bytes);
        if &actual != digest {
            return Err(LayoutError::DigestMismatch {
                path,
                expected: digest.clone(),
                actual,
            });
        }
        self.check_digests(&path, &bytes)?;
        let info = ManifestInfo::inspect(media_type, &bytes).map_err(|source| {
            LayoutError::BadManifest {
                path: path.clone(),
                source,
            }
        })?;
        let mut blobs = Vec::new();
        for d in info.config.iter().chain(&info.layers) {
            if d.is_external() || blobs.iter().any(|b: &BlobFile| b.digest == d.digest) {
                continue;
            }
            let blob = format::blob_path(&self.root, &d.digest);
            let actual = self.check_inside(&blob, &path)?;
            if actual != d.size {
                return Err(LayoutError::SizeMismatch {
                    path: blob,
                    expected: d.size,
                    actual,
                });
            }
            blobs.push(BlobFile {
                digest: d.digest.clone(),
                size: d.size,
                path: blob,
            });
        }
        let loaded = Loaded {
            digest: digest.clone(),
            media_type: info.media_type.clone(),
            bytes: Bytes::from(bytes),
            path,
            blobs,
            children: info
                .manifests
                .iter()
                .map(|d| (d.media_type.clone(), d.digest.clone(), d.size))
                .collect(),
            subject: info.subject.map(|s| s.digest),
        };
        Ok(self.loaded.entry(digest.clone()).or_insert(loaded))
    }

    /// Refuses a digest that does not parse, naming the manifest it is in.
    fn check_digests(&self, path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
        // Not an object of that shape: the registry's inspection says what is wrong.
        let Ok(raw) = serde_json::from_slice::<RawDigests>(bytes) else {
            return Ok(());
        };
        let all = raw
            .config
            .iter()
            .chain(&raw.layers)
            .chain(&raw.blobs)
            .chain(&raw.manifests)
            .chain(&raw.subject);
        for value in all.filter_map(|d| d.digest.as_ref()) {
            if Digest::parse(value).is_err() {
                return Err(LayoutError::InvalidDigest {
                    path: path.to_owned(),
                    value: value.clone(),
                });
            }
        }
        Ok(())
    }

    /// Checks that `path` is a regular file that resolves inside the layout (a blob may
    /// be a link, for layouts that share blobs, but not one leading out); returns its
    /// size.
    fn check_inside(&self, path: &Path, referenced_by: &Path) -> Result<u64, LayoutError> {
        let missing = || LayoutError::MissingFile {
            path: path.to_owned(),
            referenced_by: Some(referenced_by.to_owned()),
        };
        let real = match path.canonicalize() {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => return Err(LayoutError::io(path, e)),
        };
        let unsafe_path = |reason| LayoutError::UnsafePath {
            path: self.root.clone(),
            name: path
                .strip_prefix(&self.root)
                .unwrap_or(path)
                .display()
                .to_string(),
            reason,
        };
        if !real.starts_with(&self.real_root) {
            return Err(unsafe_path("a link leading out of the layout"));
        }
        let meta = std::fs::metadata(&real).map_err(|e| LayoutError::io(path, e))?;
        if !meta.is_file() {
            return Err(unsafe_path("not a regular file"));
        }
        Ok(meta.len())
    }
}
