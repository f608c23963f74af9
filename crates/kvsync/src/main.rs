//! The `kvsync` binary: parses the command line and runs one subcommand.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kv_events::{Delivery, Hub, SubscriberConfig, SubscriberEvent};
use std::io::Write;
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Capture { file } => capture(&file),
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
            tap(cfg, max_batches)
        }
    }
}

fn tap(cfg: SubscriberConfig, max_batches: Option<u64>) -> Result<()> {
    let hub = Hub::start().context("starting the ZeroMQ poller")?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    hub.subscribe(cfg, tx);
    let mut out = std::io::stdout().lock();
    let mut batches = 0u64;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            SubscriberEvent::Delivery(d) => {
                if matches!(d, Delivery::Batch(..)) {
                    batches += 1;
                }
                for line in kvsync::json::delivery_lines(&d) {
                    writeln!(out, "{line}")?;
                }
                out.flush()?;
                if max_batches.is_some_and(|m| batches >= m) {
                    break;
                }
            }
            SubscriberEvent::BadFrame(e) => eprintln!("bad frame: {e}"),
            SubscriberEvent::RankMismatch { seq, got } => {
                eprintln!("seq {seq}: data_parallel_rank {got} is not this subscriber's")
            }
            other => eprintln!("{other:?}"),
        }
    }
    hub.shutdown();
    Ok(())
}

fn capture(file: &PathBuf) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let Some(live) = doc["live"].as_array() else {
        bail!("{}: no `live` array of messages", file.display());
    };
    let mut out = std::io::stdout().lock();
    for (i, msg) in live.iter().enumerate() {
        let frames: Vec<Vec<u8>> = msg["frames_hex"]
            .as_array()
            .map(|fs| {
                fs.iter()
                    .map(|f| hex::decode(f.as_str().unwrap_or("zz")))
                    .collect()
            })
            .transpose()
            .with_context(|| format!("message {i}: frames_hex is not hex"))?
            .with_context(|| format!("message {i}: no frames_hex"))?;
        let m = kv_events::parse_live(&frames).with_context(|| format!("message {i}"))?;
        let batch =
            kv_events::decode(m.payload).with_context(|| format!("message {i} (seq {})", m.seq))?;
        for line in kvsync::json::event_lines(m.seq, &batch) {
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}
