//! What this process knows about the content of blob files at rest, and the background
//! scrub that keeps it current (docs/design.md §5, "Cost of verified reads").
//!
//! A verified read of a file already read whole and found to match, unchanged since, is
//! not hashed again ([`VerifiedFiles`]): that is what makes verified reads affordable,
//! and what leaves rot below the file system (same stamp, other bytes) unseen by this
//! process. The scrub closes that gap at a bounded rate: it hashes every blob file in
//! turn, refreshes the marks of the files that match, and records the ones that do not,
//! which every read then refuses, before any byte, until the file changes.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use registry_core::{Algorithm, Digest, Error, Hasher, Result};
use tokio::sync::watch;

use crate::blobs::FsBlobStore;

/// Blob files this process read whole and found to match their digest, by identity
/// (device, inode, size, change time): a verified read of the same file, unchanged
/// since, is not hashed again. Any write, truncation, replacement or `chmod` of the
/// file changes its change time (or its inode), so it is hashed again; what changes
/// bytes without the file system knowing (media rot) is found by the scrub
/// ([`Scrubber`]), by `check --verify-digests`, or by the next process, which starts
/// with no marks.
///
/// Also the files a scrub found corrupt, as they were then: refused by every read while
/// their stamp is unchanged (a verified read would only fail at its end, after sending
/// nearly all of the bytes, and a range read would not notice at all).
#[derive(Debug, Default)]
pub(crate) struct VerifiedFiles {
    /// Off: every verified read is hashed.
    pub(crate) off: AtomicBool,
    /// Verified reads served without hashing, thanks to a mark.
    pub(crate) skipped: AtomicU64,
    marks: Mutex<HashMap<Digest, FileStamp>>,
    /// Files a scrub found not to match their digest, with their stamp at the time.
    corrupt: Mutex<HashMap<Digest, FileStamp>>,
    /// How many entries `corrupt` holds: reads look into it only when it is not empty,
    /// so the common case costs one atomic load.
    corrupt_known: AtomicUsize,
}

/// At most this many marks (about 100 bytes each); past it, the marks are dropped and
/// gathered again by the next reads.
const MAX_MARKS: usize = 100_000;

/// A file must have been changed at least this long before it was verified to be
/// marked: file times tick at a few milliseconds, so a write in the same tick as the
/// last one could otherwise leave the change time as it was (git's "racily clean"
/// entries).
const MARK_AFTER: Duration = Duration::from_secs(2);

/// A file's identity and version, as the file system reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileStamp {
    /// The stamp of an open file, if it may be marked (Unix, changed long enough ago).
    pub(crate) fn of(meta: &fs::Metadata) -> Option<FileStamp> {
        let stamp = FileStamp::exact(meta)?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()?
            .as_secs() as i64;
        (stamp.ctime <= now - MARK_AFTER.as_secs() as i64).then_some(stamp)
    }

    /// The stamp of a file however recently it changed (Unix only). Good enough to
    /// recognise a corrupt file: one rewritten in the same clock tick would only be
    /// refused until the next scrub pass or push, never served unchecked.
    #[cfg(unix)]
    pub(crate) fn exact(meta: &fs::Metadata) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        Some(FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        })
    }

    #[cfg(not(unix))]
    pub(crate) fn exact(_: &fs::Metadata) -> Option<FileStamp> {
        None
    }

    /// Whether both stamps are of one file (device and inode), whatever its version.
    pub(crate) fn same_file(&self, other: &FileStamp) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

impl VerifiedFiles {
    /// Whether `digest`'s file, as `stamp` says it is now, was verified whole.
    pub(crate) fn holds(&self, digest: &Digest, stamp: &FileStamp) -> bool {
        !self.off.load(Ordering::Relaxed)
            && lock(&self.marks)
                .get(digest)
                .is_some_and(|mark| mark == stamp)
    }

    pub(crate) fn mark(&self, digest: Digest, stamp: FileStamp) {
        if self.off.load(Ordering::Relaxed) {
            return;
        }
        let mut marks = lock(&self.marks);
        if marks.len() >= MAX_MARKS {
            marks.clear();
        }
        marks.insert(digest, stamp);
    }

    /// Drops everything known about `digest`'s file (it is being deleted).
    pub(crate) fn forget(&self, digest: &Digest) {
        lock(&self.marks).remove(digest);
        self.clear_corrupt(digest);
    }

    pub(crate) fn clear_marks(&self) {
        lock(&self.marks).clear();
    }

    /// Whether any file is known to be corrupt (one atomic load).
    pub(crate) fn any_corrupt(&self) -> bool {
        self.corrupt_known.load(Ordering::Relaxed) > 0
    }

    /// Whether a scrub found `digest`'s file corrupt (whatever the file is now).
    pub(crate) fn knows_corrupt(&self, digest: &Digest) -> bool {
        self.any_corrupt() && lock(&self.corrupt).contains_key(digest)
    }

    pub(crate) fn corrupt_count(&self) -> u64 {
        self.corrupt_known.load(Ordering::Relaxed) as u64
    }

    /// Records `digest`'s file, as `stamp` says it is, as not matching its digest; its
    /// mark goes, so that once the file changes the next verified read hashes it.
    fn set_corrupt(&self, digest: &Digest, stamp: FileStamp) {
        lock(&self.marks).remove(digest);
        let mut corrupt = lock(&self.corrupt);
        corrupt.insert(digest.clone(), stamp);
        self.corrupt_known.store(corrupt.len(), Ordering::Relaxed);
    }

    pub(crate) fn clear_corrupt(&self, digest: &Digest) {
        if !self.any_corrupt() {
            return;
        }
        let mut corrupt = lock(&self.corrupt);
        corrupt.remove(digest);
        self.corrupt_known.store(corrupt.len(), Ordering::Relaxed);
    }

    /// Whether `digest`'s file, as `meta` describes it now, is the one a scrub found
    /// corrupt. A file that changed since (another stamp) loses its entry: it is not
    /// that file any more, and is hashed like any other.
    pub(crate) fn is_corrupt(&self, digest: &Digest, meta: &fs::Metadata) -> bool {
        if !self.any_corrupt() {
            return false;
        }
        let mut corrupt = lock(&self.corrupt);
        let Some(known) = corrupt.get(digest) else {
            return false;
        };
        if FileStamp::exact(meta).as_ref() == Some(known) {
            return true;
        }
        corrupt.remove(digest);
        self.corrupt_known.store(corrupt.len(), Ordering::Relaxed);
        false
    }
}

fn lock<T>(map: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps: a panic elsewhere cannot leave them inconsistent.
    map.lock().unwrap_or_else(|p| p.into_inner())
}

/// The error of every read of a file a scrub found corrupt: what happened, and what to
/// do about it.
pub(crate) fn corrupt_error(digest: &Digest, path: &Path) -> Error {
    Error::storage(format!(
        "blob {digest} failed its digest check in a scrub (file {}): it is not served \
         while the file is unchanged; run `serve check --verify-digests` to list damaged \
         files, and push the blob again to replace the file (its bytes must be uploaded: \
         clients that find the blob present skip the upload)",
        path.display()
    ))
}

/// The default pace of a scrub: a day's pass covers about 2.7 TB, and a disk serving
/// pulls barely notices 32 MiB/s of extra reads.
pub const DEFAULT_SCRUB_RATE: u64 = 32 << 20;

/// Files are hashed in chunks this large, one blocking task each, the pace checked
/// before every chunk: bounded memory, and a stop is honoured within one chunk.
const CHUNK: u64 = 1 << 20;

/// Knobs for [`Scrubber::run_pass`].
#[derive(Debug, Clone)]
pub struct ScrubOptions {
    /// Most bytes hashed per second over the pass (the pass sleeps between chunks to
    /// stay under it, so it competes with reads of the disk only that much);
    /// `u64::MAX`: as fast as the disk goes. 0 counts as 1.
    pub max_bytes_per_sec: u64,
    /// The pass ends early, with what it has, once this holds `true` (a server's
    /// shutdown signal). `None`: the pass runs to its end.
    pub stop: Option<watch::Receiver<bool>>,
}

impl Default for ScrubOptions {
    fn default() -> Self {
        ScrubOptions {
            max_bytes_per_sec: DEFAULT_SCRUB_RATE,
            stop: None,
        }
    }
}

impl ScrubOptions {
    /// Sets [`max_bytes_per_sec`](Self::max_bytes_per_sec).
    pub fn with_max_bytes_per_sec(mut self, rate: u64) -> Self {
        self.max_bytes_per_sec = rate;
        self
    }

    /// No pace: hash as fast as the disk goes (for a manual, one-off pass).
    pub fn unpaced(self) -> Self {
        self.with_max_bytes_per_sec(u64::MAX)
    }

    /// Sets [`stop`](Self::stop).
    pub fn with_stop(mut self, stop: watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }
}

/// What one [`Scrubber::run_pass`] found.
#[derive(Debug, Clone, Default)]
pub struct ScrubReport {
    /// Files hashed to their end (files that vanished or changed during the pass are
    /// not counted).
    pub files: u64,
    /// Bytes hashed.
    pub bytes: u64,
    /// Files that do not match their digest: refused by reads from now on, until they
    /// change or their blob is pushed again.
    pub corrupt: Vec<(Digest, PathBuf)>,
    /// Files that could not be read, one line each (the pass goes on without them).
    pub errors: Vec<String>,
    /// How long the pass took.
    pub duration: Duration,
    /// The pass was stopped before its end.
    pub stopped: bool,
}

impl std::fmt::Display for ScrubReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} files, {} bytes in {:.1}s, {} corrupt, {} errors",
            self.files,
            self.bytes,
            self.duration.as_secs_f64(),
            self.corrupt.len(),
            self.errors.len()
        )?;
        if self.stopped {
            f.write_str(" (stopped)")?;
        }
        Ok(())
    }
}

/// The scrub's counters since the store was opened (for metrics): kept across passes,
/// shared by every [`Scrubber`] of the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubStats {
    /// Passes that reached their end (stopped ones are not counted).
    pub passes: u64,
    /// Files hashed to their end, over all passes.
    pub files: u64,
    /// Bytes hashed, over all passes.
    pub bytes: u64,
    /// Files known to be corrupt now (refused by reads).
    pub corrupt_files: u64,
    /// Files that could not be read, over all passes.
    pub read_errors: u64,
    /// When the last complete pass ended, in seconds since the Unix epoch (0: none yet).
    pub last_pass_end: u64,
}

/// Counters and the one-pass-at-a-time lock of a store's scrubs.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pass: tokio::sync::Mutex<()>,
    passes: AtomicU64,
    files: AtomicU64,
    bytes: AtomicU64,
    read_errors: AtomicU64,
    last_pass_end: AtomicU64,
}

/// Runs scrub passes over a store's blob files ([`FsStore::scrubber`](crate::FsStore::scrubber)).
/// A cheap handle: clones share the store and the counters, and it stays usable after
/// the store was turned into a [`Storage`](registry_core::store::Storage), so a server
/// can take it first and schedule passes beside the registry.
#[derive(Debug, Clone)]
pub struct Scrubber {
    blobs: Arc<FsBlobStore>,
    shared: Arc<Shared>,
}

/// What hashing one file came to.
enum Outcome {
    Matches {
        mark: Option<FileStamp>,
    },
    Corrupt {
        stamp: Option<FileStamp>,
    },
    /// Gone from its name (collected) or replaced during the pass: nothing to say.
    Vanished,
    Changed,
}

/// One file being hashed: opened by its first chunk's task, then one task per chunk.
struct FileScrub {
    path: PathBuf,
    digest: Digest,
    file: Option<File>,
    hasher: Hasher,
    len: u64,
    read: u64,
    opened: Option<FileStamp>,
    mark: Option<FileStamp>,
    buf: Vec<u8>,
}

enum Step {
    More(Box<FileScrub>),
    Done(Outcome),
}

impl FileScrub {
    fn new(path: PathBuf, digest: Digest) -> Self {
        FileScrub {
            path,
            hasher: Hasher::new(digest.algorithm()),
            digest,
            file: None,
            len: 0,
            read: 0,
            opened: None,
            mark: None,
            buf: Vec::new(),
        }
    }

    /// Size of the next chunk (before the file is open: at most a chunk).
    fn next_chunk(&self, listed: u64) -> u64 {
        let left = if self.file.is_some() {
            self.len - self.read
        } else {
            listed
        };
        left.min(CHUNK)
    }

    /// Reads and hashes the next chunk (opening the file first); after the last one,
    /// compares the hash with the name, and checks the name still leads to the same,
    /// unchanged file.
    fn step(mut self: Box<Self>) -> io::Result<(Step, u64)> {
        if self.file.is_none() {
            let file = match File::open(&self.path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok((Step::Done(Outcome::Vanished), 0));
                }
                Err(e) => return Err(e),
            };
            let meta = file.metadata()?;
            self.len = meta.len();
            self.opened = FileStamp::exact(&meta);
            self.mark = FileStamp::of(&meta);
            self.file = Some(file);
        }
        let want = (self.len - self.read).min(CHUNK);
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let file = self.file.as_mut().expect("opened above");
        file.take(want).read_to_end(&mut buf)?;
        if (buf.len() as u64) < want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shorter than when it was opened",
            ));
        }
        self.hasher.update(&buf);
        self.read += want;
        self.buf = buf;
        if self.read < self.len {
            return Ok((Step::More(self), want));
        }
        let now = match fs::metadata(&self.path) {
            Ok(meta) => FileStamp::exact(&meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((Step::Done(Outcome::Vanished), want));
            }
            Err(e) => return Err(e),
        };
        if now != self.opened {
            return Ok((Step::Done(Outcome::Changed), want));
        }
        let outcome = if self.hasher.finish() == self.digest {
            Outcome::Matches { mark: self.mark }
        } else {
            Outcome::Corrupt { stamp: self.opened }
        };
        Ok((Step::Done(outcome), want))
    }
}

/// Keeps bytes hashed over time elapsed under a rate, by sleeping before a chunk that
/// would go over it.
struct Pace {
    rate: u64,
    start: Instant,
    done: u64,
}

impl Pace {
    /// How long to wait before hashing `next` more bytes.
    fn delay(&self, next: u64) -> Option<Duration> {
        if self.rate == u64::MAX {
            return None;
        }
        let due = Duration::from_secs_f64((self.done + next) as f64 / self.rate as f64);
        due.checked_sub(self.start.elapsed())
            .filter(|d| !d.is_zero())
    }
}

/// Whether `stop` says stop now.
fn stop_now(stop: &Option<watch::Receiver<bool>>) -> bool {
    stop.as_ref().is_some_and(|s| *s.borrow())
}

/// Sleeps `delay`, or less if `stop` turns `true` meanwhile; `true`: stopped.
async fn sleep_unless_stopped(delay: Duration, stop: &mut Option<watch::Receiver<bool>>) -> bool {
    let Some(stop) = stop else {
        tokio::time::sleep(delay).await;
        return false;
    };
    // A dropped sender never stops the pass (its last value still counts).
    let stopped = async {
        if stop.wait_for(|s| *s).await.is_err() {
            futures::future::pending::<()>().await;
        }
    };
    futures::select_biased! {
        () = stopped.fuse() => true,
        () = tokio::time::sleep(delay).fuse() => false,
    }
}

impl Scrubber {
    pub(crate) fn new(blobs: Arc<FsBlobStore>, shared: Arc<Shared>) -> Self {
        Scrubber { blobs, shared }
    }

    /// Hashes every blob file of the store once, at most `options.max_bytes_per_sec`,
    /// on blocking threads. A file that matches is marked as a verified read would mark
    /// it (its later verified reads are not hashed while it is unchanged); one that
    /// does not is logged at error, reported, and refused by every read (full or
    /// range) until it changes: pushing the blob again replaces it, deleting the blob
    /// forgets it. Files that vanish during the pass (collected) are skipped; files
    /// that cannot be read are reported and skipped. One pass at a time per store: a
    /// second call waits for the first. Fails only if the blob directory cannot be
    /// listed at all.
    pub async fn run_pass(&self, options: &ScrubOptions) -> Result<ScrubReport> {
        let _one = self.shared.pass.lock().await;
        let started = Instant::now();
        let mut stop = options.stop.clone();
        let mut report = ScrubReport::default();
        let files = self.listing(&mut report).await?;
        let mut pace = Pace {
            rate: options.max_bytes_per_sec.max(1),
            start: started,
            done: 0,
        };
        let verified = self.blobs.verified();
        'files: for (digest, listed) in files {
            let path = self.blobs.blob_path(&digest);
            let mut scrub = Box::new(FileScrub::new(path.clone(), digest.clone()));
            let outcome = loop {
                if stop_now(&stop) {
                    report.stopped = true;
                    break 'files;
                }
                if let Some(delay) = pace.delay(scrub.next_chunk(listed))
                    && sleep_unless_stopped(delay, &mut stop).await
                {
                    report.stopped = true;
                    break 'files;
                }
                let step = tokio::task::spawn_blocking(move || scrub.step())
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(format!("scrub task failed: {e}"))));
                let (step, bytes) = match step {
                    Ok(step) => step,
                    Err(e) => {
                        tracing::warn!(%digest, path = %path.display(), error = %e, "scrub: cannot read a blob file");
                        report.errors.push(format!("{}: {e}", path.display()));
                        self.shared.read_errors.fetch_add(1, Ordering::Relaxed);
                        continue 'files;
                    }
                };
                pace.done += bytes;
                report.bytes += bytes;
                self.shared.bytes.fetch_add(bytes, Ordering::Relaxed);
                match step {
                    Step::More(next) => scrub = next,
                    Step::Done(outcome) => break outcome,
                }
            };
            match outcome {
                Outcome::Matches { mark } => {
                    verified.clear_corrupt(&digest);
                    if let Some(stamp) = mark {
                        verified.mark(digest, stamp);
                    }
                }
                Outcome::Corrupt { stamp } => {
                    tracing::error!(%digest, path = %path.display(),
                        "scrub: blob file does not match its digest; reads of it fail until it is replaced (push the blob again)");
                    if let Some(stamp) = stamp {
                        verified.set_corrupt(&digest, stamp);
                    }
                    report.corrupt.push((digest, path));
                }
                Outcome::Vanished | Outcome::Changed => continue,
            }
            report.files += 1;
            self.shared.files.fetch_add(1, Ordering::Relaxed);
        }
        report.duration = started.elapsed();
        if !report.stopped {
            self.shared.passes.fetch_add(1, Ordering::Relaxed);
            let end = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.shared.last_pass_end.store(end, Ordering::Relaxed);
        }
        Ok(report)
    }

    /// The counters of every pass so far, and the files known to be corrupt now.
    pub fn stats(&self) -> ScrubStats {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ScrubStats {
            passes: read(&self.shared.passes),
            files: read(&self.shared.files),
            bytes: read(&self.shared.bytes),
            corrupt_files: self.blobs.verified().corrupt_count(),
            read_errors: read(&self.shared.read_errors),
            last_pass_end: read(&self.shared.last_pass_end),
        }
    }

    /// Every blob file with its size: names under `blobs/<algorithm>/<2 hex>/` that
    /// parse as digests (upload files and temporary files live elsewhere; anything else
    /// is not ours). A fan-out directory that cannot be read is an error of the report.
    async fn listing(&self, report: &mut ScrubReport) -> Result<Vec<(Digest, u64)>> {
        let root = self.blobs.root().join("blobs");
        let (files, errors) = tokio::task::spawn_blocking(move || {
            let (mut files, mut errors) = (Vec::new(), Vec::new());
            for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
                let dir = root.join(algorithm.name());
                let fans = match fs::read_dir(&dir) {
                    Ok(fans) => fans,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::storage(format!("{}: {e}", dir.display()))),
                };
                for fan in fans {
                    let fan = fan.map_err(Error::storage)?.path();
                    let entries = match fs::read_dir(&fan) {
                        Ok(entries) => entries,
                        Err(e) => {
                            errors.push(format!("{}: {e}", fan.display()));
                            continue;
                        }
                    };
                    for entry in entries {
                        let entry = match entry {
                            Ok(entry) => entry,
                            Err(e) => {
                                errors.push(format!("{}: {e}", fan.display()));
                                continue;
                            }
                        };
                        let name = entry.file_name();
                        let name = format!("{}:{}", algorithm.name(), name.to_string_lossy());
                        let Ok(digest) = Digest::parse(&name) else {
                            continue;
                        };
                        // The size paces the first chunk; the open file's size is used
                        // from there on. Gone since the listing: the open says so.
                        let len = entry.metadata().map_or(0, |m| m.len());
                        files.push((digest, len));
                    }
                }
            }
            Ok((files, errors))
        })
        .await
        .map_err(|e| Error::storage(format!("scrub listing task failed: {e}")))??;
        for e in errors {
            tracing::warn!(error = %e, "scrub: cannot list a blob directory");
            self.shared.read_errors.fetch_add(1, Ordering::Relaxed);
            report.errors.push(e);
        }
        Ok(files)
    }
}
