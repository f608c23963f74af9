//! The simulator against its own cost model, on the wall clock.
//!
//! 1. One engine through the driver at `--speed 1`: B concurrent requests (B = 1, 16, 64;
//!    distinct prompts of `SIM_PROMPT` tokens, `SIM_OUTPUT` output tokens), their mean TTFT and
//!    inter-token latency measured by the receivers on the wall clock, beside what the profile
//!    predicts: the same burst on the scheduler's virtual clock, and the closed-form
//!    `CostModel::itl(B, context)`.
//!    The measured and predicted ITL are means over every gap between a request's tokens, so
//!    at batch 64 they include the steps where later requests' prefill chunks share the batch;
//!    the closed form is pure decode.
//! 2. How many engines one core can simulate at the default profile: engines at speed 1 under
//!    a closed loop of 16 requests each, the process's CPU time over the wall time.
//!
//! 3. What one oracle prediction costs (`predict::first_token`: a copy of the scheduler run
//!    forward to the request's first token) on an idle engine, on one decoding B requests,
//!    and on one with B prompts queued ahead.
//!
//! `cargo bench -p engine-sim --bench sim` (env: `SIM_PROMPT`, `SIM_OUTPUT`, `SIM_ENGINES`,
//! `SIM_SECONDS`).

use std::time::{Duration, Instant};

use engine_sim::predict::{first_token, Horizon};
use engine_sim::{
    BlockPool, CostModel, EngineConfig, EngineHandle, GenerateRequest, HashForm, NewRequest,
    SchedConfig, Scheduler, SimConfig, TokenEvent,
};

const BLOCKS: usize = 8192;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn prompt(k: usize, len: usize) -> Vec<u32> {
    let base = (k as u32 + 1) * 100_000;
    (base..base + len as u32).collect()
}

/// Mean TTFT and mean inter-token latency of a burst on the virtual clock.
fn predicted(batch: usize, len: usize, out: usize) -> (f64, f64) {
    let pool = BlockPool::new(BLOCKS, 16, 0, HashForm::Int);
    let mut s = Scheduler::new(SchedConfig::default(), CostModel::default(), pool).expect("config");
    for k in 0..batch {
        let r = NewRequest {
            id: k as u64,
            prompt: prompt(k, len),
            max_tokens: out,
            lora: None,
        };
        s.add(r, 0.0).expect("valid");
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); batch];
    let mut clock = 0.0;
    while s.has_work() {
        let o = s.step(clock);
        for (id, _) in &o.tokens {
            times[*id as usize].push(o.end);
        }
        clock = o.end;
    }
    summarize(&times, &vec![0.0; batch])
}

/// (mean TTFT, mean gap between consecutive tokens).
fn summarize(times: &[Vec<f64>], arrivals: &[f64]) -> (f64, f64) {
    let ttft = times
        .iter()
        .zip(arrivals)
        .map(|(t, a)| t[0] - a)
        .sum::<f64>()
        / times.len() as f64;
    let gaps: Vec<f64> = times
        .iter()
        .flat_map(|t| t.windows(2).map(|w| w[1] - w[0]))
        .collect();
    (ttft, gaps.iter().sum::<f64>() / gaps.len().max(1) as f64)
}

fn start(speed: f64) -> EngineHandle {
    EngineHandle::start(SimConfig {
        engine: EngineConfig {
            num_blocks: BLOCKS,
            block_size: 16,
            replay_port: None,
            ..EngineConfig::default()
        },
        speed,
        ..SimConfig::default()
    })
    .expect("engine starts")
}

/// The burst through the driver, timed on the wall clock by the receivers.
async fn measured(batch: usize, len: usize, out: usize) -> (f64, f64) {
    let e = start(1.0);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..batch {
        let req = GenerateRequest {
            request_id: k.to_string(),
            prompt: prompt(k, len),
            max_tokens: out,
            lora: None,
        };
        let submitted = t0.elapsed().as_secs_f64();
        let mut rx = e.submit(req).expect("queued");
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            while let Some(ev) = rx.recv().await {
                if let TokenEvent::Token { .. } = ev {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            (submitted, times)
        }));
    }
    let mut times = Vec::new();
    let mut arrivals = Vec::new();
    for t in tasks {
        let (a, ts) = t.await.expect("receiver task");
        arrivals.push(a);
        times.push(ts);
    }
    e.shutdown();
    summarize(&times, &arrivals)
}

/// utime + stime of this process, from /proc (Linux).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Engines at speed 1 under a closed loop of 16 requests each for `secs`: CPU seconds per
/// engine-second.
async fn cpu_per_engine(engines: usize, secs: f64, len: usize, out: usize) -> Option<f64> {
    let handles: Vec<EngineHandle> = (0..engines).map(|_| start(1.0)).collect();
    let before = cpu_seconds()?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (i, e) in handles.iter().enumerate() {
        for c in 0..16 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                while Instant::now() < deadline {
                    let k = (i * 16 + c) * 1_000_000 + n;
                    let req = GenerateRequest {
                        request_id: k.to_string(),
                        prompt: prompt(k % 100_000, len),
                        max_tokens: out,
                        lora: None,
                    };
                    let mut rx = e.submit(req).expect("queued");
                    while rx.recv().await.is_some() {}
                    n += 1;
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("client");
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - before;
    for e in &handles {
        e.shutdown();
    }
    Some(cpu / (wall * engines as f64))
}

/// Mean wall time of one prediction of a `len`-token prompt on `s`.
fn prediction_cost(s: &Scheduler, len: usize) -> (f64, usize) {
    let probe = prompt(9999, len);
    let reps = 50;
    let t = Instant::now();
    let mut steps = 0;
    for _ in 0..reps {
        let p = first_token(s, &probe, None, s.clock(), Horizon::steps(100_000)).expect("token");
        steps = p.steps;
    }
    (t.elapsed().as_secs_f64() / reps as f64, steps)
}

/// A scheduler with `batch` requests: all decoding (`queued` false) or all still waiting.
fn loaded(batch: usize, len: usize, out: usize, queued: bool) -> Scheduler {
    let pool = BlockPool::new(BLOCKS, 16, 0, HashForm::Int);
    let mut s = Scheduler::new(SchedConfig::default(), CostModel::default(), pool).expect("config");
    for k in 0..batch {
        let r = NewRequest {
            id: k as u64,
            prompt: prompt(k, len),
            max_tokens: out,
            lora: None,
        };
        s.add(r, 0.0).expect("valid");
    }
    let mut clock = 0.0;
    while !queued && s.metrics().num_requests_waiting > 0 {
        clock = s.step(clock).end;
    }
    s
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let len = env("SIM_PROMPT", 256);
    let out = env("SIM_OUTPUT", 64);
    let cost = CostModel::default();
    println!("profile {cost}");
    println!("one engine, speed 1, prompts of {len} tokens, {out} output tokens each");
    println!(
        "| batch | TTFT measured | TTFT predicted | ITL measured | ITL predicted | ITL closed form |"
    );
    println!("|---|---|---|---|---|---|");
    // Predicted: the same burst on the scheduler's virtual clock. Closed form: pure decode of
    // the batch at its mean context.
    for batch in [1, 16, 64] {
        let (pt, pi) = predicted(batch, len, out);
        let (mt, mi) = measured(batch, len, out).await;
        let closed = cost.itl(batch, len + out / 2);
        println!(
            "| {batch} | {:.1} ms | {:.1} ms ({:+.1} %) | {:.2} ms | {:.2} ms ({:+.1} %) | {:.2} ms |",
            mt * 1e3,
            pt * 1e3,
            (mt / pt - 1.0) * 100.0,
            mi * 1e3,
            pi * 1e3,
            (mi / pi - 1.0) * 100.0,
            closed * 1e3
        );
    }
    let engines = env("SIM_ENGINES", 8);
    let secs = env("SIM_SECONDS", 5) as f64;
    match cpu_per_engine(engines, secs, len, out).await {
        Some(c) => println!(
            "{engines} engines at speed 1, 16 requests in flight each, {secs} s: {:.3} % of a core per engine -> about {:.0} engines per core",
            c * 100.0,
            1.0 / c
        ),
        None => println!("CPU time unavailable (no /proc/self/stat)"),
    }
    println!("oracle prediction of a {len}-token prompt (a copy of the scheduler run to its first token):");
    for (what, s) in [
        ("idle engine", loaded(0, len, out, false)),
        ("16 decoding", loaded(16, len, out, false)),
        ("64 decoding", loaded(64, len, out, false)),
        ("64 queued", loaded(64, len, out, true)),
    ] {
        let (secs, steps) = prediction_cost(&s, len);
        println!("  {what}: {:.0} us ({steps} steps)", secs * 1e6);
    }
}
