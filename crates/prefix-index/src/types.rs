//! The index's public types: configuration, worker identity, outcomes, statistics, answers.

use crate::hash::DEFAULT_SEED;
use crate::tier::Tier;

/// Limits; every internal map is bounded by them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexConfig {
    /// Seed of the router hash chain: replicas must use the same.
    pub seed: u64,
    /// Hard budget for the index's own accounting of its memory, in bytes.
    pub max_bytes: usize,
    /// `AIBRIX_SYNC_MAX_CONTEXTS`.
    pub max_contexts: usize,
    /// `AIBRIX_SYNC_MAX_PREFIXES_PER_CONTEXT`: blocks per context.
    pub max_blocks_per_context: usize,
    /// Workers (pod, rank) tracked at once (at most [`MAX_WORKERS`]).
    pub max_workers: usize,
    /// (worker, block) entries a worker's clear or removal releases per hold of the write
    /// lock: the longest that ingestion and lookups wait behind one (a chunk of 1024 takes
    /// 0.1–0.5 ms). A clear of more is done by retiring the worker's entries
    /// (lookups skip them at once) and releasing them a chunk at a time.
    pub reclaim_chunk: usize,
}

/// The most workers one index tracks (a block names its worker in 16 bits, two values of
/// which mark free slots and tombstones).
pub const MAX_WORKERS: usize = 65_534;

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            seed: DEFAULT_SEED,
            max_bytes: 1 << 30,
            max_contexts: 1000,
            max_blocks_per_context: 10_000,
            max_workers: 4096,
            reclaim_chunk: 1024,
        }
    }
}

impl IndexConfig {
    #[must_use]
    pub fn max_bytes(mut self, v: usize) -> Self {
        self.max_bytes = v;
        self
    }
    #[must_use]
    pub fn max_contexts(mut self, v: usize) -> Self {
        self.max_contexts = v;
        self
    }
    #[must_use]
    pub fn max_blocks_per_context(mut self, v: usize) -> Self {
        self.max_blocks_per_context = v;
        self
    }
    /// See [`IndexConfig::reclaim_chunk`] (at least 1).
    #[must_use]
    pub fn reclaim_chunk(mut self, v: usize) -> Self {
        self.reclaim_chunk = v.max(1);
        self
    }
}

/// A worker: one data-parallel rank of one pod.
/// Cheap to clone (the name is shared): a lookup hands one out per matching worker.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    /// `namespace/name` (or any stable name).
    pub pod: std::sync::Arc<str>,
    pub dp_rank: u32,
}

impl WorkerId {
    pub fn new(pod: impl Into<std::sync::Arc<str>>, dp_rank: u32) -> Self {
        WorkerId {
            pod: pod.into(),
            dp_rank,
        }
    }
}

/// Where a worker's events go: its model and the LoRA adapter from its pod label, used when
/// an event names none.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub model: &'a str,
    pub default_lora: Option<&'a str>,
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// Blocks newly held by the worker (on some tier).
    pub stored: u32,
    /// Blocks the worker already held, re-announced or copied to another tier.
    pub refreshed: u32,
    pub removed: u32,
    pub rejected: Option<Rejection>,
}

/// Why an event (or part of it) was not applied. Each is counted in [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The parent engine hash is unknown for this worker: events were missed.
    Orphan,
    /// `block_size` differs from the context's.
    BlockSizeMismatch { context: u32, event: u32 },
    /// `token_ids.len() != block_hashes.len() * block_size`.
    TokenCount,
    /// A token-less (tier) store of a block the worker is not known to hold.
    UnknownBlock,
    /// A removal of a block the worker is not known to hold.
    UnknownRemoval,
    /// A store for a KV cache group that is not the full-attention group.
    OtherGroup,
    /// The context table is full of contexts more recently used.
    ContextLimit,
    /// The worker table is full.
    WorkerLimit,
    /// A write of an incarnation of the worker that a newer one has superseded
    /// ([`crate::Index::claim`]).
    Stale,
}

/// One incarnation of a worker, from [`crate::Index::claim`]: writes that carry it are refused
/// once a newer incarnation has claimed the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(pub(crate) u64);

/// Counters and sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub contexts: usize,
    pub workers: usize,
    /// Distinct blocks (router hashes) held by some worker.
    pub blocks: usize,
    /// (worker, block) pairs: the engine-hash map entries.
    pub worker_blocks: usize,
    /// The index's accounting of its memory.
    pub bytes: usize,
    pub orphans: u64,
    pub evictions: u64,
    pub block_size_mismatches: u64,
    pub malformed: u64,
    pub unknown_blocks: u64,
    pub other_groups: u64,
    pub partial_blocks: u64,
    pub context_evictions: u64,
    pub rejected_limits: u64,
    /// Writes refused because a newer incarnation of their worker had claimed it.
    pub stale: u64,
    /// Panics inside an apply (or a worker's removal) after which the worker's holdings were
    /// dropped to leave the index consistent.
    pub panics_repaired: u64,
    /// Panics after which dropping the worker did not restore every invariant: the whole
    /// index was emptied.
    pub panic_resets: u64,
    /// The most (worker, block) entries released under one hold of the write lock (by a
    /// worker's clear or removal): how long ingestion can stall behind one such operation.
    pub longest_hold: u64,
    /// Workers retired (cleared or removed) whose entries are still being released.
    pub retiring: usize,
}

/// Per worker, the consecutive leading blocks of a query it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub worker: WorkerId,
    /// Held on any tier.
    pub blocks: u32,
    /// Held on each tier ([`Tier::ALL`] order).
    pub per_tier: [u32; Tier::COUNT],
}

/// The answer to a lookup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lookup {
    /// The context's block size; `None` when the context is unknown (no match possible).
    pub block_size: Option<u32>,
    /// Full blocks in the query.
    pub num_blocks: u32,
    /// Workers with at least one leading block, most blocks first (equal counts in no
    /// particular order).
    pub matches: Vec<Match>,
}
