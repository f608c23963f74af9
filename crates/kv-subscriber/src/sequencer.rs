//! The pure core of a subscriber: turns live and replayed messages of one publisher (one pod,
//! one data-parallel rank) into deliveries that are in seq order, each batch once, with every
//! loss said out loud. No sockets, no clocks: the shell feeds it frames and timeouts and carries
//! out the one action it asks for (a replay request).
//!
//! ```text
//!   live [topic, seq, payload] ──on_live──┐          ┌──▶ Delivery::Batch(seq, batch)  (in order, once)
//!   replay [.., seq, payload]  ──on_replay┼─▶ Sequencer ─▶ Delivery::Gap { from, to, repaired }
//!   replay end / timeout       ──────────┘          └──▶ Delivery::Restarted / Malformed
//!                                                   └──▶ Action::RequestReplay(from)
//! ```
//!
//! Rules (vLLM numbers batches from 0 at every engine start, +1 per batch, and keeps the last
//! `buffer_steps` batches for replay):
//! - seq == next: deliver. seq > next: a gap; with a replay socket, ask for `next..` and hold
//!   live messages until the replay ends, then merge (dropping what the replay delivered).
//! - seq < next: a duplicate if it lies in the range the last replay delivered and no fresh live
//!   message came since, otherwise the engine restarted (its old state is gone): `Restarted`,
//!   then learn the new engine from 0.
//! - A replay that starts later than asked (the buffer no longer reaches back), a timeout, or no
//!   replay socket: `Gap { repaired: false }` for exactly the seqs that were lost.
//! - A first replay from 0 that finds nothing (and no live batch meanwhile): the engine has
//!   published nothing, so 0 is next; a batch it publishes before our subscription reaches its
//!   PUB is then a gap the replay repairs.
//! - A reconnect may be to a restarted engine whose new seqs already passed ours (a young
//!   engine restarts quickly): seq continuity proves nothing. So a reconnect asks the replay
//!   from the last seq delivered and checks that batch is the one delivered (its length and
//!   first bytes, which carry the batch's timestamp); anything else — another batch under that
//!   seq, a later first seq, no batch at all — is a restart, learnt again from 0.
//! - Seq u64::MAX is malformed (vLLM counts from 0 and uses `0xff × 8` only for the replay end
//!   marker): counted in `bad_seqs` and skipped, so `seq + 1` never overflows nor wraps.

use kv_events::EventBatch;
use kv_events::{decode, DecodeError};
use std::collections::VecDeque;

/// What the consumer receives, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    Batch(u64, EventBatch),
    /// Seqs `from..=to` were missed. `repaired`: replay delivered all of them (already passed
    /// on as batches, before this); otherwise none of them will come.
    Gap {
        from: u64,
        to: u64,
        repaired: bool,
    },
    /// Seq went back: the engine restarted and holds nothing it held before.
    Restarted {
        last: u64,
        seq: u64,
    },
    /// A batch whose payload does not decode: counted and skipped (its events are lost).
    Malformed {
        seq: u64,
        error: DecodeError,
    },
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send a replay request from this seq, and call `on_replay_timeout` if no end marker
    /// arrives in time.
    RequestReplay(u64),
}

#[derive(Debug)]
enum Mode {
    Live,
    /// A replay from `from` is under way; live messages wait in `held`.
    Replaying {
        from: u64,
        /// The first seq received live that triggered the replay (None on the first connect).
        until: Option<u64>,
        /// The lowest seq the replay delivered (to report a buffer that no longer reaches back).
        first: Option<u64>,
        /// On a reconnect: the fingerprint of batch `from` as delivered, to be matched by the
        /// replay's first batch (None once checked).
        verify: Option<Fingerprint>,
        /// The replay turned out to come from a restarted engine: ignore it, ask again from 0.
        restart: bool,
    },
}

/// A batch's length and first bytes (the msgpack array header and the timestamp).
type Fingerprint = (usize, [u8; 24]);

fn fingerprint(payload: &[u8]) -> Fingerprint {
    let mut head = [0u8; 24];
    let n = payload.len().min(24);
    head[..n].copy_from_slice(&payload[..n]);
    (payload.len(), head)
}

/// The per-publisher sequencing state machine.
#[derive(Debug)]
pub struct Sequencer {
    replay: bool,
    /// The next seq to deliver; None before anything was delivered.
    next: Option<u64>,
    /// After a replay, live messages already in flight may repeat seqs it delivered: seqs in
    /// this range are duplicates (not a restart) until the first fresh live message.
    dups: Option<(u64, u64)>,
    /// The fingerprint of the last batch delivered (seq `next - 1`).
    last: Option<Fingerprint>,
    mode: Mode,
    held: VecDeque<(u64, Vec<u8>)>,
    max_held: usize,
    /// Bytes of payload in `held`, and their bound.
    held_bytes: usize,
    max_held_bytes: usize,
    /// Live messages dropped because `held` was full (they show up as unrepaired gaps).
    pub held_overflow: u64,
    /// Batches refused because their seq is u64::MAX (no seq can follow it; vLLM never sends
    /// it for a batch): malformed input, skipped.
    pub bad_seqs: u64,
}

impl Sequencer {
    /// `replay`: whether the publisher has a replay socket. `max_held`: live messages kept while
    /// a replay runs (the oldest are dropped past it, and reported as a gap).
    pub fn new(replay: bool, max_held: usize) -> Self {
        Sequencer {
            replay,
            next: None,
            dups: None,
            last: None,
            mode: Mode::Live,
            held: VecDeque::new(),
            max_held: max_held.max(1),
            held_bytes: 0,
            max_held_bytes: usize::MAX,
            held_overflow: 0,
            bad_seqs: 0,
        }
    }

    /// Bounds the payload bytes of the live messages held while a replay runs (the oldest are
    /// dropped past it, and reported as a gap, as past `max_held`; one message alone is held
    /// whatever its size: the socket's `max_message_bytes` bounds it).
    #[must_use]
    pub fn max_held_bytes(mut self, bytes: usize) -> Self {
        self.max_held_bytes = bytes;
        self
    }

    /// Starts at `seq` instead of 0: the first replay asks from there, and earlier seqs are
    /// not reported as missed.
    pub fn resume_at(&mut self, seq: u64) {
        self.next = Some(seq);
    }

    /// The next seq expected, if any batch was delivered.
    pub fn next_seq(&self) -> Option<u64> {
        self.next
    }

    pub fn is_replaying(&self) -> bool {
        matches!(self.mode, Mode::Replaying { .. })
    }

    /// After (re)connecting: with a replay socket, learn what the engine's buffer holds from
    /// the seq we expect (0 the first time). Subscribe before calling this (slow joiner):
    /// live messages received meanwhile are held and merged.
    pub fn on_connected(&mut self) -> Option<Action> {
        if !self.replay || self.is_replaying() {
            return None;
        }
        let (from, verify) = match (self.next, self.last) {
            (Some(n), Some(fp)) if n > 0 => (n - 1, Some(fp)),
            (n, _) => (n.unwrap_or(0), None),
        };
        self.mode = Mode::Replaying {
            from,
            until: None,
            first: None,
            verify,
            restart: false,
        };
        Some(Action::RequestReplay(from))
    }

    /// Refuses seq u64::MAX (counted in `bad_seqs`): with it, every `seq + 1` below is safe.
    /// The frame parsers refuse it already; this keeps the core sound for any caller.
    fn bad_seq(&mut self, seq: u64) -> bool {
        let bad = seq == u64::MAX;
        self.bad_seqs = self.bad_seqs.saturating_add(u64::from(bad));
        bad
    }

    /// A live message.
    pub fn on_live(&mut self, seq: u64, payload: &[u8], out: &mut Vec<Delivery>) -> Option<Action> {
        if self.bad_seq(seq) {
            return None;
        }
        if self.is_replaying() {
            self.hold(seq, payload);
            return None;
        }
        self.live(seq, payload, out, true)
    }

    fn hold(&mut self, seq: u64, payload: &[u8]) {
        while !self.held.is_empty()
            && (self.held.len() >= self.max_held
                || self.held_bytes.saturating_add(payload.len()) > self.max_held_bytes)
        {
            if let Some((_, p)) = self.held.pop_front() {
                self.held_bytes -= p.len();
            }
            self.held_overflow += 1;
        }
        self.held_bytes += payload.len();
        self.held.push_back((seq, payload.to_vec()));
    }

    /// `may_replay`: false while draining held messages after a replay (no replay loops).
    fn live(
        &mut self,
        seq: u64,
        payload: &[u8],
        out: &mut Vec<Delivery>,
        may_replay: bool,
    ) -> Option<Action> {
        let Some(next) = self.next else {
            // The very first batch without a replay socket (or after a replay that found
            // nothing but a later live batch): seqs before it were published before we
            // listened.
            if seq > 0 {
                out.push(Delivery::Gap {
                    from: 0,
                    to: seq - 1,
                    repaired: false,
                });
            }
            self.deliver(seq, payload, out);
            return None;
        };
        if seq == next {
            self.dups = None;
            self.deliver(seq, payload, out);
            return None;
        }
        if seq < next {
            if self.dups.is_some_and(|(lo, hi)| (lo..hi).contains(&seq)) {
                return None; // already delivered by the replay
            }
            out.push(Delivery::Restarted {
                last: next - 1,
                seq,
            });
            self.next = None;
            self.dups = None;
            if self.replay && may_replay {
                // Learn the new engine from its first batch; hold this one meanwhile.
                self.mode = Mode::Replaying {
                    from: 0,
                    until: Some(seq),
                    first: None,
                    verify: None,
                    restart: false,
                };
                self.hold(seq, payload);
                return Some(Action::RequestReplay(0));
            }
            return self.live(seq, payload, out, may_replay);
        }
        // seq > next: a gap.
        self.dups = None;
        if self.replay && may_replay {
            self.mode = Mode::Replaying {
                from: next,
                until: Some(seq),
                first: None,
                verify: None,
                restart: false,
            };
            self.hold(seq, payload);
            return Some(Action::RequestReplay(next));
        }
        out.push(Delivery::Gap {
            from: next,
            to: seq - 1,
            repaired: false,
        });
        self.deliver(seq, payload, out);
        None
    }

    fn deliver(&mut self, seq: u64, payload: &[u8], out: &mut Vec<Delivery>) {
        match decode(payload) {
            Ok(b) => out.push(Delivery::Batch(seq, b)),
            Err(error) => out.push(Delivery::Malformed { seq, error }),
        }
        self.next = Some(seq + 1);
        self.last = Some(fingerprint(payload));
    }

    /// One replayed batch.
    pub fn on_replay(&mut self, seq: u64, payload: &[u8], out: &mut Vec<Delivery>) {
        if self.bad_seq(seq) {
            return;
        }
        let Mode::Replaying {
            from,
            first,
            verify,
            restart,
            ..
        } = &mut self.mode
        else {
            return; // a late reply after a timeout: its batches are past
        };
        if *restart {
            return;
        }
        if let Some(fp) = verify.take() {
            if seq == *from && fingerprint(payload) == fp {
                *first = Some(seq);
                return; // the same engine: batch `from` was delivered already
            }
            *restart = true;
            out.push(Delivery::Restarted { last: *from, seq });
            self.next = None;
            self.last = None;
            self.dups = None;
            return;
        }
        let from = *from;
        if first.is_none() {
            *first = Some(seq);
        }
        let expected = self.next.map_or(from, |n| n.max(from));
        if seq < expected {
            return;
        }
        if seq > expected {
            // The buffer no longer reaches back to `expected`.
            out.push(Delivery::Gap {
                from: expected,
                to: seq - 1,
                repaired: false,
            });
        }
        self.deliver(seq, payload, out);
    }

    /// The replay's end marker. Asks for another replay (from 0) when this one showed that the
    /// engine restarted.
    pub fn on_replay_end(&mut self, out: &mut Vec<Delivery>) -> Option<Action> {
        if let Mode::Replaying {
            from,
            verify,
            restart,
            ..
        } = &mut self.mode
        {
            if verify.take().is_some() {
                // Not even the batch we delivered last: the engine's newest seq is older.
                *restart = true;
                out.push(Delivery::Restarted {
                    last: *from,
                    seq: 0,
                });
                self.next = None;
                self.last = None;
                self.dups = None;
            }
            if *restart {
                self.mode = Mode::Replaying {
                    from: 0,
                    until: None,
                    first: None,
                    verify: None,
                    restart: false,
                };
                return Some(Action::RequestReplay(0));
            }
        }
        self.finish_replay(out);
        None
    }

    /// No end marker in time: what the replay did not deliver is lost.
    pub fn on_replay_timeout(&mut self, out: &mut Vec<Delivery>) {
        self.finish_replay(out);
    }

    fn finish_replay(&mut self, out: &mut Vec<Delivery>) {
        let Mode::Replaying {
            from, until, first, ..
        } = std::mem::replace(&mut self.mode, Mode::Live)
        else {
            return;
        };
        if let Some(until) = until {
            let reached = self.next.unwrap_or(from);
            if until > from && first == Some(from) && reached >= until {
                out.push(Delivery::Gap {
                    from,
                    to: until - 1,
                    repaired: true,
                });
            }
        }
        self.dups = self.next.map(|n| (from, n));
        if self.next.is_none() && from == 0 && self.held.is_empty() {
            // A replay from 0 that found nothing and nothing live meanwhile: the engine has
            // published nothing yet, so its first batch is 0. A later first seq is then a gap
            // to replay (a batch published before our subscription reached the PUB), not
            // "published before we listened".
            self.next = Some(0);
        }
        // Merge what arrived live meanwhile: duplicates of replayed batches are dropped, holes
        // the replay did not fill are unrepaired gaps.
        while let Some((seq, payload)) = self.held.pop_front() {
            self.held_bytes -= payload.len();
            if self.next.is_none() && seq > from {
                // Nothing replayed at all: the hole is from..seq.
                out.push(Delivery::Gap {
                    from,
                    to: seq - 1,
                    repaired: false,
                });
                self.deliver(seq, &payload, out);
                continue;
            }
            self.live(seq, &payload, out, false);
        }
    }
}

#[cfg(test)]
mod tests {
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
}
