//! The simulated engines (`engine-sim`) of one policy's run, their pod file, and their
//! tokenizer's HTTP server.

use crate::config::*;
use anyhow::{Context, Result};
use engine_sim::{Engine, EngineConfig, HashForm, Tokenizer};
use kv_events::WireFormat;
use std::net::SocketAddr;

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
            Tokenizer::words(VOCAB, 32_768),
            stop.clone().cancelled_owned(),
        ));
        Ok(TokenizerServer { addr, stop, task })
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
