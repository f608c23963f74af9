//! Ingestion stalls behind a big worker's removal or clear (issue 19 item 7).
//!
//! In one process, like `kvsync serve` but without sockets: a "poller" thread applies the
//! batches of 64 pods on a fixed schedule (each batch: a 32-block prompt stored and, once the
//! pod's pool of 4096 blocks is full, its oldest 32 blocks removed), as the subscriber hub's
//! poller thread does; a "manager" thread churns big workers: it fills one with
//! `STALL_BIG_BLOCKS` blocks (default 1 M), then removes it (`Index::remove_worker`, as a
//! worker task does when its pod goes); then fills one again and has the poller clear it in
//! line (`Index::clear_worker`, as the feed does after lost batches), then removes it.
//!
//! A batch's lag is the time from when it was due to when the poller had applied it; the
//! bench prints the longest and the p99 lag of the batches due during each removal or clear
//! (and 20 ms after, while the backlog drains), the operation's own duration, and the whole
//! run's; and the same for quiet windows (150 ms with neither fill nor removal: the noise
//! floor of a machine shared with other work). `STALL_SHORT=1` (or `-- --short`): 200 k blocks, one round, for a quick check.
//!
//! `cargo bench -p prefix-index --bench stall`

use kv_events::{BlockHash, BlockRemoved, BlockStored, Event};
use prefix_index::{Index, IndexConfig, Source, WorkerId};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PODS: usize = 64;
const BS: usize = 16;
const BATCH_BLOCKS: usize = 32;
const POOL: usize = 4096;
const SRC: Source<'static> = Source {
    model: "m",
    default_lora: None,
};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn stored(hashes: &[u64], rng: &mut Rng) -> Event {
    Event::BlockStored(BlockStored {
        block_hashes: hashes.iter().map(|&h| BlockHash::Uint(h)).collect(),
        parent_block_hash: None,
        token_ids: (0..hashes.len() * BS)
            .map(|_| 1000 + (rng.next() % 30_000) as u32)
            .collect(),
        block_size: BS as u32,
        ..Default::default()
    })
}

/// Fills `w` with `blocks` blocks in events of 512 (each under the lock on its own).
fn fill(index: &Index, w: &WorkerId, blocks: usize, next_hash: &mut u64, rng: &mut Rng) {
    let mut left = blocks;
    while left > 0 {
        let n = left.min(512);
        let hashes: Vec<u64> = (0..n)
            .map(|_| {
                *next_hash += 1;
                *next_hash
            })
            .collect();
        index.apply(w, SRC, &stored(&hashes, rng));
        left -= n;
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Remove,
    Clear,
    /// 200 ms with no big worker's fill or removal: the noise floor of this machine.
    Quiet,
}

struct Window {
    phase: Phase,
    start: Instant,
    end: Instant,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let short = std::env::args().any(|a| a == "--short") || env("STALL_SHORT", 0) == 1;
    let big = env("STALL_BIG_BLOCKS", if short { 200_000 } else { 1_000_000 }) as usize;
    let rounds = env("STALL_ROUNDS", if short { 1 } else { 3 }) as usize;
    // Batches per second over all pods (32 blocks each).
    let rate = env("STALL_BATCHES_S", 1000) as f64;
    let index = Arc::new(Index::new(
        IndexConfig::default()
            .max_bytes(4 << 30)
            .max_blocks_per_context(1 << 26),
    ));

    // The poller: pods' batches on schedule; a clear of a big worker when asked, in line.
    let (clear_tx, clear_rx) = mpsc::channel::<(WorkerId, mpsc::Sender<(Instant, Instant)>)>();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (index, stop) = (index.clone(), stop.clone());
        std::thread::spawn(move || {
            let pods: Vec<WorkerId> = (0..PODS)
                .map(|i| WorkerId::new(format!("pod-{i}"), 0))
                .collect();
            let mut pools: Vec<VecDeque<u64>> = vec![VecDeque::new(); PODS];
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut next_hash = 1u64 << 40;
            let interval = Duration::from_secs_f64(1.0 / rate);
            let t0 = Instant::now();
            let mut lags: Vec<(Instant, f64)> = Vec::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok((w, done)) = clear_rx.try_recv() {
                    let s = Instant::now();
                    index.clear_worker(&w);
                    let _ = done.send((s, Instant::now()));
                }
                let due = t0 + interval.mul_f64(k as f64);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let p = (k as usize) % PODS;
                let hashes: Vec<u64> = (0..BATCH_BLOCKS)
                    .map(|_| {
                        next_hash += 1;
                        next_hash
                    })
                    .collect();
                index.apply(&pods[p], SRC, &stored(&hashes, &mut rng));
                pools[p].extend(&hashes);
                if pools[p].len() > POOL {
                    let old: Vec<BlockHash> = pools[p]
                        .drain(..BATCH_BLOCKS)
                        .map(BlockHash::Uint)
                        .collect();
                    index.apply(
                        &pods[p],
                        SRC,
                        &Event::BlockRemoved(BlockRemoved {
                            block_hashes: old,
                            ..Default::default()
                        }),
                    );
                }
                lags.push((due, Instant::now().duration_since(due).as_secs_f64()));
                k += 1;
            }
            lags
        })
    };

    // The manager: churn of big workers.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut next_hash = 1u64 << 50;
    let mut windows = Vec::new();
    // Warm-up: the pods' pools fill.
    std::thread::sleep(Duration::from_secs(1));
    let t_start = Instant::now();
    for r in 0..rounds {
        let w = WorkerId::new(format!("big-{r}"), 0);
        let f0 = Instant::now();
        fill(&index, &w, big, &mut next_hash, &mut rng);
        let fill_s = f0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(200));
        let s = Instant::now();
        let n = index.remove_worker(&w);
        let e = Instant::now();
        assert!(n as usize >= big, "removed {n}");
        windows.push(Window {
            phase: Phase::Remove,
            start: s,
            end: e,
        });
        let s = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        windows.push(Window {
            phase: Phase::Quiet,
            start: s + Duration::from_millis(50),
            end: Instant::now(),
        });
        fill(&index, &w, big, &mut next_hash, &mut rng);
        std::thread::sleep(Duration::from_millis(200));
        let (tx, rx) = mpsc::channel();
        clear_tx.send((w.clone(), tx)).expect("poller alive");
        let (s, e) = rx.recv().expect("cleared");
        windows.push(Window {
            phase: Phase::Clear,
            start: s,
            end: e,
        });
        std::thread::sleep(Duration::from_millis(200));
        index.remove_worker(&w);
        std::thread::sleep(Duration::from_millis(200));
        eprintln!("round {r}: filled {big} blocks in {fill_s:.2} s");
    }
    let t_end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let lags = poller.join().expect("poller");

    println!(
        "stall: {PODS} pods, {rate} batches/s of {BATCH_BLOCKS} blocks, big worker {big} blocks, {rounds} round(s)"
    );
    let tail = Duration::from_millis(20);
    for phase in [Phase::Remove, Phase::Clear, Phase::Quiet] {
        let (mut maxes, mut p99s, mut ops) = (Vec::new(), Vec::new(), Vec::new());
        for w in windows.iter().filter(|w| w.phase == phase) {
            let mut in_w: Vec<f64> = lags
                .iter()
                .filter(|(due, _)| *due >= w.start && *due <= w.end + tail)
                .map(|(_, l)| *l)
                .collect();
            // A batch due before the window but applied after its start waited too.
            let waited = lags
                .iter()
                .filter(|(due, l)| *due < w.start && *due + Duration::from_secs_f64(*l) > w.start)
                .map(|(_, l)| *l);
            in_w.extend(waited);
            maxes.push(in_w.iter().copied().fold(0.0, f64::max) * 1e3);
            p99s.push(percentile(&mut in_w, 0.99) * 1e3);
            ops.push(w.end.duration_since(w.start).as_secs_f64() * 1e3);
        }
        let med = |v: &mut Vec<f64>| percentile(v, 0.5);
        println!(
            "{phase:?}: {:.1} ms per op (median of {}); batches due meanwhile: longest lag {:.2} ms, p99 {:.2} ms (medians; per round max {:?})",
            med(&mut ops.clone()),
            ops.len(),
            med(&mut maxes.clone()),
            med(&mut p99s.clone()),
            maxes.iter().map(|m| (m * 100.0).round() / 100.0).collect::<Vec<_>>(),
        );
    }
    let mut all: Vec<f64> = lags
        .iter()
        .filter(|(due, _)| *due >= t_start && *due <= t_end)
        .map(|(_, l)| *l)
        .collect();
    let n = all.len();
    let max = all.iter().copied().fold(0.0, f64::max) * 1e3;
    println!(
        "whole run: {n} batches, lag p50 {:.3} ms, p99 {:.3} ms, max {max:.2} ms",
        percentile(&mut all, 0.5) * 1e3,
        percentile(&mut all, 0.99) * 1e3,
    );
}
