//! The block pool's event stream for scripted requests, written from vLLM's documented block
//! pool semantics (`vllm/v1/core/block_pool.py`, `kv_cache_manager.py`), and a property test:
//! replaying the events always gives exactly the hashes the pool holds.

use engine_sim::{BlockPool, HashForm, Lora};
use kv_events::{BlockHash, BlockRemoved, BlockStored, Event, Medium};
use proptest::prelude::*;
use std::collections::HashMap;

const BS: usize = 4;

fn stored(hashes: Vec<BlockHash>, parent: Option<BlockHash>, tokens: &[u32]) -> Event {
    Event::BlockStored(BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens.to_vec(),
        block_size: BS as u32,
        medium: Some(Medium::Gpu),
        ..Default::default()
    })
}

fn removed(h: BlockHash) -> Event {
    Event::BlockRemoved(BlockRemoved {
        block_hashes: vec![h],
        medium: Some(Medium::Gpu),
        ..Default::default()
    })
}

fn ext(pool: &mut BlockPool, tokens: &[u32]) -> Vec<BlockHash> {
    let form = pool.hash_form();
    pool.block_hashes(tokens, None)
        .iter()
        .map(|h| form.external(h))
        .collect()
}

fn seq(from: u32, n: u32) -> Vec<u32> {
    (from..from + n).collect()
}

#[test]
fn scripted_requests_emit_what_vllm_emits() {
    // 6 blocks: the null block and 5 free, in order [1, 2, 3, 4, 5].
    let mut pool = BlockPool::new(6, BS, 7, HashForm::Int);
    let a: Vec<u32> = seq(100, 10);
    let ha = ext(&mut pool, &[a.clone(), vec![900, 901]].concat());

    // A: 10 prompt tokens → 3 blocks (1, 2, 3); the 2 full ones stored from the prompt start.
    let mut ra = pool.start(&a, None).expect("room");
    assert_eq!(ra.hit_tokens, 0);
    assert_eq!(
        pool.take_events(),
        vec![stored(ha[..2].to_vec(), None, &a[..8])]
    );
    // Decoding fills block 3: one store with its parent.
    pool.append(&mut ra, 900).expect("room");
    assert_eq!(pool.take_events(), vec![]);
    pool.append(&mut ra, 901).expect("room");
    assert_eq!(
        pool.take_events(),
        vec![stored(vec![ha[2]], Some(ha[1]), &[108, 109, 900, 901])]
    );
    // Released tail first: free queue [4, 5, 3, 2, 1].
    pool.finish(ra);
    pool.check();

    // B shares A's first 8 tokens: 2 blocks hit (touched), 2 new blocks (4, 5), the third
    // block stored under A's second.
    let b: Vec<u32> = [&a[..8], &seq(200, 6)[..]].concat();
    let hb = ext(&mut pool, &b);
    assert_eq!(hb[..2], ha[..2]);
    let rb = pool.start(&b, None).expect("room");
    assert_eq!(rb.hit_tokens, 8);
    assert_eq!(
        pool.take_events(),
        vec![stored(vec![hb[2]], Some(ha[1]), &b[8..12])]
    );
    // Free queue [3, 5, 4, 2, 1].
    pool.finish(rb);
    pool.check();

    // C (unrelated, 9 tokens) takes 3 blocks from the head: 3 (A's third: removed), 5
    // (partial, no hash), 4 (B's third: removed); one event per evicted block, then the store.
    let c = seq(300, 9);
    let hc = ext(&mut pool, &c);
    let rc = pool.start(&c, None).expect("room");
    assert_eq!(
        pool.take_events(),
        vec![
            removed(ha[2]),
            removed(hb[2]),
            stored(hc[..2].to_vec(), None, &c[..8])
        ]
    );
    // Free queue [2, 1, 4, 5, 3].
    pool.finish(rc);

    // A fully cached, block-aligned prompt hits all but its last block (vLLM recomputes the
    // last token): block 1 touched; the new block is 2 — the very block holding A's second
    // hash — so it is removed and stored again.
    let a8 = a[..8].to_vec();
    assert_eq!(pool.peek_hit_tokens(&a8, None), 4);
    assert_eq!(pool.cached_prefix_blocks(&a8, None), 2);
    let r = pool.start(&a8, None).expect("room");
    assert_eq!(r.hit_tokens, 4);
    assert_eq!(
        pool.take_events(),
        vec![removed(ha[1]), stored(vec![ha[1]], Some(ha[0]), &a8[4..])]
    );
    pool.finish(r);
    pool.check();

    // No room: nothing changes, nothing is announced.
    let big = seq(1000, 40);
    assert!(pool.start(&big, None).is_err());
    assert_eq!(pool.take_events(), vec![]);
    pool.check();

    // reset_prefix_cache: refused while a request runs, then everything is cleared.
    let r = pool.start(&c, None).expect("room");
    pool.take_events();
    assert!(!pool.reset());
    pool.finish(r);
    assert!(pool.reset());
    assert_eq!(pool.take_events(), vec![Event::AllBlocksCleared]);
    assert_eq!(pool.cached_blocks(), 0);
    pool.check();
}

#[test]
fn a_recomputed_last_block_is_a_second_copy_whose_removal_is_announced() {
    // 8 blocks: free [1..7].
    let mut pool = BlockPool::new(8, BS, 1, HashForm::Int);
    let x = seq(10, 8);
    let hx = ext(&mut pool, &x);
    let r = pool.start(&x, None).expect("room");
    pool.finish(r); // free [3, 4, 5, 6, 7, 2, 1]
    pool.take_events();
    // Again: block 1 hit, block 3 recomputes the second block: two blocks carry hx[1].
    let r = pool.start(&x, None).expect("room");
    assert_eq!(
        pool.take_events(),
        vec![stored(vec![hx[1]], Some(hx[0]), &x[4..])]
    );
    pool.finish(r); // free [4, 5, 6, 7, 2, 3, 1]
    assert_eq!(pool.cached_blocks(), 3);
    // 20 unrelated tokens take 4, 5, 6, 7 and 2: the first copy of hx[1] is evicted and
    // announced, while block 3 still holds it.
    let y = seq(500, 20);
    let hy = ext(&mut pool, &y);
    let r = pool.start(&y, None).expect("room");
    assert_eq!(
        pool.take_events(),
        vec![removed(hx[1]), stored(hy, None, &y)]
    );
    assert_eq!(pool.cached_prefix_blocks(&x, None), 2);
    pool.finish(r);
    pool.check();
}

/// The scheduler's path (vLLM's `allocate_slots`): blocks come chunk by chunk, each chunk's
/// full blocks stored with the previous chunk's last block as parent, a decode token's block
/// stored when the step that computes its last token is scheduled; the same hashes as the
/// one-shot path. A preempted request frees tail first and finds its prefix again.
#[test]
fn chunked_allocation_stores_block_by_chunk_and_preemption_frees() {
    let mut pool = BlockPool::new(12, BS, 0, HashForm::Int);
    let p = seq(10, 18);
    let h = ext(&mut pool, &p);
    let mut r = pool.request(&p, None);
    assert_eq!((r.num_blocks(), pool.pending_events()), (0, 0));
    assert!(pool.computed_blocks(&r).is_empty());
    // Chunk 1: tokens 0..6 → 2 blocks, 1 full.
    pool.allocate_slots(&mut r, &[], 0, 6).expect("room");
    assert_eq!(pool.take_events(), vec![stored(vec![h[0]], None, &p[..4])]);
    // Chunk 2: tokens 6..18 → 5 blocks, full up to 16.
    pool.allocate_slots(&mut r, &[], 6, 12).expect("room");
    assert_eq!(
        pool.take_events(),
        vec![stored(h[1..4].to_vec(), Some(h[0]), &p[4..16])]
    );
    assert_eq!(r.num_blocks(), 5);
    // Decode: two sampled tokens fill block 4 (tokens 16..20); it is stored when the step
    // computing token 19 is scheduled.
    pool.push_token(&mut r, 900);
    pool.allocate_slots(&mut r, &[], 18, 1).expect("room");
    assert_eq!(pool.take_events(), vec![]);
    pool.push_token(&mut r, 901);
    pool.allocate_slots(&mut r, &[], 19, 1).expect("room");
    let full = [&p[..], &[900, 901]].concat();
    let hf = ext(&mut pool, &full);
    assert_eq!(hf[..4], h[..]);
    assert_eq!(
        pool.take_events(),
        vec![stored(vec![hf[4]], Some(h[3]), &full[16..20])]
    );
    // Not enough room: nothing changes.
    let free = pool.free_blocks();
    let err = pool
        .allocate_slots(&mut r, &[], 20, 40)
        .expect_err("too many");
    assert_eq!((err.free, pool.free_blocks()), (free, free));
    // Preempted: freed, then readmitted with its five full blocks as the hit (never its last
    // token's block).
    pool.free(&mut r);
    pool.check();
    assert_eq!(pool.free_blocks(), 11);
    let hit = pool.computed_blocks(&r);
    assert_eq!(
        hit.len(),
        4,
        "20 tokens: the hit stops before the last token's block"
    );
    pool.allocate_slots(&mut r, &hit, 16, 4).expect("room");
    assert_eq!(
        pool.take_events(),
        vec![stored(vec![hf[4]], Some(h[3]), &full[16..20])],
        "the recomputed last block is stored again"
    );
    pool.free(&mut r);
    pool.check();
}

#[test]
fn hashes_depend_on_seed_lora_and_form() {
    let t = seq(0, 8);
    let lora = Lora {
        id: 3,
        name: "sql".into(),
        path: "/adapters/sql".into(),
    };
    let mut p1 = BlockPool::new(4, BS, 1, HashForm::Int);
    let mut p2 = BlockPool::new(4, BS, 2, HashForm::Bytes);
    let h1 = p1.block_hashes(&t, None);
    assert_ne!(h1, p2.block_hashes(&t, None), "per-process seed");
    assert_ne!(
        h1,
        p1.block_hashes(&t, Some(&lora)),
        "the adapter is in the hash"
    );
    // Int form: the last 8 bytes, big-endian (vLLM's maybe_convert_block_hash).
    let mut last = [0u8; 8];
    last.copy_from_slice(&h1[0].0[24..]);
    assert_eq!(
        HashForm::Int.external(&h1[0]),
        BlockHash::Uint(u64::from_be_bytes(last))
    );
    match HashForm::Bytes.external(&h1[0]) {
        BlockHash::Bytes(b) => assert_eq!(b.as_slice(), &h1[0].0),
        other => panic!("bytes form gave {other:?}"),
    }
    // A LoRA request's stores name the adapter.
    let r = p1.start(&t, Some(lora)).expect("room");
    match &p1.take_events()[..] {
        [Event::BlockStored(s)] => {
            assert_eq!((s.lora_id, s.lora_name.as_deref()), (Some(3), Some("sql")));
        }
        other => panic!("{other:?}"),
    }
    p1.finish(r);
}

#[derive(Debug, Clone)]
enum Op {
    Start {
        prefix: usize,
        len: usize,
        lora: bool,
    },
    Decode {
        req: usize,
        n: usize,
    },
    Finish {
        req: usize,
    },
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..4, 1usize..40, any::<bool>()).prop_map(|(prefix, len, lora)| Op::Start { prefix, len, lora }),
        3 => (0usize..4, 1usize..10).prop_map(|(req, n)| Op::Decode { req, n }),
        3 => (0usize..4).prop_map(|req| Op::Finish { req }),
        1 => Just(Op::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever runs, the events tell the truth: replaying them (stores +1 per hash, removals
    /// −1, clears to empty) gives exactly the hashes the pool's blocks carry, every store's
    /// parent is held when it is announced, and a request's hit is the cached prefix it found.
    #[test]
    fn events_replay_to_the_pools_contents(ops in prop::collection::vec(op(), 1..60)) {
        let mut pool = BlockPool::new(24, BS, 5, HashForm::Int);
        let prefixes: Vec<Vec<u32>> = (0..4).map(|i| seq(i * 1000, 12)).collect();
        let lora = Lora {
            id: 1,
            name: "a".into(),
            path: "/a".into(),
        };
        let mut running = Vec::new();
        let mut held: HashMap<BlockHash, i64> = HashMap::new();
        let mut fresh = 50_000u32;
        for op in ops {
            match op {
                Op::Start { prefix, len, lora: l } => {
                    let mut p = prefixes[prefix].clone();
                    p.extend(seq(fresh, len as u32));
                    fresh += len as u32;
                    let lr = l.then(|| lora.clone());
                    let want = pool.peek_hit_tokens(&p, lr.as_ref());
                    if let Ok(r) = pool.start(&p, lr) {
                        prop_assert_eq!(r.hit_tokens, want);
                        running.push(r);
                    }
                }
                Op::Decode { req, n } => {
                    if let Some(r) = running.get_mut(req) {
                        for _ in 0..n {
                            fresh += 1;
                            if pool.append(r, fresh).is_err() { break; }
                        }
                    }
                }
                Op::Finish { req } => {
                    if req < running.len() {
                        pool.finish(running.swap_remove(req));
                    }
                }
                Op::Reset => { pool.reset(); }
            }
            for e in pool.take_events() {
                match e {
                    Event::BlockStored(s) => {
                        if let Some(p) = &s.parent_block_hash {
                            prop_assert!(held.get(p).copied().unwrap_or(0) > 0, "parent announced");
                        }
                        prop_assert_eq!(s.token_ids.len(), s.block_hashes.len() * BS);
                        for h in s.block_hashes { *held.entry(h).or_default() += 1; }
                    }
                    Event::BlockRemoved(r) => {
                        for h in r.block_hashes {
                            let c = held.entry(h).or_default();
                            *c -= 1;
                            prop_assert!(*c >= 0, "removal of an unannounced hash");
                        }
                    }
                    Event::AllBlocksCleared => held.clear(),
                }
            }
            held.retain(|_, c| *c > 0);
            pool.check();
            prop_assert_eq!(held.values().sum::<i64>() as usize, pool.cached_blocks());
        }
    }
}
