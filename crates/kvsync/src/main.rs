//! The `kvsync` binary: parses the command line and runs one subcommand.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Capture { file } => capture(&file),
    }
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
