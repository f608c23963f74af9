//! The command line: `serve`, `demo`, `config`, `tap`, `capture`. [`main`] parses it and runs
//! one subcommand; `tap` and `capture` print events as JSON lines ([`json`]).

pub mod json;
mod tap;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kv_subscriber::SubscriberConfig;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "kvsync",
    version,
    about = "Exact KV-cache-aware routing index for vLLM fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode a recorded capture of vLLM KV-event frames (the JSON of
    /// shared/testdata/vllm-kv-events) and print every event as a JSON line.
    Capture {
        /// The capture file.
        file: PathBuf,
    },
    /// Run the service: watch pods (Kubernetes, or a static pod file), subscribe to every
    /// eligible vLLM pod's KV events and keep the index. Configuration: AIBRIX_* variables.
    Serve {
        /// A static pod file (`kubectl get pods -o yaml`) instead of the Kubernetes API; re-read
        /// when it changes.
        #[arg(long, env = "KVSYNC_PODS_FILE")]
        pods: Option<PathBuf>,
        /// Namespaces to watch (repeat; default: all).
        #[arg(long = "namespace", env = "KVSYNC_NAMESPACES", value_delimiter = ',')]
        namespaces: Vec<String>,
        /// How often the pod file is checked for changes, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        pods_interval_ms: u64,
        /// Memory budget of the index, in MiB.
        #[arg(long, env = "KVSYNC_INDEX_MAX_MIB", default_value_t = 1024)]
        index_max_mib: usize,
        /// Address of the HTTP API.
        #[arg(long, env = "KVSYNC_LISTEN", default_value = "0.0.0.0:8090")]
        listen: std::net::SocketAddr,
        /// Timeout of a remote tokenizer request, in milliseconds.
        #[arg(long, env = "KVSYNC_TOKENIZER_TIMEOUT_MS", default_value_t = 5000)]
        tokenizer_timeout_ms: u64,
        /// A pod's own /tokenize port, used when AIBRIX_REMOTE_TOKENIZER_ENDPOINT is unset.
        #[arg(long, env = "KVSYNC_POD_TOKENIZER_PORT", default_value_t = 8000)]
        pod_tokenizer_port: u16,
        /// Approximate routing (KV sync off): seconds a routing decision counts as cached.
        #[arg(long, env = "KVSYNC_APPROX_TTL_S", default_value_t = 120)]
        approx_ttl_s: u64,
        /// Approximate routing: block size used to hash prompts.
        #[arg(long, env = "KVSYNC_APPROX_BLOCK_SIZE", default_value_t = 16)]
        approx_block_size: usize,
        /// Memory of the recent routing decisions (the approximate index), in MiB, taken out
        /// of --index-max-mib (one budget for both).
        #[arg(long, env = "KVSYNC_APPROX_MAX_MIB", default_value_t = 64)]
        approx_max_mib: usize,
        /// KV sync on: milliseconds a routing decision counts as cached until the pod's events
        /// announce it (0: rank by announced blocks only).
        #[arg(long, env = "KVSYNC_ROUTED_TTL_MS", default_value_t = 2000)]
        routed_ttl_ms: u64,
    },
    /// Start a fleet of simulated vLLM engines and `kvsync serve` on them, send a load of
    /// multi-turn conversations routed by each policy in turn, and print the engines' real
    /// prefix-cache hit rates, event lag, CPU per million blocks and index size.
    Demo {
        /// Simulated engines (pods).
        #[arg(long, default_value_t = 8)]
        engines: usize,
        /// KV cache blocks per engine (16 tokens each).
        #[arg(long, default_value_t = 512)]
        blocks: usize,
        /// Conversations in the load.
        #[arg(long, default_value_t = 1000)]
        conversations: usize,
        /// Most turns in a conversation.
        #[arg(long, default_value_t = 6)]
        max_turns: usize,
        /// Shared system prompts.
        #[arg(long, default_value_t = 24)]
        system_prompts: usize,
        /// Tokens in a system prompt.
        #[arg(long, default_value_t = 1024)]
        system_prompt_tokens: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// kvsync replicas (like gateway replicas): client c asks replica c % N.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        /// Simulated prefill time per prompt token not in the cache, microseconds.
        #[arg(long, default_value_t = 2)]
        prefill_us_per_token: u64,
        /// Simulated decode time per output token, microseconds.
        #[arg(long, default_value_t = 200)]
        decode_us_per_token: u64,
        /// Seed of the load.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Policies to run, comma-separated (kvsync, approximate, round_robin, random, oracle).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "kvsync,approximate,round_robin,random,oracle"
        )]
        policies: Vec<String>,
    },
    /// Print the configuration the AIBRIX_* variables give, and any warning; exit non-zero
    /// when a value is invalid.
    Config,
    /// Subscribe to a vLLM pod's KV events and print each event, gap and restart as a JSON line
    /// (states and bad frames go to stderr).
    Tap {
        /// The PUB endpoint, e.g. tcp://10.0.0.7:5557.
        endpoint: String,
        /// The replay ROUTER endpoint, e.g. tcp://10.0.0.7:5558.
        #[arg(long)]
        replay: Option<String>,
        /// Topic prefix to subscribe to (default: every topic).
        #[arg(long, default_value = "")]
        topic: String,
        /// Start from this seq (asked from the replay socket).
        #[arg(long)]
        from_seq: Option<u64>,
        /// The data-parallel rank the batches must carry.
        #[arg(long)]
        dp_rank: Option<u32>,
        /// Exit after this many batches (default: run until interrupted).
        #[arg(long)]
        max_batches: Option<u64>,
        /// Replay request timeout, seconds.
        #[arg(long, env = "AIBRIX_KV_EVENT_REPLAY_TIMEOUT_S", default_value_t = 5)]
        replay_timeout_s: u64,
    },
}

/// Parses the command line and runs the subcommand.
pub fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Capture { file } => tap::capture(&file),
        Command::Config => {
            let parsed = match crate::config::from_process_env() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("kvsync: {e}");
                    std::process::exit(2);
                }
            };
            for w in &parsed.warnings {
                eprintln!("warning: {w}");
            }
            println!("{:#?}", parsed.config);
            Ok(())
        }
        Command::Serve {
            pods,
            namespaces,
            pods_interval_ms,
            index_max_mib,
            listen,
            tokenizer_timeout_ms,
            pod_tokenizer_port,
            approx_ttl_s,
            approx_block_size,
            approx_max_mib,
            routed_ttl_ms,
        } => {
            let parsed = match crate::config::from_process_env() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("kvsync: {e}");
                    std::process::exit(2);
                }
            };
            init_logs();
            for w in &parsed.warnings {
                tracing::warn!("{w}");
            }
            let opts = crate::serve::Options {
                listen,
                pods_file: pods,
                namespaces,
                pods_interval: Duration::from_millis(pods_interval_ms),
                index_max_bytes: index_max_mib << 20,
                tokenizer_timeout: Duration::from_millis(tokenizer_timeout_ms),
                pod_tokenizer_port,
                approx_ttl: Duration::from_secs(approx_ttl_s),
                approx_block_size,
                approx_max_bytes: approx_max_mib << 20,
                routed_ttl: Duration::from_millis(routed_ttl_ms),
                body_timeout: crate::http::BODY_TIMEOUT,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async {
                let stop = shutdown_signal();
                crate::serve::run(parsed.config, opts, stop).await
            })
        }
        Command::Demo {
            engines,
            blocks,
            conversations,
            max_turns,
            system_prompts,
            system_prompt_tokens,
            clients,
            replicas,
            prefill_us_per_token,
            decode_us_per_token,
            seed,
            policies,
        } => {
            let mut cfg = kvsync_demo::DemoConfig::new(
                std::env::current_exe().context("locating the kvsync binary")?,
            );
            cfg.engines = engines;
            cfg.blocks_per_engine = blocks;
            cfg.conversations = conversations;
            cfg.max_turns = max_turns;
            cfg.system_prompts = system_prompts;
            cfg.system_prompt_tokens = system_prompt_tokens;
            cfg.clients = clients;
            cfg.replicas = replicas;
            cfg.prefill_us_per_token = prefill_us_per_token;
            cfg.decode_us_per_token = decode_us_per_token;
            cfg.seed = seed;
            cfg.policies = policies
                .iter()
                .map(|p| {
                    kvsync_demo::Policy::parse(p).with_context(|| format!("unknown policy {p:?}"))
                })
                .collect::<Result<_>>()?;
            if engines == 0 || system_prompts == 0 || clients == 0 || replicas == 0 || blocks < 2 {
                bail!("--engines, --system-prompts, --clients and --replicas must be positive, --blocks at least 2");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let report = rt.block_on(kvsync_demo::run(&cfg))?;
            eprintln!("(logs and pod files: {})", cfg.work_dir.display());
            print!("{}", report.render());
            Ok(())
        }
        Command::Tap {
            endpoint,
            replay,
            topic,
            from_seq,
            dp_rank,
            max_batches,
            replay_timeout_s,
        } => {
            let mut cfg = SubscriberConfig::new(format!("tap {endpoint}"), endpoint);
            cfg.replay_endpoint = replay;
            cfg.topic = topic.into_bytes();
            cfg.from_seq = from_seq;
            cfg.dp_rank = dp_rank;
            cfg.replay_timeout = Duration::from_secs(replay_timeout_s);
            tap::tap(cfg, max_batches)
        }
    }
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

/// Resolves on SIGINT or SIGTERM. The handlers are in place when this returns (call it in the
/// runtime, before the service starts): registered only when first awaited, after start-up,
/// a SIGTERM sent as soon as the service said it was ready killed it with the signal's default
/// action instead of a clean stop (the CLI test caught it once in four suite runs).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(term) => {},
            () = recv(int) => {},
        }
        tracing::info!("shutdown signal received");
    }
}
