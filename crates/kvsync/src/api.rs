//! The HTTP API: `POST /v1/route`, `GET /v1/pods`, `GET /v1/models`, `/healthz`, `/readyz`,
//! `/metrics`.

use crate::approx::Approx;
use crate::manager::{PodTable, WorkerTable};
use crate::metrics::Metrics;
use crate::tokenizer::{Text, Tokenizer};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prefix_index::{Index, Tier, WorkerId};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 << 20;

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
    /// Whether the index is fed by KV events (otherwise `recent` is the only knowledge).
    pub kv_sync: bool,
    /// Recent routing decisions: with KV sync, those whose events may not have arrived yet (a
    /// short TTL); without, the approximate index.
    pub recent: Approx,
    pub ready: tokio::sync::watch::Receiver<bool>,
    /// When each worker was last selected (tie-breaking); bounded by the workers of the pods.
    pub selected: parking_lot::Mutex<HashMap<WorkerId, Instant>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/route", post(route))
        .route("/v1/pods", get(pods))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
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

/// The body of `POST /v1/route` (unknown fields are ignored).
#[derive(Debug, serde::Deserialize)]
struct RouteRequest {
    model: Option<String>,
    lora: Option<String>,
    token_ids: Option<TokenIds>,
    prompt: Option<String>,
    messages: Option<Value>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
}

/// Token ids read straight into a `Vec<u32>` (no intermediate JSON values).
#[derive(Debug)]
struct TokenIds(Vec<u32>);

impl<'de> serde::Deserialize<'de> for TokenIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TokenIds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`token_ids` must be an array of token ids (u32)")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TokenIds, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                loop {
                    match seq.next_element::<u32>() {
                        Ok(Some(t)) => v.push(t),
                        Ok(None) => return Ok(TokenIds(v)),
                        Err(_) => {
                            return Err(serde::de::Error::custom(
                                "`token_ids` must be an array of token ids (u32)",
                            ))
                        }
                    }
                }
            }
        }
        d.deserialize_seq(V)
    }
}

/// One candidate worker of a route request.
struct Candidate {
    worker: WorkerId,
    address: String,
    /// Leading blocks the index says the worker holds.
    blocks: u32,
    per_tier: [u32; Tier::COUNT],
    /// Leading blocks recently routed to it.
    routed: u32,
}

impl Candidate {
    /// What the choice ranks by: held, or routed and not yet announced.
    fn rank(&self) -> u32 {
        self.blocks.max(self.routed)
    }
}

/// The key of a worker in the recent-decisions table.
fn recent_key(w: &WorkerId) -> String {
    format!("{}#{}", w.pod, w.dp_rank)
}

async fn route(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("unreadable request body (at most {MAX_BODY} bytes): {e}"),
            )
        }
    };
    let req: RouteRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) if e.is_syntax() || e.is_eof() => {
            return error(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"))
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")),
    };
    let Some(model) = req.model.as_deref().filter(|m| !m.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`model` (a non-empty string) is required",
        );
    };
    let lora = match req.lora.as_deref() {
        None => None,
        Some("") => return error(StatusCode::BAD_REQUEST, "`lora` must be a non-empty string"),
        Some(l) => Some(l),
    };
    let given: Vec<&str> = [
        ("token_ids", req.token_ids.is_some()),
        ("prompt", req.prompt.is_some()),
        (
            "messages",
            req.messages.as_ref().is_some_and(|m| !m.is_null()),
        ),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(k, _)| k)
    .collect();
    if given.len() != 1 {
        return error(
            StatusCode::BAD_REQUEST,
            format!("exactly one of `token_ids`, `prompt`, `messages` is required (got {given:?})"),
        );
    }
    // Candidates: every eligible pod of the model, each rank.
    let candidates: Vec<(WorkerId, String)> = {
        let pods = s.pods.read();
        pods.values()
            .filter_map(|v| v.info.target.as_ref().ok().map(|t| (v, t)))
            .filter(|(_, t)| t.model == model)
            .flat_map(|(v, t)| {
                (0..t.dp_size).map(move |r| (WorkerId::new(v.info.key.clone(), r), t.ip.clone()))
            })
            .collect()
    };
    if candidates.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown model {model:?}: no eligible pod serves it"),
        );
    }
    let text = match given[0] {
        "token_ids" => None,
        "prompt" => {
            let Some(p) = req.prompt.as_deref().filter(|p| !p.is_empty()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "`prompt` must be a non-empty string",
                );
            };
            Some(Text::Prompt {
                prompt: p,
                add_special_tokens: req.add_special_tokens.unwrap_or(true),
            })
        }
        _ => {
            let m = req.messages.as_ref().unwrap_or(&Value::Null);
            if m.as_array().is_none_or(|a| a.is_empty()) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "`messages` must be a non-empty array",
                );
            }
            Some(Text::Messages {
                messages: m,
                add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                add_special_tokens: req.add_special_tokens.unwrap_or(false),
            })
        }
    };
    let tokens: Vec<u32> = match text {
        None => match req.token_ids {
            Some(TokenIds(t)) if !t.is_empty() => t,
            _ => return error(StatusCode::BAD_REQUEST, "`token_ids` is empty"),
        },
        Some(text) => match tokenize(&s, model, &candidates, text).await {
            Ok(t) => t,
            Err(r) => return r,
        },
    };

    let t0 = Instant::now();
    let (block_size, mut matched): (u32, HashMap<WorkerId, (u32, [u32; Tier::COUNT])>) =
        if s.kv_sync {
            let l = s.index.lookup(model, lora, &tokens);
            (
                l.block_size.unwrap_or(s.recent.block_size() as u32),
                l.matches
                    .into_iter()
                    .map(|m| (m.worker, (m.blocks, m.per_tier)))
                    .collect(),
            )
        } else {
            (s.recent.block_size() as u32, HashMap::new())
        };
    let recent = s.recent.lookup(model, lora, &tokens, block_size as usize);
    s.metrics
        .api
        .lookup_seconds
        .observe(t0.elapsed().as_secs_f64());
    let num_blocks = (tokens.len() as u32).checked_div(block_size).unwrap_or(0);
    let mut list: Vec<Candidate> = candidates
        .into_iter()
        .map(|(w, address)| {
            let (blocks, per_tier) = matched.remove(&w).unwrap_or((0, [0; Tier::COUNT]));
            let routed = recent.get(&recent_key(&w)).copied().unwrap_or(0);
            Candidate {
                worker: w,
                address,
                blocks,
                per_tier,
                routed,
            }
        })
        .collect();
    // Best prefix first; among equals, the least recently selected, then by name. One lock
    // over the choice and its record, so concurrent requests rotate rather than pile up.
    let chosen = {
        let mut sel = s.selected.lock();
        list.sort_by(|a, b| {
            b.rank()
                .cmp(&a.rank())
                .then_with(|| sel.get(&a.worker).cmp(&sel.get(&b.worker)))
                .then_with(|| a.worker.cmp(&b.worker))
        });
        sel.insert(list[0].worker.clone(), Instant::now());
        if sel.len() > 4 * list.len() + 1024 {
            // Forget workers that no longer exist.
            let live: std::collections::HashSet<&WorkerId> =
                list.iter().map(|c| &c.worker).collect();
            sel.retain(|w, _| live.contains(w));
        }
        &list[0]
    };
    s.recent.record(
        model,
        lora,
        &tokens,
        block_size as usize,
        &recent_key(&chosen.worker),
    );
    let bucket = match chosen.rank() {
        0 => "miss",
        b if b >= num_blocks => "full",
        _ => "partial",
    };
    s.metrics
        .api
        .route_decisions
        .get_or_create(&vec![("bucket".to_owned(), bucket.to_owned())])
        .inc();
    fn view(c: &Candidate, block_size: u32, kv_sync: bool) -> PodMatch<'_> {
        // Without KV sync, what was routed is all there is to match.
        let blocks = if kv_sync { c.blocks } else { c.routed };
        let tier = Tier::ALL
            .into_iter()
            .find(|t| kv_sync && blocks > 0 && c.per_tier[*t as usize] == blocks)
            .map(Tier::name)
            .or((!kv_sync && blocks > 0).then_some(Tier::Gpu.name()));
        PodMatch {
            pod: &c.worker.pod,
            address: &c.address,
            dp_rank: c.worker.dp_rank,
            matched_blocks: blocks,
            matched_tokens: blocks * block_size,
            tier,
            routed_blocks: kv_sync.then_some(c.routed),
        }
    }
    // Typed and serialized in one pass (no intermediate JSON values).
    let answer = RouteAnswer {
        model,
        lora,
        block_size,
        num_blocks,
        exact: s.kv_sync,
        selected: view(chosen, block_size, s.kv_sync),
        pods: list
            .iter()
            .map(|c| view(c, block_size, s.kv_sync))
            .collect(),
    };
    Json(answer).into_response()
}

#[derive(serde::Serialize)]
struct PodMatch<'a> {
    pod: &'a str,
    address: &'a str,
    dp_rank: u32,
    matched_blocks: u32,
    matched_tokens: u32,
    tier: Option<&'static str>,
    /// With KV sync: leading blocks of this prompt routed here recently, whose events may not
    /// have arrived yet (ranking uses the larger of the two).
    #[serde(skip_serializing_if = "Option::is_none")]
    routed_blocks: Option<u32>,
}

#[derive(serde::Serialize)]
struct RouteAnswer<'a> {
    model: &'a str,
    lora: Option<&'a str>,
    block_size: u32,
    num_blocks: u32,
    exact: bool,
    selected: PodMatch<'a>,
    pods: Vec<PodMatch<'a>>,
}

/// Tokenizes with the configured tokenizer, or a ready pod of the model.
async fn tokenize(
    s: &AppState,
    model: &str,
    candidates: &[(WorkerId, String)],
    text: Text<'_>,
) -> Result<Vec<u32>, Response> {
    let pod_tokenizer;
    let t = match &s.tokenizer {
        Some(t) => t,
        None => {
            let ip = &candidates[0].1;
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.clone()
            };
            pod_tokenizer = Tokenizer::new(
                &format!("http://{host}:{}", s.pod_tokenizer_port),
                s.tokenizer_timeout,
            );
            &pod_tokenizer
        }
    };
    match t.tokenize(model, text).await {
        Ok(tokens) if !tokens.is_empty() => Ok(tokens),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "the text tokenizes to no token",
        )),
        Err(e) => {
            s.metrics.api.tokenizer_errors.inc();
            Err(error(
                StatusCode::BAD_GATEWAY,
                format!("tokenizer failed: {e}"),
            ))
        }
    }
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
