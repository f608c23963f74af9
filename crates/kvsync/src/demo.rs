//! `kvsync demo`: a fleet of simulated vLLM engines (`engine-sim`), the real `kvsync serve`
//! process on a static pod file pointing at them, and a load of multi-turn conversations over
//! shared system prompts. The same requests are served once per routing policy, each on a fresh
//! fleet; the engines report the prefix-cache hit of every request (the ground truth).
//!
//! - `kvsync`: `POST /v1/route` of a `serve` with KV event sync on;
//! - `approximate`: the same service with KV sync off (routing decisions recorded as cached);
//! - `round_robin`, `random`: no knowledge;
//! - `oracle`: at routing time, asks every engine what it holds, picks the longest hit.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use engine_sim::tokenizer::{
    BOS, END_OF_TURN, FIRST_WORD_ID, ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_USER,
};
use engine_sim::{output_tokens, Engine, EngineConfig, HashForm, Tokenizer};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kv_events::WireFormat;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MODEL: &str = "demo-llm";
const NAMESPACE: &str = "demo";

/// A routing policy the demo compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Kvsync,
    Approximate,
    RoundRobin,
    Random,
    Oracle,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::Kvsync,
        Policy::Approximate,
        Policy::RoundRobin,
        Policy::Random,
        Policy::Oracle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Kvsync => "kvsync",
            Policy::Approximate => "approximate",
            Policy::RoundRobin => "round_robin",
            Policy::Random => "random",
            Policy::Oracle => "oracle",
        }
    }

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// The fleet and the load.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The `kvsync` binary to run as the service.
    pub kvsync_bin: PathBuf,
    pub engines: usize,
    /// KV cache blocks per engine (16 tokens each).
    pub blocks_per_engine: usize,
    pub system_prompts: usize,
    pub system_prompt_tokens: usize,
    pub conversations: usize,
    pub max_turns: usize,
    pub user_tokens: (usize, usize),
    pub output_tokens: (usize, usize),
    /// Concurrent clients (each owns a share of the conversations).
    pub clients: usize,
    /// Service replicas (gateway replicas): client `c` asks replica `c % replicas`. Each
    /// subscribes to every engine; approximate replicas know only their own decisions.
    pub replicas: usize,
    /// Simulated service time: per prompt token not found in the cache, and per output token
    /// (scaled down from a GPU's so that the demo runs in seconds).
    pub prefill_us_per_token: u64,
    pub decode_us_per_token: u64,
    pub seed: u64,
    pub policies: Vec<Policy>,
    /// A progress line on stderr every second.
    pub progress: bool,
    /// Where pod files and the service's logs go.
    pub work_dir: PathBuf,
}

impl DemoConfig {
    pub fn new(kvsync_bin: PathBuf) -> DemoConfig {
        DemoConfig {
            kvsync_bin,
            engines: 8,
            blocks_per_engine: 512,
            system_prompts: 24,
            system_prompt_tokens: 1024,
            conversations: 1000,
            max_turns: 6,
            user_tokens: (32, 256),
            output_tokens: (16, 160),
            clients: 32,
            replicas: 2,
            prefill_us_per_token: 2,
            decode_us_per_token: 200,
            seed: 1,
            policies: Policy::ALL.to_vec(),
            progress: true,
            work_dir: std::env::temp_dir().join(format!("kvsync-demo-{}", std::process::id())),
        }
    }
}

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

/// One request of the load.
#[derive(Debug, Clone)]
pub struct Turn {
    pub prompt: Vec<u32>,
    pub output_len: usize,
}

/// The load: per client, its turns in order. A conversation's turns go to one client, so each
/// turn is sent after the previous one was answered; conversations interleave.
pub fn workload(cfg: &DemoConfig, vocab: u32) -> Vec<Vec<Turn>> {
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let words = |rng: &mut SmallRng, n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.gen_range(FIRST_WORD_ID..vocab))
            .collect()
    };
    let systems: Vec<Vec<u32>> = (0..cfg.system_prompts)
        .map(|_| {
            let mut s = vec![BOS, ROLE_SYSTEM];
            s.extend(words(&mut rng, cfg.system_prompt_tokens.saturating_sub(3)));
            s.push(END_OF_TURN);
            s
        })
        .collect();
    struct Conv {
        id: usize,
        history: Vec<u32>,
        turns_left: usize,
    }
    let clients = cfg.clients.max(1);
    let mut out: Vec<Vec<Turn>> = vec![Vec::new(); clients];
    let mut next_id = 0;
    let mut new_conv = |rng: &mut SmallRng| -> Conv {
        // Popular system prompts are used more (a Zipf-like skew).
        let r: f64 = rng.gen();
        let s = ((r * r) * systems.len() as f64) as usize;
        next_id += 1;
        Conv {
            id: next_id - 1,
            history: systems[s.min(systems.len() - 1)].clone(),
            turns_left: rng.gen_range(1..=cfg.max_turns.max(1)),
        }
    };
    let active_max = (4 * clients).min(cfg.conversations).max(1);
    let mut started = 0;
    let mut active: Vec<Conv> = Vec::new();
    while started < cfg.conversations || !active.is_empty() {
        while active.len() < active_max && started < cfg.conversations {
            active.push(new_conv(&mut rng));
            started += 1;
        }
        let i = rng.gen_range(0..active.len());
        let c = &mut active[i];
        let mut prompt = c.history.clone();
        prompt.push(ROLE_USER);
        let n = rng.gen_range(cfg.user_tokens.0..=cfg.user_tokens.1);
        prompt.extend(words(&mut rng, n));
        prompt.extend([END_OF_TURN, ROLE_ASSISTANT]);
        let output_len = rng.gen_range(cfg.output_tokens.0..=cfg.output_tokens.1);
        c.history = prompt.clone();
        c.history.extend(output_tokens(&prompt, output_len, vocab));
        c.history.push(END_OF_TURN);
        out[c.id % clients].push(Turn { prompt, output_len });
        c.turns_left -= 1;
        if c.turns_left == 0 {
            active.swap_remove(i);
        }
    }
    out
}

/// The vocabulary of the demo model (engines and tokenizer).
pub const VOCAB: u32 = 32_000;

/// A fleet of engines, each with its wire format: map-shaped 0.33 with integer hashes, map
/// 0.24 with 32-byte hashes (replay without topic), array-shaped 0.14 with integer hashes.
pub struct Fleet {
    pub engines: Vec<Engine>,
    configs: Vec<EngineConfig>,
}

impl Fleet {
    pub fn start(n: usize, blocks: usize, seed: u64) -> Result<Fleet> {
        let mut configs: Vec<EngineConfig> = (0..n)
            .map(|i| {
                let (wire, hash_form, replay_with_topic) = match i % 3 {
                    0 => (WireFormat::VLLM_0_33, HashForm::Int, true),
                    1 => (WireFormat::VLLM_0_24, HashForm::Bytes, false),
                    _ => (WireFormat::VLLM_0_14, HashForm::Int, false),
                };
                EngineConfig {
                    num_blocks: blocks,
                    wire,
                    hash_form,
                    replay_with_topic,
                    seed: seed.wrapping_mul(1000).wrapping_add(i as u64),
                    vocab: VOCAB,
                    ..EngineConfig::default()
                }
            })
            .collect();
        let mut engines = Vec::with_capacity(n);
        for (i, cfg) in configs.iter_mut().enumerate() {
            let e = Engine::start(cfg.clone()).with_context(|| format!("starting engine {i}"))?;
            // A restart binds the same ports.
            cfg.pub_port = e.pub_port();
            cfg.replay_port = e.replay_port();
            engines.push(e);
        }
        Ok(Fleet { engines, configs })
    }

    /// Stops engine `i` and starts a new one on the same ports: an empty cache, seq from 0,
    /// another hash seed (as a restarted vLLM process).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let old = self.engines.remove(i);
        old.shutdown();
        self.configs[i].seed = self.configs[i].seed.wrapping_add(1 << 32);
        let e = Engine::start(self.configs[i].clone())
            .with_context(|| format!("restarting engine {i}"))?;
        self.engines.insert(i, e);
        Ok(())
    }

    /// The pod name of engine `i`.
    pub fn pod(i: usize) -> String {
        format!("sim-{i}")
    }

    /// A static pod file (`kubectl get pods -o yaml` shape) with one ready pod per engine.
    pub fn pod_file(&self) -> String {
        let mut s = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for (i, e) in self.engines.iter().enumerate() {
            s.push_str(&pod_yaml(&Fleet::pod(i), e.pub_port(), e.replay_port()));
        }
        s
    }

    /// Blocks announced (stored + removed) and batches published so far.
    pub fn published(&self) -> (u64, u64) {
        self.engines.iter().fold((0, 0), |(b, n), e| {
            let s = e.stats();
            (b + s.blocks_stored + s.blocks_removed, n + s.batches)
        })
    }
}

/// One list item of a pod file.
pub fn pod_yaml(name: &str, pub_port: u16, replay_port: Option<u16>) -> String {
    // An engine without a replay socket is announced as such (not left to the default port).
    let replay = replay_port.map_or("none".to_owned(), |p| p.to_string());
    let replay = format!("      model.aibrix.ai/kv-events-replay-port: \"{replay}\"\n");
    format!(
        "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: {name}\n    namespace: {NAMESPACE}\n    uid: {name}-uid\n    labels:\n      model.aibrix.ai/kv-events-enabled: \"true\"\n      model.aibrix.ai/name: {MODEL}\n    annotations:\n      model.aibrix.ai/kv-events-port: \"{pub_port}\"\n{replay}  status:\n    phase: Running\n    podIP: 127.0.0.1\n    conditions:\n    - type: Ready\n      status: \"True\"\n"
    )
}

/// A small HTTP/1.1 client with pooled connections.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        Http {
            client: Client::builder(TokioExecutor::new()).build(c),
            base: format!("http://{addr}"),
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Vec<u8>) -> Result<(u16, Bytes)> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .context("building a request")?;
        let resp = self
            .client
            .request(req)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {path}: body"))?
            .to_bytes();
        Ok((status, body))
    }

    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let (status, body) = self.call("GET", path, Vec::new()).await?;
        if status != 200 {
            bail!("GET {path}: {status}");
        }
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
    }

    /// `POST /v1/route` by token ids; the answer's JSON.
    pub async fn route(&self, tokens: &[u32]) -> Result<Value> {
        let body = serde_json::to_vec(&json!({"model": MODEL, "token_ids": tokens}))
            .context("encoding a route request")?;
        let (status, body) = self.call("POST", "/v1/route", body).await?;
        if status != 200 {
            bail!("route: {status} {}", String::from_utf8_lossy(&body));
        }
        serde_json::from_slice(&body).context("route answer is not JSON")
    }
}

/// A `kvsync serve` child process.
pub struct Service {
    child: Child,
    pub addr: SocketAddr,
    pub http: Http,
    pub log: PathBuf,
}

impl Service {
    /// Starts `kvsync serve` on `pods_file` and waits until it is ready (and, with KV sync,
    /// until every pod's subscriber is live).
    pub async fn start(
        bin: &Path,
        pods_file: &Path,
        kv_sync: bool,
        tokenizer: SocketAddr,
        pods: usize,
        log: PathBuf,
    ) -> Result<Service> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = std::process::Command::new(bin);
        for (name, _) in crate::config::VARIABLES {
            cmd.env_remove(name);
        }
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--pods")
            .arg(pods_file)
            .arg("--pods-interval-ms")
            .arg("200")
            .env("AIBRIX_KV_EVENT_SYNC_ENABLED", kv_sync.to_string())
            .env("AIBRIX_USE_REMOTE_TOKENIZER", "true")
            .env("AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE", "remote")
            .env("AIBRIX_REMOTE_TOKENIZER_ENGINE", "vllm")
            .env(
                "AIBRIX_REMOTE_TOKENIZER_ENDPOINT",
                format!("http://{tokenizer}"),
            )
            .env(
                "RUST_LOG",
                std::env::var("KVSYNC_DEMO_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("log file")?)
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut svc = Service {
            child,
            addr,
            http: Http::new(addr),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = svc.child.try_wait().context("checking the service")? {
                bail!("kvsync serve exited ({status}); see {}", svc.log.display());
            }
            if svc.is_ready(kv_sync, pods).await {
                return Ok(svc);
            }
            if Instant::now() > deadline {
                bail!(
                    "kvsync serve not ready within 30 s; see {}",
                    svc.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn is_ready(&self, kv_sync: bool, pods: usize) -> bool {
        if !matches!(
            self.http.call("GET", "/readyz", Vec::new()).await,
            Ok((200, _))
        ) {
            return false;
        }
        let Ok(v) = self.http.get_json("/v1/pods").await else {
            return false;
        };
        let list = v["pods"].as_array().map_or(&[][..], Vec::as_slice);
        list.len() == pods
            && (!kv_sync
                || list.iter().all(|p| {
                    p["workers"]
                        .as_array()
                        .is_some_and(|ws| ws.iter().all(|w| w["state"].as_str() == Some("Live")))
                }))
    }

    /// The child's CPU time (user + system), from /proc (USER_HZ is 100 on Linux).
    pub fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .context("reading the service's /proc stat")?;
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("unexpected /proc stat")?;
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            f.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .context("unexpected /proc stat")
        };
        Ok((ticks(11)? + ticks(12)?) / 100.0)
    }

    /// Waits (up to `timeout`) until the service applied `batches` batches; its metrics then.
    pub async fn await_applied(&self, batches: u64, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics().await?;
            let applied = metric_value(&text, "kvsync_batches_applied_total").unwrap_or(0.0) as u64;
            if applied >= batches {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!(
                    "kvsync applied {applied} of {batches} batches within {timeout:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = self.http.call("GET", "/metrics", Vec::new()).await?;
        if status != 200 {
            bail!("/metrics: {status}");
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let status = tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .context("waiting for the service")?
            .context("waiting for the service")?;
        if !status.success() {
            bail!("kvsync serve exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One sample (unlabelled, or the first series) of a metric in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let base = series.split('{').next()?;
        (base == name).then(|| value.parse().ok()).flatten()
    })
}

/// A quantile of a Prometheus histogram, by linear interpolation inside its bucket.
pub fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lo + (le - lo) * frac);
        }
        (lo, below) = (le, count);
    }
    None
}

/// How a client picks an engine.
enum Router {
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

/// The engines' tokenizer (`POST /tokenize`) on a loopback port.
pub struct TokenizerServer {
    pub addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TokenizerServer {
    pub async fn start() -> Result<TokenizerServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the tokenizer")?;
        let addr = listener.local_addr().context("tokenizer address")?;
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(engine_sim::serve_tokenizer(
            listener,
            Tokenizer {
                vocab: VOCAB,
                max_model_len: 32_768,
            },
            stop.clone().cancelled_owned(),
        ));
        Ok(TokenizerServer { addr, stop, task })
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn run_policy(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_inside_buckets() {
        let text = "# HELP x_seconds x\nx_seconds_sum 1\nx_seconds_count 100\n\
                    x_seconds_bucket{le=\"0.001\"} 50\nx_seconds_bucket{le=\"0.002\"} 90\n\
                    x_seconds_bucket{le=\"0.005\"} 100\nx_seconds_bucket{le=\"+Inf\"} 100\n";
        let q = |q| histogram_quantile(text, "x_seconds", q).expect("quantile");
        assert!((q(0.5) - 0.001).abs() < 1e-12);
        assert!((q(0.7) - 0.0015).abs() < 1e-12);
        assert!((q(0.95) - 0.0035).abs() < 1e-12);
        assert_eq!(histogram_quantile("", "x_seconds", 0.5), None);
        assert_eq!(metric_value(text, "x_seconds_count"), Some(100.0));
        assert_eq!(metric_value(text, "x_seconds_bucket"), Some(50.0));
    }

    #[test]
    fn a_conversation_grows_from_its_previous_turn_and_output() {
        let mut cfg = DemoConfig::new(PathBuf::from("kvsync"));
        cfg.conversations = 20;
        cfg.clients = 3;
        cfg.system_prompts = 2;
        cfg.system_prompt_tokens = 64;
        let load = workload(&cfg, VOCAB);
        assert_eq!(load.len(), 3);
        let n: usize = load.iter().map(Vec::len).sum();
        assert!(n >= 20 && n <= 20 * cfg.max_turns);
        // Within a client, a turn that extends an earlier one carries its prompt and output.
        let mut follow_ups = 0;
        for turns in &load {
            for (i, t) in turns.iter().enumerate() {
                for prev in &turns[..i] {
                    let mut h = prev.prompt.clone();
                    h.extend(output_tokens(&prev.prompt, prev.output_len, VOCAB));
                    if t.prompt.starts_with(&h) {
                        follow_ups += 1;
                        break;
                    }
                }
            }
        }
        assert!(follow_ups > 0, "multi-turn conversations");
        assert_eq!(
            workload(&cfg, VOCAB)[0][0].prompt,
            load[0][0].prompt,
            "seeded"
        );
    }
}
