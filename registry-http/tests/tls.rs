//! TLS on the built-in server (feature `tls`): a client that trusts the test's CA gets
//! answers, one that does not fails the handshake, a key that does not match its
//! certificate is refused at start, and renewed files are served without a restart.
#![cfg(feature = "tls")]

use std::path::Path;
use std::sync::Arc;

use registry_core::Registry;
use registry_http::{HttpConfig, TlsFiles, serve_tls_on};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

fn ca() -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// Writes a certificate for 127.0.0.1 signed by `ca` and its key; returns the DER.
fn server_cert(ca: &Ca, cn: &str, dir: &Path) -> CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    // Key first, then the certificate, as a renewal writes them.
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    cert.der().clone()
}

/// One HTTPS request for `/v2/` trusting `root`: the status line and the certificate
/// the server presented.
async fn get(
    url: &str,
    root: &CertificateDer<'static>,
) -> std::io::Result<(String, CertificateDer<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let addr = url.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    Ok((text.lines().next().unwrap_or("").to_owned(), presented))
}

#[tokio::test]
async fn https_with_a_test_ca_and_renewed_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let first = server_cert(&ca, "first", dir.path());
    let files = TlsFiles::open(dir.path().join("tls.crt"), dir.path().join("tls.key")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve_tls_on(
        listener,
        Registry::in_memory(),
        HttpConfig::default(),
        files,
    )
    .await
    .unwrap();
    assert!(server.url().starts_with("https://"));

    let (status, presented) = get(server.url(), ca.cert.der()).await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(presented, first);

    // A client that does not trust the CA fails the handshake.
    let stranger = self::ca();
    assert!(get(server.url(), stranger.cert.der()).await.is_err());

    // Renewed files are picked up (looked at once a second at most: poll, bounded).
    let renewed = server_cert(&ca, "renewed", dir.path());
    let mut served = first.clone();
    for _ in 0..50 {
        let (status, presented) = get(server.url(), ca.cert.der()).await.unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        served = presented;
        if served == renewed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(served, renewed, "the renewed certificate is not served");
    server.shutdown().await;
}

#[test]
fn mismatched_or_missing_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    server_cert(&ca, "a", dir.path());
    let crt = dir.path().join("tls.crt");
    let other = tempfile::tempdir().unwrap();
    server_cert(&ca, "b", other.path());
    let e = TlsFiles::open(&crt, other.path().join("tls.key")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    assert!(TlsFiles::open(dir.path().join("missing.crt"), dir.path().join("tls.key")).is_err());
    std::fs::write(dir.path().join("empty.crt"), "").unwrap();
    assert!(TlsFiles::open(dir.path().join("empty.crt"), dir.path().join("tls.key")).is_err());
}
