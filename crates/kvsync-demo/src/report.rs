//! Each policy's figures and the table the demo prints.

use crate::config::*;

/// One policy's outcome.
#[derive(Debug, Clone, Default)]
pub struct PolicyResult {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub hit_tokens: u64,
    /// The busiest engine's share of the requests.
    pub busiest_share: f64,
    pub seconds: f64,
    /// Only for policies that run the service.
    pub service: Option<ServiceFigures>,
}

impl PolicyResult {
    pub fn hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.prompt_tokens as f64
        }
    }
}

/// What the service did during a run.
#[derive(Debug, Clone, Default)]
pub struct ServiceFigures {
    pub lag_p50_s: f64,
    pub lag_p99_s: f64,
    pub cpu_s: f64,
    /// Blocks the engines announced (stored + removed).
    pub blocks: u64,
    pub batches: u64,
    pub index_bytes: u64,
}

impl ServiceFigures {
    pub fn cpu_s_per_mblock(&self) -> f64 {
        if self.blocks == 0 {
            0.0
        } else {
            self.cpu_s / (self.blocks as f64 / 1e6)
        }
    }
}

/// Every policy's outcome, in the order run.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    pub results: Vec<(Policy, PolicyResult)>,
    pub requests: usize,
}

impl DemoReport {
    pub fn get(&self, p: Policy) -> Option<&PolicyResult> {
        self.results.iter().find(|(q, _)| *q == p).map(|(_, r)| r)
    }

    /// The human table and the machine-readable last line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "policy        prefix hit   busiest engine   wall s    ({} requests per policy)\n",
            self.requests
        ));
        for (p, r) in &self.results {
            out.push_str(&format!(
                "{:<13} {:>9.1} % {:>14.1} % {:>8.1}\n",
                p.name(),
                100.0 * r.hit_rate(),
                100.0 * r.busiest_share,
                r.seconds
            ));
        }
        let svc = self.get(Policy::Kvsync).and_then(|r| r.service.clone());
        if let Some(s) = &svc {
            out.push_str(&format!(
                "kvsync pipeline: {} batches / {:.2} M blocks from the engines; event lag p50 {:.2} ms, p99 {:.2} ms; \
                 service CPU {:.2} s = {:.3} s per million blocks (routing included); index {:.1} MiB\n",
                s.batches,
                s.blocks as f64 / 1e6,
                s.lag_p50_s * 1e3,
                s.lag_p99_s * 1e3,
                s.cpu_s,
                s.cpu_s_per_mblock(),
                s.index_bytes as f64 / (1 << 20) as f64,
            ));
        }
        let hit = |p| {
            self.get(p)
                .map_or("na".to_owned(), |r| format!("{:.4}", r.hit_rate()))
        };
        let s = svc.unwrap_or_default();
        out.push_str(&format!(
            "demo kvsync_hit={} approximate_hit={} round_robin_hit={} random_hit={} oracle_hit={} \
             lag_p50_ms={:.3} lag_p99_ms={:.3} cpu_s_per_mblock={:.4} index_bytes={}\n",
            hit(Policy::Kvsync),
            hit(Policy::Approximate),
            hit(Policy::RoundRobin),
            hit(Policy::Random),
            hit(Policy::Oracle),
            s.lag_p50_s * 1e3,
            s.lag_p99_s * 1e3,
            s.cpu_s_per_mblock(),
            s.index_bytes
        ));
        out
    }
}
