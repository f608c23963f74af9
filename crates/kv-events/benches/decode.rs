//! Decoding a 128-block BlockStored batch (16 tokens per block, vocab 128k), in both shapes;
//! and a batch of 128 BlockRemoved events, one per evicted block as vLLM sends them (where
//! the maps' keys and tags are most of the work).
//!
//! `cargo bench -p kv-events --bench decode`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kv_events::{
    decode, encode, BlockHash, BlockRemoved, BlockStored, Event, EventBatch, Medium, WireFormat,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

fn batch(rng: &mut SmallRng) -> EventBatch {
    let blocks = 128;
    EventBatch {
        ts: 1_700_000_000.5,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: (0..blocks).map(|_| BlockHash::Uint(rng.gen())).collect(),
            parent_block_hash: Some(BlockHash::Uint(rng.gen())),
            token_ids: (0..blocks * 16)
                .map(|_| rng.gen_range(0..128_000))
                .collect(),
            block_size: 16,
            medium: Some(Medium::Gpu),
            group_idx: Some(0),
            kv_cache_spec_kind: Some("full_attention".into()),
            ..Default::default()
        })],
        data_parallel_rank: Some(0),
    }
}

fn removals(rng: &mut SmallRng) -> EventBatch {
    EventBatch {
        ts: 1_700_000_000.5,
        events: (0..128)
            .map(|_| {
                Event::BlockRemoved(BlockRemoved {
                    block_hashes: vec![BlockHash::Uint(rng.gen())],
                    medium: Some(Medium::Gpu),
                    ..Default::default()
                })
            })
            .collect(),
        data_parallel_rank: Some(0),
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = SmallRng::seed_from_u64(7);
    let b = batch(&mut rng);
    // vLLM 0.14's arrays end at `lora_name`: that batch carries no group fields.
    let mut b14 = b.clone();
    if let Event::BlockStored(s) = &mut b14.events[0] {
        s.group_idx = None;
        s.kv_cache_spec_kind = None;
    }
    for (name, format, b) in [
        ("map_v0.33", WireFormat::VLLM_0_33, &b),
        ("array_v0.14", WireFormat::VLLM_0_14, &b14),
    ] {
        let payload = encode(b, &format);
        assert_eq!(decode(&payload).as_ref(), Ok(b));
        let mut g = c.benchmark_group(format!("decode_128_blocks/{name}"));
        g.throughput(Throughput::Elements(128));
        g.bench_function("blocks", |bench| bench.iter(|| decode(black_box(&payload))));
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.bench_function("bytes", |bench| bench.iter(|| decode(black_box(&payload))));
        g.finish();
    }
    let r = removals(&mut rng);
    let payload = encode(&r, &WireFormat::VLLM_0_33);
    assert_eq!(decode(&payload).as_ref(), Ok(&r));
    let mut g = c.benchmark_group("decode_128_removals/map_v0.33");
    g.throughput(Throughput::Elements(128));
    g.bench_function("blocks", |bench| bench.iter(|| decode(black_box(&payload))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
