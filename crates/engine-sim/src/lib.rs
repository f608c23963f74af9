//! A vLLM simulator for the demo, tests and benchmarks, and any router's test bed.
//!
//! ```text
//!  driver::EngineHandle (thread, wall clock, --speed) ──► tokens, ZeroMQ KV events
//!        │
//!  requests ──► sched::Scheduler ──step(now)──► tokens, finished, KV events
//!                 │  waiting queue, running set, chunked prefill, preemption
//!                 ├─ pool::BlockPool    vLLM's prefix-caching block pool (hashes: vllm_hash)
//!                 └─ cost::CostModel    how long each step lasts
//! ```
//!
//! - [`vllm_hash`]: vLLM's block hashes, bit for bit (`sha256`, `sha256_cbor`).
//! - [`pool`]: vLLM's block pool with prefix caching; its events are the ground truth a router
//!   is judged by.
//! - [`cost`]: the step-time model and its named, calibrated profiles.
//! - [`sched`]: vLLM v1's scheduler as a pure state machine on a clock.
//! - [`predict`]: a request's time to first token on an engine, from a copy of its scheduler
//!   run forward (the oracle router's reading).
//! - [`driver`]: the wall-clock shell: a thread per engine stepping its scheduler, tokens on
//!   bounded channels, KV events on the sockets; [`EngineHandle`] is what the HTTP layer uses.
//! - [`engine`]: the one-shot engine and its KV event publisher on real ZeroMQ PUB and ROUTER
//!   sockets.
//! - [`tokenizer`]: a deterministic tokenizer behind vLLM's `/tokenize` schema, and the
//!   deterministic "generation".
//! - [`fleet`]: N engines on loopback with their HTTP servers, KV event sockets, pod file,
//!   fault knobs and the oracle router: what `kvsync sim` runs.
//! - [`http`]: vLLM's OpenAI-compatible HTTP API and `/metrics` over a [`http::Backend`]
//!   ([`EngineHandle`] is one).

pub mod cost;
pub mod driver;
pub mod engine;
pub mod fleet;
pub mod http;
pub mod pool;
pub mod predict;
pub mod sched;
pub mod tokenizer;
pub mod vllm_hash;

pub use cost::{CostModel, StepShape, UnknownProfile};
pub use driver::{EngineHandle, GenerateRequest, SimConfig, StartError, SubmitError, TokenEvent};
pub use engine::{Admitted, Engine, EngineConfig, EngineError, EngineStats, KvPublisher, Served};
pub use pool::{BlockPool, EngineHash, HashAlgo, HashForm, Lora, PoolFull, Request};
pub use sched::{
    EngineMetrics, FinishReason, Finished, NewRequest, ReqId, SchedConfig, Scheduler, StepOutcome,
};
pub use tokenizer::{output_tokens, serve_tokenizer, OutputTokens, Tokenizer};
