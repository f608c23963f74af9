//! One policy's run: a fresh fleet, its routers (a `serve` replica's `/v1/route`, round robin,
//! random, the oracle) and the clients sending the load through them.

use crate::config::*;
use crate::fleet::*;
use crate::report::*;
use crate::service::*;
use crate::workload::*;
use anyhow::{bail, Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a client picks an engine.
pub(crate) enum Router {
    /// Client `c` asks replica `c % n`.
    Service(Vec<Http>),
    RoundRobin(AtomicUsize),
    Random,
    Oracle(parking_lot::Mutex<Vec<u64>>),
}

impl Router {
    async fn pick(
        &self,
        fleet: &Fleet,
        client: usize,
        prompt: &[u32],
        rng: &mut SmallRng,
        clock: u64,
    ) -> Result<usize> {
        let n = fleet.engines.len();
        match self {
            Router::Service(replicas) => {
                let answer = replicas[client % replicas.len()].route(prompt).await?;
                let pod = answer["selected"]["pod"]
                    .as_str()
                    .context("route answer without selected.pod")?;
                let name = pod.rsplit('/').next().unwrap_or(pod);
                name.strip_prefix("sim-")
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|&i| i < n)
                    .with_context(|| format!("route selected an unknown pod {pod}"))
            }
            Router::RoundRobin(next) => Ok(next.fetch_add(1, Relaxed) % n),
            Router::Random => Ok(rng.gen_range(0..n)),
            Router::Oracle(last) => {
                let hits: Vec<usize> = fleet
                    .engines
                    .iter()
                    .map(|e| e.peek_hit_tokens(prompt, None))
                    .collect();
                let best = hits.iter().copied().max().unwrap_or(0);
                // Among the best, the least recently selected.
                let mut last = last.lock();
                let pick = (0..n)
                    .filter(|&i| hits[i] == best)
                    .min_by_key(|&i| last[i])
                    .unwrap_or(0);
                last[pick] = clock;
                Ok(pick)
            }
        }
    }
}

pub(crate) async fn run_policy(
    cfg: &DemoConfig,
    policy: Policy,
    load: Arc<Vec<Vec<Turn>>>,
    tokenizer: SocketAddr,
) -> Result<PolicyResult> {
    let fleet = Arc::new(Fleet::start(cfg.engines, cfg.blocks_per_engine, cfg.seed)?);
    let services = match policy {
        Policy::Kvsync | Policy::Approximate => {
            let pods_file = cfg.work_dir.join(format!("pods-{}.yaml", policy.name()));
            std::fs::write(&pods_file, fleet.pod_file())
                .with_context(|| format!("writing {}", pods_file.display()))?;
            let mut v = Vec::new();
            for r in 0..cfg.replicas.max(1) {
                let log = cfg
                    .work_dir
                    .join(format!("kvsync-{}-{r}.log", policy.name()));
                v.push(
                    Service::start(
                        &cfg.kvsync_bin,
                        &pods_file,
                        policy == Policy::Kvsync,
                        tokenizer,
                        cfg.engines,
                        log,
                    )
                    .await?,
                );
            }
            v
        }
        _ => Vec::new(),
    };
    let router = Arc::new(match policy {
        Policy::Kvsync | Policy::Approximate => {
            Router::Service(services.iter().map(|s| s.http.clone()).collect())
        }
        Policy::RoundRobin => Router::RoundRobin(AtomicUsize::new(0)),
        Policy::Oracle => Router::Oracle(parking_lot::Mutex::new(vec![0; cfg.engines])),
        Policy::Random => Router::Random,
    });
    let cpu0 = services
        .iter()
        .map(Service::cpu_seconds)
        .sum::<Result<f64>>()?;
    let (blocks0, batches0) = fleet.published();
    let done = Arc::new(AtomicU64::new(0));
    let per_engine: Arc<Vec<AtomicU64>> =
        Arc::new((0..cfg.engines).map(|_| AtomicU64::new(0)).collect());
    let prompt_tokens = Arc::new(AtomicU64::new(0));
    let hit_tokens = Arc::new(AtomicU64::new(0));
    let clock = Arc::new(AtomicU64::new(1));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for (c, turns) in (0..load.len()).map(|c| (c, load.clone())) {
        let (fleet, router, done, per_engine) = (
            fleet.clone(),
            router.clone(),
            done.clone(),
            per_engine.clone(),
        );
        let (prompt_tokens, hit_tokens, clock) =
            (prompt_tokens.clone(), hit_tokens.clone(), clock.clone());
        let seed = cfg.seed ^ (c as u64).wrapping_mul(0x9e37_79b9);
        let (prefill_us, decode_us) = (cfg.prefill_us_per_token, cfg.decode_us_per_token);
        clients.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed);
            for t in &turns[c] {
                let e = router
                    .pick(&fleet, c, &t.prompt, &mut rng, clock.fetch_add(1, Relaxed))
                    .await?;
                let engine = &fleet.engines[e];
                // A full engine keeps the request waiting, as vLLM's scheduler does.
                let deadline = Instant::now() + Duration::from_secs(30);
                let admitted = loop {
                    match engine.begin(&t.prompt, None) {
                        Ok(a) => break a,
                        Err(full) if Instant::now() > deadline => {
                            bail!("engine {e} could not admit a request for 30 s: {full}")
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                };
                let busy_us = (admitted.prompt_tokens() - admitted.hit_tokens()) as u64
                    * prefill_us
                    + t.output_len as u64 * decode_us;
                tokio::time::sleep(Duration::from_micros(busy_us)).await;
                let served = engine.finish(admitted, t.output_len);
                prompt_tokens.fetch_add(served.prompt_tokens as u64, Relaxed);
                hit_tokens.fetch_add(served.hit_tokens as u64, Relaxed);
                per_engine[e].fetch_add(1, Relaxed);
                done.fetch_add(1, Relaxed);
            }
            anyhow::Ok(())
        });
    }
    let total: usize = load.iter().map(Vec::len).sum();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        tokio::select! {
            r = clients.join_next() => match r {
                Some(r) => r.context("client task")??,
                None => break,
            },
            _ = ticker.tick(), if cfg.progress => {
                let p = prompt_tokens.load(Relaxed).max(1) as f64;
                eprintln!(
                    "  {:<12} {:>6}/{} requests  prefix hit {:5.1} %",
                    policy.name(),
                    done.load(Relaxed),
                    total,
                    100.0 * hit_tokens.load(Relaxed) as f64 / p
                );
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let requests = done.load(Relaxed);
    let busiest = per_engine
        .iter()
        .map(|c| c.load(Relaxed))
        .max()
        .unwrap_or(0);
    let mut result = PolicyResult {
        requests,
        prompt_tokens: prompt_tokens.load(Relaxed),
        hit_tokens: hit_tokens.load(Relaxed),
        busiest_share: busiest as f64 / requests.max(1) as f64,
        seconds,
        service: None,
    };
    if policy == Policy::Kvsync {
        let (blocks1, batches1) = fleet.published();
        // Every batch applied (by every replica) before the CPU is read.
        let mut texts = Vec::new();
        for svc in &services {
            texts.push(svc.await_applied(batches1, Duration::from_secs(30)).await?);
        }
        let cpu = services
            .iter()
            .map(Service::cpu_seconds)
            .sum::<Result<f64>>()?
            - cpu0;
        let text = &texts[0];
        let lag = |q| histogram_quantile(text, "kvsync_event_apply_lag_seconds", q).unwrap_or(0.0);
        result.service = Some(ServiceFigures {
            lag_p50_s: lag(0.5),
            lag_p99_s: lag(0.99),
            cpu_s: cpu / services.len() as f64,
            blocks: blocks1 - blocks0,
            batches: batches1 - batches0,
            index_bytes: metric_value(text, "kvsync_index_bytes").unwrap_or(0.0) as u64,
        });
    }
    for svc in services {
        svc.stop().await?;
    }
    Ok(result)
}
