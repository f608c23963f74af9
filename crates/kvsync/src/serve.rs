//! `kvsync serve`: the index, the subscriber hub (when KV sync is on), a pod source, the manager
//! and the HTTP API, until shutdown: then the server stops accepting and finishes in-flight
//! requests, every subscriber stops, and every task is joined.

use crate::config::Config;
use crate::http::{self, AppState};
use crate::manager::{Manager, ManagerConfig};
use crate::metrics::Metrics;
use crate::pods::source;
use crate::route::approx::Approx;
use crate::tokenize::local::LocalTokenizers;
use crate::tokenize::Tokenizer;
use anyhow::{Context, Result};
use kv_subscriber::Hub;
use prefix_index::{Index, IndexConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Command-line options of `serve` (the AIBRIX_* variables are in [`Config`]).
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub pods_file: Option<PathBuf>,
    pub namespaces: Vec<String>,
    pub pods_interval: Duration,
    pub index_max_bytes: usize,
    pub tokenizer_timeout: Duration,
    /// Largest tokenizer answer read.
    pub tokenizer_max_response_bytes: usize,
    /// Port of a pod's own `/tokenize` when no remote tokenizer endpoint is configured (None:
    /// each pod's HTTP port, `model.aibrix.ai/port`).
    pub pod_tokenizer_port: Option<u16>,
    /// In-process tokenizers, `(model, directory of its Hugging Face files)`
    /// (`--tokenizer MODEL=DIR`, `KVSYNC_TOKENIZERS`), loaded at start; other models use the
    /// remote tokenizer.
    pub tokenizers: Vec<(String, PathBuf)>,
    /// Approximate mode (KV sync off): how long a routing decision counts as cached.
    pub approx_ttl: Duration,
    pub approx_block_size: usize,
    /// Bytes of the recent decisions ([`Approx`]), taken out of `index_max_bytes`: the two
    /// share one memory budget.
    pub approx_max_bytes: usize,
    /// KV sync on: how long a routing decision counts as cached while its events are on the
    /// way (0: rank by announced blocks only).
    pub routed_ttl: Duration,
    /// Largest KV event message read from a pod (`ZMQ_MAXMSGSIZE`).
    pub events_max_message_bytes: usize,
    /// Live KV event bytes a subscriber holds while a replay runs.
    pub events_max_held_bytes: usize,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// The proxy and the choice: policy, weights, timeouts, cool-down, scrape interval.
    pub proxy: crate::proxy::ProxyConfig,
    /// Connection limits of the HTTP server.
    pub http: http::server::Limits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([0, 0, 0, 0], 8090)),
            pods_file: None,
            namespaces: Vec::new(),
            pods_interval: Duration::from_secs(1),
            index_max_bytes: 1 << 30,
            tokenizer_timeout: Duration::from_secs(5),
            tokenizer_max_response_bytes: crate::tokenize::MAX_RESPONSE_BYTES,
            pod_tokenizer_port: None,
            tokenizers: Vec::new(),
            approx_ttl: Duration::from_secs(120),
            approx_block_size: 16,
            approx_max_bytes: 64 << 20,
            routed_ttl: Duration::from_secs(2),
            events_max_message_bytes: kv_subscriber::MAX_MESSAGE_BYTES,
            events_max_held_bytes: kv_subscriber::MAX_HELD_BYTES,
            body_timeout: http::BODY_TIMEOUT,
            proxy: crate::proxy::ProxyConfig::default(),
            http: http::server::Limits::default(),
        }
    }
}

/// A running service: one task owns everything it runs (the HTTP server and its
/// connections, the manager and its worker tasks, the readiness log, the hub's poller thread).
/// Dropped without [`Running::stop`], it still stops all of that, without waiting.
#[derive(Debug)]
pub struct Running {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    /// The manager's worker tasks (empty after `stop`).
    pub tracker: TaskTracker,
    /// The index the service keeps (for its owner's checks).
    pub index: Arc<Index>,
    stop: CancellationToken,
    /// Taken by `stop`.
    task: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl Running {
    /// Stops accepting, finishes in-flight requests, stops every subscriber, joins every task.
    pub async fn stop(mut self) -> Result<()> {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.context("service task")?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts everything; returns once the API listens.
pub async fn start(cfg: Config, opts: Options) -> Result<Running> {
    anyhow::ensure!(
        opts.approx_max_bytes < opts.index_max_bytes,
        "the recent decisions' budget ({} bytes) must be below the index budget ({} bytes), which includes it",
        opts.approx_max_bytes,
        opts.index_max_bytes
    );
    // Loaded first: a bad file stops the start before anything listens.
    let specs = opts.tokenizers.clone();
    let local = tokio::task::spawn_blocking(move || LocalTokenizers::load(&specs))
        .await
        .context("loading the tokenizers")??;
    for (model, t) in local.models() {
        tracing::info!(model, dir = %t.dir.display(), vocab = t.tok.vocab_size(), "local tokenizer loaded");
    }
    let index = Arc::new(Index::new(
        IndexConfig::default()
            .max_bytes(opts.index_max_bytes - opts.approx_max_bytes)
            .max_contexts(cfg.max_contexts)
            .max_blocks_per_context(cfg.max_prefixes_per_context),
    ));
    let hub = if cfg.kv_sync {
        Some(Arc::new(
            Hub::with_poll_timeout(cfg.poll_timeout).context("starting the ZeroMQ poller")?,
        ))
    } else {
        tracing::info!("KV event sync is off: approximate routing, no subscriber");
        None
    };
    let mcfg = ManagerConfig {
        replay_timeout: cfg.replay_timeout,
        max_message_bytes: opts.events_max_message_bytes,
        max_held_bytes: opts.events_max_held_bytes,
        ..ManagerConfig::default()
    };
    let manager = Manager::new(mcfg, index.clone(), hub.clone());
    let (events, scopes) = match &opts.pods_file {
        Some(path) => (source::file(path.clone(), opts.pods_interval), 1),
        None => {
            let client = kube::Client::try_default().await.context(
                "connecting to Kubernetes (in-cluster or KUBECONFIG); use --pods FILE without a cluster",
            )?;
            let n = opts.namespaces.len().max(1);
            (source::kubernetes(client, &opts.namespaces), n)
        }
    };
    let recent = Arc::new(Approx::new(
        if cfg.kv_sync {
            opts.routed_ttl
        } else {
            opts.approx_ttl
        },
        opts.approx_block_size,
        opts.approx_max_bytes,
    ));
    let mut metrics = Metrics::new(
        index.clone(),
        manager.stats(),
        manager.workers(),
        recent.clone(),
    );
    let proxy = Arc::new(crate::proxy::Proxy::new(
        opts.proxy.clone(),
        &mut metrics.registry,
    ));
    let state = Arc::new(AppState {
        index: index.clone(),
        pods: manager.pods(),
        workers: manager.workers(),
        metrics,
        tokenizer: Tokenizer::new(opts.tokenizer_timeout, opts.tokenizer_max_response_bytes),
        tokenizer_endpoint: cfg.tokenizer.as_ref().map(|t| t.endpoint.clone()),
        pod_tokenizer_port: opts.pod_tokenizer_port,
        local,
        body_timeout: opts.body_timeout,
        kv_sync: cfg.kv_sync,
        recent,
        ready: manager.ready(),
        selected: parking_lot::Mutex::default(),
        proxy: proxy.clone(),
    });
    let listener =
        http::server::bind(opts.listen).with_context(|| format!("listening on {}", opts.listen))?;
    let addr = listener.local_addr().context("local address")?;
    tracing::info!(%addr, "API listening");
    let stop = CancellationToken::new();
    let tracker = manager.tracker();
    let mut ready = manager.ready();
    let scraper = proxy.scraper(manager.pods(), stop.clone());
    let peer_reader = proxy.peer_reader(stop.clone());
    let ready_log = {
        let stop = stop.clone();
        async move {
            tokio::select! {
                r = ready.wait_for(|r| *r) => if r.is_ok() {
                    tracing::info!("ready: the first pod list is applied");
                },
                () = stop.cancelled() => {},
            }
        }
    };
    let reclaimer = reclaim_idle(index.clone(), RECLAIM_EVERY, stop.clone());
    let manager = manager.run(events, scopes, stop.clone());
    let server = http::server::serve(
        listener,
        http::router(state.clone()),
        opts.http,
        state.metrics.api.server.clone(),
        stop.clone(),
    );
    // The server, the manager, the load scraper, the peer reader, the reclaimer and the
    // readiness log run in this one task and end with it.
    let running_index = index.clone();
    let task = tokio::spawn(async move {
        let ((), (), (), (), (), ()) =
            tokio::join!(server, manager, ready_log, scraper, reclaimer, peer_reader);
        if let Some(hub) = hub {
            hub.shutdown();
        }
        let s = index.stats();
        tracing::info!(blocks = s.blocks, workers = s.workers, "stopped");
        Ok(())
    });
    Ok(Running {
        addr,
        tracker,
        index: running_index,
        stop,
        task: Some(task),
    })
}

/// How often [`reclaim_idle`] looks for retired workers. Each look wakes the task that owns
/// the server, the manager and the scraper, which polls them all: at 100 ms this was half the
/// service's idle CPU (perf, 64 quiet pods: 565 samples in 30 s against 409 at 1 s).
const RECLAIM_EVERY: Duration = Duration::from_secs(1);

/// Releases retired workers' entries (a big worker's clear or removal, see
/// `prefix_index::Index::reclaim`) when nothing else does: applies release a little with each
/// write, so after a clear on a fleet gone quiet the entries would stay (counted in the memory
/// budget) until the next event. Every `every`, one chunk per hold of the lock until none is
/// left, yielding between chunks; a look with nothing retired costs one read lock.
pub async fn reclaim_idle(index: Arc<Index>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        while index.reclaim() {
            if stop.is_cancelled() {
                return;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let running = start(cfg, opts).await?;
    shutdown.await;
    running.stop().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_events::{BlockHash, BlockStored, Event};
    use prefix_index::{Source, WorkerId};

    #[tokio::test]
    async fn the_reclaimer_releases_a_cleared_workers_entries_on_a_quiet_fleet() {
        let index = Arc::new(Index::new(
            IndexConfig::default().max_blocks_per_context(1 << 20),
        ));
        let chunk = index.config().reclaim_chunk as u64;
        let w = WorkerId::new("ns/pod", 0);
        let src = Source {
            model: "m",
            default_lora: None,
        };
        // 20 chunks' worth of blocks, in prompts of 100 blocks (block size 4).
        let blocks = 20 * chunk / 100 * 100;
        for p in 0..blocks / 100 {
            let hashes = (0..100).map(|b| BlockHash::Uint(p * 1000 + b)).collect();
            let tokens = (0..400).map(|t| (p * 1000 + t) as u32).collect();
            index.apply(
                &w,
                src,
                &Event::BlockStored(BlockStored {
                    block_hashes: hashes,
                    token_ids: tokens,
                    block_size: 4,
                    ..Default::default()
                }),
            );
        }
        let full = index.stats().bytes;
        assert_eq!(u64::from(index.clear_worker(&w)), blocks);
        // Retired, and nothing else writes: the entries stay without the reclaimer.
        let s = index.stats();
        assert_eq!((s.retiring, s.worker_blocks), (1, blocks as usize));
        let stop = CancellationToken::new();
        let task = tokio::spawn(reclaim_idle(
            index.clone(),
            Duration::from_millis(5),
            stop.clone(),
        ));
        let released = async {
            while index.stats().retiring > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), released)
            .await
            .expect("the reclaimer released the retired worker");
        let s = index.stats();
        assert_eq!(s.worker_blocks, 0);
        assert!(s.bytes < full / 10, "{} bytes left of {full}", s.bytes);
        assert!(s.longest_hold <= chunk, "one chunk per hold of the lock");
        index.check_invariants();
        stop.cancel();
        task.await.expect("the reclaimer stops with its token");
    }
}
