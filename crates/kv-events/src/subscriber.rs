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

use crate::frames::{parse_live, parse_replay, replay_request, FrameError, ReplayMessage};
use crate::sequencer::{Action, Delivery, Sequencer};
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tmpsc;

/// Reconnect backoff: `start × factor^attempt`, capped, with jitter in [½, 1] of that.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub start: Duration,
    pub cap: Duration,
    pub factor: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            start: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            factor: 2.0,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0-based), given a random `u64`.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let base = self.start.as_secs_f64() * self.factor.max(1.0).powi(attempt.min(64) as i32);
        let base = base.min(self.cap.as_secs_f64());
        let jitter = 0.5 + 0.5 * (random >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(base * jitter)
    }
}

/// One publisher to subscribe to.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// For logs: e.g. `ns/pod rank 0`.
    pub name: String,
    /// `tcp://HOST:PORT` of the PUB socket.
    pub endpoint: String,
    /// `tcp://HOST:PORT` of the replay ROUTER, if the engine has one.
    pub replay_endpoint: Option<String>,
    /// Topic prefix filter; empty = every topic.
    pub topic: Vec<u8>,
    /// The data-parallel rank the batches must carry (checked when they carry one).
    pub dp_rank: Option<u32>,
    /// `AIBRIX_KV_EVENT_REPLAY_TIMEOUT_S`.
    pub replay_timeout: Duration,
    /// ZMTP heartbeat interval; the peer is dead after 5 intervals without a reply.
    pub heartbeat: Duration,
    /// Recreate the sockets when nothing arrives for this long while connected.
    pub idle_timeout: Option<Duration>,
    pub backoff: Backoff,
    /// Live messages held while a replay runs.
    pub max_held: usize,
    /// Start from this seq (replayed) instead of 0 on the first connect.
    pub from_seq: Option<u64>,
    /// With a replay socket: replay once more this long after a connect when no live message
    /// has arrived meanwhile. The replay at the connect can answer before the SUB's
    /// subscription has reached the PUB, and a batch published in between reaches no one;
    /// when the engine then goes quiet, no later batch reveals the gap. A live message
    /// cancels it: the subscription is through, and a batch missed before it shows as a gap.
    pub catch_up_after: Duration,
}

impl SubscriberConfig {
    pub fn new(name: impl Into<String>, endpoint: impl Into<String>) -> Self {
        SubscriberConfig {
            name: name.into(),
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: Vec::new(),
            dp_rank: None,
            replay_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            idle_timeout: None,
            backoff: Backoff::default(),
            max_held: 10_000,
            from_seq: None,
            catch_up_after: Duration::from_millis(500),
        }
    }

    #[must_use]
    pub fn replay(mut self, endpoint: impl Into<String>) -> Self {
        self.replay_endpoint = Some(endpoint.into());
        self
    }
}

/// A subscriber's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SubscriberState {
    /// Sockets open, waiting for the TCP connection (libzmq retries by itself).
    Connecting,
    /// Connected, delivering live batches.
    Live,
    /// Connected, a replay is under way; live batches are held.
    Replaying,
    /// Sockets closed after an idle timeout; reopened when the backoff expires.
    BackingOff,
    /// Unsubscribed or shut down.
    Stopped,
}

/// What a subscriber's sink receives.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriberEvent {
    Connected,
    Disconnected,
    State(SubscriberState),
    Delivery(Delivery),
    /// A message that is not one vLLM sends (counted and skipped).
    BadFrame(FrameError),
    /// A batch that carries another data-parallel rank than this subscriber's (skipped).
    RankMismatch {
        seq: u64,
        got: u32,
    },
}

/// Where a subscriber's events go, in order.
pub enum Sink {
    /// A bounded channel to another thread or task. When it is full the poller stops reading
    /// this subscriber's SUB until there is room (libzmq queues, then drops at its high-water
    /// mark: a gap the sequencer repairs through replay). Closing the receiver ends the
    /// subscription.
    Channel(tmpsc::Sender<SubscriberEvent>),
    /// Called on the poller thread for each event as it is produced: no channel, no wake-up of
    /// another thread. It runs between the reads of every subscriber of the hub, so it must be
    /// quick and must never block. It is dropped on the poller thread once it has received
    /// `State(Stopped)` (after [`Hub::unsubscribe`]) or when the hub shuts down, and never
    /// called after that: a consumer that must know the last event has been handled can own
    /// something whose drop it awaits.
    Direct(Box<dyn FnMut(SubscriberEvent) + Send>),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Channel(tx) => f.debug_tuple("Channel").field(tx).finish(),
            Sink::Direct(_) => f.write_str("Direct(..)"),
        }
    }
}

impl From<tmpsc::Sender<SubscriberEvent>> for Sink {
    fn from(tx: tmpsc::Sender<SubscriberEvent>) -> Sink {
        Sink::Channel(tx)
    }
}

/// Identifies a subscription of a [`Hub`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

/// Live counters of one subscriber, updated by the poller thread: the metrics surface (the
/// service exports them; a state change is also one log line).
#[derive(Debug, Default)]
pub struct SubscriberCounters {
    /// The current [`SubscriberState`] as `state as u8`.
    pub state: AtomicU8,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub replays_requested: AtomicU64,
    pub replays_completed: AtomicU64,
    pub replays_failed: AtomicU64,
    pub batches: AtomicU64,
    pub gaps_repaired: AtomicU64,
    /// Batches reported lost (the sum of unrepaired gap lengths).
    pub batches_lost: AtomicU64,
    pub restarts: AtomicU64,
    pub malformed: AtomicU64,
    pub bad_frames: AtomicU64,
    pub rank_mismatches: AtomicU64,
    /// Seq of the last batch delivered, plus one (0: none yet).
    pub next_seq: AtomicU64,
}

impl SubscriberCounters {
    pub fn state(&self) -> SubscriberState {
        match self.state.load(Relaxed) {
            0 => SubscriberState::Connecting,
            1 => SubscriberState::Live,
            2 => SubscriberState::Replaying,
            3 => SubscriberState::BackingOff,
            _ => SubscriberState::Stopped,
        }
    }
}

/// A subscription: its id (to unsubscribe) and its counters.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: SubscriptionId,
    pub counters: Arc<SubscriberCounters>,
}

enum Command {
    Add(u64, Box<SubscriberConfig>, Sink, Arc<SubscriberCounters>),
    Remove(u64),
    Shutdown,
}

/// The owner of the poller thread. Dropping it stops every subscriber and joins the thread.
pub struct Hub {
    commands: mpsc::Sender<Command>,
    wake: Mutex<zmq::Socket>,
    thread: Option<JoinHandle<()>>,
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
            wake: Mutex::new(wake),
            thread: Some(thread),
            next_id: std::sync::atomic::AtomicU64::new(1),
            live,
        })
    }

    fn send(&self, c: Command) {
        if self.commands.send(c).is_ok() {
            if let Ok(w) = self.wake.lock() {
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

    /// Stops every subscriber and joins the poller thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Sockets {
    sub: zmq::Socket,
    dealer: Option<zmq::Socket>,
    monitor: zmq::Socket,
}

struct Sub {
    id: u64,
    counters: Arc<SubscriberCounters>,
    /// Index of its context in `Poller::contexts`.
    context: usize,
    cfg: SubscriberConfig,
    sink: Sink,
    sockets: Option<Sockets>,
    generation: u64,
    seq: Sequencer,
    state: SubscriberState,
    connected: bool,
    outbox: VecDeque<SubscriberEvent>,
    replay_deadline: Option<Instant>,
    /// When to replay once more after a connect if no live message has come by then
    /// (`SubscriberConfig::catch_up_after`).
    catch_up_at: Option<Instant>,
    last_message: Instant,
    reopen_at: Option<Instant>,
    attempt: u32,
    closed: bool,
    /// Sockets to read before the next sleep (`LIVE`, `REPLAY`, `MONITOR`): flagged by epoll
    /// or by our own use of them, until libzmq has nothing more to give.
    dirty: u8,
}

const LIVE: u8 = 1;
const REPLAY: u8 = 2;
const MONITOR: u8 = 4;
/// The wake socket's epoll token; a subscriber's sockets use `id << 2 | kind`.
const WAKE: mio::Token = mio::Token(usize::MAX);

fn token(id: u64, kind: u8) -> mio::Token {
    // Ids count up from 1: far below 2^62.
    mio::Token(((id as usize) << 2) | usize::from(kind.trailing_zeros() as u8))
}

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
/// Most messages read from one socket before the others get a turn.
const READ_BURST: usize = 256;
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
                    let mut seq = Sequencer::new(cfg.replay_endpoint.is_some(), cfg.max_held);
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

impl Sub {
    fn open(&mut self, ctx: &zmq::Context, registry: &mio::Registry) {
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

    fn try_open(&self, ctx: &zmq::Context) -> Result<Sockets, zmq::Error> {
        let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        let sub = ctx.socket(zmq::SUB)?;
        sub.set_linger(0)?;
        sub.set_reconnect_ivl(ms(self.cfg.backoff.start))?;
        sub.set_reconnect_ivl_max(ms(self.cfg.backoff.cap))?;
        sub.set_heartbeat_ivl(ms(self.cfg.heartbeat))?;
        sub.set_heartbeat_timeout(ms(self.cfg.heartbeat * 5))?;
        sub.set_subscribe(&self.cfg.topic)?;
        let mon = format!("inproc://kv-events-mon-{}-{}", self.id, self.generation);
        sub.monitor(
            &mon,
            (zmq::SocketEvent::CONNECTED as i32) | (zmq::SocketEvent::DISCONNECTED as i32),
        )?;
        let monitor = ctx.socket(zmq::PAIR)?;
        monitor.connect(&mon)?;
        sub.connect(&self.cfg.endpoint)?;
        let dealer = match &self.cfg.replay_endpoint {
            Some(ep) => {
                let d = ctx.socket(zmq::DEALER)?;
                d.set_linger(0)?;
                d.set_reconnect_ivl(ms(self.cfg.backoff.start))?;
                d.set_reconnect_ivl_max(ms(self.cfg.backoff.cap))?;
                d.connect(ep)?;
                Some(d)
            }
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
    fn watch(&self, k: &Sockets, registry: &mio::Registry) -> Result<(), zmq::Error> {
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
    fn service(&mut self) -> bool {
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

    fn close_sockets(&mut self) {
        self.sockets = None;
        self.replay_deadline = None;
        self.catch_up_at = None;
    }

    fn stop(&mut self) {
        self.close_sockets();
        if self.connected {
            self.disconnected();
        }
        self.set_state(SubscriberState::Stopped);
        self.flush();
        self.closed = true;
    }

    fn set_state(&mut self, state: SubscriberState) {
        if self.state != state {
            tracing::info!(subscriber = %self.cfg.name, from = ?self.state, to = ?state, "subscriber state");
            self.state = state;
            self.counters.state.store(state as u8, Relaxed);
            self.push(SubscriberEvent::State(state));
        }
    }

    fn push(&mut self, ev: SubscriberEvent) {
        self.outbox.push_back(ev);
    }

    /// Sends what waits in the outbox; stops at a full channel. Nothing reaches a closed
    /// subscriber's sink (its consumer is gone or panicked; it is dropped before the next
    /// sleep).
    fn flush(&mut self) {
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
    fn consumer_gone(&mut self) {
        self.outbox.clear();
        self.sockets = None;
        self.closed = true;
    }

    fn disconnected(&mut self) {
        self.connected = false;
        self.counters.disconnects.fetch_add(1, Relaxed);
        self.push(SubscriberEvent::Disconnected);
    }

    fn read_monitor(&mut self) {
        loop {
            let Some(k) = &self.sockets else { return };
            let Ok(frames) = k.monitor.recv_multipart(zmq::DONTWAIT) else {
                return;
            };
            let event = frames
                .first()
                .and_then(|f| f.get(..2))
                .map(|b| u16::from_le_bytes([b[0], b[1]]));
            if event == Some(zmq::SocketEvent::CONNECTED as u16) {
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
                self.disconnected();
                self.set_state(SubscriberState::Connecting);
            }
        }
    }

    fn request_replay(&mut self, from: u64) {
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
    fn read_live(&mut self) -> bool {
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

    fn read_replay(&mut self) {
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

    fn emit_deliveries(&mut self, out: Vec<Delivery>) {
        let c = &self.counters;
        for d in out {
            match &d {
                Delivery::Batch(seq, b) => {
                    c.next_seq.store(seq + 1, Relaxed);
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
                    c.batches_lost.fetch_add(to - from + 1, Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_factor_to_the_cap_with_jitter_in_half_to_full() {
        let b = Backoff {
            start: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            factor: 3.0,
        };
        for (attempt, base_ms) in [
            (0, 100.0),
            (1, 300.0),
            (2, 900.0),
            (3, 2000.0),
            (30, 2000.0),
        ] {
            for r in [0u64, u64::MAX / 3, u64::MAX] {
                let d = b.delay(attempt, r).as_secs_f64() * 1000.0;
                assert!(
                    d >= base_ms * 0.5 - 1e-6 && d <= base_ms + 1e-6,
                    "attempt {attempt}: {d} ms not in [{}, {base_ms}]",
                    base_ms * 0.5
                );
            }
        }
        assert_ne!(
            b.delay(1, 1 << 40),
            b.delay(1, u64::MAX >> 1),
            "jitter varies"
        );
    }
}
