//! What a subscriber is given and what it gives back: its [`SubscriberConfig`], its life
//! ([`SubscriberState`]), the [`SubscriberEvent`]s its [`Sink`] receives, and the
//! [`SubscriberCounters`] the service exports.

use crate::backoff::Backoff;
use crate::sequencer::Delivery;
use kv_events::FrameError;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc as tmpsc;

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
    /// Payload bytes of the live messages held while a replay runs (the oldest are dropped
    /// past it, and reported as a gap, as past `max_held`). Default [`MAX_HELD_BYTES`].
    pub max_held_bytes: usize,
    /// Largest message frame read from the SUB or the replay DEALER (`ZMQ_MAXMSGSIZE`).
    /// Default [`MAX_MESSAGE_BYTES`].
    pub max_message_bytes: usize,
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
            max_held_bytes: MAX_HELD_BYTES,
            max_message_bytes: MAX_MESSAGE_BYTES,
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

/// Default [`SubscriberConfig::max_message_bytes`]: 64 MiB. A batch is one engine step's
/// events (`vllm/distributed/kv_events.py`: the publisher sends what the scheduler step
/// produced). A step stores at most `max_num_batched_tokens / block_size` new full blocks per
/// KV cache group (`vllm/v1/core/block_pool.py`), each `BlockStored` carrying its token ids
/// (msgpack: at most 5 bytes each) and its hash (at most 34 bytes); with chunked prefill off,
/// `max_num_batched_tokens` is at least `max_model_len`, which reaches 1 M tokens for
/// long-context models. 1 M tokens × 5 bytes × 4 groups (a hybrid model) is 20 MB, plus one
/// `BlockRemoved` per evicted block (~40 bytes each): 64 MiB leaves three times that. A larger
/// frame is refused by libzmq, which drops the connection: counted in `disconnects`, the
/// batch lost (a gap, repaired when the replay buffer can give it, which it cannot either).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Default [`SubscriberConfig::max_held_bytes`]: 256 MiB, four of the largest batches
/// [`MAX_MESSAGE_BYTES`] allows; typical batches are kilobytes, so `max_held` (10 000, the
/// size of vLLM's replay buffer, `buffer_steps`) binds first.
pub const MAX_HELD_BYTES: usize = 256 << 20;

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
pub struct SubscriptionId(pub(crate) u64);

/// Live counters of one subscriber, updated by the poller thread: the metrics surface (the
/// service exports them; a state change is also one log line).
#[derive(Debug, Default)]
pub struct SubscriberCounters {
    /// The current [`SubscriberState`] as `state as u8`.
    pub state: AtomicU8,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// Connections libzmq dropped and did not retry (a frame over `max_message_bytes`, or
    /// another protocol error): the sockets were reopened.
    pub connections_refused: AtomicU64,
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
