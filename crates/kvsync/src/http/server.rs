//! The HTTP server: hyper's HTTP/1.1 connections over our own accept loop, so that no client
//! can hold the service with slow or idle connections (`axum::serve` has no knob for either).
//!
//! - **Connection cap**: a semaphore of [`Limits::max_connections`] permits, one held by each
//!   open connection. At the cap the loop stops accepting: new connections wait in the kernel's
//!   accept backlog until one closes, and the open ones keep being served.
//! - **Header timeout**: a connection must deliver a whole request head within
//!   [`Limits::header_timeout`] of opening, or of its previous answer: a client trickling its
//!   headers, a connection that never sends anything and an idle keep-alive connection are all
//!   closed when it passes (hyper's `header_read_timeout`, timed by tokio).
//! - **Requests per connection**: the [`Limits::max_requests_per_connection`]th answer carries
//!   `connection: close` and the connection ends after it.
//!
//! Shutdown: the loop stops accepting; each connection finishes the request in flight and
//! closes (idle ones close at once); [`serve`] returns when every connection task has ended.

use axum::http::{header, HeaderValue};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The server's limits (`kvsync serve --http-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a connection may take to deliver a request head, from its opening or its
    /// previous answer: also the keep-alive idle timeout.
    pub header_timeout: Duration,
    /// Most requests answered on one connection.
    pub max_requests_per_connection: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(30),
            max_requests_per_connection: 10_000,
        }
    }
}

/// Connections the kernel holds for [`serve`] to accept: where new connections wait while the
/// server is at its connection cap (the default of `TcpListener::bind`, 128, overflowed under
/// a burst of a few hundred connections in the slow-client test, leaving clients that had
/// connected but sent nothing unaccepted for tens of seconds). The kernel caps it at
/// `net.core.somaxconn`.
pub const BACKLOG: u32 = 4096;

/// A listener on `addr` with a [`BACKLOG`]-deep accept queue.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// What the server counts (`kvsync_http_*`).
#[derive(Debug, Clone, Default)]
pub struct ServerMetrics {
    /// Connections open now.
    pub connections: Gauge,
    /// Connections closed because no whole request head came within the header timeout.
    pub header_timeouts: Counter,
}

/// Serves `app` on `listener` within `limits` until `stop` is cancelled; returns when every
/// connection has ended (each finishing the request it was answering).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: ServerMetrics,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let connections = TaskTracker::new();
    loop {
        // A permit first: at the cap, new connections wait in the accept backlog.
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                // Never closed.
                Err(_) => break,
            },
        };
        let (tcp, _peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or memory, or a connection reset before its accept:
                    // wait a little rather than spin, and keep serving.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Answers go out at once (no Nagle delay behind a small write).
        let _ = tcp.set_nodelay(true);
        let conn = builder.serve_connection(
            TokioIo::new(tcp),
            counted(app.clone(), limits.max_requests_per_connection),
        );
        let stop = stop.clone();
        let metrics = metrics.clone();
        connections.spawn(async move {
            // Declared before the connection, so dropped after it: the socket is closed before
            // its permit lets another in.
            let _permit = permit;
            metrics.connections.inc();
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            metrics.connections.dec();
            if let Err(e) = ended {
                if e.is_timeout() {
                    metrics.header_timeouts.inc();
                } else {
                    tracing::debug!(error = %e, "connection ended");
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Pause after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// `app` as one connection's service: its `max_requests`th answer says `connection: close`,
/// which makes hyper close the connection after it.
fn counted(
    app: Router,
    max_requests: u64,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future: Send,
> {
    let app = TowerToHyperService::new(app);
    let served = Arc::new(AtomicU64::new(0));
    hyper::service::service_fn(move |req| {
        let n = served.fetch_add(1, Relaxed) + 1;
        let answer = hyper::service::Service::call(&app, req);
        async move {
            let mut resp = answer.await?;
            if n >= max_requests {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(resp)
        }
    })
}
