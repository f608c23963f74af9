//! `kvsync bench --url URL`: an OpenAI-compatible load generator for prefix-heavy traffic,
//! usable against any server that speaks vLLM's OpenAI API (one engine, kvsync, another
//! router).
//!
//! ```text
//!  workload::Generator ──Session──▶ clients (closed loop: N at once; open loop: Poisson starts)
//!                                      │ client::OpenAi::stream — SSE, timed per chunk
//!                                      ▼
//!                                   Record ──▶ --out JSONL, report::Summary ──▶ table + `bench …` line
//! ```
//!
//! Streaming requests with `stream_options.include_usage`, so the server's own usage counts
//! (prompt, cached, output tokens) are what the summary reports.

pub mod client;
pub mod report;
pub mod workload;

use anyhow::{bail, Context, Result};
use client::{OpenAi, Record};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use report::Summary;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{Api, Generator, Session, Workload};

/// How requests are offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// `concurrency` clients, each sending its next request when the previous one ends.
    Closed { concurrency: usize },
    /// Sessions start at Poisson arrivals of `rate` per second.
    Open { rate: f64 },
}

/// When a run stops starting requests (those under way finish).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    Requests(usize),
    Duration(Duration),
}

/// A bench run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// One or more servers (e.g. gateway replicas): session `i` goes to `urls[i % len]`.
    pub urls: Vec<String>,
    /// `None`: the first model the server's `/v1/models` lists.
    pub model: Option<String>,
    pub api: Api,
    pub workload: Workload,
    /// One run per entry (a rate sweep), in order.
    pub loads: Vec<Load>,
    pub stop: Stop,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub seed: u64,
    pub out: Option<PathBuf>,
    /// A request's whole deadline.
    pub timeout: Duration,
    /// Open loop: sessions under way at most (arrivals wait beyond it; counted).
    pub max_inflight: usize,
    pub progress: bool,
}

/// `kvsync bench`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8090 (kvsync) or http://POD:8000 (vLLM);
    /// several (comma-separated or repeated): sessions spread over them in turn, as clients of
    /// gateway replicas would.
    #[arg(long, required = true, value_delimiter = ',')]
    pub url: Vec<String>,
    /// Model name (default: the first that `/v1/models` lists).
    #[arg(long)]
    pub model: Option<String>,
    /// `chat` (/v1/chat/completions) or `completions` (/v1/completions).
    #[arg(long, default_value = "chat")]
    pub api: String,
    /// `conversations`, `shared-prefix` or `random`.
    #[arg(long, default_value = "conversations")]
    pub workload: String,
    /// Closed loop: clients at once (ignored with --rate or --rates).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Open loop: Poisson arrivals per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// A sweep of open-loop rates, comma-separated: one run and one summary per rate.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Requests per run (default 200 unless --duration is given).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Seconds per run (instead of --requests).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Output tokens per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Send vLLM's `ignore_eos` so that every answer has --max-tokens tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write one JSON line per request here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A request's deadline, seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout_s: f64,
    /// Open loop: sessions under way at most.
    #[arg(long, default_value_t = 4096)]
    pub max_inflight: usize,
    /// conversations: shared system prompts.
    #[arg(long, default_value_t = 24)]
    pub system_prompts: usize,
    /// conversations: words in a system prompt.
    #[arg(long, default_value_t = 1024)]
    pub system_prompt_tokens: usize,
    /// conversations: most turns.
    #[arg(long, default_value_t = 6)]
    pub max_turns: usize,
    /// conversations: words in a user message.
    #[arg(long, default_value_t = 64)]
    pub user_tokens: usize,
    /// shared-prefix: groups sharing a context.
    #[arg(long, default_value_t = 150)]
    pub groups: usize,
    /// shared-prefix: users per group.
    #[arg(long, default_value_t = 5)]
    pub users: usize,
    /// shared-prefix: words of a group's context.
    #[arg(long, default_value_t = 6000)]
    pub context_tokens: usize,
    /// shared-prefix: words of a question.
    #[arg(long, default_value_t = 1200)]
    pub question_tokens: usize,
    /// random: words per prompt.
    #[arg(long, default_value_t = 1024)]
    pub prompt_tokens: usize,
}

impl BenchArgs {
    /// The run these flags describe; every bad value is named.
    pub fn config(&self) -> Result<BenchConfig> {
        let api = match self.api.as_str() {
            "chat" => Api::Chat,
            "completions" => Api::Completions,
            other => bail!("--api {other:?}: expected chat or completions"),
        };
        let workload = match self.workload.as_str() {
            "conversations" => Workload::Conversations {
                system_prompts: self.system_prompts.max(1),
                system_prompt_tokens: self.system_prompt_tokens,
                max_turns: self.max_turns.max(1),
                user_tokens: self.user_tokens.max(1),
            },
            "shared-prefix" => Workload::SharedPrefix {
                groups: self.groups.max(1),
                users: self.users.max(1),
                context_tokens: self.context_tokens,
                question_tokens: self.question_tokens.max(1),
            },
            "random" => Workload::Random {
                prompt_tokens: self.prompt_tokens.max(1),
            },
            other => bail!("--workload {other:?}: expected conversations, shared-prefix or random"),
        };
        let mut loads: Vec<Load> = self
            .rates
            .iter()
            .chain(self.rate.iter())
            .map(|&rate| Load::Open { rate })
            .collect();
        if let Some(bad) = loads
            .iter()
            .find(|l| matches!(l, Load::Open { rate } if !(*rate > 0.0 && rate.is_finite())))
        {
            bail!("rates must be positive: {bad:?}");
        }
        if loads.is_empty() {
            if self.concurrency == 0 {
                bail!("--concurrency must be positive");
            }
            loads.push(Load::Closed {
                concurrency: self.concurrency,
            });
        }
        let stop = match (self.requests, self.duration) {
            (Some(_), Some(_)) => bail!("give --requests or --duration, not both"),
            (_, Some(d)) if !(d > 0.0 && d.is_finite()) => bail!("--duration must be positive"),
            (_, Some(d)) => Stop::Duration(Duration::from_secs_f64(d)),
            (Some(0), _) => bail!("--requests must be positive"),
            (n, None) => Stop::Requests(n.unwrap_or(200)),
        };
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            bail!("--timeout-s must be positive");
        }
        Ok(BenchConfig {
            urls: self.url.clone(),
            model: self.model.clone(),
            api,
            workload,
            loads,
            stop,
            max_tokens: self.max_tokens.max(1),
            ignore_eos: self.ignore_eos,
            seed: self.seed,
            out: self.out.clone(),
            timeout: Duration::from_secs_f64(self.timeout_s),
            max_inflight: self.max_inflight.max(1),
            progress: std::io::stderr().is_terminal(),
        })
    }
}

/// The first model the server lists.
async fn first_model(url: &str) -> Result<String> {
    let http = crate::service::Http::new_url(url);
    let v = http.get_json("/v1/models").await?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .context("/v1/models lists no model: give --model")
}

/// Runs every load of `cfg` in turn on the same requests; one summary per load.
pub async fn run(cfg: &BenchConfig) -> Result<Vec<Summary>> {
    Ok(run_detailed(cfg)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect())
}

/// [`run`], with each load's records (text dropped) beside its summary.
pub async fn run_detailed(cfg: &BenchConfig) -> Result<Vec<(Summary, Vec<Record>)>> {
    let Some(first_url) = cfg.urls.first() else {
        bail!("no --url");
    };
    let clients: Vec<OpenAi> = cfg
        .urls
        .iter()
        .map(|u| OpenAi::new(u, cfg.timeout))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => first_model(first_url).await?,
    };
    let mut out = match &cfg.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut summaries = Vec::new();
    for &load in &cfg.loads {
        let t0 = Instant::now();
        let records = run_load(cfg, &clients, &model, load, t0).await;
        let wall = t0.elapsed().as_secs_f64();
        let rate = match load {
            Load::Open { rate } => Some(rate),
            Load::Closed { .. } => None,
        };
        if let Some(w) = out.as_mut() {
            for r in &records {
                let mut v = r.to_json();
                v["rate"] = serde_json::json!(rate);
                writeln!(w, "{v}").context("writing --out")?;
            }
            w.flush().context("writing --out")?;
        }
        summaries.push((Summary::of(&records, wall, rate), records));
    }
    Ok(summaries)
}

/// State shared by the clients of one run.
struct Shared {
    generator: parking_lot::Mutex<Generator>,
    /// Requests that may still start (`Stop::Requests`).
    budget: AtomicUsize,
    deadline: Option<Instant>,
    done: AtomicUsize,
    errors: AtomicUsize,
    records: parking_lot::Mutex<Vec<Record>>,
}

impl Shared {
    /// Takes the right to send one more request.
    fn take(&self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        self.budget
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

async fn run_load(
    cfg: &BenchConfig,
    clients: &[OpenAi],
    model: &str,
    load: Load,
    t0: Instant,
) -> Vec<Record> {
    let (budget, deadline) = match cfg.stop {
        Stop::Requests(n) => (n, None),
        Stop::Duration(d) => (usize::MAX, Some(t0 + d)),
    };
    let shared = Arc::new(Shared {
        generator: parking_lot::Mutex::new(Generator::new(cfg.workload.clone(), cfg.seed)),
        budget: AtomicUsize::new(budget),
        deadline,
        done: AtomicUsize::new(0),
        errors: AtomicUsize::new(0),
        records: parking_lot::Mutex::new(Vec::new()),
    });
    let progress = cfg.progress.then(|| {
        let s = shared.clone();
        let total = match cfg.stop {
            Stop::Requests(n) => n.to_string(),
            Stop::Duration(d) => format!("{:.0} s", d.as_secs_f64()),
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                eprint!(
                    "\r  {} / {total} requests, {} errors, {:.0} s ",
                    s.done.load(Relaxed),
                    s.errors.load(Relaxed),
                    t0.elapsed().as_secs_f64()
                );
            }
        })
    });
    let mut tasks = tokio::task::JoinSet::new();
    let session_ctx = SessionCtx {
        clients: clients.to_vec(),
        model: model.to_owned(),
        api: cfg.api,
        max_tokens: cfg.max_tokens,
        ignore_eos: cfg.ignore_eos,
        t0,
    };
    match load {
        Load::Closed { concurrency } => {
            for _ in 0..concurrency {
                let (s, ctx) = (shared.clone(), session_ctx.clone());
                tasks.spawn(async move {
                    loop {
                        let session = s.generator.lock().next_session();
                        if !run_session(&ctx, &s, session).await {
                            break;
                        }
                    }
                });
            }
        }
        Load::Open { rate } => {
            let permits = Arc::new(tokio::sync::Semaphore::new(cfg.max_inflight));
            let mut rng = SmallRng::seed_from_u64(cfg.seed ^ 0xa771_7a15);
            let mut next = Instant::now();
            loop {
                // Exponential inter-arrival times: a Poisson process of `rate`.
                let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                next += Duration::from_secs_f64(-u.ln() / rate);
                tokio::time::sleep_until(next.into()).await;
                if shared.deadline.is_some_and(|d| Instant::now() >= d)
                    || shared.budget.load(Relaxed) == 0
                {
                    break;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let session = shared.generator.lock().next_session();
                let (s, ctx) = (shared.clone(), session_ctx.clone());
                tasks.spawn(async move {
                    run_session(&ctx, &s, session).await;
                    drop(permit);
                });
                // Reap finished sessions so the set stays small.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(p) = progress {
        p.abort();
        let _ = p.await;
        eprintln!();
    }
    let mut records = std::mem::take(&mut *shared.records.lock());
    records.sort_by(|a, b| a.sent.total_cmp(&b.sent));
    records
}

#[derive(Clone)]
struct SessionCtx {
    clients: Vec<OpenAi>,
    model: String,
    api: Api,
    max_tokens: usize,
    ignore_eos: bool,
    t0: Instant,
}

/// Runs a session's turns in order; false when the run's budget or time is spent.
async fn run_session(ctx: &SessionCtx, s: &Shared, mut session: Session) -> bool {
    let mut turn = 0;
    loop {
        if !s.take() {
            return false;
        }
        let body = session.body(ctx.api, &ctx.model, ctx.max_tokens, ctx.ignore_eos);
        let client = &ctx.clients[session.id as usize % ctx.clients.len()];
        let mut r = client.stream(ctx.api.path(), &body, ctx.t0).await;
        r.session = session.id;
        r.turn = turn;
        let failed = r.error.is_some();
        let text = std::mem::take(&mut r.text);
        s.done.fetch_add(1, Relaxed);
        if failed {
            s.errors.fetch_add(1, Relaxed);
        }
        s.records.lock().push(r);
        turn += 1;
        if failed || !session.advance(&text) {
            return true;
        }
    }
}
