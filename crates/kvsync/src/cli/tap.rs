//! `kvsync tap` (one publisher's events, live) and `kvsync capture` (a recorded capture's),
//! printed as JSON lines.

use anyhow::{bail, Context, Result};
use kv_subscriber::{Delivery, Hub, SubscriberConfig, SubscriberEvent};
use std::io::Write;
use std::path::PathBuf;

pub(super) fn tap(cfg: SubscriberConfig, max_batches: Option<u64>) -> Result<()> {
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
                for line in super::json::delivery_lines(&d) {
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

pub(super) fn capture(file: &PathBuf) -> Result<()> {
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
        for line in super::json::event_lines(m.seq, &batch) {
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}
