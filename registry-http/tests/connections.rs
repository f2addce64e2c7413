//! Connection hygiene of the built-in server, over real loopback sockets: slow and idle
//! clients are closed, and a client holding many idle connections cannot lock others
//! out. Every wait is bounded; a server that never closes fails the test at the bound.

use std::time::Duration;

use registry_core::Registry;
use registry_http::{HttpConfig, LocalServer, ServerLimits, serve_local};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far longer than any timeout configured below: reaching it means "never closed".
const BOUND: Duration = Duration::from_secs(20);

async fn server(limits: ServerLimits) -> LocalServer {
    serve_local(
        Registry::in_memory(),
        HttpConfig::default().with_server_limits(limits),
    )
    .await
    .expect("serve")
}

/// Reads until the server closes the connection; returns what it sent. Panics at BOUND.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server never closed the connection");
    out
}

/// Whether the server has closed `stream` (EOF or reset) within `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn get_v2(url_addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(url_addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    String::from_utf8_lossy(&until_closed(&mut s).await).into_owned()
}

#[tokio::test]
async fn slowloris_headers_are_cut_off() {
    let srv = server(ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    })
    .await;
    let mut s = TcpStream::connect(srv.addr()).await.unwrap();
    // Half a request line and one header, then nothing more.
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    until_closed(&mut s).await;
    // Others are still served.
    assert!(get_v2(srv.addr()).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let srv = server(ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    })
    .await;
    let mut s = TcpStream::connect(srv.addr()).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // The response arrives, the connection stays open for the next request, and is
    // closed once the client has sent nothing for the timeout.
    let got = until_closed(&mut s).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_client_holding_every_connection_cannot_lock_others_out() {
    let max = 4;
    let srv = server(ServerLimits {
        // Long enough that only the connection limit can close the idle ones.
        header_read_timeout: Duration::from_secs(60),
        max_connections: max,
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..max {
        idle.push(TcpStream::connect(srv.addr()).await.unwrap());
    }
    // Let the server accept all of them before the next one arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = tokio::time::timeout(BOUND, get_v2(srv.addr()))
        .await
        .expect("a new client was locked out");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // Room was made by closing the oldest idle connection, not by exceeding the limit.
    assert!(
        closed_within(&mut idle[0], BOUND).await,
        "the oldest idle connection is still open: the server holds more than {max}"
    );
}

#[tokio::test]
async fn shutdown_does_not_wait_for_idle_connections() {
    let srv = server(ServerLimits::default()).await;
    let addr = srv.addr();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // Shutdown closes the idle kept-alive connection instead of waiting 20 s for it.
    tokio::time::timeout(BOUND, srv.shutdown())
        .await
        .expect("shutdown waited for an idle connection");
    assert!(TcpStream::connect(addr).await.is_err() || closed_within(&mut s, BOUND).await);
}

#[tokio::test]
async fn a_half_closed_monolithic_push_is_answered_and_stored() {
    // The commit waits until the client has closed its side, so the server sees the
    // end of input while the request is still being handled.
    let hooks = registry_core::testkit::hooks::Hooks::new();
    let registry =
        Registry::builder(hooks.wrap(registry_core::MemoryStore::new().into_storage())).build();
    let mut pause = hooks.arm("blobs.commit_upload");
    let srv = serve_local(registry.clone(), HttpConfig::default())
        .await
        .expect("serve");
    let blob = b"pushed, then the client closed its sending side";
    let digest = registry_core::Digest::sha256(blob);
    let mut s = TcpStream::connect(srv.addr()).await.unwrap();
    let head = format!(
        "POST /v2/half/close/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(blob).await.unwrap();
    pause.reached().await;
    s.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    pause.release();
    let reply = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let repo = registry_core::RepoName::parse("half/close").unwrap();
    assert_eq!(
        registry.stat_blob(&repo, &digest).await.unwrap().size,
        blob.len() as u64
    );
    assert!(
        registry
            .storage()
            .blobs
            .list_uploads()
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_client_that_vanishes_midway_leaves_no_upload_session() {
    let hooks = registry_core::testkit::hooks::Hooks::new();
    let registry =
        Registry::builder(hooks.wrap(registry_core::MemoryStore::new().into_storage())).build();
    let mut pause = hooks.arm("blobs.commit_upload");
    let srv = serve_local(registry.clone(), HttpConfig::default())
        .await
        .expect("serve");
    let blob = b"pushed, then the client reset the connection";
    let digest = registry_core::Digest::sha256(blob);
    let s = TcpStream::connect(srv.addr()).await.unwrap();
    let mut s = s;
    let head = format!(
        "POST /v2/vanished/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(blob).await.unwrap();
    pause.reached().await;
    // A reset, not a polite close: the server's connection fails at once.
    s.set_zero_linger().unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    pause.release();
    // The handler finishes its work whatever happened to the client: the complete body
    // is stored, and no session is left open to count against the limits.
    let repo = registry_core::RepoName::parse("vanished").unwrap();
    tokio::time::timeout(BOUND, async {
        while registry.stat_blob(&repo, &digest).await.is_err()
            || !registry
                .storage()
                .blobs
                .list_uploads()
                .await
                .unwrap()
                .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the upload was abandoned halfway: no blob, or a session left open");
}
