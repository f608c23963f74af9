//! Routing decisions remembered as if the selected worker now caches the request's blocks, for
//! a TTL. With KV event sync off this is the whole index (the gateway degrades to "probably
//! cached", never fails); with it on, a short TTL covers the decisions whose events have not
//! arrived yet (in flight), so a burst of requests sharing a new prefix goes to one pod instead
//! of being spread before the first one's blocks are announced.
//!
//! It works on a prompt's chain of router block hashes ([`prefix_index::Index::chain`]), which
//! start from the context's root: one chain per request serves the index, this lookup and this
//! record.
//!
//! Bounded by a byte budget: [`SHARDS`] shards, picked by a block's hash, each a ring of at
//! most a fixed number of slots (a block hash and up to [`HOLDERS`] workers with their expiry)
//! and a map from hash to slot. A record into a full shard takes the slot a CLOCK hand points
//! at — expired or not referenced since the hand last passed, or the one it reaches after
//! [`MAX_SWEEP`] slots — so an insert is O(1) whatever the size, and the newest decisions are
//! always remembered. A lock is held for one block's work, and blocks of concurrent routes
//! mostly fall in different shards: routes do not serialise on it. Time is an argument.

use parking_lot::Mutex;
use prefix_index::WorkerId;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Shards (a power of two), picked by a block's hash.
pub const SHARDS: usize = 64;
/// Workers remembered per block; a further one replaces the one whose decision expires first.
pub const HOLDERS: usize = 4;
/// Slots the CLOCK hand passes over (clearing their reference) before it takes the one it is
/// on regardless: the work of a record into a full shard is at most this + 1 slots per block.
pub const MAX_SWEEP: usize = 8;

/// Bytes one slot costs: the slot, and its map entry at the map's worst load (just after it
/// grew: up to about 2.3 buckets of 17 bytes each per entry, with padding; measured
/// by `bounded`).
const SLOT_COST: usize = std::mem::size_of::<Slot>() + 64;

#[derive(Debug, Clone)]
struct Holder {
    worker: WorkerId,
    until: Instant,
}

#[derive(Debug)]
struct Slot {
    key: u64,
    /// Hit or refreshed since the hand last passed.
    referenced: bool,
    holders: [Option<Holder>; HOLDERS],
}

impl Slot {
    fn live(&self, now: Instant) -> impl Iterator<Item = &WorkerId> {
        self.holders
            .iter()
            .flatten()
            .filter(move |h| h.until > now)
            .map(|h| &h.worker)
    }

    fn hold(&mut self, worker: &WorkerId, now: Instant, until: Instant) {
        if let Some(h) = self
            .holders
            .iter_mut()
            .flatten()
            .find(|h| h.worker == *worker)
        {
            h.until = until;
            return;
        }
        // A free or expired place, else the decision that expires first.
        let place = self
            .holders
            .iter()
            .position(|h| h.as_ref().is_none_or(|h| h.until <= now))
            .or_else(|| (0..HOLDERS).min_by_key(|&j| self.holders[j].as_ref().map(|h| h.until)))
            .unwrap_or(0);
        self.holders[place] = Some(Holder {
            worker: worker.clone(),
            until,
        });
    }
}

#[derive(Debug, Default)]
struct Shard {
    map: hashbrown::HashMap<u64, u32>,
    slots: Vec<Slot>,
    hand: usize,
}

/// What the CLOCK hands did, over all shards.
#[derive(Debug, Default)]
struct Counters {
    /// Slots a hand visited.
    visited: AtomicU64,
    /// Slots taken while they still held a live decision.
    evicted_live: AtomicU64,
}

impl Shard {
    /// The slot for `key` in a shard of at most `cap` slots (a new one or a victim's).
    fn slot_for(&mut self, key: u64, cap: usize, now: Instant, c: &Counters) -> usize {
        if let Some(&i) = self.map.get(&key) {
            return i as usize;
        }
        let i = if self.slots.len() < cap {
            if self.slots.len() == self.slots.capacity() {
                // Grow as a Vec does, never past the cap.
                let more = self.slots.len().max(4).min(cap - self.slots.len());
                self.slots.reserve_exact(more);
            }
            self.slots.push(Slot {
                key,
                referenced: false,
                holders: Default::default(),
            });
            self.slots.len() - 1
        } else {
            let i = self.victim(now, c);
            let old = &mut self.slots[i];
            if old.live(now).next().is_some() {
                c.evicted_live.fetch_add(1, Relaxed);
            }
            self.map.remove(&old.key);
            old.key = key;
            old.referenced = false;
            old.holders = Default::default();
            i
        };
        self.map.insert(key, i as u32);
        i
    }

    /// CLOCK: the first slot that is expired or unreferenced within [`MAX_SWEEP`], else the
    /// one after them.
    fn victim(&mut self, now: Instant, c: &Counters) -> usize {
        let n = self.slots.len();
        let mut visited = 0;
        let i = loop {
            let i = self.hand;
            self.hand = (i + 1) % n;
            visited += 1;
            let s = &mut self.slots[i];
            if visited > MAX_SWEEP || !s.referenced || s.live(now).next().is_none() {
                break i;
            }
            s.referenced = false;
        };
        c.visited.fetch_add(visited as u64, Relaxed);
        i
    }

    fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>() + self.map.allocation_size()
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct Approx {
    ttl: Duration,
    block_size: usize,
    /// Slots per shard.
    per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
    counters: Counters,
}

impl Approx {
    /// Remembers decisions for `ttl` (zero: off) in at most about `max_bytes`.
    pub fn new(ttl: Duration, block_size: usize, max_bytes: usize) -> Approx {
        Approx {
            ttl,
            block_size: block_size.max(1),
            per_shard: max_bytes / SHARDS / SLOT_COST,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            counters: Counters::default(),
        }
    }

    fn shard(&self, h: u64) -> &Mutex<Shard> {
        // Block hashes are xxh3 outputs: their top bits are as good as any.
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    /// The block size used when the index knows none for the context.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether it remembers anything at all (a zero TTL or a budget below one slot per shard
    /// turns it off).
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.per_shard > 0
    }

    /// Per worker, the consecutive leading blocks of `chain` it is believed to hold at `now`
    /// (workers holding none are left out).
    pub fn lookup(&self, chain: &[u64], now: Instant) -> Vec<(WorkerId, u32)> {
        if !self.enabled() {
            return Vec::new();
        }
        let mut alive: Vec<(WorkerId, u32)> = Vec::new();
        for (i, &h) in chain.iter().enumerate() {
            let mut shard = self.shard(h).lock();
            let Some(&s) = shard.map.get(&h) else { break };
            let slot = &mut shard.slots[s as usize];
            slot.referenced = true;
            if i == 0 {
                alive.extend(slot.live(now).map(|w| (w.clone(), 1)));
                if alive.is_empty() {
                    break;
                }
            } else {
                let mut any = false;
                for w in slot.live(now) {
                    if let Some((_, n)) = alive.iter_mut().find(|(a, n)| a == w && *n == i as u32) {
                        *n += 1;
                        any = true;
                    }
                }
                if !any {
                    break;
                }
            }
        }
        alive
    }

    /// Records that `worker` holds the blocks of `chain` from `now` for the TTL.
    pub fn record(&self, chain: &[u64], worker: &WorkerId, now: Instant) {
        if !self.enabled() {
            return;
        }
        let until = now + self.ttl;
        for &h in chain {
            let mut shard = self.shard(h).lock();
            let i = shard.slot_for(h, self.per_shard, now, &self.counters);
            let slot = &mut shard.slots[i];
            slot.referenced = true;
            slot.hold(worker, now, until);
        }
    }

    /// Block hashes remembered (expired ones included until their slot is taken).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most block hashes it remembers.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }

    /// Bytes allocated (slots and maps).
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes()).sum()
    }

    /// Slots the CLOCK hands visited to find room (the work of eviction).
    pub fn visited(&self) -> u64 {
        self.counters.visited.load(Relaxed)
    }

    /// Slots taken while they still held a live decision.
    pub fn evicted_live(&self) -> u64 {
        self.counters.evicted_live.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prefix_index::{context_root, ChainHasher, DEFAULT_SEED};

    fn chain(lora: Option<&str>, tokens: &[u32]) -> Vec<u64> {
        let mut out = Vec::new();
        let root = context_root(DEFAULT_SEED, "m", lora);
        ChainHasher::default().chain(DEFAULT_SEED, root, 2, tokens, &mut out);
        out
    }

    fn w(p: &str) -> WorkerId {
        WorkerId::new(p, 0)
    }

    fn get(l: &[(WorkerId, u32)], p: &str) -> Option<u32> {
        l.iter().find(|(x, _)| &*x.pod == p).map(|(_, n)| *n)
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn recorded_prefixes_match_until_they_expire() {
        let t = Instant::now();
        let a = Approx::new(Duration::from_secs(60), 2, MIB);
        a.record(&chain(None, &[1, 2, 3, 4, 5, 6]), &w("p1"), t);
        a.record(&chain(None, &[1, 2, 9, 9]), &w("p2"), t);
        let l = a.lookup(&chain(None, &[1, 2, 3, 4, 7, 7]), t);
        assert_eq!(get(&l, "p1"), Some(2));
        assert_eq!(get(&l, "p2"), Some(1));
        assert!(
            a.lookup(&chain(Some("lora"), &[1, 2]), t).is_empty(),
            "contexts apart"
        );
        // Recording again refreshes, never duplicates.
        a.record(&chain(None, &[1, 2]), &w("p1"), t);
        assert_eq!(a.lookup(&chain(None, &[1, 2]), t).len(), 2);
        let off = Approx::new(Duration::ZERO, 2, MIB);
        off.record(&chain(None, &[1, 2]), &w("p1"), t);
        assert!(
            off.lookup(&chain(None, &[1, 2]), t).is_empty(),
            "a zero TTL is off"
        );
        let short = Approx::new(Duration::from_nanos(1), 2, MIB);
        short.record(&chain(None, &[1, 2]), &w("p1"), t);
        assert!(
            short
                .lookup(&chain(None, &[1, 2]), t + Duration::from_millis(1))
                .is_empty(),
            "expired"
        );
    }

    /// Full of live decisions: a new decision evicts an old one in constant work (no sweep of
    /// every entry under a lock) and is remembered (the newest decisions matter most).
    #[test]
    fn full_evicts_in_constant_work_and_keeps_the_newest() {
        let t = Instant::now();
        let a = Approx::new(Duration::from_secs(60), 1, MIB);
        let n = a.capacity() as u32;
        assert!(n >= 4096, "{n}");
        for i in 0..2 * n {
            a.record(&chain(None, &[i, 0]), &w("old"), t);
        }
        let before = a.visited();
        for i in 0..1000 {
            a.record(&chain(None, &[2 * n + i, 0]), &w("new"), t);
        }
        let per_record = (a.visited() - before) / 1000;
        assert!(
            per_record <= MAX_SWEEP as u64 + 1,
            "{per_record} slots visited per record when full"
        );
        let l = a.lookup(&chain(None, &[2 * n + 999, 0]), t);
        assert_eq!(get(&l, "new"), Some(1), "the newest decision is remembered");
        assert_eq!(a.len(), a.capacity(), "full, and never more");
        assert!(a.evicted_live() > 0);
    }

    /// However many blocks and workers are recorded, the bytes stay within the budget.
    #[test]
    fn bounded() {
        let t = Instant::now();
        let budget = 2 * MIB;
        let a = Approx::new(Duration::from_secs(60), 1, budget);
        for i in 0..3 * a.capacity() as u32 {
            let tokens: Vec<u32> = (0..4).map(|k| i * 4 + k).collect();
            a.record(&chain(None, &tokens), &w(&format!("p{}", i % 16)), t);
        }
        assert!(a.bytes() <= budget, "{} bytes of {budget}", a.bytes());
        assert!(a.len() <= a.capacity());
        assert!(a.bytes() > budget / 2, "the budget is used: {}", a.bytes());
        // Many workers on one block: at most HOLDERS remembered, the latest among them.
        let one = chain(None, &[7, 7]);
        for p in 0..10 {
            a.record(&one, &w(&format!("q{p}")), t + Duration::from_secs(p));
        }
        let l = a.lookup(&one, t + Duration::from_secs(10));
        assert_eq!(l.len(), HOLDERS);
        assert_eq!(get(&l, "q9"), Some(1));
        assert_eq!(get(&l, "q0"), None);
    }
}
