//! One (model, LoRA) context: a slab of 28-byte blocks, an open-addressing index of slots
//! keyed by router hash, the extra holders of shared blocks, and a CLOCK hand for eviction.
//!
//! A block that loses its last holder while it still has children stays as a *tombstone*
//! (no holders, key and parent kept) until its last child goes, so a block's parent slot
//! always holds its real parent. Hence a block without children has none anywhere: a store
//! that extends it, and a lookup that walks past it, need not search the index (see
//! [`Context::locate_block`]). Children are counted exactly for this.
//!
//! The index holds only the blocks that start a run. A stored event's blocks are new blocks
//! in consecutive slots, each the parent of the next, so a block whose slot follows its
//! parent's is found from its parent: [`Context::locate`] looks at the slot after the
//! parent's before the index. Invariant: a block in use (live or a tombstone) is indexed, or
//! the slot before it holds its parent. A block is freed only when it has no children, so no
//! block loses the parent it is found from. The fleet workload's 2.2 M blocks need ~30 k
//! index entries instead of 2.2 M: an index that fits the caches, fewer page faults as it
//! grows, and 13 bytes less per block.

use crate::table::SlotTable;
use crate::tier::TierMask;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

/// Blocks after a run's first one a walk asks for when it enters the run (every second
/// one: ~10 lines of 28-byte blocks), before the hardware prefetcher has seen the stream.
/// Fleet bench: the walk of a 2k full hit with its blocks cold 1.44 -> 1.30 µs (three
/// alternating runs); lookup p50 8k full 6.47 -> 5.86 µs, 2k full 1.95 -> 1.93 (medians of
/// five alternating runs).
const RUN_PREFETCH: usize = 24;

/// Blocks per slab chunk: a context grows by 128 KiB at a time, never by doubling.
const CHUNK_BITS: u32 = 12;
const CHUNK: usize = 1 << CHUNK_BITS;

/// Blocks in fixed-size chunks: growing never copies or doubles, so at most one chunk is
/// spare, and a slot's address is stable.
#[derive(Debug, Default)]
pub(crate) struct Slab {
    chunks: Vec<Vec<Block>>,
    len: usize,
}

impl Slab {
    /// Slots ever allocated (free or not).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, slot: usize) -> Option<&Block> {
        self.chunks.get(slot >> CHUNK_BITS)?.get(slot & (CHUNK - 1))
    }

    pub fn push(&mut self, b: Block) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(b),
            _ => {
                let mut c = Vec::with_capacity(CHUNK);
                c.push(b);
                self.chunks.push(c);
            }
        }
        self.len += 1;
    }

    /// The blocks after `slot` in its chunk (the next ones a run may continue into).
    #[inline]
    pub fn after(&self, slot: usize) -> &[Block] {
        self.chunks
            .get(slot >> CHUNK_BITS)
            .and_then(|c| c.get((slot & (CHUNK - 1)) + 1..))
            .unwrap_or(&[])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Block> {
        self.chunks.iter().flatten()
    }
}

impl std::ops::Index<usize> for Slab {
    type Output = Block;
    #[inline]
    fn index(&self, slot: usize) -> &Block {
        &self.chunks[slot >> CHUNK_BITS][slot & (CHUNK - 1)]
    }
}

impl std::ops::IndexMut<usize> for Slab {
    #[inline]
    fn index_mut(&mut self, slot: usize) -> &mut Block {
        &mut self.chunks[slot >> CHUNK_BITS][slot & (CHUNK - 1)]
    }
}

/// "No slot" / "no worker" / "no overflow list".
pub(crate) const NIL: u32 = u32::MAX;

/// `Block::meta`: the first holder's tiers in the low four bits, then two flags.
const TIERS: u8 = 0x0f;
/// Set by a store or a lookup; cleared by the CLOCK hand (second chance).
const REFERENCED: u8 = 0x10;
/// The block is in the context's index (it starts a run).
const INDEXED: u8 = 0x20;
/// `Block::worker` of a free slot.
const FREE: u16 = u16::MAX;
/// `Block::worker` of a tombstone: no holder, kept for its children.
const TOMB: u16 = u16::MAX - 1;
/// `Block::children` at and above which the exact count lives in `Context::wide`.
const WIDE: u8 = u8::MAX;

/// Splits a 64-bit hash into two 32-bit words (so a block needs only 4-byte alignment).
#[inline]
fn split(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}

#[inline]
fn join(w: [u32; 2]) -> u64 {
    u64::from(w[0]) | (u64::from(w[1]) << 32)
}

/// One block of one context: 28 bytes, 4-byte aligned (the two 64-bit hashes are kept as
/// pairs of 32-bit words; the compiler joins them into one 8-byte load).
pub(crate) struct Block {
    /// Router hash.
    key: [u32; 2],
    /// Engine hash of the first holder.
    engine: [u32; 2],
    /// Slot of the parent block, or NIL at the prompt start. The parent may have been removed
    /// (and its slot reused) since: the link only steers eviction, never a lookup.
    pub parent: u32,
    /// Index of the list of further holders in `Context::more`, or NIL.
    pub more: u32,
    /// First holder's worker index (below `TOMB`: the index caps its workers there);
    /// `FREE` marks a free slot, `TOMB` a tombstone.
    worker: u16,
    /// Blocks (live or tombstones) whose parent this is; `WIDE`: see `Context::wide`.
    children: u8,
    /// Tiers of the first holder and the flags; atomic because lookups set `REFERENCED`
    /// under the read lock.
    meta: AtomicU8,
}

const _: () = assert!(std::mem::size_of::<Block>() == 28);

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("key", &self.key())
            .field("engine", &self.engine())
            .field("parent", &self.parent)
            .field("more", &self.more)
            .field("worker", &self.worker())
            .field("children", &self.children)
            .field("meta", &self.meta.load(Relaxed))
            .finish()
    }
}

/// A further holder of a shared block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Holder {
    pub worker: u32,
    pub tiers: TierMask,
    pub engine: u64,
}

/// The further holders of a shared block, with a signature of their (worker, tiers) set so a
/// lookup compares consecutive shared blocks in one step. The signature is a sum of 64-bit
/// mixes: two different sets share one with probability 2^-64 per comparison, the same odds
/// the router hash itself already takes.
#[derive(Debug, Default)]
pub(crate) struct Holders {
    workers: Vec<u32>,
    tiers: Vec<TierMask>,
    engines: Vec<u64>,
    sig: u64,
}

/// The further holders of a block that has none.
static NO_HOLDERS: Holders = Holders {
    workers: Vec::new(),
    tiers: Vec::new(),
    engines: Vec::new(),
    sig: 0,
};

#[inline]
fn holder_sig(worker: u32, tiers: TierMask) -> u64 {
    crate::hash::mix((u64::from(worker) << 8) | u64::from(tiers.bits()))
}

impl Holders {
    fn push(&mut self, h: Holder) {
        self.workers.push(h.worker);
        self.tiers.push(h.tiers);
        self.engines.push(h.engine);
        self.sig = self.sig.wrapping_add(holder_sig(h.worker, h.tiers));
    }

    fn pop(&mut self) -> Option<Holder> {
        let h = Holder {
            worker: self.workers.pop()?,
            tiers: self.tiers.pop()?,
            engine: self.engines.pop()?,
        };
        self.sig = self.sig.wrapping_sub(holder_sig(h.worker, h.tiers));
        Some(h)
    }

    fn swap_remove(&mut self, k: usize) {
        self.sig = self
            .sig
            .wrapping_sub(holder_sig(self.workers[k], self.tiers[k]));
        self.workers.swap_remove(k);
        self.tiers.swap_remove(k);
        self.engines.swap_remove(k);
    }

    /// Whether both hold the same (worker, tiers) set (up to a 2^-64 chance).
    #[inline]
    fn same(&self, o: &Holders) -> bool {
        self.sig == o.sig && self.workers.len() == o.workers.len()
    }

    /// Whether the signature matches the entries (for invariant checks).
    fn sig_is_fresh(&self) -> bool {
        let fresh = self
            .workers
            .iter()
            .zip(&self.tiers)
            .fold(0u64, |a, (&w, &t)| a.wrapping_add(holder_sig(w, t)));
        fresh == self.sig
    }

    fn position(&self, worker: u32) -> Option<usize> {
        self.workers.iter().position(|&w| w == worker)
    }

    fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }
}

impl Block {
    /// The router hash.
    #[inline]
    pub fn key(&self) -> u64 {
        join(self.key)
    }

    /// The first holder's engine hash.
    #[inline]
    pub fn engine(&self) -> u64 {
        join(self.engine)
    }

    #[inline]
    pub fn touch(&self) {
        if self.meta.load(Relaxed) & REFERENCED == 0 {
            self.meta.fetch_or(REFERENCED, Relaxed);
        }
    }

    #[inline]
    pub fn is_free(&self) -> bool {
        self.worker == FREE
    }

    /// A tombstone: no holder, kept because it has children.
    #[inline]
    pub fn is_tomb(&self) -> bool {
        self.worker == TOMB
    }

    /// Free or a tombstone: no holder.
    #[inline]
    fn is_vacant(&self) -> bool {
        self.worker >= TOMB
    }

    /// The first holder's worker (NIL for a free slot or a tombstone).
    #[inline]
    pub fn worker(&self) -> u32 {
        if self.is_vacant() {
            NIL
        } else {
            u32::from(self.worker)
        }
    }

    fn set_worker(&mut self, w: u32) {
        self.worker = if w == NIL { FREE } else { w as u16 };
    }

    /// The first holder's tiers.
    #[inline]
    pub fn tiers(&self) -> TierMask {
        TierMask::from_bits(self.meta.load(Relaxed) & TIERS)
    }

    fn set_tiers(&mut self, t: TierMask) {
        let m = self.meta.get_mut();
        *m = (*m & !TIERS) | (t.bits() & TIERS);
    }

    fn referenced(&self) -> bool {
        self.meta.load(Relaxed) & REFERENCED != 0
    }

    fn clear_referenced(&self) {
        self.meta.fetch_and(!REFERENCED, Relaxed);
    }

    pub fn is_indexed(&self) -> bool {
        self.meta.load(Relaxed) & INDEXED != 0
    }

    fn set_indexed(&mut self, on: bool) {
        let f = self.meta.get_mut();
        *f = if on { *f | INDEXED } else { *f & !INDEXED };
    }
}

#[derive(Debug)]
pub(crate) struct Context {
    pub model: String,
    pub lora: Option<String>,
    pub root: u64,
    pub block_size: Option<u32>,
    pub slots: Slab,
    free: Vec<u32>,
    /// Live blocks (held by some worker).
    live: usize,
    /// Tombstones.
    tombs: usize,
    /// Exact child counts of blocks with `WIDE` or more children, by slot.
    wide: hashbrown::HashMap<u32, u32>,
    /// Slots of the blocks that start a run, by router hash (fingerprint: its low 32 bits).
    index: SlotTable,
    /// Further holders of shared blocks, by `Block::more`.
    pub more: Vec<Holders>,
    more_free: Vec<u32>,
    hand: usize,
    pub last_used: std::sync::atomic::AtomicU64,
}

impl Context {
    pub fn new(model: String, lora: Option<String>, root: u64, tick: u64) -> Self {
        Context {
            model,
            lora,
            root,
            block_size: None,
            slots: Slab::default(),
            free: Vec::new(),
            live: 0,
            tombs: 0,
            wide: hashbrown::HashMap::new(),
            index: SlotTable::default(),
            more: Vec::new(),
            more_free: Vec::new(),
            hand: 0,
            last_used: std::sync::atomic::AtomicU64::new(tick),
        }
    }

    /// Blocks held (not free slots, not tombstones).
    pub fn len(&self) -> usize {
        self.live
    }

    /// Slots in use: blocks held and tombstones.
    pub fn used(&self) -> usize {
        self.live + self.tombs
    }

    /// Tombstones.
    pub fn tombs(&self) -> usize {
        self.tombs
    }

    /// How many blocks (live or tombstones) have the block at `slot` as parent.
    #[inline]
    pub fn children(&self, slot: u32) -> u32 {
        match self.slots[slot as usize].children {
            WIDE => self.wide.get(&slot).copied().unwrap_or(u32::from(WIDE)),
            c => u32::from(c),
        }
    }

    fn add_child(&mut self, slot: u32) {
        let b = &mut self.slots[slot as usize];
        match b.children {
            WIDE => *self.wide.entry(slot).or_insert(u32::from(WIDE)) += 1,
            c if c == WIDE - 1 => {
                b.children = WIDE;
                self.wide.insert(slot, u32::from(WIDE));
            }
            c => b.children = c + 1,
        }
    }

    /// One child fewer; returns how many are left.
    fn drop_child(&mut self, slot: u32) -> u32 {
        let b = &mut self.slots[slot as usize];
        match b.children {
            WIDE => {
                let n = self.wide.get(&slot).copied().unwrap_or(u32::from(WIDE)) - 1;
                if n < u32::from(WIDE) {
                    self.wide.remove(&slot);
                    b.children = n as u8;
                } else {
                    self.wide.insert(slot, n);
                }
                n
            }
            0 => 0,
            c => {
                b.children = c - 1;
                u32::from(c - 1)
            }
        }
    }

    /// Blocks in the index (those that start a run).
    pub fn indexed(&self) -> usize {
        self.index.len()
    }

    /// The slot of the block keyed `key` among those that start a run.
    #[inline]
    fn find_indexed(&self, key: u64) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(key as u32, |s| slots[s as usize].key() == key)
    }

    /// The slot of the block keyed `key` whose parent is at `parent` (NIL: a prompt's first
    /// block). Keys are chained hashes, so only that parent's child can have that key.
    #[inline]
    pub fn locate(&self, parent: u32, key: u64) -> Option<u32> {
        self.locate_block(parent, key).map(|(slot, _)| slot)
    }

    /// [`Context::locate`], with the block (live or a tombstone): the slot after the
    /// parent's when it holds `key` (a run's next block), else the index of run starts —
    /// unless the parent has no children: then no block has that key (a key is the hash of
    /// its parent's key and its tokens, and a block's parent slot always holds its parent).
    #[inline(always)]
    pub fn locate_block(&self, parent: u32, key: u64) -> Option<(u32, &Block)> {
        let next = parent.wrapping_add(1);
        if let Some(b) = self.slots.get(next as usize) {
            if b.key() == key && !b.is_free() {
                return Some((next, b));
            }
        }
        if parent != NIL && self.slots[parent as usize].children == 0 {
            return None;
        }
        let slot = self.find_indexed(key)?;
        Some((slot, &self.slots[slot as usize]))
    }

    /// Asks for the cache lines of the blocks after `slot` (a run the walk just entered).
    #[inline]
    pub fn prefetch_run(&self, slot: u32) {
        for k in (2..=RUN_PREFETCH).step_by(2) {
            match self.slots.get(slot as usize + k) {
                Some(b) => crate::hash::prefetch(b),
                None => return,
            }
        }
    }

    /// Whether the block at `slot` must be indexed: the slot before it does not hold its
    /// parent.
    fn starts_run(&self, slot: u32, parent: u32) -> bool {
        parent == NIL || slot != parent.wrapping_add(1)
    }

    /// Inserts a new block held by one worker; returns its slot.
    pub fn insert(&mut self, key: u64, parent: u32, holder: Holder) -> u32 {
        let block = Block {
            key: split(key),
            engine: split(holder.engine),
            parent,
            worker: if holder.worker == NIL {
                FREE
            } else {
                holder.worker as u16
            },
            more: NIL,
            children: 0,
            meta: AtomicU8::new(REFERENCED | (holder.tiers.bits() & TIERS)),
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = block;
                s
            }
            None => {
                self.slots.push(block);
                (self.slots.len() - 1) as u32
            }
        };
        self.live += 1;
        if self.starts_run(slot, parent) {
            self.index.insert(key as u32, slot);
            self.slots[slot as usize].set_indexed(true);
        }
        if parent != NIL {
            self.add_child(parent);
        }
        slot
    }

    /// Every holder of a block: (worker, tiers, engine). None for a tombstone.
    pub fn holders(&self, slot: u32) -> impl Iterator<Item = Holder> + '_ {
        let b = &self.slots[slot as usize];
        let first = (!b.is_vacant()).then(|| Holder {
            worker: b.worker(),
            tiers: b.tiers(),
            engine: b.engine(),
        });
        let rest = if b.more == NIL {
            &NO_HOLDERS
        } else {
            &self.more[b.more as usize]
        };
        // Exact-size parts, so a caller collecting them allocates once.
        first
            .into_iter()
            .chain(rest.workers.iter().zip(&rest.tiers).zip(&rest.engines).map(
                |((&worker, &tiers), &engine)| Holder {
                    worker,
                    tiers,
                    engine,
                },
            ))
    }

    /// Whether two blocks have the same holders on the same tiers, in the same order (the
    /// common case along a shared prefix, which lets a lookup skip per-worker checks).
    #[inline]
    pub fn same_holders(&self, x: &Block, y: &Block) -> bool {
        if x.worker != y.worker || x.tiers() != y.tiers() {
            return false;
        }
        match (x.more, y.more) {
            (NIL, NIL) => true,
            (NIL, _) | (_, NIL) => false,
            (m, n) => self.more[m as usize].same(&self.more[n as usize]),
        }
    }

    /// Whether the block's further holders' signature matches them (invariant checks).
    pub fn holder_sig_fresh(&self, slot: u32) -> bool {
        let b = &self.slots[slot as usize];
        b.more == NIL || self.more[b.more as usize].sig_is_fresh()
    }

    /// The tiers on which `worker` holds `slot`, if it does.
    #[inline]
    pub fn tiers_of(&self, slot: u32, worker: u32) -> Option<TierMask> {
        let b = &self.slots[slot as usize];
        if b.worker() == worker {
            return Some(b.tiers());
        }
        if b.more == NIL {
            return None;
        }
        let h = &self.more[b.more as usize];
        h.position(worker).map(|k| h.tiers[k])
    }

    /// Whether `worker` holds `slot` under engine hash `engine`.
    pub fn held_as(&self, slot: u32, worker: u32, engine: u64) -> bool {
        self.holders(slot)
            .any(|x| x.worker == worker && x.engine == engine)
    }

    /// Applies `f` to `worker`'s holder entry of `slot`, if any.
    pub fn with_holder<R>(
        &mut self,
        slot: u32,
        worker: u32,
        f: impl FnOnce(&mut TierMask, &mut u64) -> R,
    ) -> Option<R> {
        let b = &mut self.slots[slot as usize];
        if b.worker() == worker {
            let (mut tiers, mut engine) = (b.tiers(), b.engine());
            let r = f(&mut tiers, &mut engine);
            b.set_tiers(tiers);
            b.engine = split(engine);
            return Some(r);
        }
        if b.more == NIL {
            return None;
        }
        let h = &mut self.more[b.more as usize];
        let k = h.position(worker)?;
        let old = h.tiers[k];
        let r = f(&mut h.tiers[k], &mut h.engines[k]);
        h.sig = h
            .sig
            .wrapping_sub(holder_sig(worker, old))
            .wrapping_add(holder_sig(worker, h.tiers[k]));
        Some(r)
    }

    /// Adds a holder to a block that `holder.worker` does not hold. Returns true when the
    /// block was a tombstone (it is live again, `holder` its first holder).
    pub fn add_holder(&mut self, slot: u32, holder: Holder) -> bool {
        let b = &mut self.slots[slot as usize];
        if b.is_tomb() {
            b.set_worker(holder.worker);
            b.set_tiers(holder.tiers);
            b.engine = split(holder.engine);
            b.touch();
            self.tombs -= 1;
            self.live += 1;
            return true;
        }
        let more = b.more;
        if more != NIL {
            self.more[more as usize].push(holder);
            return false;
        }
        let mut list = Holders::default();
        list.push(holder);
        let idx = match self.more_free.pop() {
            Some(i) => {
                self.more[i as usize] = list;
                i
            }
            None => {
                self.more.push(list);
                (self.more.len() - 1) as u32
            }
        };
        self.slots[slot as usize].more = idx;
        false
    }

    /// Removes `worker` from the block's holders. Returns whether it held it and, when no
    /// holder is left, the slots this freed ([`Context::vacate`]).
    pub fn remove_holder(&mut self, slot: u32, worker: u32) -> (bool, Option<u32>) {
        let b = &mut self.slots[slot as usize];
        let more = b.more;
        if b.worker() == worker {
            // Promote a further holder, if any.
            if more != NIL {
                let list = &mut self.more[more as usize];
                if let Some(next) = list.pop() {
                    b.set_worker(next.worker);
                    b.set_tiers(next.tiers);
                    b.engine = split(next.engine);
                    if list.is_empty() {
                        self.release_more(slot);
                    }
                    return (true, None);
                }
            }
            return (true, Some(self.vacate(slot)));
        }
        if more == NIL {
            return (false, None);
        }
        let list = &mut self.more[more as usize];
        let Some(i) = list.position(worker) else {
            return (false, None);
        };
        list.swap_remove(i);
        if list.is_empty() {
            self.release_more(slot);
        }
        (true, None)
    }

    fn release_more(&mut self, slot: u32) {
        let b = &mut self.slots[slot as usize];
        let more = b.more;
        b.more = NIL;
        self.more[more as usize] = Holders::default();
        self.more_free.push(more);
    }

    /// Takes a live block out of use (its holders must already be released from their
    /// engine maps): a tombstone when it has children, else a free slot — and then its
    /// parent too when that was a tombstone and this was its last child, and so on up.
    /// Returns the slots freed (0: it became a tombstone).
    pub fn vacate(&mut self, slot: u32) -> u32 {
        if self.slots[slot as usize].more != NIL {
            self.release_more(slot);
        }
        self.live -= 1;
        if self.children(slot) > 0 {
            let b = &mut self.slots[slot as usize];
            b.worker = TOMB;
            b.set_tiers(TierMask::default());
            b.meta.fetch_and(!REFERENCED, Relaxed);
            self.tombs += 1;
            return 0;
        }
        let mut freed = 0;
        let mut s = slot;
        loop {
            let (key, parent) = {
                let b = &self.slots[s as usize];
                (b.key(), b.parent)
            };
            if self.slots[s as usize].is_indexed() {
                self.index.remove(key as u32, s);
            }
            let b = &mut self.slots[s as usize];
            b.set_worker(NIL);
            b.more = NIL;
            b.children = 0;
            b.set_indexed(false);
            self.free.push(s);
            freed += 1;
            if parent == NIL
                || self.drop_child(parent) > 0
                || !self.slots[parent as usize].is_tomb()
            {
                return freed;
            }
            self.tombs -= 1;
            s = parent;
        }
    }

    /// The CLOCK hand's next victim: an unreferenced leaf (second chance for referenced
    /// ones); after two sweeps without one, any unreferenced block. `None` when empty.
    pub fn victim(&mut self) -> Option<u32> {
        let n = self.slots.len();
        if self.len() == 0 || n == 0 {
            return None;
        }
        for pass in 0..4 {
            for _ in 0..n {
                let slot = self.hand % n;
                self.hand = (slot + 1) % n;
                let b = &self.slots[slot];
                if b.is_vacant() || (pass < 2 && b.children > 0) {
                    continue;
                }
                if b.referenced() {
                    b.clear_referenced();
                    continue;
                }
                return Some(slot as u32);
            }
        }
        // Every block was referenced four times over: take the one under the hand.
        (0..n)
            .map(|i| (self.hand + i) % n)
            .find(|&s| !self.slots[s].is_vacant())
            .map(|s| s as u32)
    }

    /// Slots in use (blocks held and tombstones), for walks over the whole context.
    pub fn used_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.is_free())
            .map(|(i, _)| i as u32)
    }
}
