//! The index state: contexts of blocks (see `context.rs`) and, per worker, an open-addressing
//! table from engine hash to (context, slot). One `RwLock` guards it: an apply holds the write
//! lock for one event (at most a few hundred blocks, microseconds), a lookup holds the read
//! lock and marks recency through an atomic flag, so readers never wait behind more than one
//! event and a worker's events are applied in the order they are given.
//!
//! A worker's clear or removal of more than [`IndexConfig::reclaim_chunk`] entries does not
//! hold the lock for all of them: the worker's index is retired in one short write (lookups
//! skip a retired worker from then on; a cleared worker's id gets a fresh index, so its next
//! events apply at once) and its entries are released a chunk per write (`reclaim`), the lock
//! released between chunks: by the removal's caller until done, and a little after each
//! apply. Ingestion waits behind at most one chunk.
//!
//! This module holds the public [`Index`], the `State` behind its lock and the per-worker
//! engine-hash tables; the state's jobs are in `apply` (stores, removals, clears), `lookup`
//! (a query's walk), `evict` (the budget), `reclaim` (retired workers), `invariants` (the
//! from-scratch check) and `repair` (after a panic in a write).

use crate::context::{Context, Holder, NIL};
use crate::hash::{context_root, ChainHasher};
use crate::table::{SlotTable, Vacancy};
use crate::tier::{Tier, TierMask};
use crate::types::{
    Applied, Epoch, IndexConfig, Lookup, Match, Rejection, Source, Stats, WorkerId,
};
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

/// A retired worker whose entries are being released.
#[derive(Debug, Clone, Copy)]
struct Retired {
    w: u32,
    /// Cursor in the engine table being drained.
    pos: usize,
    /// Removed (not cleared): contexts left empty go when it is done.
    forget: bool,
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
    /// The current incarnation of each claimed worker ([`Index::claim`]); at most
    /// `max_workers` entries, each gone with its worker's fenced removal.
    fences: HashMap<WorkerId, u64>,
    /// The last epoch handed out.
    epochs: u64,
    /// `Index::inject_panic`: blocks to store before a store panics.
    #[cfg(any(test, feature = "faults"))]
    fault: Option<u32>,
    /// Retired workers (in `workers`, not in `worker_ids`), released by `reclaim`.
    retired: Vec<Retired>,
    /// Entries of the chunk being released (reused).
    drained: Vec<u64>,
}

/// The sync prefix hash index. Cheap to share: wrap it in an `Arc`. Unwind-safe: a panic
/// inside one of its writes leaves it consistent (see `Index::write`).
#[derive(Debug)]
pub struct Index {
    cfg: IndexConfig,
    state: RwLock<State>,
    tick: AtomicU64,
}

impl std::panic::RefUnwindSafe for Index {}
impl std::panic::UnwindSafe for Index {}

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
        self.write(worker, |st| {
            st.apply(&self.cfg, worker, source, event, tick)
        })
    }

    /// Drops everything `worker` holds and forgets it (and any incarnation claimed). Returns
    /// the blocks it held.
    /// Lookups stop reporting it at once; its entries are released a chunk per hold of the
    /// lock (this call returns when they all are, with those of any other retired worker).
    pub fn remove_worker(&self, worker: &WorkerId) -> u32 {
        let n = self.write(worker, |st| {
            st.fences.remove(worker);
            st.retire(worker)
        });
        self.release_retired();
        n
    }

    /// Releases every retired worker's entries, a chunk per hold of the lock: between chunks
    /// the lock goes to a waiting writer (`reclaim` unlocks fairly) and this thread lets others
    /// run, so ingestion goes on while a big worker is released.
    fn release_retired(&self) {
        while self.reclaim() {
            std::thread::yield_now();
        }
    }

    /// Starts a new incarnation of `worker` (a pod that came back under the same name and
    /// rank, a new subscription): whatever an earlier one left is dropped, and from now on
    /// the writes of earlier incarnations ([`Index::apply_as`], [`Index::clear_worker_as`],
    /// [`Index::remove_worker_as`]) are refused, so a late cleanup of an old incarnation
    /// cannot wipe what the new one applied. None when `max_workers` workers are claimed.
    pub fn claim(&self, worker: &WorkerId) -> Option<Epoch> {
        self.write(worker, |st| {
            if !st.fences.contains_key(worker)
                && st.fences.len() >= self.cfg.max_workers.min(crate::types::MAX_WORKERS)
            {
                st.stats.rejected_limits += 1;
                return None;
            }
            st.epochs += 1;
            let epoch = st.epochs;
            st.fences.insert(worker.clone(), epoch);
            if let Some(&w) = st.worker_ids.get(worker) {
                st.clear_or_retire(&self.cfg, w);
            }
            Some(Epoch(epoch))
        })
    }

    /// [`Index::apply`] for incarnation `epoch` of `worker`: [`Rejection::Stale`] once a newer
    /// incarnation has claimed it, or after the worker's removal.
    pub fn apply_as(
        &self,
        worker: &WorkerId,
        epoch: Epoch,
        source: Source<'_>,
        event: &Event,
    ) -> Applied {
        let tick = self.next_tick();
        self.write(worker, |st| {
            if !st.is_current(worker, epoch) {
                st.stats.stale += 1;
                return rejected(Rejection::Stale);
            }
            st.apply(&self.cfg, worker, source, event, tick)
        })
    }

    /// [`Index::clear_worker`] for incarnation `epoch`: nothing when it is not the current one.
    pub fn clear_worker_as(&self, worker: &WorkerId, epoch: Epoch) -> u32 {
        self.write(worker, |st| match st.worker_ids.get(worker) {
            Some(&w) if st.is_current(worker, epoch) => st.clear_or_retire(&self.cfg, w),
            _ => 0,
        })
    }

    /// [`Index::remove_worker`] for incarnation `epoch`: nothing when a newer incarnation has
    /// claimed the worker (what it holds is the newer one's).
    pub fn remove_worker_as(&self, worker: &WorkerId, epoch: Epoch) -> u32 {
        let n = self.write(worker, |st| {
            if !st.is_current(worker, epoch) {
                return 0;
            }
            st.fences.remove(worker);
            st.retire(worker)
        });
        self.release_retired();
        n
    }

    /// Drops everything `worker` holds but keeps it known (a reset after a gap or restart).
    /// Returns at once: more than a chunk of entries is retired and released later.
    pub fn clear_worker(&self, worker: &WorkerId) -> u32 {
        self.write(worker, |st| match st.worker_ids.get(worker) {
            Some(&w) => st.clear_or_retire(&self.cfg, w),
            None => 0,
        })
    }

    /// Runs `f` on the state under the write lock. The lock (parking_lot) does not poison, so
    /// a panic in `f` must not leave the state half-changed for the next holder: what
    /// `worker` holds is dropped (the change cut in the middle was its), the counts are
    /// recomputed, and when that does not restore every invariant the whole state is
    /// emptied; then the panic goes on to the caller.
    fn write<R>(&self, worker: &WorkerId, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.state.write();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut st))) {
            Ok(r) => r,
            Err(panic) => {
                st.repair(worker);
                drop(st);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Releases one chunk of the retired workers' entries under the write lock, then hands
    /// the lock to a waiting thread if any. Returns whether entries are left to release.
    /// Applies and removals call it; a shell may call it when idle.
    pub fn reclaim(&self) -> bool {
        // Almost always nothing is retired: a read lock tells without stopping the readers.
        if self.state.read().retired.is_empty() {
            return false;
        }
        let mut st = self.state.write();
        if st.retired.is_empty() {
            return false;
        }
        let more = st.reclaim(self.cfg.reclaim_chunk);
        parking_lot::RwLockWriteGuard::unlock_fair(st);
        more
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
            retiring: st.retired.len(),
            ..st.stats
        }
    }

    /// Makes a coming store panic after `after_blocks` more blocks are filed in their context
    /// and before the last one's engine entry: an apply cut in the middle, for tests of what a
    /// panic leaves behind.
    #[cfg(any(test, feature = "faults"))]
    pub fn inject_panic(&self, after_blocks: u32) {
        self.state.write().fault = Some(after_blocks);
    }

    /// Checks every internal invariant; panics with a description when one is broken.
    /// For tests: it walks the whole index.
    pub fn check_invariants(&self) {
        self.state.read().check();
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

mod apply;
mod evict;
mod invariants;
mod lookup;
mod reclaim;
mod repair;
#[cfg(test)]
mod tests;
