//! `kvsync demo`: a fleet of simulated vLLM engines (`engine-sim`), the real `kvsync serve`
//! process on a static pod file pointing at them, and a load of multi-turn conversations over
//! shared system prompts. The same requests are served once per routing policy, each on a fresh
//! fleet; the engines report the prefix-cache hit of every request (the ground truth).
//!
//! - `kvsync`: `POST /v1/route` of a `serve` with KV event sync on;
//! - `approximate`: the same service with KV sync off (routing decisions recorded as cached);
//! - `round_robin`, `random`: no knowledge;
//! - `oracle`: at routing time, asks every engine what it holds, picks the longest hit.
//!
//! This crate drives the service as a user would: it starts `kvsync serve` as a child process
//! (the binary's path is given) and knows nothing of its internals.
//!
//! - `config`: [`DemoConfig`], [`Policy`]; `workload`: the conversations;
//! - `fleet`: the engines and their tokenizer; `service`: a `serve` child and its metrics;
//! - `policy`: one policy's run; `report`: the figures and the table;
//! - [`serving`]: `kvsync demo`, time to first token policy by policy on the simulator's fleet;
//! - [`bench`]: `kvsync bench`, the OpenAI load generator (workloads, streamed client, summary).

pub mod bench;
mod config;
mod fleet;
mod policy;
mod report;
mod service;
pub mod serving;
mod workload;

pub use config::{DemoConfig, Policy, MODEL};
pub use fleet::{pod_yaml, Fleet, TokenizerServer, VOCAB};
pub use report::{DemoReport, PolicyResult, ServiceFigures};
pub use service::{histogram_quantile, metric_value, Http, Service};
pub use workload::{workload, Turn};

use crate::policy::run_policy;
use anyhow::{Context, Result};
use std::sync::Arc;

/// Runs every policy of `cfg` on the same load (a fresh fleet each), with progress on stderr
/// when `cfg.progress`.
pub async fn run(cfg: &DemoConfig) -> Result<DemoReport> {
    std::fs::create_dir_all(&cfg.work_dir)
        .with_context(|| format!("creating {}", cfg.work_dir.display()))?;
    let load = Arc::new(workload(cfg, VOCAB));
    let requests: usize = load.iter().map(Vec::len).sum();
    let tokenizer = TokenizerServer::start().await?;
    let mut report = DemoReport {
        results: Vec::new(),
        requests,
    };
    let mut outcome = Ok(());
    for &policy in &cfg.policies {
        match run_policy(cfg, policy, load.clone(), tokenizer.addr).await {
            Ok(r) => report.results.push((policy, r)),
            Err(e) => {
                outcome = Err(e.context(format!("policy {}", policy.name())));
                break;
            }
        }
    }
    tokenizer.stop().await;
    outcome.map(|()| report)
}
