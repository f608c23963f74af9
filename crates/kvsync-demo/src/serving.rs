//! `kvsync demo`: what a router does to time to first token and throughput, policy by policy,
//! on the simulator's fleet.
//!
//! For each policy, on a fresh fleet (`engine_sim::fleet`: engines with vLLM's scheduler on a
//! calibrated clock, its HTTP API and KV events): `--replicas` `kvsync serve` child processes
//! in the request path with that `--policy` (`approximate`: KV event sync off), or the fleet's
//! oracle router; then the same open-loop load of multi-turn conversations (`bench`) spread
//! over the replicas as gateway clients would. The engines' own counters give the busiest
//! engine's share; the answers' usage gives the prefix hit.
//!
//! The offered load is chosen from the cost model (unless `--rate`): the request rate that
//! would keep the fleet `--load` busy if every request found its conversation's earlier turns
//! cached (a good router's case); a router that loses the prefix needs more prefill than that
//! and queues. Times are the simulated GPU's: wall time × `--speed`.

use crate::bench::client::Record;
use crate::bench::report::Summary;
use crate::bench::workload::{Api, Workload};
use crate::bench::{self, BenchConfig, Load, Stop};
use crate::service::Service;
use anyhow::{bail, Context, Result};
use engine_sim::cost::CostModel;
use engine_sim::fleet::{Fleet, FleetConfig};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The model the demo's fleet serves.
pub const MODEL: &str = "demo-llm";

/// A routing policy of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingPolicy {
    /// kvsync, exact prefix weighed against load (`--policy kv-aware`).
    KvAware,
    /// kvsync, longest exact prefix (`--policy prefix`).
    Prefix,
    /// kvsync with KV event sync off: its own routing decisions are all it knows.
    Approximate,
    /// kvsync, least loaded (`--policy least-load`).
    LeastLoad,
    /// kvsync, round robin (`--policy round-robin`).
    RoundRobin,
    /// The fleet's oracle: every engine's exact cache and queue at routing time.
    Oracle,
}

impl ServingPolicy {
    pub const ALL: [ServingPolicy; 6] = [
        ServingPolicy::KvAware,
        ServingPolicy::Prefix,
        ServingPolicy::Approximate,
        ServingPolicy::LeastLoad,
        ServingPolicy::RoundRobin,
        ServingPolicy::Oracle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ServingPolicy::KvAware => "kv-aware",
            ServingPolicy::Prefix => "prefix",
            ServingPolicy::Approximate => "approximate",
            ServingPolicy::LeastLoad => "least-load",
            ServingPolicy::RoundRobin => "round-robin",
            ServingPolicy::Oracle => "oracle",
        }
    }

    pub fn parse(s: &str) -> Option<ServingPolicy> {
        ServingPolicy::ALL.into_iter().find(|p| p.name() == s)
    }

    /// `kvsync serve --policy` and whether KV event sync is on.
    fn serve(self) -> Option<(&'static str, bool)> {
        match self {
            ServingPolicy::KvAware => Some(("kv-aware", true)),
            ServingPolicy::Prefix => Some(("prefix", true)),
            ServingPolicy::Approximate => Some(("prefix", false)),
            ServingPolicy::LeastLoad => Some(("least-load", true)),
            ServingPolicy::RoundRobin => Some(("round-robin", true)),
            ServingPolicy::Oracle => None,
        }
    }
}

/// `kvsync demo`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Simulated engines (pods).
    #[arg(long, default_value_t = 8)]
    pub engines: usize,
    /// `kvsync serve` replicas in the request path (clients spread over them).
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Replicas do not read each other's in-flight load (no `--peers`): each knows the
    /// others' requests only through the engines' scraped queues.
    #[arg(long)]
    pub no_peers: bool,
    /// KV cache blocks per engine (16 tokens each).
    #[arg(long, default_value_t = 2048)]
    pub blocks: usize,
    /// The engines' cost profile (llama3-8b-h100, llama3-70b-4xh100, llama3-8b-a100).
    #[arg(long, default_value = "llama3-8b-h100")]
    pub profile: String,
    /// Simulated seconds per wall second.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Shared system prompts (popular ones more often).
    #[arg(long, default_value_t = 16)]
    pub system_prompts: usize,
    /// Words (tokens) of a system prompt.
    #[arg(long, default_value_t = 2048)]
    pub system_prompt_tokens: usize,
    /// Most turns of a conversation.
    #[arg(long, default_value_t = 4)]
    pub max_turns: usize,
    /// Words (tokens) of a user message.
    #[arg(long, default_value_t = 256)]
    pub user_tokens: usize,
    /// Output tokens per answer.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Offered load as a fraction of the fleet's estimated capacity (see the module doc).
    #[arg(long, default_value_t = 0.9)]
    pub load: f64,
    /// Offered requests per second (wall), instead of --load.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of load per policy (wall).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Policies, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kv-aware,prefix,approximate,least-load,round-robin,oracle"
    )]
    pub policies: Vec<String>,
    /// An extra argument for every `kvsync serve` (repeat; e.g. `--serve-arg=--prefill-us-per-token=250`).
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    pub serve_args: Vec<String>,
    /// Draw each policy's TTFT distribution (CDF) to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// A demo run.
#[derive(Debug, Clone)]
pub struct ServingConfig {
    pub kvsync_bin: PathBuf,
    pub args: DemoArgs,
    pub policies: Vec<ServingPolicy>,
    pub cost: CostModel,
    pub work_dir: PathBuf,
}

impl ServingConfig {
    pub fn new(kvsync_bin: PathBuf, args: DemoArgs) -> Result<ServingConfig> {
        let policies = args
            .policies
            .iter()
            .map(|p| ServingPolicy::parse(p).with_context(|| format!("unknown policy {p:?}")))
            .collect::<Result<Vec<_>>>()?;
        let cost =
            CostModel::by_name(&args.profile).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
        if args.engines == 0 || args.replicas == 0 || args.system_prompts == 0 {
            bail!("--engines, --replicas and --system-prompts must be positive");
        }
        let positive = |x: f64| x > 0.0 && x.is_finite();
        if ![args.speed, args.duration, args.load]
            .into_iter()
            .all(positive)
        {
            bail!("--speed, --duration and --load must be positive");
        }
        let work_dir = std::env::temp_dir().join(format!("kvsync-demo-{}", std::process::id()));
        Ok(ServingConfig {
            kvsync_bin,
            args,
            policies,
            cost,
            work_dir,
        })
    }

    fn workload(&self) -> Workload {
        Workload::Conversations {
            system_prompts: self.args.system_prompts,
            system_prompt_tokens: self.args.system_prompt_tokens,
            max_turns: self.args.max_turns,
            user_tokens: self.args.user_tokens,
        }
    }

    /// Mean requests per conversation (turns are uniform in 1..=max_turns).
    fn mean_turns(&self) -> f64 {
        (1.0 + self.args.max_turns.max(1) as f64) / 2.0
    }

    /// Requests per wall second that keep the fleet `--load` busy when each request's earlier
    /// turns are cached: each prefills its new user message and the previous answer (and a
    /// first turn, the system prompt once per engine and prompt: ignored), and decodes its
    /// answer in a batch of `DECODE_BATCH`.
    pub fn offered_rate(&self) -> f64 {
        if let Some(r) = self.args.rate {
            return r;
        }
        const DECODE_BATCH: f64 = 16.0;
        let a = &self.args;
        let c = &self.cost;
        let uncached = (a.user_tokens + a.max_tokens) as f64;
        let context = a.system_prompt_tokens as f64 + self.mean_turns() * uncached;
        let per_request = c.per_prefill_token * uncached
            + c.prefill_step_overhead / DECODE_BATCH
            + a.max_tokens as f64
                * (c.per_decode_seq
                    + c.per_context_token * context
                    + c.step_overhead / DECODE_BATCH);
        a.load * a.engines as f64 / per_request * a.speed
    }
}

/// One policy's figures.
#[derive(Debug, Clone)]
pub struct PolicyFigures {
    pub policy: ServingPolicy,
    /// The bench's summary; latencies in simulated milliseconds.
    pub summary: Summary,
    /// The busiest engine's share of the requests the engines finished.
    pub busiest_engine: f64,
    /// TTFTs in simulated ms, sorted (the plot's data).
    pub ttfts_ms: Vec<f64>,
}

/// The demo's outcome.
#[derive(Debug, Clone)]
pub struct ServingReport {
    pub engines: usize,
    pub rate: f64,
    pub speed: f64,
    pub results: Vec<PolicyFigures>,
}

/// Runs every policy of `cfg` on the same load, each on a fresh fleet.
pub async fn run(cfg: &ServingConfig) -> Result<ServingReport> {
    std::fs::create_dir_all(&cfg.work_dir)
        .with_context(|| format!("creating {}", cfg.work_dir.display()))?;
    let rate = cfg.offered_rate();
    let mut report = ServingReport {
        engines: cfg.args.engines,
        rate,
        speed: cfg.args.speed,
        results: Vec::new(),
    };
    for &policy in &cfg.policies {
        let started = Instant::now();
        let r = run_policy(cfg, policy, rate)
            .await
            .with_context(|| format!("policy {}", policy.name()))?;
        eprintln!(
            "  {:<12} done in {:.1} s: TTFT p90 {:.0} ms, hit {:.1} %",
            policy.name(),
            started.elapsed().as_secs_f64(),
            r.summary.ttft_ms.p90,
            r.summary.hit * 100.0
        );
        report.results.push(r);
    }
    Ok(report)
}

async fn run_policy(
    cfg: &ServingConfig,
    policy: ServingPolicy,
    rate: f64,
) -> Result<PolicyFigures> {
    let a = &cfg.args;
    let mut fc = FleetConfig::new(a.engines, MODEL);
    fc.sim.speed = a.speed;
    fc.sim.cost = cfg.cost.clone();
    fc.sim.engine.num_blocks = a.blocks;
    fc.oracle_port = (policy == ServingPolicy::Oracle).then_some(0);
    let fleet = Fleet::start(fc).await.context("starting the fleet")?;
    let outcome = drive(cfg, policy, rate, &fleet).await;
    fleet.shutdown().await;
    outcome
}

async fn drive(
    cfg: &ServingConfig,
    policy: ServingPolicy,
    rate: f64,
    fleet: &Fleet,
) -> Result<PolicyFigures> {
    let a = &cfg.args;
    let dir = cfg.work_dir.join(policy.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pods_file = dir.join("pods.yaml");
    fleet
        .write_pod_file(&pods_file)
        .context("writing the pod file")?;
    let mut services = Vec::new();
    let urls: Vec<String> = match policy.serve() {
        None => vec![fleet.oracle_url().context("the fleet has no oracle")?],
        Some((flag, kv_sync)) => {
            // The replicas read each other's in-flight load (`--peers`; each skips itself).
            let addrs = (0..a.replicas)
                .map(|_| crate::service::free_addr())
                .collect::<Result<Vec<_>>>()?;
            let peers: Vec<String> = if a.replicas > 1 && !a.no_peers {
                let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                vec![format!("--peers={}", list.join(","))]
            } else {
                Vec::new()
            };
            for (r, &addr) in addrs.iter().enumerate() {
                let svc = Service::start_at(
                    addr,
                    &cfg.kvsync_bin,
                    &pods_file,
                    kv_sync,
                    fleet.engine(0).http_addr(),
                    fleet.len(),
                    dir.join(format!("serve-{r}.log")),
                    &[
                        &["--policy".to_owned(), flag.to_owned()],
                        &peers[..],
                        &a.serve_args[..],
                    ]
                    .concat(),
                )
                .await?;
                services.push(svc);
            }
            services
                .iter()
                .map(|s| format!("http://{}", s.addr))
                .collect()
        }
    };
    let bench_cfg = BenchConfig {
        urls,
        model: Some(MODEL.to_owned()),
        api: Api::Chat,
        workload: cfg.workload(),
        // A session is a conversation: sessions start at `rate / mean turns`.
        loads: vec![Load::Open {
            rate: rate / cfg.mean_turns(),
        }],
        stop: Stop::Duration(Duration::from_secs_f64(a.duration)),
        max_tokens: a.max_tokens,
        ignore_eos: true,
        seed: a.seed,
        out: Some(dir.join("requests.jsonl")),
        timeout: Duration::from_secs(120),
        max_inflight: 4096,
        progress: false,
    };
    let detailed = bench::run_detailed(&bench_cfg).await;
    for s in services {
        s.stop().await?;
    }
    let (summary, records) = detailed?
        .into_iter()
        .next()
        .context("the bench ran no load")?;
    let finished: Vec<u64> = (0..fleet.len())
        .filter_map(|i| fleet.engine(i).handle())
        .map(|h| h.stats().requests_finished)
        .collect();
    let total: u64 = finished.iter().sum();
    let busiest_engine = if total == 0 {
        0.0
    } else {
        finished.iter().copied().max().unwrap_or(0) as f64 / total as f64
    };
    Ok(PolicyFigures {
        policy,
        summary: scale(summary, a.speed),
        busiest_engine,
        ttfts_ms: ttfts(&records, a.speed),
    })
}

/// Wall figures → simulated: times × speed, rates ÷ speed.
fn scale(mut s: Summary, speed: f64) -> Summary {
    for p in [&mut s.ttft_ms, &mut s.itl_ms, &mut s.e2e_ms] {
        p.p50 *= speed;
        p.p90 *= speed;
        p.p99 *= speed;
    }
    s.wall_s *= speed;
    s.req_s /= speed;
    s.out_tok_s /= speed;
    s
}

fn ttfts(records: &[Record], speed: f64) -> Vec<f64> {
    let mut v: Vec<f64> = records
        .iter()
        .filter(|r| r.error.is_none())
        .filter_map(|r| r.first_token.map(|t| (t - r.sent) * 1000.0 * speed))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

impl ServingReport {
    fn get(&self, p: ServingPolicy) -> Option<&PolicyFigures> {
        self.results.iter().find(|r| r.policy == p)
    }

    /// The table, the targets and the `demo …` line.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} engines, {:.1} requests/s offered (simulated time; wall × {})",
            self.engines,
            self.rate / self.speed,
            self.speed
        );
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8} {:>7}",
            "policy",
            "hit",
            "TTFT p50",
            "p90",
            "p99",
            "ITL p50",
            "out tok/s",
            "busiest",
            "requests",
            "errors"
        );
        for r in &self.results {
            let m = &r.summary;
            let _ = writeln!(
                s,
                "{:<12} {:>6.1}% {:>7.0}ms {:>7.0}ms {:>7.0}ms {:>6.1}ms {:>9.0} {:>7.1}% {:>8} {:>7}",
                r.policy.name(),
                m.hit * 100.0,
                m.ttft_ms.p50,
                m.ttft_ms.p90,
                m.ttft_ms.p99,
                m.itl_ms.p50,
                m.out_tok_s,
                r.busiest_engine * 100.0,
                m.requests,
                m.errors
            );
        }
        s.push_str(&self.targets());
        let _ = write!(s, "demo");
        for r in &self.results {
            let m = &r.summary;
            let n = r.policy.name();
            let _ = write!(
                s,
                " {n}.hit={:.4} {n}.ttft_p50_ms={:.1} {n}.ttft_p90_ms={:.1} {n}.ttft_p99_ms={:.1} \
                 {n}.itl_p50_ms={:.2} {n}.out_tok_s={:.1} {n}.busiest_share={:.4}",
                m.hit,
                m.ttft_ms.p50,
                m.ttft_ms.p90,
                m.ttft_ms.p99,
                m.itl_ms.p50,
                m.out_tok_s,
                r.busiest_engine
            );
        }
        s.push('\n');
        s
    }

    /// Issue 22's targets for `kv-aware`, as measured (each line says held or missed).
    fn targets(&self) -> String {
        let mut s = String::new();
        let Some(k) = self.get(ServingPolicy::KvAware) else {
            return s;
        };
        let p90 = |p| self.get(p).map(|r| r.summary.ttft_ms.p90);
        let mut line = |ok: bool, what: String| {
            let _ = writeln!(s, "  [{}] {what}", if ok { "held" } else { "missed" });
        };
        let kp = k.summary.ttft_ms.p90;
        if let Some(rr) = p90(ServingPolicy::RoundRobin) {
            line(
                kp <= 0.5 * rr,
                format!("kv-aware TTFT p90 {kp:.0} ms <= 0.5 x round-robin's {rr:.0}"),
            );
        }
        if let Some(pr) = self.get(ServingPolicy::Prefix) {
            let pp = pr.summary.ttft_ms.p90;
            line(
                kp <= 0.8 * pp,
                format!("kv-aware TTFT p90 {kp:.0} ms <= 0.8 x prefix's {pp:.0}"),
            );
            let (kh, ph) = (k.summary.hit, pr.summary.hit);
            line(
                kh >= ph - 0.05,
                format!(
                    "kv-aware hit {:.1} % within 5 points of prefix's {:.1} %",
                    kh * 100.0,
                    ph * 100.0
                ),
            );
        }
        let best_other = self
            .results
            .iter()
            .filter(|r| !matches!(r.policy, ServingPolicy::KvAware | ServingPolicy::Oracle))
            .map(|r| r.summary.out_tok_s)
            .fold(0.0, f64::max);
        line(
            k.summary.out_tok_s >= best_other * 0.99,
            format!("kv-aware throughput {:.0} tok/s >= every other's but oracle (best {best_other:.0})", k.summary.out_tok_s),
        );
        let fair = 1.0 / self.engines.max(1) as f64;
        line(
            k.busiest_engine <= 1.5 * fair,
            format!(
                "kv-aware busiest engine {:.1} % <= 1.5 x fair share {:.1} %",
                k.busiest_engine * 100.0,
                fair * 100.0
            ),
        );
        if let Some(o) = p90(ServingPolicy::Oracle) {
            line(
                kp <= 1.2 * o,
                format!("kv-aware TTFT p90 {kp:.0} ms within 1.2 x oracle's {o:.0}"),
            );
        }
        s
    }

    /// Each policy's TTFT distribution as an SVG plot (a CDF per policy, log-scaled time).
    pub fn svg(&self) -> String {
        const W: f64 = 720.0;
        const H: f64 = 420.0;
        const L: f64 = 60.0;
        const B: f64 = 40.0;
        let colors = [
            "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#444444",
        ];
        let all: Vec<f64> = self
            .results
            .iter()
            .flat_map(|r| r.ttfts_ms.iter().copied())
            .collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
        let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
        let (llo, lhi) = (lo.log10().floor(), hi.log10().ceil());
        let x = |ms: f64| L + (ms.max(lo).log10() - llo) / (lhi - llo) * (W - L - 20.0);
        let y = |q: f64| H - B - q * (H - B - 20.0);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{L}\" y=\"14\">TTFT distribution per policy ({} engines, {:.1} req/s offered)</text>\n",
            self.engines,
            self.rate / self.speed
        );
        let _ = writeln!(
            s,
            "<line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
            y(0.0),
            W - 20.0,
            y(0.0)
        );
        let _ = writeln!(
            s,
            "<line x1=\"{L}\" y1=\"{}\" x2=\"{L}\" y2=\"{}\" stroke=\"black\"/>",
            y(0.0),
            y(1.0)
        );
        let mut d = llo;
        while d <= lhi {
            let ms = 10f64.powf(d);
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{ms} ms</text>",
                x(ms),
                y(0.0) + 16.0
            );
            d += 1.0;
        }
        for q in [0.5, 0.9, 0.99] {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">p{}</text>",
                L - 6.0,
                y(q) + 4.0,
                (q * 100.0) as u32
            );
            let _ = writeln!(
                s,
                "<line x1=\"{L}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
                y(q),
                W - 20.0,
                y(q)
            );
        }
        for (i, r) in self.results.iter().enumerate() {
            let n = r.ttfts_ms.len().max(1) as f64;
            let pts: Vec<String> = r
                .ttfts_ms
                .iter()
                .enumerate()
                .map(|(k, &t)| format!("{:.1},{:.1}", x(t), y((k + 1) as f64 / n)))
                .collect();
            let c = colors[i % colors.len()];
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
                pts.join(" ")
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{}</text>",
                L + 10.0,
                34.0 + 14.0 * i as f64,
                r.policy.name()
            );
        }
        s.push_str("</svg>\n");
        s
    }
}
