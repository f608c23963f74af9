//! The HTTP API: `POST /v1/route`, `POST /tokenize`, `GET /v1/pods`, `GET /v1/models`,
//! `/healthz`, `/readyz`, `/metrics`, and the proxy's `POST /v1/chat/completions` and
//! `/v1/completions` ([`crate::proxy`]).
//!
//! - this module: the shared [`AppState`], the router, the small read-only handlers;
//! - `body`: reading a request body within its size and time limits (413 / 408);
//! - [`request`]: parsing a route request (a fast path for gateway shapes, serde otherwise);
//! - `route`: the `/v1/route` handler: parse, tokenize, ask the index, let `crate::route`
//!   choose;
//! - `answer`: the route answer's JSON;
//! - `tokenize`: `POST /tokenize` in vLLM's shape, with the tokenizer kvsync routes with;
//! - [`server`]: the accept loop and connection limits (header timeout, connection cap,
//!   requests per connection).

mod answer;
mod body;
pub mod request;
mod route;
pub mod server;
mod tokenize;

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

pub(crate) use body::read_body;
pub use body::{BODY_TIMEOUT, MAX_BODY, MAX_DRAIN};
pub(crate) use route::{decide, source_of, tokenize_as, Source};

/// Everything the handlers read.
#[derive(Debug)]
pub struct AppState {
    pub index: Arc<Index>,
    pub pods: PodTable,
    pub workers: WorkerTable,
    pub metrics: Metrics,
    /// The `/tokenize` client (pooled connections to every tokenizer it asks).
    pub tokenizer: Tokenizer,
    /// The configured remote tokenizer (`http://host:port`), if any; otherwise the model's
    /// own pods are asked.
    pub tokenizer_endpoint: Option<String>,
    /// Port of a pod's own `/tokenize` when no tokenizer is configured (None: the pod's HTTP
    /// port).
    pub pod_tokenizer_port: Option<u16>,
    /// The in-process tokenizers (`--tokenizer MODEL=DIR`), used before the remote one.
    pub local: crate::tokenize::local::LocalTokenizers,
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
    /// The proxy: its policy and weights (also `/v1/route`'s), client, load table, metrics.
    pub proxy: Arc<crate::proxy::Proxy>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/route", post(route::route))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/v1/pods", get(pods))
        .route("/v1/load", get(load))
        .route("/v1/peers/routed", post(peer_routed))
        .route("/v1/models", get(crate::proxy::models))
        .route("/v1/chat/completions", post(crate::proxy::chat))
        .route("/v1/completions", post(crate::proxy::completions))
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

/// This replica's in-flight load per pod, for its peers (`crate::load::peers`).
async fn load(State(s): State<Arc<AppState>>) -> Response {
    Json(crate::load::peers::answer(&s.proxy.load)).into_response()
}

/// Routing decisions pushed by a peer replica (`crate::load::peers::push`): each is recorded
/// as this replica's own are, for `--routed-ttl-ms`, when its pod is known here.
async fn peer_routed(
    State(s): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let body = match body::read_body(&headers, body, s.body_timeout).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "malformed JSON".to_owned());
    };
    let load = &s.proxy.load;
    let Some(decisions) = crate::load::peers::parse_push(load.instance(), &v) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let now = Instant::now();
    let pods = s.pods.read();
    let mut recorded = 0u64;
    for d in decisions {
        if pods.contains_key(d.pod.as_str()) {
            s.recent
                .record(&d.chain, &WorkerId::new(d.pod.as_str(), d.rank), now);
            recorded += 1;
        }
    }
    load.share.received.fetch_add(recorded, Relaxed);
    StatusCode::NO_CONTENT.into_response()
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
                            let c = info.and_then(|i| i.counters());
                            let ts = info.map_or(0.0, |i| f64::from_bits(i.last_ts.load(Relaxed)));
                            json!({
                                "dp_rank": r,
                                "endpoint": t.endpoint(r),
                                "replay_endpoint": t.replay_endpoint(r),
                                "subscription": info.map(|i| i.status().name()),
                                "failures": info.map(|i| i.failures.load(Relaxed)),
                                "state": c.as_ref().map(|c| format!("{:?}", c.state())),
                                "last_seq": c.as_ref().and_then(|c| c.next_seq.load(Relaxed).checked_sub(1)),
                                "lag_seconds": (ts > 0.0).then_some(now - ts),
                                "gaps_repaired": c.as_ref().map(|c| c.gaps_repaired.load(Relaxed)),
                                "batches_lost": c.as_ref().map(|c| c.batches_lost.load(Relaxed)),
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
                // Not while a worker's subscription has failed (it is retried).
                "subscribed": v.subscribed && ranks.iter().all(|r| r["subscription"] != "failed"),
                "workers": ranks,
            })
        })
        .collect();
    Json(json!({ "pods": list })).into_response()
}
