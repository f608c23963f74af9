//! The seam between the HTTP shell and an engine: the request the HTTP layer submits, the
//! events it gets back, the metrics snapshot it exports, and the [`Backend`] trait over them.
//!
//! These types mirror the core's `EngineHandle` (see `/work/sim-interface.md`): the names and
//! fields are the seam's, so the core's types replace these one for one.

use tokio::sync::mpsc::Receiver;

use crate::pool::Lora;

/// One generation request, already tokenized and with `max_tokens` resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateRequest {
    pub request_id: String,
    /// Token ids, tokenized by the HTTP layer.
    pub prompt: Vec<u32>,
    /// Resolved by the HTTP layer (vLLM's default when absent).
    pub max_tokens: usize,
    pub lora: Option<Lora>,
}

/// Why a request ended (vLLM's `FinishReason` strings: `length`, `stop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// What an engine reports about one request, in order: `Scheduled`, then `Token`s, then
/// `Finished`. `t` is engine time in seconds.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// The request left the waiting queue: its prefix-cache hit is known.
    Scheduled { t: f64, cached_tokens: usize },
    /// One generated token (the first one ends prefill).
    Token { t: f64, id: u32 },
    /// The request ended.
    Finished {
        t: f64,
        reason: FinishReason,
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
    },
}

/// The engine refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The engine has stopped.
    #[error("the engine is not running")]
    Stopped,
    /// The engine's queue is full.
    #[error("the engine's queue is full")]
    Overloaded,
}

/// A snapshot of what vLLM's `/metrics` needs: running values and counters since start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineMetrics {
    pub num_requests_running: usize,
    pub num_requests_waiting: usize,
    /// 0..1: used blocks / usable blocks.
    pub kv_cache_usage: f64,
    /// Tokens queried (vLLM counts tokens).
    pub prefix_cache_queries: u64,
    /// Tokens hit.
    pub prefix_cache_hits: u64,
    pub num_preemptions: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub requests_finished: u64,
}

/// An engine the HTTP layer serves. `EngineHandle` implements it; so does the test backend
/// [`crate::http::InstantBackend`].
pub trait Backend: Send + Sync + 'static {
    /// Queues the request; its events arrive on the returned bounded receiver. Dropping the
    /// receiver aborts the request.
    fn submit(&self, req: GenerateRequest) -> Result<Receiver<TokenEvent>, SubmitError>;
    fn stats(&self) -> EngineMetrics;
    /// vLLM refuses (false) while requests hold blocks.
    fn reset_prefix_cache(&self) -> bool;
    fn max_model_len(&self) -> usize;
    fn block_size(&self) -> usize;
    /// Engine time in seconds: a request's arrival, from which TTFT and end-to-end latency are
    /// measured in the same clock as the events' `t`.
    fn now(&self) -> f64;
}
