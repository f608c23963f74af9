//! Keeping the state inside its budget: least-recently-used leaves evicted first (CLOCK), a
//! context dropped whole when it holds nothing or the context limit is reached.

use super::*;

impl State {
    pub(super) fn drop_context(&mut self, c: u32) {
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
    pub(super) fn evict_one(&mut self, c: u32) -> bool {
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
    pub(super) fn enforce_budget(&mut self, cfg: &IndexConfig) {
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
}
