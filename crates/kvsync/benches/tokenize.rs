//! Tokenizing a prompt in process vs the remote `/tokenize` round trip, as `kvsync serve` does
//! each: `local` is [`LocalTokenizers::encode`] (the model's files through `hf_tokenize`, on
//! tokio's blocking pool past 512 bytes); `remote` is kvsync's pooled `/tokenize` client asking
//! a simulated engine on loopback that tokenizes with the same files (engine-sim with
//! `--tokenizer DIR`: the same Rust tokenizer, so the difference is the round trip: HTTP, JSON
//! both ways, the engine's handler; a real vLLM adds its Python tokenizer call on top).
//!
//! Prompts of about 1k, 8k and 32k tokens (English prose with numbers, fresh per request so no
//! cache helps), one at a time; prints the median and p90 per size and path, and checks both
//! give the same ids.
//!
//! `cargo bench -p kvsync --bench tokenize` (env: TOKENIZE_DIR, default
//! `.cache/tokenizers/qwen3` from `scripts/setup`; TOKENIZE_REQUESTS per size and path,
//! default 40)

use kvsync::tokenize::local::LocalTokenizers;
use kvsync::tokenize::{Text, Tokenizer, MAX_RESPONSE_BYTES};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODEL: &str = "bench-llm";

fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// About `tokens` tokens of prose, distinct per `k`.
fn prompt(tok: &hf_tokenize::Tokenizer, tokens: usize, k: usize) -> String {
    const WORDS: &[&str] = &[
        "the", "router", "sends", "each", "request", "to", "a", "pod", "whose", "cache", "already",
        "holds", "its", "prefix,", "and", "measures", "how", "long", "prefill", "takes", "when",
        "nothing", "is", "cached;", "then", "it", "compares", "figures.",
    ];
    let mut s = format!("Request {k}. ");
    let mut i = k;
    // About 1.1 tokens per word: overshoot, then trim to the count.
    while s.len() < tokens * 6 {
        s.push_str(WORDS[i % WORDS.len()]);
        s.push(' ');
        if i % 17 == 0 {
            s.push_str(&format!("{} ", i * 31));
        }
        i = i.wrapping_mul(7).wrapping_add(3) % 10_007;
    }
    let ids = tok.encode_prompt(&s, false).expect("encodes");
    let cut = ids.len().min(tokens);
    tok.decode(&ids[..cut], false).expect("decodes")
}

fn main() {
    let dir = std::env::var_os("TOKENIZE_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers/qwen3"),
        PathBuf::from,
    );
    let n: usize = std::env::var("TOKENIZE_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let local = LocalTokenizers::load(&[(MODEL.to_owned(), dir.clone())])
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup, or set TOKENIZE_DIR)"));
    let files = local.get(MODEL).expect("loaded").clone();
    // The engine's /tokenize on a runtime of its own.
    let engine_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let engine = engine_rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let tok = engine_sim::Tokenizer::with_files(Arc::clone(&files.tok), 1 << 20);
        tokio::spawn(engine_sim::serve_tokenizer(l, tok, std::future::pending()));
        format!("http://{addr}")
    });
    // kvsync's side, as `kvsync serve` runs it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = Tokenizer::new(Duration::from_secs(30), MAX_RESPONSE_BYTES);
    println!(
        "tokenize, {} ({}), {n} prompts per size and path, median / p90",
        MODEL,
        dir.display()
    );
    rt.block_on(async {
        for tokens in [1024usize, 8192, 32_768] {
            let prompts: Vec<String> = (0..n + 3).map(|k| prompt(&files.tok, tokens, k)).collect();
            let (mut l, mut r) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for (k, p) in prompts.iter().enumerate() {
                let text = Text::Prompt {
                    prompt: p,
                    add_special_tokens: true,
                };
                // Alternating, so both see the same machine.
                let t0 = Instant::now();
                let a = local.encode(&files, text.clone()).await.expect("local");
                let t1 = Instant::now();
                let b = client.tokenize(&engine, MODEL, text).await.expect("remote");
                let t2 = Instant::now();
                assert_eq!(a, b.tokens, "both give the same ids");
                if k >= 3 {
                    l.push(t1 - t0);
                    r.push(t2 - t1);
                }
            }
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let (l50, l90) = (quantile(&mut l, 0.5), quantile(&mut l, 0.9));
            let (r50, r90) = (quantile(&mut r, 0.5), quantile(&mut r, 0.9));
            println!(
                "{tokens:>6} tokens: local {:7.2} / {:7.2} ms | remote /tokenize {:7.2} / {:7.2} ms | remote − local {:6.2} ms (median)",
                ms(l50), ms(l90), ms(r50), ms(r90), ms(r50) - ms(l50)
            );
        }
    });
    drop(engine_rt);
}
