//! What a demo run is: the policies compared and the fleet, load and service settings.

use std::path::PathBuf;

pub const MODEL: &str = "demo-llm";
pub(crate) const NAMESPACE: &str = "demo";

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
