//! Routing decisions remembered as if the selected worker now caches the request's blocks, for
//! a TTL. With KV event sync off this is the whole index (the gateway degrades to "probably
//! cached", never fails); with it on, a short TTL covers the decisions whose events have not
//! arrived yet (in flight), so a burst of requests sharing a new prefix goes to one pod instead
//! of being spread before the first one's blocks are announced.
//!
//! It works on a prompt's chain of router block hashes ([`prefix_index::Index::chain`]), which
//! start from the context's root: one chain per request serves the index, this lookup and this
//! record.

use parking_lot::Mutex;
use prefix_index::WorkerId;
use std::time::{Duration, Instant};

/// Bounded by `max_blocks` hashes; expired entries are swept when it fills.
#[derive(Debug)]
pub struct Approx {
    ttl: Duration,
    block_size: usize,
    max_blocks: usize,
    map: Mutex<hashbrown::HashMap<u64, Vec<(WorkerId, Instant)>>>,
}

impl Approx {
    pub fn new(ttl: Duration, block_size: usize, max_blocks: usize) -> Approx {
        Approx {
            ttl,
            block_size: block_size.max(1),
            max_blocks,
            map: Mutex::new(hashbrown::HashMap::new()),
        }
    }

    /// The block size used when the index knows none for the context.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether it remembers anything at all (a zero TTL turns it off).
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// Per worker, the consecutive leading blocks of `chain` it is believed to hold (workers
    /// holding none are left out).
    pub fn lookup(&self, chain: &[u64]) -> Vec<(WorkerId, u32)> {
        if !self.enabled() {
            return Vec::new();
        }
        let now = Instant::now();
        let map = self.map.lock();
        let mut alive: Vec<(WorkerId, u32)> = Vec::new();
        for (i, h) in chain.iter().enumerate() {
            let Some(holders) = map.get(h) else { break };
            let live = holders.iter().filter(|(_, t)| *t > now).map(|(w, _)| w);
            if i == 0 {
                alive.extend(live.map(|w| (w.clone(), 1)));
            } else {
                let mut any = false;
                for w in live {
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

    /// Records that `worker` now holds the blocks of `chain`.
    pub fn record(&self, chain: &[u64], worker: &WorkerId) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let until = now + self.ttl;
        let mut map = self.map.lock();
        if map.len() + chain.len() > self.max_blocks {
            map.retain(|_, v| {
                v.retain(|(_, t)| *t > now);
                !v.is_empty()
            });
            if map.len() + chain.len() > self.max_blocks {
                return; // full of live entries: this decision is not remembered
            }
        }
        for &h in chain {
            let v = map.entry(h).or_default();
            match v.iter_mut().find(|(w, _)| w == worker) {
                Some((_, t)) => *t = until,
                None => {
                    v.retain(|(_, t)| *t > now);
                    v.push((worker.clone(), until));
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    #[test]
    fn recorded_prefixes_match_until_they_expire() {
        let a = Approx::new(Duration::from_secs(60), 2, 100);
        a.record(&chain(None, &[1, 2, 3, 4, 5, 6]), &w("p1"));
        a.record(&chain(None, &[1, 2, 9, 9]), &w("p2"));
        let l = a.lookup(&chain(None, &[1, 2, 3, 4, 7, 7]));
        assert_eq!(get(&l, "p1"), Some(2));
        assert_eq!(get(&l, "p2"), Some(1));
        assert!(
            a.lookup(&chain(Some("lora"), &[1, 2])).is_empty(),
            "contexts apart"
        );
        // Recording again refreshes, never duplicates.
        a.record(&chain(None, &[1, 2]), &w("p1"));
        assert_eq!(a.lookup(&chain(None, &[1, 2])).len(), 2);
        let off = Approx::new(Duration::ZERO, 2, 100);
        off.record(&chain(None, &[1, 2]), &w("p1"));
        assert!(
            off.lookup(&chain(None, &[1, 2])).is_empty(),
            "a zero TTL is off"
        );
        let short = Approx::new(Duration::from_nanos(1), 2, 100);
        short.record(&chain(None, &[1, 2]), &w("p1"));
        std::thread::sleep(Duration::from_millis(1));
        assert!(short.lookup(&chain(None, &[1, 2])).is_empty(), "expired");
    }

    #[test]
    fn bounded() {
        let a = Approx::new(Duration::from_secs(60), 1, 4);
        a.record(&chain(None, &[1, 2, 3]), &w("p"));
        a.record(&chain(None, &[4, 5, 6]), &w("p"));
        assert!(a.len() <= 4);
    }
}
