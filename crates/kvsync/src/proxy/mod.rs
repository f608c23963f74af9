//! kvsync in the request path: an OpenAI-compatible front that chooses a pod for each request
//! and relays the engine's answer.
//!
//! ```text
//!  POST /v1/chat/completions | /v1/completions
//!    read the body (limits as /v1/route) ─▶ model (a LoRA adapter's name selects its pods and
//!    context), prompt or messages ─▶ tokens (local or remote, as /v1/route) ─▶ http::decide
//!    (index + load, route::cost) ─▶ upstream::attempt: the body bytes unchanged to the pod's
//!    HTTP port over one pooled client ─▶ relay::Relay: the answer frame by frame, guards held
//!  failure before the first byte (refused, reset, 5xx) ─▶ once more on the next pod
//!  GET /v1/models: the eligible pods' models and adapters, OpenAI's list shape
//! ```
//!
//! - this module: [`Proxy`] (config, client, load table, metrics), the handlers;
//! - [`upstream`]: the client and one forwarding attempt; [`relay`]: the answer's body;
//! - [`metrics`]: the `kvsync_proxy_*` metrics.
//!
//! Errors kvsync answers itself use vLLM's shape (`{"error": {"message", "type", "param",
//! "code"}}`, `vllm/entrypoints/openai/protocol.py`'s `ErrorResponse`), so SDKs raise their
//! usual exceptions: 400 bad request, 404 no eligible pod for the model, 503 every pod tried
//! failed, 504 no answer within the first-byte timeout; an engine's own status and error body
//! are passed through unchanged.

pub mod metrics;
pub mod relay;
pub mod upstream;

use crate::http::{AppState, Source};
use crate::load::LoadTable;
use crate::manager::PodTable;
use crate::route::cost::{self, Policy, Weights};
use crate::tokenize::Text;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use metrics::ProxyMetrics;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The response header naming the pod that answered (`namespace/name`).
pub const POD_HEADER: &str = "x-kvsync-pod";
/// The response header naming the data-parallel rank, when the pod has several.
pub const RANK_HEADER: &str = "x-kvsync-dp-rank";
/// Pods tried per request: the best, then once more the next.
pub const MAX_ATTEMPTS: usize = 2;

/// The proxy's settings (`serve` flags).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub policy: Policy,
    pub weights: Weights,
    pub connect_timeout: Duration,
    /// Request sent → response head.
    pub first_byte_timeout: Duration,
    /// Longest pause between two frames of an answer.
    pub idle_timeout: Duration,
    /// How long a pod failing `FAILURES_BEFORE_COOLDOWN` times in a row is skipped.
    pub cooldown: Duration,
    /// How often each pod's `/metrics` is scraped.
    pub scrape_interval: Duration,
    /// The other replicas (`host:port`, names resolved each round: a headless Service's name
    /// gives every replica), whose in-flight load is read from their `/v1/load`.
    pub peers: Vec<String>,
    /// How often the peers are read.
    pub peer_interval: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            policy: Policy::KvAware,
            weights: Weights::default(),
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(300),
            cooldown: Duration::from_secs(10),
            scrape_interval: Duration::from_secs(1),
            peers: Vec::new(),
            peer_interval: Duration::from_millis(100),
        }
    }
}

/// The proxy's shared state.
#[derive(Debug)]
pub struct Proxy {
    pub cfg: ProxyConfig,
    pub client: upstream::HttpClient,
    pub load: Arc<LoadTable>,
    pub metrics: ProxyMetrics,
    turn: AtomicU64,
    seed: AtomicU64,
}

impl Proxy {
    /// Registers its metrics in `registry` (the service's, prefix `kvsync`).
    pub fn new(cfg: ProxyConfig, registry: &mut prometheus_client::registry::Registry) -> Proxy {
        let load = Arc::new(LoadTable::with_peers(
            cfg.scrape_interval,
            cfg.peer_interval,
            !cfg.peers.is_empty(),
        ));
        let metrics = ProxyMetrics::register(registry, load.clone(), cfg.policy.name());
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Proxy {
            client: upstream::client(cfg.connect_timeout),
            cfg,
            load,
            metrics,
            turn: AtomicU64::new(0),
            seed: AtomicU64::new(seed),
        }
    }

    /// The inputs of one choice (the round-robin turn and a uniform draw advance).
    pub fn ask(&self, prompt_tokens: u64, block_size: u32) -> cost::Ask {
        // splitmix64 over a shared counter.
        let mut z = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        cost::Ask {
            policy: self.cfg.policy,
            prompt_tokens,
            block_size,
            weights: self.cfg.weights,
            draw: (z >> 11) as f64 / (1u64 << 53) as f64,
            turn: self.turn.fetch_add(1, Relaxed),
        }
    }

    /// The scraper of every eligible pod's `/metrics`, until `stop` (the caller owns the task).
    pub fn scraper(
        &self,
        pods: PodTable,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        crate::load::scrape::run(self.load.clone(), pods, self.client.clone(), stop)
    }

    /// The reader of the peers' in-flight load, until `stop` (the caller owns the task; it
    /// ends at once without peers).
    pub fn peer_reader(
        &self,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let read = crate::load::peers::run(
            self.load.clone(),
            self.cfg.peers.clone(),
            self.cfg.peer_interval,
            self.client.clone(),
            stop.clone(),
        );
        let push = crate::load::peers::push(
            self.load.clone(),
            self.client.clone(),
            self.cfg.peer_interval.max(Duration::from_millis(100)),
            stop,
        );
        async move {
            let ((), ()) = tokio::join!(read, push);
        }
    }
}

/// An error kvsync answers itself, in vLLM's (OpenAI's) shape.
pub fn openai_error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {
        "message": message.into(), "type": kind, "param": null, "code": status.as_u16(),
    }});
    (status, Json(body)).into_response()
}

/// The members of an OpenAI request the proxy reads (the body itself goes on unchanged).
#[derive(Debug, serde::Deserialize)]
struct OpenAiRequest {
    model: Option<String>,
    prompt: Option<PromptField>,
    messages: Option<Value>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    tools: Option<Value>,
    chat_template_kwargs: Option<Value>,
}

/// The two endpoints relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

pub async fn chat(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    forward(&s, Endpoint::Chat, headers, body).await
}

pub async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    forward(&s, Endpoint::Completions, headers, body).await
}

/// What a request asks of the pods: the base model, the adapter, and the text to tokenize.
enum Prompt<'a> {
    Text(Text<'a>),
    Tokens(Vec<u32>),
    /// Nothing to match (routed on load alone).
    None,
}

/// A completion's `prompt` as read: a string, or token ids; of a batch (a list of strings or
/// of id lists) the first element. Read without building JSON values: 8k token ids as
/// `serde_json::Value`s cost more than everything else the proxy does.
#[derive(Debug, PartialEq)]
enum PromptField {
    Text(String),
    Ids(Vec<u32>),
    /// An empty list.
    Empty,
}

/// One element of a prompt list.
enum Element {
    Id(u32),
    Text(String),
    Ids(Vec<u32>),
}

impl<'de> serde::Deserialize<'de> for Element {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Element;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token id, a string or a list of token ids")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Element, E> {
                u32::try_from(v)
                    .map(Element::Id)
                    .map_err(|_| E::custom("a token id over u32"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Element, E> {
                Ok(Element::Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Element, E> {
                Ok(Element::Text(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Element, A::Error> {
                let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(t) = seq.next_element::<u32>()? {
                    ids.push(t);
                }
                Ok(Element::Ids(ids))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for PromptField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PromptField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or token ids")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PromptField, E> {
                Ok(PromptField::Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<PromptField, E> {
                Ok(PromptField::Text(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<PromptField, A::Error> {
                let skip_rest = |mut seq: A| -> Result<(), A::Error> {
                    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                    Ok(())
                };
                match seq.next_element::<Element>()? {
                    None => Ok(PromptField::Empty),
                    Some(Element::Id(t)) => {
                        let mut ids =
                            Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20) + 1);
                        ids.push(t);
                        while let Some(t) = seq.next_element::<u32>()? {
                            ids.push(t);
                        }
                        Ok(PromptField::Ids(ids))
                    }
                    Some(Element::Text(t)) => skip_rest(seq).map(|()| PromptField::Text(t)),
                    Some(Element::Ids(ids)) => skip_rest(seq).map(|()| PromptField::Ids(ids)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The prompt to match: a completion's `prompt` (a string, token ids, or a batch of either:
/// its first element), or chat `messages`.
fn prompt_of(req: &OpenAiRequest, endpoint: Endpoint) -> Result<Prompt<'_>, String> {
    match endpoint {
        Endpoint::Chat => match &req.messages {
            Some(m) if m.as_array().is_some_and(|a| !a.is_empty()) => {
                Ok(Prompt::Text(Text::Messages {
                    messages: m,
                    add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                    add_special_tokens: req.add_special_tokens.unwrap_or(false),
                    tools: req.tools.as_ref(),
                    template_kwargs: req.chat_template_kwargs.as_ref(),
                }))
            }
            _ => Err("`messages` must be a non-empty array".to_owned()),
        },
        Endpoint::Completions => match &req.prompt {
            Some(PromptField::Text(p)) if p.is_empty() => Ok(Prompt::None),
            Some(PromptField::Text(p)) => Ok(Prompt::Text(Text::Prompt {
                prompt: p,
                add_special_tokens: req.add_special_tokens.unwrap_or(true),
            })),
            Some(PromptField::Ids(ids)) if !ids.is_empty() => Ok(Prompt::Tokens(ids.clone())),
            Some(_) => Err("`prompt` must not be empty".to_owned()),
            None => Err("`prompt` (a string or token ids) is required".to_owned()),
        },
    }
}

/// The (base model, adapter) of a requested model name: a base model's pods, else the pods
/// whose adapter label is that name.
pub(crate) fn resolve(s: &AppState, name: &str) -> Option<(String, Option<String>)> {
    let pods = s.pods.read();
    let targets = || pods.values().filter_map(|v| v.info.target.as_ref().ok());
    if targets().any(|t| t.model == name) {
        return Some((name.to_owned(), None));
    }
    targets()
        .find(|t| t.lora.as_deref() == Some(name))
        .map(|t| (t.model.clone(), Some(name.to_owned())))
}

/// One pod to try, owned (the pod table's lock is not held across the request).
struct Pick {
    pod: String,
    base_url: String,
    dp_rank: u32,
    dp_size: u32,
    uncached: u64,
}

async fn forward(s: &AppState, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let t_in = Instant::now();
    let p = &s.proxy;
    let body = match crate::http::read_body(&headers, body, s.body_timeout).await {
        Ok(b) => b,
        Err(r) => {
            p.metrics.rejected("bad_request");
            return r;
        }
    };
    let bad = |msg: String| {
        p.metrics.rejected("bad_request");
        openai_error(StatusCode::BAD_REQUEST, "BadRequestError", msg)
    };
    let req: OpenAiRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("the body is not a valid request: {e}")),
    };
    let Some(name) = req.model.as_deref().filter(|m| !m.is_empty()) else {
        return bad("`model` (a non-empty string) is required".to_owned());
    };
    let prompt = match prompt_of(&req, endpoint) {
        Ok(p) => p,
        Err(msg) => return bad(msg),
    };
    let no_pod = || {
        p.metrics.rejected("no_pod");
        openai_error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("The model `{name}` does not exist: no eligible pod serves it."),
        )
    };
    let Some((model, lora)) = resolve(s, name) else {
        return no_pod();
    };
    let tokens = match prompt {
        Prompt::Tokens(t) => t,
        Prompt::None => Vec::new(),
        Prompt::Text(text) => match crate::http::tokenize_as(s, name, &model, text).await {
            Ok(t) => t.tokens,
            // The request itself cannot be rendered: the engine would refuse it as well.
            Err(f) if f.source == Source::Local && f.status == StatusCode::BAD_REQUEST => {
                return bad(f.message);
            }
            Err(f) => {
                // Routed on load alone rather than refused: the engine tokenizes for itself.
                tracing::debug!(msg = %f.message, "routing without a prefix");
                Vec::new()
            }
        },
    };
    let lora_pods = lora.is_some();
    let picks = crate::http::decide(
        s,
        &model,
        lora.as_deref(),
        lora_pods,
        &tokens,
        |list, _, _| {
            // The best, and the next for a retry (pods in cool-down are already last).
            list.iter()
                .take(MAX_ATTEMPTS)
                .map(|c| Pick {
                    pod: c.worker.pod.to_owned(),
                    base_url: format!(
                        "http://{}:{}",
                        if c.address.contains(':') {
                            format!("[{}]", c.address)
                        } else {
                            c.address.to_owned()
                        },
                        c.http_port
                    ),
                    dp_rank: c.worker.dp_rank,
                    dp_size: c.dp_size,
                    uncached: c.cost.uncached_tokens,
                })
                .collect::<Vec<_>>()
        },
    );
    let Some(picks) = picks else {
        return no_pod();
    };
    let mut last_error = String::new();
    let mut attempts = 0;
    for (i, pick) in picks.iter().enumerate() {
        if attempts == MAX_ATTEMPTS {
            break;
        }
        attempts += 1;
        if attempts > 1 {
            p.metrics.retries.inc();
        }
        let entry = p.load.entry(&pick.pod, &pick.base_url);
        let guards = entry.begin(pick.uncached);
        let url = format!("{}{}", pick.base_url, endpoint.path());
        let rank = (pick.dp_size > 1).then_some(pick.dp_rank);
        if attempts == 1 {
            p.metrics
                .overhead_seconds
                .observe(t_in.elapsed().as_secs_f64());
        }
        let sent = Instant::now();
        let more = attempts < MAX_ATTEMPTS && i + 1 < picks.len();
        match upstream::attempt(
            &p.client,
            url,
            &headers,
            rank,
            body.clone(),
            p.cfg.first_byte_timeout,
        )
        .await
        {
            Ok(resp) if resp.status().is_server_error() => {
                p.metrics.upstream_error("status_5xx");
                if entry.failed(Instant::now(), p.cfg.cooldown) {
                    tracing::warn!(pod = pick.pod, "failing again and again: cooling down");
                }
                if more {
                    last_error = format!("{} answered {}", pick.pod, resp.status());
                    entry.count(name, "failed");
                    continue;
                }
                return relayed(s, name, pick, resp, guards, sent);
            }
            Ok(resp) => {
                entry.succeeded();
                return relayed(s, name, pick, resp, guards, sent);
            }
            Err(e) => {
                p.metrics.upstream_error(e.reason());
                entry.count(name, "failed");
                if entry.failed(Instant::now(), p.cfg.cooldown) {
                    tracing::warn!(pod = pick.pod, "failing again and again: cooling down");
                }
                tracing::warn!(pod = pick.pod, error = %e, "attempt failed");
                if !e.retriable() {
                    p.metrics.rejected("timeout");
                    return openai_error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "GatewayTimeout",
                        format!("kvsync: {e}"),
                    );
                }
                last_error = e.to_string();
            }
        }
    }
    p.metrics.rejected("unavailable");
    openai_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailableError",
        format!("kvsync: every pod tried failed ({attempts} attempts); last: {last_error}"),
    )
}

/// The engine's answer, relayed: its status and headers, `x-kvsync-pod`, its body frame by
/// frame.
fn relayed(
    s: &AppState,
    model: &str,
    pick: &Pick,
    resp: hyper::Response<hyper::body::Incoming>,
    guards: (crate::load::RequestGuard, crate::load::PrefillGuard),
    sent: Instant,
) -> Response {
    let (parts, incoming) = resp.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let relay = relay::Relay::new(
        incoming,
        guards,
        s.proxy.cfg.idle_timeout,
        sse,
        parts.status.is_success(),
        model.to_owned(),
        s.proxy.metrics.clone(),
        sent,
    );
    let mut out = Response::new(Body::new(relay));
    *out.status_mut() = parts.status;
    upstream::response_headers(&parts.headers, out.headers_mut());
    if let Ok(v) = HeaderValue::from_str(&pick.pod) {
        out.headers_mut().insert(POD_HEADER, v);
    }
    if pick.dp_size > 1 {
        out.headers_mut()
            .insert(RANK_HEADER, HeaderValue::from(pick.dp_rank));
    }
    out
}

/// `GET /v1/models`: the models and LoRA adapters of the eligible pods in OpenAI's list shape
/// (`{"object": "list", "data": [{"id", "object": "model", "created", "owned_by", "root",
/// "parent"}]}`, as vLLM's `ModelCard`), each entry with kvsync's own `model`, `pods`,
/// `workers`, `block_size` and `tokenizer` (`local`: in process from the model's files;
/// `remote`: an engine's `/tokenize`); `models` keeps the base models' list of earlier versions.
pub async fn models(State(s): State<Arc<AppState>>) -> Response {
    use std::collections::BTreeMap;
    // name → (base model, is adapter, pods, workers)
    let mut by_name: BTreeMap<String, (String, bool, u32, u32)> = BTreeMap::new();
    for v in s.pods.read().values() {
        if let Ok(t) = &v.info.target {
            let e = by_name
                .entry(t.model.clone())
                .or_insert_with(|| (t.model.clone(), false, 0, 0));
            e.2 += 1;
            e.3 += t.dp_size;
            if let Some(l) = t.lora.as_ref().filter(|l| **l != t.model) {
                let e = by_name
                    .entry(l.clone())
                    .or_insert_with(|| (t.model.clone(), true, 0, 0));
                e.2 += 1;
                e.3 += t.dp_size;
            }
        }
    }
    let mut data = Vec::new();
    let mut old = Vec::new();
    for (name, (base, adapter, pods, workers)) in by_name {
        let lora = adapter.then_some(name.as_str());
        let block_size = s.index.block_size(&base, lora);
        let tokenizer = crate::http::source_of(&s, &name, &base).name();
        data.push(json!({
            "id": name, "object": "model", "created": 0, "owned_by": "kvsync",
            "root": name, "parent": adapter.then_some(&base),
            "model": base, "lora": lora, "pods": pods, "workers": workers,
            "block_size": block_size, "tokenizer": tokenizer,
        }));
        if !adapter {
            old.push(json!({"model": name, "pods": pods, "workers": workers,
                            "block_size": block_size, "tokenizer": tokenizer}));
        }
    }
    Json(json!({"object": "list", "data": data, "models": old})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> OpenAiRequest {
        serde_json::from_value(v).expect("request")
    }

    #[test]
    fn prompts_of_every_openai_shape() {
        let r = req(json!({"model": "m", "prompt": "hi there"}));
        assert!(matches!(
            prompt_of(&r, Endpoint::Completions),
            Ok(Prompt::Text(Text::Prompt {
                prompt: "hi there",
                add_special_tokens: true
            }))
        ));
        let r = req(json!({"model": "m", "prompt": [1, 2, 3]}));
        assert!(
            matches!(prompt_of(&r, Endpoint::Completions), Ok(Prompt::Tokens(t)) if t == [1, 2, 3])
        );
        let r = req(json!({"model": "m", "prompt": [[4, 5], [6]]}));
        assert!(
            matches!(prompt_of(&r, Endpoint::Completions), Ok(Prompt::Tokens(t)) if t == [4, 5])
        );
        let r = req(json!({"model": "m", "prompt": ["a b", "c"]}));
        assert!(matches!(
            prompt_of(&r, Endpoint::Completions),
            Ok(Prompt::Text(Text::Prompt { prompt: "a b", .. }))
        ));
        // Refused when read, or when asked for.
        for bad in [
            json!([]),
            json!([-1]),
            json!([1, "a"]),
            json!([4294967296u64]),
            json!(3),
            json!(null),
            json!({"a": 1}),
        ] {
            let parsed =
                serde_json::from_value::<OpenAiRequest>(json!({"model": "m", "prompt": bad}));
            assert!(
                parsed.map_or(true, |r| prompt_of(&r, Endpoint::Completions).is_err()),
                "{bad}"
            );
        }
        let r = req(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}));
        assert!(matches!(
            prompt_of(&r, Endpoint::Chat),
            Ok(Prompt::Text(Text::Messages {
                add_generation_prompt: true,
                ..
            }))
        ));
        let r = req(json!({"model": "m", "messages": []}));
        assert!(prompt_of(&r, Endpoint::Chat).is_err());
    }
}
