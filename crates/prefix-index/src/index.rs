//! The index state: contexts of blocks keyed by router hash, and per worker the map from
//! engine hash to router hash. One `RwLock` guards it: an apply holds the write lock for one
//! event (at most a few hundred blocks, microseconds), a lookup holds the read lock and
//! refreshes recency through atomics, so readers never wait behind more than one event.

use crate::hash::{context_root, ChainHasher, Mix, DEFAULT_SEED};
use crate::tier::{Tier, TierMask};
use hashbrown::HashMap;
use kv_events::{BlockRemoved, BlockStored, Event, Medium};
use parking_lot::RwLock;
use std::collections::BTreeSet;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
    /// Workers (pod, rank) tracked at once.
    pub max_workers: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            seed: DEFAULT_SEED,
            max_bytes: 1 << 30,
            max_contexts: 1000,
            max_blocks_per_context: 10_000,
            max_workers: 4096,
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
}

/// A worker: one data-parallel rank of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    /// `namespace/name` (or any stable name).
    pub pod: String,
    pub dp_rank: u32,
}

impl WorkerId {
    pub fn new(pod: impl Into<String>, dp_rank: u32) -> Self {
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
}

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
}

/// One worker holding one block.
#[derive(Debug, Clone, Copy)]
struct Holder {
    worker: u32,
    tiers: TierMask,
    /// The worker's engine hash of the block (its key in the worker's map).
    engine: u64,
}

#[derive(Debug)]
struct Block {
    parent: Option<u64>,
    /// Children present in the index (a leaf has none).
    children: u32,
    /// Tick of the last store or lookup that touched it.
    last_used: AtomicU64,
    /// The tick it is filed under in `leaves` (when a leaf).
    filed: u64,
    holders: Vec<Holder>,
}

#[derive(Debug)]
struct Context {
    model: String,
    lora: Option<String>,
    root: u64,
    block_size: Option<u32>,
    blocks: HashMap<u64, Block, Mix>,
    /// Leaves ordered by the tick they were filed under (refreshed lazily on eviction).
    leaves: BTreeSet<(u64, u64)>,
    last_used: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct EngineEntry {
    context: u32,
    router: u64,
}

#[derive(Debug)]
struct Worker {
    id: WorkerId,
    engine: HashMap<u64, EngineEntry, Mix>,
}

/// Accounting costs per entry (hash map slot with its control byte and spare capacity).
const BLOCK_COST: usize = (size_of::<(u64, Block)>() + 1) * 8 / 7;
const HOLDER_COST: usize = size_of::<Holder>();
const LEAF_COST: usize = 2 * size_of::<(u64, u64)>();
const ENGINE_COST: usize = (size_of::<(u64, EngineEntry)>() + 1) * 8 / 7;
const CONTEXT_COST: usize = 512;
const WORKER_COST: usize = 256;

#[derive(Debug, Default)]
struct State {
    contexts: Vec<Option<Context>>,
    context_ids: HashMap<(String, Option<String>), u32>,
    workers: Vec<Option<Worker>>,
    worker_ids: HashMap<WorkerId, u32>,
    blocks: usize,
    worker_blocks: usize,
    bytes: usize,
    stats: Stats,
    hasher: ChainHasher,
}

/// The sync prefix hash index. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Index {
    cfg: IndexConfig,
    state: RwLock<State>,
    tick: AtomicU64,
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
    /// Workers with at least one leading block, most blocks first.
    pub matches: Vec<Match>,
}

impl Index {
    pub fn new(cfg: IndexConfig) -> Self {
        Index {
            cfg,
            state: RwLock::new(State::default()),
            tick: AtomicU64::new(1),
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Relaxed)
    }

    /// Applies one event of `worker`. A worker's events must be applied in order.
    pub fn apply(&self, worker: &WorkerId, source: Source<'_>, event: &Event) -> Applied {
        let tick = self.next_tick();
        let mut st = self.state.write();
        let Some(w) = st.worker(worker, &self.cfg) else {
            st.stats.rejected_limits += 1;
            return rejected(Rejection::WorkerLimit);
        };
        let out = match event {
            Event::BlockStored(s) => st.store(&self.cfg, w, source, s, tick),
            Event::BlockRemoved(r) => st.remove(w, r),
            Event::AllBlocksCleared => Applied {
                removed: st.clear_worker(w),
                ..Applied::default()
            },
        };
        st.enforce_budget(&self.cfg);
        out
    }

    /// Drops everything `worker` holds and forgets it.
    pub fn remove_worker(&self, worker: &WorkerId) -> u32 {
        let mut st = self.state.write();
        let Some(&w) = st.worker_ids.get(worker) else {
            return 0;
        };
        let n = st.clear_worker(w);
        st.worker_ids.remove(worker);
        st.workers[w as usize] = None;
        st.bytes -= WORKER_COST;
        n
    }

    /// Drops everything `worker` holds but keeps it known (a reset after a gap or restart).
    pub fn clear_worker(&self, worker: &WorkerId) -> u32 {
        let mut st = self.state.write();
        match st.worker_ids.get(worker) {
            Some(&w) => st.clear_worker(w),
            None => 0,
        }
    }

    /// Which workers hold the longest prefix of `tokens` in context (`model`, `lora`).
    pub fn lookup(&self, model: &str, lora: Option<&str>, tokens: &[u32]) -> Lookup {
        let tick = self.next_tick();
        let st = self.state.read();
        let key = (model.to_owned(), lora.map(str::to_owned));
        let Some(ctx) = st
            .context_ids
            .get(&key)
            .and_then(|&c| st.contexts[c as usize].as_ref())
        else {
            return Lookup::default();
        };
        let Some(bs) = ctx.block_size else {
            return Lookup::default();
        };
        ctx.last_used.store(tick, Relaxed);
        let num_blocks = (tokens.len() / bs as usize) as u32;
        let mut hasher = ChainHasher::default();
        // Candidates: (worker, tiers still consecutive, blocks, per-tier counts).
        let mut cands: Vec<(u32, TierMask, u32, [u32; Tier::COUNT])> = Vec::new();
        let mut done = Vec::new();
        let mut prev = ctx.root;
        for (i, chunk) in tokens.chunks_exact(bs as usize).enumerate() {
            prev = hasher.next(self.cfg.seed, prev, chunk);
            let Some(b) = ctx.blocks.get(&prev) else {
                break;
            };
            b.last_used.store(tick, Relaxed);
            if i == 0 {
                cands = b
                    .holders
                    .iter()
                    .map(|h| (h.worker, h.tiers, 0, [0; Tier::COUNT]))
                    .collect();
            } else {
                // Workers that do not hold this block keep the count they reached.
                let mut i = 0;
                while i < cands.len() {
                    match b.holders.iter().find(|h| h.worker == cands[i].0) {
                        Some(h) => {
                            cands[i].1 = cands[i].1.intersect(h.tiers);
                            i += 1;
                        }
                        None => done.push(cands.swap_remove(i)),
                    }
                }
            }
            if cands.is_empty() {
                break;
            }
            for c in &mut cands {
                c.2 += 1;
                for t in c.1.iter() {
                    c.3[t as usize] += 1;
                }
            }
        }
        done.append(&mut cands);
        let mut matches: Vec<Match> = done
            .into_iter()
            .filter_map(|(w, _, blocks, per_tier)| {
                st.workers[w as usize].as_ref().map(|wk| Match {
                    worker: wk.id.clone(),
                    blocks,
                    per_tier,
                })
            })
            .collect();
        matches.sort_by(|a, b| {
            b.blocks
                .cmp(&a.blocks)
                .then_with(|| a.worker.cmp(&b.worker))
        });
        Lookup {
            block_size: Some(bs),
            num_blocks,
            matches,
        }
    }

    /// The block size learned for a context, if any.
    pub fn block_size(&self, model: &str, lora: Option<&str>) -> Option<u32> {
        let st = self.state.read();
        let key = (model.to_owned(), lora.map(str::to_owned));
        st.context_ids
            .get(&key)
            .and_then(|&c| st.contexts[c as usize].as_ref())
            .and_then(|c| c.block_size)
    }

    pub fn stats(&self) -> Stats {
        let st = self.state.read();
        Stats {
            contexts: st.context_ids.len(),
            workers: st.worker_ids.len(),
            blocks: st.blocks,
            worker_blocks: st.worker_blocks,
            bytes: st.bytes,
            ..st.stats
        }
    }

    /// Checks every internal invariant; panics with a description when one is broken.
    /// For tests: it walks the whole index.
    pub fn check_invariants(&self) {
        self.state.read().check();
    }
}

fn rejected(r: Rejection) -> Applied {
    Applied {
        rejected: Some(r),
        ..Applied::default()
    }
}

fn tier_of(m: Option<&Medium>) -> Tier {
    m.map_or(Tier::Gpu, Tier::of)
}

impl State {
    fn worker(&mut self, id: &WorkerId, cfg: &IndexConfig) -> Option<u32> {
        if let Some(&w) = self.worker_ids.get(id) {
            return Some(w);
        }
        if self.worker_ids.len() >= cfg.max_workers {
            return None;
        }
        let w = Worker {
            id: id.clone(),
            engine: HashMap::with_hasher(Mix),
        };
        let idx = match self.workers.iter().position(Option::is_none) {
            Some(i) => {
                self.workers[i] = Some(w);
                i
            }
            None => {
                self.workers.push(Some(w));
                self.workers.len() - 1
            }
        } as u32;
        self.worker_ids.insert(id.clone(), idx);
        self.bytes += WORKER_COST;
        Some(idx)
    }

    fn context(
        &mut self,
        cfg: &IndexConfig,
        model: &str,
        lora: Option<&str>,
        tick: u64,
    ) -> Option<u32> {
        let key = (model.to_owned(), lora.map(str::to_owned));
        if let Some(&c) = self.context_ids.get(&key) {
            return Some(c);
        }
        if self.context_ids.len() >= cfg.max_contexts {
            // Make room by dropping the least recently used context.
            let victim = self
                .contexts
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (c.last_used.load(Relaxed), i)))
                .min()?;
            if victim.0 >= tick {
                return None;
            }
            self.drop_context(victim.1 as u32);
            self.stats.context_evictions += 1;
        }
        let ctx = Context {
            root: context_root(cfg.seed, model, lora),
            model: key.0.clone(),
            lora: key.1.clone(),
            block_size: None,
            blocks: HashMap::with_hasher(Mix),
            leaves: BTreeSet::new(),
            last_used: AtomicU64::new(tick),
        };
        let idx = match self.contexts.iter().position(Option::is_none) {
            Some(i) => {
                self.contexts[i] = Some(ctx);
                i
            }
            None => {
                self.contexts.push(Some(ctx));
                self.contexts.len() - 1
            }
        } as u32;
        self.context_ids.insert(key, idx);
        self.bytes += CONTEXT_COST;
        Some(idx)
    }

    fn store(
        &mut self,
        cfg: &IndexConfig,
        w: u32,
        src: Source<'_>,
        s: &BlockStored,
        tick: u64,
    ) -> Applied {
        if s.group_idx.unwrap_or(0) != 0
            && s.kv_cache_spec_kind
                .as_deref()
                .is_some_and(|k| k != "full_attention")
        {
            self.stats.other_groups += 1;
            return rejected(Rejection::OtherGroup);
        }
        let tier = tier_of(s.medium.as_ref());
        if s.token_ids.is_empty() {
            return self.store_tokenless(w, s, tier, tick);
        }
        // The adapter: its name on the event, else its id (vLLM < 0.14 sends only the id),
        // else the pod's label.
        let lora_id;
        let lora = match (&s.lora_name, s.lora_id) {
            (Some(name), _) => Some(name.as_str()),
            (None, Some(id)) => {
                lora_id = id.to_string();
                Some(lora_id.as_str())
            }
            (None, None) => src.default_lora,
        };
        let Some(c) = self.context(cfg, src.model, lora, tick) else {
            self.stats.rejected_limits += 1;
            return rejected(Rejection::ContextLimit);
        };
        let bs = s.block_size;
        if bs == 0 || s.token_ids.len() != s.block_hashes.len() * bs as usize {
            self.stats.malformed += 1;
            return rejected(Rejection::TokenCount);
        }
        self.release_foreign(w, c, s);
        let ctx = self.contexts[c as usize]
            .as_mut()
            .expect("context id is live");
        match ctx.block_size {
            None => ctx.block_size = Some(bs),
            Some(cbs) if cbs == bs => {}
            Some(cbs) if bs < cbs => {
                // A partial block (smaller than the context's): not a full block, not hashed.
                self.stats.partial_blocks += 1;
                return Applied::default();
            }
            Some(cbs) => {
                self.stats.block_size_mismatches += 1;
                return rejected(Rejection::BlockSizeMismatch {
                    context: cbs,
                    event: bs,
                });
            }
        }
        ctx.last_used.store(tick, Relaxed);
        let worker = self.workers[w as usize]
            .as_mut()
            .expect("worker id is live");
        let mut prev = match &s.parent_block_hash {
            None => None,
            Some(p) => match worker.engine.get(&p.key64()) {
                Some(e) if e.context == c => Some(e.router),
                _ => {
                    self.stats.orphans += 1;
                    return rejected(Rejection::Orphan);
                }
            },
        };
        let mut out = Applied::default();
        for (h, tokens) in s
            .block_hashes
            .iter()
            .zip(s.token_ids.chunks_exact(bs as usize))
        {
            let ekey = h.key64();
            if let Some(e) = worker.engine.get(&ekey).copied() {
                if e.context == c {
                    // Already held: keep its router hash whatever parent the event claims.
                    if let Some(b) = ctx.blocks.get_mut(&e.router) {
                        b.last_used.store(tick, Relaxed);
                        if let Some(hd) = b.holders.iter_mut().find(|x| x.worker == w) {
                            hd.tiers = hd.tiers.with(tier);
                        }
                    }
                    out.refreshed += 1;
                    prev = Some(e.router);
                    continue;
                }
            }
            let router = self.hasher.next(cfg.seed, prev.unwrap_or(ctx.root), tokens);
            let holder = Holder {
                worker: w,
                tiers: TierMask::only(tier),
                engine: ekey,
            };
            match ctx.blocks.get_mut(&router) {
                Some(b) => {
                    b.last_used.store(tick, Relaxed);
                    match b.holders.iter_mut().find(|x| x.worker == w) {
                        // The same tokens under another engine hash (a re-hash after an
                        // engine-side reset we did not see): keep one holder entry.
                        Some(hd) => {
                            worker.engine.remove(&hd.engine);
                            self.worker_blocks -= 1;
                            self.bytes -= ENGINE_COST;
                            hd.tiers = hd.tiers.with(tier);
                            hd.engine = ekey;
                        }
                        None => {
                            b.holders.push(holder);
                            self.bytes += HOLDER_COST;
                        }
                    }
                }
                None => {
                    if let Some(p) = prev.and_then(|p| ctx.blocks.get_mut(&p)) {
                        if p.children == 0 {
                            ctx.leaves.remove(&(p.filed, prev.unwrap_or(0)));
                        }
                        p.children += 1;
                    }
                    ctx.blocks.insert(
                        router,
                        Block {
                            parent: prev,
                            children: 0,
                            last_used: AtomicU64::new(tick),
                            filed: tick,
                            holders: vec![holder],
                        },
                    );
                    ctx.leaves.insert((tick, router));
                    self.blocks += 1;
                    self.bytes += BLOCK_COST + HOLDER_COST + LEAF_COST;
                }
            }
            worker
                .engine
                .insert(ekey, EngineEntry { context: c, router });
            self.worker_blocks += 1;
            self.bytes += ENGINE_COST;
            out.stored += 1;
            prev = Some(router);
        }
        // Per-context block limit.
        while ctx.blocks.len() > cfg.max_blocks_per_context {
            if !evict_one(
                ctx,
                &mut self.workers,
                &mut self.bytes,
                &mut self.blocks,
                &mut self.worker_blocks,
            ) {
                break;
            }
            self.stats.evictions += 1;
        }
        out
    }

    /// Engine hashes of `s` that the worker maps into another context (a hash collision or
    /// a reused hash space) are released there first, so each engine hash maps once.
    fn release_foreign(&mut self, w: u32, c: u32, s: &BlockStored) {
        for h in &s.block_hashes {
            let ekey = h.key64();
            let worker = self.workers[w as usize]
                .as_mut()
                .expect("worker id is live");
            let Some(e) = worker.engine.get(&ekey).copied() else {
                continue;
            };
            if e.context == c {
                continue;
            }
            worker.engine.remove(&ekey);
            self.worker_blocks -= 1;
            self.bytes -= ENGINE_COST;
            if let Some(ctx) = self.contexts[e.context as usize].as_mut() {
                drop_holder(ctx, e.router, w, &mut self.bytes, &mut self.blocks);
            }
        }
    }

    /// A token-less store (CPU/disk offload) of blocks known by engine hash.
    fn store_tokenless(&mut self, w: u32, s: &BlockStored, tier: Tier, tick: u64) -> Applied {
        let worker = self.workers[w as usize]
            .as_ref()
            .expect("worker id is live");
        let mut out = Applied::default();
        for h in &s.block_hashes {
            let Some(e) = worker.engine.get(&h.key64()) else {
                self.stats.unknown_blocks += 1;
                out.rejected = Some(Rejection::UnknownBlock);
                continue;
            };
            let ctx = self.contexts[e.context as usize]
                .as_mut()
                .expect("context id is live");
            if let Some(b) = ctx.blocks.get_mut(&e.router) {
                b.last_used.store(tick, Relaxed);
                if let Some(hd) = b.holders.iter_mut().find(|x| x.worker == w) {
                    hd.tiers = hd.tiers.with(tier);
                    out.refreshed += 1;
                }
            }
        }
        out
    }

    fn remove(&mut self, w: u32, r: &BlockRemoved) -> Applied {
        let tier = tier_of(r.medium.as_ref());
        let mut out = Applied::default();
        for h in &r.block_hashes {
            let ekey = h.key64();
            let worker = self.workers[w as usize]
                .as_mut()
                .expect("worker id is live");
            let Some(e) = worker.engine.get(&ekey).copied() else {
                self.stats.unknown_blocks += 1;
                out.rejected = Some(Rejection::UnknownRemoval);
                continue;
            };
            let ctx = self.contexts[e.context as usize]
                .as_mut()
                .expect("context id is live");
            let gone = match ctx.blocks.get_mut(&e.router) {
                Some(b) => match b.holders.iter_mut().find(|x| x.worker == w) {
                    Some(hd) => {
                        hd.tiers = hd.tiers.without(tier);
                        hd.tiers.is_empty()
                    }
                    None => true,
                },
                None => true,
            };
            if gone {
                worker.engine.remove(&ekey);
                self.worker_blocks -= 1;
                self.bytes -= ENGINE_COST;
                drop_holder(ctx, e.router, w, &mut self.bytes, &mut self.blocks);
                out.removed += 1;
            }
        }
        out
    }

    fn clear_worker(&mut self, w: u32) -> u32 {
        let Some(worker) = self.workers[w as usize].as_mut() else {
            return 0;
        };
        let entries: Vec<EngineEntry> = worker.engine.drain().map(|(_, e)| e).collect();
        worker.engine.shrink_to_fit();
        let n = entries.len() as u32;
        self.worker_blocks -= entries.len();
        self.bytes -= entries.len() * ENGINE_COST;
        for e in entries {
            if let Some(ctx) = self.contexts[e.context as usize].as_mut() {
                drop_holder(ctx, e.router, w, &mut self.bytes, &mut self.blocks);
            }
        }
        n
    }

    fn drop_context(&mut self, c: u32) {
        let Some(ctx) = self.contexts[c as usize].take() else {
            return;
        };
        for b in ctx.blocks.values() {
            for h in &b.holders {
                if let Some(wk) = self.workers[h.worker as usize].as_mut() {
                    if wk.engine.remove(&h.engine).is_some() {
                        self.worker_blocks -= 1;
                        self.bytes -= ENGINE_COST;
                    }
                }
                self.bytes -= HOLDER_COST;
            }
            self.bytes -= BLOCK_COST + LEAF_COST;
        }
        self.blocks -= ctx.blocks.len();
        self.context_ids.remove(&(ctx.model, ctx.lora));
        self.bytes -= CONTEXT_COST;
    }

    /// Evicts least-recently-used leaves until the byte budget holds.
    fn enforce_budget(&mut self, cfg: &IndexConfig) {
        while self.bytes > cfg.max_bytes {
            // The context whose oldest leaf is oldest.
            let victim = self
                .contexts
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().and_then(|c| c.leaves.first().map(|l| (l.0, i))))
                .min();
            let Some((_, c)) = victim else { return };
            let ctx = self.contexts[c].as_mut().expect("victim is live");
            if !evict_one(
                ctx,
                &mut self.workers,
                &mut self.bytes,
                &mut self.blocks,
                &mut self.worker_blocks,
            ) {
                return;
            }
            self.stats.evictions += 1;
        }
    }

    fn check(&self) {
        let mut blocks = 0;
        let mut worker_blocks = 0;
        for (ci, ctx) in self.contexts.iter().enumerate() {
            let Some(ctx) = ctx else { continue };
            blocks += ctx.blocks.len();
            for (r, b) in &ctx.blocks {
                assert!(!b.holders.is_empty(), "block {r:x} has no holder");
                let kids = ctx.blocks.values().filter(|x| x.parent == Some(*r)).count() as u32;
                assert!(
                    b.children <= kids,
                    "block {r:x} counts {} children, has {kids}",
                    b.children
                );
                if b.children == 0 {
                    assert!(ctx.leaves.contains(&(b.filed, *r)), "leaf {r:x} not filed");
                }
                for h in &b.holders {
                    assert!(!h.tiers.is_empty(), "holder without tier");
                    let wk = self.workers[h.worker as usize]
                        .as_ref()
                        .expect("holder's worker is live");
                    let e = wk.engine.get(&h.engine).expect("holder's engine entry");
                    assert_eq!(
                        (e.context, e.router),
                        (ci as u32, *r),
                        "engine entry points elsewhere"
                    );
                }
            }
            for l in &ctx.leaves {
                let b = ctx.blocks.get(&l.1).expect("filed leaf exists");
                assert_eq!(b.children, 0, "filed leaf has children");
            }
            assert_eq!(
                ctx.leaves.len(),
                ctx.blocks.values().filter(|b| b.children == 0).count()
            );
        }
        for (wi, wk) in self.workers.iter().enumerate() {
            let Some(wk) = wk else { continue };
            worker_blocks += wk.engine.len();
            for (ek, e) in &wk.engine {
                let ctx = self.contexts[e.context as usize]
                    .as_ref()
                    .expect("entry's context is live");
                let b = ctx.blocks.get(&e.router).expect("entry's block exists");
                assert!(
                    b.holders
                        .iter()
                        .any(|h| h.worker == wi as u32 && h.engine == *ek),
                    "engine entry without holder"
                );
            }
        }
        assert_eq!(blocks, self.blocks, "block count");
        assert_eq!(worker_blocks, self.worker_blocks, "worker block count");
    }
}

/// Removes worker `w` from block `router`; the block leaves when no holder is left.
fn drop_holder(ctx: &mut Context, router: u64, w: u32, bytes: &mut usize, blocks: &mut usize) {
    let Some(b) = ctx.blocks.get_mut(&router) else {
        return;
    };
    let before = b.holders.len();
    b.holders.retain(|h| h.worker != w);
    *bytes -= (before - b.holders.len()) * HOLDER_COST;
    if b.holders.is_empty() {
        remove_block(ctx, router, bytes, blocks);
    }
}

fn remove_block(ctx: &mut Context, router: u64, bytes: &mut usize, blocks: &mut usize) {
    let Some(b) = ctx.blocks.remove(&router) else {
        return;
    };
    if b.children == 0 {
        ctx.leaves.remove(&(b.filed, router));
    }
    *blocks -= 1;
    *bytes -= BLOCK_COST + LEAF_COST;
    if let Some(p) = b.parent {
        if let Some(pb) = ctx.blocks.get_mut(&p) {
            // A parent re-created after this block was stored does not count it.
            if pb.children > 0 {
                pb.children -= 1;
            }
            if pb.children == 0 && !ctx.leaves.contains(&(pb.filed, p)) {
                pb.filed = pb.last_used.load(Relaxed);
                ctx.leaves.insert((pb.filed, p));
            }
        }
    }
}

/// Evicts the least recently used leaf of `ctx` from every holder.
fn evict_one(
    ctx: &mut Context,
    workers: &mut [Option<Worker>],
    bytes: &mut usize,
    blocks: &mut usize,
    worker_blocks: &mut usize,
) -> bool {
    loop {
        let Some((filed, router)) = ctx.leaves.pop_first() else {
            return false;
        };
        let Some(b) = ctx.blocks.get_mut(&router) else {
            continue;
        };
        let now = b.last_used.load(Relaxed);
        if now != filed {
            // Touched since it was filed: file it again under its real tick.
            b.filed = now;
            ctx.leaves.insert((now, router));
            continue;
        }
        for h in b.holders.clone() {
            if let Some(wk) = workers[h.worker as usize].as_mut() {
                if wk.engine.remove(&h.engine).is_some() {
                    *worker_blocks -= 1;
                    *bytes -= ENGINE_COST;
                }
            }
            *bytes -= HOLDER_COST;
        }
        remove_block(ctx, router, bytes, blocks);
        return true;
    }
}
