//! The Sequencer's tests: units per rule, a hostile-seq property test, fault injection.

use super::*;
use kv_events::{encode, WireFormat};

fn payload(seq: u64) -> Vec<u8> {
    let b = EventBatch {
        ts: seq as f64,
        events: Vec::new(),
        data_parallel_rank: Some(0),
    };
    encode(&b, &WireFormat::VLLM_0_33)
}

/// A batch of another engine process under the same seq (another timestamp).
fn other_payload(seq: u64) -> Vec<u8> {
    let b = EventBatch {
        ts: 1e9 + seq as f64,
        events: Vec::new(),
        data_parallel_rank: Some(0),
    };
    encode(&b, &WireFormat::VLLM_0_33)
}

#[test]
fn a_reconnect_checks_the_last_batch_before_trusting_seq_continuity() {
    // Delivered 0..=4, then the connection drops.
    let start = |s: &mut Sequencer, out: &mut Vec<Delivery>| {
        assert_eq!(s.on_connected(), Some(Action::RequestReplay(0)));
        for q in 0..5 {
            s.on_replay(q, &payload(q), out);
        }
        assert_eq!(s.on_replay_end(out), None);
    };

    // The same engine: replay from 4 starts with the batch delivered as 4; go on from 5.
    let (mut s, mut out) = (Sequencer::new(true, 16), Vec::new());
    start(&mut s, &mut out);
    assert_eq!(s.on_connected(), Some(Action::RequestReplay(4)));
    for q in 4..7 {
        s.on_replay(q, &payload(q), &mut out);
    }
    assert_eq!(s.on_replay_end(&mut out), None);
    assert_eq!(view(&out), ["0", "1", "2", "3", "4", "5", "6"]);

    // A restarted engine that already reached seq 6: its batch 4 is another one. Restart,
    // the rest of that reply ignored, learnt again from 0 (live meanwhile held and merged).
    let (mut s, mut out) = (Sequencer::new(true, 16), Vec::new());
    start(&mut s, &mut out);
    out.clear();
    assert_eq!(s.on_connected(), Some(Action::RequestReplay(4)));
    s.on_replay(4, &other_payload(4), &mut out);
    s.on_replay(5, &other_payload(5), &mut out);
    assert_eq!(s.on_live(7, &payload(7), &mut out), None);
    assert_eq!(s.on_replay_end(&mut out), Some(Action::RequestReplay(0)));
    for q in 0..7 {
        s.on_replay(q, &payload(q), &mut out);
    }
    assert_eq!(s.on_replay_end(&mut out), None);
    assert_eq!(
        view(&out),
        ["restart 4->4", "0", "1", "2", "3", "4", "5", "6", "7"]
    );

    // A restarted engine younger than seq 4: the reply holds no batch at all.
    let (mut s, mut out) = (Sequencer::new(true, 16), Vec::new());
    start(&mut s, &mut out);
    out.clear();
    assert_eq!(s.on_connected(), Some(Action::RequestReplay(4)));
    assert_eq!(s.on_replay_end(&mut out), Some(Action::RequestReplay(0)));
    s.on_replay(0, &payload(0), &mut out);
    s.on_replay(1, &payload(1), &mut out);
    assert_eq!(s.on_replay_end(&mut out), None);
    assert_eq!(view(&out), ["restart 4->0", "0", "1"]);
}

/// Compact view: batches as their seq, gaps and restarts spelled out.
fn view(out: &[Delivery]) -> Vec<String> {
    out.iter()
        .map(|d| match d {
            Delivery::Batch(s, b) => {
                assert_eq!(b.ts, *s as f64, "batch {s} carries its own payload");
                format!("{s}")
            }
            Delivery::Gap { from, to, repaired } => {
                format!(
                    "gap {from}-{to} {}",
                    if *repaired { "repaired" } else { "lost" }
                )
            }
            Delivery::Restarted { last, seq } => format!("restart {last}->{seq}"),
            Delivery::Malformed { seq, .. } => format!("malformed {seq}"),
        })
        .collect()
}

#[test]
fn in_order_without_replay() {
    let mut s = Sequencer::new(false, 16);
    let mut out = Vec::new();
    for q in 0..3 {
        assert_eq!(s.on_live(q, &payload(q), &mut out), None);
    }
    assert_eq!(view(&out), ["0", "1", "2"]);
}

#[test]
fn gap_without_replay_is_lost_and_said() {
    let mut s = Sequencer::new(false, 16);
    let mut out = Vec::new();
    s.on_live(0, &payload(0), &mut out);
    s.on_live(4, &payload(4), &mut out);
    assert_eq!(view(&out), ["0", "gap 1-3 lost", "4"]);
}

#[test]
fn late_joiner_without_replay_reports_what_it_never_saw() {
    let mut s = Sequencer::new(false, 16);
    let mut out = Vec::new();
    s.on_live(7, &payload(7), &mut out);
    assert_eq!(view(&out), ["gap 0-6 lost", "7"]);
}

#[test]
fn first_connect_replays_from_zero_and_merges_held_live() {
    let mut s = Sequencer::new(true, 16);
    let mut out = Vec::new();
    assert_eq!(s.on_connected(), Some(Action::RequestReplay(0)));
    // Live 5 and 6 arrive while the replay runs (the engine was at 4 when we joined).
    s.on_live(5, &payload(5), &mut out);
    s.on_live(6, &payload(6), &mut out);
    assert!(out.is_empty(), "held until the replay ends");
    for q in 0..=5 {
        s.on_replay(q, &payload(q), &mut out);
    }
    s.on_replay_end(&mut out);
    assert_eq!(view(&out), ["0", "1", "2", "3", "4", "5", "6"], "5 once");
    s.on_live(7, &payload(7), &mut out);
    assert_eq!(view(&out).last().map(String::as_str), Some("7"));
}

/// A replay from 0 that finds nothing means the engine has published nothing yet: its
/// first live batch should be 0, and a later one (batch 0 went out before our subscription
/// reached the PUB) is a gap to replay, not a loss from before we listened.
#[test]
fn an_empty_first_replay_expects_seq_zero_and_replays_a_missed_one() {
    let mut s = Sequencer::new(true, 16);
    let mut out = Vec::new();
    assert_eq!(s.on_connected(), Some(Action::RequestReplay(0)));
    assert_eq!(s.on_replay_end(&mut out), None);
    assert!(out.is_empty());
    assert_eq!(
        s.on_live(1, &payload(1), &mut out),
        Some(Action::RequestReplay(0))
    );
    s.on_replay(0, &payload(0), &mut out);
    s.on_replay(1, &payload(1), &mut out);
    s.on_replay_end(&mut out);
    s.on_live(2, &payload(2), &mut out);
    assert_eq!(view(&out), ["0", "1", "gap 0-0 repaired", "2"]);
}

#[test]
fn skipped_range_is_repaired_from_replay_and_live_duplicates_dropped() {
    let mut s = Sequencer::new(true, 16);
    let mut out = Vec::new();
    s.on_connected();
    s.on_replay_end(&mut out); // empty buffer
    s.on_live(0, &payload(0), &mut out);
    assert_eq!(
        s.on_live(3, &payload(3), &mut out),
        Some(Action::RequestReplay(1))
    );
    s.on_live(4, &payload(4), &mut out);
    for q in 1..=4 {
        s.on_replay(q, &payload(q), &mut out);
    }
    s.on_replay_end(&mut out);
    // A late live duplicate of a replayed batch is dropped, not taken for a restart.
    s.on_live(2, &payload(2), &mut out);
    s.on_live(5, &payload(5), &mut out);
    assert_eq!(
        view(&out),
        ["0", "1", "2", "3", "4", "gap 1-2 repaired", "5"]
    );
}

#[test]
fn range_older_than_the_buffer_is_reported_unrepaired() {
    let mut s = Sequencer::new(true, 16);
    let mut out = Vec::new();
    s.on_connected();
    s.on_replay_end(&mut out);
    s.on_live(0, &payload(0), &mut out);
    assert_eq!(
        s.on_live(20, &payload(20), &mut out),
        Some(Action::RequestReplay(1))
    );
    // The buffer holds only 15.. now.
    for q in 15..=20 {
        s.on_replay(q, &payload(q), &mut out);
    }
    s.on_replay_end(&mut out);
    assert_eq!(
        view(&out),
        ["0", "gap 1-14 lost", "15", "16", "17", "18", "19", "20"]
    );
}

#[test]
fn replay_timeout_loses_exactly_what_was_not_replayed() {
    let mut s = Sequencer::new(true, 16);
    let mut out = Vec::new();
    s.on_connected();
    s.on_replay_end(&mut out);
    s.on_live(0, &payload(0), &mut out);
    s.on_live(5, &payload(5), &mut out);
    s.on_replay(1, &payload(1), &mut out);
    s.on_replay(2, &payload(2), &mut out);
    s.on_replay_timeout(&mut out);
    // A reply that straggles in after the timeout is ignored.
    s.on_replay(3, &payload(3), &mut out);
    assert_eq!(view(&out), ["0", "1", "2", "gap 3-4 lost", "5"]);
}

#[test]
fn restart_is_reported_and_the_new_engine_learned_from_zero() {
    let mut s = Sequencer::new(true, 16);
    let mut out = Vec::new();
    s.on_connected();
    for q in 0..3 {
        s.on_replay(q, &payload(q), &mut out);
    }
    s.on_replay_end(&mut out);
    s.on_live(3, &payload(3), &mut out);
    // The engine restarted; we see its seq 2 first.
    assert_eq!(
        s.on_live(2, &payload(2), &mut out),
        Some(Action::RequestReplay(0))
    );
    for q in 0..=2 {
        s.on_replay(q, &payload(q), &mut out);
    }
    s.on_replay_end(&mut out);
    // The new engine's 0..=1, missed live, came back through replay.
    assert_eq!(
        view(&out),
        [
            "0",
            "1",
            "2",
            "3",
            "restart 3->2",
            "0",
            "1",
            "2",
            "gap 0-1 repaired"
        ]
    );
}

#[test]
fn restart_without_replay() {
    let mut s = Sequencer::new(false, 16);
    let mut out = Vec::new();
    for q in 0..5 {
        s.on_live(q, &payload(q), &mut out);
    }
    s.on_live(1, &payload(1), &mut out);
    assert_eq!(
        view(&out),
        ["0", "1", "2", "3", "4", "restart 4->1", "gap 0-0 lost", "1"]
    );
}

#[test]
fn malformed_payload_is_counted_skipped_and_seq_advances() {
    let mut s = Sequencer::new(false, 16);
    let mut out = Vec::new();
    s.on_live(0, &payload(0), &mut out);
    s.on_live(1, b"\xc1garbage", &mut out);
    s.on_live(2, &payload(2), &mut out);
    assert_eq!(view(&out), ["0", "malformed 1", "2"]);
}

#[test]
fn held_messages_are_bounded_and_overflow_is_a_gap() {
    let mut s = Sequencer::new(true, 2);
    let mut out = Vec::new();
    s.on_connected();
    for q in 0..4 {
        s.on_live(q, &payload(q), &mut out);
    }
    assert_eq!(s.held_overflow, 2);
    s.on_replay_end(&mut out); // the engine had nothing buffered before 0
    assert_eq!(view(&out), ["gap 0-1 lost", "2", "3"]);
}

/// vLLM never numbers a batch u64::MAX (its seqs count from 0; 0xff × 8 is the replay end
/// marker's): such a seq, live or replayed, is malformed input. It is counted and skipped,
/// and neither panics (`seq + 1` in a debug build) nor wraps `next` to 0 (release), which
/// would take every later batch for a restart.
#[test]
fn a_seq_of_u64_max_is_counted_and_skipped_live_and_replayed() {
    for replay in [false, true] {
        let mut s = Sequencer::new(replay, 16);
        let mut out = Vec::new();
        if replay {
            s.on_connected();
            s.on_replay_end(&mut out);
        }
        s.on_live(0, &payload(0), &mut out);
        assert_eq!(s.on_live(u64::MAX, &payload(1), &mut out), None);
        s.on_live(1, &payload(1), &mut out);
        assert_eq!(view(&out), ["0", "1"], "replay {replay}");
        assert_eq!(s.bad_seqs, 1);
        assert_eq!(s.next_seq(), Some(2));
    }
    // Replayed: a gap 1..=2 asks for a replay, which carries u64::MAX among real batches.
    let mut s = Sequencer::new(true, 16);
    let mut out = Vec::new();
    s.on_connected();
    s.on_replay_end(&mut out);
    s.on_live(0, &payload(0), &mut out);
    assert_eq!(
        s.on_live(3, &payload(3), &mut out),
        Some(Action::RequestReplay(1))
    );
    s.on_replay(1, &payload(1), &mut out);
    s.on_replay(u64::MAX, &payload(2), &mut out);
    s.on_replay(2, &payload(2), &mut out);
    s.on_replay(3, &payload(3), &mut out);
    s.on_replay_end(&mut out);
    assert_eq!(view(&out), ["0", "1", "2", "3", "gap 1-2 repaired"]);
    assert_eq!(s.bad_seqs, 1);
    // The highest seq vLLM could send is delivered, and nothing follows it.
    let mut s = Sequencer::new(false, 16);
    let mut out = Vec::new();
    s.on_live(u64::MAX - 1, &payload(0), &mut out);
    s.on_live(u64::MAX, &payload(0), &mut out);
    assert_eq!(s.next_seq(), Some(u64::MAX));
    assert_eq!(s.bad_seqs, 1);
    assert!(matches!(
        out.as_slice(),
        [Delivery::Gap { from: 0, to, repaired: false }, Delivery::Batch(q, _)]
            if *to == u64::MAX - 2 && *q == u64::MAX - 1
    ));
}

/// Any wire seqs in any order, near 0 and near u64::MAX, through every entry point: never
/// a panic (debug builds check overflow), never a batch under u64::MAX, gaps well formed.
mod hostile_seqs {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Connected,
        Live(u64),
        Replay(u64),
        End,
        Timeout,
    }

    fn seq() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..4, (u64::MAX - 3)..=u64::MAX, any::<u64>()]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Connected),
            seq().prop_map(Op::Live),
            seq().prop_map(Op::Replay),
            Just(Op::End),
            Just(Op::Timeout),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn any_wire_seq_is_handled_without_overflow(
            replay in any::<bool>(),
            resume in proptest::option::of(seq()),
            ops in proptest::collection::vec(op(), 1..24),
        ) {
            let mut s = Sequencer::new(replay, 4);
            if let Some(n) = resume {
                s.resume_at(n);
            }
            let mut out = Vec::new();
            for op in ops {
                match op {
                    Op::Connected => {
                        s.on_connected();
                    }
                    Op::Live(q) => {
                        s.on_live(q, &payload(0), &mut out);
                    }
                    Op::Replay(q) => s.on_replay(q, &payload(0), &mut out),
                    Op::End => {
                        s.on_replay_end(&mut out);
                    }
                    Op::Timeout => s.on_replay_timeout(&mut out),
                }
            }
            for d in &out {
                match d {
                    Delivery::Batch(q, _) => prop_assert!(*q != u64::MAX),
                    Delivery::Gap { from, to, .. } => prop_assert!(from <= to && *to != u64::MAX, "{:?}", d),
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn held_bytes_are_bounded_and_overflow_is_a_gap() {
    let size = payload(0).len();
    let mut s = Sequencer::new(true, 100).max_held_bytes(2 * size);
    let mut out = Vec::new();
    s.on_connected();
    for q in 0..4 {
        s.on_live(q, &payload(q), &mut out);
    }
    assert_eq!(s.held_overflow, 2);
    s.on_replay_end(&mut out); // the engine had nothing buffered before 0
    assert_eq!(view(&out), ["gap 0-1 lost", "2", "3"]);
}

/// Fault injection: a publisher whose live messages are dropped at random, with a replay
/// buffer of `buf` batches that answers after a random delay or never (timeout). Whatever
/// happens, the deliveries are strictly increasing, no batch twice, and every seq up to the
/// last delivered is either delivered or inside exactly one unrepaired gap.
mod faults {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn every_seq_is_delivered_once_or_reported_lost(
            n in 1u64..80,
            drops in proptest::collection::vec(any::<bool>(), 80),
            buf in 1usize..40,
            delay in 0usize..5,
            timeouts in proptest::collection::vec(proptest::bool::weighted(0.2), 20),
            replay in any::<bool>(),
        ) {
            let mut s = Sequencer::new(replay, 8);
            let mut out = Vec::new();
            let mut pending: Option<(u64, usize)> = None; // (from, messages until answered)
            let mut replies = 0usize;
            let mut published: Vec<u64> = Vec::new();
            let answer = |s: &mut Sequencer, from: u64, published: &[u64], out: &mut Vec<Delivery>, timeout: bool| {
                if timeout {
                    s.on_replay_timeout(out);
                    return;
                }
                let start = published.len().saturating_sub(buf);
                for &q in published[start..].iter().filter(|&&q| q >= from) {
                    s.on_replay(q, &payload(q), out);
                }
                s.on_replay_end(out);
            };
            if let Some(Action::RequestReplay(from)) = s.on_connected() {
                pending = Some((from, delay));
            }
            for q in 0..n {
                published.push(q);
                if !drops[q as usize] || q == n - 1 {
                    if let Some(Action::RequestReplay(from)) = s.on_live(q, &payload(q), &mut out) {
                        prop_assert!(pending.is_none(), "one replay at a time");
                        pending = Some((from, delay));
                    }
                }
                if let Some((from, left)) = pending {
                    if left == 0 {
                        pending = None;
                        let t = timeouts[replies % timeouts.len()];
                        replies += 1;
                        answer(&mut s, from, &published, &mut out, t);
                    } else {
                        pending = Some((from, left - 1));
                    }
                }
            }
            if let Some((from, _)) = pending {
                answer(&mut s, from, &published, &mut out, false);
            }
            let mut covered = vec![0u32; n as usize];
            let mut last: Option<u64> = None;
            for d in &out {
                match d {
                    Delivery::Batch(q, _) => {
                        prop_assert!(last.is_none_or(|l| *q > l), "in order, once: {:?}", view(&out));
                        last = Some(*q);
                        covered[*q as usize] += 1;
                    }
                    Delivery::Gap { from, to, repaired: false } => {
                        for q in *from..=*to {
                            covered[q as usize] += 1;
                        }
                    }
                    Delivery::Gap { repaired: true, .. } => {}
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(last, Some(n - 1), "the last batch (never dropped) arrives");
            prop_assert!(covered.iter().all(|&c| c == 1), "{:?} -> {:?}", covered, view(&out));
        }
    }
}
