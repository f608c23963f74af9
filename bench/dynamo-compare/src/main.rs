//! `dynamo-compare DIR`: applies DIR/events.jsonl to dynamo-kv-router's `RadixTree` and runs
//! DIR/queries.jsonl, timing the same phases as `cargo bench -p prefix-index --bench fleet`.
//! The tokens → local block hash step (Dynamo's `compute_block_hash_for_seq`) is timed with
//! the apply and with each lookup, as kvsync's own hashing is.

use dynamo_kv_router::protocols::{
    compute_block_hash_for_seq, BlockHashOptions, ExternalSequenceBlockHash, KvCacheEvent,
    KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent,
};
use dynamo_kv_router::radix_tree::RadixTree;
use serde_json::Value;
use std::io::BufRead;
use std::time::Instant;

#[path = "../../../crates/prefix-index/benches/common/counting.rs"]
mod counting;

const BS: u32 = 16;

enum Raw {
    Stored {
        w: u64,
        parent: Option<u64>,
        hashes: Vec<u64>,
        tokens: Vec<u32>,
    },
    Removed {
        w: u64,
        hashes: Vec<u64>,
    },
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Token ids (u32) from a JSON array.
fn tokens(v: &Value) -> Vec<u32> {
    u64s(v).into_iter().map(|t| t as u32).collect()
}

fn to_event(id: u64, r: &Raw) -> RouterEvent {
    match r {
        Raw::Stored {
            w,
            parent,
            hashes,
            tokens,
        } => {
            let local = compute_block_hash_for_seq(tokens, BS, BlockHashOptions::default());
            let blocks = hashes
                .iter()
                .zip(local)
                .map(|(h, l)| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(*h),
                    tokens_hash: l,
                    mm_extra_info: None,
                })
                .collect();
            RouterEvent::new(
                *w,
                KvCacheEvent {
                    event_id: id,
                    data: KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: parent.map(ExternalSequenceBlockHash),
                        start_position: None,
                        blocks,
                    }),
                    dp_rank: 0,
                },
            )
        }
        Raw::Removed { w, hashes } => RouterEvent::new(
            *w,
            KvCacheEvent {
                event_id: id,
                data: KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: hashes
                        .iter()
                        .map(|h| ExternalSequenceBlockHash(*h))
                        .collect(),
                }),
                dp_rank: 0,
            },
        ),
    }
}

/// Applies `events` to `tree`, numbering them on from `id`.
fn apply_all(tree: &mut RadixTree, events: &[Raw], id: &mut u64) {
    for r in events {
        *id += 1;
        let _ = tree.apply_event(to_event(*id, r));
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    counting::check();
    let dir = std::env::args().nth(1).expect("usage: dynamo-compare DIR");
    let mut phases: Vec<(String, Vec<Raw>)> = Vec::new();
    let f = std::fs::File::open(format!("{dir}/events.jsonl")).expect("events.jsonl");
    for line in std::io::BufReader::new(f).lines() {
        let v: Value = serde_json::from_str(&line.expect("line")).expect("json");
        let phase = v["phase"].as_str().unwrap_or("").to_owned();
        let w = v["worker"].as_u64().unwrap_or(0);
        let raw = match v["type"].as_str() {
            Some("BlockStored") => Raw::Stored {
                w,
                parent: v["parent_block_hash"].as_u64(),
                hashes: u64s(&v["block_hashes"]),
                tokens: tokens(&v["token_ids"]),
            },
            Some("BlockRemoved") => Raw::Removed {
                w,
                hashes: u64s(&v["block_hashes"]),
            },
            _ => continue,
        };
        if phases.last().map(|p| &p.0) != Some(&phase) {
            phases.push((phase, Vec::new()));
        }
        phases.last_mut().expect("phase").1.push(raw);
    }
    let mut sets: Vec<(String, Vec<Vec<u32>>)> = Vec::new();
    let f = std::fs::File::open(format!("{dir}/queries.jsonl")).expect("queries.jsonl");
    for line in std::io::BufReader::new(f).lines() {
        let v: Value = serde_json::from_str(&line.expect("line")).expect("json");
        let set = v["set"].as_str().unwrap_or("").to_owned();
        let t = tokens(&v["token_ids"]);
        if sets.last().map(|s| &s.0) != Some(&set) {
            sets.push((set, Vec::new()));
        }
        sets.last_mut().expect("set").1.push(t);
    }

    // The prefill runs FLEET_PREFILLS times (default 5) into a fresh tree (the earlier ones
    // dropped) and the median is reported, as the fleet bench does.
    let prefills: usize = std::env::var("FLEET_PREFILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    let mut earlier = Vec::new();
    if let Some((_, events)) = phases.first().filter(|p| p.0 == "prefill") {
        for _ in 1..prefills {
            let mut tree = RadixTree::new();
            let t = Instant::now();
            apply_all(&mut tree, events, &mut 0);
            earlier.push(t.elapsed().as_secs_f64());
        }
    }
    let base = counting::live();
    let mut tree = RadixTree::new();
    let mut id = 0u64;
    let mut held_blocks = 0usize;
    for (phase, events) in &phases {
        if phase == "remove" {
            // Lookups run between decode and removal, as in the fleet bench.
            let live = (counting::live() - base) as f64;
            println!(
                "dynamo RadixTree: heap {:.1} MB = {:.1} bytes per stored block ({held_blocks} stored)",
                live / 1e6,
                live / held_blocks as f64
            );
            for (name, qs) in &sets {
                // Three passes, as the fleet bench does.
                let mut lat = Vec::with_capacity(3 * qs.len());
                let mut best = 0u64;
                for _ in 0..3 {
                    for q in qs {
                        let t = Instant::now();
                        let local = compute_block_hash_for_seq(q, BS, BlockHashOptions::default());
                        let scores = tree.find_matches(local, false);
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                        best += u64::from(scores.scores.values().copied().max().unwrap_or(0));
                    }
                }
                best /= 3;
                println!(
                    "dynamo lookup {name:<13} p50 {:>7.2} µs  p99 {:>7.2} µs  (mean best match {:.1} blocks)",
                    pct(&mut lat, 0.5),
                    pct(&mut lat, 0.99),
                    best as f64 / qs.len() as f64
                );
            }
        }
        let blocks: usize = events
            .iter()
            .map(|r| match r {
                Raw::Stored { hashes, .. } | Raw::Removed { hashes, .. } => hashes.len(),
            })
            .sum();
        let t = Instant::now();
        apply_all(&mut tree, events, &mut id);
        let mut s = t.elapsed().as_secs_f64();
        let mut runs = String::new();
        if phase == "prefill" && !earlier.is_empty() {
            let mut all = std::mem::take(&mut earlier);
            all.push(s);
            runs = format!(
                " (median of {} fresh runs: {})",
                all.len(),
                all.iter()
                    .map(|x| format!("{:.2}", blocks as f64 / x / 1e6))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            s = pct(&mut all, 0.5);
        }
        if phase != "remove" {
            held_blocks += blocks;
        }
        println!(
            "dynamo {phase}: {} events, {blocks} blocks in {s:.2}s = {:.2} M blocks/s, {:.0} k events/s{runs}",
            events.len(),
            blocks as f64 / s / 1e6,
            events.len() as f64 / s / 1e3
        );
    }
}
