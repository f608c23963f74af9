//! The HTTP API: `POST /v1/route`, `GET /v1/pods`, `GET /v1/models`, `/healthz`, `/readyz`,
//! `/metrics`.
//!
//! - this module: the shared [`AppState`], the router, the small read-only handlers;
//! - `body`: reading a request body within its size and time limits (413 / 408);
//! - [`request`]: parsing a route request (a fast path for gateway shapes, serde otherwise);
//! - `route`: the `/v1/route` handler: parse, tokenize, ask the index, let `crate::route`
//!   choose;
//! - `answer`: the route answer's JSON.

mod answer;
mod body;
pub mod request;
mod route;

use crate::manager::{PodTable, WorkerTable};
use crate::metrics::Metrics;
use crate::route::approx::Approx;
use crate::tokenize::Tokenizer;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prefix_index::{Index, WorkerId};
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use body::{BODY_TIMEOUT, MAX_BODY, MAX_DRAIN};

/// Everything the handlers read.
#[derive(Debug)]
pub struct AppState {
    pub index: Arc<Index>,
    pub pods: PodTable,
    pub workers: WorkerTable,
    pub metrics: Metrics,
    /// The configured remote tokenizer, if any.
    pub tokenizer: Option<Tokenizer>,
    /// Port of a pod's own `/tokenize` when no tokenizer is configured.
    pub pod_tokenizer_port: u16,
    pub tokenizer_timeout: Duration,
    /// How long a request body may take to arrive (a stalled client does not hold a handler).
    pub body_timeout: Duration,
    /// Whether the index is fed by KV events (otherwise `recent` is the only knowledge).
    pub kv_sync: bool,
    /// Recent routing decisions: with KV sync, those whose events may not have arrived yet (a
    /// short TTL); without, the approximate index.
    pub recent: Arc<Approx>,
    pub ready: tokio::sync::watch::Receiver<bool>,
    /// When each worker was last selected (tie-breaking); bounded by the workers of the pods.
    pub selected: parking_lot::Mutex<hashbrown::HashMap<WorkerId, Instant>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/route", post(route::route))
        .route("/v1/pods", get(pods))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // `read_body` bounds the only body read.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// A JSON error: `{"error": message}` with a status.
fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if *s.ready.borrow() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first pod list",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn pods(State(s): State<Arc<AppState>>) -> Response {
    let now = crate::manager::unix_seconds();
    let pods = s.pods.read();
    let workers = s.workers.read();
    let list: Vec<Value> = pods
        .values()
        .map(|v| {
            let (target, reason) = match &v.info.target {
                Ok(t) => (Some(t), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let ranks: Vec<Value> = target
                .map(|t| {
                    (0..t.dp_size)
                        .map(|r| {
                            let w = WorkerId::new(v.info.key.clone(), r);
                            let info = workers.get(&w);
                            let c = info.and_then(|i| i.counters.get());
                            let ts = info.map_or(0.0, |i| f64::from_bits(i.last_ts.load(Relaxed)));
                            json!({
                                "dp_rank": r,
                                "endpoint": t.endpoint(r),
                                "replay_endpoint": t.replay_endpoint(r),
                                "state": c.map(|c| format!("{:?}", c.state())),
                                "last_seq": c.and_then(|c| c.next_seq.load(Relaxed).checked_sub(1)),
                                "lag_seconds": (ts > 0.0).then_some(now - ts),
                                "gaps_repaired": c.map(|c| c.gaps_repaired.load(Relaxed)),
                                "batches_lost": c.map(|c| c.batches_lost.load(Relaxed)),
                                "blocks": s.index.worker_blocks(&w).unwrap_or(0),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "pod": v.info.key,
                "model": target.map(|t| &t.model),
                "lora": target.and_then(|t| t.lora.as_ref()),
                "address": target.map(|t| &t.ip),
                "eligible": target.is_some(),
                "reason": reason,
                "subscribed": v.subscribed,
                "workers": ranks,
            })
        })
        .collect();
    Json(json!({ "pods": list })).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let mut by_model: std::collections::BTreeMap<String, (u32, u32)> = Default::default();
    for v in s.pods.read().values() {
        if let Ok(t) = &v.info.target {
            let e = by_model.entry(t.model.clone()).or_default();
            e.0 += 1;
            e.1 += t.dp_size;
        }
    }
    let list: Vec<Value> = by_model
        .into_iter()
        .map(|(m, (pods, workers))| {
            json!({"model": m, "pods": pods, "workers": workers,
                   "block_size": s.index.block_size(&m, None)})
        })
        .collect();
    Json(json!({ "models": list })).into_response()
}
