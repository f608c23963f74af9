//! Decoding a 128-block BlockStored batch (16 tokens per block, vocab 128k), in both shapes.
//!
//! `cargo bench -p kv-events --bench decode`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kv_events::{decode, encode, BlockHash, BlockStored, Event, EventBatch, Medium, WireFormat};
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

fn bench(c: &mut Criterion) {
    let mut rng = SmallRng::seed_from_u64(7);
    let b = batch(&mut rng);
    for (name, format) in [
        ("map_v0.33", WireFormat::VLLM_0_33),
        ("array_v0.14", WireFormat::VLLM_0_14),
    ] {
        let payload = encode(&b, &format);
        assert_eq!(decode(&payload).as_ref(), Ok(&b));
        let mut g = c.benchmark_group(format!("decode_128_blocks/{name}"));
        g.throughput(Throughput::Elements(128));
        g.bench_function("blocks", |bench| bench.iter(|| decode(black_box(&payload))));
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.bench_function("bytes", |bench| bench.iter(|| decode(black_box(&payload))));
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
