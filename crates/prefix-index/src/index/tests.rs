//! Faults the property suite cannot reach from the public API: a panic in the middle of an
//! apply, and incarnations of one worker.

use super::*;
use kv_events::BlockHash;

const SRC: Source<'static> = Source {
    model: "m",
    default_lora: None,
};

/// A store of blocks `hashes` (2 tokens each, token = hash) after `parent`.
fn stored(hashes: &[u64], parent: Option<u64>) -> Event {
    Event::BlockStored(BlockStored {
        block_hashes: hashes.iter().copied().map(BlockHash::Uint).collect(),
        parent_block_hash: parent.map(BlockHash::Uint),
        token_ids: hashes.iter().flat_map(|&h| [h as u32, h as u32]).collect(),
        block_size: 2,
        ..Default::default()
    })
}

fn tokens(hashes: &[u64]) -> Vec<u32> {
    hashes.iter().flat_map(|&h| [h as u32, h as u32]).collect()
}

fn held(index: &Index, w: &WorkerId, hashes: &[u64]) -> u32 {
    index
        .lookup("m", None, &tokens(hashes))
        .matches
        .iter()
        .find(|m| &m.worker == w)
        .map_or(0, |m| m.blocks)
}

#[test]
fn a_panic_in_the_middle_of_a_store_leaves_the_index_consistent() {
    let index = Index::new(IndexConfig::default());
    let (a, b) = (WorkerId::new("a", 0), WorkerId::new("b", 0));
    index.apply(&a, SRC, &stored(&[1, 2], None));
    index.apply(&b, SRC, &stored(&[1, 2, 3], None));
    // The third block of a's next store is filed in its context, then the apply panics
    // before its engine entry: the lock (parking_lot) does not poison.
    index.inject_panic(2);
    let cut = std::panic::catch_unwind(|| index.apply(&a, SRC, &stored(&[3, 4, 5, 6], Some(2))));
    assert!(cut.is_err(), "the injected fault fired");
    index.check_invariants();
    // What `a` held is unknown after a cut apply: it holds nothing; `b` is untouched.
    assert_eq!(held(&index, &a, &[1, 2, 3, 4]), 0);
    assert_eq!(held(&index, &b, &[1, 2, 3]), 3);
    // And the index goes on: `a` stores again from the prompt start.
    index.apply(&a, SRC, &stored(&[1, 2, 3, 4], None));
    index.check_invariants();
    assert_eq!(held(&index, &a, &[1, 2, 3, 4]), 4);
    assert_eq!(index.stats().blocks, 4);
    assert_eq!(
        (index.stats().panics_repaired, index.stats().panic_resets),
        (1, 0)
    );
}

#[test]
fn a_superseded_incarnation_neither_writes_nor_removes() {
    let index = Index::new(IndexConfig::default());
    let w = WorkerId::new("p", 0);
    let old = index.claim(&w).expect("room");
    index.apply_as(&w, old, SRC, &stored(&[1, 2], None));
    assert_eq!(held(&index, &w, &[1, 2]), 2);
    // The pod comes back under the same name: what the old incarnation held is dropped.
    let new = index.claim(&w).expect("room");
    assert_eq!(held(&index, &w, &[1, 2]), 0);
    index.apply_as(&w, new, SRC, &stored(&[1, 2, 3], None));
    // The old incarnation's late writes and cleanup touch nothing of the new one's.
    let late = index.apply_as(&w, old, SRC, &stored(&[1], None));
    assert_eq!(late.rejected, Some(Rejection::Stale));
    assert_eq!(index.clear_worker_as(&w, old), 0);
    assert_eq!(index.remove_worker_as(&w, old), 0);
    assert_eq!(held(&index, &w, &[1, 2, 3]), 3);
    assert_eq!(index.stats().stale, 1);
    index.check_invariants();
    // The new one's removal is final: its writes are refused afterwards.
    assert_eq!(index.remove_worker_as(&w, new), 3);
    let after = index.apply_as(&w, new, SRC, &stored(&[1], None));
    assert_eq!(after.rejected, Some(Rejection::Stale));
    assert_eq!(index.stats().workers, 0);
    index.check_invariants();
}

#[test]
fn claims_are_bounded_by_the_worker_limit() {
    let index = Index::new(IndexConfig {
        max_workers: 2,
        ..IndexConfig::default()
    });
    let (a, b, c) = (
        WorkerId::new("a", 0),
        WorkerId::new("b", 0),
        WorkerId::new("c", 0),
    );
    let ea = index.claim(&a).expect("room");
    assert!(index.claim(&b).is_some());
    assert_eq!(index.claim(&c), None);
    assert!(
        index.claim(&a).is_some(),
        "a new incarnation of a claimed worker"
    );
    index.remove_worker_as(&a, ea);
    assert_eq!(index.stats().stale, 0);
    assert_eq!(
        index.claim(&c),
        None,
        "a's newer incarnation still holds its place"
    );
}
