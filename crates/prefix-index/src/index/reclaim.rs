//! Retired workers: a clear of more than a chunk retires the worker's index (lookups skip it)
//! and gives its id a fresh one; a removal retires it for good. `reclaim` then releases the
//! retired entries a chunk at a time, so no hold of the write lock releases more than
//! [`IndexConfig::reclaim_chunk`] entries.

use super::*;

impl State {
    /// Whether `w` is retired (lookups skip it). The list is almost always empty.
    #[inline]
    pub(super) fn is_retired(&self, w: u32) -> bool {
        !self.retired.is_empty() && self.retired.iter().any(|r| r.w == w)
    }

    /// Whether a new worker can get an index (below [`crate::types::MAX_WORKERS`]).
    pub(super) fn worker_slot_free(&self) -> bool {
        self.workers.len() < crate::types::MAX_WORKERS || self.workers.iter().any(Option::is_none)
    }

    /// Drops everything worker `w` holds and keeps its id known: at once when it holds at
    /// most a chunk, else by retiring its index and giving the id a fresh one. Returns the
    /// entries it held.
    pub(super) fn clear_or_retire(&mut self, cfg: &IndexConfig, w: u32) -> u32 {
        let wk = self.workers[w as usize]
            .as_ref()
            .expect("worker id is live");
        let n = wk.engine_len();
        if n <= cfg.reclaim_chunk || !self.worker_slot_free() {
            return self.clear_worker(w);
        }
        let id = wk.id.clone();
        self.retired.push(Retired {
            w,
            pos: 0,
            forget: false,
        });
        let fresh = put(
            &mut self.workers,
            Worker {
                id: id.clone(),
                engine: Vec::new(),
            },
        );
        self.worker_ids.insert(id, fresh);
        self.bytes += WORKER_COST;
        n as u32
    }

    /// Releases up to `max` entries of retired workers; a worker whose entries are all
    /// released is forgotten. Returns whether any retired worker is left.
    pub(super) fn reclaim(&mut self, max: usize) -> bool {
        let mut left = max.max(1);
        let mut released = 0usize;
        let mut drained = std::mem::take(&mut self.drained);
        while left > 0 {
            let Some(r) = self.retired.last_mut() else {
                break;
            };
            let w = r.w;
            let wk = self.workers[w as usize]
                .as_mut()
                .expect("a retired worker is live");
            drained.clear();
            while left > 0 {
                let Some((c, t)) = wk.engine.last_mut() else {
                    break;
                };
                let c = *c;
                left -= t.drain_from(&mut r.pos, left, |_, s| drained.push(pack(c, s)));
                if t.len() == 0 {
                    wk.engine.pop();
                    r.pos = 0;
                }
            }
            let done = wk.engine.is_empty();
            self.worker_blocks -= drained.len();
            self.bytes -= drained.len() * ENGINE_COST;
            released += drained.len();
            for &v in &drained {
                let (c, slot) = unpack(v);
                self.drop_holder(c, slot, w);
            }
            if done {
                let r = self.retired.pop().expect("the last retired worker");
                self.workers[w as usize] = None;
                self.bytes -= WORKER_COST;
                if r.forget {
                    self.drop_empty_contexts();
                }
            }
        }
        self.drained = drained;
        self.stats.longest_hold = self.stats.longest_hold.max(released as u64);
        !self.retired.is_empty()
    }

    /// Contexts left without a block go (their block size is learned again).
    pub(super) fn drop_empty_contexts(&mut self) {
        let empty: Vec<u32> = self
            .contexts
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.len() == 0))
            .map(|(i, _)| i as u32)
            .collect();
        for c in empty {
            self.drop_context(c);
        }
    }
}
