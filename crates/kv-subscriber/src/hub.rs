//! The ZeroMQ subscribers: one SUB (and one replay DEALER) per publisher (pod, DP rank), all
//! driven by one poller thread over libzmq, each feeding its own sink: a bounded channel, or
//! a function called on the poller thread (no hop to another thread, so no wake-up per batch).
//!
//! ```text
//!  Hub::subscribe(cfg, sink) ──command──▶ poller thread ── epoll(ready sockets) ──┐
//!                                           │  SUB [topic, seq, payload] ─▶ Sequencer ─▶ sink (bounded)
//!                                           │  DEALER replies ────────────▶ Sequencer
//!                                           └─ monitor: connected / disconnected
//! ```
//!
//! libzmq connects in the background (a pod that is not up yet neither blocks nor fails) and
//! reconnects by itself with exponential backoff and jitter (`ZMQ_RECONNECT_IVL` = the
//! backoff's start, `ZMQ_RECONNECT_IVL_MAX` = its cap; libzmq doubles and adds up to one
//! interval of jitter). ZMTP heartbeats detect a publisher that vanished without closing; an
//! optional idle timeout recreates the sockets after our own backoff (start, cap, factor).
//! When a channel sink is full the poller stops reading that SUB (libzmq then drops at its
//! high-water mark, which the sequencer reports as a gap and repairs through replay); it never
//! blocks and never busy-polls: it sleeps in epoll until a socket, a command or a deadline.
//!
//! Each socket's `ZMQ_FD` is registered once with epoll (mio), so a wake-up costs what the
//! ready sockets cost, not all of them (`zmq::poll` asked every socket of every subscriber for
//! its state on every wake-up: at 64 publishers, most of the hub's CPU). `ZMQ_FD` only says
//! "look again": a socket flagged by it, or by our own send on it, is read until libzmq has
//! nothing more (or a burst ends, and it is read again before the next sleep).

use crate::sequencer::{Action, Sequencer};
use crate::sub::Sub;
use crate::subscription::{
    Sink, SubscriberConfig, SubscriberCounters, SubscriberEvent, SubscriberState, Subscription,
    SubscriptionId,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

enum Command {
    Add(u64, Box<SubscriberConfig>, Sink, Arc<SubscriberCounters>),
    Remove(u64),
    Shutdown,
}

/// The owner of the poller thread. [`Hub::shutdown`], from any handle of a shared hub, or
/// dropping it stops every subscriber and joins the thread.
pub struct Hub {
    commands: mpsc::Sender<Command>,
    /// Closed by the shutdown (it keeps the first libzmq context, and its threads, alive).
    wake: Mutex<Option<zmq::Socket>>,
    /// Taken by the first shutdown.
    thread: Mutex<Option<JoinHandle<()>>>,
    next_id: std::sync::atomic::AtomicU64,
    live: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("subscriptions", &self.subscriptions())
            .finish()
    }
}

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("zeromq: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("spawning the poller thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("epoll: {0}")]
    Poll(std::io::Error),
}

impl Hub {
    /// Starts the poller thread (it sleeps at most 1 s between deadline checks).
    pub fn start() -> Result<Hub, HubError> {
        Self::with_poll_timeout(MAX_SLEEP)
    }

    /// Starts the poller thread; `poll_timeout` (`AIBRIX_KV_EVENT_POLL_TIMEOUT_MS`) is the
    /// longest it sleeps in epoll before checking its deadlines (sockets and commands wake it
    /// at once).
    pub fn with_poll_timeout(poll_timeout: Duration) -> Result<Hub, HubError> {
        let ctx = zmq::Context::new();
        let wake_rx = ctx.socket(zmq::PAIR)?;
        let endpoint = format!("inproc://kv-events-hub-{:p}", &wake_rx);
        wake_rx.bind(&endpoint)?;
        let wake = ctx.socket(zmq::PAIR)?;
        wake.connect(&endpoint)?;
        let (tx, rx) = mpsc::channel();
        let live = Arc::new(AtomicUsize::new(0));
        let poll = mio::Poll::new().map_err(HubError::Poll)?;
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&wake_rx.get_fd()?),
                WAKE,
                mio::Interest::READABLE,
            )
            .map_err(HubError::Poll)?;
        let poller = Poller {
            poll,
            events: mio::Events::with_capacity(256),
            max_sleep: poll_timeout.max(Duration::from_millis(1)),
            contexts: vec![(ctx, 0)],
            wake: wake_rx,
            commands: rx,
            subs: Vec::new(),
            live: live.clone(),
            rng: 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()),
        };
        let thread = std::thread::Builder::new()
            .name("kv-events-poller".into())
            .spawn(move || poller.run())?;
        Ok(Hub {
            commands: tx,
            wake: Mutex::new(Some(wake)),
            thread: Mutex::new(Some(thread)),
            next_id: std::sync::atomic::AtomicU64::new(1),
            live,
        })
    }

    fn send(&self, c: Command) {
        if self.commands.send(c).is_ok() {
            if let Ok(Some(w)) = self.wake.lock().as_deref() {
                let _ = w.send(&[][..], zmq::DONTWAIT);
            }
        }
    }

    /// Subscribes; events go to `sink` (a [`Sink`], or a channel's sender) in order. Never
    /// blocks on the network.
    pub fn subscribe(&self, cfg: SubscriberConfig, sink: impl Into<Sink>) -> Subscription {
        let id = self.next_id.fetch_add(1, Relaxed);
        let counters = Arc::new(SubscriberCounters::default());
        self.send(Command::Add(
            id,
            Box::new(cfg),
            sink.into(),
            counters.clone(),
        ));
        Subscription {
            id: SubscriptionId(id),
            counters,
        }
    }

    /// Stops a subscription: its sockets close and its sink gets `State(Stopped)`.
    pub fn unsubscribe(&self, id: SubscriptionId) {
        self.send(Command::Remove(id.0));
    }

    /// Subscriptions the poller currently runs.
    pub fn subscriptions(&self) -> usize {
        self.live.load(Relaxed)
    }

    /// Stops every subscriber and joins the poller thread, whoever else holds the hub (a
    /// shared `Arc<Hub>` need not be the last one); later subscriptions end at once (their
    /// sink is dropped unused). Idempotent.
    pub fn shutdown(&self) {
        self.send(Command::Shutdown);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        // With the poller's own handles gone, this lets libzmq end the context's threads.
        self.wake
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The wake socket's epoll token; a subscriber's sockets use `id << 2 | kind`.
const WAKE: mio::Token = mio::Token(usize::MAX);

struct Poller {
    /// epoll over every socket's `ZMQ_FD` and the wake socket's.
    poll: mio::Poll,
    events: mio::Events,
    max_sleep: Duration,
    /// libzmq contexts and how many subscribers each hosts (the first also hosts `wake`).
    contexts: Vec<(zmq::Context, usize)>,
    wake: zmq::Socket,
    commands: mpsc::Receiver<Command>,
    /// In id order (see [`sub_mut`]).
    subs: Vec<Sub>,
    live: Arc<AtomicUsize>,
    rng: u64,
}

/// The subscriber with this id in `Poller::subs`, which is in id order (insertion keeps it,
/// `retain` preserves it): a socket event finds its owner without walking every subscriber.
fn sub_mut(subs: &mut [Sub], id: u64) -> Option<&mut Sub> {
    let i = subs.binary_search_by_key(&id, |s| s.id).ok()?;
    Some(&mut subs[i])
}

/// Subscribers per libzmq context. Each takes four sockets (SUB, DEALER, the monitor pair)
/// and a context holds at most 1023 (libzmq's default; the zmq crate cannot raise it),
/// counting closed sockets its reaper thread has not finished yet: that lags a churn (200
/// subscribers closed and opened again 50 ms later failed with "Too many open files" at the
/// 67th). So a context hosts 125 (500 sockets): a whole context's subscribers replaced at once
/// still fit beside their predecessors. The hub opens another context (one I/O thread and one
/// reaper thread) per 125 subscribers.
pub const SUBS_PER_CONTEXT: usize = 125;
/// How often a full sink is retried (the consumer cannot wake the poller).
const SINK_RETRY: Duration = Duration::from_millis(20);
/// The default longest sleep in epoll (deadlines are checked at least this often).
const MAX_SLEEP: Duration = Duration::from_secs(1);

impl Poller {
    fn run(mut self) {
        loop {
            if !self.drain_commands() {
                break;
            }
            let now = Instant::now();
            self.timers(now);
            for s in &mut self.subs {
                s.flush();
            }
            for s in self.subs.iter().filter(|s| s.closed) {
                self.contexts[s.context].1 -= 1;
            }
            self.subs.retain(|s| !s.closed);
            self.live.store(self.subs.len(), Relaxed);
            // Read what is flagged; a burst cut short is read again before sleeping.
            let mut more = false;
            for s in &mut self.subs {
                more |= s.service();
            }
            let timeout = if more {
                Duration::ZERO
            } else {
                self.next_timeout(Instant::now())
            };
            if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "epoll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            for ev in self.events.iter() {
                let t = ev.token();
                if t == WAKE {
                    continue;
                }
                let (id, kind) = ((t.0 >> 2) as u64, 1u8 << (t.0 & 3));
                if let Some(s) = sub_mut(&mut self.subs, id) {
                    s.dirty |= kind;
                }
            }
            // Commands come with a message on the wake socket: read them all, which also
            // re-arms its `ZMQ_FD` (cheap: one socket).
            while self.wake.recv_bytes(zmq::DONTWAIT).is_ok() {}
        }
        for s in &mut self.subs {
            s.stop();
        }
        self.live.store(0, Relaxed);
    }

    /// Applies queued commands; false on shutdown.
    fn drain_commands(&mut self) -> bool {
        while let Ok(c) = self.commands.try_recv() {
            match c {
                Command::Add(id, cfg, sink, counters) => {
                    let mut seq = Sequencer::new(cfg.replay_endpoint.is_some(), cfg.max_held)
                        .max_held_bytes(cfg.max_held_bytes);
                    if let Some(n) = cfg.from_seq {
                        seq.resume_at(n);
                    }
                    let context = self.pick_context();
                    let mut s = Sub {
                        id,
                        counters,
                        context,
                        cfg: *cfg,
                        sink,
                        sockets: None,
                        generation: 0,
                        seq,
                        state: SubscriberState::Connecting,
                        connected: false,
                        outbox: VecDeque::new(),
                        replay_deadline: None,
                        catch_up_at: None,
                        last_message: Instant::now(),
                        reopen_at: None,
                        given_up_at: None,
                        attempt: 0,
                        closed: false,
                        dirty: 0,
                    };
                    // Announce the first state (`open` only reports changes).
                    s.push(SubscriberEvent::State(s.state));
                    s.open(&self.contexts[context].0, self.poll.registry());
                    // Kept in id order (two threads may send their Adds out of id order).
                    let at = self.subs.partition_point(|x| x.id < id);
                    self.subs.insert(at, s);
                }
                Command::Remove(id) => {
                    if let Some(s) = sub_mut(&mut self.subs, id) {
                        s.stop();
                    }
                }
                Command::Shutdown => return false,
            }
        }
        true
    }

    fn timers(&mut self, now: Instant) {
        for i in 0..self.subs.len() {
            let random = self.random();
            let s = &mut self.subs[i];
            if s.replay_deadline.is_some_and(|d| now >= d) {
                s.replay_deadline = None;
                let mut out = Vec::new();
                s.seq.on_replay_timeout(&mut out);
                s.counters.replays_failed.fetch_add(1, Relaxed);
                tracing::warn!(subscriber = %s.cfg.name, "replay timed out");
                s.reopen_dealer(&self.contexts[s.context].0, self.poll.registry());
                s.emit_deliveries(out);
                s.set_state(SubscriberState::Live);
            }
            if s.catch_up_at.is_some_and(|d| now >= d) {
                s.catch_up_at = None;
                if s.connected {
                    if let Some(Action::RequestReplay(from)) = s.seq.on_connected() {
                        tracing::debug!(subscriber = %s.cfg.name, from, "no live message since the connect: replaying to catch up");
                        s.request_replay(from);
                    }
                }
            }
            if let (Some(idle), true) = (s.cfg.idle_timeout, s.connected) {
                if now.duration_since(s.last_message) >= idle {
                    tracing::warn!(subscriber = %s.cfg.name, "no message for {idle:?}: reconnecting");
                    s.close_sockets();
                    s.disconnected();
                    s.reopen_at = Some(now + s.cfg.backoff.delay(s.attempt, random));
                    s.attempt = s.attempt.saturating_add(1);
                    s.set_state(SubscriberState::BackingOff);
                }
            }
            if s.given_up_at.is_some_and(|t| now >= t) {
                tracing::warn!(subscriber = %s.cfg.name, "the connection was dropped and not retried (a frame over max_message_bytes?): reopening");
                s.counters.connections_refused.fetch_add(1, Relaxed);
                s.close_sockets();
                s.reopen_at = Some(now + s.cfg.backoff.delay(s.attempt, random));
                s.attempt = s.attempt.saturating_add(1);
                s.set_state(SubscriberState::BackingOff);
            }
            if s.reopen_at.is_some_and(|t| now >= t) {
                s.reopen_at = None;
                s.open(&self.contexts[s.context].0, self.poll.registry());
            }
        }
    }

    fn next_timeout(&self, now: Instant) -> Duration {
        let mut t = self.max_sleep;
        for s in &self.subs {
            if !s.outbox.is_empty() {
                t = t.min(SINK_RETRY);
            }
            let deadlines = [
                s.replay_deadline,
                s.catch_up_at,
                s.reopen_at,
                s.given_up_at,
                s.cfg
                    .idle_timeout
                    .filter(|_| s.connected)
                    .map(|d| s.last_message + d),
            ];
            for d in deadlines.into_iter().flatten() {
                t = t.min(d.saturating_duration_since(now));
            }
        }
        t
    }

    /// A context with room for one more subscriber (a new one when all are full).
    fn pick_context(&mut self) -> usize {
        let i = match self
            .contexts
            .iter()
            .position(|(_, n)| *n < SUBS_PER_CONTEXT)
        {
            Some(i) => i,
            None => {
                self.contexts.push((zmq::Context::new(), 0));
                self.contexts.len() - 1
            }
        };
        self.contexts[i].1 += 1;
        i
    }

    /// xorshift64*: jitter for backoffs.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of hubs in this process: no other unit test of the crate starts one.
    fn hub_threads() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                    .map(|n| n.trim().to_owned())
                    .filter(|n| n.starts_with("kv-events-poll") || n.starts_with("ZMQbg"))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_shared_hub_shut_down_from_one_handle_ends_its_threads() {
        let hub = Arc::new(Hub::start().expect("hub"));
        let other = hub.clone();
        // A new thread names itself once it runs (and libzmq's start with its first socket).
        let deadline = Instant::now() + Duration::from_secs(10);
        while hub_threads().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the poller's thread never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        hub.shutdown();
        // A joined thread can linger in /proc for a moment after its join returns.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hub_threads().is_empty() {
            assert!(Instant::now() < deadline, "left: {:?}", hub_threads());
            std::thread::sleep(Duration::from_millis(5));
        }
        // The other handle still works, and a late subscription ends at once.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        other.subscribe(SubscriberConfig::new("late", "tcp://127.0.0.1:9"), tx);
        assert_eq!(rx.blocking_recv(), None, "its sink dropped unused");
        assert_eq!(other.subscriptions(), 0);
        hub.shutdown();
    }
}
