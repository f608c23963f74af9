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
mod tests;
