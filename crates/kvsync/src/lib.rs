//! kvsync: an exact, fleet-wide index of which vLLM pod holds which prefix of tokens in its KV
//! cache, fed by vLLM's KV cache events, answering routing queries.
//!
//! ```text
//!  pods (Kubernetes or a static file) ──▶ manager ──▶ subscribers (kv-events)
//!                                                        │ EventBatch
//!                                                        ▼
//!                          HTTP /v1/route ──▶ prefix-index ◀── apply(worker, event)
//! ```
//!
//! So far: the JSON-lines view of events that `tap` and `capture` print.

pub mod api;
pub mod approx;
pub mod config;
pub mod demo;
pub mod json;
pub mod manager;
pub mod metrics;
pub mod pods;
pub mod request;
pub mod serve;
pub mod source;
pub mod tokenizer;
