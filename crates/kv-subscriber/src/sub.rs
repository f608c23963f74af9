//! One subscriber's sockets and state on the poller thread: opening and watching its SUB,
//! replay DEALER and monitor, reading them, running its [`Sequencer`], and flushing what it
//! produced to its sink.

use crate::sequencer::{Action, Delivery, Sequencer};
use crate::subscription::{
    Sink, SubscriberConfig, SubscriberCounters, SubscriberEvent, SubscriberState,
};
use kv_events::frames::{parse_live, parse_replay, replay_request, ReplayMessage};
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tmpsc;

/// Which of a subscriber's sockets to read (bits of `Sub::dirty`, and its epoll token's kind).
pub(crate) const LIVE: u8 = 1;
pub(crate) const REPLAY: u8 = 2;
pub(crate) const MONITOR: u8 = 4;
/// Most messages read from one socket before the others get a turn.
const READ_BURST: usize = 256;

/// How long after a disconnect libzmq has to say it retries before the connection is taken
/// for given up (it schedules the retry at once; the events arrive together).
pub(crate) const GIVE_UP_GRACE: Duration = Duration::from_secs(1);

/// A subscriber socket's epoll token: `id << 2 | kind` (the wake socket's is `usize::MAX`).
pub(crate) fn token(id: u64, kind: u8) -> mio::Token {
    // Ids count up from 1: far below 2^62.
    mio::Token(((id as usize) << 2) | usize::from(kind.trailing_zeros() as u8))
}

pub(crate) struct Sockets {
    pub(crate) sub: zmq::Socket,
    pub(crate) dealer: Option<zmq::Socket>,
    pub(crate) monitor: zmq::Socket,
}

pub(crate) struct Sub {
    pub(crate) id: u64,
    pub(crate) counters: Arc<SubscriberCounters>,
    /// Index of its context in `Poller::contexts`.
    pub(crate) context: usize,
    pub(crate) cfg: SubscriberConfig,
    pub(crate) sink: Sink,
    pub(crate) sockets: Option<Sockets>,
    pub(crate) generation: u64,
    pub(crate) seq: Sequencer,
    pub(crate) state: SubscriberState,
    pub(crate) connected: bool,
    pub(crate) outbox: VecDeque<SubscriberEvent>,
    pub(crate) replay_deadline: Option<Instant>,
    /// When to replay once more after a connect if no live message has come by then
    /// (`SubscriberConfig::catch_up_after`).
    pub(crate) catch_up_at: Option<Instant>,
    pub(crate) last_message: Instant,
    pub(crate) reopen_at: Option<Instant>,
    /// Set at a disconnect, cleared when libzmq says it retries (or reconnects): past it,
    /// libzmq gave the connection up (it does after a protocol error, such as a frame over
    /// `max_message_bytes`), and the sockets are reopened.
    pub(crate) given_up_at: Option<Instant>,
    pub(crate) attempt: u32,
    pub(crate) closed: bool,
    /// Sockets to read before the next sleep (`LIVE`, `REPLAY`, `MONITOR`): flagged by epoll
    /// or by our own use of them, until libzmq has nothing more to give.
    pub(crate) dirty: u8,
}

impl Sub {
    pub(crate) fn open(&mut self, ctx: &zmq::Context, registry: &mio::Registry) {
        self.generation += 1;
        match self
            .try_open(ctx)
            .and_then(|k| self.watch(&k, registry).map(|()| k))
        {
            Ok(k) => {
                self.sockets = Some(k);
                // Look at every socket once: anything already there raised no edge for us.
                self.dirty = LIVE | REPLAY | MONITOR;
                self.set_state(SubscriberState::Connecting);
            }
            Err(e) => {
                tracing::warn!(subscriber = %self.cfg.name, error = %e, "cannot open sockets");
                self.reopen_at = Some(Instant::now() + self.cfg.backoff.delay(self.attempt, 0));
                self.attempt = self.attempt.saturating_add(1);
                self.set_state(SubscriberState::BackingOff);
            }
        }
    }

    fn open_dealer(&self, ctx: &zmq::Context, endpoint: &str) -> Result<zmq::Socket, zmq::Error> {
        let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        let d = ctx.socket(zmq::DEALER)?;
        d.set_linger(0)?;
        d.set_maxmsgsize(i64::try_from(self.cfg.max_message_bytes).unwrap_or(i64::MAX))?;
        d.set_reconnect_ivl(ms(self.cfg.backoff.start))?;
        d.set_reconnect_ivl_max(ms(self.cfg.backoff.cap))?;
        d.connect(endpoint)?;
        Ok(d)
    }

    /// After a replay timed out: a new replay DEALER. libzmq drops a DEALER's connection for
    /// good when a reply frame is over `max_message_bytes` (as the SUB's, which the monitor
    /// sees; the DEALER has none), and the next replays would all time out. The old socket's
    /// late replies go with it.
    pub(crate) fn reopen_dealer(&mut self, ctx: &zmq::Context, registry: &mio::Registry) {
        let Some(ep) = self.cfg.replay_endpoint.clone() else {
            return;
        };
        if self.sockets.is_none() {
            return;
        }
        let opened = self.open_dealer(ctx, &ep).and_then(|d| {
            let fd = d.get_fd()?;
            registry
                .register(
                    &mut mio::unix::SourceFd(&fd),
                    token(self.id, REPLAY),
                    mio::Interest::READABLE,
                )
                .map_err(|_| zmq::Error::EINVAL)?;
            Ok(d)
        });
        match opened {
            Ok(d) => {
                if let Some(k) = self.sockets.as_mut() {
                    // The old socket's fd leaves epoll as it closes.
                    k.dealer = Some(d);
                }
                self.dirty |= REPLAY;
            }
            Err(e) => {
                tracing::warn!(subscriber = %self.cfg.name, error = %e, "cannot reopen the replay socket")
            }
        }
    }

    pub(crate) fn try_open(&self, ctx: &zmq::Context) -> Result<Sockets, zmq::Error> {
        let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        let sub = ctx.socket(zmq::SUB)?;
        sub.set_linger(0)?;
        // A larger frame makes libzmq drop the connection rather than allocate it.
        sub.set_maxmsgsize(i64::try_from(self.cfg.max_message_bytes).unwrap_or(i64::MAX))?;
        sub.set_reconnect_ivl(ms(self.cfg.backoff.start))?;
        sub.set_reconnect_ivl_max(ms(self.cfg.backoff.cap))?;
        sub.set_heartbeat_ivl(ms(self.cfg.heartbeat))?;
        sub.set_heartbeat_timeout(ms(self.cfg.heartbeat * 5))?;
        sub.set_subscribe(&self.cfg.topic)?;
        let mon = format!("inproc://kv-events-mon-{}-{}", self.id, self.generation);
        sub.monitor(
            &mon,
            (zmq::SocketEvent::CONNECTED as i32)
                | (zmq::SocketEvent::DISCONNECTED as i32)
                | (zmq::SocketEvent::CONNECT_RETRIED as i32),
        )?;
        let monitor = ctx.socket(zmq::PAIR)?;
        monitor.connect(&mon)?;
        sub.connect(&self.cfg.endpoint)?;
        let dealer = match &self.cfg.replay_endpoint {
            Some(ep) => Some(self.open_dealer(ctx, ep)?),
            None => None,
        };
        Ok(Sockets {
            sub,
            dealer,
            monitor,
        })
    }

    /// Registers the sockets' `ZMQ_FD`s with epoll. (Closing a socket closes its fd, which
    /// leaves epoll by itself; a late event for it only flags sockets to look at.)
    pub(crate) fn watch(&self, k: &Sockets, registry: &mio::Registry) -> Result<(), zmq::Error> {
        let add = |sock: &zmq::Socket, kind: u8| -> Result<(), zmq::Error> {
            let fd = sock.get_fd()?;
            registry
                .register(
                    &mut mio::unix::SourceFd(&fd),
                    token(self.id, kind),
                    mio::Interest::READABLE,
                )
                .map_err(|e| {
                    tracing::warn!(subscriber = %self.cfg.name, error = %e, "epoll register");
                    zmq::Error::EINVAL
                })
        };
        add(&k.sub, LIVE)?;
        if let Some(d) = &k.dealer {
            add(d, REPLAY)?;
        }
        add(&k.monitor, MONITOR)
    }

    /// Reads the flagged sockets until libzmq has nothing more; true when a live burst was
    /// cut short and the SUB should be read again before sleeping.
    pub(crate) fn service(&mut self) -> bool {
        loop {
            if self.sockets.is_none() {
                self.dirty = 0;
                return false;
            }
            if self.dirty & MONITOR != 0 {
                self.dirty &= !MONITOR;
                self.read_monitor();
            } else if self.dirty & REPLAY != 0 {
                self.dirty &= !REPLAY;
                self.read_replay();
            } else if self.dirty & LIVE != 0 && self.outbox.is_empty() {
                if !self.read_live() {
                    // A burst ended (read again at once) or the sink is full (the retry
                    // timer brings us back): the SUB stays flagged either way.
                    return self.outbox.is_empty();
                }
                self.dirty &= !LIVE;
            } else {
                return false;
            }
        }
    }

    pub(crate) fn close_sockets(&mut self) {
        self.given_up_at = None;
        self.sockets = None;
        self.replay_deadline = None;
        self.catch_up_at = None;
    }

    pub(crate) fn stop(&mut self) {
        self.close_sockets();
        if self.connected {
            self.disconnected();
        }
        self.set_state(SubscriberState::Stopped);
        self.flush();
        self.closed = true;
    }

    pub(crate) fn set_state(&mut self, state: SubscriberState) {
        if self.state != state {
            tracing::info!(subscriber = %self.cfg.name, from = ?self.state, to = ?state, "subscriber state");
            self.state = state;
            self.counters.state.store(state as u8, Relaxed);
            self.push(SubscriberEvent::State(state));
        }
    }

    pub(crate) fn push(&mut self, ev: SubscriberEvent) {
        self.outbox.push_back(ev);
    }

    /// Sends what waits in the outbox; stops at a full channel. Nothing reaches a closed
    /// subscriber's sink (its consumer is gone or panicked; it is dropped before the next
    /// sleep).
    pub(crate) fn flush(&mut self) {
        if self.closed {
            self.outbox.clear();
            return;
        }
        let tx = match &mut self.sink {
            Sink::Direct(f) => {
                while let Some(ev) = self.outbox.pop_front() {
                    // A consumer that panics loses its own subscription, not the poller
                    // thread and every other subscriber with it.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| f(ev))).is_err() {
                        tracing::error!(subscriber = %self.cfg.name, "the sink panicked: subscriber stopped");
                        self.consumer_gone();
                        return;
                    }
                }
                return;
            }
            Sink::Channel(tx) => tx,
        };
        while let Some(ev) = self.outbox.pop_front() {
            match tx.try_send(ev) {
                Ok(()) => {}
                Err(tmpsc::error::TrySendError::Full(ev)) => {
                    self.outbox.push_front(ev);
                    return;
                }
                Err(tmpsc::error::TrySendError::Closed(_)) => {
                    self.consumer_gone();
                    return;
                }
            }
        }
    }

    /// Nobody to deliver to any more (the receiver was dropped, or the sink panicked): the
    /// subscriber closes and is removed before the next sleep.
    pub(crate) fn consumer_gone(&mut self) {
        self.outbox.clear();
        self.sockets = None;
        self.closed = true;
    }

    pub(crate) fn disconnected(&mut self) {
        self.connected = false;
        self.counters.disconnects.fetch_add(1, Relaxed);
        self.push(SubscriberEvent::Disconnected);
    }

    pub(crate) fn read_monitor(&mut self) {
        loop {
            let Some(k) = &self.sockets else { return };
            let Ok(frames) = k.monitor.recv_multipart(zmq::DONTWAIT) else {
                return;
            };
            let event = frames
                .first()
                .and_then(|f| f.get(..2))
                .map(|b| u16::from_le_bytes([b[0], b[1]]));
            if event == Some(zmq::SocketEvent::CONNECT_RETRIED as u16) {
                self.given_up_at = None;
            } else if event == Some(zmq::SocketEvent::CONNECTED as u16) {
                self.given_up_at = None;
                self.connected = true;
                self.counters.connects.fetch_add(1, Relaxed);
                self.attempt = 0;
                self.last_message = Instant::now();
                self.push(SubscriberEvent::Connected);
                tracing::info!(subscriber = %self.cfg.name, "connected");
                if self.cfg.replay_endpoint.is_some() {
                    self.catch_up_at = Some(self.last_message + self.cfg.catch_up_after);
                }
                match self.seq.on_connected() {
                    Some(Action::RequestReplay(from)) => self.request_replay(from),
                    None => self.set_state(SubscriberState::Live),
                }
            } else if event == Some(zmq::SocketEvent::DISCONNECTED as u16) && self.connected {
                tracing::info!(subscriber = %self.cfg.name, "disconnected");
                self.given_up_at = Some(Instant::now() + GIVE_UP_GRACE);
                self.disconnected();
                self.set_state(SubscriberState::Connecting);
            }
        }
    }

    pub(crate) fn request_replay(&mut self, from: u64) {
        let sent = self
            .sockets
            .as_ref()
            .and_then(|k| k.dealer.as_ref())
            .map(|d| d.send_multipart(replay_request(from), zmq::DONTWAIT));
        // A send may take the DEALER's pending signal: look at it again.
        self.dirty |= REPLAY;
        match sent {
            Some(Ok(())) => {
                self.counters.replays_requested.fetch_add(1, Relaxed);
                tracing::debug!(subscriber = %self.cfg.name, from, "replay requested");
                self.replay_deadline = Some(Instant::now() + self.cfg.replay_timeout);
                self.set_state(SubscriberState::Replaying);
            }
            _ => {
                self.counters.replays_failed.fetch_add(1, Relaxed);
                // Not connected to the replay socket: what the replay would give is lost.
                let mut out = Vec::new();
                self.seq.on_replay_timeout(&mut out);
                self.emit_deliveries(out);
                self.set_state(SubscriberState::Live);
            }
        }
    }

    /// Reads the SUB; true when libzmq has nothing more, false when a burst ended or the sink
    /// is full (the rest stays in libzmq's queue).
    pub(crate) fn read_live(&mut self) -> bool {
        for _ in 0..READ_BURST {
            if !self.outbox.is_empty() {
                return false;
            }
            let Some(k) = &self.sockets else { return true };
            let Ok(frames) = k.sub.recv_multipart(zmq::DONTWAIT) else {
                return true;
            };
            self.last_message = Instant::now();
            self.catch_up_at = None;
            let mut out = Vec::new();
            let action = match parse_live(&frames) {
                Ok(m) => self.seq.on_live(m.seq, m.payload, &mut out),
                Err(e) => {
                    self.counters.bad_frames.fetch_add(1, Relaxed);
                    self.push(SubscriberEvent::BadFrame(e));
                    None
                }
            };
            self.emit_deliveries(out);
            if let Some(Action::RequestReplay(from)) = action {
                self.request_replay(from);
            }
            self.flush();
        }
        false
    }

    pub(crate) fn read_replay(&mut self) {
        loop {
            let Some(d) = self.sockets.as_ref().and_then(|k| k.dealer.as_ref()) else {
                return;
            };
            let Ok(frames) = d.recv_multipart(zmq::DONTWAIT) else {
                return;
            };
            let mut out = Vec::new();
            match parse_replay(&frames) {
                Ok(ReplayMessage::Batch { seq, payload, .. }) => {
                    self.seq.on_replay(seq, payload, &mut out);
                }
                Ok(ReplayMessage::End) => {
                    if self.seq.is_replaying() {
                        self.counters.replays_completed.fetch_add(1, Relaxed);
                        self.replay_deadline = None;
                        let again = self.seq.on_replay_end(&mut out);
                        self.emit_deliveries(out);
                        match again {
                            Some(Action::RequestReplay(from)) => self.request_replay(from),
                            None => self.set_state(SubscriberState::Live),
                        }
                        self.flush();
                        continue;
                    }
                }
                Err(e) => {
                    self.counters.bad_frames.fetch_add(1, Relaxed);
                    self.push(SubscriberEvent::BadFrame(e));
                }
            }
            self.emit_deliveries(out);
            self.flush();
        }
    }

    pub(crate) fn emit_deliveries(&mut self, out: Vec<Delivery>) {
        let c = &self.counters;
        for d in out {
            match &d {
                Delivery::Batch(seq, b) => {
                    // A delivered seq is below u64::MAX (the sequencer refuses that one).
                    c.next_seq.store(seq.saturating_add(1), Relaxed);
                    if let Some(got) = b
                        .data_parallel_rank
                        .filter(|g| self.cfg.dp_rank.is_some_and(|want| *g != want))
                    {
                        c.rank_mismatches.fetch_add(1, Relaxed);
                        self.outbox
                            .push_back(SubscriberEvent::RankMismatch { seq: *seq, got });
                        continue;
                    }
                    c.batches.fetch_add(1, Relaxed);
                }
                Delivery::Gap { repaired: true, .. } => {
                    c.gaps_repaired.fetch_add(1, Relaxed);
                }
                Delivery::Gap { from, to, .. } => {
                    // A hostile peer can report gaps of ~2^64 batches again and again: the
                    // total saturates instead of wrapping (a counter must never go back).
                    let n = (to - from).saturating_add(1);
                    let _ = c
                        .batches_lost
                        .fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(n)));
                }
                Delivery::Restarted { .. } => {
                    c.restarts.fetch_add(1, Relaxed);
                }
                Delivery::Malformed { .. } => {
                    c.malformed.fetch_add(1, Relaxed);
                }
            }
            self.outbox.push_back(SubscriberEvent::Delivery(d));
        }
    }
}
