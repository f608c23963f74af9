//! After a panic in the middle of a write: the state is brought back to one that passes every
//! invariant, without the worker whose change was cut (or, failing that, empty).

use super::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

impl State {
    /// See `Index::write`.
    pub(super) fn repair(&mut self, worker: &WorkerId) {
        self.stats.panics_repaired += 1;
        let repaired = catch_unwind(AssertUnwindSafe(|| {
            if let Some(&w) = self.worker_ids.get(worker) {
                self.purge(w);
            }
            self.recount();
            self.check();
        }));
        if repaired.is_err() {
            let stats = Stats {
                panic_resets: self.stats.panic_resets + 1,
                ..self.stats
            };
            // Incarnations stay claimed: their writers go on, on an empty index.
            *self = State {
                stats,
                fences: std::mem::take(&mut self.fences),
                epochs: self.epochs,
                ..State::default()
            };
        }
    }

    /// Drops every holding of worker `w`, found from the blocks' side (its engine table may
    /// lack the entry of a block filed just before the panic).
    fn purge(&mut self, w: u32) {
        for ctx in self.contexts.iter_mut().flatten() {
            let slots: Vec<u32> = ctx.used_slots().collect();
            for s in slots {
                // A removal can free a parent tombstone met later in the list.
                if !ctx.slots[s as usize].is_free() {
                    ctx.remove_holder(s, w);
                }
            }
        }
        if let Some(wk) = self.workers[w as usize].as_mut() {
            wk.engine.clear();
        }
    }

    /// Recomputes the counts that writes keep incrementally.
    fn recount(&mut self) {
        self.blocks = self
            .contexts
            .iter()
            .flatten()
            .map(|c| c.used() - c.tombs())
            .sum();
        self.worker_blocks = self.workers.iter().flatten().map(Worker::engine_len).sum();
        self.bytes = self.counted_bytes();
    }

    /// The byte accounting, computed from scratch.
    pub(super) fn counted_bytes(&self) -> usize {
        let mut bytes = self.context_ids.len() * CONTEXT_COST
            // Known and retired workers alike (a retired one is paid for until released).
            + self.workers.iter().flatten().count() * WORKER_COST
            + self.worker_blocks * ENGINE_COST;
        for ctx in self.contexts.iter().flatten() {
            for s in ctx.used_slots() {
                bytes += BLOCK_COST + ctx.holders(s).count().saturating_sub(1) * HOLDER_COST;
            }
        }
        bytes
    }
}
