//! An HTTP server that can die: an accept loop serving an axum [`Router`] whose connections
//! are tasks it owns, so that [`HttpServer::kill`] drops the listener and every open
//! connection at once (a crashed engine's API server: streams cut mid-response), while
//! [`HttpServer::stop`] lets open requests finish for a grace period first. Both join every
//! task; dropping the server aborts them.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// How the accept loop ends.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Drop every connection now.
    Kill,
    /// Let open requests finish for this long, then drop what is left.
    Graceful(Duration),
}

/// A running server on its listener's address.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<Stop>>,
    task: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `router` on `listener` (on the current tokio runtime).
    pub fn start(listener: TcpListener, router: Router) -> std::io::Result<HttpServer> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, router, stopped));
        Ok(HttpServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener and every open connection at once, and joins them.
    pub async fn kill(mut self) {
        self.finish(Stop::Kill).await;
    }

    /// Closes the listener, lets open requests finish for `grace`, drops what is left, and
    /// joins every task.
    pub async fn stop(mut self, grace: Duration) {
        self.finish(Stop::Graceful(grace)).await;
    }

    async fn finish(&mut self, how: Stop) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(how);
        }
        if let Some(t) = self.task.take() {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "the HTTP accept task failed");
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, router: Router, mut stopped: oneshot::Receiver<Stop>) {
    let mut conns = JoinSet::new();
    let (grace_tx, grace_rx) = watch::channel(false);
    let how = loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, router.clone(), grace_rx.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            s = &mut stopped => break s.unwrap_or(Stop::Kill),
        }
    };
    drop(listener);
    match how {
        Stop::Kill => conns.abort_all(),
        Stop::Graceful(grace) => {
            let _ = grace_tx.send(true);
            let drain = async { while conns.join_next().await.is_some() {} };
            if tokio::time::timeout(grace, drain).await.is_err() {
                conns.abort_all();
            }
        }
    }
    while conns.join_next().await.is_some() {}
}

async fn connection(stream: TcpStream, router: Router, mut grace: watch::Receiver<bool>) {
    // Tokens go out as they come (no Nagle delay on SSE chunks).
    let _ = stream.set_nodelay(true);
    let svc = TowerToHyperService::new(router);
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut graceful = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection");
                }
                return;
            }
            Ok(()) = grace.changed(), if !graceful => {
                graceful = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
