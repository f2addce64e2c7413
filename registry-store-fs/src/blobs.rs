//! Blobs as files: `blobs/<algorithm>/<2 hex>/<hex>`, written once through upload files
//! under `uploads/`, made visible by a hard link after an fsync. In an
//! [`FsStore`](crate::FsStore), small bytes stored whole (manifests) are kept in the
//! metadata database instead ([`crate::inline`]).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use registry_core::store::{
    BlobRead, BlobStore, ByteRange, ByteStream, CommitOutcome, UploadId, UploadInfo,
};
use registry_core::{Algorithm, CommitLog, Digest, Error, Hasher, RepoName, Result, Timestamp};
use serde::{Deserialize, Serialize};

use crate::inline::{INLINE_MAX, InlineBlobs};
use crate::new_database::NewDatabase;
use crate::redb_kv::RedbKv;
use crate::scrub::{FileStamp, VerifiedFiles, corrupt_error};

/// Reads and writes move in blocks this large: few system calls, bounded memory.
const BLOCK: usize = 1 << 20;

/// Most chunks handed to one `writev` (Linux accepts 1024).
const MAX_IOVECS: usize = 1024;

/// Blob files and upload sessions under one directory.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: Arc<PathBuf>,
    /// Upload sessions being appended to or committed in this process: one at a time
    /// per session, so an append never writes into a file being committed.
    busy: Arc<Mutex<HashSet<UploadId>>>,
    /// Fan-out directories (`blobs/<algorithm>/<2 hex>`) whose own name is known to be
    /// durable: a blob linked into one of them survives a power loss once that
    /// directory is fsynced. Created lazily (creating all 512 up front costs more than
    /// a store open should), each made durable once per process.
    durable_fans: Arc<Mutex<HashSet<PathBuf>>>,
    /// The store's directories: durable before any write is acknowledged.
    skeleton: Arc<Skeleton>,
    /// Files read whole and found to match their digest, and files a scrub found
    /// corrupt (docs/design.md §5, "Cost of verified reads").
    verified: Arc<VerifiedFiles>,
    /// Sessions committed as a new blob file and not deleted yet, with the digest and
    /// the file's stamp at the commit: deleting the session unlinks its name for the
    /// file, which moves the file's change time, so the file is marked verified after
    /// that ([`mark_committed`]).
    committed: Arc<Mutex<HashMap<UploadId, (Digest, FileStamp)>>>,
    /// In an [`FsStore`](crate::FsStore): where `put_bytes` keeps small bytes. Every
    /// read, stat, listing and deletion looks there first, then at the files.
    inline: Option<InlineBlobs>,
}

/// The directories of a store (`blobs/<algorithm>`, `blobs`, `uploads`) and the name
/// of its redb file, made durable once per process: by a background task right after
/// the store opens (so that opening, and a server's readiness, do not wait for four
/// directory fsyncs), and in any case by the first write before it is acknowledged
/// ([`Skeleton::ensure_durable`], called by every write path of the blob store and of
/// the metadata engine). Until then nothing has been acknowledged, so a crash loses
/// nothing: the next open creates what is missing.
#[derive(Debug)]
pub(crate) struct Skeleton {
    root: PathBuf,
    durable: AtomicBool,
    /// Held while making things durable; a new store's database that has no name yet.
    lock: Mutex<Option<NewDatabase>>,
}

impl Skeleton {
    pub(crate) fn new(root: &Path) -> Skeleton {
        Skeleton {
            root: root.to_owned(),
            durable: AtomicBool::new(false),
            lock: Mutex::new(None),
        }
    }

    /// `db` is to be published (synced and named) before anything is acknowledged.
    pub(crate) fn publish_first(&self, db: NewDatabase) {
        *self.lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(db);
    }

    /// Returns once the store's directories (and everything named in them so far,
    /// among which the fan-out directories and the redb file, published first if it
    /// is new) are durable.
    pub(crate) fn ensure_durable(&self) -> io::Result<()> {
        if self.durable.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut unpublished = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.durable.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(db) = unpublished.as_ref() {
            db.publish()?;
            *unpublished = None;
        }
        let blobs = self.root.join("blobs");
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            fsync_dir(&blobs.join(algorithm.name()))?;
        }
        fsync_dir(&blobs)?;
        fsync_dir(&self.root)?;
        self.durable.store(true, Ordering::Release);
        Ok(())
    }
}

/// What an upload session's sidecar file records.
#[derive(Debug, Serialize, Deserialize)]
struct Sidecar {
    repo: RepoName,
    started_at: Timestamp,
}

/// An upload session's record, if it exists and is whole. One that does not parse was
/// torn by a power loss (sessions are not fsynced): the session is as good as unknown.
fn read_sidecar(path: &Path) -> Result<Option<Sidecar>> {
    let record = match fs::read(path) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    Ok(serde_json::from_slice(&record).ok())
}

fn io_err(e: io::Error) -> Error {
    Error::storage(e)
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> Result<R> + Send + 'static) -> Result<R> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::storage(format!("file task failed: {e}")))?
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes sure fan-out directory `dir` exists and its name is durable, fsyncing its
/// parent the first time this process sees it. Every commit into it checks this, not
/// only the one that created it: a concurrent commit must not acknowledge a blob in a
/// directory whose creation is not durable yet.
fn make_durable_fan(fans: &Mutex<HashSet<PathBuf>>, dir: &Path) -> io::Result<()> {
    let mut fans = fans.lock().unwrap_or_else(|p| p.into_inner());
    if fans.contains(dir) {
        return Ok(());
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    fsync_dir(dir.parent().expect("fan-out directories have a parent"))?;
    fans.insert(dir.to_owned());
    Ok(())
}

/// Whether `blob` is the file a scrub found corrupt for `digest`, unchanged since.
fn is_corrupt_file(verified: &VerifiedFiles, digest: &Digest, blob: &Path) -> bool {
    fs::metadata(blob).is_ok_and(|meta| verified.is_corrupt(digest, &meta))
}

/// Puts `source` (an upload of `digest`, just verified) under `blob`'s name if the file
/// there is one a scrub found corrupt, unchanged since: pushing the blob again is how a
/// corrupt file is repaired. Linked under a temporary name and renamed over the old
/// one, so readers see the old file or the new one, never neither (a temporary name
/// left by a crash is removed on open). Any other file there stays: blob files are
/// immutable once named.
fn replace_corrupt(
    verified: &VerifiedFiles,
    digest: &Digest,
    source: &Path,
    blob: &Path,
    tmp: &Path,
) -> io::Result<()> {
    if !is_corrupt_file(verified, digest, blob) {
        return Ok(());
    }
    fs::hard_link(source, tmp)?;
    if let Err(e) = fs::rename(tmp, blob) {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    replaced(verified, digest, blob);
    Ok(())
}

/// A corrupt file was replaced: its bytes are hashed again by its next verified read.
fn replaced(verified: &VerifiedFiles, digest: &Digest, blob: &Path) {
    verified.clear_corrupt(digest);
    tracing::warn!(%digest, path = %blob.display(),
        "a blob file a scrub found corrupt was replaced by a new upload of its bytes");
}

/// Marks the file under `blob` as verified for `digest` if it is still the file that
/// `committed` stamped (same device and inode), at its current stamp. Its bytes are the
/// ones the registry hashed on their way in (a commit's contract), so its first read
/// need not hash them again; the exact stamp is taken because nothing of the registry
/// writes a named blob file, and a later change through the file system still moves it
/// (docs/design.md §5, "Hashed once per file and process").
fn mark_committed(verified: &VerifiedFiles, digest: Digest, blob: &Path, committed: FileStamp) {
    if let Some(now) = fs::metadata(blob).ok().and_then(|m| FileStamp::exact(&m))
        && now.same_file(&committed)
    {
        verified.mark(digest, now);
    }
}

/// At most this many sessions committed and not yet deleted are remembered for
/// [`mark_committed`]; past it they are forgotten (their first read hashes them).
const MAX_COMMITTED: usize = 10_000;

/// Releases a session's busy mark when dropped.
struct BusyGuard {
    busy: Arc<Mutex<HashSet<UploadId>>>,
    id: UploadId,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl FsBlobStore {
    /// Uses (and creates) `root/blobs` and `root/uploads`, and makes them durable.
    pub fn open(root: &Path) -> Result<Self> {
        let skeleton = Arc::new(Skeleton::new(root));
        let store = Self::open_with(root, skeleton.clone())?;
        skeleton.ensure_durable().map_err(io_err)?;
        Ok(store)
    }

    /// Like [`open`](Self::open), but the directories are made durable by `skeleton`
    /// (see [`Skeleton`]), not here: every write makes sure of it before it is
    /// acknowledged.
    pub(crate) fn open_with(root: &Path, skeleton: Arc<Skeleton>) -> Result<Self> {
        let blobs = root.join("blobs");
        let mut durable_fans = HashSet::new();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = blobs.join(algorithm.name());
            fs::create_dir_all(&dir).map_err(io_err)?;
            // Fan-out directories an earlier process created may not be durable yet (it
            // may have crashed before fsyncing their parent): the skeleton's fsync of
            // `dir` makes them so before any commit into them is acknowledged.
            for fan in fs::read_dir(&dir).map_err(io_err)? {
                durable_fans.insert(fan.map_err(io_err)?.path());
            }
        }
        let uploads = root.join("uploads");
        fs::create_dir_all(&uploads).map_err(io_err)?;
        // Sessions being created or deleted when a crash struck: never acknowledged
        // (creation) or already forgotten (deletion). Nothing else uses these names.
        for entry in fs::read_dir(&uploads).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp-") || name.starts_with(".trash-") {
                if entry.file_type().map_err(io_err)?.is_dir() {
                    fs::remove_dir_all(entry.path()).map_err(io_err)?;
                } else {
                    fs::remove_file(entry.path()).map_err(io_err)?;
                }
            }
        }
        Ok(FsBlobStore {
            root: Arc::new(root.to_owned()),
            busy: Arc::default(),
            durable_fans: Arc::new(Mutex::new(durable_fans)),
            skeleton,
            verified: Arc::default(),
            committed: Arc::default(),
            inline: None,
        })
    }

    /// Keeps small bytes stored whole in `kv`'s database from now on (see
    /// [`crate::inline`]).
    pub(crate) fn with_inline(mut self, kv: RedbKv) -> Self {
        self.inline = Some(InlineBlobs::new(kv));
        self
    }

    /// `put_bytes` and `put_bytes_before_link`: with `durable`, bytes kept inline are
    /// durable when it returns, without it once a later commit to the database is. A
    /// file is always durable when it returns.
    async fn store_bytes(
        &self,
        digest: &Digest,
        bytes: Bytes,
        durable: bool,
    ) -> Result<CommitOutcome> {
        let tmp = self.tmp_path();
        let blob = self.blob_path(digest);
        let fans = self.durable_fans.clone();
        let skeleton = self.skeleton.clone();
        let verified = self.verified.clone();
        let gate = verified.any_corrupt().then(|| digest.clone());
        let digest_owned = digest.clone();
        let inline = self.inline.clone().filter(|_| bytes.len() <= INLINE_MAX);
        blocking(move || {
            // Small bytes go to the metadata database, unless a file already holds
            // this blob (stored before, or uploaded): then the file path below answers
            // (`AlreadyPresent`, or the replacement of a corrupt file).
            if let Some(inline) = &inline
                && matches!(fs::symlink_metadata(&blob), Err(e) if e.kind() == io::ErrorKind::NotFound)
            {
                return inline.put(&digest_owned, &bytes, durable);
            }
            skeleton.ensure_durable().map_err(io_err)?;
            let dir = blob.parent().expect("blob paths have a parent");
            make_durable_fan(&fans, dir).map_err(io_err)?;
            // A file a scrub found corrupt is replaced by these bytes (just verified).
            let replace = gate
                .as_ref()
                .is_some_and(|d| is_corrupt_file(&verified, d, &blob));
            if !replace && fs::symlink_metadata(&blob).is_ok() {
                // Blob files are immutable once named: nothing to write. Their name may
                // not be durable yet (a concurrent commit), hence the fsync.
                fsync_dir(dir).map_err(io_err)?;
                return Ok(CommitOutcome::AlreadyPresent);
            }
            let stored = (|| {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                if let (true, Some(d)) = (replace, &gate) {
                    fs::rename(&tmp, &blob)?;
                    fsync_dir(dir)?;
                    replaced(&verified, d, &blob);
                    return Ok(CommitOutcome::AlreadyPresent);
                }
                let outcome = match fs::hard_link(&tmp, &blob) {
                    Ok(()) => CommitOutcome::Stored,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        CommitOutcome::AlreadyPresent
                    }
                    Err(e) => return Err(e),
                };
                fsync_dir(dir)?;
                Ok(outcome)
            })();
            // The bytes live on under the blob's name (or were not needed). A temporary
            // file that cannot be removed is harmless: the next open removes it.
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    tracing::warn!(path = %tmp.display(), error = %e, "cannot remove a temporary file");
                }
                _ => {}
            }
            // A new file holds the bytes the caller hashed: verified, now that its last
            // other name is gone (which moved its change time). One stat: whatever file
            // is under the name now was stored by this store from hashed bytes, unless
            // written from outside in the microseconds since.
            if let Ok(CommitOutcome::Stored) = stored
                && let Some(stamp) = fs::metadata(&blob).ok().and_then(|m| FileStamp::exact(&m))
            {
                verified.mark(digest_owned, stamp);
            }
            stored.map_err(io_err)
        })
        .await
    }

    /// How many verified reads were served without hashing, their file having been
    /// verified whole by this process and unchanged since.
    pub fn reads_not_rehashed(&self) -> u64 {
        self.verified.skipped.load(Ordering::Relaxed)
    }

    /// Whether a verified read of a file already read whole and verified by this
    /// process, unchanged since, is served without hashing it again (default: yes;
    /// `false` hashes every verified read).
    pub fn remember_verified(&self, on: bool) {
        self.verified.off.store(!on, Ordering::Relaxed);
        if !on {
            self.verified.clear_marks();
        }
    }

    /// What this process knows about its files' content (for the scrub).
    pub(crate) fn verified(&self) -> &Arc<VerifiedFiles> {
        &self.verified
    }

    /// The data directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob's file lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().name())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    /// When a blob file's bytes were last written (the upload's last append: the
    /// commit links the same file), `None` if there is no such file.
    /// An inline blob has no such time: it reads as the epoch, old enough for any
    /// grace (which only saves work; the deletion lease is what keeps a concurrent
    /// commit safe).
    pub(crate) async fn modified(&self, d: &Digest) -> Result<Option<std::time::SystemTime>> {
        if let Some(inline) = &self.inline
            && inline.size(d)?.is_some()
        {
            return Ok(Some(std::time::SystemTime::UNIX_EPOCH));
        }
        let path = self.blob_path(d);
        blocking(move || match fs::metadata(&path) {
            Ok(m) => m.modified().map(Some).map_err(io_err),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(e)),
        })
        .await
    }

    /// A session lives in its own directory, created and removed by a rename, so a
    /// crash never leaves half a session behind under a session's name.
    fn upload_dir(&self, id: &UploadId) -> PathBuf {
        self.root.join("uploads").join(id.as_str())
    }

    /// A fresh temporary name (`uploads/.tmp-<random>`): never a session's, and removed
    /// on open if a crash leaves it.
    fn tmp_path(&self) -> PathBuf {
        self.root
            .join("uploads")
            .join(format!(".tmp-{}", UploadId::random()))
    }

    fn upload_data(&self, id: &UploadId) -> PathBuf {
        self.upload_dir(id).join("data")
    }

    fn upload_committed(&self, id: &UploadId) -> PathBuf {
        self.upload_dir(id).join("data.committed")
    }

    fn upload_sidecar(&self, id: &UploadId) -> PathBuf {
        self.upload_dir(id).join("info.json")
    }

    fn mark_busy(&self, id: &UploadId) -> Result<BusyGuard> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(id.clone()) {
            return Err(Error::TooManyRequests {
                reason: "another request is writing to this upload".into(),
                retry_after: None,
            });
        }
        Ok(BusyGuard {
            busy: self.busy.clone(),
            id: id.clone(),
        })
    }

    /// Where the session's data file may be: still open for appends, or already
    /// committed (renamed so that no later append can write into a linked blob file).
    fn session_files(&self, id: &UploadId) -> [PathBuf; 2] {
        [self.upload_data(id), self.upload_committed(id)]
    }
}

/// Applies `open` to the first of a session's data files that exists. Tried in the order
/// a commit renames them, so a commit racing with this call cannot hide both.
fn open_session_file<T>(
    candidates: &[PathBuf; 2],
    open: impl Fn(&Path) -> io::Result<T>,
) -> Result<Option<T>> {
    for path in candidates {
        match open(path) {
            Ok(t) => return Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(None)
}

/// An append in progress: the session's data file (opened by the first block task),
/// where the append started, and the session's busy mark. Dropping it without
/// [`Appender::finish`] (the request future was cancelled, say a client went away)
/// cuts the file back to where the append started, because appends are
/// all-or-nothing even when nobody is left to see the error.
///
/// The first block write opens the file; for a body smaller than the first block,
/// opening, writing and setting the idle time happen in one blocking task (every hop
/// to the blocking pool costs two thread wake-ups).
struct Appender {
    state: Arc<Mutex<AppendState>>,
    start: u64,
    busy: Option<BusyGuard>,
}

struct AppendState {
    /// The session's data file, to be opened (and its length checked against the
    /// append's offset) by the first task.
    path: PathBuf,
    id: UploadId,
    file: Option<File>,
    /// Set once the append has been rolled back: a block write still queued on the
    /// blocking pool must then not land after the truncation.
    rolled_back: bool,
}

impl AppendState {
    fn roll_back(&mut self, start: u64) -> io::Result<()> {
        self.rolled_back = true;
        // Not opened: nothing was written.
        match &self.file {
            Some(f) => f.set_len(start),
            None => Ok(()),
        }
    }

    /// The data file, opened on first use if its length is `offset` (where the
    /// append starts); the session's errors otherwise.
    fn file(&mut self, offset: u64) -> Result<&mut File> {
        if self.file.is_none() {
            let mut f = match OpenOptions::new().write(true).open(&self.path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(Error::UploadUnknown {
                        id: self.id.to_string(),
                    });
                }
                Err(e) => return Err(io_err(e)),
            };
            let len = f.metadata().map_err(io_err)?.len();
            if len != offset {
                return Err(Error::UploadOffset {
                    expected: len,
                    got: offset,
                });
            }
            f.seek(SeekFrom::Start(offset)).map_err(io_err)?;
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }
}

fn lock(state: &Mutex<AppendState>) -> std::sync::MutexGuard<'_, AppendState> {
    // A panic while writing leaves nothing we rely on: the file length is re-read.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Appender {
    fn new(path: PathBuf, id: UploadId, start: u64, busy: BusyGuard) -> Self {
        Appender {
            state: Arc::new(Mutex::new(AppendState {
                path,
                id,
                file: None,
                rolled_back: false,
            })),
            start,
            busy: Some(busy),
        }
    }

    /// Starts writing the chunks in order with vectored writes (the network's frames
    /// go to the file as they are, never copied into one buffer first) and returns
    /// at once: the caller receives the next block meanwhile, and awaits this write
    /// before starting the next one.
    fn start_write(&self, chunks: Vec<Bytes>) -> BlockWrite {
        let (state, start) = (self.state.clone(), self.start);
        BlockWrite(tokio::task::spawn_blocking(move || {
            let mut state = lock(&state);
            if state.rolled_back {
                return Err(Error::storage("append was rolled back"));
            }
            write_all_chunks(state.file(start)?, &chunks).map_err(io_err)
        }))
    }

    /// Cuts the file back to where the append started and waits for it.
    async fn abort(mut self) -> Result<()> {
        let (state, start) = (self.state.clone(), self.start);
        let busy = self.busy.take();
        blocking(move || {
            let result = lock(&state).roll_back(start).map_err(io_err);
            drop(busy);
            result
        })
        .await
    }

    /// Writes the last chunks and keeps what was written; the session's idle time
    /// starts now. An error leaves the append to be aborted.
    async fn finish(&mut self, last: Vec<Bytes>, now: Timestamp) -> Result<()> {
        let (state, start) = (self.state.clone(), self.start);
        blocking(move || {
            let mut state = lock(&state);
            if state.rolled_back {
                return Err(Error::storage("append was rolled back"));
            }
            // Even an empty append opens the file: its offset is checked.
            let file = state.file(start)?;
            write_all_chunks(file, &last).map_err(io_err)?;
            file.set_modified(now.to_system_time()).map_err(io_err)
        })
        .await?;
        // Done: dropping the mark (and the appender) keeps what was written.
        self.busy.take();
        Ok(())
    }
}

/// A block write running on the blocking pool. Dropped without being awaited (the
/// append was cancelled) it still runs, or finds the append rolled back and writes
/// nothing: the state's lock orders it with the roll-back.
struct BlockWrite(tokio::task::JoinHandle<Result<()>>);

impl BlockWrite {
    async fn done(self) -> Result<()> {
        self.0
            .await
            .map_err(|e| Error::storage(format!("file task failed: {e}")))?
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        // `abort` and `finish` take the busy mark; still holding it means cancelled.
        let Some(busy) = self.busy.take() else {
            return;
        };
        let (state, start) = (self.state.clone(), self.start);
        // The session stays busy until the cut is done, so no new append sees the
        // abandoned bytes.
        let cut = move || {
            if let Err(e) = lock(&state).roll_back(start) {
                tracing::warn!(error = %e, "could not roll back a cancelled append");
            }
            drop(busy);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(cut)),
            Err(_) => cut(),
        }
    }
}

/// Writes every chunk, in order, with as few `writev` calls as the kernel allows.
fn write_all_chunks(file: &mut File, chunks: &[Bytes]) -> io::Result<()> {
    let (mut index, mut offset) = (0, 0);
    while index < chunks.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&chunks[index][offset..])
            .chain(chunks[index + 1..].iter().map(|c| &c[..]))
            .take(MAX_IOVECS)
            .map(io::IoSlice::new)
            .collect();
        let mut n = match file.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Advance past what was written: whole chunks, then into the next one.
        while n > 0 {
            let left = chunks[index].len() - offset;
            if n >= left {
                n -= left;
                index += 1;
                offset = 0;
            } else {
                offset += n;
                n = 0;
            }
        }
        while index < chunks.len() && chunks[index].len() == offset {
            index += 1;
            offset = 0;
        }
    }
    Ok(())
}

/// A file being streamed: where it is, what is left, and the hash so far when the read
/// is verified.
struct FileReader {
    file: File,
    left: u64,
    check: Option<(Hasher, Digest)>,
    /// Where to record the file as verified once its last block matched.
    remember: Option<(Arc<VerifiedFiles>, FileStamp)>,
    /// Size of the next block: [`FIRST_BLOCK`], doubling up to [`BLOCK`].
    block: usize,
}

/// The first block of a read is small and the next ones double up to [`BLOCK`]: the
/// first bytes leave sooner, and the reading and hashing of the next block overlaps the
/// sending of this one from early on (for a 1 MiB blob, four blocks instead of one
/// read, hashed and sent in turn).
const FIRST_BLOCK: usize = 128 << 10;

impl FileReader {
    /// A reader of `len` bytes of `file` from its current position, hashed against
    /// `verify` if given.
    fn new(file: File, len: u64, verify: Option<Digest>) -> Self {
        FileReader {
            file,
            left: len,
            check: verify.map(|d| (Hasher::new(d.algorithm()), d)),
            remember: None,
            block: FIRST_BLOCK,
        }
    }

    /// Reads (and hashes, when verifying) the next block on a blocking thread. The last
    /// block of a verified read is only returned if everything hashed to the digest.
    fn next_block(mut self) -> io::Result<(Self, Bytes)> {
        let want = self.left.min(self.block as u64) as usize;
        self.block = (self.block * 2).min(BLOCK);
        // `read_to_end` into reserved capacity reads straight into uninitialised memory
        // (File supports `read_buf`): no zero-filling of every block.
        let mut buf = Vec::with_capacity(want);
        (&mut self.file).take(want as u64).read_to_end(&mut buf)?;
        if buf.len() < want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file shorter than recorded",
            ));
        }
        self.left -= want as u64;
        if let Some((hasher, _)) = self.check.as_mut() {
            // Hashed here, while the block is hot in cache, and in parallel with the
            // socket writing the block before it.
            hasher.update(&buf);
        }
        if self.left == 0
            && let Some((hasher, digest)) = self.check.take()
        {
            let actual = hasher.finish();
            if actual != digest {
                tracing::error!(%digest, %actual, "stored blob does not match its digest");
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("stored blob {digest} is corrupt"),
                ));
            }
            if let Some((verified, stamp)) = self.remember.take() {
                verified.mark(digest, stamp);
            }
        }
        Ok((self, Bytes::from(buf)))
    }
}

type BlockTask = tokio::task::JoinHandle<io::Result<(FileReader, Bytes)>>;

fn spawn_block(reader: FileReader) -> BlockTask {
    tokio::task::spawn_blocking(move || reader.next_block())
}

/// Streams what is left of `reader` in blocks, after `first` if that block was read
/// already, keeping the read of the next block in flight while the current one is sent
/// (two blocks per stream at most: memory stays constant). With a check, the bytes are
/// hashed as they are read and the stream ends in an error instead of its last block if
/// they do not match.
fn file_stream(reader: FileReader, first: Option<Bytes>) -> ByteStream {
    // Even an empty read runs one block, so an empty blob is verified too.
    let next = (first.is_none() || reader.left > 0).then(|| spawn_block(reader));
    let rest = stream::unfold(next, |task: Option<BlockTask>| async move {
        let (reader, chunk) = match task?.await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Some((Err(e), None)),
            Err(e) => return Some((Err(io::Error::other(e)), None)),
        };
        let next = (reader.left > 0).then(|| spawn_block(reader));
        Some((Ok(chunk), next))
    });
    stream::iter(first.map(Ok))
        .chain(rest)
        .filter(|item| futures::future::ready(!matches!(item, Ok(c) if c.is_empty())))
        .boxed()
}

/// A read of an inline blob: whole in memory already, so a read to be verified is
/// hashed before anything is returned, and a mismatch is an error instead of a body
/// that fails at its end.
fn inline_read(
    digest: &Digest,
    bytes: Bytes,
    range: Option<ByteRange>,
    verify: bool,
) -> Result<BlobRead> {
    let size = bytes.len() as u64;
    let body = match range {
        Some(r) => {
            if r.end >= size || r.start > r.end {
                return Err(Error::RangeNotSatisfiable { size });
            }
            bytes.slice(r.start as usize..=r.end as usize)
        }
        None => {
            if verify && !digest.verify(&bytes) {
                return Err(Error::storage(format!(
                    "blob {digest}: the bytes kept for it in meta.redb do not match its digest"
                )));
            }
            bytes
        }
    };
    Ok(BlobRead {
        size,
        range,
        stream: stream::once(futures::future::ready(Ok(body))).boxed(),
    })
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        if let Some(inline) = &self.inline
            && let Some(size) = inline.size(digest)?
        {
            return Ok(Some(size));
        }
        let path = self.blob_path(digest);
        blocking(move || match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(e)),
        })
        .await
    }

    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobRead>> {
        self.read_verified(digest, range, false).await
    }

    /// Verified full reads are hashed on the blocking thread that reads each block.
    async fn read_verified(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        verify: bool,
    ) -> Result<Option<BlobRead>> {
        if let Some(inline) = &self.inline
            && let Some(bytes) = inline.get(digest)?
        {
            return inline_read(digest, bytes, range, verify).map(Some);
        }
        let path = self.blob_path(digest);
        let mut check = (verify && range.is_none()).then(|| digest.clone());
        let verified = self.verified.clone();
        // Only while a scrub has found some file corrupt (rare): the digest to look up.
        let gate = verified.any_corrupt().then(|| digest.clone());
        let opened = blocking(move || {
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(e)),
            };
            let meta = file.metadata().map_err(io_err)?;
            // Found corrupt by a scrub, and unchanged since: refused before any byte,
            // ranges included (a full read would only fail at its end).
            if let Some(d) = &gate
                && verified.is_corrupt(d, &meta)
            {
                return Err(corrupt_error(d, &path));
            }
            let size = meta.len();
            // Verified whole by this process (or committed by it), and unchanged since:
            // not hashed again. A mark is looked up by the exact stamp; one is only
            // made from a read if the file changed long enough ago (`FileStamp::of`).
            let exact = check.as_ref().and_then(|_| FileStamp::exact(&meta));
            if let (Some(d), Some(s)) = (&check, &exact)
                && verified.holds(d, s)
            {
                check = None;
                verified.skipped.fetch_add(1, Ordering::Relaxed);
            }
            let stamp = check.as_ref().and_then(|_| FileStamp::of(&meta));
            if let Some(r) = range {
                if r.end >= size || r.start > r.end {
                    return Err(Error::RangeNotSatisfiable { size });
                }
                file.seek(SeekFrom::Start(r.start)).map_err(io_err)?;
            }
            let mut reader = FileReader::new(file, range.map_or(size, |r| r.len()), check);
            if reader.check.is_some() {
                reader.remember = stamp.map(|s| (verified, s));
            }
            // The first block in the same task as the open: a manifest or a small blob
            // is read in one hop to the blocking pool (a hop costs two thread wake-ups,
            // more than reading a few KiB from the page cache). A failed first block is
            // the stream's first item, as a failed later block would be.
            Ok(Some((size, reader.next_block())))
        })
        .await?;
        Ok(opened.map(|(size, first)| BlobRead {
            size,
            range,
            stream: match first {
                Ok((reader, block)) => file_stream(reader, Some(block)),
                Err(e) => stream::once(futures::future::ready(Err(e))).boxed(),
            },
        }))
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        self.verified.forget(digest);
        let path = self.blob_path(digest);
        let (inline, digest) = (self.inline.clone(), digest.clone());
        blocking(move || {
            // Both places: bytes stored whole and later uploaded are in both.
            let inline = match &inline {
                Some(inline) => inline.delete(&digest)?,
                None => false,
            };
            match fs::remove_file(&path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(inline),
                Err(e) => Err(io_err(e)),
            }
        })
        .await
    }

    async fn list(&self) -> Result<BoxStream<'static, Result<Digest>>> {
        let root = self.root.join("blobs");
        let inline = self.inline.clone();
        let digests = blocking(move || {
            let inline = match &inline {
                Some(inline) => inline.list()?,
                None => Vec::new(),
            };
            // Each digest once, wherever its bytes are.
            let listed: HashSet<Digest> = inline.iter().cloned().collect();
            let mut out: Vec<Result<Digest>> = inline.into_iter().map(Ok).collect();
            for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
                let dir = root.join(algorithm.name());
                let Ok(fans) = fs::read_dir(&dir) else {
                    continue;
                };
                for fan in fans {
                    let fan = fan.map_err(io_err)?;
                    for entry in fs::read_dir(fan.path()).map_err(io_err)? {
                        let name = entry.map_err(io_err)?.file_name();
                        let name = name.to_string_lossy();
                        // Anything else in there is not ours to report.
                        if let Ok(d) = Digest::parse(&format!("{}:{name}", algorithm.name()))
                            && !listed.contains(&d)
                        {
                            out.push(Ok(d));
                        }
                    }
                }
            }
            Ok(out)
        })
        .await?;
        Ok(stream::iter(digests).boxed())
    }

    async fn create_upload(&self, id: &UploadId, repo: &RepoName, now: Timestamp) -> Result<()> {
        let uploads = self.root.join("uploads");
        let (tmp, dir) = (uploads.join(format!(".tmp-{id}")), self.upload_dir(id));
        let record = serde_json::to_vec(&Sidecar {
            repo: repo.clone(),
            started_at: now,
        })
        .map_err(Error::storage)?;
        let skeleton = self.skeleton.clone();
        blocking(move || {
            skeleton.ensure_durable().map_err(io_err)?;
            fs::create_dir(&tmp).map_err(io_err)?;
            let mut s = File::create(tmp.join("info.json")).map_err(io_err)?;
            s.write_all(&record).map_err(io_err)?;
            let f = File::create(tmp.join("data")).map_err(io_err)?;
            f.set_modified(now.to_system_time()).map_err(io_err)?;
            // A session appears whole or not at all. It is not fsynced: it survives a
            // restart of the process (the page cache keeps it), and a power loss may
            // forget it or tear its record, as it may tear an append: the client's next
            // request then gets BLOB_UPLOAD_UNKNOWN and it starts the upload again
            // (design.md §5). Nothing acknowledged as stored depends on it: the commit
            // makes the bytes durable. Three fsyncs a blob push paid before.
            fs::rename(&tmp, &dir).map_err(io_err)
        })
        .await
    }

    async fn upload_info(&self, id: &UploadId) -> Result<Option<UploadInfo>> {
        let (sidecar, candidates) = (self.upload_sidecar(id), self.session_files(id));
        let id = id.clone();
        blocking(move || {
            let Some(record) = read_sidecar(&sidecar)? else {
                return Ok(None);
            };
            let Some(meta) = open_session_file(&candidates, |p| fs::metadata(p))? else {
                return Ok(None);
            };
            Ok(Some(UploadInfo {
                id,
                repo: record.repo,
                len: meta.len(),
                started_at: record.started_at,
                updated_at: Timestamp::from_system_time(meta.modified().map_err(io_err)?),
            }))
        })
        .await
    }

    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        mut data: ByteStream,
        now: Timestamp,
    ) -> Result<u64> {
        let busy = self.mark_busy(id)?;
        let mut appender = Appender::new(self.upload_data(id), id.clone(), offset, busy);
        let mut written = offset;
        // Network chunks are gathered (by reference, not copied) into vectored writes
        // of a block each. A block is written while the next one is received, so the
        // copy into the page cache overlaps the network instead of following it; the
        // first block is small and the next ones double up to BLOCK, so that overlap
        // starts early (for a 1 MiB body: 128, 256 and 512 KiB written while the rest
        // arrives, and 128 KiB left to write at the end, not all of it). At most one
        // write is in flight: memory stays bounded by two blocks plus one chunk. The
        // last chunks are written by `finish`.
        let mut pending: Vec<Bytes> = Vec::new();
        let mut pending_len = 0;
        let mut block = FIRST_BLOCK;
        let mut in_flight: Option<BlockWrite> = None;
        loop {
            match data.next().await {
                Some(Ok(chunk)) => {
                    pending_len += chunk.len();
                    if !chunk.is_empty() {
                        pending.push(chunk);
                    }
                    if pending_len < block {
                        continue;
                    }
                }
                Some(Err(e)) => {
                    appender.abort().await?;
                    return Err(Error::storage(e));
                }
                None => break,
            }
            // Blocks land in order: the previous one first.
            if let Some(previous) = in_flight.take()
                && let Err(e) = previous.done().await
            {
                appender.abort().await?;
                return Err(e);
            }
            written += pending_len as u64;
            pending_len = 0;
            in_flight = Some(appender.start_write(std::mem::take(&mut pending)));
            block = (block * 2).min(BLOCK);
        }
        if let Some(previous) = in_flight.take()
            && let Err(e) = previous.done().await
        {
            appender.abort().await?;
            return Err(e);
        }
        if let Err(e) = appender.finish(pending, now).await {
            appender.abort().await?;
            return Err(e);
        }
        Ok(written + pending_len as u64)
    }

    async fn read_upload(&self, id: &UploadId) -> Result<ByteStream> {
        let candidates = self.session_files(id);
        let unknown = Error::UploadUnknown { id: id.to_string() };
        let (file, len) = blocking(move || {
            let f = open_session_file(&candidates, |p| File::open(p))?.ok_or(unknown)?;
            let len = f.metadata().map_err(io_err)?.len();
            Ok((f, len))
        })
        .await?;
        Ok(file_stream(FileReader::new(file, len, None), None))
    }

    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<CommitOutcome> {
        let _busy = self.mark_busy(id)?;
        let (data, committed, blob) = (
            self.upload_data(id),
            self.upload_committed(id),
            self.blob_path(digest),
        );
        let session = self.upload_dir(id);
        let unknown = Error::UploadUnknown { id: id.to_string() };
        let fans = self.durable_fans.clone();
        let skeleton = self.skeleton.clone();
        let verified = self.verified.clone();
        // Only while a scrub has found some file corrupt: what a replacement needs.
        let gate = verified
            .any_corrupt()
            .then(|| (digest.clone(), self.tmp_path()));
        blocking(move || {
            skeleton.ensure_durable().map_err(io_err)?;
            if !committed.exists() {
                if !data.exists() {
                    return Err(unknown);
                }
                // Durable bytes first, then the name: a crash never exposes a torn file.
                let f = File::open(&data).map_err(io_err)?;
                // Appends are excluded (busy mark) from here to the rename.
                let actual = f.metadata().map_err(io_err)?.len();
                if actual != len {
                    return Err(Error::UploadOffset {
                        expected: actual,
                        got: len,
                    });
                }
                f.sync_all().map_err(io_err)?;
                // Renamed away so no later append can write into a linked blob file.
                fs::rename(&data, &committed).map_err(io_err)?;
                fsync_dir(&session).map_err(io_err)?;
            }
            let dir = blob.parent().expect("blob paths have a parent");
            make_durable_fan(&fans, dir).map_err(io_err)?;
            let outcome = match fs::hard_link(&committed, &blob) {
                Ok(()) => CommitOutcome::Stored,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if let Some((d, tmp)) = &gate {
                        replace_corrupt(&verified, d, &committed, &blob, tmp).map_err(io_err)?;
                    }
                    CommitOutcome::AlreadyPresent
                }
                Err(e) => return Err(io_err(e)),
            };
            // Also when the name was already there: whoever linked it (a concurrent
            // commit, or a process that crashed) may not have made it durable yet, and
            // our caller is about to acknowledge the blob.
            fsync_dir(dir).map_err(io_err)?;
            let stamp = match outcome {
                CommitOutcome::Stored => {
                    fs::metadata(&blob).ok().and_then(|m| FileStamp::exact(&m))
                }
                _ => None,
            };
            Ok((outcome, stamp))
        })
        .await
        .map(|(outcome, stamp)| {
            if let Some(stamp) = stamp {
                let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
                if committed.len() >= MAX_COMMITTED {
                    committed.clear();
                }
                committed.insert(id.clone(), (digest.clone(), stamp));
            }
            outcome
        })
    }

    /// One temporary file, fsynced, hard-linked to the blob's name, the directory
    /// fsynced: two fsyncs, where a session's commit costs three (its creation is
    /// not fsynced). The temporary name (`uploads/.tmp-<random>`) is never a session's, and
    /// one left by a crash is removed on open.
    async fn put_bytes(
        &self,
        _repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        _now: Timestamp,
    ) -> Result<CommitOutcome> {
        self.store_bytes(digest, bytes, true).await
    }

    fn commit_log(&self) -> Option<CommitLog> {
        self.inline.as_ref().map(InlineBlobs::commit_log)
    }

    /// Bytes kept inline are committed without waiting for their fsync: the link that
    /// follows is a durable commit to the same database, which covers them. Bytes kept
    /// as a file are stored as by `put_bytes`.
    async fn put_bytes_before_link(
        &self,
        _repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        _now: Timestamp,
    ) -> Result<CommitOutcome> {
        self.store_bytes(digest, bytes, false).await
    }

    async fn delete_upload(&self, id: &UploadId) -> Result<bool> {
        let dir = self.upload_dir(id);
        let trash = self.root.join("uploads").join(format!(".trash-{id}"));
        let committed = self
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let blob = committed.as_ref().map(|(d, _)| self.blob_path(d));
        let verified = self.verified.clone();
        blocking(move || {
            // Gone from the session's name in one step; the files follow.
            match fs::rename(&dir, &trash) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io_err(e)),
            }
            fs::remove_dir_all(&trash).map_err(io_err)?;
            if let (Some((digest, stamp)), Some(blob)) = (committed, blob) {
                mark_committed(&verified, digest, &blob, stamp);
            }
            Ok(true)
        })
        .await
    }

    async fn list_uploads(&self) -> Result<Vec<UploadInfo>> {
        let dir = self.root.join("uploads");
        let ids = blocking(move || {
            let mut ids = Vec::new();
            for entry in fs::read_dir(&dir).map_err(io_err)? {
                let name = entry.map_err(io_err)?.file_name();
                // `.tmp-` and `.trash-` entries never parse as ids.
                ids.extend(UploadId::parse(&name.to_string_lossy()));
            }
            Ok(ids)
        })
        .await?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(info) = self.upload_info(&id).await? {
                out.push(info);
                continue;
            }
            // A session whose record a power loss tore can never be continued (no
            // repository): nobody would remove it otherwise.
            let sidecar = self.upload_sidecar(&id);
            if blocking(move || Ok(sidecar.exists())).await? {
                tracing::warn!(%id, "upload session without a readable record (torn by a crash): removed");
                self.delete_upload(&id).await?;
            }
        }
        Ok(out)
    }
}
