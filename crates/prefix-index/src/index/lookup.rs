//! A lookup's walk: a query's router hash chain against one context, narrowing the set of
//! workers that hold every block so far (per tier) until it is empty.

use super::*;

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
    pub(super) fn new(worker: u32, tiers: TierMask) -> Self {
        Cand {
            worker,
            alive: tiers,
            blocks: 0,
            per_tier: [0; Tier::COUNT],
        }
    }

    /// Block `i` is held on `tiers`: tiers not among them stop at `i`.
    #[inline]
    pub(super) fn narrow(&mut self, tiers: TierMask, i: u32) {
        let next = self.alive.intersect(tiers);
        if next != self.alive {
            for t in self.alive.iter().filter(|t| !next.contains(*t)) {
                self.per_tier[t as usize] = i;
            }
            self.alive = next;
        }
    }

    /// The walk stops for this worker before block `i`.
    pub(super) fn end(&mut self, i: u32) {
        self.blocks = i;
        for t in self.alive.iter() {
            self.per_tier[t as usize] = i;
        }
    }
}

impl State {
    /// Which workers hold the longest run of `chain`'s leading blocks in `ctx`.
    pub(super) fn walk(
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
                    // Retired workers (being released after a clear or removal) are not
                    // reported, whatever part of their blocks is left.
                    cands.extend(
                        ctx.holders(next)
                            .filter(|h| !self.is_retired(h.worker))
                            .map(|h| Cand::new(h.worker, h.tiers)),
                    );
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
