//! The index state: contexts of blocks (see `context.rs`) and, per worker, an open-addressing
//! table from engine hash to (context, slot). One `RwLock` guards it: an apply holds the write
//! lock for one event (at most a few hundred blocks, microseconds), a lookup holds the read
//! lock and marks recency through an atomic flag, so readers never wait behind more than one
//! event and a worker's events are applied in the order they are given.

use crate::context::{Context, Holder, NIL};
use crate::hash::{context_root, ChainHasher};
use crate::table::{SlotTable, Vacancy};
use crate::tier::{Tier, TierMask};
use crate::types::{Applied, IndexConfig, Lookup, Match, Rejection, Source, Stats, WorkerId};
use hashbrown::HashMap;
use kv_events::{BlockRemoved, BlockStored, Event, Medium};
use parking_lot::RwLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Accounting costs, in bytes: a slab block and its index entry; a further holder; an
/// engine-table entry (8 bytes at about 3/4 load); a context; a worker.
pub(crate) const BLOCK_COST: usize = 28 + 10;
pub(crate) const HOLDER_COST: usize = 16;
pub(crate) const ENGINE_COST: usize = 10;
const CONTEXT_COST: usize = 512;
const WORKER_COST: usize = 256;

#[inline]
fn pack(ctx: u32, slot: u32) -> u64 {
    (u64::from(ctx) << 32) | u64::from(slot)
}

#[inline]
fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

#[derive(Debug)]
struct Worker {
    id: WorkerId,
    /// Per context it stores into: engine hash → slot (fingerprint: the hash's low 32 bits;
    /// the full key is checked against the block's holder). Usually one or two contexts.
    engine: Vec<(u32, SlotTable)>,
}

/// A context's key borrowed from a request: finds a context without allocating its key.
/// Hashes as the owned key does (a tuple hashes its fields in order; `String` as `str`).
#[derive(Hash)]
struct ContextRef<'a>(&'a str, Option<&'a str>);

impl hashbrown::Equivalent<(String, Option<String>)> for ContextRef<'_> {
    fn equivalent(&self, key: &(String, Option<String>)) -> bool {
        self.0 == key.0 && self.1 == key.1.as_deref()
    }
}

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
    /// Router hashes of the run being stored (reused between events).
    scratch: Vec<u64>,
}

/// The sync prefix hash index. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Index {
    cfg: IndexConfig,
    state: RwLock<State>,
    tick: AtomicU64,
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

    /// Drops everything `worker` holds and forgets it. Returns the blocks it held.
    pub fn remove_worker(&self, worker: &WorkerId) -> u32 {
        let mut st = self.state.write();
        let Some(&w) = st.worker_ids.get(worker) else {
            return 0;
        };
        let n = st.clear_worker(w);
        st.worker_ids.remove(worker);
        st.workers[w as usize] = None;
        st.bytes -= WORKER_COST;
        // Contexts left without a block go too (their block size is learned again).
        let empty: Vec<u32> = st
            .contexts
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.len() == 0))
            .map(|(i, _)| i as u32)
            .collect();
        for c in empty {
            st.drop_context(c);
        }
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

    /// How many blocks `worker` holds (on any tier), if it is known.
    pub fn worker_blocks(&self, worker: &WorkerId) -> Option<usize> {
        let st = self.state.read();
        let &w = st.worker_ids.get(worker)?;
        st.workers[w as usize].as_ref().map(Worker::engine_len)
    }

    /// Which workers hold the longest prefix of `tokens` in context (`model`, `lora`).
    /// Hashes block by block and stops at the first block nobody holds.
    pub fn lookup(&self, model: &str, lora: Option<&str>, tokens: &[u32]) -> Lookup {
        let seed = self.cfg.seed;
        self.walk_context(model, lora, |st, ctx, tick, bs| {
            let mut hasher = ChainHasher::default();
            let chain = hasher.chain_iter(seed, ctx.root, bs as usize, tokens);
            let num_blocks = (tokens.len() / bs as usize) as u32;
            st.walk(ctx, tick, bs, num_blocks, chain)
        })
    }

    /// Runs a walk in context (`model`, `lora`) under the read lock, if the context exists
    /// and knows its block size.
    fn walk_context(
        &self,
        model: &str,
        lora: Option<&str>,
        walk: impl FnOnce(&State, &Context, u64, u32) -> Lookup,
    ) -> Lookup {
        let tick = self.next_tick();
        let st = self.state.read();
        let Some(ctx) = st.context_ref(model, lora) else {
            return Lookup::default();
        };
        let Some(bs) = ctx.block_size else {
            return Lookup::default();
        };
        walk(&st, ctx, tick, bs)
    }

    /// The router's chain of block hashes of `tokens` in context (`model`, `lora`) with
    /// `block_size` tokens per block: what [`Index::lookup_chain`] takes. Computed once, a
    /// chain can also key what a caller keeps beside the index (recent routing decisions).
    pub fn chain(
        &self,
        model: &str,
        lora: Option<&str>,
        block_size: u32,
        tokens: &[u32],
    ) -> Vec<u64> {
        let seed = self.cfg.seed;
        let mut out = Vec::with_capacity(tokens.len() / block_size.max(1) as usize);
        ChainHasher::default().chain(
            seed,
            context_root(seed, model, lora),
            block_size.max(1) as usize,
            tokens,
            &mut out,
        );
        out
    }

    /// [`Index::lookup`] of a chain from [`Index::chain`], computed with the context's block
    /// size ([`Index::block_size`]); a chain of another block size matches nothing.
    pub fn lookup_chain(&self, model: &str, lora: Option<&str>, chain: &[u64]) -> Lookup {
        self.walk_context(model, lora, |st, ctx, tick, bs| {
            st.walk(ctx, tick, bs, chain.len() as u32, chain.iter().copied())
        })
    }

    /// The block size learned for a context, if any.
    pub fn block_size(&self, model: &str, lora: Option<&str>) -> Option<u32> {
        self.state
            .read()
            .context_ref(model, lora)
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

/// A worker still matching during a lookup.
#[derive(Debug)]
struct Cand {
    worker: u32,
    /// Tiers it holds every block so far on.
    alive: TierMask,
    /// Leading blocks held, once it dropped out (or the walk ended).
    blocks: u32,
    /// Leading blocks held per tier, once that tier dropped out.
    per_tier: [u32; Tier::COUNT],
}

impl Cand {
    fn new(worker: u32, tiers: TierMask) -> Self {
        Cand {
            worker,
            alive: tiers,
            blocks: 0,
            per_tier: [0; Tier::COUNT],
        }
    }

    /// Block `i` is held on `tiers`: tiers not among them stop at `i`.
    #[inline]
    fn narrow(&mut self, tiers: TierMask, i: u32) {
        let next = self.alive.intersect(tiers);
        if next != self.alive {
            for t in self.alive.iter().filter(|t| !next.contains(*t)) {
                self.per_tier[t as usize] = i;
            }
            self.alive = next;
        }
    }

    /// The walk stops for this worker before block `i`.
    fn end(&mut self, i: u32) {
        self.blocks = i;
        for t in self.alive.iter() {
            self.per_tier[t as usize] = i;
        }
    }
}

/// Puts `x` in the first free place of `v` (or a new one); returns its index.
fn put<T>(v: &mut Vec<Option<T>>, x: T) -> u32 {
    match v.iter().position(Option::is_none) {
        Some(i) => {
            v[i] = Some(x);
            i as u32
        }
        None => {
            v.push(Some(x));
            (v.len() - 1) as u32
        }
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

impl Worker {
    fn table(&self, c: u32) -> Option<&SlotTable> {
        self.engine.iter().find(|(x, _)| *x == c).map(|(_, t)| t)
    }

    fn engine_len(&self) -> usize {
        self.engine.iter().map(|(_, t)| t.len()).sum()
    }
}

/// Finds `worker`'s entry for engine hash `ekey`: the packed (context, slot).
fn engine_find(contexts: &[Option<Context>], wk: &Worker, w: u32, ekey: u64) -> Option<u64> {
    engine_probe(contexts, wk, w, ekey, NIL).ok()
}

/// [`engine_find`], or where to file the key in context `c`'s table (when it has one).
fn engine_probe(
    contexts: &[Option<Context>],
    wk: &Worker,
    w: u32,
    ekey: u64,
    c: u32,
) -> Result<u64, Option<Vacancy>> {
    let mut vacancy = None;
    for (x, t) in &wk.engine {
        let Some(ctx) = contexts[*x as usize].as_ref() else {
            continue;
        };
        match t.probe(ekey as u32, |s| ctx.held_as(s, w, ekey)) {
            Ok(s) => return Ok(pack(*x, s)),
            Err(v) if *x == c => vacancy = v,
            Err(_) => {}
        }
    }
    Err(vacancy)
}

/// Removes `worker`'s entry (context, slot) filed under `ekey`.
fn engine_remove(wk: &mut Worker, ekey: u64, packed: u64) -> bool {
    let (c, s) = unpack(packed);
    wk.engine
        .iter_mut()
        .find(|(x, _)| *x == c)
        .is_some_and(|(_, t)| t.remove(ekey as u32, s))
}

/// Files `worker`'s holding of (context, slot) under `ekey`, at `vacancy` from
/// [`engine_probe`] if the table has not changed since.
fn engine_insert(wk: &mut Worker, ekey: u64, c: u32, slot: u32, vacancy: Option<Vacancy>) {
    let i = match wk.engine.iter().position(|(x, _)| *x == c) {
        Some(i) => i,
        None => {
            wk.engine.push((c, SlotTable::default()));
            wk.engine.len() - 1
        }
    };
    wk.engine[i].1.insert_at(vacancy, ekey as u32, slot);
}

impl State {
    /// Which workers hold the longest run of `chain`'s leading blocks in `ctx`.
    fn walk(
        &self,
        ctx: &Context,
        tick: u64,
        bs: u32,
        num_blocks: u32,
        chain: impl Iterator<Item = u64>,
    ) -> Lookup {
        ctx.last_used.store(tick, Relaxed);
        // Candidates: workers holding every block so far, with the tiers they hold all of them
        // on. A count is written only when it stops growing (the block index where the worker
        // or one of its tiers dropped out), so a block whose holders are those of the block
        // before costs nothing per candidate.
        // `cands[..live]` still match; those after dropped out.
        let mut cands: Vec<Cand> = Vec::new();
        let mut live = 0usize;
        let mut slot = NIL;
        let mut last: Option<&crate::context::Block> = None;
        let mut i = 0u32;
        // The blocks after `slot` in its slab chunk: where the run `slot` is in goes on.
        let mut run: &[crate::context::Block] = &[];
        // Runs of one stored event sit in consecutive slots, so most steps read the slot
        // after the last one: a sequential walk the prefetcher follows.
        for key in chain {
            if let (Some(l), Some((nb, rest))) = (last, run.split_first()) {
                // The run goes on with the last block's holders (a live block's: a free slot or
                // a tombstone never has them): a step is a key and a holder comparison, no
                // slab indexing. `FLEET_PROFILE=parts`, three alternating runs: walk of an 8k
                // full hit with its blocks hot 3.8-4.3 -> 2.1-2.6 µs, 2k 1.5-1.7 -> 1.2-1.4
                // (a slow phase of the VM); a cold lookup gains less (its reads bound it):
                // fleet p50 8k full -4 to -16 %, 2k full within the noise.
                if nb.key() == key && ctx.same_holders(l, nb) {
                    nb.touch();
                    i += 1;
                    slot += 1;
                    last = Some(nb);
                    run = rest;
                    continue;
                }
            }
            let Some((next, b)) = ctx.locate_block(slot, key) else {
                break;
            };
            if next != slot.wrapping_add(1) {
                // Entered a run through the index: its next blocks follow in the slab.
                ctx.prefetch_run(next);
            }
            b.touch();
            match last {
                None => {
                    cands.extend(ctx.holders(next).map(|h| Cand::new(h.worker, h.tiers)));
                    live = cands.len();
                    if live == 0 {
                        // A tombstone: nobody holds the first block.
                        break;
                    }
                }
                Some(l) if ctx.same_holders(l, b) => {}
                Some(_) => {
                    let mut j = 0;
                    while j < live {
                        match ctx.tiers_of(next, cands[j].worker) {
                            Some(t) => {
                                cands[j].narrow(t, i);
                                j += 1;
                            }
                            None => {
                                cands[j].end(i);
                                live -= 1;
                                cands.swap(j, live);
                            }
                        }
                    }
                    if live == 0 {
                        break;
                    }
                }
            }
            i += 1;
            slot = next;
            last = Some(b);
            run = ctx.slots.after(slot as usize);
        }
        for c in &mut cands[..live] {
            c.end(i);
        }
        // Most blocks first; equals by worker index (comparing names cost more than the rest
        // of a shared prompt's walk: ~80 ns for eight holders).
        cands.sort_unstable_by(|a, b| b.blocks.cmp(&a.blocks).then(a.worker.cmp(&b.worker)));
        let matches: Vec<Match> = cands
            .iter()
            .filter_map(|c| {
                self.workers[c.worker as usize].as_ref().map(|wk| Match {
                    worker: wk.id.clone(),
                    blocks: c.blocks,
                    per_tier: c.per_tier,
                })
            })
            .collect();
        Lookup {
            block_size: Some(bs),
            num_blocks,
            matches,
        }
    }
}

impl State {
    fn context_ref(&self, model: &str, lora: Option<&str>) -> Option<&Context> {
        self.context_ids
            .get(&ContextRef(model, lora))
            .and_then(|&c| self.contexts[c as usize].as_ref())
    }

    fn worker(&mut self, id: &WorkerId, cfg: &IndexConfig) -> Option<u32> {
        if let Some(&w) = self.worker_ids.get(id) {
            return Some(w);
        }
        // Blocks keep a worker index in 16 bits.
        if self.worker_ids.len() >= cfg.max_workers.min(crate::types::MAX_WORKERS) {
            return None;
        }
        let wk = Worker {
            id: id.clone(),
            engine: Vec::new(),
        };
        let idx = put(&mut self.workers, wk);
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
        if let Some(&c) = self.context_ids.get(&ContextRef(model, lora)) {
            return Some(c);
        }
        let key = (model.to_owned(), lora.map(str::to_owned));
        if self.context_ids.len() >= cfg.max_contexts {
            // Make room by dropping the least recently used context.
            let (_, victim) = self
                .contexts
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (c.last_used.load(Relaxed), i)))
                .min()?;
            self.drop_context(victim as u32);
            self.stats.context_evictions += 1;
        }
        let ctx = Context::new(
            key.0.clone(),
            key.1.clone(),
            context_root(cfg.seed, model, lora),
            tick,
        );
        let idx = put(&mut self.contexts, ctx);
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
            return self.store_tokenless(w, s, tier);
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
        {
            let ctx = self.contexts[c as usize]
                .as_mut()
                .expect("context id is live");
            match ctx.block_size {
                None => ctx.block_size = Some(bs),
                Some(cbs) if cbs == bs => {}
                Some(cbs) if bs < cbs => {
                    // A partial block (smaller than the context's): not a full block.
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
        }
        // Resolve the parent through this worker's engine hashes.
        let wk = self.workers[w as usize]
            .as_ref()
            .expect("worker id is live");
        let (mut prev_slot, mut prev_key) = match &s.parent_block_hash {
            None => (
                NIL,
                self.contexts[c as usize].as_ref().map_or(0, |x| x.root),
            ),
            Some(p) => match engine_find(&self.contexts, wk, w, p.key64()).map(unpack) {
                Some((pc, ps)) if pc == c => {
                    let ctx = self.contexts[c as usize].as_ref().expect("live");
                    (ps, ctx.slots[ps as usize].key())
                }
                _ => {
                    self.stats.orphans += 1;
                    return rejected(Rejection::Orphan);
                }
            },
        };
        // Warm the caches: ask for every block's engine-table line, then hash the whole run
        // (assuming no block is already held) while those lines arrive. Prefetches, unlike
        // loads, do not hold the hashing up: fleet prefill 8.30 -> 9.03 M blocks/s (medians
        // of 5 alternating runs against loads after the hashing). The router table holds
        // only run starts (small, probed about once per event), so not it.
        let mut chain = std::mem::take(&mut self.scratch);
        chain.clear();
        if let Some(t) = self.workers[w as usize].as_ref().and_then(|wk| wk.table(c)) {
            for h in &s.block_hashes {
                t.prefetch(h.key64() as u32);
            }
        }
        chain.extend(
            self.hasher
                .chain_iter(cfg.seed, prev_key, bs as usize, &s.token_ids),
        );
        // Whether `chain[i]` is still the router hash of block i (no re-mapped block before).
        let mut chain_intact = true;
        let mut out = Applied::default();
        for (i, (h, tokens)) in s
            .block_hashes
            .iter()
            .zip(s.token_ids.chunks_exact(bs as usize))
            .enumerate()
        {
            let ekey = h.key64();
            let wk = self.workers[w as usize]
                .as_ref()
                .expect("worker id is live");
            let mut vacancy = None;
            match engine_probe(&self.contexts, wk, w, ekey, c) {
                Err(v) => vacancy = v,
                Ok(v) => {
                    let (hc, hs) = unpack(v);
                    if hc == c {
                        // Already held: keep its router hash whatever parent the event claims.
                        let ctx = self.contexts[c as usize].as_mut().expect("live");
                        ctx.with_holder(hs, w, |t, _| *t = t.with(tier));
                        ctx.slots[hs as usize].touch();
                        out.refreshed += 1;
                        prev_slot = hs;
                        prev_key = ctx.slots[hs as usize].key();
                        chain_intact &= prev_key == chain[i];
                        continue;
                    }
                    // The same engine hash in another context: release it there first.
                    self.release(w, ekey, hc, hs);
                }
            }
            let router = if chain_intact {
                chain[i]
            } else {
                self.hasher.next(cfg.seed, prev_key, tokens)
            };
            let holder = Holder {
                worker: w,
                tiers: TierMask::only(tier),
                engine: ekey,
            };
            let ctx = self.contexts[c as usize].as_mut().expect("live");
            let slot = match ctx.locate(prev_slot, router) {
                Some(slot) => {
                    ctx.slots[slot as usize].touch();
                    let old = ctx.with_holder(slot, w, |t, e| {
                        *t = t.with(tier);
                        std::mem::replace(e, ekey)
                    });
                    match old {
                        // The same tokens under another engine hash: re-file the holder.
                        Some(old_engine) => {
                            let wk = self.workers[w as usize].as_mut().expect("live");
                            if engine_remove(wk, old_engine, pack(c, slot)) {
                                self.worker_blocks -= 1;
                                self.bytes -= ENGINE_COST;
                            }
                        }
                        None => {
                            if ctx.add_holder(slot, holder) {
                                self.blocks += 1;
                            } else {
                                self.bytes += HOLDER_COST;
                            }
                        }
                    }
                    slot
                }
                None => {
                    self.blocks += 1;
                    self.bytes += BLOCK_COST;
                    ctx.insert(router, prev_slot, holder)
                }
            };
            let wk = self.workers[w as usize].as_mut().expect("live");
            engine_insert(wk, ekey, c, slot, vacancy);
            self.worker_blocks += 1;
            self.bytes += ENGINE_COST;
            out.stored += 1;
            prev_slot = slot;
            prev_key = router;
        }
        self.scratch = chain;
        // Per-context block limit.
        while self.contexts[c as usize].as_ref().map_or(0, Context::used)
            > cfg.max_blocks_per_context
        {
            if !self.evict_one(c) {
                break;
            }
        }
        out
    }

    /// A token-less store (CPU/disk offload) of blocks known by engine hash.
    fn store_tokenless(&mut self, w: u32, s: &BlockStored, tier: Tier) -> Applied {
        let mut out = Applied::default();
        for h in &s.block_hashes {
            let wk = self.workers[w as usize]
                .as_ref()
                .expect("worker id is live");
            let Some((c, slot)) = engine_find(&self.contexts, wk, w, h.key64()).map(unpack) else {
                self.stats.unknown_blocks += 1;
                out.rejected = Some(Rejection::UnknownBlock);
                continue;
            };
            let ctx = self.contexts[c as usize].as_mut().expect("live");
            ctx.with_holder(slot, w, |t, _| *t = t.with(tier));
            ctx.slots[slot as usize].touch();
            out.refreshed += 1;
        }
        out
    }

    /// Releases worker `w`'s holding of (context `c`, `slot`) filed under `ekey`.
    fn release(&mut self, w: u32, ekey: u64, c: u32, slot: u32) {
        let wk = self.workers[w as usize].as_mut().expect("live");
        if engine_remove(wk, ekey, pack(c, slot)) {
            self.worker_blocks -= 1;
            self.bytes -= ENGINE_COST;
        }
        self.drop_holder(c, slot, w);
    }

    /// Removes `w` from a block's holders, freeing the block when it was the last.
    fn drop_holder(&mut self, c: u32, slot: u32, w: u32) {
        let Some(ctx) = self.contexts[c as usize].as_mut() else {
            return;
        };
        let shared = ctx.slots[slot as usize].more != NIL;
        match ctx.remove_holder(slot, w) {
            (false, _) => {}
            (true, None) => {
                if shared {
                    self.bytes -= HOLDER_COST;
                }
            }
            (true, Some(freed)) => {
                self.blocks -= 1;
                self.bytes -= freed as usize * BLOCK_COST;
            }
        }
    }

    fn remove(&mut self, w: u32, r: &BlockRemoved) -> Applied {
        let tier = tier_of(r.medium.as_ref());
        let mut out = Applied::default();
        if r.block_hashes.len() > 1 {
            // Ask for every block's engine-table line first: the misses overlap.
            let wk = self.workers[w as usize]
                .as_ref()
                .expect("worker id is live");
            for (_, t) in &wk.engine {
                for h in &r.block_hashes {
                    t.prefetch(h.key64() as u32);
                }
            }
        }
        for h in &r.block_hashes {
            let ekey = h.key64();
            let wk = self.workers[w as usize]
                .as_ref()
                .expect("worker id is live");
            let Some((c, slot)) = engine_find(&self.contexts, wk, w, ekey).map(unpack) else {
                self.stats.unknown_blocks += 1;
                out.rejected = Some(Rejection::UnknownRemoval);
                continue;
            };
            let ctx = self.contexts[c as usize].as_mut().expect("live");
            let gone = ctx
                .with_holder(slot, w, |t, _| {
                    *t = t.without(tier);
                    t.is_empty()
                })
                .unwrap_or(true);
            if gone {
                self.release(w, ekey, c, slot);
                out.removed += 1;
            }
        }
        out
    }

    fn clear_worker(&mut self, w: u32) -> u32 {
        let Some(wk) = self.workers[w as usize].as_mut() else {
            return 0;
        };
        let entries: Vec<u64> = wk
            .engine
            .drain(..)
            .flat_map(|(c, t)| t.iter().map(move |(_, s)| pack(c, s)).collect::<Vec<_>>())
            .collect();
        self.worker_blocks -= entries.len();
        self.bytes -= entries.len() * ENGINE_COST;
        for v in &entries {
            let (c, slot) = unpack(*v);
            self.drop_holder(c, slot, w);
        }
        entries.len() as u32
    }

    fn drop_context(&mut self, c: u32) {
        let Some(ctx) = self.contexts[c as usize].take() else {
            return;
        };
        for slot in ctx.used_slots() {
            let mut n = 0usize;
            for h in ctx.holders(slot) {
                if let Some(wk) = self.workers[h.worker as usize].as_mut() {
                    if engine_remove(wk, h.engine, pack(c, slot)) {
                        self.worker_blocks -= 1;
                        self.bytes -= ENGINE_COST;
                    }
                }
                n += 1;
            }
            // A tombstone (no holder) costs a block and is not among `blocks`.
            self.bytes -= BLOCK_COST + n.saturating_sub(1) * HOLDER_COST;
            if n > 0 {
                self.blocks -= 1;
            }
        }
        for wk in self.workers.iter_mut().flatten() {
            wk.engine.retain(|(x, _)| *x != c);
        }
        self.context_ids.remove(&(ctx.model, ctx.lora));
        self.bytes -= CONTEXT_COST;
    }

    /// Evicts one block of context `c` (CLOCK: unreferenced leaves first) from every holder.
    fn evict_one(&mut self, c: u32) -> bool {
        let Some(ctx) = self.contexts[c as usize].as_mut() else {
            return false;
        };
        let Some(slot) = ctx.victim() else {
            return false;
        };
        let holders: Vec<Holder> = ctx.holders(slot).collect();
        for h in &holders {
            if let Some(wk) = self.workers[h.worker as usize].as_mut() {
                if engine_remove(wk, h.engine, pack(c, slot)) {
                    self.worker_blocks -= 1;
                    self.bytes -= ENGINE_COST;
                }
            }
        }
        let freed = ctx.vacate(slot) as usize;
        self.blocks -= 1;
        self.bytes -= freed * BLOCK_COST + (holders.len() - 1) * HOLDER_COST;
        self.stats.evictions += 1;
        true
    }

    /// Evicts until the byte budget holds, from the context with the most blocks.
    fn enforce_budget(&mut self, cfg: &IndexConfig) {
        while self.bytes > cfg.max_bytes {
            let victim = self
                .contexts
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (c.used(), i)))
                .filter(|(n, _)| *n > 0)
                .max();
            let Some((_, c)) = victim else { return };
            if !self.evict_one(c as u32) {
                return;
            }
        }
    }

    fn check(&self) {
        let mut blocks = 0;
        let mut holders_total = 0;
        for (ci, ctx) in self.contexts.iter().enumerate() {
            let Some(ctx) = ctx else { continue };
            let used: Vec<u32> = ctx.used_slots().collect();
            assert_eq!(used.len(), ctx.used(), "used count and slab disagree");
            let mut children = std::collections::HashMap::<u32, u32>::new();
            for &slot in &used {
                let p = ctx.slots[slot as usize].parent;
                if p != NIL {
                    assert!(
                        !ctx.slots[p as usize].is_free(),
                        "a block's parent slot is free"
                    );
                    *children.entry(p).or_default() += 1;
                }
            }
            let mut tombs = 0;
            for &slot in &used {
                let n = children.get(&slot).copied().unwrap_or(0);
                assert_eq!(ctx.children(slot), n, "child count");
                if ctx.slots[slot as usize].is_tomb() {
                    tombs += 1;
                    assert!(n > 0, "a tombstone without children");
                    assert_eq!(ctx.holders(slot).count(), 0, "a tombstone with holders");
                }
            }
            assert_eq!(tombs, ctx.tombs(), "tombstone count");
            assert_eq!(
                used.iter()
                    .filter(|&&s| ctx.slots[s as usize].is_indexed())
                    .count(),
                ctx.indexed(),
                "index and indexed flags disagree"
            );
            blocks += used.len() - tombs;
            for &slot in &used {
                let b = &ctx.slots[slot as usize];
                if !b.is_indexed() {
                    assert!(
                        slot > 0 && b.parent == slot - 1,
                        "a block outside the index does not follow its parent"
                    );
                }
                assert_eq!(
                    ctx.locate(if b.is_indexed() { NIL } else { b.parent }, b.key()),
                    Some(slot),
                    "block not found by its key"
                );
                assert!(ctx.holder_sig_fresh(slot), "stale holder signature");
                let hs: Vec<Holder> = ctx.holders(slot).collect();
                holders_total += hs.len();
                let mut ws: Vec<u32> = hs.iter().map(|h| h.worker).collect();
                ws.sort_unstable();
                ws.dedup();
                assert_eq!(ws.len(), hs.len(), "a worker holds a block twice");
                for h in &hs {
                    assert!(!h.tiers.is_empty(), "holder without tier");
                    let wk = self.workers[h.worker as usize]
                        .as_ref()
                        .expect("holder's worker is live");
                    assert_eq!(
                        engine_find(&self.contexts, wk, h.worker, h.engine),
                        Some(pack(ci as u32, slot)),
                        "holder's engine entry"
                    );
                }
            }
        }
        let mut worker_blocks = 0;
        for (wi, wk) in self.workers.iter().enumerate() {
            let Some(wk) = wk else { continue };
            worker_blocks += wk.engine_len();
            for (c, s) in wk
                .engine
                .iter()
                .flat_map(|(c, t)| t.iter().map(move |(_, s)| (*c, s)))
            {
                let ctx = self.contexts[c as usize]
                    .as_ref()
                    .expect("entry's context is live");
                assert!(
                    ctx.tiers_of(s, wi as u32).is_some(),
                    "engine entry without holder"
                );
            }
        }
        assert_eq!(blocks, self.blocks, "block count");
        assert_eq!(worker_blocks, self.worker_blocks, "worker block count");
        assert_eq!(holders_total, worker_blocks, "holders and engine entries");
    }
}
