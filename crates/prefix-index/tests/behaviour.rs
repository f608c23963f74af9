//! Named behaviours: the two AIBrix bugs, the golden vLLM scenario through the decoder,
//! block-size checks, budgets and eviction, and readers with writers at once.

use kv_events::{decode, parse_live, BlockHash, BlockRemoved, BlockStored, Event};
use prefix_index::{Index, IndexConfig, Rejection, Source, Tier, WorkerId};
use std::path::PathBuf;
use std::sync::Arc;

const SRC: Source<'static> = Source {
    model: "llama",
    default_lora: None,
};

fn stored(parent: Option<u64>, hashes: &[u64], tokens: Vec<u32>, bs: u32) -> Event {
    Event::BlockStored(BlockStored {
        block_hashes: hashes.iter().copied().map(BlockHash::Uint).collect(),
        parent_block_hash: parent.map(BlockHash::Uint),
        token_ids: tokens,
        block_size: bs,
        ..Default::default()
    })
}

fn removed(hashes: &[u64]) -> Event {
    Event::BlockRemoved(BlockRemoved {
        block_hashes: hashes.iter().copied().map(BlockHash::Uint).collect(),
        ..Default::default()
    })
}

fn blocks_of(index: &Index, tokens: &[u32], w: &WorkerId) -> u32 {
    index
        .lookup("llama", None, tokens)
        .matches
        .iter()
        .find(|m| &m.worker == w)
        .map_or(0, |m| m.blocks)
}

/// AIBrix hashed every block of a multi-block event against the event's parent, so its
/// hashes never matched what the router computes for a query. Here a 3-block event and
/// three 1-block events of the same tokens must index the same chain.
#[test]
fn aibrix_bug_multi_block_event_chains_inside_the_event() {
    let index = Index::new(IndexConfig::default());
    let (a, b) = (WorkerId::new("a", 0), WorkerId::new("b", 0));
    let tokens: Vec<u32> = (1..=12).collect();
    index.apply(&a, SRC, &stored(None, &[11, 12, 13], tokens.clone(), 4));
    index.apply(&b, SRC, &stored(None, &[21], tokens[..4].to_vec(), 4));
    index.apply(&b, SRC, &stored(Some(21), &[22], tokens[4..8].to_vec(), 4));
    index.apply(&b, SRC, &stored(Some(22), &[23], tokens[8..].to_vec(), 4));
    let l = index.lookup("llama", None, &tokens);
    assert_eq!(l.num_blocks, 3);
    assert_eq!(blocks_of(&index, &tokens, &a), 3);
    assert_eq!(blocks_of(&index, &tokens, &b), 3);
    assert_eq!(
        index.stats().blocks,
        3,
        "both workers share the same three router blocks"
    );
}

/// AIBrix deleted a block for every pod when one pod evicted it.
#[test]
fn aibrix_bug_one_workers_removal_leaves_other_holders() {
    let index = Index::new(IndexConfig::default());
    let (a, b) = (WorkerId::new("a", 0), WorkerId::new("b", 0));
    let tokens: Vec<u32> = (1..=8).collect();
    index.apply(&a, SRC, &stored(None, &[1, 2], tokens.clone(), 4));
    index.apply(&b, SRC, &stored(None, &[1, 2], tokens.clone(), 4));
    index.apply(&a, SRC, &removed(&[2]));
    assert_eq!(blocks_of(&index, &tokens, &a), 1);
    assert_eq!(blocks_of(&index, &tokens, &b), 2);
    index.apply(&a, SRC, &removed(&[1]));
    assert_eq!(blocks_of(&index, &tokens, &a), 0);
    assert_eq!(blocks_of(&index, &tokens, &b), 2);
    assert_eq!(index.stats().blocks, 2);
    index.check_invariants();
}

#[test]
fn unknown_parent_is_an_orphan_never_a_prompt_start() {
    let index = Index::new(IndexConfig::default());
    let a = WorkerId::new("a", 0);
    let r = index.apply(&a, SRC, &stored(Some(999), &[5], vec![1, 2, 3, 4], 4));
    assert_eq!(r.rejected, Some(Rejection::Orphan));
    assert_eq!(index.stats().orphans, 1);
    assert_eq!(
        blocks_of(&index, &[1, 2, 3, 4], &a),
        0,
        "not indexed as a prompt start"
    );
}

#[test]
fn block_size_is_learned_then_checked() {
    let index = Index::new(IndexConfig::default());
    let a = WorkerId::new("a", 0);
    index.apply(&a, SRC, &stored(None, &[1], vec![1, 2, 3, 4], 4));
    let r = index.apply(&a, SRC, &stored(None, &[2], (1..=8).collect(), 8));
    assert_eq!(
        r.rejected,
        Some(Rejection::BlockSizeMismatch {
            context: 4,
            event: 8
        })
    );
    let r = index.apply(&a, SRC, &stored(None, &[3], vec![1, 2, 3], 3));
    assert_eq!(r.stored, 0, "a partial block is not a full block");
    let r = index.apply(&a, SRC, &stored(None, &[4], vec![1, 2, 3], 4));
    assert_eq!(r.rejected, Some(Rejection::TokenCount));
    let s = index.stats();
    assert_eq!(
        (s.block_size_mismatches, s.partial_blocks, s.malformed),
        (1, 1, 1)
    );
    assert_eq!(index.block_size("llama", None), Some(4));
    // The good block is untouched by the bad events.
    assert_eq!(blocks_of(&index, &[1, 2, 3, 4], &a), 1);
}

fn testdata() -> PathBuf {
    test_support::vllm_captures()
}

/// The golden scenario, applied through the decoder for every captured vLLM version.
#[test]
fn golden_scenario_through_the_decoder() {
    for name in [
        "vllm-0.9.0_signed-int-hashes.json",
        "vllm-0.10.2_int-hashes.json",
        "vllm-0.14.0_int-hashes.json",
        "vllm-0.24.0_int-hashes.json",
        "vllm-0.33.0_int-hashes.json",
        "vllm-0.33.0_bytes-hashes.json",
    ] {
        let text = std::fs::read_to_string(testdata().join(name)).expect("capture");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
        let batches: Vec<_> = doc["live"]
            .as_array()
            .expect("live")
            .iter()
            .map(|m| {
                let frames: Vec<Vec<u8>> = m["frames_hex"]
                    .as_array()
                    .expect("frames")
                    .iter()
                    .map(|f| hex::decode(f.as_str().expect("str")).expect("hex"))
                    .collect();
                decode(parse_live(&frames).expect("frames").payload).expect("decodes")
            })
            .collect();
        let w = WorkerId::new("ns/vllm-0", 0);
        // The pod's label names no adapter; batch 2 names "sql-lora" itself (>= 0.14), or
        // only lora_id 1 (older), which then names the context.
        let lora = if name.contains("0.9.0") || name.contains("0.10.2") {
            "1"
        } else {
            "sql-lora"
        };
        let index = Index::new(IndexConfig::default());
        let apply = |i: usize| {
            for e in &batches[i].events {
                index.apply(&w, SRC, e);
            }
        };
        let a: Vec<u32> = (1..=16).collect();
        let b: Vec<u32> = (1..=8).chain(201..=204).collect();
        apply(0);
        apply(1);
        assert_eq!(blocks_of(&index, &a, &w), 4, "{name}: A0..A3");
        assert_eq!(blocks_of(&index, &b, &w), 3, "{name}: B shares A0, A1");
        apply(2);
        {
            let l = index.lookup("llama", Some(lora), &a[..8]);
            assert_eq!(l.matches.len(), 1, "{name}");
            assert_eq!(l.matches[0].blocks, 2, "{name}: C0, C1 under the adapter");
        }
        apply(3);
        assert_eq!(blocks_of(&index, &a, &w), 3, "{name}: A3 removed");
        assert_eq!(blocks_of(&index, &b, &w), 2, "{name}: B2 removed");
        apply(4);
        let l = index.lookup("llama", None, &a);
        let m = &l.matches[0];
        let cpu_ok = !name.contains("0.9.0");
        assert_eq!(m.per_tier[Tier::Gpu as usize], 3, "{name}");
        assert_eq!(
            m.per_tier[Tier::Cpu as usize],
            u32::from(cpu_ok),
            "{name}: A0 also on CPU"
        );
        apply(5);
        assert_eq!(blocks_of(&index, &a, &w), 0, "{name}: cleared");
        assert!(index
            .lookup("llama", Some(lora), &a[..8])
            .matches
            .is_empty());
        apply(6);
        assert_eq!(blocks_of(&index, &a, &w), 1, "{name}: A0 again");
        let s = index.stats();
        assert_eq!((s.blocks, s.worker_blocks, s.orphans), (1, 1, 0), "{name}");
        index.check_invariants();
    }
}

#[test]
fn per_context_limit_evicts_least_recently_used_leaves_first() {
    let index = Index::new(IndexConfig::default().max_blocks_per_context(4));
    let a = WorkerId::new("a", 0);
    // Chain X: 3 blocks; chain Y: 2 blocks stored later. Limit 4 → X's leaf goes first.
    index.apply(&a, SRC, &stored(None, &[1, 2, 3], (1..=12).collect(), 4));
    let x: Vec<u32> = (1..=12).collect();
    let y: Vec<u32> = (100..108).collect();
    index.apply(&a, SRC, &stored(None, &[7, 8], y.clone(), 4));
    assert_eq!(index.stats().blocks, 4);
    assert_eq!(index.stats().evictions, 1);
    assert_eq!(
        blocks_of(&index, &x, &a),
        2,
        "X's leaf (its third block) was evicted"
    );
    assert_eq!(blocks_of(&index, &y, &a), 2);
    // Looking X up refreshes it; a new chain then evicts Y's leaf, the least recently used.
    assert_eq!(blocks_of(&index, &x, &a), 2);
    index.apply(&a, SRC, &stored(None, &[9], (200..204).collect(), 4));
    assert_eq!(blocks_of(&index, &y, &a), 1, "Y was least recently used");
    assert_eq!(blocks_of(&index, &x, &a), 2);
    index.check_invariants();
    // The evicted block's engine hash is forgotten: removing it is an unknown removal.
    let r = index.apply(&a, SRC, &removed(&[3]));
    assert_eq!(r.rejected, Some(Rejection::UnknownRemoval));
}

#[test]
fn byte_budget_is_a_hard_bound() {
    let budget = 64 * 1024;
    let index = Index::new(
        IndexConfig::default()
            .max_bytes(budget)
            .max_blocks_per_context(1 << 20),
    );
    for w in 0..4u32 {
        let wid = WorkerId::new(format!("w{w}"), 0);
        for r in 0..200u64 {
            let base = (u64::from(w) << 32) | (r << 8);
            let tokens: Vec<u32> = (0..32).map(|i| (base as u32).wrapping_add(i)).collect();
            index.apply(
                &wid,
                SRC,
                &stored(None, &[base, base + 1, base + 2, base + 3], tokens, 8),
            );
            assert!(index.stats().bytes <= budget, "{:?}", index.stats());
        }
    }
    let s = index.stats();
    assert!(s.evictions > 0);
    assert!(s.blocks > 0);
    index.check_invariants();
}

#[test]
fn context_limit_drops_the_least_recently_used_context() {
    let index = Index::new(IndexConfig::default().max_contexts(2));
    let a = WorkerId::new("a", 0);
    for m in ["m1", "m2", "m3"] {
        let src = Source {
            model: m,
            default_lora: None,
        };
        let h = m.as_bytes()[1] as u64;
        index.apply(&a, src, &stored(None, &[h], vec![1, 2, 3, 4], 4));
    }
    let s = index.stats();
    assert_eq!((s.contexts, s.context_evictions, s.blocks), (2, 1, 2));
    assert!(index.lookup("m1", None, &[1, 2, 3, 4]).matches.is_empty());
    assert_eq!(index.lookup("m3", None, &[1, 2, 3, 4]).matches.len(), 1);
    index.check_invariants();
}

/// Readers and writers together: writers apply chains and remove them; readers check on
/// every lookup that a worker's count never exceeds the chain it could hold and that
/// matches are sorted. Afterwards the invariants hold and removal empties the index.
///
/// Every writer runs the same script of events, so the blocks its worker holds after its
/// `s`-th event are known (`held[s]`). A writer counts an event as begun before it applies it
/// and as done after; a reader reads `done` before its lookup and `begun` after, so the state
/// it saw is after some event `s` in `done..=begun`, and never before the one it placed its
/// previous lookup at: what it sees for each worker must be `held[s]` for such an `s`. A block
/// seen that the worker does not hold (never stored, already removed, another worker's), or
/// one missing that was stored before the lookup began, fails the test.
#[test]
fn readers_and_writers_together_keep_invariants() {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
    const WRITERS: usize = 3;
    const READERS: usize = 2;
    const ROUNDS: u64 = 300;
    let index = Arc::new(Index::new(
        IndexConfig::default().max_blocks_per_context(1 << 20),
    ));
    let chain: Vec<u32> = (0..64).collect();
    // The script: store 16 blocks, remove the last `round % 17` one by one, clear.
    let mut held = vec![0u32];
    for round in 0..ROUNDS {
        held.push(16);
        for k in 0..(round % 17) as u32 {
            held.push(15 - k);
        }
        held.push(0);
    }
    let held = Arc::new(held);
    let begun: Arc<Vec<AtomicUsize>> =
        Arc::new((0..WRITERS).map(|_| AtomicUsize::new(0)).collect());
    let done: Arc<Vec<AtomicUsize>> = Arc::new((0..WRITERS).map(|_| AtomicUsize::new(0)).collect());
    let lookups: Arc<Vec<AtomicU64>> = Arc::new((0..READERS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    // Readers that ended (a failed check unwinds): the writers stop waiting for them.
    let exited = Arc::new(AtomicUsize::new(0));
    struct Exit(Arc<AtomicUsize>);
    impl Drop for Exit {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (index, chain) = (index.clone(), chain.clone());
            let (begun, done, lookups) = (begun.clone(), done.clone(), lookups.clone());
            let exited = exited.clone();
            std::thread::spawn(move || {
                let wid = WorkerId::new(format!("w{w}"), 0);
                let apply = |e: &Event| {
                    begun[w].fetch_add(1, SeqCst);
                    index.apply(&wid, SRC, e);
                    done[w].fetch_add(1, SeqCst);
                };
                for round in 0..ROUNDS {
                    let hashes: Vec<u64> = (0..16)
                        .map(|i| ((w as u64) << 40) | (round << 8) | i)
                        .collect();
                    apply(&stored(None, &hashes, chain.clone(), 4));
                    for h in hashes.iter().rev().take((round % 17) as usize) {
                        apply(&removed(&[*h]));
                    }
                    if round == ROUNDS - 1 {
                        // Let every reader run a whole lookup while this worker holds blocks,
                        // so no reader can pass by seeing nothing.
                        let at: Vec<u64> = lookups.iter().map(|l| l.load(SeqCst)).collect();
                        while exited.load(SeqCst) == 0
                            && lookups.iter().zip(&at).any(|(l, a)| l.load(SeqCst) < a + 2)
                        {
                            std::thread::yield_now();
                        }
                    }
                    apply(&Event::AllBlocksCleared);
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (index, chain, held) = (index.clone(), chain.clone(), held.clone());
            let (begun, done, lookups) = (begun.clone(), done.clone(), lookups.clone());
            let (stop, exit) = (stop.clone(), Exit(exited.clone()));
            std::thread::spawn(move || {
                let _exit = exit;
                let workers: Vec<WorkerId> = (0..WRITERS)
                    .map(|w| WorkerId::new(format!("w{w}"), 0))
                    .collect();
                // Per worker: the earliest event its last observed state can be after.
                let mut at = [0usize; WRITERS];
                let mut seen_blocks = 0u64;
                while !stop.load(SeqCst) {
                    let lo: Vec<usize> = done.iter().map(|d| d.load(SeqCst)).collect();
                    let l = index.lookup("llama", None, &chain);
                    let hi: Vec<usize> = begun.iter().map(|b| b.load(SeqCst)).collect();
                    lookups[r].fetch_add(1, SeqCst);
                    for m in &l.matches {
                        assert!(m.blocks >= 1 && m.blocks <= 16, "{m:?}");
                        assert!(m.per_tier[0] == m.blocks);
                    }
                    assert!(l.matches.windows(2).all(|p| p[0].blocks >= p[1].blocks));
                    for (w, wid) in workers.iter().enumerate() {
                        let got = l
                            .matches
                            .iter()
                            .find(|m| &m.worker == wid)
                            .map_or(0, |m| m.blocks);
                        let from = at[w].max(lo[w]);
                        let Some(s) = (from..=hi[w]).find(|&s| held[s] == got) else {
                            panic!(
                                "reader {r}: worker w{w} held {got} blocks, but after events \
                                 {from}..={} it holds one of {:?}",
                                hi[w],
                                &held[from..=hi[w]]
                            );
                        };
                        at[w] = s;
                        seen_blocks += u64::from(got);
                    }
                }
                seen_blocks
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, SeqCst);
    for r in readers {
        let seen_blocks = r.join().expect("reader");
        assert!(seen_blocks > 0, "a reader saw the writers' blocks");
    }
    index.check_invariants();
    let s = index.stats();
    assert_eq!(
        (s.blocks, s.worker_blocks),
        (0, 0),
        "every round ended with a clear"
    );
}

/// Only blocks that start a run are in the router index; the others are found from their
/// parent. A run cut in the middle, its slots reused by other blocks, and the rest of it
/// stored again by another worker: every block is still found, and found once.
#[test]
fn a_run_cut_in_the_middle_stays_findable() {
    let index = Index::new(IndexConfig::default());
    let (a, b) = (WorkerId::new("a", 0), WorkerId::new("b", 0));
    let tokens: Vec<u32> = (1..=24).collect();
    index.apply(
        &a,
        SRC,
        &stored(None, &[1, 2, 3, 4, 5, 6], tokens.clone(), 4),
    );
    // Remove blocks 2 and 3 (A keeps 0-1 and 4-5: 4-5 are now unreachable from the root for
    // A, but still stored; 2-3 stay as tombstones), then store another prompt.
    index.apply(&a, SRC, &removed(&[3, 4]));
    index.check_invariants();
    assert_eq!(blocks_of(&index, &tokens, &a), 2);
    let other: Vec<u32> = (100..108).collect();
    index.apply(&a, SRC, &stored(None, &[7, 8], other.clone(), 4));
    index.check_invariants();
    // B stores the whole prompt: blocks 0-1 and 4-5 are shared with A, 2-3 are new.
    index.apply(
        &b,
        SRC,
        &stored(None, &[11, 12, 13, 14, 15, 16], tokens.clone(), 4),
    );
    index.check_invariants();
    assert_eq!(
        index.stats().blocks,
        8,
        "6 blocks of the prompt + 2 of the other"
    );
    assert_eq!(blocks_of(&index, &tokens, &b), 6);
    assert_eq!(blocks_of(&index, &tokens, &a), 2);
    // A stores 2-3 again: its chain is whole once more, through B's blocks.
    index.apply(
        &a,
        SRC,
        &stored(Some(2), &[3, 4], tokens[8..16].to_vec(), 4),
    );
    index.check_invariants();
    assert_eq!(blocks_of(&index, &tokens, &a), 6);
    assert_eq!(blocks_of(&index, &other, &a), 2);
    assert_eq!(index.stats().blocks, 8);
    // B drops everything: A's blocks stay findable.
    index.remove_worker(&b);
    index.check_invariants();
    assert_eq!(blocks_of(&index, &tokens, &a), 6);
}

/// A block whose last holder goes while it has children stays as a tombstone: no worker
/// matches it, a store of the same tokens brings it back (its children still attached), and
/// it is freed with the last of its children, with every byte accounted for.
#[test]
fn a_removed_parent_is_a_tombstone_until_its_last_child_goes() {
    let index = Index::new(IndexConfig::default());
    let (a, b) = (WorkerId::new("a", 0), WorkerId::new("b", 0));
    let tokens: Vec<u32> = (1..=16).collect();
    index.apply(&a, SRC, &stored(None, &[1], tokens[..4].to_vec(), 4));
    let one_block = index.stats().bytes;
    index.apply(
        &a,
        SRC,
        &stored(Some(1), &[2, 3, 4], tokens[4..].to_vec(), 4),
    );
    // Blocks 1 and 2 go; 3 still hangs below them.
    index.apply(&a, SRC, &removed(&[2, 3]));
    index.check_invariants();
    assert_eq!(blocks_of(&index, &tokens, &a), 1);
    assert_eq!(index.stats().blocks, 2, "held: blocks 0 and 3");
    // B stores blocks 0-1: block 1 is the tombstone brought back, not a second copy.
    index.apply(&b, SRC, &stored(None, &[11, 12], tokens[..8].to_vec(), 4));
    index.check_invariants();
    assert_eq!(blocks_of(&index, &tokens, &b), 2);
    assert_eq!(index.stats().blocks, 3);
    // B stores block 2 as well: a whole chain again, A's block 3 reachable through it.
    index.apply(&b, SRC, &stored(Some(12), &[13], tokens[8..12].to_vec(), 4));
    index.check_invariants();
    assert_eq!(blocks_of(&index, &tokens, &b), 3);
    assert_eq!(index.stats().blocks, 4);
    index.apply(&b, SRC, &removed(&[13, 12]));
    index.check_invariants();
    assert_eq!(
        index.stats().blocks,
        2,
        "blocks 0 and 3; 1 and 2 are tombstones again"
    );
    // A's last block goes: the tombstones above it (2, then 1) go with it.
    index.apply(&a, SRC, &removed(&[4]));
    index.check_invariants();
    assert_eq!(index.stats().blocks, 1);
    index.apply(&b, SRC, &removed(&[11]));
    index.remove_worker(&b);
    index.check_invariants();
    assert_eq!(
        index.stats().bytes,
        one_block,
        "A's block 0 alone, as at the start: no tombstone left behind"
    );
}

/// Child counts are exact past what a block's own byte holds (255): a block with 300
/// children, removed, stays a tombstone until the 300th child goes, and then is freed.
#[test]
fn a_block_with_hundreds_of_children_counts_them_exactly() {
    let index = Index::new(IndexConfig::default());
    let a = WorkerId::new("a", 0);
    index.apply(&a, SRC, &stored(None, &[1], vec![1, 2, 3, 4], 4));
    for i in 0..300u32 {
        let h = 1000 + u64::from(i);
        index.apply(&a, SRC, &stored(Some(1), &[h], vec![9, 9, 9, i], 4));
    }
    index.apply(&a, SRC, &removed(&[1]));
    index.check_invariants();
    assert_eq!(index.stats().blocks, 300);
    for i in 0..300u32 {
        let h = 1000 + u64::from(i);
        index.apply(&a, SRC, &removed(&[h]));
        if i % 50 == 0 || i >= 298 {
            index.check_invariants();
        }
    }
    let s = index.stats();
    assert_eq!((s.blocks, s.worker_blocks), (0, 0));
    // Nothing but the worker and the context is left in the accounting.
    index.remove_worker(&a);
    assert_eq!(index.stats().bytes, 0);
}

/// Issue 19 item 7: a worker holding many blocks is cleared (as after a gap) and removed (as
/// when its pod goes) without holding the write lock for all of them at once — ingestion of
/// every other worker waits at most for one chunk — while lookups never report the worker's
/// old blocks and the index stays consistent throughout.
#[test]
fn a_big_workers_clear_and_removal_release_the_lock_between_chunks() {
    let index = Arc::new(Index::new(
        IndexConfig::default().max_blocks_per_context(1 << 20),
    ));
    let chunk = index.config().reclaim_chunk as u64;
    assert!(chunk < 20_000);
    let (big, small) = (WorkerId::new("big", 0), WorkerId::new("small", 0));
    // 200 prompts of 100 blocks (20 000 blocks); `small` shares the first block of each.
    let prompt = |p: u32| -> Vec<u32> { (0..400).map(|i| p * 1000 + i).collect() };
    let fill = |w: &WorkerId| {
        for p in 0..200u32 {
            let hashes: Vec<u64> = (0..100).map(|b| u64::from(p) * 1000 + b).collect();
            index.apply(w, SRC, &stored(None, &hashes, prompt(p), 4));
        }
    };
    fill(&big);
    for p in 0..200u32 {
        let h = u64::from(p) * 1000 + 7_000_000;
        index.apply(&small, SRC, &stored(None, &[h], prompt(p)[..4].to_vec(), 4));
    }
    assert_eq!(index.worker_blocks(&big), Some(20_000));

    // A clear (on the poller thread, in the event order): the worker's blocks vanish from
    // lookups at once; its next events apply at once.
    assert_eq!(index.clear_worker(&big), 20_000);
    assert_eq!(blocks_of(&index, &prompt(3), &big), 0);
    assert_eq!(blocks_of(&index, &prompt(3), &small), 1);
    index.apply(
        &big,
        SRC,
        &stored(None, &[9_000_001, 9_000_002], prompt(5)[..8].to_vec(), 4),
    );
    assert_eq!(blocks_of(&index, &prompt(5), &big), 2);
    index.check_invariants();
    assert!(
        index.stats().longest_hold <= chunk,
        "a clear released {} entries under one hold of the lock",
        index.stats().longest_hold
    );

    // A removal from another thread while this one looks up and checks: never a block of the
    // removed worker, and never an inconsistent index.
    fill(&big);
    let remover = {
        let (index, big) = (index.clone(), big.clone());
        std::thread::spawn(move || index.remove_worker(&big))
    };
    let mut seen = 0;
    while !remover.is_finished() {
        let p = seen % 200;
        let l = index.lookup("llama", None, &prompt(p));
        let held = l.matches.iter().find(|m| m.worker == big).map(|m| m.blocks);
        // Before the fence the worker may hold all 100 blocks; once fenced, none.
        assert!(matches!(held, None | Some(100)), "half-removed: {held:?}");
        index.check_invariants();
        seen += 1;
    }
    assert!(remover.join().expect("remover") >= 20_000);
    assert_eq!(index.worker_blocks(&big), None);
    assert_eq!(blocks_of(&index, &prompt(7), &big), 0);
    assert_eq!(index.stats().worker_blocks, 200);
    index.check_invariants();
    assert!(
        index.stats().longest_hold <= chunk,
        "a removal released {} entries under one hold of the lock",
        index.stats().longest_hold
    );
}
