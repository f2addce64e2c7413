//! The on-disk format: `oci-layout`, `index.json`, `blobs/<algorithm>/<hex>`.

use std::io::Read;
use std::path::{Path, PathBuf};

use registry_core::{Digest, Tag};
use serde_json::{Map, Value};

use crate::LayoutError;

/// The file that marks a directory as an image layout.
pub(crate) const OCI_LAYOUT: &str = "oci-layout";
/// The layout's entry point.
pub(crate) const INDEX_JSON: &str = "index.json";
/// The annotation that names an `index.json` entry.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The only layout version there is.
pub(crate) const LAYOUT_VERSION: &str = "1.0.0";
/// Bytes of the `oci-layout` file this crate writes.
pub(crate) const OCI_LAYOUT_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// Largest `index.json` read. It lists every tag of the layout, so it may well exceed
/// the registry's manifest limit; this bound only keeps a hostile file from exhausting
/// memory.
pub(crate) const MAX_INDEX_JSON: u64 = 64 * 1024 * 1024;

/// Where blob `digest` lives under `root`. The digest was parsed, so the path cannot
/// leave `blobs/` whatever the layout's JSON said.
pub(crate) fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join(blob_name(digest))
}

/// The blob's name relative to the layout root, `/`-separated (as in an archive).
pub(crate) fn blob_name(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().name(), digest.hex())
}

/// Reads a whole file of at most `limit` bytes; a missing file is
/// [`LayoutError::MissingFile`].
pub(crate) fn read_bounded(
    path: &Path,
    limit: u64,
    referenced_by: Option<&Path>,
) -> Result<Vec<u8>, LayoutError> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LayoutError::MissingFile {
            path: path.to_owned(),
            referenced_by: referenced_by.map(Path::to_owned),
        },
        _ => LayoutError::io(path, e),
    })?;
    let size = file.metadata().map_err(|e| LayoutError::io(path, e))?.len();
    if size > limit {
        return Err(LayoutError::TooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // `take`: the file may grow between the stat and the read.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| LayoutError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(LayoutError::TooLarge {
            path: path.to_owned(),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

fn bad_json(path: &Path, reason: impl std::fmt::Display) -> LayoutError {
    LayoutError::BadJson {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Checks the `oci-layout` file of the layout at `root`.
pub(crate) fn check_oci_layout(root: &Path) -> Result<(), LayoutError> {
    let path = root.join(OCI_LAYOUT);
    let bytes = read_bounded(&path, 64 * 1024, None)?;
    check_oci_layout_bytes(&path, &bytes)
}

/// Checks the content of an `oci-layout` file (`path` is for messages).
pub(crate) fn check_oci_layout_bytes(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| bad_json(path, e))?;
    match value.get("imageLayoutVersion") {
        Some(Value::String(v)) if v == LAYOUT_VERSION => Ok(()),
        Some(Value::String(v)) => Err(LayoutError::UnsupportedVersion {
            path: path.to_owned(),
            found: v.clone(),
        }),
        _ => Err(bad_json(path, "no imageLayoutVersion string")),
    }
}

/// One entry of `index.json`.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The descriptor exactly as found, so that fields this crate does not interpret
    /// (`platform`, `urls`, ...) survive a rewrite of `index.json`.
    pub(crate) raw: Map<String, Value>,
    pub(crate) media_type: String,
    pub(crate) digest: Digest,
    pub(crate) size: u64,
    /// `org.opencontainers.image.ref.name`, if any.
    pub(crate) ref_name: Option<String>,
}

impl Entry {
    /// A new entry for a manifest, named `ref_name` if given.
    pub(crate) fn new(
        media_type: &str,
        digest: &Digest,
        size: u64,
        ref_name: Option<String>,
        artifact_type: Option<&str>,
    ) -> Entry {
        let mut raw = Map::new();
        raw.insert("mediaType".into(), Value::from(media_type));
        raw.insert("digest".into(), Value::from(digest.as_str()));
        raw.insert("size".into(), Value::from(size));
        if let Some(a) = artifact_type {
            raw.insert("artifactType".into(), Value::from(a));
        }
        if let Some(name) = &ref_name {
            let mut annotations = Map::new();
            annotations.insert(REF_NAME.into(), Value::from(name.as_str()));
            raw.insert("annotations".into(), Value::Object(annotations));
        }
        Entry {
            raw,
            media_type: media_type.to_owned(),
            digest: digest.clone(),
            size,
            ref_name,
        }
    }
}

/// `index.json`: its entries, and its other top-level fields kept as they were.
#[derive(Debug, Clone, Default)]
pub(crate) struct IndexFile {
    pub(crate) other: Map<String, Value>,
    pub(crate) entries: Vec<Entry>,
}

impl IndexFile {
    /// Reads `index.json` of the layout at `root`.
    pub(crate) fn read(root: &Path) -> Result<IndexFile, LayoutError> {
        let path = root.join(INDEX_JSON);
        let bytes = read_bounded(&path, MAX_INDEX_JSON, None)?;
        IndexFile::parse(&path, &bytes)
    }

    /// Parses the bytes of an `index.json` (`path` is for messages).
    pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<IndexFile, LayoutError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| bad_json(path, e))?;
        let Value::Object(mut other) = value else {
            return Err(bad_json(path, "not a JSON object"));
        };
        match other.get("schemaVersion") {
            Some(v) if v.as_u64() == Some(2) => {}
            _ => return Err(bad_json(path, "schemaVersion must be 2")),
        }
        let Some(Value::Array(manifests)) = other.remove("manifests") else {
            return Err(bad_json(path, "no manifests array"));
        };
        let mut entries = Vec::with_capacity(manifests.len());
        for (i, m) in manifests.into_iter().enumerate() {
            let Value::Object(raw) = m else {
                return Err(bad_json(path, format!("manifests[{i}] is not an object")));
            };
            let field = |name: &str| raw.get(name);
            let Some(Value::String(media_type)) = field("mediaType") else {
                return Err(bad_json(path, format!("manifests[{i}] has no mediaType")));
            };
            let Some(Value::String(digest)) = field("digest") else {
                return Err(bad_json(path, format!("manifests[{i}] has no digest")));
            };
            let digest = Digest::parse(digest).map_err(|_| LayoutError::InvalidDigest {
                path: path.to_owned(),
                value: digest.clone(),
            })?;
            let Some(size) = field("size").and_then(Value::as_u64) else {
                return Err(bad_json(path, format!("manifests[{i}] has no valid size")));
            };
            let ref_name = match field("annotations") {
                None | Some(Value::Null) => None,
                Some(Value::Object(a)) => match a.get(REF_NAME) {
                    None => None,
                    Some(Value::String(name)) => Some(name.clone()),
                    Some(_) => {
                        return Err(bad_json(
                            path,
                            format!("manifests[{i}]: {REF_NAME} is not a string"),
                        ));
                    }
                },
                Some(_) => {
                    return Err(bad_json(
                        path,
                        format!("manifests[{i}]: annotations is not an object"),
                    ));
                }
            };
            entries.push(Entry {
                media_type: media_type.clone(),
                digest,
                size,
                ref_name,
                raw,
            });
        }
        Ok(IndexFile { other, entries })
    }

    /// The file's bytes: the kept top-level fields, `schemaVersion` 2, the index media
    /// type (which skopeo and umoci write; buildah omits it, readers accept both), and
    /// the entries.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut top = self.other.clone();
        top.insert("schemaVersion".into(), Value::from(2));
        top.entry("mediaType")
            .or_insert_with(|| Value::from(registry_core::media_type::OCI_INDEX));
        let manifests = self
            .entries
            .iter()
            .map(|e| Value::Object(e.raw.clone()))
            .collect();
        top.insert("manifests".into(), Value::Array(manifests));
        let mut bytes =
            serde_json::to_vec_pretty(&Value::Object(top)).expect("a JSON value always serialises");
        bytes.push(b'\n');
        bytes
    }

    /// Adds an entry: an entry with the same ref name is replaced (the name moves, as
    /// a tag does); an unnamed entry already listed for the same manifest is not
    /// repeated.
    pub(crate) fn add(&mut self, entry: Entry) {
        match &entry.ref_name {
            Some(name) => {
                if self
                    .entries
                    .iter()
                    .any(|e| e.ref_name.as_ref() == Some(name) && e.digest == entry.digest)
                {
                    return;
                }
                self.entries.retain(|e| e.ref_name.as_ref() != Some(name));
            }
            None => {
                if self.entries.iter().any(|e| e.digest == entry.digest) {
                    return;
                }
            }
        }
        self.entries.push(entry);
    }
}

/// A ref name split into its repository part (when it is `repo:tag`) and its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefName {
    pub(crate) repo: Option<String>,
    pub(crate) tag: Tag,
}

impl RefName {
    /// `v1` is a tag; `library/app:v1` (or `host:5000/app:v1`) is a repository and a
    /// tag, split at the last `:` that is not followed by a `/`. A digest reference
    /// (`app@sha256:...`) names no tag.
    pub(crate) fn parse(name: &str) -> Result<RefName, String> {
        if name.contains('@') {
            return Err("a digest reference names no tag".into());
        }
        let (repo, tag) = match name.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (Some(repo.to_owned()), tag),
            _ => (None, name),
        };
        if repo.as_deref() == Some("") {
            return Err("empty repository before ':'".into());
        }
        let tag = Tag::parse(tag).map_err(|e| e.to_string())?;
        Ok(RefName { repo, tag })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names() {
        let t = |s: &str| Tag::parse(s).unwrap();
        assert_eq!(
            RefName::parse("v1").unwrap(),
            RefName {
                repo: None,
                tag: t("v1")
            }
        );
        assert_eq!(
            RefName::parse("host:5000/a/b:v1.2").unwrap(),
            RefName {
                repo: Some("host:5000/a/b".into()),
                tag: t("v1.2")
            }
        );
        for bad in ["", ":v1", "a@sha256:00", "../x", "a b", "host:5000/a"] {
            assert!(RefName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn index_keeps_unknown_fields_and_moves_names() {
        let d1 = Digest::sha256(b"1");
        let d2 = Digest::sha256(b"2");
        let text = format!(
            r#"{{"schemaVersion":2,"annotations":{{"x":"y"}},"manifests":[
            {{"mediaType":"m","digest":"{d1}","size":1,"platform":{{"os":"linux"}},
              "annotations":{{"{REF_NAME}":"v1"}}}}]}}"#
        );
        let mut index = IndexFile::parse(Path::new("index.json"), text.as_bytes()).unwrap();
        index.add(Entry::new("m", &d2, 2, Some("v1".into()), None));
        index.add(Entry::new("m", &d2, 2, None, None));
        let again = IndexFile::parse(Path::new("i"), &index.to_bytes()).unwrap();
        assert_eq!(again.entries.len(), 1);
        assert_eq!(again.entries[0].digest, d2);
        assert_eq!(again.other["annotations"]["x"], "y");
        let bad = r#"{"schemaVersion":2,"manifests":[{"mediaType":"m","digest":"sha256:../../etc/passwd","size":1}]}"#;
        assert!(matches!(
            IndexFile::parse(Path::new("i"), bad.as_bytes()),
            Err(LayoutError::InvalidDigest { .. })
        ));
    }
}
