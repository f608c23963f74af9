//! `POST /v1/route`: the request parsed, its text tokenized (the configured tokenizer or one of
//! the model's pods), the index and the recent decisions asked, the choice made by
//! [`crate::route`], recorded, and answered.

use super::answer::{PodMatch, RouteAnswer, Score};
use super::body::read_body;
use super::request::{self, RouteRequest, TokenIds};
use super::{error, AppState};
use crate::route::{self as choice, cost, Candidate, WorkerRef};
use crate::tokenize::Text;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prefix_index::{Tier, WorkerId};
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;

fn unknown_model(model: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("unknown model {model:?}: no eligible pod serves it"),
    )
}

/// The `/tokenize` bases of the eligible (so Ready) pods serving `model`, by pod name.
fn pod_tokenizers(s: &AppState, model: &str) -> Vec<String> {
    s.pods
        .read()
        .values()
        .filter_map(|v| v.info.target.as_ref().ok())
        .filter(|t| t.model == model)
        .map(|t| {
            let port = s.pod_tokenizer_port.unwrap_or(t.http_port);
            if t.ip.contains(':') {
                format!("http://[{}]:{port}", t.ip)
            } else {
                format!("http://{}:{port}", t.ip)
            }
        })
        .collect()
}

pub(super) async fn route(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
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
                tools: req.tools.as_ref(),
                template_kwargs: req.chat_template_kwargs.as_ref(),
            })
        }
    };
    let tokens: Vec<u32> = match text {
        None => match req.token_ids {
            Some(TokenIds(t)) if !t.is_empty() => t,
            _ => return error(StatusCode::BAD_REQUEST, "`token_ids` is empty"),
        },
        Some(text) => {
            // Text is tokenized by the configured tokenizer or by the model's engines (token
            // ids need no pod here: `decide` lists the model's pods once).
            match tokenize(&s, model, text).await {
                Ok(t) => t,
                Err((status, msg)) => return error(status, msg),
            }
        }
    };
    let answer = decide(
        &s,
        model,
        lora,
        false,
        &tokens,
        |list, block_size, num_blocks| answer(&s, model, lora, list, block_size, num_blocks),
    )
    .unwrap_or_else(|| unknown_model(model));
    s.metrics
        .api
        .route_seconds
        .observe(started.elapsed().as_secs_f64());
    answer
}

/// Ranks every eligible worker of `model` for `tokens` under the configured policy, selects
/// the first, records the choice, and hands the ranked list to `then` (with the block size and
/// the prompt's full blocks). `lora_pods`: only pods whose adapter label names `lora` (the
/// proxy, which must reach a pod that serves the adapter); otherwise every pod of the model.
/// `None` when no pod is eligible.
pub(crate) fn decide<R>(
    s: &AppState,
    model: &str,
    lora: Option<&str>,
    lora_pods: bool,
    tokens: &[u32],
    then: impl FnOnce(&[Candidate<'_>], u32, u32) -> R,
) -> Option<R> {
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
    let now = Instant::now();
    let recent = s.recent.lookup(&chain, now);
    s.metrics
        .api
        .lookup_seconds
        .observe(t0.elapsed().as_secs_f64());
    let num_blocks = (tokens.len() as u32).checked_div(block_size).unwrap_or(0);
    let pods = s.pods.read();
    let now = Instant::now();
    let load = &s.proxy.load;
    // Candidates: every eligible pod of the model, each rank.
    let mut list: Vec<Candidate> = pods
        .values()
        .filter_map(|v| v.info.target.as_ref().ok().map(|t| (v, t)))
        .filter(|(_, t)| t.model == model && (!lora_pods || t.lora.as_deref() == lora))
        .flat_map(|(v, t)| {
            let pod_load = load.view(&v.info.key, now);
            (0..t.dp_size).map(move |r| Candidate {
                worker: WorkerRef {
                    pod: &v.info.key,
                    dp_rank: r,
                },
                address: &t.ip,
                http_port: t.http_port,
                dp_size: t.dp_size,
                blocks: 0,
                per_tier: [0; Tier::COUNT],
                routed: 0,
                last: None,
                load: pod_load,
                cost: Default::default(),
            })
        })
        .collect();
    if list.is_empty() {
        return None;
    }
    choice::fill(&mut list, &lookup, &recent);
    // Under the configured policy; among equals, the least recently selected, then by name.
    // One lock over the choice and its record, so concurrent requests rotate rather than pile
    // up.
    let chosen = {
        let mut sel = s.selected.lock();
        for c in &mut list {
            c.last = sel.get(&c.worker).copied();
        }
        cost::choose(&mut list, &s.proxy.ask(tokens.len() as u64, block_size));
        let best = WorkerId::new(list[0].worker.pod, list[0].worker.dp_rank);
        sel.insert(best.clone(), Instant::now());
        if sel.len() > 2 * pods.len() + 1024 {
            // Forget workers whose pods are gone.
            sel.retain(|w, _| pods.contains_key(&*w.pod));
        }
        best
    };
    s.recent.record(&chain, &chosen, now);
    s.proxy
        .load
        .share
        .offer(&chosen.pod, chosen.dp_rank, &chain);
    let decisions = &s.metrics.api.decisions;
    match list[0].rank() {
        0 => &decisions.miss,
        b if b >= num_blocks => &decisions.full,
        _ => &decisions.partial,
    }
    .inc();
    Some(then(&list, block_size, num_blocks))
}

/// The `/v1/route` answer of a ranked list.
fn answer(
    s: &AppState,
    model: &str,
    lora: Option<&str>,
    list: &[Candidate<'_>],
    block_size: u32,
    num_blocks: u32,
) -> Response {
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
            score: Some(Score::of(c)),
        }
    }
    let answer = RouteAnswer {
        model,
        lora,
        block_size,
        num_blocks,
        exact: s.kv_sync,
        policy: s.proxy.cfg.policy.name(),
        selected: view(&list[0], block_size, s.kv_sync),
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

/// Which tokenizer answered: in process, or an engine's `/tokenize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Local,
    Remote,
}

impl Source {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Remote => "remote",
        }
    }
}

/// A text's tokens, and what tokenized them.
pub(crate) struct Tokens {
    pub tokens: Vec<u32>,
    pub source: Source,
    /// The engine's `max_model_len`, when a remote tokenizer said.
    pub max_model_len: Option<u64>,
}

/// Why a text was not tokenized: the status and message to answer, and what tried.
pub(crate) struct Failure {
    pub status: StatusCode,
    pub message: String,
    pub source: Source,
}

/// The tokenizer `name` (a model or an adapter of `base`) is tokenized with: the local one of
/// `name`, else of `base`, else the remote one.
pub(crate) fn source_of(s: &AppState, name: &str, base: &str) -> Source {
    if s.local.get(name).or_else(|| s.local.get(base)).is_some() {
        Source::Local
    } else {
        Source::Remote
    }
}

/// Tokenizes with the configured tokenizer, or the model's ready pods in turn; an error is the
/// status and message to answer.
pub(crate) async fn tokenize(
    s: &AppState,
    model: &str,
    text: Text<'_>,
) -> Result<Vec<u32>, (StatusCode, String)> {
    match tokenize_as(s, model, model, text).await {
        Ok(t) if !t.tokens.is_empty() => Ok(t.tokens),
        Ok(_) => Err((
            StatusCode::BAD_REQUEST,
            "the text tokenizes to no token".to_owned(),
        )),
        Err(f) => Err((f.status, f.message)),
    }
}

/// Tokenizes `text` for the requested `name` (whose base model is `base`): in process when
/// either has a local tokenizer (a template error is a 400, naming it), else remotely (the
/// configured endpoint, or the pods of `name`'s model in turn: a failure is a 502). Times it
/// in `kvsync_tokenize_seconds{source}`.
pub(crate) async fn tokenize_as(
    s: &AppState,
    name: &str,
    base: &str,
    text: Text<'_>,
) -> Result<Tokens, Failure> {
    let t0 = Instant::now();
    if let Some(local) = s.local.get(name).or_else(|| s.local.get(base)) {
        let r = s.local.encode(local, text).await;
        s.metrics
            .api
            .tokenize_local
            .observe(t0.elapsed().as_secs_f64());
        return match r {
            Ok(tokens) => Ok(Tokens {
                tokens,
                source: Source::Local,
                max_model_len: None,
            }),
            Err(e) => Err(Failure {
                status: if e.is_bad_request() {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                },
                message: e.to_string(),
                source: Source::Local,
            }),
        };
    }
    let remote = match &s.tokenizer_endpoint {
        Some(endpoint) => s.tokenizer.tokenize(endpoint, name, text).await,
        None => {
            let pods = pod_tokenizers(s, base);
            if pods.is_empty() {
                return Err(Failure {
                    status: StatusCode::NOT_FOUND,
                    message: format!("unknown model {name:?}: no eligible pod serves it"),
                    source: Source::Remote,
                });
            }
            s.tokenizer.tokenize_any(&pods, name, text).await
        }
    };
    s.metrics
        .api
        .tokenize_remote
        .observe(t0.elapsed().as_secs_f64());
    match remote {
        Ok(t) => Ok(Tokens {
            tokens: t.tokens,
            source: Source::Remote,
            max_model_len: t.max_model_len,
        }),
        Err(e) => {
            s.metrics.api.tokenizer_errors.inc();
            if matches!(e, crate::tokenize::TokenizeError::TooLarge { .. }) {
                s.metrics.api.tokenizer_oversized.inc();
            }
            Err(Failure {
                status: StatusCode::BAD_GATEWAY,
                message: format!("tokenizer failed: {e}"),
                source: Source::Remote,
            })
        }
    }
}
