//! End to end: simulated engines (real PUB/ROUTER sockets) → the `kvsync serve` binary
//! (subscribers, manager, index). Three runs, each against a fresh service:
//!
//! 1. idle: `E2E_PACED_ENGINES` engines (default 64) publish nothing for `E2E_IDLE_S` seconds
//!    (default 5) — the service's fixed cost (polling, heartbeats);
//! 2. paced: the same engines publish `E2E_PACED_BLOCKS_S` blocks/s in total (default 12 800)
//!    for 10 s — the service's CPU share at a steady fleet-wide event rate;
//! 3. saturation: `E2E_SAT_ENGINES` engines (default 16) publish as fast as this process can
//!    for 5 s; throughput = blocks announced / time until the service applied every batch.
//!
//! Blocks = stored + removed, counted by the engines. The engines run in this process, on the
//! same 2 cores as the service: at saturation they compete with it.

use anyhow::{Context, Result};
use kvsync_demo::{Fleet, Service};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn prompt(seed: u64, n: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1000 + (x % 31_000) as u32
        })
        .collect()
}

async fn start(fleet: &Fleet, name: &str) -> Result<Service> {
    let dir = std::env::temp_dir().join(format!("kvsync-e2e-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pods = dir.join(format!("pods-{name}.yaml"));
    std::fs::write(&pods, fleet.pod_file())?;
    Service::start(
        PathBuf::from(env!("CARGO_BIN_EXE_kvsync")).as_path(),
        &pods,
        true,
        // Never called: token ids only.
        "127.0.0.1:9".parse()?,
        fleet.engines.len(),
        dir.join(format!("kvsync-{name}.log")),
    )
    .await
}

/// Waits until the service applied `batches` batches; returns when it did.
async fn applied(svc: &Service, batches: u64) -> Result<Instant> {
    svc.await_applied(batches, Duration::from_secs(120)).await?;
    Ok(Instant::now())
}

/// The engines' first batches may be dropped by PUB before a subscription lands; replay
/// repairs them, but only once a later batch shows the gap. One warm-up request per engine,
/// then wait until all are applied, so every measured run starts in sync.
async fn warm(fleet: &Fleet, svc: &Service) -> Result<()> {
    for (i, e) in fleet.engines.iter().enumerate() {
        e.serve(&prompt(1_000_000 + i as u64, 32), None, 0)
            .context("warm-up")?;
        e.serve(&prompt(2_000_000 + i as u64, 32), None, 0)
            .context("warm-up")?;
    }
    applied(svc, fleet.published().1).await?;
    Ok(())
}

async fn idle_and_paced(engines: usize, rate: u64) -> Result<(f64, f64, u64)> {
    let fleet = Arc::new(Fleet::start(engines, 4096, 7)?);
    let svc = start(&fleet, "paced").await?;
    warm(&fleet, &svc).await?;
    let c0 = svc.cpu_seconds()?;
    let idle_s = env("E2E_IDLE_S", 5).max(1);
    tokio::time::sleep(Duration::from_secs(idle_s)).await;
    let idle_pct = 100.0 * (svc.cpu_seconds()? - c0) / idle_s as f64;

    // Prompts of 512 tokens (32 blocks, one batch), round robin over the engines, evenly
    // spaced; pools of 4096 blocks fill and then evict (removals count as blocks too).
    let (b0, _) = fleet.published();
    let c0 = svc.cpu_seconds()?;
    let per_request = 32.0;
    let interval = Duration::from_secs_f64(per_request / rate as f64);
    let secs = 10.0;
    let f = fleet.clone();
    let driver = tokio::task::spawn_blocking(move || -> Result<()> {
        let start = Instant::now();
        let mut next = start;
        let mut i = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            let e = &f.engines[(i % f.engines.len() as u64) as usize];
            e.serve(&prompt(i, 512), None, 0).context("paced request")?;
            i += 1;
            next += interval;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        Ok(())
    });
    driver.await??;
    applied(&svc, fleet.published().1).await?;
    let (b1, _) = fleet.published();
    let paced_pct = 100.0 * (svc.cpu_seconds()? - c0) / secs;
    svc.stop().await?;
    Ok((idle_pct, paced_pct, ((b1 - b0) as f64 / secs) as u64))
}

async fn saturation(engines: usize) -> Result<(f64, f64, u64)> {
    let fleet = Arc::new(Fleet::start(engines, 1024, 9)?);
    let svc = start(&fleet, "saturation").await?;
    warm(&fleet, &svc).await?;
    let (b0, _) = fleet.published();
    let c0 = svc.cpu_seconds()?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // One driver thread per core of the machine; 2048-token prompts (128 blocks, one batch,
    // evicting 128 blocks once the pools are full).
    let drivers: Vec<_> = (0..2u64)
        .map(|d| {
            let (f, stop) = (fleet.clone(), stop.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut i = d;
                while !stop.load(Ordering::Relaxed) {
                    let e = &f.engines[(i % f.engines.len() as u64) as usize];
                    e.serve(&prompt(i, 2048), None, 0).context("request")?;
                    i += 2;
                }
                Ok(())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    for d in drivers {
        d.join().map_err(|_| anyhow::anyhow!("driver panicked"))??;
    }
    let (b1, batches) = fleet.published();
    let done = applied(&svc, batches).await?;
    let secs = done.duration_since(t0).as_secs_f64();
    let blocks = b1 - b0;
    let cpu = svc.cpu_seconds()? - c0;
    svc.stop().await?;
    Ok((
        blocks as f64 / secs / 1e6,
        cpu / (blocks as f64 / 1e6),
        blocks,
    ))
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; nothing else is read from the command line.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let paced_engines = env("E2E_PACED_ENGINES", 64) as usize;
    let paced_rate = env("E2E_PACED_BLOCKS_S", 12_800);
    let sat_engines = env("E2E_SAT_ENGINES", 16) as usize;
    rt.block_on(async {
        let (idle, paced, paced_rate_real) = idle_and_paced(paced_engines, paced_rate).await?;
        println!("idle: {paced_engines} engines, no events: service CPU {idle:.2} % of one core");
        println!(
            "paced: {paced_engines} engines, {paced_rate_real} blocks/s in total: service CPU {paced:.2} % of one core"
        );
        let (mblocks_s, cpu_per_m, blocks) = saturation(sat_engines).await?;
        println!(
            "saturation: {sat_engines} engines, {blocks} blocks in 5 s of publishing: {mblocks_s:.2} M blocks/s into the index, \
             {cpu_per_m:.3} service CPU s per million blocks"
        );
        // The rate at which the service stays under 1 % of one core: fixed cost + per block.
        let per_block = (paced - idle).max(0.0) / 100.0 / paced_rate_real.max(1) as f64;
        let one_pct = if per_block > 0.0 {
            ((1.0 - idle) / 100.0 / per_block).max(0.0) as u64
        } else {
            0
        };
        println!(
            "under 1 % of one core: {paced_engines} engines up to ~{one_pct} blocks/s (fixed {idle:.2} %, {:.3} CPU s per million blocks when paced)",
            per_block * 1e6
        );
        println!(
            "e2e sat_mblocks_s={mblocks_s:.3} sat_cpu_s_per_mblock={cpu_per_m:.4} idle_cpu_pct={idle:.3} paced_engines={paced_engines} paced_blocks_s={paced_rate_real} paced_cpu_pct={paced:.3} one_pct_blocks_s={one_pct}"
        );
        anyhow::Ok(())
    })
}
