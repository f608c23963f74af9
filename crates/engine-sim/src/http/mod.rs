//! vLLM's OpenAI-compatible HTTP API over a [`Backend`], as `vllm serve` answers it:
//!
//! ```text
//!   client ──HTTP──▶ router ──parse, tokenize, check model and length──▶ Backend::submit
//!                      │                                                      │
//!                      │◀── JSON, or SSE chunks + usage + [DONE] ◀── TokenEvents (engine t)
//!                      └── /metrics: EngineMetrics snapshot + latency histograms from the t's
//! ```
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or SSE), `GET /v1/models`,
//! `GET /health`, `GET /version`, `POST /tokenize`, `POST /detokenize`,
//! `POST /reset_prefix_cache`, `GET /metrics`. A client that goes away mid-stream drops the
//! stream and with it the event receiver, which aborts the request in the engine. A backend
//! that routes ([`Backend::submit_routed`]) names the pod it chose in [`POD_HEADER`].

mod backend;
mod instant;
mod metrics;
mod openai;
mod protocol;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

pub use backend::{Backend, EngineMetrics, FinishReason, GenerateRequest, SubmitError, TokenEvent};
pub use instant::{InstantBackend, InstantConfig, STEP_SECONDS};
pub use metrics::buckets_1_2_5;
pub use protocol::ApiError;

use crate::pool::Lora;
use crate::tokenizer::{detokenize_json, tokenize_json, Tokenizer, FIRST_WORD_ID};
use protocol::Head;

/// The response header naming the pod a routing backend chose ([`Backend::submit_routed`]), as
/// `kvsync serve` names it.
pub const POD_HEADER: &str = "x-kvsync-pod";

/// What the HTTP layer serves, besides the backend.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// vLLM's `--served-model-name`: the `model` requests must name (or omit).
    pub served_model_name: String,
    /// vLLM's `--model` (the path or hub id): `root` in `/v1/models`.
    pub model_root: String,
    /// LoRA adapters (vLLM's `--lora-modules`): a request naming one runs under it.
    pub loras: Vec<Lora>,
    /// The word tokenizer's vocabulary size (unused with `tokenizer`).
    pub vocab: u32,
    /// The model's own tokenizer (`kvsync sim --tokenizer DIR`); `None`: the word tokenizer.
    pub tokenizer: Option<Arc<hf_tokenize::Tokenizer>>,
    /// What `/version` reports: the vLLM version whose API this imitates.
    pub vllm_version: String,
    /// The `engine` label of the metrics (vLLM's engine index).
    pub engine_label: String,
    /// The KV cache's blocks, for `vllm:cache_config_info` (`None` when unknown).
    pub num_gpu_blocks: Option<usize>,
}

impl HttpConfig {
    /// A model served under its own name, 32k vocabulary, no LoRA.
    pub fn new(model: &str) -> HttpConfig {
        HttpConfig {
            served_model_name: model.to_owned(),
            model_root: model.to_owned(),
            loras: Vec::new(),
            vocab: 32_000,
            tokenizer: None,
            vllm_version: "0.11.0".to_owned(),
            engine_label: "0".to_owned(),
            num_gpu_blocks: None,
        }
    }
}

/// The shared state of the routes.
struct App {
    backend: Arc<dyn Backend>,
    cfg: HttpConfig,
    tok: Tokenizer,
    metrics: metrics::Metrics,
    created: u64,
    next_id: AtomicU64,
}

impl App {
    /// The served name and LoRA of the `model` a request names (absent: the base model).
    fn resolve_model(&self, model: Option<&str>) -> Result<(String, Option<Lora>), ApiError> {
        let base = &self.cfg.served_model_name;
        match model {
            None => Ok((base.clone(), None)),
            Some(m) if m == base => Ok((base.clone(), None)),
            Some(m) => self
                .cfg
                .loras
                .iter()
                .find(|l| l.name == m)
                .map(|l| (m.to_owned(), Some(l.clone())))
                .ok_or_else(|| ApiError::model_not_found(m)),
        }
    }

    /// A fresh response head: `prefix` and 32 hex digits (vLLM's `random_uuid()`), unique in
    /// this process.
    fn head(&self, prefix: &str, model: String) -> Head {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mix = xxhash_rust::xxh3::xxh3_128_with_seed(&n.to_le_bytes(), self.created);
        Head {
            id: format!("{prefix}{mix:032x}"),
            created: unix_now(),
            model,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A configuration the HTTP layer cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the vocabulary ({0} ids) must be larger than the first word id {FIRST_WORD_ID}")]
    Vocab(u32),
    #[error("the served model name is empty")]
    NoModelName,
}

/// The router of every route over `backend`.
pub fn router(backend: Arc<dyn Backend>, cfg: HttpConfig) -> Result<Router, ConfigError> {
    if cfg.vocab <= FIRST_WORD_ID {
        return Err(ConfigError::Vocab(cfg.vocab));
    }
    if cfg.served_model_name.is_empty() {
        return Err(ConfigError::NoModelName);
    }
    let tok = match &cfg.tokenizer {
        Some(files) => Tokenizer::with_files(files.clone(), backend.max_model_len()),
        None => Tokenizer::words(cfg.vocab, backend.max_model_len()),
    };
    tok.prepare_vocabulary();
    let cache = metrics::CacheConfigInfo {
        block_size: backend.block_size(),
        num_gpu_blocks: cfg.num_gpu_blocks,
    };
    let metrics = metrics::Metrics::new(
        &cfg.served_model_name,
        &cfg.engine_label,
        backend.max_model_len(),
        cache,
    );
    let app = Arc::new(App {
        backend,
        cfg,
        tok,
        metrics,
        created: unix_now(),
        next_id: AtomicU64::new(0),
    });
    Ok(Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/version", get(version))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/metrics", get(prometheus))
        .with_state(app))
}

/// Serves the API on `listener` until `shutdown` resolves (then waits for open requests). A
/// bad `cfg` is an `InvalidInput` error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    cfg: HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(backend, cfg)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

type AppState = State<Arc<App>>;

/// vLLM's `ModelCard`s: the base model, then one per LoRA adapter (`parent` the base).
async fn models(State(app): AppState) -> Json<Value> {
    let permission = || {
        json!([{
            "id": format!("modelperm-{:032x}", xxhash_rust::xxh3::xxh3_128(app.cfg.served_model_name.as_bytes())),
            "object": "model_permission", "created": app.created,
            "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
            "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
            "organization": "*", "group": null, "is_blocking": false,
        }])
    };
    let base = &app.cfg.served_model_name;
    let mut data = vec![json!({
        "id": base, "object": "model", "created": app.created, "owned_by": "vllm",
        "root": app.cfg.model_root, "parent": null,
        "max_model_len": app.backend.max_model_len(), "permission": permission(),
    })];
    data.extend(app.cfg.loras.iter().map(|l| {
        json!({
            "id": l.name, "object": "model", "created": app.created, "owned_by": "vllm",
            "root": l.path, "parent": base, "max_model_len": null, "permission": permission(),
        })
    }));
    Json(json!({"object": "list", "data": data}))
}

async fn version(State(app): AppState) -> Json<Value> {
    Json(json!({"version": app.cfg.vllm_version}))
}

fn json_body(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::field("", format!("JSON decode error: {e}")))
}

async fn tokenize(State(app): AppState, body: axum::body::Bytes) -> Result<Json<Value>, ApiError> {
    tokenize_json(&app.tok, &json_body(&body)?)
        .map(Json)
        .map_err(|e| ApiError::bad_request(e, None))
}

async fn detokenize(
    State(app): AppState,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    detokenize_json(&app.tok, &json_body(&body)?)
        .map(Json)
        .map_err(|e| ApiError::bad_request(e, Some("tokens")))
}

/// 200 whatever the engine did, as vLLM ("we currently do not check if the prefix cache is
/// successfully reset in the API server"); a refusal is logged.
async fn reset_prefix_cache(State(app): AppState) -> StatusCode {
    if !app.backend.reset_prefix_cache() {
        tracing::warn!("reset_prefix_cache refused: requests hold blocks");
    }
    StatusCode::OK
}

async fn prometheus(State(app): AppState) -> Response {
    let text = app.metrics.render(&app.backend.stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
