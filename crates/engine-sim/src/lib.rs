//! A vLLM-like engine for the demo, tests and benchmarks: vLLM's prefix-caching block pool
//! ([`pool`]), its KV event publisher on real ZeroMQ PUB and ROUTER sockets ([`engine`]), and a
//! deterministic tokenizer behind vLLM's `/tokenize` schema ([`tokenizer`]).
//!
//! Every request served reports its real prefix-cache hit: the ground truth a router is judged
//! by.

pub mod cost;
pub mod engine;
pub mod pool;
pub mod tokenizer;
pub mod vllm_hash;

pub use cost::{CostModel, StepShape, UnknownProfile};
pub use engine::{Admitted, Engine, EngineConfig, EngineError, EngineStats, Served};
pub use pool::{BlockPool, EngineHash, HashAlgo, HashForm, Lora, PoolFull, Request};
pub use tokenizer::{output_tokens, serve_tokenizer, Tokenizer};
