//! The KV event manager: keeps exactly one subscription per eligible pod and data-parallel
//! rank, feeds each one's events to the index in order, and cleans up when pods go.
//!
//! ```text
//!  PodStream ──handle()──▶ pods: key → incarnation (uid, restarts, target)
//!                              │ new incarnation: stop the old run, start one task per rank
//!                              ▼
//!  worker task (pod, rank): wait for the previous task of that worker (same pod name and
//!      rank, even across a delete and a create) ─▶ per-pod backoff
//!      ─▶ index.claim(worker): a new epoch; the Feed's writes and the cleanup carry it, so an
//!         older incarnation's late writes or cleanup cannot touch the newer one's blocks
//!      ─▶ hub.subscribe(Feed) ─▶ wait for the stop
//!      ─▶ the feed dropped by the hub (it panicked): a failed subscription, shown and counted;
//!         the worker's blocks leave the index; subscribe again after a backoff
//!      ─▶ on stop: unsubscribe, wait until the hub has dropped the feed, then every block of
//!         the worker leaves the index at once
//!  Feed, on the hub's poller thread: apply batches in order as they are decoded;
//!      Gap{lost} / Restarted ─▶ clear the worker; bad input counted, logged once per interval
//! ```
//!
//! The pod event path never waits on a socket: subscribing returns at once and each run lives
//! in its own task, owned by the manager's `TaskTracker` and stopped by its token.

use crate::pods::source::{PodEvent, PodStream};
use crate::pods::{self, PodInfo, Target};
use futures::StreamExt;
use kv_subscriber::{Backoff, Delivery, Hub, Sink, SubscriberConfig, SubscriberEvent};
use prefix_index::{Epoch, Index, Source, WorkerId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Settings of the manager and of the subscribers it creates.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub replay_timeout: Duration,
    pub heartbeat: Duration,
    pub reconnect: Backoff,
    /// Delay before subscribing to a pod that changed incarnation again within `churn_window`.
    pub churn_backoff: Backoff,
    pub churn_window: Duration,
    /// Bad input is logged at most once per worker per this interval (and always counted).
    pub log_interval: Duration,
    /// Delay before subscribing again after a subscription failed (its feed panicked). The
    /// attempt count restarts once a subscription has lasted `cap`.
    pub failure_backoff: Backoff,
    /// Largest message a subscriber reads (`ZMQ_MAXMSGSIZE`).
    pub max_message_bytes: usize,
    /// Live message bytes a subscriber holds while a replay runs.
    pub max_held_bytes: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            replay_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            reconnect: Backoff::default(),
            churn_backoff: Backoff {
                start: Duration::from_millis(500),
                cap: Duration::from_secs(30),
                factor: 2.0,
            },
            churn_window: Duration::from_secs(30),
            log_interval: Duration::from_secs(10),
            failure_backoff: Backoff {
                start: Duration::from_millis(500),
                cap: Duration::from_secs(30),
                factor: 2.0,
            },
            max_message_bytes: kv_subscriber::MAX_MESSAGE_BYTES,
            max_held_bytes: kv_subscriber::MAX_HELD_BYTES,
        }
    }
}

/// Counters (the service exports them as metrics).
#[derive(Debug, Default)]
pub struct ManagerStats {
    pub pods_known: AtomicU64,
    pub pods_eligible: AtomicU64,
    /// Worker tasks alive (subscribed, waiting or cleaning up).
    pub workers_running: AtomicU64,
    pub subscriptions_started: AtomicU64,
    /// Subscriptions lost while they should run (the feed panicked and the hub dropped it).
    pub subscription_failures: AtomicU64,
    /// Workers waiting to subscribe again after a failure.
    pub workers_failed: AtomicU64,
    pub batches_applied: AtomicU64,
    pub events_applied: AtomicU64,
    pub events_rejected: AtomicU64,
    /// Workers cleared after an unrepaired gap or an engine restart.
    pub resets: AtomicU64,
    pub gaps_repaired: AtomicU64,
    pub batches_lost: AtomicU64,
    pub restarts: AtomicU64,
    pub malformed: AtomicU64,
    pub bad_frames: AtomicU64,
    pub apply_lag: ApplyLag,
}

/// Now, as seconds since the Unix epoch (the clock of a batch's `ts`).
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds from a batch's `ts` (the engine's clock) to the moment it is applied to the index.
#[derive(Debug, Clone)]
pub struct ApplyLag(pub prometheus_client::metrics::histogram::Histogram);

impl Default for ApplyLag {
    fn default() -> Self {
        ApplyLag(prometheus_client::metrics::histogram::Histogram::new([
            5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0,
            5.0, 10.0,
        ]))
    }
}

/// Where a worker task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerStatus {
    /// Waiting for the previous incarnation's cleanup or for the pod's churn backoff.
    Waiting,
    /// Its subscription runs (the subscriber's own state says how far it is).
    Subscribed,
    /// Its subscription failed; it subscribes again after a backoff.
    Failed,
}

impl WorkerStatus {
    /// The name the API and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            WorkerStatus::Waiting => "waiting",
            WorkerStatus::Subscribed => "subscribed",
            WorkerStatus::Failed => "failed",
        }
    }
}

/// What the API shows of a running worker (pod, rank).
#[derive(Debug)]
pub struct WorkerInfo {
    /// Its current subscriber's counters (none while waiting or failed).
    counters: parking_lot::RwLock<Option<Arc<kv_subscriber::SubscriberCounters>>>,
    status: std::sync::atomic::AtomicU8,
    /// Subscriptions of this worker that failed.
    pub failures: AtomicU64,
    /// `ts` of the last batch applied, as f64 bits (0: none yet).
    pub last_ts: AtomicU64,
}

impl Default for WorkerInfo {
    fn default() -> Self {
        WorkerInfo {
            counters: parking_lot::RwLock::new(None),
            status: std::sync::atomic::AtomicU8::new(WorkerStatus::Waiting as u8),
            failures: AtomicU64::new(0),
            last_ts: AtomicU64::new(0),
        }
    }
}

impl WorkerInfo {
    /// Its current subscriber's counters, if subscribed.
    pub fn counters(&self) -> Option<Arc<kv_subscriber::SubscriberCounters>> {
        self.counters.read().clone()
    }

    pub fn status(&self) -> WorkerStatus {
        match self.status.load(Relaxed) {
            0 => WorkerStatus::Waiting,
            1 => WorkerStatus::Subscribed,
            _ => WorkerStatus::Failed,
        }
    }

    fn set(&self, status: WorkerStatus, counters: Option<Arc<kv_subscriber::SubscriberCounters>>) {
        *self.counters.write() = counters;
        self.status.store(status as u8, Relaxed);
    }
}

/// Running workers, for the API.
pub type WorkerTable = Arc<parking_lot::RwLock<HashMap<WorkerId, Arc<WorkerInfo>>>>;

/// A pod as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub info: PodInfo,
    /// Whether it has subscriptions (KV sync on and eligible); each worker's
    /// [`WorkerInfo::status`] says whether its subscription runs or failed.
    pub subscribed: bool,
}

/// Per worker, the lock its tasks take in turn.
type Locks = Arc<parking_lot::Mutex<HashMap<WorkerId, Arc<AsyncMutex<()>>>>>;

/// The manager's shared view of pods, for the API.
pub type PodTable = Arc<parking_lot::RwLock<BTreeMap<String, PodView>>>;

struct Run {
    incarnation: (String, i64, Target),
    cancel: CancellationToken,
}

struct Entry {
    scope: usize,
    run: Option<Run>,
    churn: u32,
    last_start: Option<Instant>,
}

/// See the module doc.
pub struct Manager {
    cfg: ManagerConfig,
    index: Arc<Index>,
    hub: Option<Arc<Hub>>,
    entries: HashMap<String, Entry>,
    relisting: HashMap<usize, HashSet<String>>,
    listed_scopes: HashSet<usize>,
    /// Per worker: held by its task for the task's whole life, so the next incarnation's task
    /// of that worker (after a restart, or a delete and a create under the same name) starts
    /// after the previous one has cleaned up. The last task of a worker removes its entry.
    locks: Locks,
    /// Pods in `pods` that are eligible (kept as they change, not recounted per event).
    eligible: u64,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    stats: Arc<ManagerStats>,
    pods: PodTable,
    workers: WorkerTable,
    ready: tokio::sync::watch::Sender<bool>,
    rng: u64,
}

impl Manager {
    /// `hub`: None when KV sync is off (then no socket and no task is ever created; pods are
    /// still tracked for routing).
    pub fn new(cfg: ManagerConfig, index: Arc<Index>, hub: Option<Arc<Hub>>) -> Manager {
        Manager {
            cfg,
            index,
            hub,
            entries: HashMap::new(),
            relisting: HashMap::new(),
            listed_scopes: HashSet::new(),
            locks: Locks::default(),
            eligible: 0,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            stats: Arc::new(ManagerStats::default()),
            pods: PodTable::default(),
            workers: WorkerTable::default(),
            ready: tokio::sync::watch::channel(false).0,
            rng: 0x2545_f491_4f6c_dd1d,
        }
    }

    pub fn stats(&self) -> Arc<ManagerStats> {
        self.stats.clone()
    }

    pub fn pods(&self) -> PodTable {
        self.pods.clone()
    }

    pub fn workers(&self) -> WorkerTable {
        self.workers.clone()
    }

    /// Becomes true once the first complete pod list of every scope has been applied.
    pub fn ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// The task tracker (its `len()` is the number of worker tasks alive).
    pub fn tracker(&self) -> TaskTracker {
        self.tracker.clone()
    }

    /// Runs until `shutdown` or the end of `events` (`scopes`: how many scopes the source has,
    /// for readiness); then stops every worker and waits for them.
    pub async fn run(mut self, mut events: PodStream, scopes: usize, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                ev = events.next() => match ev {
                    Some((scope, ev)) => {
                        self.handle(scope, ev);
                        if !*self.ready.borrow() && self.listed_scopes.len() >= scopes {
                            let _ = self.ready.send(true);
                        }
                    }
                    None => break,
                },
            }
        }
        self.stop().await;
    }

    /// Stops every worker (their blocks leave the index) and waits for all tasks.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for e in self.entries.values_mut() {
            if let Some(r) = e.run.take() {
                r.cancel.cancel();
            }
        }
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Applies one pod event. Idempotent; never blocks.
    pub fn handle(&mut self, scope: usize, ev: PodEvent) {
        match ev {
            PodEvent::Init => {
                self.relisting.insert(scope, HashSet::new());
            }
            PodEvent::InitApply(p) => {
                let key = pods::key_of(&p);
                if let Some(seen) = self.relisting.get_mut(&scope) {
                    seen.insert(key);
                }
                self.upsert(scope, &p);
            }
            PodEvent::InitDone => {
                let seen = self.relisting.remove(&scope).unwrap_or_default();
                let gone: Vec<String> = self
                    .entries
                    .iter()
                    .filter(|(k, e)| e.scope == scope && !seen.contains(*k))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in gone {
                    self.remove(&k);
                }
                self.listed_scopes.insert(scope);
            }
            PodEvent::Apply(p) => self.upsert(scope, &p),
            PodEvent::Delete(p) => self.remove(&pods::key_of(&p)),
        }
        self.stats
            .pods_known
            .store(self.entries.len() as u64, Relaxed);
        self.stats.pods_eligible.store(self.eligible, Relaxed);
    }

    fn upsert(&mut self, scope: usize, pod: &k8s_openapi::api::core::v1::Pod) {
        let info = pods::info(pod);
        let key = info.key.clone();
        let incarnation = info.incarnation();
        let entry = self.entries.entry(key.clone()).or_insert(Entry {
            scope,
            run: None,
            churn: 0,
            last_start: None,
        });
        entry.scope = scope;
        let same = match (&entry.run, &incarnation) {
            (Some(r), Some(i)) => &r.incarnation == i,
            (None, None) => true,
            _ => false,
        };
        let mut start = None;
        if !same {
            if let Some(old) = entry.run.take() {
                tracing::info!(pod = %key, "pod incarnation ended: unsubscribing");
                old.cancel.cancel();
            }
            if let (Some(inc), true) = (incarnation, self.hub.is_some()) {
                let now = Instant::now();
                entry.churn = match entry.last_start {
                    Some(t) if now.duration_since(t) < self.cfg.churn_window => entry.churn + 1,
                    _ => 0,
                };
                entry.last_start = Some(now);
                start = Some((inc, entry.churn));
            }
        }
        if let (Some((inc, churn)), Some(hub)) = (start, self.hub.clone()) {
            let delay = if churn == 0 {
                Duration::ZERO
            } else {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                self.cfg.churn_backoff.delay(churn - 1, self.rng)
            };
            let cancel = self.shutdown.child_token();
            for rank in 0..inc.2.dp_size {
                self.spawn_worker(&key, &inc.2, rank, delay, cancel.clone(), hub.clone());
            }
            tracing::info!(pod = %key, ranks = inc.2.dp_size, ?delay, "subscribing");
            if let Some(e) = self.entries.get_mut(&key) {
                e.run = Some(Run {
                    incarnation: inc,
                    cancel,
                });
            }
        }
        let subscribed = self.entries.get(&key).is_some_and(|e| e.run.is_some());
        let now_eligible = info.target.is_ok();
        let old = self.pods.write().insert(key, PodView { info, subscribed });
        self.count_eligible(old.as_ref(), now_eligible);
    }

    /// Keeps `eligible` in step with a replaced (or removed) pod view.
    fn count_eligible(&mut self, old: Option<&PodView>, now: bool) {
        if old.is_some_and(|v| v.info.target.is_ok()) {
            self.eligible -= 1;
        }
        if now {
            self.eligible += 1;
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            if let Some(r) = e.run {
                tracing::info!(pod = %key, "pod gone: unsubscribing");
                r.cancel.cancel();
            }
        }
        let old = self.pods.write().remove(key);
        self.count_eligible(old.as_ref(), false);
    }

    fn spawn_worker(
        &mut self,
        key: &str,
        t: &Target,
        rank: u32,
        delay: Duration,
        cancel: CancellationToken,
        hub: Arc<Hub>,
    ) {
        let worker = WorkerId::new(key, rank);
        let lock = self.locks.lock().entry(worker.clone()).or_default().clone();
        let mut sub = SubscriberConfig::new(format!("{key} rank {rank}"), t.endpoint(rank));
        sub.replay_endpoint = t.replay_endpoint(rank);
        sub.topic = t.topic.clone().into_bytes();
        sub.dp_rank = Some(rank);
        sub.replay_timeout = self.cfg.replay_timeout;
        sub.heartbeat = self.cfg.heartbeat;
        sub.backoff = self.cfg.reconnect;
        sub.max_message_bytes = self.cfg.max_message_bytes;
        sub.max_held_bytes = self.cfg.max_held_bytes;
        let info = Arc::new(WorkerInfo::default());
        self.workers.write().insert(worker.clone(), info.clone());
        let w = WorkerTask {
            info,
            table: self.workers.clone(),
            worker,
            model: t.model.clone(),
            lora: t.lora.clone(),
            index: self.index.clone(),
            stats: self.stats.clone(),
            log_interval: self.cfg.log_interval,
            failure_backoff: self.cfg.failure_backoff,
            locks: self.locks.clone(),
        };
        self.tracker
            .spawn(Arc::new(w).run(hub, sub, lock, delay, cancel));
    }
}

struct WorkerTask {
    info: Arc<WorkerInfo>,
    table: WorkerTable,
    worker: WorkerId,
    model: String,
    lora: Option<String>,
    index: Arc<Index>,
    stats: Arc<ManagerStats>,
    log_interval: Duration,
    failure_backoff: Backoff,
    locks: Locks,
}

/// How a subscription ended.
enum Ended {
    /// Stopped by the manager.
    Stopped,
    /// It could not run on: why.
    Failed(&'static str),
}

impl WorkerTask {
    async fn run(
        self: Arc<Self>,
        hub: Arc<Hub>,
        sub: SubscriberConfig,
        lock: Arc<AsyncMutex<()>>,
        delay: Duration,
        cancel: CancellationToken,
    ) {
        self.stats.workers_running.fetch_add(1, Relaxed);
        // The previous incarnation's task of this worker finishes its cleanup first.
        let guard = tokio::select! {
            g = lock.clone().lock_owned() => Some(g),
            () = cancel.cancelled() => None,
        };
        if guard.is_some() && !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {},
                () = cancel.cancelled() => {},
            }
        }
        let mut attempt = 0u32;
        // Jitter: a random seed per task, so workers that failed together spread out.
        let mut rng = {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(&self.worker) | 1
        };
        // This task's incarnation of the worker in the index: its writes and its cleanup are
        // refused once a newer one claims the worker, whatever the order tasks run in.
        let mut epoch = None;
        while guard.is_some() && !cancel.is_cancelled() {
            let since = tokio::time::Instant::now();
            epoch = self.index.claim(&self.worker);
            let why = match epoch {
                Some(e) => match self.subscribed(&hub, sub.clone(), e, &cancel).await {
                    Ended::Stopped => break,
                    Ended::Failed(why) => why,
                },
                None => "the index's worker table is full",
            };
            // What the worker held is unknown from here (events go unread until the next
            // subscription, which starts from scratch).
            let removed = epoch.map_or(0, |e| self.index.remove_worker_as(&self.worker, e));
            if since.elapsed() >= self.failure_backoff.cap {
                attempt = 0;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let wait = self.failure_backoff.delay(attempt, rng);
            attempt = attempt.saturating_add(1);
            self.info.set(WorkerStatus::Failed, None);
            self.info.failures.fetch_add(1, Relaxed);
            self.stats.subscription_failures.fetch_add(1, Relaxed);
            self.stats.workers_failed.fetch_add(1, Relaxed);
            tracing::error!(worker = ?self.worker, removed, retry_in = ?wait, "subscription failed ({why}): blocks dropped, subscribing again after a backoff");
            tokio::select! {
                () = tokio::time::sleep(wait) => {},
                () = cancel.cancelled() => {},
            }
            self.stats.workers_failed.fetch_sub(1, Relaxed);
        }
        // Every block of this incarnation leaves the index at once.
        let removed = epoch.map_or(0, |e| self.index.remove_worker_as(&self.worker, e));
        tracing::debug!(worker = ?self.worker, removed, "worker stopped");
        {
            let mut t = self.table.write();
            if t.get(&self.worker)
                .is_some_and(|i| Arc::ptr_eq(i, &self.info))
            {
                t.remove(&self.worker);
            }
        }
        self.stats.workers_running.fetch_sub(1, Relaxed);
        drop(guard);
        let mut locks = self.locks.lock();
        // The map's clone and this one: no other task of the worker waits for it.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(&self.worker);
        }
    }

    /// One subscription, until the manager stops it or the hub drops its feed.
    async fn subscribed(
        self: &Arc<Self>,
        hub: &Hub,
        sub: SubscriberConfig,
        epoch: Epoch,
        cancel: &CancellationToken,
    ) -> Ended {
        let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
        let mut feed = Feed {
            w: self.clone(),
            epoch,
            last_log: None,
            unlogged: 0,
            _done: done_tx,
        };
        let s = hub.subscribe(sub, Sink::Direct(Box::new(move |ev| feed.handle(ev))));
        self.info
            .set(WorkerStatus::Subscribed, Some(s.counters.clone()));
        self.stats.subscriptions_started.fetch_add(1, Relaxed);
        let dropped = tokio::select! {
            () = cancel.cancelled() => false,
            _ = &mut done => true,
        };
        if dropped {
            return Ended::Failed("its feed panicked");
        }
        hub.unsubscribe(s.id);
        // The poller drops the feed after its last event: from here on nothing of this
        // worker is applied, so the caller's `remove_worker` is final.
        let _ = done.await;
        Ended::Stopped
    }
}

/// One worker's events, handled on the hub's poller thread as they are decoded (a direct
/// sink: no channel and no wake-up of a tokio worker per batch; the apply is short and never
/// blocks).
struct Feed {
    /// The worker whose events these are.
    w: Arc<WorkerTask>,
    /// Its incarnation in the index.
    epoch: Epoch,
    last_log: Option<Instant>,
    unlogged: u64,
    /// Dropped with the feed, which tells the worker task that no event will come any more.
    _done: tokio::sync::oneshot::Sender<()>,
}

impl Feed {
    fn handle(&mut self, ev: SubscriberEvent) {
        let bad = match ev {
            SubscriberEvent::Delivery(Delivery::Batch(_, batch)) => {
                let source = Source {
                    model: &self.w.model,
                    default_lora: self.w.lora.as_deref(),
                };
                for e in &batch.events {
                    let a = self.w.index.apply_as(&self.w.worker, self.epoch, source, e);
                    if a.rejected.is_some() {
                        self.w.stats.events_rejected.fetch_add(1, Relaxed);
                    } else {
                        self.w.stats.events_applied.fetch_add(1, Relaxed);
                    }
                }
                self.w.stats.batches_applied.fetch_add(1, Relaxed);
                self.w.info.last_ts.store(batch.ts.to_bits(), Relaxed);
                let now = unix_seconds();
                if batch.ts > 0.0 {
                    self.w.stats.apply_lag.0.observe((now - batch.ts).max(0.0));
                }
                None
            }
            SubscriberEvent::Delivery(Delivery::Gap {
                from,
                to,
                repaired: true,
            }) => {
                self.w.stats.gaps_repaired.fetch_add(1, Relaxed);
                tracing::debug!(worker = ?self.w.worker, from, to, "gap repaired by replay");
                None
            }
            SubscriberEvent::Delivery(Delivery::Gap { from, to, .. }) => {
                // `from <= to` from the sequencer; saturating all the same (wire numbers).
                let lost = to.saturating_sub(from).saturating_add(1);
                self.w.stats.batches_lost.fetch_add(lost, Relaxed);
                self.reset(&format!("batches {from}..={to} lost"));
                None
            }
            SubscriberEvent::Delivery(Delivery::Restarted { last, seq }) => {
                self.w.stats.restarts.fetch_add(1, Relaxed);
                self.reset(&format!("engine restarted (seq {last} -> {seq})"));
                None
            }
            SubscriberEvent::Delivery(Delivery::Malformed { seq, error }) => {
                self.w.stats.malformed.fetch_add(1, Relaxed);
                Some(format!("batch {seq} does not decode: {error}"))
            }
            SubscriberEvent::BadFrame(e) => {
                self.w.stats.bad_frames.fetch_add(1, Relaxed);
                Some(format!("bad frame: {e}"))
            }
            SubscriberEvent::RankMismatch { seq, got } => {
                self.w.stats.events_rejected.fetch_add(1, Relaxed);
                Some(format!("batch {seq} carries data_parallel_rank {got}"))
            }
            SubscriberEvent::Connected
            | SubscriberEvent::Disconnected
            | SubscriberEvent::State(_) => None,
        };
        if let Some(msg) = bad {
            // Counted always, logged once per worker per interval.
            let now = Instant::now();
            if self
                .last_log
                .is_none_or(|t| now.duration_since(t) >= self.w.log_interval)
            {
                tracing::warn!(worker = ?self.w.worker, skipped_since_last_log = self.unlogged, "{msg}");
                self.last_log = Some(now);
                self.unlogged = 0;
            } else {
                self.unlogged += 1;
            }
        }
    }

    /// After lost batches or an engine restart, what the worker held is unknown: drop it.
    fn reset(&self, why: &str) {
        let n = self.w.index.clear_worker_as(&self.w.worker, self.epoch);
        self.w.stats.resets.fetch_add(1, Relaxed);
        tracing::warn!(worker = ?self.w.worker, cleared = n, "{why}: worker's blocks dropped");
    }
}
