//! The sync prefix hash index: which worker (pod, data-parallel rank) holds which prefix of
//! tokens, per (model, LoRA) context and storage tier, exact and inside a memory budget.
//!
//! ```text
//!  apply(worker, source, Event) ──▶ worker's engine-hash map ──resolve parent / removal──┐
//!                                                                                       ▼
//!  lookup(model, lora, tokens) ──router hash chain──▶ context: router hash ──▶ block { holders (worker, tiers) }
//! ```
//!
//! Router hashes are kvsync's own: `h_i = xxh3_64(seed, h_{i-1} ‖ tokens of block i)` from a
//! fixed per-context root, so a query's tokens hash to exactly what the events stored.
//! Engine hashes are kept only to resolve parents and removals. No I/O, no tasks.

mod context;
mod hash;
mod index;
mod table;
mod tier;
mod types;

pub use hash::{context_root, ChainHasher, DEFAULT_SEED};
pub use index::Index;
pub use tier::{Tier, TierMask};
pub use types::{
    Applied, Epoch, IndexConfig, Lookup, Match, Rejection, Source, Stats, WorkerId, MAX_WORKERS,
};
