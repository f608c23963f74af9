//! vLLM's `/metrics`: Prometheus text with vLLM's own names, types, help, labels
//! (`model_name`, `engine`) and histogram buckets, from `vllm/v1/metrics/loggers.py`
//! (`PrometheusStatLogger`). The text is written directly (prometheus-client refuses counter
//! names ending in `_total`, which is how vLLM's Python client exports its counters).
//!
//! Gauges and token counters come from the engine's [`EngineMetrics`] snapshot; per-request
//! histograms and `vllm:request_success` are observed here from each request's
//! [`TokenEvent`]s, in engine seconds. Deprecated names vLLM no longer exports
//! (`vllm:gpu_cache_usage_perc`, `vllm:time_per_output_token_seconds`) are left out.

use std::fmt::Write as _;

use parking_lot::Mutex;

use super::backend::{EngineMetrics, FinishReason, TokenEvent};

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// vLLM's `FINISH_REASON_STRINGS`: every value is exported, at 0 until seen.
const FINISH_REASONS: [&str; 5] = ["stop", "length", "abort", "error", "repetition"];

/// vLLM's `build_1_2_5_buckets(max_value)`: 1, 2, 5, 10, 20, 50, ... up to `max_value`.
pub fn buckets_1_2_5(max_value: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1usize;
    loop {
        for m in [1usize, 2, 5] {
            match m.checked_mul(scale) {
                Some(v) if v <= max_value => out.push(v as f64),
                _ => return out,
            }
        }
        scale = match scale.checked_mul(10) {
            Some(s) => s,
            None => return out,
        };
    }
}

/// A histogram with fixed bucket bounds (bounded memory).
#[derive(Debug, Clone)]
struct Histogram {
    bounds: Vec<f64>,
    /// Not cumulative; one per bound plus +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[derive(Debug, Clone, Copy)]
enum H {
    Ttft,
    Itl,
    E2e,
    Queue,
    Inference,
    Prefill,
    Decode,
    PromptTokens,
    GenerationTokens,
    MaxTokens,
}

/// (name, help) of each histogram, in [`H`] order.
const HISTOGRAMS: [(&str, &str); 10] = [
    (
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
    ),
    (
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
    ),
    (
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
    ),
    (
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
    ),
    (
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
    ),
    (
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
    ),
    (
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
    ),
    (
        "vllm:request_prompt_tokens",
        "Number of prefill tokens processed.",
    ),
    (
        "vllm:request_generation_tokens",
        "Number of generation tokens processed.",
    ),
    (
        "vllm:request_params_max_tokens",
        "Histogram of the max_tokens request parameter.",
    ),
];

struct Inner {
    histograms: Vec<Histogram>,
    success: [u64; 5],
}

/// The HTTP side's metrics for one engine.
pub struct Metrics {
    /// The `model_name` and `engine` label pairs, escaped, in vLLM's label order.
    labels: String,
    /// The labels of `vllm:cache_config_info`.
    cache_config: String,
    inner: Mutex<Inner>,
}

/// What `vllm:cache_config_info` reports (vLLM's `CacheConfig.metrics_info()`, the fields
/// routers read: the gateway API inference extension reads `block_size` and `num_gpu_blocks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfigInfo {
    pub block_size: usize,
    pub num_gpu_blocks: Option<usize>,
}

impl Metrics {
    pub fn new(
        model_name: &str,
        engine: &str,
        max_model_len: usize,
        cache: CacheConfigInfo,
    ) -> Metrics {
        let tokens = buckets_1_2_5(max_model_len);
        let histograms = [
            TTFT_BUCKETS,
            ITL_BUCKETS,
            REQUEST_LATENCY_BUCKETS,
            REQUEST_LATENCY_BUCKETS,
            REQUEST_LATENCY_BUCKETS,
            REQUEST_LATENCY_BUCKETS,
            REQUEST_LATENCY_BUCKETS,
            &tokens,
            &tokens,
            &tokens,
        ]
        .iter()
        .map(|b| Histogram::new(b))
        .collect();
        Metrics {
            labels: format!(
                "model_name=\"{}\",engine=\"{}\"",
                escape(model_name),
                escape(engine)
            ),
            cache_config: format!(
                "block_size=\"{}\",enable_prefix_caching=\"True\",engine=\"{}\",num_gpu_blocks=\"{}\"",
                cache.block_size,
                escape(engine),
                cache.num_gpu_blocks.map_or_else(|| "None".to_owned(), |n| n.to_string()),
            ),
            inner: Mutex::new(Inner {
                histograms,
                success: [0; 5],
            }),
        }
    }

    fn observe(&self, h: H, v: f64) {
        self.inner.lock().histograms[h as usize].observe(v);
    }

    /// Prometheus text (format 0.0.4) of the engine's `stats` and the observed requests.
    pub fn render(&self, stats: &EngineMetrics) -> String {
        let l = &self.labels;
        let mut out = String::with_capacity(16 * 1024);
        let gauges: [(&str, &str, f64); 3] = [
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                stats.num_requests_running as f64,
            ),
            (
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                stats.num_requests_waiting as f64,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                stats.kv_cache_usage,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{l}}} {}\n",
                num(v)
            );
        }
        let _ = write!(
            out,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
             # TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{{}}} 1.0\n",
            self.cache_config
        );
        let counters: [(&str, &str, u64); 5] = [
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                stats.prefix_cache_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                stats.prefix_cache_hits,
            ),
            (
                "vllm:num_preemptions",
                "Cumulative number of preemption from the engine.",
                stats.num_preemptions,
            ),
            (
                "vllm:prompt_tokens",
                "Number of prefill tokens processed.",
                stats.prompt_tokens,
            ),
            (
                "vllm:generation_tokens",
                "Number of generation tokens processed.",
                stats.generation_tokens,
            ),
        ];
        for (name, help, v) in counters {
            let _ = write!(
                out,
                "# HELP {name}_total {help}\n# TYPE {name}_total counter\n{name}_total{{{l}}} {}\n",
                num(v as f64)
            );
        }
        let inner = self.inner.lock();
        let name = "vllm:request_success";
        let _ = write!(
            out,
            "# HELP {name}_total Count of successfully processed requests.\n\
             # TYPE {name}_total counter\n"
        );
        for (reason, n) in FINISH_REASONS.iter().zip(inner.success) {
            let _ = writeln!(
                out,
                "{name}_total{{{l},finished_reason=\"{reason}\"}} {}",
                num(n as f64)
            );
        }
        for ((name, help), h) in HISTOGRAMS.iter().zip(&inner.histograms) {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
            let mut cumulative = 0;
            for (i, c) in h.counts.iter().enumerate() {
                cumulative += c;
                let le = h
                    .bounds
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), |&b| num(b));
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{l},le=\"{le}\"}} {}",
                    num(cumulative as f64)
                );
            }
            let _ = write!(
                out,
                "{name}_count{{{l}}} {}\n{name}_sum{{{l}}} {}\n",
                num(h.count() as f64),
                num(h.sum)
            );
        }
        out
    }
}

/// Python's `floatToGoString`: `5.0`, `0.25`, `+Inf`.
fn num(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".to_owned()
    } else {
        format!("{v:?}")
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Follows one request's events and observes its latencies in [`Metrics`], as vLLM's
/// `RequestStateStats` does (TTFT and end-to-end from arrival, inter-token between tokens,
/// queue from arrival to scheduling, prefill to the first token, decode to the end).
#[derive(Debug, Clone)]
pub struct RequestObserver {
    arrival: f64,
    max_tokens: usize,
    scheduled: Option<f64>,
    first_token: Option<f64>,
    last_token: Option<f64>,
}

impl RequestObserver {
    /// A request that arrived at engine time `arrival` asking for `max_tokens`.
    pub fn new(arrival: f64, max_tokens: usize) -> RequestObserver {
        RequestObserver {
            arrival,
            max_tokens,
            scheduled: None,
            first_token: None,
            last_token: None,
        }
    }

    pub fn on_event(&mut self, m: &Metrics, ev: &TokenEvent) {
        match *ev {
            TokenEvent::Scheduled { t, .. } => {
                // A preempted request is scheduled again: its queue time is the first wait.
                self.scheduled.get_or_insert(t);
            }
            TokenEvent::Token { t, .. } => {
                match self.last_token {
                    None => m.observe(H::Ttft, t - self.arrival),
                    Some(prev) => m.observe(H::Itl, t - prev),
                }
                self.first_token.get_or_insert(t);
                self.last_token = Some(t);
            }
            TokenEvent::Finished {
                t,
                reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                let scheduled = self.scheduled.unwrap_or(self.arrival);
                let first = self.first_token.unwrap_or(t);
                let last = self.last_token.unwrap_or(t);
                let mut inner = m.inner.lock();
                let mut obs = |h: H, v: f64| inner.histograms[h as usize].observe(v);
                obs(H::E2e, t - self.arrival);
                obs(H::Queue, scheduled - self.arrival);
                obs(H::Prefill, first - scheduled);
                obs(H::Decode, last - first);
                obs(H::Inference, last - scheduled);
                obs(H::PromptTokens, prompt_tokens as f64);
                obs(H::GenerationTokens, completion_tokens as f64);
                obs(H::MaxTokens, self.max_tokens as f64);
                let i = match reason {
                    FinishReason::Stop => 0,
                    FinishReason::Length => 1,
                };
                inner.success[i] += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_as_vllm_builds_them() {
        assert_eq!(
            buckets_1_2_5(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(buckets_1_2_5(4096).last(), Some(&2000.0));
    }

    #[test]
    fn a_request_is_observed_in_engine_seconds() {
        let cache = CacheConfigInfo {
            block_size: 16,
            num_gpu_blocks: Some(100),
        };
        let m = Metrics::new("m\"x", "0", 1000, cache);
        let mut o = RequestObserver::new(1.0, 3);
        for ev in [
            TokenEvent::Scheduled {
                t: 1.5,
                cached_tokens: 0,
            },
            TokenEvent::Token { t: 2.0, id: 1000 },
            TokenEvent::Token { t: 2.02, id: 1001 },
            TokenEvent::Token { t: 2.04, id: 1002 },
            TokenEvent::Finished {
                t: 2.04,
                reason: FinishReason::Length,
                prompt_tokens: 10,
                cached_tokens: 0,
                completion_tokens: 3,
            },
        ] {
            o.on_event(&m, &ev);
        }
        let text = m.render(&EngineMetrics::default());
        let l = "model_name=\"m\\\"x\",engine=\"0\"";
        assert!(text.contains(&format!(
            "vllm:time_to_first_token_seconds_bucket{{{l},le=\"1.0\"}} 1.0"
        )));
        assert!(text.contains(&format!(
            "vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.75\"}} 0.0"
        )));
        assert!(text.contains(&format!(
            "vllm:inter_token_latency_seconds_count{{{l}}} 2.0"
        )));
        assert!(text.contains(&format!("vllm:request_queue_time_seconds_sum{{{l}}} 0.5")));
        assert!(text.contains(&format!(
            "vllm:request_success_total{{{l},finished_reason=\"length\"}} 1.0"
        )));
        assert!(text.contains("# TYPE vllm:prompt_tokens_total counter"));
        assert!(text.contains("vllm:cache_config_info{block_size=\"16\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"100\"} 1.0"));
    }
}
