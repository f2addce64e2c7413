//! Where an export writes: a layout directory, or an archive (`archive.rs`).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream;
use registry_core::{ByteStream, Digest};
use tokio::io::AsyncWriteExt;

use crate::LayoutError;
use crate::archive::TarSink;
use crate::format::{self, INDEX_JSON, IndexFile, OCI_LAYOUT, OCI_LAYOUT_CONTENT};
use crate::stream::{checked, mismatch_of};

/// An export's destination.
pub(crate) enum Sink {
    Dir(DirSink),
    Tar(Box<TarSink>),
}

impl Sink {
    /// Whether the destination already has blob `digest` of `size` bytes.
    pub(crate) async fn has(&self, digest: &Digest, size: u64) -> Result<bool, LayoutError> {
        match self {
            Sink::Dir(d) => d.has(digest, size).await,
            Sink::Tar(t) => Ok(t.has(digest)),
        }
    }

    /// Writes blob `digest`: `body` must be exactly `size` bytes (and, with `hash`,
    /// hash to `digest`); otherwise nothing is written under its name.
    pub(crate) async fn put(
        &mut self,
        digest: &Digest,
        size: u64,
        body: ByteStream,
        hash: bool,
    ) -> Result<(), LayoutError> {
        let body = checked(body, digest.clone(), size, hash);
        match self {
            Sink::Dir(d) => d.put(digest, body).await,
            Sink::Tar(t) => t.put(digest, size, body).await,
        }
    }

    /// Writes a blob held in memory (a manifest, already verified).
    pub(crate) async fn put_bytes(
        &mut self,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<(), LayoutError> {
        let size = bytes.len() as u64;
        let body = stream::iter([Ok(bytes)]).boxed();
        self.put(digest, size, body, false).await
    }

    /// The destination's `index.json`, as it was plus what this export added.
    pub(crate) fn index(&mut self) -> &mut IndexFile {
        match self {
            Sink::Dir(d) => &mut d.index,
            Sink::Tar(t) => &mut t.index,
        }
    }

    /// Writes `index.json` (and `oci-layout`): the export becomes visible.
    pub(crate) async fn finish(self) -> Result<(), LayoutError> {
        match self {
            Sink::Dir(d) => d.finish().await,
            Sink::Tar(t) => t.finish().await,
        }
    }
}

/// A layout directory, new or existing.
pub(crate) struct DirSink {
    root: PathBuf,
    index: IndexFile,
}

fn blocking_io<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> impl std::future::Future<Output = Result<T, LayoutError>> {
    let path = path.to_owned();
    async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| LayoutError::io(&path, std::io::Error::other(e)))?
            .map_err(|e| LayoutError::io(&path, e))
    }
}

/// Makes a file's or directory's current entries durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Refuses to turn a directory with other content into a layout: a mistyped path must
/// not scatter `blobs/` and `index.json` into, say, a home directory. What an export
/// interrupted before its end leaves (`blobs/` only) is fine.
fn check_empty(root: &Path) -> Result<(), LayoutError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(LayoutError::io(root, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| LayoutError::io(root, e))?;
        let name = entry.file_name();
        if name != "blobs" && !name.to_string_lossy().starts_with(".tmp-") {
            return Err(LayoutError::NotALayout {
                path: root.to_owned(),
            });
        }
    }
    Ok(())
}

impl DirSink {
    /// Opens `root` for writing: an existing layout (checked, its `index.json` kept) or
    /// a new or empty directory.
    pub(crate) async fn open(root: &Path) -> Result<DirSink, LayoutError> {
        let existing = root.join(OCI_LAYOUT).exists();
        let index = if existing {
            format::check_oci_layout(root)?;
            match IndexFile::read(root) {
                Ok(index) => index,
                // A layout being created by another tool may not have one yet.
                Err(LayoutError::MissingFile { .. }) => IndexFile::default(),
                Err(e) => return Err(e),
            }
        } else {
            // Created by the first write, so that an export failing before it (an
            // unknown repository, say) leaves no empty directory behind.
            check_empty(root)?;
            IndexFile::default()
        };
        Ok(DirSink {
            root: root.to_owned(),
            index,
        })
    }

    /// Present with the right size. The content is not re-hashed: a layout's blobs are
    /// only ever written under their digest after checking it (by this crate, or by
    /// the tool that made the layout).
    async fn has(&self, digest: &Digest, size: u64) -> Result<bool, LayoutError> {
        let path = format::blob_path(&self.root, digest);
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(meta.is_file() && meta.len() == size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(LayoutError::io(path, e)),
        }
    }

    /// Streams into a temporary file beside the blob, fsyncs it, then renames it into
    /// place: a blob's name never shows partial content, even after a crash.
    async fn put(&mut self, digest: &Digest, mut body: ByteStream) -> Result<(), LayoutError> {
        let path = format::blob_path(&self.root, digest);
        let dir = path.parent().expect("blobs/<algorithm>/<hex>").to_owned();
        let tmp = {
            let dir = dir.clone();
            blocking_io(&dir.clone(), move || {
                std::fs::create_dir_all(&dir)?;
                let mut builder = tempfile::Builder::new();
                builder.prefix(".tmp-");
                // Blobs are content, readable by whoever reads the layout (the
                // temporary file's own default is owner-only).
                #[cfg(unix)]
                builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
                builder.tempfile_in(&dir)
            })
            .await?
        };
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| LayoutError::io(tmp.path(), e))?;
        let mut file = tokio::fs::File::from_std(file);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| match mismatch_of(&e) {
                Some(reason) => LayoutError::ServedWrong {
                    digest: digest.clone(),
                    reason,
                },
                None => LayoutError::registry(digest, registry_core::Error::storage(e)),
            })?;
            file.write_all(&chunk)
                .await
                .map_err(|e| LayoutError::io(tmp.path(), e))?;
        }
        file.sync_all()
            .await
            .map_err(|e| LayoutError::io(tmp.path(), e))?;
        drop(file);
        blocking_io(&path.clone(), move || {
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        })
        .await
    }

    /// Renames are made durable with one fsync of each blob directory, then
    /// `index.json` is replaced (written aside, fsynced, renamed, directory fsynced): it
    /// is the layout's root, so until it is in place the layout is the old one, with
    /// every blob it names present.
    async fn finish(self) -> Result<(), LayoutError> {
        let root = self.root.clone();
        let index = self.index.to_bytes();
        blocking_io(&root.clone(), move || {
            std::fs::create_dir_all(&root)?;
            let blobs = root.join("blobs");
            if blobs.is_dir() {
                for dir in std::fs::read_dir(&blobs)? {
                    let dir = dir?.path();
                    if dir.is_dir() {
                        sync_dir(&dir)?;
                    }
                }
                sync_dir(&blobs)?;
            }
            for (name, bytes) in [(OCI_LAYOUT, OCI_LAYOUT_CONTENT), (INDEX_JSON, &index[..])] {
                if name == OCI_LAYOUT && root.join(name).exists() {
                    continue;
                }
                let mut tmp = tempfile::Builder::new()
                    .prefix(".tmp-")
                    .tempfile_in(&root)?;
                std::io::Write::write_all(&mut tmp, bytes)?;
                tmp.as_file().sync_all()?;
                #[cfg(unix)]
                std::fs::set_permissions(
                    tmp.path(),
                    std::os::unix::fs::PermissionsExt::from_mode(0o644),
                )?;
                tmp.persist(root.join(name)).map_err(|e| e.error)?;
            }
            sync_dir(&root)?;
            // The layout directory itself may be new: its name is an entry of its parent.
            match root.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
                _ => Ok(()),
            }
        })
        .await
    }
}
