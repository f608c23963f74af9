//! A vLLM-like engine for the demo, tests and benchmarks: vLLM's prefix-caching block pool
//! ([`pool`]), its KV event publisher on real ZeroMQ PUB and ROUTER sockets ([`engine`]), and a
//! deterministic tokenizer behind vLLM's `/tokenize` schema ([`tokenizer`]), and vLLM's
//! OpenAI-compatible HTTP API and `/metrics` over any engine behind a trait ([`http`]).
//!
//! Every request served reports its real prefix-cache hit: the ground truth a router is judged
//! by.

pub mod engine;
pub mod http;
pub mod pool;
pub mod tokenizer;

pub use engine::{Admitted, Engine, EngineConfig, EngineError, EngineStats, Served};
pub use pool::{BlockPool, EngineHash, HashForm, Lora, PoolFull, Request};
pub use tokenizer::{output_tokens, serve_tokenizer, Tokenizer};
