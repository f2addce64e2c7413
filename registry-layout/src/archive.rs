//! `oci-archive`: an image layout in a tar file. Read by unpacking the layout's files
//! into a staging directory; written by streaming entries straight into the tar.

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read};
use std::path::{Component, Path, PathBuf};

use registry_core::{ByteStream, Digest};

use crate::LayoutError;
use crate::format::{self, INDEX_JSON, IndexFile, MAX_INDEX_JSON, OCI_LAYOUT, OCI_LAYOUT_CONTENT};
use crate::stream::mismatch_of;

/// Buffer between the tar writer and the file: the tar crate copies a blob through it
/// in pieces this large instead of 8 KiB ones.
const WRITE_BUFFER: usize = 256 * 1024;

/// An entry's name as a `/`-separated relative path, or why it is refused. `None` for
/// the archive's root itself (`./`).
fn entry_name(raw: &Path) -> Result<Option<String>, &'static str> {
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => match part.to_str() {
                Some(part) => parts.push(part),
                None => return Err("not UTF-8"),
            },
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' leads out of the layout"),
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path"),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Whether `name` is one of the files an image layout is made of.
fn is_layout_file(name: &str) -> bool {
    if name == OCI_LAYOUT || name == INDEX_JSON {
        return true;
    }
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() == 3 && parts[0] == "blobs"
}

fn entries_error(archive: &Path, e: std::io::Error) -> LayoutError {
    LayoutError::io(archive, e)
}

fn open_archive(archive: &Path) -> Result<tar::Archive<BufReader<std::fs::File>>, LayoutError> {
    let file = std::fs::File::open(archive).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LayoutError::MissingFile {
            path: archive.to_owned(),
            referenced_by: None,
        },
        _ => LayoutError::io(archive, e),
    })?;
    Ok(tar::Archive::new(BufReader::with_capacity(
        WRITE_BUFFER,
        file,
    )))
}

/// Unpacks the layout files of `archive` into the directory `into` (blocking).
///
/// Why unpack at all: a tar is read front to back, its entries in whatever order the
/// writer chose (`index.json` may well come last), while an import must check the
/// whole layout before pushing anything and then push children before parents. The
/// staged copy gives the import random access at the cost of the archive's size in
/// disk space, never in memory (each entry is copied through a fixed buffer).
///
/// Only `oci-layout`, `index.json` and `blobs/<algorithm>/<name>` are written, each as
/// a regular file under `into`; other entries are skipped unread. A name with `..` or
/// an absolute name is refused, and so is a link (or device, FIFO) in the place of a
/// layout file: nothing is ever created outside `into`, nor read through a link.
pub(crate) fn extract(archive: &Path, into: &Path) -> Result<(), LayoutError> {
    let mut ar = open_archive(archive)?;
    for entry in ar.entries().map_err(|e| entries_error(archive, e))? {
        let mut entry = entry.map_err(|e| entries_error(archive, e))?;
        let raw = entry
            .path()
            .map_err(|e| entries_error(archive, e))?
            .into_owned();
        let unsafe_path = |reason| LayoutError::UnsafePath {
            path: archive.to_owned(),
            name: raw.display().to_string(),
            reason,
        };
        let Some(name) = entry_name(&raw).map_err(unsafe_path)? else {
            continue;
        };
        let kind = entry.header().entry_type();
        if kind.is_dir() || !is_layout_file(&name) {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(unsafe_path(
                "a link or special file where the layout has a file",
            ));
        }
        let dest = into.join(&name);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| LayoutError::io(parent, e))?;
        }
        let mut out = std::fs::File::create(&dest).map_err(|e| LayoutError::io(&dest, e))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| entries_error(archive, e))?;
    }
    Ok(())
}

type Builder = tar::Builder<BufWriter<std::fs::File>>;

/// An archive being written: a temporary file beside the target, renamed over it when
/// the export finishes.
pub(crate) struct TarSink {
    target: PathBuf,
    tmp: tempfile::NamedTempFile,
    /// `None` only while a blocking task is writing with it.
    builder: Option<Builder>,
    /// Names of the entries written so far (directories end in `/`).
    names: HashSet<String>,
    pub(crate) index: IndexFile,
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    h.set_mtime(now);
    h
}

/// Adds the directory entries `name` needs that are not in the archive yet (some
/// extractors do not create parent directories by themselves).
fn add_parents(
    builder: &mut Builder,
    names: &mut HashSet<String>,
    name: &str,
) -> std::io::Result<()> {
    let mut at = 0;
    while let Some(slash) = name[at..].find('/') {
        let dir = format!("{}/", &name[..at + slash]);
        if names.insert(dir.clone()) {
            let mut h = header(tar::EntryType::Directory, 0, 0o755);
            builder.append_data(&mut h, &dir, std::io::empty())?;
        }
        at += slash + 1;
    }
    Ok(())
}

impl TarSink {
    /// Starts writing `target`. An existing archive is carried over into the new one
    /// entry by entry (streamed, so memory stays flat): the export adds to it.
    pub(crate) async fn open(target: &Path) -> Result<TarSink, LayoutError> {
        let target = target.to_owned();
        let t = target.clone();
        tokio::task::spawn_blocking(move || TarSink::open_blocking(t))
            .await
            .map_err(|e| LayoutError::io(&target, std::io::Error::other(e)))?
    }

    fn open_blocking(target: PathBuf) -> Result<TarSink, LayoutError> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&parent)
            .map_err(|e| LayoutError::io(&parent, e))?;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| LayoutError::io(tmp.path(), e))?;
        let mut sink = TarSink {
            builder: Some(tar::Builder::new(BufWriter::with_capacity(
                WRITE_BUFFER,
                file,
            ))),
            target,
            tmp,
            names: HashSet::new(),
            index: IndexFile::default(),
        };
        if sink.target.exists() {
            sink.carry_over()?;
        }
        Ok(sink)
    }

    /// Copies the existing archive's entries, except `index.json` (kept in memory, to
    /// be added to) and `oci-layout` (written again at the end).
    fn carry_over(&mut self) -> Result<(), LayoutError> {
        let target = self.target.clone();
        let io = |e| LayoutError::io(&target, e);
        let mut ar = open_archive(&target)?;
        let builder = self.builder.as_mut().expect("not writing");
        let mut layout = false;
        for entry in ar.entries().map_err(io)? {
            let mut entry = entry.map_err(io)?;
            let raw = entry.path().map_err(io)?.into_owned();
            let unsafe_path = |reason| LayoutError::UnsafePath {
                path: target.clone(),
                name: raw.display().to_string(),
                reason,
            };
            let Some(name) = entry_name(&raw).map_err(unsafe_path)? else {
                continue;
            };
            let kind = entry.header().entry_type();
            let named = |n: &str| target.join(n);
            match name.as_str() {
                OCI_LAYOUT => {
                    let mut bytes = Vec::new();
                    (&mut entry)
                        .take(64 * 1024)
                        .read_to_end(&mut bytes)
                        .map_err(io)?;
                    format::check_oci_layout_bytes(&named(OCI_LAYOUT), &bytes)?;
                    layout = true;
                }
                INDEX_JSON => {
                    let mut bytes = Vec::new();
                    (&mut entry)
                        .take(MAX_INDEX_JSON)
                        .read_to_end(&mut bytes)
                        .map_err(io)?;
                    self.index = IndexFile::parse(&named(INDEX_JSON), &bytes)?;
                }
                _ if kind.is_dir() => {
                    let dir = format!("{name}/");
                    if self.names.insert(dir.clone()) {
                        let mut h = entry.header().clone();
                        builder
                            .append_data(&mut h, &dir, std::io::empty())
                            .map_err(io)?;
                    }
                }
                _ if kind.is_file() || kind == tar::EntryType::Continuous => {
                    if self.names.insert(name.clone()) {
                        let mut h = entry.header().clone();
                        builder.append_data(&mut h, &name, &mut entry).map_err(io)?;
                    }
                }
                _ => return Err(unsafe_path("a link or special file in the archive")),
            }
        }
        if !layout {
            return Err(LayoutError::NotALayout { path: target });
        }
        Ok(())
    }

    pub(crate) fn has(&self, digest: &Digest) -> bool {
        self.names.contains(&format::blob_name(digest))
    }

    /// Appends blob `digest`. The tar writer is synchronous: it runs on a blocking
    /// thread and reads `body` through a bridge, one chunk at a time.
    pub(crate) async fn put(
        &mut self,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<(), LayoutError> {
        let name = format::blob_name(digest);
        let mut builder = self.builder.take().expect("one write at a time");
        let mut names = std::mem::take(&mut self.names);
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(body));
        let (builder, names, result) = tokio::task::spawn_blocking(move || {
            let result = add_parents(&mut builder, &mut names, &name).and_then(|()| {
                let mut h = header(tar::EntryType::Regular, size, 0o644);
                builder.append_data(&mut h, &name, reader)
            });
            if result.is_ok() {
                names.insert(name);
            }
            (builder, names, result)
        })
        .await
        .map_err(|e| LayoutError::io(&self.target, std::io::Error::other(e)))?;
        self.builder = Some(builder);
        self.names = names;
        result.map_err(|e| match mismatch_of(&e) {
            Some(reason) => LayoutError::ServedWrong {
                digest: digest.clone(),
                reason,
            },
            None => LayoutError::io(&self.target, e),
        })
    }

    /// Appends `oci-layout` and `index.json`, ends the archive, fsyncs it and renames
    /// it over the target (then fsyncs the directory): readers see the old archive or
    /// the whole new one.
    pub(crate) async fn finish(mut self) -> Result<(), LayoutError> {
        let target = self.target.clone();
        let index = self.index.to_bytes();
        let mut builder = self.builder.take().expect("not writing");
        let tmp = self.tmp;
        let io_target = target.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for (name, bytes) in [(OCI_LAYOUT, OCI_LAYOUT_CONTENT), (INDEX_JSON, &index[..])] {
                let mut h = header(tar::EntryType::Regular, bytes.len() as u64, 0o644);
                builder.append_data(&mut h, name, bytes)?;
            }
            let file = builder
                .into_inner()?
                .into_inner()
                .map_err(|e| e.into_error())?;
            file.sync_all()?;
            tmp.persist(&target).map_err(|e| e.error)?;
            let dir = match target.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            std::fs::File::open(dir)?.sync_all()
        })
        .await
        .map_err(|e| LayoutError::io(&io_target, std::io::Error::other(e)))?
        .map_err(|e| LayoutError::io(&io_target, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names() {
        assert_eq!(
            entry_name(Path::new("./blobs/sha256/ab")),
            Ok(Some("blobs/sha256/ab".into()))
        );
        assert_eq!(entry_name(Path::new("./")), Ok(None));
        assert!(entry_name(Path::new("../x")).is_err());
        assert!(entry_name(Path::new("blobs/../../x")).is_err());
        assert!(entry_name(Path::new("/etc/passwd")).is_err());
        assert!(is_layout_file("blobs/sha256/ab"));
        assert!(!is_layout_file("blobs/sha256"));
        assert!(!is_layout_file("other"));
    }
}
