//! The state's invariants, checked from scratch (tests and the property suite call it through
//! `Index::check_invariants`).

use super::*;

impl State {
    pub(super) fn check(&self) {
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
        for (id, &w) in &self.worker_ids {
            let wk = self.workers[w as usize]
                .as_ref()
                .expect("a worker id's index is live");
            assert_eq!(&wk.id, id, "worker id and index disagree");
            assert!(
                !self.is_retired(w),
                "a known worker id maps to a retired index"
            );
        }
        for r in &self.retired {
            assert!(
                self.workers[r.w as usize].is_some(),
                "a retired worker is live"
            );
        }
        assert_eq!(
            self.workers.iter().flatten().count(),
            self.worker_ids.len() + self.retired.len(),
            "every live worker is known or retired"
        );
        assert_eq!(blocks, self.blocks, "block count");
        assert_eq!(worker_blocks, self.worker_blocks, "worker block count");
        assert_eq!(holders_total, worker_blocks, "holders and engine entries");
        assert_eq!(self.bytes, self.counted_bytes(), "byte accounting");
    }
}
