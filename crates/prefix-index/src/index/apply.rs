//! Applying one event to the state: finding or creating the worker and the context, storing a
//! chain of blocks (parent resolution, dedup by engine hash, tiers), token-less stores of known
//! blocks, removals and a worker's clear.

use super::*;

impl State {
    pub(super) fn apply(
        &mut self,
        cfg: &IndexConfig,
        worker: &WorkerId,
        source: Source<'_>,
        event: &Event,
        tick: u64,
    ) -> Applied {
        let Some(w) = self.worker(worker, cfg) else {
            self.stats.rejected_limits += 1;
            return rejected(Rejection::WorkerLimit);
        };
        let out = match event {
            Event::BlockStored(s) => self.store(cfg, w, source, s, tick),
            Event::BlockRemoved(r) => self.remove(w, r),
            Event::AllBlocksCleared => Applied {
                removed: self.clear_or_retire(cfg, w),
                ..Applied::default()
            },
        };
        self.enforce_budget(cfg);
        if !self.retired.is_empty() {
            // A little of the retired workers' release with each apply.
            self.reclaim((cfg.reclaim_chunk / 8).max(1));
        }
        out
    }

    /// Whether `epoch` is `worker`'s current incarnation.
    pub(super) fn is_current(&self, worker: &WorkerId, epoch: Epoch) -> bool {
        self.fences.get(worker) == Some(&epoch.0)
    }

    pub(super) fn context_ref(&self, model: &str, lora: Option<&str>) -> Option<&Context> {
        self.context_ids
            .get(&ContextRef(model, lora))
            .and_then(|&c| self.contexts[c as usize].as_ref())
    }

    pub(super) fn worker(&mut self, id: &WorkerId, cfg: &IndexConfig) -> Option<u32> {
        if let Some(&w) = self.worker_ids.get(id) {
            return Some(w);
        }
        // Blocks keep a worker index in 16 bits (retired workers hold theirs until released).
        if self.worker_ids.len() >= cfg.max_workers.min(crate::types::MAX_WORKERS)
            || !self.worker_slot_free()
        {
            return None;
        }
        let wk = Worker {
            id: id.clone(),
            engine: Vec::new(),
        };
        let idx = put(&mut self.workers, wk);
        self.worker_ids.insert(id.clone(), idx);
        self.bytes += WORKER_COST;
        Some(idx)
    }

    pub(super) fn context(
        &mut self,
        cfg: &IndexConfig,
        model: &str,
        lora: Option<&str>,
        tick: u64,
    ) -> Option<u32> {
        if let Some(&c) = self.context_ids.get(&ContextRef(model, lora)) {
            return Some(c);
        }
        let key = (model.to_owned(), lora.map(str::to_owned));
        if self.context_ids.len() >= cfg.max_contexts {
            // Make room by dropping the least recently used context.
            let (_, victim) = self
                .contexts
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (c.last_used.load(Relaxed), i)))
                .min()?;
            self.drop_context(victim as u32);
            self.stats.context_evictions += 1;
        }
        let ctx = Context::new(
            key.0.clone(),
            key.1.clone(),
            context_root(cfg.seed, model, lora),
            tick,
        );
        let idx = put(&mut self.contexts, ctx);
        self.context_ids.insert(key, idx);
        self.bytes += CONTEXT_COST;
        Some(idx)
    }

    pub(super) fn store(
        &mut self,
        cfg: &IndexConfig,
        w: u32,
        src: Source<'_>,
        s: &BlockStored,
        tick: u64,
    ) -> Applied {
        if s.group_idx.unwrap_or(0) != 0
            && s.kv_cache_spec_kind
                .as_deref()
                .is_some_and(|k| k != "full_attention")
        {
            self.stats.other_groups += 1;
            return rejected(Rejection::OtherGroup);
        }
        let tier = tier_of(s.medium.as_ref());
        if s.token_ids.is_empty() {
            return self.store_tokenless(w, s, tier);
        }
        // The adapter: its name on the event, else its id (vLLM < 0.14 sends only the id),
        // else the pod's label.
        let lora_id;
        let lora = match (&s.lora_name, s.lora_id) {
            (Some(name), _) => Some(name.as_str()),
            (None, Some(id)) => {
                lora_id = id.to_string();
                Some(lora_id.as_str())
            }
            (None, None) => src.default_lora,
        };
        let Some(c) = self.context(cfg, src.model, lora, tick) else {
            self.stats.rejected_limits += 1;
            return rejected(Rejection::ContextLimit);
        };
        let bs = s.block_size;
        if bs == 0 || s.token_ids.len() != s.block_hashes.len() * bs as usize {
            self.stats.malformed += 1;
            return rejected(Rejection::TokenCount);
        }
        {
            let ctx = self.contexts[c as usize]
                .as_mut()
                .expect("context id is live");
            match ctx.block_size {
                None => ctx.block_size = Some(bs),
                Some(cbs) if cbs == bs => {}
                Some(cbs) if bs < cbs => {
                    // A partial block (smaller than the context's): not a full block.
                    self.stats.partial_blocks += 1;
                    return Applied::default();
                }
                Some(cbs) => {
                    self.stats.block_size_mismatches += 1;
                    return rejected(Rejection::BlockSizeMismatch {
                        context: cbs,
                        event: bs,
                    });
                }
            }
            ctx.last_used.store(tick, Relaxed);
        }
        // Resolve the parent through this worker's engine hashes.
        let wk = self.workers[w as usize]
            .as_ref()
            .expect("worker id is live");
        let (mut prev_slot, mut prev_key) = match &s.parent_block_hash {
            None => (
                NIL,
                self.contexts[c as usize].as_ref().map_or(0, |x| x.root),
            ),
            Some(p) => match engine_find(&self.contexts, wk, w, p.key64()).map(unpack) {
                Some((pc, ps)) if pc == c => {
                    let ctx = self.contexts[c as usize].as_ref().expect("live");
                    (ps, ctx.slots[ps as usize].key())
                }
                _ => {
                    self.stats.orphans += 1;
                    return rejected(Rejection::Orphan);
                }
            },
        };
        // Warm the caches: ask for every block's engine-table line, then hash the whole run
        // (assuming no block is already held) while those lines arrive. Prefetches, unlike
        // loads, do not hold the hashing up: fleet prefill 8.30 -> 9.03 M blocks/s (medians
        // of 5 alternating runs against loads after the hashing). The router table holds
        // only run starts (small, probed about once per event), so not it.
        let mut chain = std::mem::take(&mut self.scratch);
        chain.clear();
        if let Some(t) = self.workers[w as usize].as_ref().and_then(|wk| wk.table(c)) {
            for h in &s.block_hashes {
                t.prefetch(h.key64() as u32);
            }
        }
        chain.extend(
            self.hasher
                .chain_iter(cfg.seed, prev_key, bs as usize, &s.token_ids),
        );
        // Whether `chain[i]` is still the router hash of block i (no re-mapped block before).
        let mut chain_intact = true;
        let mut out = Applied::default();
        for (i, (h, tokens)) in s
            .block_hashes
            .iter()
            .zip(s.token_ids.chunks_exact(bs as usize))
            .enumerate()
        {
            let ekey = h.key64();
            let wk = self.workers[w as usize]
                .as_ref()
                .expect("worker id is live");
            let mut vacancy = None;
            match engine_probe(&self.contexts, wk, w, ekey, c) {
                Err(v) => vacancy = v,
                Ok(v) => {
                    let (hc, hs) = unpack(v);
                    if hc == c {
                        // Already held: keep its router hash whatever parent the event claims.
                        let ctx = self.contexts[c as usize].as_mut().expect("live");
                        ctx.with_holder(hs, w, |t, _| *t = t.with(tier));
                        ctx.slots[hs as usize].touch();
                        out.refreshed += 1;
                        prev_slot = hs;
                        prev_key = ctx.slots[hs as usize].key();
                        chain_intact &= prev_key == chain[i];
                        continue;
                    }
                    // The same engine hash in another context: release it there first.
                    self.release(w, ekey, hc, hs);
                }
            }
            let router = if chain_intact {
                chain[i]
            } else {
                self.hasher.next(cfg.seed, prev_key, tokens)
            };
            let holder = Holder {
                worker: w,
                tiers: TierMask::only(tier),
                engine: ekey,
            };
            let ctx = self.contexts[c as usize].as_mut().expect("live");
            let slot = match ctx.locate(prev_slot, router) {
                Some(slot) => {
                    ctx.slots[slot as usize].touch();
                    let old = ctx.with_holder(slot, w, |t, e| {
                        *t = t.with(tier);
                        std::mem::replace(e, ekey)
                    });
                    match old {
                        // The same tokens under another engine hash: re-file the holder.
                        Some(old_engine) => {
                            let wk = self.workers[w as usize].as_mut().expect("live");
                            if engine_remove(wk, old_engine, pack(c, slot)) {
                                self.worker_blocks -= 1;
                                self.bytes -= ENGINE_COST;
                            }
                        }
                        None => {
                            if ctx.add_holder(slot, holder) {
                                self.blocks += 1;
                            } else {
                                self.bytes += HOLDER_COST;
                            }
                        }
                    }
                    slot
                }
                None => {
                    self.blocks += 1;
                    self.bytes += BLOCK_COST;
                    ctx.insert(router, prev_slot, holder)
                }
            };
            #[cfg(any(test, feature = "faults"))]
            self.fault_point();
            let wk = self.workers[w as usize].as_mut().expect("live");
            engine_insert(wk, ekey, c, slot, vacancy);
            self.worker_blocks += 1;
            self.bytes += ENGINE_COST;
            out.stored += 1;
            prev_slot = slot;
            prev_key = router;
        }
        self.scratch = chain;
        // Per-context block limit.
        while self.contexts[c as usize].as_ref().map_or(0, Context::used)
            > cfg.max_blocks_per_context
        {
            if !self.evict_one(c) {
                break;
            }
        }
        out
    }

    /// A token-less store (CPU/disk offload) of blocks known by engine hash.
    pub(super) fn store_tokenless(&mut self, w: u32, s: &BlockStored, tier: Tier) -> Applied {
        let mut out = Applied::default();
        for h in &s.block_hashes {
            let wk = self.workers[w as usize]
                .as_ref()
                .expect("worker id is live");
            let Some((c, slot)) = engine_find(&self.contexts, wk, w, h.key64()).map(unpack) else {
                self.stats.unknown_blocks += 1;
                out.rejected = Some(Rejection::UnknownBlock);
                continue;
            };
            let ctx = self.contexts[c as usize].as_mut().expect("live");
            ctx.with_holder(slot, w, |t, _| *t = t.with(tier));
            ctx.slots[slot as usize].touch();
            out.refreshed += 1;
        }
        out
    }

    /// Releases worker `w`'s holding of (context `c`, `slot`) filed under `ekey`.
    pub(super) fn release(&mut self, w: u32, ekey: u64, c: u32, slot: u32) {
        let wk = self.workers[w as usize].as_mut().expect("live");
        if engine_remove(wk, ekey, pack(c, slot)) {
            self.worker_blocks -= 1;
            self.bytes -= ENGINE_COST;
        }
        self.drop_holder(c, slot, w);
    }

    /// Removes `w` from a block's holders, freeing the block when it was the last.
    pub(super) fn drop_holder(&mut self, c: u32, slot: u32, w: u32) {
        let Some(ctx) = self.contexts[c as usize].as_mut() else {
            return;
        };
        let shared = ctx.slots[slot as usize].more != NIL;
        match ctx.remove_holder(slot, w) {
            (false, _) => {}
            (true, None) => {
                if shared {
                    self.bytes -= HOLDER_COST;
                }
            }
            (true, Some(freed)) => {
                self.blocks -= 1;
                self.bytes -= freed as usize * BLOCK_COST;
            }
        }
    }

    pub(super) fn remove(&mut self, w: u32, r: &BlockRemoved) -> Applied {
        let tier = tier_of(r.medium.as_ref());
        let mut out = Applied::default();
        if r.block_hashes.len() > 1 {
            // Ask for every block's engine-table line first: the misses overlap.
            let wk = self.workers[w as usize]
                .as_ref()
                .expect("worker id is live");
            for (_, t) in &wk.engine {
                for h in &r.block_hashes {
                    t.prefetch(h.key64() as u32);
                }
            }
        }
        for h in &r.block_hashes {
            let ekey = h.key64();
            let wk = self.workers[w as usize]
                .as_ref()
                .expect("worker id is live");
            let Some((c, slot)) = engine_find(&self.contexts, wk, w, ekey).map(unpack) else {
                self.stats.unknown_blocks += 1;
                out.rejected = Some(Rejection::UnknownRemoval);
                continue;
            };
            let ctx = self.contexts[c as usize].as_mut().expect("live");
            let gone = ctx
                .with_holder(slot, w, |t, _| {
                    *t = t.without(tier);
                    t.is_empty()
                })
                .unwrap_or(true);
            if gone {
                self.release(w, ekey, c, slot);
                out.removed += 1;
            }
        }
        out
    }

    /// `Index::inject_panic`'s countdown.
    #[cfg(any(test, feature = "faults"))]
    fn fault_point(&mut self) {
        match self.fault {
            Some(0) => {
                self.fault = None;
                panic!("injected fault: a store cut in the middle");
            }
            Some(n) => self.fault = Some(n - 1),
            None => {}
        }
    }

    /// Retires `worker` for good: lookups skip it at once, and `reclaim` releases its entries
    /// (then forgets it and drops the contexts left without a block). Returns what it held.
    pub(super) fn retire(&mut self, worker: &WorkerId) -> u32 {
        let Some(w) = self.worker_ids.remove(worker) else {
            return 0;
        };
        self.retired.push(Retired {
            w,
            pos: 0,
            forget: true,
        });
        self.workers[w as usize]
            .as_ref()
            .map_or(0, Worker::engine_len) as u32
    }

    pub(super) fn clear_worker(&mut self, w: u32) -> u32 {
        let Some(wk) = self.workers[w as usize].as_mut() else {
            return 0;
        };
        let entries: Vec<u64> = wk
            .engine
            .drain(..)
            .flat_map(|(c, t)| t.iter().map(move |(_, s)| pack(c, s)).collect::<Vec<_>>())
            .collect();
        self.worker_blocks -= entries.len();
        self.bytes -= entries.len() * ENGINE_COST;
        self.stats.longest_hold = self.stats.longest_hold.max(entries.len() as u64);
        for v in &entries {
            let (c, slot) = unpack(*v);
            self.drop_holder(c, slot, w);
        }
        entries.len() as u32
    }
}
