//! `kvsync_proxy_*`: the proxy's metrics. Histograms and bounded-label counters are typed
//! families; per-pod series (requests, in-flight, scraped load and its age) are read from the
//! [`LoadTable`] at scrape time, so they exist exactly while the pod does.

use crate::load::LoadTable;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

type Labels = Vec<(String, String)>;

/// What the proxy updates (cheap to clone: every field is a shared handle).
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// Request sent to the engine → its first response body frame.
    pub ttft_seconds: Histogram,
    /// Request sent to the engine → the answer's end (or the client gone).
    pub duration_seconds: Histogram,
    /// Request in → request out to the engine (body read, parse, tokenize, choice).
    pub overhead_seconds: Histogram,
    pub retries: Counter,
    upstream_errors: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
}

impl ProxyMetrics {
    /// Registers the proxy's metrics under `kvsync_proxy_` (`registry` has the `kvsync` prefix).
    pub fn register(registry: &mut Registry, load: Arc<LoadTable>, policy: &'static str) -> Self {
        let r = registry.sub_registry_with_prefix("proxy");
        let latency = || {
            Histogram::new([
                1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
            ])
        };
        let m = ProxyMetrics {
            ttft_seconds: latency(),
            duration_seconds: latency(),
            overhead_seconds: Histogram::new([
                2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.1, 1.0,
            ]),
            retries: Counter::default(),
            upstream_errors: Family::default(),
            rejected: Family::default(),
        };
        r.register(
            "ttft_seconds",
            "Seconds from a request sent to an engine to the first frame of its answer",
            m.ttft_seconds.clone(),
        );
        r.register(
            "duration_seconds",
            "Seconds from a request sent to an engine to the end of its answer",
            m.duration_seconds.clone(),
        );
        r.register(
            "overhead_seconds",
            "The proxy's own time: request in to request out to the engine (tokenizing included)",
            m.overhead_seconds.clone(),
        );
        r.register(
            "retries",
            "Requests sent again to the next pod after a failure before the first byte",
            m.retries.clone(),
        );
        r.register(
            "upstream_errors",
            "Engine failures by reason (connect, reset, status_5xx, first_byte_timeout, idle_timeout, mid_stream)",
            m.upstream_errors.clone(),
        );
        r.register(
            "rejected",
            "Requests answered by kvsync without an engine's answer, by reason (bad_request, no_pod, unavailable, timeout)",
            m.rejected.clone(),
        );
        r.register_collector(Box::new(PerPod { load, policy }));
        m
    }

    pub fn upstream_error(&self, reason: &'static str) {
        self.upstream_errors
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    pub fn rejected(&self, reason: &'static str) {
        self.rejected
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }
}

#[derive(Debug)]
struct PerPod {
    load: Arc<LoadTable>,
    policy: &'static str,
}

fn gauge_family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, f64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for PerPod {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let now = Instant::now();
        let pods = self.load.all();
        let pod = |k: &str| vec![("pod".to_owned(), k.to_owned())];
        let mut requests: Vec<(Labels, u64)> = Vec::new();
        let (mut in_flight, mut prefill) = (Vec::new(), Vec::new());
        let (mut waiting, mut running, mut kv, mut age) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for p in &pods {
            for ((model, outcome), n) in p.requests() {
                requests.push((
                    vec![
                        ("model".to_owned(), model),
                        ("pod".to_owned(), p.key.clone()),
                        ("policy".to_owned(), self.policy.to_owned()),
                        ("outcome".to_owned(), outcome.to_owned()),
                    ],
                    n,
                ));
            }
            in_flight.push((pod(&p.key), p.in_flight() as f64));
            prefill.push((pod(&p.key), p.prefill_tokens() as f64));
            if let Some(s) = p.scraped() {
                waiting.push((pod(&p.key), s.waiting));
                running.push((pod(&p.key), s.running));
                kv.push((pod(&p.key), s.kv_usage));
                age.push((
                    pod(&p.key),
                    now.saturating_duration_since(s.at).as_secs_f64(),
                ));
            }
        }
        requests.sort();
        let mut m = e.encode_descriptor(
            "requests",
            "Requests relayed through each pod, by model, pod, policy and outcome",
            None,
            MetricType::Counter,
        )?;
        for (labels, n) in &requests {
            ConstCounter::new(*n).encode(m.encode_family(labels)?)?;
        }
        gauge_family(
            &mut e,
            "in_flight",
            "This replica's requests in flight on each pod",
            &in_flight,
        )?;
        gauge_family(
            &mut e,
            "prefill_tokens",
            "This replica's uncached prompt tokens in flight on each pod (no first byte yet)",
            &prefill,
        )?;
        gauge_family(
            &mut e,
            "scraped_waiting",
            "Each pod's vllm:num_requests_waiting at its last scrape",
            &waiting,
        )?;
        gauge_family(
            &mut e,
            "scraped_running",
            "Each pod's vllm:num_requests_running at its last scrape",
            &running,
        )?;
        gauge_family(
            &mut e,
            "scraped_kv_cache_usage",
            "Each pod's vllm:kv_cache_usage_perc (0..1) at its last scrape",
            &kv,
        )?;
        gauge_family(
            &mut e,
            "scrape_age_seconds",
            "Seconds since each pod's last successful scrape",
            &age,
        )?;
        use crate::metrics::{counter, gauge};
        let l = &self.load;
        for (name, help, v) in [
            (
                "stale_readings",
                "Scraped readings a decision ignored as older than 3 scrape intervals",
                l.stale_readings.load(Relaxed),
            ),
            (
                "scrape_errors",
                "Scrapes of a pod's /metrics that failed",
                l.scrape_errors.load(Relaxed),
            ),
            (
                "peer_errors",
                "Reads of a peer replica's /v1/load that failed (name unresolved, unreachable, timeout, bad answer)",
                l.peer_errors.load(Relaxed),
            ),
            (
                "peer_decisions_pushed",
                "Routing decisions pushed to the peer replicas",
                l.share.pushed.load(Relaxed),
            ),
            (
                "peer_decisions_dropped",
                "Routing decisions not pushed to the peers: their queue was full, or no peer answered the last read",
                l.share.dropped.load(Relaxed),
            ),
            (
                "peer_decisions_received",
                "Routing decisions received from the peer replicas",
                l.share.received.load(Relaxed),
            ),
        ] {
            counter(&mut e, name, help, v)?;
        }
        gauge(
            &mut e,
            "peers",
            "Peer replicas whose in-flight load was read in the last round (--peers)",
            l.peers_read.load(Relaxed) as i64,
        )?;
        let backing_off = l.all().iter().filter(|p| p.scrape_backing_off()).count();
        gauge(
            &mut e,
            "scrape_backoff_pods",
            "Pods whose /metrics failed twice or more in a row, scraped less often (up to every 32 intervals) until one answers",
            backing_off as i64,
        )?;
        Ok(())
    }
}
