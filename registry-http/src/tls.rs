//! TLS for the built-in server (feature `tls`): rustls with the ring provider, a
//! certificate chain and a private key from PEM files, re-read when they change so that
//! a renewed certificate (certbot, cert-manager) is served without a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often the files are looked at for changes, at most (on a handshake).
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// A certificate chain file and its private key file (PEM), for
/// [`serve_tls_on`](crate::serve_tls_on). Both are read at once (an error names what is
/// wrong) and again on the first handshake after either file changes; a pair that no
/// longer loads (a half-written renewal) keeps the last good one in service.
#[derive(Clone)]
pub struct TlsFiles(Arc<Resolver>);

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert", &self.0.cert)
            .field("key", &self.0.key)
            .finish()
    }
}

struct Resolver {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Current>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

struct Current {
    key: Arc<CertifiedKey>,
    version: Option<[(SystemTime, u64); 2]>,
    checked: Instant,
}

fn version_of(cert: &Path, key: &Path) -> Option<[(SystemTime, u64); 2]> {
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some([one(cert)?, one(key)?])
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn load(cert: &Path, key: &Path) -> std::io::Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(format!("{}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(invalid(format!(
            "{}: no certificate in the file",
            cert.display()
        )));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| invalid(format!("{}: no private key: {e}", key.display())))?;
    let signing = ring::sign::any_supported_type(&private)
        .map_err(|e| invalid(format!("{}: {e}", key.display())))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| invalid(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(Arc::new(certified))
}

impl TlsFiles {
    /// Reads the certificate chain (leaf first) and the private key (PKCS#8, PKCS#1 or
    /// SEC1) and checks that they belong together.
    pub fn open(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> std::io::Result<Self> {
        let (cert, key) = (cert.as_ref().to_owned(), key.as_ref().to_owned());
        let version = version_of(&cert, &key);
        let certified = load(&cert, &key)?;
        Ok(TlsFiles(Arc::new(Resolver {
            cert,
            key,
            state: Mutex::new(Current {
                key: certified,
                version,
                checked: Instant::now(),
            }),
        })))
    }

    /// The rustls acceptor: TLS 1.2 and 1.3, HTTP/1.1 by ALPN, this pair's certificate.
    pub(crate) fn acceptor(&self) -> std::io::Result<tokio_rustls::TlsAcceptor> {
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(e.to_string()))?
                .with_no_client_auth()
                .with_cert_resolver(self.0.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Two stat calls at most once a second: cheap enough for the handshake path.
        if current.checked.elapsed() >= RELOAD_CHECK {
            current.checked = Instant::now();
            let version = version_of(&self.cert, &self.key);
            if version != current.version {
                match load(&self.cert, &self.key) {
                    Ok(key) => {
                        current.key = key;
                        current.version = version;
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "TLS certificate or key unreadable; serving the previous pair"
                    ),
                }
            }
        }
        Some(current.key.clone())
    }
}
