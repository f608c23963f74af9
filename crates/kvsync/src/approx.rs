//! Routing decisions remembered as if the selected pod now caches the request's blocks, for a
//! TTL. With KV event sync off this is the whole index (the gateway degrades to "probably
//! cached", never fails); with it on, a short TTL covers the decisions whose events have not
//! arrived yet (in flight), so a burst of requests sharing a new prefix goes to one pod instead
//! of being spread before the first one's blocks are announced.

use parking_lot::Mutex;
use prefix_index::{context_root, ChainHasher, DEFAULT_SEED};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Bounded by `max_blocks` hashes; expired entries are swept when it fills.
#[derive(Debug)]
pub struct Approx {
    ttl: Duration,
    block_size: usize,
    max_blocks: usize,
    map: Mutex<HashMap<u64, Vec<(String, Instant)>>>,
}

impl Approx {
    pub fn new(ttl: Duration, block_size: usize, max_blocks: usize) -> Approx {
        Approx {
            ttl,
            block_size: block_size.max(1),
            max_blocks,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// `block_size`: the context's, when known, so that counts compare with the index's.
    fn chain(
        &self,
        model: &str,
        lora: Option<&str>,
        tokens: &[u32],
        block_size: usize,
    ) -> Vec<u64> {
        let block_size = block_size.max(1);
        let mut out = Vec::with_capacity(tokens.len() / block_size);
        ChainHasher::default().chain(
            DEFAULT_SEED,
            context_root(DEFAULT_SEED, model, lora),
            block_size,
            tokens,
            &mut out,
        );
        out
    }

    /// Per pod, the consecutive leading blocks (of `block_size` tokens) it is believed to hold.
    pub fn lookup(
        &self,
        model: &str,
        lora: Option<&str>,
        tokens: &[u32],
        block_size: usize,
    ) -> HashMap<String, u32> {
        if self.ttl.is_zero() {
            return HashMap::new();
        }
        let now = Instant::now();
        let map = self.map.lock();
        let mut alive: Option<HashMap<String, u32>> = None;
        for (i, h) in self
            .chain(model, lora, tokens, block_size)
            .iter()
            .enumerate()
        {
            let holders: Vec<&String> = map
                .get(h)
                .map(|v| v.iter().filter(|(_, t)| *t > now).map(|(p, _)| p).collect())
                .unwrap_or_default();
            match &mut alive {
                None => {
                    alive = Some(holders.into_iter().map(|p| (p.clone(), 1)).collect());
                }
                Some(a) => {
                    let mut any = false;
                    for p in holders {
                        if let Some(n) = a.get_mut(p) {
                            if *n == i as u32 {
                                *n += 1;
                                any = true;
                            }
                        }
                    }
                    if !any {
                        break;
                    }
                }
            }
        }
        alive.unwrap_or_default()
    }

    /// Records that `pod` now holds the blocks of `tokens`.
    pub fn record(
        &self,
        model: &str,
        lora: Option<&str>,
        tokens: &[u32],
        block_size: usize,
        pod: &str,
    ) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let until = now + self.ttl;
        let chain = self.chain(model, lora, tokens, block_size);
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
        for h in chain {
            let v = map.entry(h).or_default();
            v.retain(|(p, t)| *t > now && p != pod);
            v.push((pod.to_owned(), until));
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

    #[test]
    fn recorded_prefixes_match_until_they_expire() {
        let a = Approx::new(Duration::from_secs(60), 2, 100);
        a.record("m", None, &[1, 2, 3, 4, 5, 6], 2, "p1");
        a.record("m", None, &[1, 2, 9, 9], 2, "p2");
        let l = a.lookup("m", None, &[1, 2, 3, 4, 7, 7], 2);
        assert_eq!(l.get("p1"), Some(&2));
        assert_eq!(l.get("p2"), Some(&1));
        assert!(
            a.lookup("m", Some("lora"), &[1, 2], 2).is_empty(),
            "contexts apart"
        );
        let short = Approx::new(Duration::ZERO, 2, 100);
        short.record("m", None, &[1, 2], 2, "p1");
        assert!(
            !short.lookup("m", None, &[1, 2], 2).contains_key("p1"),
            "expired"
        );
    }

    #[test]
    fn bounded() {
        let a = Approx::new(Duration::from_secs(60), 1, 4);
        a.record("m", None, &[1, 2, 3], 1, "p");
        a.record("m", None, &[4, 5, 6], 1, "p");
        assert!(a.len() <= 4);
    }
}
