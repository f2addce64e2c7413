//! Users and their passwords: users given in code ([`Auth::with_user`]) and htpasswd
//! files with bcrypt hashes ([`Htpasswd`], as `htpasswd -B` writes them and as
//! Distribution's htpasswd auth reads them).
//!
//! Passwords given in code are kept only as HMAC-SHA256 under a random key of the
//! process, never in the clear. bcrypt is slow on purpose (milliseconds to a quarter
//! second a check, by its cost): it runs on the blocking pool, never on the async
//! threads, and a password that verified is remembered (as its HMAC, beside the hash it
//! verified against) so that a client sending Basic credentials on every request pays
//! for bcrypt once, until the file changes that user's hash.
//!
//! [`Auth::with_user`]: crate::Auth::with_user

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use hmac::{KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = hmac::Hmac<Sha256>;

/// How often a file is looked at for changes, at most.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// Verified passwords remembered at most (the memory is dropped and refilled beyond).
const MAX_REMEMBERED: usize = 4096;

/// An htpasswd file of `name:hash` lines, reloaded when it changes (looked at, at most
/// once a second, when a password is checked). Only bcrypt hashes (`$2y$`, `$2b$`,
/// `$2a$`) are accepted, as in Distribution; other lines are skipped with a warning.
///
/// ```no_run
/// # fn main() -> std::io::Result<()> {
/// use registry_core::access::AuthenticatedOnly;
/// use registry_http::{Auth, Htpasswd};
///
/// // htpasswd -cB /etc/registry/htpasswd alice
/// let auth = Auth::new(AuthenticatedOnly).with_htpasswd(Htpasswd::open("/etc/registry/htpasswd")?);
/// # let _ = auth;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Htpasswd(Arc<File>);

struct File {
    path: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    entries: HashMap<String, String>,
    /// What identifies the version read: modification time, length, inode.
    version: Option<(SystemTime, u64, u64)>,
    checked: Instant,
}

impl fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Htpasswd")
            .field("path", &self.0.path)
            .field("users", &self.users())
            .finish()
    }
}

fn version_of(path: &Path) -> Option<(SystemTime, u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let ino = 0;
    Some((meta.modified().ok()?, meta.len(), ino))
}

impl Htpasswd {
    /// Reads the file (an error if it cannot be read); later changes are picked up
    /// without a restart. A file that becomes unreadable keeps the users last read.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_owned();
        let version = version_of(&path);
        let text = std::fs::read_to_string(&path)?;
        let entries = parse(&text, &path);
        Ok(Htpasswd(Arc::new(File {
            path,
            state: Mutex::new(Loaded {
                entries,
                version,
                checked: Instant::now(),
            }),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Loaded> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many users the file holds (as last read).
    pub fn users(&self) -> usize {
        self.lock().entries.len()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// The hash of `name`, after re-reading the file if it changed. Blocking (file
    /// system calls): call it from the blocking pool.
    fn hash_of(&self, name: &str) -> Option<String> {
        let mut state = self.lock();
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let version = version_of(&self.0.path);
            if version != state.version {
                match std::fs::read_to_string(&self.0.path) {
                    Ok(text) => {
                        state.entries = parse(&text, &self.0.path);
                        state.version = version;
                        tracing::info!(
                            path = %self.0.path.display(),
                            users = state.entries.len(),
                            "htpasswd file reloaded"
                        );
                    }
                    Err(e) => tracing::warn!(
                        path = %self.0.path.display(),
                        error = %e,
                        "htpasswd file unreadable; keeping the users read before"
                    ),
                }
            }
        }
        state.entries.get(name).cloned()
    }
}

/// `name:hash` lines; blank lines and `#` comments are skipped, and so are lines whose
/// hash is not bcrypt (with a warning naming the line, never its content).
fn parse(text: &str, path: &Path) -> HashMap<String, String> {
    let mut entries = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((name, hash))
                if !name.is_empty()
                    && ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) =>
            {
                entries.insert(name.to_owned(), hash.to_owned());
            }
            _ => tracing::warn!(
                path = %path.display(),
                line = i + 1,
                "htpasswd line skipped: not NAME:BCRYPT-HASH (create entries with htpasswd -B)"
            ),
        }
    }
    entries
}

/// Every user a router knows: given in code, and from htpasswd files.
pub(crate) struct Passwords {
    key: [u8; 32],
    /// User name → HMAC of the password.
    fixed: HashMap<String, [u8; 32]>,
    files: Vec<Htpasswd>,
    /// User name → (HMAC of a password that verified, the hash it verified against).
    verified: Mutex<HashMap<String, ([u8; 32], String)>>,
}

impl Clone for Passwords {
    fn clone(&self) -> Self {
        Passwords {
            key: self.key,
            fixed: self.fixed.clone(),
            files: self.files.clone(),
            verified: Mutex::new(HashMap::new()),
        }
    }
}

/// A bcrypt hash (cost 5, `htpasswd -B`'s default) of a random password, checked
/// against for unknown users so that a refusal takes about as long whether or not the
/// name exists.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut password = [0u8; 16];
    getrandom::fill(&mut password).expect("the operating system's random source failed");
    bcrypt::hash(password, 5).expect("bcrypt accepts cost 5")
});

impl Passwords {
    pub(crate) fn new() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the operating system's random source failed");
        Passwords {
            key,
            fixed: HashMap::new(),
            files: Vec::new(),
            verified: Mutex::new(HashMap::new()),
        }
    }

    fn mac(&self, password: &str) -> [u8; 32] {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC accepts any key length");
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub(crate) fn add_user(&mut self, name: String, password: &str) {
        let mac = self.mac(password);
        self.fixed.insert(name, mac);
    }

    pub(crate) fn add_file(&mut self, file: Htpasswd) {
        self.files.push(file);
    }

    /// The user names given in code, sorted (for `Debug`).
    pub(crate) fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.fixed.keys().map(String::as_str).collect();
        names.sort();
        names
    }

    /// The htpasswd files' paths (for `Debug`).
    pub(crate) fn files(&self) -> Vec<&Path> {
        self.files.iter().map(Htpasswd::path).collect()
    }

    /// Whether `name` / `password` are a known user's credentials. Users given in code
    /// are checked in constant time; htpasswd users with bcrypt on the blocking pool.
    pub(crate) async fn check(self: &Arc<Self>, name: &str, password: &str) -> bool {
        let given = self.mac(password);
        if let Some(stored) = self.fixed.get(name) {
            return bool::from(given.ct_eq(stored));
        }
        if self.files.is_empty() {
            return false;
        }
        let this = self.clone();
        let (name, password) = (name.to_owned(), password.to_owned());
        tokio::task::spawn_blocking(move || this.check_files(&name, &password, given))
            .await
            .unwrap_or(false)
    }

    fn check_files(&self, name: &str, password: &str, given: [u8; 32]) -> bool {
        let Some(hash) = self.files.iter().find_map(|f| f.hash_of(name)) else {
            // Same work for a name that does not exist.
            let _ = bcrypt::verify(password, &DUMMY_HASH);
            return false;
        };
        let remembered = {
            let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            verified
                .get(name)
                .is_some_and(|(mac, h)| *h == hash && bool::from(mac.ct_eq(&given)))
        };
        if remembered {
            return true;
        }
        let ok = bcrypt::verify(password, &hash).unwrap_or(false);
        if ok {
            let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if verified.len() >= MAX_REMEMBERED {
                verified.clear();
            }
            verified.insert(name.to_owned(), (given, hash));
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bcrypt_users_verify_and_the_file_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw-one", 4).unwrap();
        std::fs::write(&path, format!("# users\nalice:{hash}\nbob:{{SHA}}abc\n\n")).unwrap();
        let file = Htpasswd::open(&path).unwrap();
        assert_eq!(file.users(), 1, "the {{SHA}} line is skipped");
        let mut p = Passwords::new();
        p.add_file(file.clone());
        let p = Arc::new(p);
        assert!(p.check("alice", "pw-one").await);
        assert!(p.check("alice", "pw-one").await, "remembered");
        assert!(!p.check("alice", "pw-two").await);
        assert!(!p.check("bob", "abc").await);
        assert!(!p.check("nobody", "pw-one").await);

        // A new password: the file is looked at again once a second at most.
        let hash = bcrypt::hash("pw-two", 4).unwrap();
        std::fs::write(&path, format!("alice:{hash}\n")).unwrap();
        file.lock().checked -= RELOAD_CHECK;
        assert!(p.check("alice", "pw-two").await);
        assert!(
            !p.check("alice", "pw-one").await,
            "the old password is forgotten"
        );
    }

    #[tokio::test]
    async fn fixed_users_are_kept_as_macs() {
        let mut p = Passwords::new();
        p.add_user("ci".into(), "s3cret");
        let p = Arc::new(p);
        assert!(p.check("ci", "s3cret").await);
        assert!(!p.check("ci", "s3cre").await);
        assert!(!p.check("ci", "").await);
        assert_eq!(p.names(), ["ci"]);
    }
}
