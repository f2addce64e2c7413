//! The built-in server behind [`serve_on`](crate::serve_on) and
//! [`serve_local`](crate::serve_local): HTTP/1.1 with connection hygiene, so that idle or
//! slow clients cannot hold the process's sockets and file descriptors.
//!
//! - A client must send a request's headers within [`ServerLimits::header_read_timeout`]
//!   of opening the connection, and of the previous response on a kept-alive one: a
//!   slowloris client and an idle keep-alive connection are both closed after it.
//! - At most [`ServerLimits::max_connections`] connections are served. When all are
//!   taken, the oldest connection is asked to close (it finishes the request it is
//!   serving, if any, and is closed at once if it is between requests) before the next
//!   one is accepted; meanwhile new clients wait in the listen backlog. So the process
//!   never holds more sockets than the limit, and a client that opens many connections
//!   and sends nothing only delays others until the oldest of its connections goes.
//!
//! Embedders who mount [`router`](crate::router) on their own server get none of this
//! from the router: configure the equivalents there (hyper's `header_read_timeout`, a
//! connection limit in the accept loop).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

use crate::metrics::ConnectionMetrics;

/// Limits of the built-in server behind [`serve_on`](crate::serve_on): a header-read
/// timeout that is also the keep-alive idle timeout, and a connection cap that makes
/// room by closing the oldest connection.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Time allowed for a request's headers, counted from the connection's opening or
    /// from the previous response (so it is also the keep-alive idle timeout).
    /// Default 20 s.
    pub header_read_timeout: Duration,
    /// Connections served at once. Default 512, well below the usual limit of 1,024
    /// file descriptors per process, which blob reads and the metadata store share.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(20),
            max_connections: 512,
        }
    }
}

/// What accepts TLS on the built-in server's connections (feature `tls`).
#[cfg(feature = "tls")]
pub(crate) type Tls = tokio_rustls::TlsAcceptor;
/// Without the `tls` feature there is no TLS to accept.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub(crate) enum Tls {}

/// Open connections, oldest first, each with the means to ask it to close.
#[derive(Default)]
struct Connections {
    open: Mutex<BTreeMap<u64, Open>>,
}

struct Open {
    peer: SocketAddr,
    close: Arc<Notify>,
    asked: bool,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Open>> {
        // Plain values: a panic elsewhere cannot leave the map inconsistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the oldest connection not yet asked to close.
    fn close_oldest(&self, limit: usize, metrics: Option<&ConnectionMetrics>) {
        let mut open = self.lock();
        if let Some(oldest) = open.values_mut().find(|c| !c.asked) {
            oldest.asked = true;
            oldest.close.notify_one();
            if let Some(m) = metrics {
                m.evicted.inc();
            }
            tracing::warn!(
                peer = %oldest.peer,
                limit,
                "connection limit reached: closing the oldest connection"
            );
        }
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then stops accepting and waits
/// for open connections to finish the requests they are serving. Connections are
/// counted into `metrics` when given.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    metrics: Option<ConnectionMetrics>,
    tls: Option<Tls>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let connections = Arc::new(Connections::default());
    let (stopping, stop) = watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A client that shuts down its sending side after a complete request (as some
        // scripts and proxies do) still gets the answer; without this the request was
        // dropped midway, with nothing stored and an upload session left open.
        .half_close(true);
    let mut next_id = 0u64;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                connections.close_oldest(max, metrics.as_ref());
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                    _ = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: try again shortly rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Small responses (status, HEAD) go out at once instead of waiting for more.
        let _ = stream.set_nodelay(true);
        if let Some(m) = &metrics {
            m.accepted.inc();
            m.open.inc();
        }
        let id = next_id;
        next_id += 1;
        let close = Arc::new(Notify::new());
        connections.lock().insert(
            id,
            Open {
                peer,
                close: close.clone(),
                asked: false,
            },
        );
        // Handlers see the client's address as axum's `ConnectInfo`, as with
        // `axum::serve(.., into_make_service_with_connect_info)`: anonymous clients'
        // upload sessions are limited per address.
        let app = app.clone();
        let with_peer = tower::ServiceBuilder::new()
            .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            })
            .service(app);
        let service = TowerToHyperService::new(with_peer);
        let (connections, stop) = (connections.clone(), stop.clone());
        let header_timeout = limits.header_read_timeout;
        let metrics = metrics.clone();
        let http = http.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => drive(&http, TokioIo::new(stream), service, &close, stop).await,
                #[cfg(feature = "tls")]
                Some(acceptor) => {
                    // The handshake gets the header-read time: a client that opens a
                    // connection and sends nothing is closed as on plain HTTP.
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            drive(&http, TokioIo::new(stream), service, &close, stop).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    if let Some(m) = &metrics {
                        m.header_timeouts.inc();
                    }
                    tracing::info!(
                        %peer,
                        timeout = ?header_timeout,
                        "closed a connection that sent no request headers in time"
                    );
                } else {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            }
            connections.lock().remove(&id);
            if let Some(m) = &metrics {
                m.open.dec();
            }
            drop(slot);
        });
    }
    let _ = stopping.send(true);
    // Every connection holds a slot until it has finished.
    let _ = slots.acquire_many(max as u32).await;
}

/// Serves one connection until it ends, is asked to close (the connection limit), or
/// the server stops; the last two finish the request in flight first.
async fn drive<I, S>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    service: S,
    close: &Notify,
    mut stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = http.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        _ = close.notified() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        _ = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}
