//! The fleet benchmark: a reproducible workload of a 64-worker fleet applied to the index,
//! then lookups, then removals. Prints figures and, last, one machine-readable line.
//!
//! `cargo bench -p prefix-index --bench fleet`
//!
//! Environment: `FLEET_SEED` (default 42), `FLEET_REQUESTS` (default 20000),
//! `FLEET_EMIT=DIR` writes `DIR/events.jsonl` and `DIR/queries.jsonl` (schema in the README)
//! so another indexer can replay the identical workload.

use kv_events::{BlockHash, BlockRemoved, BlockStored, Event};
use prefix_index::{Index, IndexConfig, Source, WorkerId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::time::Instant;

#[path = "common/counting.rs"]
mod counting;

const WORKERS: usize = 64;
const PROMPTS: usize = 100;
const HOSTS_PER_PROMPT: usize = 8;
const PROMPT_TOKENS: usize = 1024;
const BS: usize = 16;
const VOCAB: u32 = 128_000;
const MAX_EVENT_BLOCKS: usize = 128;
const DECODE_BLOCKS: usize = 8;
const MODEL: &str = "bench-model";

/// The engine's own hash (stands in for vLLM's sha256): chained over tokens, another seed.
fn engine_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut buf = Vec::with_capacity(8 + 4 * tokens.len());
    buf.extend_from_slice(&parent.to_le_bytes());
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64_with_seed(&buf, 0xe9e)
}

struct Request {
    worker: usize,
    tokens: Vec<u32>,
    /// Engine hash of the system prompt's last block on this worker (the suffix's parent).
    tail: u64,
    /// Engine hashes of the request's own blocks after the system prompt (suffix + decode).
    own: Vec<u64>,
}

struct Workload {
    prefill: Vec<(usize, Event)>,
    decode: Vec<(usize, Event)>,
    remove: Vec<(usize, Event)>,
    /// After the removals: the removed requests' suffixes stored again, with the same engine
    /// hashes (a worker computing the same prompt again), into an index already grown.
    restore: Vec<(usize, Event)>,
    requests: Vec<Request>,
    prompts: Vec<Vec<u32>>,
}

/// Stores `tokens` (whole blocks) after `parent` in events of at most 128 blocks; returns the
/// engine hashes.
fn store_events(
    out: &mut Vec<(usize, Event)>,
    w: usize,
    mut parent: Option<u64>,
    tokens: &[u32],
) -> Vec<u64> {
    let mut hashes = Vec::with_capacity(tokens.len() / BS);
    for chunk in tokens.chunks(MAX_EVENT_BLOCKS * BS) {
        let first_parent = parent;
        let mut hs = Vec::with_capacity(chunk.len() / BS);
        for block in chunk.chunks_exact(BS) {
            let h = engine_hash(parent.unwrap_or(0), block);
            hs.push(h);
            parent = Some(h);
        }
        hashes.extend_from_slice(&hs);
        out.push((
            w,
            Event::BlockStored(BlockStored {
                block_hashes: hs.into_iter().map(BlockHash::Uint).collect(),
                parent_block_hash: first_parent.map(BlockHash::Uint),
                token_ids: chunk.to_vec(),
                block_size: BS as u32,
                ..Default::default()
            }),
        ));
    }
    hashes
}

fn workload(seed: u64, n_requests: usize) -> Workload {
    let mut rng = SmallRng::seed_from_u64(seed);
    let prompts: Vec<Vec<u32>> = (0..PROMPTS)
        .map(|_| {
            (0..PROMPT_TOKENS)
                .map(|_| rng.gen_range(0..VOCAB))
                .collect()
        })
        .collect();
    let hosts: Vec<Vec<usize>> = (0..PROMPTS)
        .map(|_| {
            let mut h = Vec::new();
            while h.len() < HOSTS_PER_PROMPT {
                let w = rng.gen_range(0..WORKERS);
                if !h.contains(&w) {
                    h.push(w);
                }
            }
            h
        })
        .collect();
    let mut seen = vec![vec![None::<u64>; PROMPTS]; WORKERS];
    let mut wl = Workload {
        prefill: Vec::new(),
        decode: Vec::new(),
        remove: Vec::new(),
        restore: Vec::new(),
        requests: Vec::new(),
        prompts: prompts.clone(),
    };
    for _ in 0..n_requests {
        let p = rng.gen_range(0..PROMPTS);
        let w = hosts[p][rng.gen_range(0..HOSTS_PER_PROMPT)];
        let total = if rng.gen_bool(0.1) { 8192 } else { 2048 };
        let mut tokens = prompts[p].clone();
        tokens.extend((PROMPT_TOKENS..total).map(|_| rng.gen_range(0..VOCAB)));
        let prompt_tail = match seen[w][p] {
            Some(h) => h,
            None => {
                let hs = store_events(&mut wl.prefill, w, None, &prompts[p]);
                let last = *hs.last().expect("prompt has blocks");
                seen[w][p] = Some(last);
                last
            }
        };
        let own = store_events(
            &mut wl.prefill,
            w,
            Some(prompt_tail),
            &tokens[PROMPT_TOKENS..],
        );
        wl.requests.push(Request {
            worker: w,
            tokens,
            tail: prompt_tail,
            own,
        });
    }
    for r in &mut wl.requests {
        let mut parent = *r.own.last().expect("suffix has blocks");
        for _ in 0..DECODE_BLOCKS {
            let block: Vec<u32> = (0..BS).map(|_| rng.gen_range(0..VOCAB)).collect();
            let h = engine_hash(parent, &block);
            wl.decode.push((
                r.worker,
                Event::BlockStored(BlockStored {
                    block_hashes: vec![BlockHash::Uint(h)],
                    parent_block_hash: Some(BlockHash::Uint(parent)),
                    token_ids: block,
                    block_size: BS as u32,
                    ..Default::default()
                }),
            ));
            r.own.push(h);
            parent = h;
        }
    }
    let mut restore = Vec::new();
    for r in &wl.requests {
        if rng.gen_bool(0.25) {
            wl.remove.push((
                r.worker,
                Event::BlockRemoved(BlockRemoved {
                    block_hashes: r.own.iter().rev().copied().map(BlockHash::Uint).collect(),
                    ..Default::default()
                }),
            ));
            store_events(
                &mut restore,
                r.worker,
                Some(r.tail),
                &r.tokens[PROMPT_TOKENS..],
            );
        }
    }
    wl.restore = restore;
    wl
}

fn blocks(e: &Event) -> usize {
    match e {
        Event::BlockStored(s) => s.block_hashes.len(),
        Event::BlockRemoved(r) => r.block_hashes.len(),
        Event::AllBlocksCleared => 0,
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct QuerySet {
    name: &'static str,
    queries: Vec<Vec<u32>>,
}

fn query_sets(wl: &Workload, rng: &mut SmallRng, n: usize) -> Vec<QuerySet> {
    let mut sets = Vec::new();
    for len in [2048usize, 8192] {
        let full: Vec<Vec<u32>> = wl
            .requests
            .iter()
            .filter(|r| r.tokens.len() == len)
            .take(n)
            .map(|r| r.tokens.clone())
            .collect();
        let sys: Vec<Vec<u32>> = (0..n)
            .map(|_| {
                let mut q = wl.prompts[rng.gen_range(0..PROMPTS)].clone();
                q.extend((PROMPT_TOKENS..len).map(|_| rng.gen_range(0..VOCAB)));
                q
            })
            .collect();
        let miss: Vec<Vec<u32>> = (0..n)
            .map(|_| (0..len).map(|_| rng.gen_range(0..VOCAB)).collect())
            .collect();
        let k = if len == 2048 { "2k" } else { "8k" };
        let names: [&'static str; 3] = if k == "2k" {
            ["2k_full", "2k_sysprompt", "2k_miss"]
        } else {
            ["8k_full", "8k_sysprompt", "8k_miss"]
        };
        sets.push(QuerySet {
            name: names[0],
            queries: full,
        });
        sets.push(QuerySet {
            name: names[1],
            queries: sys,
        });
        sets.push(QuerySet {
            name: names[2],
            queries: miss,
        });
    }
    sets
}

fn emit(dir: &str, wl: &Workload, sets: &[QuerySet]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut ev = std::io::BufWriter::new(std::fs::File::create(format!("{dir}/events.jsonl"))?);
    for (phase, list) in [
        ("prefill", &wl.prefill),
        ("decode", &wl.decode),
        ("remove", &wl.remove),
        ("restore", &wl.restore),
    ] {
        for (w, e) in list.iter() {
            let line = match e {
                Event::BlockStored(s) => serde_json::json!({
                    "phase": phase, "worker": w, "type": "BlockStored",
                    "block_hashes": s.block_hashes.iter().map(BlockHash::key64).collect::<Vec<_>>(),
                    "parent_block_hash": s.parent_block_hash.as_ref().map(BlockHash::key64),
                    "token_ids": s.token_ids, "block_size": s.block_size,
                }),
                Event::BlockRemoved(r) => serde_json::json!({
                    "phase": phase, "worker": w, "type": "BlockRemoved",
                    "block_hashes": r.block_hashes.iter().map(BlockHash::key64).collect::<Vec<_>>(),
                }),
                Event::AllBlocksCleared => {
                    serde_json::json!({"phase": phase, "worker": w, "type": "AllBlocksCleared"})
                }
            };
            writeln!(ev, "{line}")?;
        }
    }
    let mut q = std::io::BufWriter::new(std::fs::File::create(format!("{dir}/queries.jsonl"))?);
    for s in sets {
        for t in &s.queries {
            writeln!(q, "{}", serde_json::json!({"set": s.name, "token_ids": t}))?;
        }
    }
    Ok(())
}

fn main() {
    counting::check();
    let seed: u64 = std::env::var("FLEET_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    let n: usize = std::env::var("FLEET_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let t = Instant::now();
    let wl = workload(seed, n);
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x51);
    let sets = query_sets(&wl, &mut rng, 1000);
    let prefill_blocks: usize = wl.prefill.iter().map(|(_, e)| blocks(e)).sum();
    let removed_blocks: usize = wl.remove.iter().map(|(_, e)| blocks(e)).sum();
    println!(
        "workload: seed {seed}, {n} requests, {} prefill events ({prefill_blocks} blocks), {} decode events, {} removal events ({removed_blocks} blocks); generated in {:.1}s",
        wl.prefill.len(),
        wl.decode.len(),
        wl.remove.len(),
        t.elapsed().as_secs_f64()
    );
    if let Ok(dir) = std::env::var("FLEET_EMIT") {
        emit(&dir, &wl, &sets).expect("writing the workload");
        println!("workload written to {dir}/events.jsonl and {dir}/queries.jsonl");
    }
    let workers: Vec<WorkerId> = (0..WORKERS)
        .map(|w| WorkerId::new(format!("ns/pod-{w}"), 0))
        .collect();
    let src = Source {
        model: MODEL,
        default_lora: None,
    };

    // `FLEET_PROFILE=apply` runs the prefill 11 times instead of 5 (see `FLEET_PREFILLS`),
    // `FLEET_PROFILE=lookup` runs 30 passes of lookups instead of 3: a phase to `perf record`;
    // `FLEET_PROFILE=parts` times a lookup's hashing and walk apart, cold and hot.
    let profile = std::env::var("FLEET_PROFILE").unwrap_or_default();
    // Applies a phase's events in order; the seconds that took.
    let apply = |index: &Index, events: &[(usize, Event)]| {
        let t = Instant::now();
        for (w, e) in events {
            index.apply(&workers[*w], src, e);
        }
        t.elapsed().as_secs_f64()
    };
    // A fresh unbounded index with the prefill applied, and the seconds that took.
    let prefilled = || {
        let index = Index::new(
            IndexConfig::default()
                .max_bytes(usize::MAX)
                .max_blocks_per_context(usize::MAX),
        );
        let s = apply(&index, &wl.prefill);
        (index, s)
    };
    let passes = if profile == "lookup" { 30 } else { 3 };
    // The prefill runs `FLEET_PREFILLS` times (default 5), each into a fresh index (the
    // earlier ones dropped), and reports the median: on this shared VM a single run's rate
    // ranges over 2× (first-touch page faults cost what the host makes them cost at the
    // time). bench/dynamo-compare does the same.
    let prefills: usize = std::env::var("FLEET_PREFILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if profile == "apply" { 11 } else { 5 })
        .max(1);
    let mut runs = Vec::with_capacity(prefills);
    for _ in 1..prefills {
        runs.push(prefilled().1);
    }
    let base = counting::live();
    let (index, last_s) = prefilled();
    runs.push(last_s);
    let rates: Vec<String> = runs
        .iter()
        .map(|s| format!("{:.2}", prefill_blocks as f64 / s / 1e6))
        .collect();
    let prefill_s = percentile(&mut runs, 0.5);
    let decode_s = apply(&index, &wl.decode);
    let stats = index.stats();
    let live = (counting::live() - base) as f64;
    let stored = stats.worker_blocks as f64;
    println!(
        "prefill: {:.2} M blocks/s ({prefill_blocks} blocks in {prefill_s:.2}s; median of {prefills} fresh runs: {}); decode: {:.0} k events/s",
        prefill_blocks as f64 / prefill_s / 1e6,
        rates.join(" "),
        wl.decode.len() as f64 / decode_s / 1e3
    );
    println!(
        "held: {} (worker, block) pairs, {} distinct blocks; heap {:.1} MB = {:.1} bytes per stored block ({:.1} per distinct block); index's own accounting {:.1} MB",
        stats.worker_blocks,
        stats.blocks,
        live / 1e6,
        live / stored,
        live / stats.blocks as f64,
        stats.bytes as f64 / 1e6
    );

    if profile == "parts" {
        // Where a lookup's time goes: the chain (hashing the tokens) and the walk, each timed
        // first with the query as the bench leaves it (cold) and then again at once (hot);
        // beside them, only reading each query's tokens, in a pass of its own before (a floor).
        let ms = |v: &mut Vec<f64>| percentile(v, 0.5);
        for s in &sets {
            let mut t = [(); 6].map(|_| Vec::with_capacity(s.queries.len()));
            for q in &s.queries {
                let c = Instant::now();
                std::hint::black_box(q.iter().fold(0u32, |a, &x| a ^ x));
                t[5].push(c.elapsed().as_secs_f64() * 1e6);
            }
            for q in &s.queries {
                for k in 0..2 {
                    let c = Instant::now();
                    let chain = index.chain(MODEL, None, BS as u32, q);
                    t[2 * k].push(c.elapsed().as_secs_f64() * 1e6);
                    let c = Instant::now();
                    std::hint::black_box(index.lookup_chain(MODEL, None, &chain));
                    t[2 * k + 1].push(c.elapsed().as_secs_f64() * 1e6);
                }
                let c = Instant::now();
                std::hint::black_box(index.lookup(MODEL, None, q));
                t[4].push(c.elapsed().as_secs_f64() * 1e6);
            }
            println!(
                "parts {:<13} p50 µs: read cold {:.2} | chain cold {:.2} walk cold {:.2} | chain hot {:.2} walk hot {:.2} lookup hot {:.2}",
                s.name,
                ms(&mut t[5]),
                ms(&mut t[0]),
                ms(&mut t[1]),
                ms(&mut t[2]),
                ms(&mut t[3]),
                ms(&mut t[4])
            );
        }
    }
    let mut results = std::collections::BTreeMap::new();
    for s in &sets {
        // Three passes over the set (the machine is noisy); percentiles over all of them.
        let mut lat = Vec::with_capacity(passes * s.queries.len());
        let mut matched = 0u64;
        for _ in 0..passes {
            for q in &s.queries {
                let t = Instant::now();
                let l = index.lookup(MODEL, None, q);
                lat.push(t.elapsed().as_secs_f64() * 1e6);
                matched += u64::from(l.matches.first().map_or(0, |m| m.blocks));
            }
        }
        matched /= passes as u64;
        let p50 = percentile(&mut lat, 0.5);
        let p99 = percentile(&mut lat, 0.99);
        println!(
            "lookup {:<13} p50 {p50:>7.2} µs  p99 {p99:>7.2} µs  (mean best match {:.1} blocks over {} queries)",
            s.name,
            matched as f64 / s.queries.len() as f64,
            s.queries.len()
        );
        results.insert(s.name, (p50, p99));
    }

    let remove_s = apply(&index, &wl.remove);
    println!(
        "remove: {:.2} M blocks/s ({removed_blocks} blocks in {remove_s:.2}s); afterwards {} pairs held",
        removed_blocks as f64 / remove_s / 1e6,
        index.stats().worker_blocks
    );
    let restore_blocks: usize = wl.restore.iter().map(|(_, e)| blocks(e)).sum();
    let restore_s = apply(&index, &wl.restore);
    println!(
        "restore: {:.2} M blocks/s ({restore_blocks} blocks of the removed requests stored again into the grown index: apply in steady state); afterwards {} pairs held",
        restore_blocks as f64 / restore_s / 1e6,
        index.stats().worker_blocks
    );
    let r = |k: &str| results.get(k).copied().unwrap_or_default();
    println!(
        "fleet apply_mblocks_s={:.2} decode_kevents_s={:.0} remove_mblocks_s={:.2} lookup2k_full_p50_us={:.2} lookup2k_full_p99_us={:.2} lookup8k_full_p50_us={:.2} bytes_per_block={:.1}",
        prefill_blocks as f64 / prefill_s / 1e6,
        wl.decode.len() as f64 / decode_s / 1e3,
        removed_blocks as f64 / remove_s / 1e6,
        r("2k_full").0,
        r("2k_full").1,
        r("8k_full").0,
        live / stored
    );
}
