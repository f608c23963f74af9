//! Tokenizing 1k-, 8k- and 32k-token prompts (and a chat of about 8k tokens) with the real
//! Qwen3 and Llama 3.1 tokenizers that `scripts/setup` fetches into `.cache/tokenizers/`.
//! Run: `cargo bench -p hf-tokenize --bench encode`. Prints criterion's figures (time and
//! tokens per second); a missing tokenizer is reported and skipped.

#[path = "../tests/corpus/mod.rs"]
mod corpus;

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hf_tokenize::Tokenizer;
use serde_json::json;

/// The corpus' mixed text, cut to exactly `tokens` tokens of `tok` (decoded back at a token
/// boundary would need a decoder; instead grow the text until it has at least that many).
fn prompt_of(tok: &Tokenizer, rng: &mut corpus::Rng, tokens: usize) -> (String, usize) {
    let mut text = corpus::long_prompt(rng, tokens);
    loop {
        let n = tok.encode_prompt(&text, true).map_or(0, |ids| ids.len());
        if n >= tokens {
            return (text, n);
        }
        text.push_str(&corpus::mixed_text(rng, 50));
    }
}

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers");
    for name in ["qwen3", "llama3_1"] {
        let dir = root.join(name);
        let tok = match Tokenizer::from_dir(&dir) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIPPED {name}: {e} (run `bash scripts/setup`)");
                continue;
            }
        };
        let mut rng = corpus::Rng::new(42);
        let mut group = c.benchmark_group(format!("encode_prompt/{name}"));
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1));
        for tokens in [1_000, 8_000, 32_000] {
            let (text, n) = prompt_of(&tok, &mut rng, tokens);
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(
                BenchmarkId::from_parameter(format!("{}k", tokens / 1000)),
                &text,
                |b, t| b.iter(|| tok.encode_prompt(t, true).map(|ids| ids.len())),
            );
        }
        group.finish();

        let (text, _) = prompt_of(&tok, &mut rng, 2_000);
        let messages = [
            json!({"role": "system", "content": text.clone()}),
            json!({"role": "user", "content": text.clone()}),
            json!({"role": "assistant", "content": text.clone()}),
            json!({"role": "user", "content": text}),
        ];
        let n = tok
            .encode_chat(&messages, true, None)
            .map_or(0, |ids| ids.len());
        let mut group = c.benchmark_group(format!("encode_chat/{name}"));
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("{}k", n / 1000), |b| {
            b.iter(|| tok.encode_chat(&messages, true, None).map(|ids| ids.len()))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
