//! `kvsync sim`: its flags ([`SimArgs`]) and [`run`], which starts the fleet, writes the pod
//! file, prints one JSON line per engine (then the oracle's, then `ready`) and serves until
//! the shutdown future resolves.

use std::future::Future;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::json;

use super::{Flavour, Fleet, FleetConfig, FleetError};
use crate::cost::CostModel;

/// The flags of `kvsync sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Simulated vLLM engines.
    #[arg(long, default_value_t = 4)]
    pub engines: usize,
    /// Write a static pod file (`kvsync serve --pods FILE` reads it) here.
    #[arg(long)]
    pub pods_out: Option<PathBuf>,
    /// The served model name (requests name it; the pods' `model.aibrix.ai/name`).
    #[arg(long, default_value = "sim-llama")]
    pub model: String,
    /// The cost profile: llama3-8b-h100, llama3-70b-4xh100 or llama3-8b-a100.
    #[arg(long, default_value = "llama3-8b-h100")]
    pub profile: String,
    /// Engine time runs this many times faster than the wall clock.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// KV cache blocks per engine.
    #[arg(long, default_value_t = 4096)]
    pub blocks: usize,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// vLLM's --max-num-seqs.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// vLLM's --max-num-batched-tokens.
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// vLLM's --max-model-len.
    #[arg(long, default_value_t = 8192)]
    pub max_model_len: usize,
    /// Seeds the engines' block hashes (engine i: seed × 1000 + i; 0 and engine 0: vLLM's
    /// default NONE_HASH).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The oracle router's port (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub oracle_port: u16,
    /// Run no oracle router.
    #[arg(long)]
    pub no_oracle: bool,
    /// The address every socket binds (HTTP and KV events).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// The engines' KV event flavours, VERSION:HASH:REPLAY (HASH int or bytes, REPLAY topic,
    /// plain or none), cycled over the engines.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.33:int:topic,0.24:bytes:plain,0.14:int:plain"
    )]
    pub wire: Vec<Flavour>,
    /// The pods' namespace in the pod file.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// A model's Hugging Face tokenizer files (the directory of `tokenizer.json` and
    /// `tokenizer_config.json`): the engines then tokenize, count, hash and detokenize as vLLM
    /// serving that model (default: a deterministic word tokenizer).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
}

/// Bad flags.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error(transparent)]
    Profile(#[from] crate::cost::UnknownProfile),
    #[error("--{0} must be at least {1}")]
    TooSmall(&'static str, usize),
    #[error("--speed must be a positive number, not {0}")]
    Speed(f64),
    #[error("--tokenizer {}: {source}", dir.display())]
    Tokenizer {
        dir: PathBuf,
        #[source]
        source: hf_tokenize::LoadError,
    },
}

impl SimArgs {
    /// The fleet these flags describe.
    pub fn config(&self) -> Result<FleetConfig, ArgsError> {
        for (name, v, min) in [
            ("engines", self.engines, 1),
            ("blocks", self.blocks, 2),
            ("block-size", self.block_size, 1),
            ("max-num-seqs", self.max_num_seqs, 1),
            ("max-num-batched-tokens", self.max_num_batched_tokens, 1),
            ("max-model-len", self.max_model_len, 1),
        ] {
            if v < min {
                return Err(ArgsError::TooSmall(name, min));
            }
        }
        if self.wire.is_empty() {
            return Err(ArgsError::TooSmall("wire (flavours)", 1));
        }
        if !(self.speed.is_finite() && self.speed > 0.0) {
            return Err(ArgsError::Speed(self.speed));
        }
        let mut cfg = FleetConfig::new(self.engines, &self.model);
        cfg.sim.cost = CostModel::by_name(&self.profile)?;
        cfg.sim.speed = self.speed;
        cfg.sim.engine.num_blocks = self.blocks;
        cfg.sim.engine.block_size = self.block_size;
        cfg.sim.engine.host = self.host;
        cfg.sim.engine.seed = self.seed;
        cfg.sim.sched.max_num_seqs = self.max_num_seqs;
        cfg.sim.sched.max_num_batched_tokens = self.max_num_batched_tokens;
        cfg.sim.sched.max_model_len = self.max_model_len;
        cfg.flavours = self.wire.clone();
        cfg.namespace = self.namespace.clone();
        cfg.oracle_port = (!self.no_oracle).then_some(self.oracle_port);
        if let Some(dir) = &self.tokenizer {
            let tok =
                hf_tokenize::Tokenizer::from_dir(dir).map_err(|source| ArgsError::Tokenizer {
                    dir: dir.clone(),
                    source,
                })?;
            // Generated ids are drawn below the base vocabulary (no special tokens), so every
            // one decodes.
            cfg.sim.sched.vocab = u32::try_from(tok.base_vocab_size()).unwrap_or(u32::MAX);
            cfg.tokenizer = Some(std::sync::Arc::new(tok));
        }
        Ok(cfg)
    }
}

/// Why `kvsync sim` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

/// Starts the fleet (on the current tokio runtime), writes the pod file, prints one JSON line
/// per engine (`{"name", "url", "kv_events", "replay", "wire"}`), the oracle's
/// (`{"oracle": URL}`) when it runs, then `ready`; serves until `shutdown` resolves, then
/// stops everything ([`Fleet::shutdown`]).
pub async fn run(args: SimArgs, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let cfg = args.config()?;
    tracing::info!(engines = cfg.engines, profile = %cfg.sim.cost, speed = cfg.sim.speed, "starting the simulated fleet");
    let fleet = Fleet::start(cfg).await?;
    let printed = (|| {
        if let Some(path) = &args.pods_out {
            fleet.write_pod_file(path)?;
        }
        let mut out = std::io::stdout().lock();
        for e in fleet.infos() {
            writeln!(out, "{}", e.json_line()).map_err(RunError::Stdout)?;
        }
        if let Some(url) = fleet.oracle_url() {
            writeln!(out, "{}", json!({ "oracle": url })).map_err(RunError::Stdout)?;
        }
        writeln!(out, "ready").map_err(RunError::Stdout)?;
        out.flush().map_err(RunError::Stdout)
    })();
    if printed.is_ok() {
        shutdown.await;
        tracing::info!("stopping the simulated fleet");
    }
    fleet.shutdown().await;
    printed
}
