//! The HTTP API: `POST /v1/route`, `GET /v1/pods`, `GET /v1/models`, `/healthz`, `/readyz`,
//! `/metrics`.

use crate::approx::Approx;
use crate::manager::{PodTable, WorkerTable};
use crate::metrics::Metrics;
use crate::request::{self, RouteRequest, TokenIds};
use crate::tokenizer::{Text, Tokenizer};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use prefix_index::{Index, Tier, WorkerId};
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 << 20;

/// Largest body read and discarded after `MAX_BODY` is exceeded, so that the client, still
/// writing, reads the 413 and keeps its connection. Past it (or past a declared length over it)
/// the answer carries `Connection: close` and the rest is never read.
pub const MAX_DRAIN: usize = 64 << 20;

/// Default of `AppState::body_timeout`.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

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
    pub recent: Approx,
    pub ready: tokio::sync::watch::Receiver<bool>,
    /// When each worker was last selected (tie-breaking); bounded by the workers of the pods.
    pub selected: parking_lot::Mutex<hashbrown::HashMap<WorkerId, Instant>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/route", post(route))
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

/// A worker named by borrowed parts: looks up `WorkerId` keys without building one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct WorkerRef<'a> {
    // Field order and types as in `WorkerId`, so both hash alike.
    pod: &'a str,
    dp_rank: u32,
}

impl<'a> WorkerRef<'a> {
    fn of(w: &'a WorkerId) -> Self {
        WorkerRef {
            pod: &w.pod,
            dp_rank: w.dp_rank,
        }
    }
}

impl hashbrown::Equivalent<WorkerId> for WorkerRef<'_> {
    fn equivalent(&self, w: &WorkerId) -> bool {
        self.pod == &*w.pod && self.dp_rank == w.dp_rank
    }
}

/// One candidate worker of a route request.
struct Candidate<'a> {
    worker: WorkerRef<'a>,
    address: &'a str,
    /// Leading blocks the index says the worker holds.
    blocks: u32,
    per_tier: [u32; Tier::COUNT],
    /// Leading blocks recently routed to it.
    routed: u32,
    /// When it was last selected.
    last: Option<Instant>,
}

impl Candidate<'_> {
    /// What the choice ranks by: held, or routed and not yet announced.
    fn rank(&self) -> u32 {
        self.blocks.max(self.routed)
    }
}

fn unknown_model(model: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("unknown model {model:?}: no eligible pod serves it"),
    )
}

/// The address of an eligible pod serving `model`, if there is one.
fn pod_of(s: &AppState, model: &str) -> Option<String> {
    s.pods
        .read()
        .values()
        .filter_map(|v| v.info.target.as_ref().ok())
        .find(|t| t.model == model)
        .map(|t| t.ip.clone())
}

/// `r` with `Connection: close`: the server closes the connection after it (the rest of the
/// request body is not read).
fn closing(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The request body, at most `MAX_BODY` bytes, within `timeout`. A longer one is a 413:
/// read to its end first when it is no longer than `MAX_DRAIN`, so that a client which sends the
/// whole body before reading (most do) gets the answer rather than a reset, and its connection
/// stays usable; beyond that, or when the client waits for `100 Continue`, it is refused
/// before the body is sent and the connection closed.
async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    timeout: Duration,
) -> Result<Bytes, Response> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |close: bool| {
        let r = error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        );
        if close {
            closing(r)
        } else {
            r
        }
    };
    // A client that waits for `100 Continue` has not sent the body: refuse it unread (hyper
    // sends the 100 only once the body is read).
    let waits = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let limit = if waits { MAX_BODY } else { MAX_DRAIN };
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(true));
    }
    let mut kept = Vec::with_capacity(declared.map_or(0, |n| n.min(MAX_BODY as u64) as usize));
    let mut seen = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("unreadable request body: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            seen = seen.saturating_add(data.len());
            if seen <= MAX_BODY {
                kept.extend_from_slice(&data);
            } else if seen > MAX_DRAIN {
                break;
            }
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(closing(error(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {timeout:?}"),
        ))),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, e)),
        Ok(Ok(())) if seen > MAX_DRAIN => Err(too_large(true)),
        Ok(Ok(())) if seen > MAX_BODY => Err(too_large(false)),
        Ok(Ok(())) => Ok(Bytes::from(kept)),
    }
}

async fn route(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let body = match read_body(&headers, body, s.body_timeout).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: RouteRequest = match request::parse(&body) {
        Ok(r) => r,
        Err(e) if e.is_syntax() || e.is_eof() => {
            return error(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"))
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")),
    };
    drop(body);
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
        Some(text) => {
            // Text is tokenized by one of the model's engines (token ids need no pod here:
            // `decide` lists the model's pods once).
            let Some(pod_ip) = pod_of(&s, model) else {
                return unknown_model(model);
            };
            match tokenize(&s, model, &pod_ip, text).await {
                Ok(t) => t,
                Err(r) => return r,
            }
        }
    };
    let answer = decide(&s, model, lora, &tokens);
    s.metrics
        .api
        .route_seconds
        .observe(started.elapsed().as_secs_f64());
    answer
}

/// Ranks every eligible worker of `model` for `tokens`, selects one and records the choice.
fn decide(s: &AppState, model: &str, lora: Option<&str>, tokens: &[u32]) -> Response {
    let t0 = Instant::now();
    let known = if s.kv_sync {
        s.index.block_size(model, lora)
    } else {
        None
    };
    let block_size = known.unwrap_or(s.recent.block_size() as u32);
    // One chain of block hashes serves the index and the recent decisions; with the latter
    // off, the index hashes lazily and stops at the first block nobody holds.
    let (lookup, chain) = if s.recent.enabled() {
        let chain = s.index.chain(model, lora, block_size, tokens);
        let l = match known {
            Some(_) => s.index.lookup_chain(model, lora, &chain),
            None => prefix_index::Lookup::default(),
        };
        (l, chain)
    } else if known.is_some() {
        (s.index.lookup(model, lora, tokens), Vec::new())
    } else {
        Default::default()
    };
    let recent = s.recent.lookup(&chain);
    s.metrics
        .api
        .lookup_seconds
        .observe(t0.elapsed().as_secs_f64());
    let num_blocks = (tokens.len() as u32).checked_div(block_size).unwrap_or(0);
    let pods = s.pods.read();
    // Candidates: every eligible pod of the model, each rank.
    let mut list: Vec<Candidate> = pods
        .values()
        .filter_map(|v| v.info.target.as_ref().ok().map(|t| (v, t)))
        .filter(|(_, t)| t.model == model)
        .flat_map(|(v, t)| {
            (0..t.dp_size).map(move |r| Candidate {
                worker: WorkerRef {
                    pod: &v.info.key,
                    dp_rank: r,
                },
                address: &t.ip,
                blocks: 0,
                per_tier: [0; Tier::COUNT],
                routed: 0,
                last: None,
            })
        })
        .collect();
    if list.is_empty() {
        return unknown_model(model);
    }
    if !lookup.matches.is_empty() || !recent.is_empty() {
        let at: hashbrown::HashMap<WorkerRef, usize> = list
            .iter()
            .enumerate()
            .map(|(i, c)| (c.worker, i))
            .collect();
        for m in &lookup.matches {
            if let Some(&i) = at.get(&WorkerRef::of(&m.worker)) {
                list[i].blocks = m.blocks;
                list[i].per_tier = m.per_tier;
            }
        }
        for (w, n) in &recent {
            if let Some(&i) = at.get(&WorkerRef::of(w)) {
                list[i].routed = *n;
            }
        }
    }
    // Best prefix first; among equals, the least recently selected, then by name. One lock
    // over the choice and its record, so concurrent requests rotate rather than pile up.
    let chosen = {
        let mut sel = s.selected.lock();
        for c in &mut list {
            c.last = sel.get(&c.worker).copied();
        }
        list.sort_unstable_by(|a, b| {
            b.rank()
                .cmp(&a.rank())
                .then_with(|| a.last.cmp(&b.last))
                .then_with(|| a.worker.pod.cmp(b.worker.pod))
                .then_with(|| a.worker.dp_rank.cmp(&b.worker.dp_rank))
        });
        let best = WorkerId::new(list[0].worker.pod, list[0].worker.dp_rank);
        sel.insert(best.clone(), Instant::now());
        if sel.len() > 2 * pods.len() + 1024 {
            // Forget workers whose pods are gone.
            sel.retain(|w, _| pods.contains_key(&*w.pod));
        }
        best
    };
    s.recent.record(&chain, &chosen);
    let chosen = &list[0];
    let decisions = &s.metrics.api.decisions;
    match chosen.rank() {
        0 => &decisions.miss,
        b if b >= num_blocks => &decisions.full,
        _ => &decisions.partial,
    }
    .inc();
    fn view<'a>(c: &Candidate<'a>, block_size: u32, kv_sync: bool) -> PodMatch<'a> {
        // Without KV sync, what was routed is all there is to match.
        let blocks = if kv_sync { c.blocks } else { c.routed };
        let tier = Tier::ALL
            .into_iter()
            .find(|t| kv_sync && blocks > 0 && c.per_tier[*t as usize] == blocks)
            .map(Tier::name)
            .or((!kv_sync && blocks > 0).then_some(Tier::Gpu.name()));
        PodMatch {
            pod: c.worker.pod,
            address: c.address,
            dp_rank: c.worker.dp_rank,
            matched_blocks: blocks,
            matched_tokens: blocks * block_size,
            tier,
            routed_blocks: kv_sync.then_some(c.routed),
        }
    }
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
    (
        [(header::CONTENT_TYPE, "application/json")],
        answer.to_json(),
    )
        .into_response()
}

#[cfg_attr(test, derive(serde::Serialize))]
struct PodMatch<'a> {
    pod: &'a str,
    address: &'a str,
    dp_rank: u32,
    matched_blocks: u32,
    matched_tokens: u32,
    tier: Option<&'static str>,
    /// With KV sync: leading blocks of this prompt routed here recently, whose events may not
    /// have arrived yet (ranking uses the larger of the two).
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    routed_blocks: Option<u32>,
}

#[cfg_attr(test, derive(serde::Serialize))]
struct RouteAnswer<'a> {
    model: &'a str,
    lora: Option<&'a str>,
    block_size: u32,
    num_blocks: u32,
    exact: bool,
    selected: PodMatch<'a>,
    pods: Vec<PodMatch<'a>>,
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|c| c < 0x20 || c == b'"' || c == b'\\') {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

fn json_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

impl PodMatch<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"pod":"#);
        json_str(out, self.pod);
        out.extend_from_slice(br#","address":"#);
        json_str(out, self.address);
        out.extend_from_slice(br#","dp_rank":"#);
        json_u32(out, self.dp_rank);
        out.extend_from_slice(br#","matched_blocks":"#);
        json_u32(out, self.matched_blocks);
        out.extend_from_slice(br#","matched_tokens":"#);
        json_u32(out, self.matched_tokens);
        out.extend_from_slice(br#","tier":"#);
        match self.tier {
            Some(t) => json_str(out, t),
            None => out.extend_from_slice(b"null"),
        }
        if let Some(r) = self.routed_blocks {
            out.extend_from_slice(br#","routed_blocks":"#);
            json_u32(out, r);
        }
        out.push(b'}');
    }
}

impl RouteAnswer<'_> {
    /// The answer as JSON, written directly: a 64-pod answer is ~10 KB of fixed keys and
    /// numbers, where a generic serializer's per-key escaping showed in the route's profile.
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + 160 * (self.pods.len() + 1));
        out.extend_from_slice(br#"{"model":"#);
        json_str(&mut out, self.model);
        out.extend_from_slice(br#","lora":"#);
        match self.lora {
            Some(l) => json_str(&mut out, l),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","block_size":"#);
        json_u32(&mut out, self.block_size);
        out.extend_from_slice(br#","num_blocks":"#);
        json_u32(&mut out, self.num_blocks);
        out.extend_from_slice(if self.exact {
            br#","exact":true"#
        } else {
            br#","exact":false"#
        });
        out.extend_from_slice(br#","selected":"#);
        self.selected.write(&mut out);
        out.extend_from_slice(br#","pods":["#);
        for (k, p) in self.pods.iter().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            p.write(&mut out);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// Tokenizes with the configured tokenizer, or a ready pod of the model.
async fn tokenize(
    s: &AppState,
    model: &str,
    ip: &str,
    text: Text<'_>,
) -> Result<Vec<u32>, Response> {
    let pod_tokenizer;
    let t = match &s.tokenizer {
        Some(t) => t,
        None => {
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_answer_json_is_serde_jsons() {
        let m = |pod, tier, routed| PodMatch {
            pod,
            address: "10.0.0.1",
            dp_rank: 3,
            matched_blocks: 7,
            matched_tokens: 112,
            tier,
            routed_blocks: routed,
        };
        for (model, lora, exact) in [
            ("m", None, true),
            ("we\"ird\\ \u{1}mödel", Some("l\n"), false),
        ] {
            let a = RouteAnswer {
                model,
                lora,
                block_size: 16,
                num_blocks: u32::MAX,
                exact,
                selected: m("ns/a", Some("GPU"), Some(0)),
                pods: vec![m("ns/a", Some("GPU"), Some(0)), m("ns/\"b\"", None, None)],
            };
            assert_eq!(
                String::from_utf8(a.to_json()).expect("utf-8"),
                serde_json::to_string(&a).expect("json")
            );
        }
        let empty = RouteAnswer {
            model: "m",
            lora: None,
            block_size: 0,
            num_blocks: 0,
            exact: true,
            selected: m("p", None, None),
            pods: Vec::new(),
        };
        assert_eq!(
            String::from_utf8(empty.to_json()).expect("utf-8"),
            serde_json::to_string(&empty).expect("json")
        );
    }
}
