//! The wall-clock shell around the [`Scheduler`]: one thread per engine steps it, sleeps each
//! step's modelled duration divided by `speed`, then publishes the step's KV events on the
//! engine's PUB socket (the replay ROUTER answers from the same buffer; one batch per step, as
//! vLLM's `update_from_output` does, before the outputs go out) and delivers its tokens to the
//! requests' channels.
//!
//! Engine time is the scheduler's clock: seconds since the engine started, running `speed`
//! times faster than the wall. A step starts at `max(end of the previous step, engine time
//! now)`, so a thread that wakes late (timer slack; at high speed, a busy core) stretches
//! engine time rather than bending it: the `t` of the events stay consistent with the cost
//! model, and arrivals ([`EngineHandle::now`]) never precede the step that schedules them.
//!
//! A request's events go to a bounded tokio channel sized for the whole request (scheduled,
//! at most `max_tokens` tokens, finished), so the engine thread never blocks on a client. A
//! dropped receiver aborts its request at the next step (blocks freed). The thread is owned
//! by the handles: [`EngineHandle::shutdown`], or dropping the last handle, stops and joins it
//! and closes the sockets.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::mpsc;

use crate::cost::CostModel;
use crate::engine::{EngineConfig, EngineError, KvPublisher};
use crate::pool::{BlockPool, Lora};
use crate::sched::{AddError, ConfigError, NewRequest, ReqId, SchedConfig, Scheduler, StepOutcome};
pub use crate::sched::{EngineMetrics, FinishReason};

/// One generation request, already tokenized and with `max_tokens` resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateRequest {
    pub request_id: String,
    /// Token ids, tokenized by the HTTP layer.
    pub prompt: Vec<u32>,
    /// Resolved by the HTTP layer (vLLM's default when absent).
    pub max_tokens: usize,
    pub lora: Option<Lora>,
}

/// What an engine reports about one request, in order: `Scheduled`, then `Token`s, then
/// `Finished`. `t` is engine time in seconds.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// The request left the waiting queue: its prefix-cache hit is known.
    Scheduled { t: f64, cached_tokens: usize },
    /// One generated token (the first one ends prefill).
    Token { t: f64, id: u32 },
    /// The request ended.
    Finished {
        t: f64,
        reason: FinishReason,
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
    },
}

/// The engine refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The engine has stopped.
    #[error("the engine is not running")]
    Stopped,
    /// The engine's queue is full.
    #[error("the engine's queue is full")]
    Overloaded,
    /// The request cannot be served (empty prompt, over `max_model_len`, no output).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Everything one simulated engine is built from.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Sockets, wire format and the block pool (`num_blocks`, `block_size`, `seed`,
    /// `hash_form`); its `vocab` is unused (the scheduler's is).
    pub engine: EngineConfig,
    pub sched: SchedConfig,
    pub cost: CostModel,
    /// Engine seconds per wall second (`--speed`).
    pub speed: f64,
    /// The wall-clock instant engine time 0 stands for (`None`: the engine's start). Engines
    /// of one fleet share it, so their times compare, across restarts too.
    pub epoch: Option<Instant>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            engine: EngineConfig::default(),
            sched: SchedConfig::default(),
            cost: CostModel::default(),
            speed: 1.0,
            epoch: None,
        }
    }
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Sockets(#[from] EngineError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("speed must be a positive number, not {0}")]
    Speed(f64),
    #[error("the pool needs at least 2 blocks of at least 1 token")]
    Pool,
    #[error("starting the engine thread: {0}")]
    Thread(#[from] std::io::Error),
}

struct State {
    sched: Scheduler,
    publisher: KvPublisher,
    streams: HashMap<ReqId, mpsc::Sender<TokenEvent>>,
    next_id: ReqId,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    started: Instant,
    speed: f64,
    max_model_len: usize,
    block_size: usize,
    pub_port: u16,
    replay_port: Option<u16>,
}

impl Shared {
    fn engine_now(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * self.speed
    }

    fn wall_at(&self, t: f64) -> Instant {
        self.started + Duration::from_secs_f64((t / self.speed).max(0.0))
    }
}

/// Stops and joins the engine thread when the last handle goes.
struct Owner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Owner {
    fn stop(&self) {
        self.shared.state.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.thread.lock().take() {
            if h.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A cloneable handle to one running simulated engine (Send + Sync).
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
    owner: Arc<Owner>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("pub_port", &self.shared.pub_port)
            .field("replay_port", &self.shared.replay_port)
            .field("speed", &self.shared.speed)
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Binds the engine's sockets and starts its thread.
    pub fn start(cfg: SimConfig) -> Result<EngineHandle, StartError> {
        if !(cfg.speed.is_finite() && cfg.speed > 0.0) {
            return Err(StartError::Speed(cfg.speed));
        }
        let e = &cfg.engine;
        if e.num_blocks < 2 || e.block_size == 0 {
            return Err(StartError::Pool);
        }
        let pool = BlockPool::new(e.num_blocks, e.block_size, e.seed, e.hash_form);
        let max_model_len = cfg.sched.max_model_len;
        let sched = Scheduler::new(cfg.sched, cfg.cost, pool)?;
        let publisher = KvPublisher::start(&cfg.engine)?;
        let shared = Arc::new(Shared {
            pub_port: publisher.pub_port(),
            replay_port: publisher.replay_port(),
            state: Mutex::new(State {
                sched,
                publisher,
                streams: HashMap::new(),
                next_id: 0,
                shutdown: false,
            }),
            wake: Condvar::new(),
            started: cfg.epoch.unwrap_or_else(Instant::now),
            speed: cfg.speed,
            max_model_len,
            block_size: cfg.engine.block_size,
        });
        let runner = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sim-engine-{}", shared.pub_port))
            .spawn(move || run(&runner))?;
        let owner = Arc::new(Owner {
            shared: shared.clone(),
            thread: Mutex::new(Some(thread)),
        });
        Ok(EngineHandle { shared, owner })
    }

    /// Queues the request; its events arrive on the returned bounded receiver. Dropping the
    /// receiver aborts the request (its blocks are freed at the next step).
    pub fn submit(&self, req: GenerateRequest) -> Result<mpsc::Receiver<TokenEvent>, SubmitError> {
        let mut st = self.shared.state.lock();
        if st.shutdown {
            return Err(SubmitError::Stopped);
        }
        let id = st.next_id;
        // Scheduled, the tokens, Finished: the channel never fills.
        let room = (self.shared.max_model_len + 1).saturating_sub(req.prompt.len());
        let capacity = req.max_tokens.min(room) + 2;
        let new = NewRequest {
            id,
            prompt: req.prompt,
            max_tokens: req.max_tokens,
            lora: req.lora,
        };
        match st.sched.add(new, self.shared.engine_now()) {
            Ok(()) => {}
            Err(AddError::QueueFull(_)) => return Err(SubmitError::Overloaded),
            Err(e) => return Err(SubmitError::Invalid(e.to_string())),
        }
        st.next_id += 1;
        let (tx, rx) = mpsc::channel(capacity);
        st.streams.insert(id, tx);
        tracing::trace!(request_id = %req.request_id, id, "queued");
        drop(st);
        self.shared.wake.notify_all();
        Ok(rx)
    }

    /// Its prefix-cache hit and time to first token if a request for `prompt` arrived now
    /// and nothing else did ([`crate::predict::first_token`] on a copy of the scheduler taken
    /// under the lock and run outside it); `None` when it would be refused or no token comes
    /// within the horizon.
    pub fn predict(
        &self,
        prompt: &[u32],
        lora: Option<&Lora>,
        horizon: crate::predict::Horizon,
    ) -> Option<crate::predict::Prediction> {
        let (copy, now) = {
            let st = self.shared.state.lock();
            if st.shutdown {
                return None;
            }
            (st.sched.clone(), self.shared.engine_now())
        };
        crate::predict::first_token(&copy, prompt, lora, now, horizon)
    }

    /// A snapshot of the engine's `/metrics` values.
    pub fn stats(&self) -> EngineMetrics {
        self.shared.state.lock().sched.metrics()
    }

    /// vLLM's `reset_prefix_cache`: refused (false) while requests hold blocks; otherwise
    /// `AllBlocksCleared` is published.
    pub fn reset_prefix_cache(&self) -> bool {
        let ok = self.shared.state.lock().sched.reset_prefix_cache();
        self.shared.wake.notify_all();
        ok
    }

    pub fn max_model_len(&self) -> usize {
        self.shared.max_model_len
    }

    pub fn block_size(&self) -> usize {
        self.shared.block_size
    }

    /// Engine time now, in seconds.
    pub fn now(&self) -> f64 {
        self.shared.engine_now()
    }

    pub fn speed(&self) -> f64 {
        self.shared.speed
    }

    pub fn pub_port(&self) -> u16 {
        self.shared.pub_port
    }

    pub fn replay_port(&self) -> Option<u16> {
        self.shared.replay_port
    }

    /// The next `n` KV event batches are buffered for replay but not sent (a lost message).
    pub fn drop_next_batches(&self, n: usize) {
        self.shared.state.lock().publisher.drop_next_batches(n);
    }

    /// The seq the next KV event batch will carry.
    pub fn next_seq(&self) -> u64 {
        self.shared.state.lock().publisher.next_seq()
    }

    /// Stops the engine thread and joins it; open receivers see their channel close. Later
    /// submissions get [`SubmitError::Stopped`]. The sockets close when the last handle goes.
    pub fn shutdown(&self) {
        self.owner.stop();
        self.shared.state.lock().streams.clear();
    }
}

/// The engine thread.
fn run(shared: &Shared) {
    let mut st = shared.state.lock();
    loop {
        if st.shutdown {
            break;
        }
        abort_gone(&mut st);
        if !st.sched.has_work() {
            let events = st.sched.pool_mut().take_events();
            st.publisher.publish(events);
            shared.wake.wait(&mut st);
            continue;
        }
        let out = st.sched.step(shared.engine_now());
        if out.is_idle() {
            // Cannot happen (a lone request always fits the pool, `Scheduler::new` checks);
            // waiting for a change beats spinning if it ever does.
            tracing::error!("work waits but nothing could be scheduled");
            st.publisher.publish(out.events);
            shared.wake.wait(&mut st);
            continue;
        }
        let deadline = shared.wall_at(out.end);
        while !st.shutdown && Instant::now() < deadline {
            shared.wake.wait_until(&mut st, deadline);
        }
        // vLLM publishes a step's KV events in `update_from_output`, before its outputs
        // reach the clients.
        st.publisher.publish(out.events.clone());
        deliver(&mut st, &out);
    }
}

/// Aborts the requests whose receiver was dropped.
fn abort_gone(st: &mut MutexGuard<'_, State>) {
    let st = &mut **st;
    let gone: Vec<ReqId> = st
        .streams
        .iter()
        .filter(|(_, tx)| tx.is_closed())
        .map(|(&id, _)| id)
        .collect();
    for id in gone {
        st.streams.remove(&id);
        st.sched.abort(id);
    }
}

fn deliver(st: &mut MutexGuard<'_, State>, out: &StepOutcome) {
    let st = &mut **st;
    let mut gone = Vec::new();
    let mut send = |id: ReqId, ev: TokenEvent| {
        if let Some(tx) = st.streams.get(&id) {
            if tx.try_send(ev).is_err() {
                gone.push(id);
            }
        }
    };
    for a in out.admitted.iter().filter(|a| !a.resumed) {
        send(
            a.id,
            TokenEvent::Scheduled {
                t: out.start,
                cached_tokens: a.cached_tokens,
            },
        );
    }
    for &(id, token) in &out.tokens {
        send(
            id,
            TokenEvent::Token {
                t: out.end,
                id: token,
            },
        );
    }
    for f in &out.finished {
        send(
            f.id,
            TokenEvent::Finished {
                t: out.end,
                reason: f.reason,
                prompt_tokens: f.prompt_tokens,
                cached_tokens: f.cached_tokens,
                completion_tokens: f.completion_tokens,
            },
        );
    }
    for f in &out.finished {
        st.streams.remove(&f.id);
    }
    // A receiver dropped (or, impossibly, full): the request goes.
    for id in gone {
        st.streams.remove(&id);
        st.sched.abort(id);
    }
}
