//! The answer's body on its way back: each frame of the engine's response passed on as it
//! arrives (nothing buffered, never re-encoded), holding the request's load guards.
//!
//! - the first frame releases the prefill guard and times the TTFT;
//! - no frame within the idle timeout, or the engine's connection failing mid-answer: an SSE
//!   stream ends with an OpenAI-shaped error event (`data: {"error": {...}}`), so the client's
//!   SDK raises instead of waiting; any other body ends with an error (the connection is
//!   aborted, so the client sees a truncated answer, not a complete-looking one);
//! - dropped before its end (the client went away): the engine's response is dropped with it,
//!   which closes that connection, and vLLM aborts the request on disconnect.
//!
//! Whichever way it ends, the guards go with it and the outcome is counted once.

use super::metrics::ProxyMetrics;
use super::upstream::error_chain;
use crate::load::{PodLoad, PrefillGuard, RequestGuard};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::Sleep;

/// How an answer ended (the `outcome` label of `kvsync_proxy_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed to its end with a 2xx status.
    Ok,
    /// Relayed to its end with the engine's 4xx or 5xx status.
    Status,
    /// The engine's connection failed mid-answer.
    UpstreamError,
    /// No frame within the idle timeout.
    IdleTimeout,
    /// The client went away first.
    ClientGone,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Status => "error_status",
            Outcome::UpstreamError => "upstream_error",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::ClientGone => "client_gone",
        }
    }
}

/// The relayed body.
pub struct Relay {
    upstream: Incoming,
    request: Option<RequestGuard>,
    prefill: PrefillGuard,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// An SSE answer gets an error event when it breaks.
    sse: bool,
    ok_status: bool,
    model: String,
    metrics: ProxyMetrics,
    /// When the request went to the engine.
    sent: Instant,
    first: bool,
    ended: bool,
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        upstream: Incoming,
        guards: (RequestGuard, PrefillGuard),
        idle: Duration,
        sse: bool,
        ok_status: bool,
        model: String,
        metrics: ProxyMetrics,
        sent: Instant,
    ) -> Relay {
        Relay {
            upstream,
            request: Some(guards.0),
            prefill: guards.1,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            sse,
            ok_status,
            model,
            metrics,
            sent,
            first: true,
            ended: false,
        }
    }

    fn pod(&self) -> Option<&Arc<PodLoad>> {
        self.request.as_ref().map(RequestGuard::pod)
    }

    /// Counts the outcome and lets the guards go (once).
    fn end(&mut self, outcome: Outcome) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.prefill.release();
        if let Some(pod) = self.pod() {
            pod.count(&self.model, outcome.name());
        }
        self.metrics
            .duration_seconds
            .observe(self.sent.elapsed().as_secs_f64());
        if matches!(outcome, Outcome::UpstreamError | Outcome::IdleTimeout) {
            self.metrics
                .upstream_error(if outcome == Outcome::IdleTimeout {
                    "idle_timeout"
                } else {
                    "mid_stream"
                });
        }
        self.request = None;
    }

    /// The event that ends a broken SSE stream: vLLM's error shape, which the `openai` SDK
    /// raises as an `APIError` (it checks each event's data for an `error` key).
    fn error_event(message: &str, kind: &str, code: u16) -> Bytes {
        let v = serde_json::json!({"error": {
            "message": message, "type": kind, "param": null, "code": code,
        }});
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn broken(
        &mut self,
        outcome: Outcome,
        detail: String,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let pod = self.pod().map(|p| p.key.clone()).unwrap_or_default();
        tracing::warn!(pod, %detail, "answer broken mid-stream");
        self.end(outcome);
        if self.sse {
            let (kind, code) = if outcome == Outcome::IdleTimeout {
                ("GatewayTimeout", 504)
            } else {
                ("BadGateway", 502)
            };
            let msg = format!("kvsync: the engine {pod} failed mid-answer: {detail}");
            Poll::Ready(Some(Ok(Frame::data(Self::error_event(&msg, kind, code)))))
        } else {
            Poll::Ready(Some(Err(detail.into())))
        }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.upstream).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.first {
                    this.first = false;
                    this.prefill.release();
                    this.metrics
                        .ttft_seconds
                        .observe(this.sent.elapsed().as_secs_f64());
                }
                if this.upstream.is_end_stream() {
                    // The last frame of a body of known length: hyper may not poll again.
                    this.end(if this.ok_status {
                        Outcome::Ok
                    } else {
                        Outcome::Status
                    });
                } else {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.timer.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.broken(Outcome::UpstreamError, error_chain(&e)),
            Poll::Ready(None) => {
                this.end(if this.ok_status {
                    Outcome::Ok
                } else {
                    Outcome::Status
                });
                Poll::Ready(None)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let idle = this.idle;
                    this.broken(Outcome::IdleTimeout, format!("no data for {idle:?}"))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.upstream.size_hint()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (the engine's response goes with
        // `upstream`).
        self.end(Outcome::ClientGone);
    }
}
