//! Choosing a worker for a request: pure functions over what the index and the recent
//! decisions say each candidate holds (no I/O, no clock of its own).
//!
//! - this module: [`Candidate`]s, filled from a lookup ([`fill`]) and ranked ([`order`]);
//! - [`approx`]: the recent routing decisions (the approximate index without KV sync; with it,
//!   decisions whose events have not arrived yet);
//! - [`cost`]: the load-aware choice (the `--policy`s, the time-to-first-token estimate).

pub mod approx;
pub mod cost;

use prefix_index::{Lookup, Tier, WorkerId};
use std::time::Instant;

/// A worker named by borrowed parts: looks up `WorkerId` keys without building one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerRef<'a> {
    // Field order and types as in `WorkerId`, so both hash alike.
    pub pod: &'a str,
    pub dp_rank: u32,
}

impl<'a> WorkerRef<'a> {
    pub fn of(w: &'a WorkerId) -> Self {
        WorkerRef {
            pod: &w.pod,
            dp_rank: w.dp_rank,
        }
    }
}

impl hashbrown::Equivalent<WorkerId> for WorkerRef<'_> {
    fn equivalent(&self, w: &WorkerId) -> bool {
        self.pod == &*w.pod && self.dp_rank == w.dp_rank
    }
}

/// One candidate worker of a route request.
pub struct Candidate<'a> {
    pub worker: WorkerRef<'a>,
    pub address: &'a str,
    /// The pod's HTTP API port.
    pub http_port: u16,
    /// The pod's data-parallel size (a rank is named to the pod only when it has several).
    pub dp_size: u32,
    /// Leading blocks the index says the worker holds.
    pub blocks: u32,
    pub per_tier: [u32; Tier::COUNT],
    /// Leading blocks recently routed to it.
    pub routed: u32,
    /// When it was last selected.
    pub last: Option<Instant>,
    /// Its pod's load (shared by the pod's ranks).
    pub load: cost::LoadView,
    /// Set by [`cost::choose`].
    pub cost: cost::Cost,
}

impl Candidate<'_> {
    /// What the choice ranks by: held, or routed and not yet announced.
    pub fn rank(&self) -> u32 {
        self.blocks.max(self.routed)
    }
}

/// Sets each candidate's held blocks (per tier) from the index's `lookup` and its routed blocks
/// from the `recent` decisions.
pub fn fill(list: &mut [Candidate<'_>], lookup: &Lookup, recent: &[(WorkerId, u32)]) {
    if lookup.matches.is_empty() && recent.is_empty() {
        return;
    }
    let at: hashbrown::HashMap<WorkerRef, usize> = list
        .iter()
        .enumerate()
        .map(|(i, c)| (c.worker, i))
        .collect();
    for m in &lookup.matches {
        if let Some(&i) = at.get(&WorkerRef::of(&m.worker)) {
            list[i].blocks = m.blocks;
            list[i].per_tier = m.per_tier;
        }
    }
    for (w, n) in recent {
        if let Some(&i) = at.get(&WorkerRef::of(w)) {
            list[i].routed = *n;
        }
    }
}

/// Best first: the longest prefix ([`Candidate::rank`]); among equals, the least recently
/// selected (never selected first), then by pod and rank, so that the order is total.
pub fn order(list: &mut [Candidate<'_>]) {
    list.sort_unstable_by(|a, b| {
        b.rank()
            .cmp(&a.rank())
            .then_with(|| a.last.cmp(&b.last))
            .then_with(|| a.worker.pod.cmp(b.worker.pod))
            .then_with(|| a.worker.dp_rank.cmp(&b.worker.dp_rank))
    });
}
