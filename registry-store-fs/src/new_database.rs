//! A new store's metadata database, created without waiting for the disk.
//!
//! redb creates a database file with three `fdatasync`s, so that a crash in the middle
//! never leaves a file that looks like a database and is not one. In a new store the
//! file holds nothing acknowledged until the first write, so it is created as an
//! unnamed file (`O_TMPFILE`) with redb's syncs skipped, and gets its name later, in
//! [`NewDatabase::publish`]: one `fdatasync`, then a link that fails rather than
//! replace a file of the same name. The store's first write publishes it before it is
//! acknowledged (`Skeleton::ensure_durable`), and so does the task that makes the
//! directories durable right after the open. A crash before that leaves no file: the
//! next open creates one again. Where unnamed files are not supported the database is
//! created with redb's own syncs, named from the start.

#[cfg(target_os = "linux")]
pub(crate) use linux::{NewDatabase, create_unnamed};

#[cfg(not(target_os = "linux"))]
pub(crate) use elsewhere::{NewDatabase, create_unnamed};

#[cfg(not(target_os = "linux"))]
mod elsewhere {
    use std::io;
    use std::path::Path;

    /// Never made: databases are created named, with redb's syncs.
    #[derive(Debug)]
    pub(crate) enum NewDatabase {}

    impl NewDatabase {
        pub(crate) fn publish(&self) -> io::Result<()> {
            match *self {}
        }
    }

    pub(crate) fn create_unnamed(
        _path: &Path,
    ) -> io::Result<Option<(redb::Database, NewDatabase)>> {
        Ok(None)
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::fs::File;
    use std::io;
    use std::ops::Bound;
    use std::os::fd::AsRawFd;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::backends::FileBackend;
    use redb::{BackendError, Database, StorageBackend};

    /// A database file that has no name yet, and whose syncs wait until it gets one.
    #[derive(Debug)]
    pub(crate) struct NewDatabase {
        /// The same open file as the database's backend.
        file: File,
        name: PathBuf,
        syncing: Arc<AtomicBool>,
    }

    impl NewDatabase {
        /// Makes the file durable and links it under its name. From here on redb's own
        /// syncs run. Fails if something else took the name meanwhile (another process
        /// created the store): this database's writes are then never acknowledged.
        pub(crate) fn publish(&self) -> io::Result<()> {
            self.syncing.store(true, Ordering::SeqCst);
            self.file.sync_data()?;
            let unnamed = format!("/proc/self/fd/{}", self.file.as_raw_fd());
            rustix::fs::linkat(
                rustix::fs::CWD,
                unnamed.as_str(),
                rustix::fs::CWD,
                &self.name,
                rustix::fs::AtFlags::SYMLINK_FOLLOW,
            )
            .map_err(|e| {
                let e = io::Error::from(e);
                if e.kind() == io::ErrorKind::AlreadyExists {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{} was created by another process while this one had the store open",
                            self.name.display()
                        ),
                    )
                } else {
                    e
                }
            })
        }
    }

    /// Creates the database for `path`, which does not exist, as an unnamed file in its
    /// directory. `None` where the file system or the platform cannot: the caller creates
    /// it named, with redb's syncs.
    pub(crate) fn create_unnamed(path: &Path) -> io::Result<Option<(Database, NewDatabase)>> {
        let dir = match path.parent() {
            // A bare file name: the current directory.
            Some(dir) if dir.as_os_str().is_empty() => Path::new("."),
            Some(dir) => dir,
            None => return Ok(None),
        };
        use rustix::fs::{Mode, OFlags};
        let fd = match rustix::fs::open(
            dir,
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            // What `File::create` asks for; the umask applies.
            Mode::from_raw_mode(0o666),
        ) {
            Ok(fd) => fd,
            // Not supported here (the kernel or the file system).
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL,
            ) => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let file = File::from(fd);
        // The link in `publish` goes through /proc.
        if !Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())).exists() {
            return Ok(None);
        }
        let syncing = Arc::new(AtomicBool::new(false));
        let backend = DeferredSync {
            file: FileBackend::new(file.try_clone()?).map_err(io::Error::other)?,
            syncing: syncing.clone(),
        };
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(io::Error::other)?;
        let name = path.to_owned();
        Ok(Some((
            db,
            NewDatabase {
                file,
                name,
                syncing,
            },
        )))
    }

    /// redb's file backend, with `sync_data` skipped until `syncing` is set.
    #[derive(Debug)]
    struct DeferredSync {
        file: FileBackend,
        syncing: Arc<AtomicBool>,
    }

    impl StorageBackend for DeferredSync {
        fn len(&self) -> Result<u64, io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), io::Error> {
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), io::Error> {
            if self.syncing.load(Ordering::SeqCst) {
                self.file.sync_data()
            } else {
                Ok(())
            }
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
            self.file.write(offset, data)
        }
        fn close(&self) -> Result<(), io::Error> {
            self.file.close()
        }
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.file.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.file.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.file.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), BackendError> {
            self.file.lock_shared_range(start, end)
        }
        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.file.unlock_range(start, end)
        }
        fn query_lock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.file.query_lock_range(start, end)
        }
    }
}
