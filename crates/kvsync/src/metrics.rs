//! Prometheus metrics: typed families for what the API measures (lookup latency, route
//! decisions), and a collector that reads the manager's, the subscribers' and the index's
//! counters at scrape time, so per-worker series exist exactly while the worker does.

use crate::manager::{ManagerStats, WorkerTable};
use crate::route::approx::Approx;
use prefix_index::Index;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Histograms by labels, each made by a constructor (its buckets).
type HistogramFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// Metrics the API updates.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    pub lookup_seconds: Histogram,
    /// A route request from its body read to its answer serialized (tokenizing included).
    pub route_seconds: Histogram,
    /// Route decisions by how much of the prompt the selected pod holds (the three series of
    /// `kvsync_route_decisions_total`, created once: no label allocation per request).
    pub decisions: Decisions,
    pub tokenizer_errors: Counter,
    /// Time to tokenize a request's text in process (`kvsync_tokenize_seconds{source="local"}`).
    pub tokenize_local: Histogram,
    /// Time of a remote `/tokenize` round trip (`{source="remote"}`), failures included.
    pub tokenize_remote: Histogram,
    /// Tokenizer answers refused for their size (also in `tokenizer_errors`).
    pub tokenizer_oversized: Counter,
    /// The HTTP server's connections.
    pub server: crate::http::server::ServerMetrics,
}

/// Route decisions by bucket.
#[derive(Debug, Clone)]
pub struct Decisions {
    pub miss: Counter,
    pub partial: Counter,
    pub full: Counter,
}

/// The registry and what it reads.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub api: ApiMetrics,
}

impl Metrics {
    pub fn new(
        index: Arc<Index>,
        stats: Arc<ManagerStats>,
        workers: WorkerTable,
        recent: Arc<Approx>,
    ) -> Metrics {
        let mut registry = Registry::with_prefix("kvsync");
        let route_decisions: Family<Vec<(String, String)>, Counter> = Family::default();
        let bucket = |b: &str| {
            route_decisions
                .get_or_create(&vec![("bucket".to_owned(), b.to_owned())])
                .clone()
        };
        let decisions = Decisions {
            miss: bucket("miss"),
            partial: bucket("partial"),
            full: bucket("full"),
        };
        let tokenize_seconds: HistogramFamily = Family::new_with_constructor(|| {
            Histogram::new([
                2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.5,
            ])
        });
        let source = |s: &str| {
            tokenize_seconds
                .get_or_create(&vec![("source".to_owned(), s.to_owned())])
                .clone()
        };
        let api = ApiMetrics {
            tokenize_local: source("local"),
            tokenize_remote: source("remote"),
            lookup_seconds: Histogram::new([
                5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 2e-2,
            ]),
            route_seconds: Histogram::new([
                2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 2e-2, 0.1, 1.0,
            ]),
            decisions,
            tokenizer_errors: Counter::default(),
            tokenizer_oversized: Counter::default(),
            server: Default::default(),
        };
        registry.register(
            "lookup_seconds",
            "Index lookup latency of a route request",
            api.lookup_seconds.clone(),
        );
        registry.register(
            "route_seconds",
            "Time to answer a route request, from its body read to its answer (tokenizing included)",
            api.route_seconds.clone(),
        );
        registry.register(
            "route_decisions",
            "Route decisions by the selected pod's cached prefix (miss, partial, full)",
            route_decisions,
        );
        registry.register(
            "tokenizer_errors",
            "Remote tokenizer failures (answered 502)",
            api.tokenizer_errors.clone(),
        );
        registry.register(
            "tokenize_seconds",
            "Time to tokenize a request's text, by tokenizer: local (in process, from the model's files) or remote (an engine's /tokenize round trip)",
            tokenize_seconds,
        );
        registry.register(
            "tokenizer_oversized",
            "Remote tokenizer answers larger than --tokenizer-max-response-mib (refused, answered 502)",
            api.tokenizer_oversized.clone(),
        );
        registry.register(
            "http_connections",
            "HTTP connections open",
            api.server.connections.clone(),
        );
        registry.register(
            "http_header_timeouts",
            "HTTP connections closed for not sending a whole request head within the header timeout (slow or idle clients)",
            api.server.header_timeouts.clone(),
        );
        registry.register(
            "event_apply_lag_seconds",
            "Seconds from a batch's ts (engine clock) to its application to the index",
            stats.apply_lag.0.clone(),
        );
        registry.register_collector(Box::new(Collector {
            index,
            stats,
            workers,
            recent,
        }));
        Metrics { registry, api }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Debug)]
struct Collector {
    index: Arc<Index>,
    stats: Arc<ManagerStats>,
    workers: WorkerTable,
    recent: Arc<Approx>,
}

/// One unlabelled counter of a collector.
pub(crate) fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// One unlabelled gauge of a collector.
pub(crate) fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.stats;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        gauge(
            &mut e,
            "pods_known",
            "Pods the source lists",
            l(&s.pods_known) as i64,
        )?;
        gauge(
            &mut e,
            "pods_eligible",
            "Pods eligible for KV event sync",
            l(&s.pods_eligible) as i64,
        )?;
        gauge(
            &mut e,
            "workers_running",
            "Worker (pod, rank) tasks alive",
            l(&s.workers_running) as i64,
        )?;
        counter(
            &mut e,
            "subscriptions_started",
            "Subscriptions started",
            l(&s.subscriptions_started),
        )?;
        counter(
            &mut e,
            "subscription_failures",
            "Subscriptions lost because their feed panicked (each retried after a backoff)",
            l(&s.subscription_failures),
        )?;
        gauge(
            &mut e,
            "workers_failed",
            "Workers whose subscription failed, waiting to subscribe again",
            l(&s.workers_failed) as i64,
        )?;
        counter(
            &mut e,
            "batches_applied",
            "Event batches applied to the index",
            l(&s.batches_applied),
        )?;
        counter(
            &mut e,
            "events_applied",
            "Events applied to the index",
            l(&s.events_applied),
        )?;
        counter(
            &mut e,
            "events_rejected",
            "Events the index or the subscriber refused",
            l(&s.events_rejected),
        )?;
        counter(
            &mut e,
            "worker_resets",
            "Workers cleared after lost batches or an engine restart",
            l(&s.resets),
        )?;
        counter(
            &mut e,
            "gaps_repaired",
            "Sequence gaps repaired by replay",
            l(&s.gaps_repaired),
        )?;
        counter(
            &mut e,
            "batches_lost",
            "Batches lost (gaps replay could not repair)",
            l(&s.batches_lost),
        )?;
        counter(
            &mut e,
            "engine_restarts",
            "Engine restarts seen (seq went back)",
            l(&s.restarts),
        )?;
        counter(
            &mut e,
            "decode_errors",
            "Batches that did not decode",
            l(&s.malformed),
        )?;
        counter(
            &mut e,
            "bad_frames",
            "Messages that are not vLLM frames",
            l(&s.bad_frames),
        )?;

        // Subscribers by state, replays, reconnects and lag, summed over workers; and the
        // blocks each worker holds (series removed with the worker).
        let workers = self.workers.read();
        let mut by_state = [0i64; 5];
        let (mut replays_req, mut replays_ok, mut replays_failed, mut connects) = (0, 0, 0, 0);
        let mut refused = 0;
        let mut max_lag = 0.0f64;
        let now = crate::manager::unix_seconds();
        let mut held: Vec<(Vec<(String, String)>, i64)> = Vec::new();
        for (w, info) in workers.iter() {
            if let Some(c) = info.counters() {
                by_state[(c.state() as usize).min(4)] += 1;
                replays_req += l(&c.replays_requested);
                replays_ok += l(&c.replays_completed);
                replays_failed += l(&c.replays_failed);
                connects += l(&c.connects);
                refused += l(&c.connections_refused);
            }
            let ts = f64::from_bits(l(&info.last_ts));
            if ts > 0.0 {
                max_lag = max_lag.max(now - ts);
            }
            let labels = vec![
                ("pod".to_owned(), w.pod.to_string()),
                ("rank".to_owned(), w.dp_rank.to_string()),
            ];
            held.push((labels, self.index.worker_blocks(w).unwrap_or(0) as i64));
        }
        drop(workers);
        let mut m = e.encode_descriptor(
            "subscribers",
            "Subscribers by state",
            None,
            MetricType::Gauge,
        )?;
        for (i, name) in ["connecting", "live", "replaying", "backing_off", "stopped"]
            .iter()
            .enumerate()
        {
            let labels = vec![("state".to_owned(), (*name).to_owned())];
            ConstGauge::new(by_state[i]).encode(m.encode_family(&labels)?)?;
        }
        counter(
            &mut e,
            "replays_requested",
            "Replay requests sent",
            replays_req,
        )?;
        counter(
            &mut e,
            "replays_succeeded",
            "Replays that ended with the end marker",
            replays_ok,
        )?;
        counter(
            &mut e,
            "replays_failed",
            "Replays that timed out or could not be sent",
            replays_failed,
        )?;
        counter(
            &mut e,
            "connects",
            "Subscriber connections established",
            connects,
        )?;
        counter(
            &mut e,
            "connections_refused",
            "Subscriber connections dropped by libzmq and not retried (a frame over the size cap, or another protocol error): sockets reopened",
            refused,
        )?;
        let lag = ConstGauge::new(max_lag);
        lag.encode(e.encode_descriptor(
            "event_lag_seconds",
            "Largest (now - batch ts) over workers at their last batch",
            None,
            lag.metric_type(),
        )?)?;
        let mut m = e.encode_descriptor(
            "worker_blocks",
            "Blocks each worker holds",
            None,
            MetricType::Gauge,
        )?;
        for (labels, v) in &held {
            ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
        }

        let st = self.index.stats();
        gauge(
            &mut e,
            "index_contexts",
            "Index (model, LoRA) contexts",
            st.contexts as i64,
        )?;
        gauge(&mut e, "index_workers", "Index workers", st.workers as i64)?;
        gauge(
            &mut e,
            "index_blocks",
            "Distinct blocks in the index",
            st.blocks as i64,
        )?;
        gauge(
            &mut e,
            "index_bytes",
            "The index's accounting of its memory",
            st.bytes as i64,
        )?;
        counter(
            &mut e,
            "index_evictions",
            "Blocks evicted by the budget or limits",
            st.evictions,
        )?;
        counter(
            &mut e,
            "index_orphans",
            "Stores whose parent was unknown",
            st.orphans,
        )?;
        let r = &self.recent;
        gauge(
            &mut e,
            "recent_bytes",
            "Bytes of the recent routing decisions (the approximate index), within its budget",
            r.bytes() as i64,
        )?;
        gauge(
            &mut e,
            "recent_blocks",
            "Block hashes the recent routing decisions remember",
            r.len() as i64,
        )?;
        counter(
            &mut e,
            "recent_evictions",
            "Recent routing decisions forgotten before their TTL to make room",
            r.evicted_live(),
        )?;
        Ok(())
    }
}
