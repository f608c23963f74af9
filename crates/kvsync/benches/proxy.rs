//! What kvsync adds in the request path: the same streamed completions (an 8192-token prompt,
//! one output token) sent straight to simulated engines and through `kvsync serve`, in
//! alternating rounds on one keep-alive client. Prints, per path, the time to the first body
//! byte (p50, p99) and the difference, and the process CPU per request (the engines and the
//! client run in this process too, so the difference is what kvsync costs):
//! - `ids`: the prompt as token ids (tokenization apart);
//! - `text`: the prompt as 8192 words, tokenized by kvsync through the remote `/tokenize`
//!   (engine-sim's tokenizer on loopback) before it chooses (tokenization included).
//!
//! - `text-local` (with `PROXY_TOKENIZER=DIR`): the same text through a second `kvsync serve`
//!   that tokenizes in process (`--tokenizer MODEL=DIR`). In that mode every tokenizer (the
//!   engines', the remote `/tokenize`, kvsync's) uses the model's files from DIR and the text
//!   is prose cut to 8192 tokens of that model, so `text` and `text-local` differ only in
//!   where kvsync tokenizes.
//!
//! The engines answer at once (engine-sim's `InstantBackend`: its prefix-caching pool, no
//! model); kvsync runs as `kvsync serve` does (2-worker runtime, `--policy kv-aware`, KV sync
//! off: the recent decisions are its index, so its chain of block hashes is computed as with
//! KV sync).
//!
//! `cargo bench -p kvsync --bench proxy` (env: PROXY_REQUESTS per path and kind, default 1000;
//! PROXY_TOKENIZER=DIR, e.g. `.cache/tokenizers/qwen3`, adds `text-local`)

use bytes::Bytes;
use engine_sim::http::{HttpConfig, InstantBackend, InstantConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kvsync::config::{Config, RemoteTokenizer, TokenizerEngine};
use kvsync::serve::{self, Options};
use kvsync_demo::{TokenizerServer, VOCAB};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODEL: &str = "bench-llm";
const ENGINES: usize = 4;
const TOKENS: u32 = 8192;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Process CPU seconds (user + system) from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14 and 15 of the file are the 12th and 13th after the command's `)`.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// Time to the first body frame of a streamed completion, then the rest read.
async fn ttfb(client: &HttpClient, url: &str, body: Bytes) -> Duration {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request");
    let t0 = Instant::now();
    let resp = client.request(req).await.expect("answer");
    assert_eq!(resp.status(), 200);
    let mut b = resp.into_body();
    let first = b.frame().await.expect("a frame").expect("data");
    let t = t0.elapsed();
    assert!(first.is_data());
    while b.frame().await.is_some() {}
    t
}

fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let n: usize = std::env::var("PROXY_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let files: Option<(std::path::PathBuf, Arc<hf_tokenize::Tokenizer>)> =
        std::env::var_os("PROXY_TOKENIZER").map(|d| {
            let dir = std::path::PathBuf::from(d);
            let tok = hf_tokenize::Tokenizer::from_dir(&dir)
                .unwrap_or_else(|e| panic!("PROXY_TOKENIZER: {e}"));
            (dir, Arc::new(tok))
        });
    // The engines and the tokenizer on a runtime of their own.
    let engines_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (engine_addrs, tok) = engines_rt.block_on(async {
        let mut addrs = Vec::new();
        for _ in 0..ENGINES {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addrs.push(l.local_addr().expect("addr"));
            let backend = Arc::new(InstantBackend::new(InstantConfig {
                num_blocks: 8192,
                max_model_len: 16_384,
                vocab: VOCAB,
                ..InstantConfig::default()
            }));
            let mut cfg = HttpConfig::new(MODEL);
            cfg.vocab = VOCAB;
            cfg.tokenizer = files.as_ref().map(|f| f.1.clone());
            tokio::spawn(engine_sim::http::serve(
                l,
                backend,
                cfg,
                std::future::pending(),
            ));
        }
        let tok = match &files {
            None => {
                let t = TokenizerServer::start().await.expect("tokenizer");
                (t.addr, Some(t))
            }
            Some((dir, _)) => {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = l.local_addr().expect("addr");
                // Its own copy, as another process has (the engines share one: sharing its
                // warm caches would flatter the remote path).
                let own = hf_tokenize::Tokenizer::from_dir(dir).expect("tokenizer files");
                let t = engine_sim::Tokenizer::with_files(Arc::new(own), 16_384);
                tokio::spawn(engine_sim::serve_tokenizer(l, t, std::future::pending()));
                (addr, None)
            }
        };
        (addrs, tok)
    });
    let (tok, _word_tokenizer) = tok;
    // kvsync as `kvsync serve` runs it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("kvsync-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pods = dir.join("pods.yaml");
    let items: String = engine_addrs
        .iter()
        .enumerate()
        .map(|(i, a)| pod_yaml(i, *a))
        .collect();
    std::fs::write(
        &pods,
        format!("apiVersion: v1\nkind: List\nitems:\n{items}"),
    )
    .expect("pods");
    let cfg = Config {
        kv_sync: false,
        tokenizer: Some(RemoteTokenizer {
            engine: TokenizerEngine::Vllm,
            endpoint: format!("http://{tok}"),
        }),
        poll_timeout: Duration::from_millis(100),
        replay_timeout: Duration::from_secs(5),
        max_contexts: 1000,
        max_prefixes_per_context: 100_000,
    };
    let opts = Options {
        listen: "127.0.0.1:0".parse().expect("addr"),
        pods_file: Some(pods),
        pods_interval: Duration::from_millis(50),
        ..Options::default()
    };
    let running = rt
        .block_on(serve::start(cfg.clone(), opts.clone()))
        .expect("kvsync");
    let kvsync = running.addr;
    // The same, tokenizing in process.
    let running_local = files.as_ref().map(|(dir, _)| {
        let opts = Options {
            tokenizers: vec![(MODEL.to_owned(), dir.clone())],
            ..opts.clone()
        };
        rt.block_on(serve::start(cfg.clone(), opts))
            .expect("kvsync (local tokenizer)")
    });

    // The client: one keep-alive connection per target, on the current thread.
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    client_rt.block_on(async {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        // Each kvsync sees every pod.
        for addr in std::iter::once(kvsync).chain(running_local.as_ref().map(|r| r.addr)) {
        let models = format!("http://{addr}/v1/models");
        loop {
            let req = hyper::Request::get(&models)
                .body(Full::new(Bytes::new()))
                .expect("request");
            if let Ok(r) = client.request(req).await {
                let b = r.into_body().collect().await.expect("body").to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                if v["data"][0]["pods"] == ENGINES {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        }
        println!("proxy overhead, {TOKENS}-token prompt, streamed, 1 output token, {n} requests per path and kind");
        let kinds: &[&str] = if files.is_some() {
            &["ids", "text", "text-local"]
        } else {
            &["ids", "text"]
        };
        for &kind in kinds {
            let kvsync = match (kind, &running_local) {
                ("text-local", Some(r)) => r.addr,
                _ => kvsync,
            };
            // A fresh prompt each request (no prefix shared across requests: prefill work is
            // the engine's either way), the same prompts on both paths.
            let body = |k: usize| -> Bytes {
                let base = 1000 + (k as u32 % 7) * 3000;
                let ids: Vec<u32> = (0..TOKENS).map(|i| base + (i * 7 + k as u32) % 3000).collect();
                let v = if kind == "ids" {
                    json!({"model": MODEL, "prompt": ids, "max_tokens": 1, "stream": true})
                } else if let Some((_, f)) = &files {
                    json!({"model": MODEL, "prompt": prose(f, k), "max_tokens": 1, "stream": true})
                } else {
                    let text: String = (0..TOKENS).map(|i| format!("w{}k{k} ", i % 500)).collect();
                    json!({"model": MODEL, "prompt": text, "max_tokens": 1, "stream": true})
                };
                Bytes::from(v.to_string())
            };
            let (mut direct, mut through) = (Vec::with_capacity(n), Vec::with_capacity(n));
            let (mut cpu_direct, mut cpu_through) = (0.0, 0.0);
            // Warm-up, then alternating rounds of 50.
            for k in 0..20 {
                let e = engine_addrs[k % ENGINES];
                ttfb(&client, &format!("http://{e}/v1/completions"), body(k)).await;
                ttfb(&client, &format!("http://{kvsync}/v1/completions"), body(k)).await;
            }
            let mut k = 0;
            while direct.len() < n {
                let bodies: Vec<Bytes> = (k..k + 50).map(body).collect();
                let c0 = cpu_seconds();
                for (j, b) in bodies.iter().enumerate() {
                    let e = engine_addrs[(k + j) % ENGINES];
                    direct.push(ttfb(&client, &format!("http://{e}/v1/completions"), b.clone()).await);
                }
                let c1 = cpu_seconds();
                for b in &bodies {
                    through.push(ttfb(&client, &format!("http://{kvsync}/v1/completions"), b.clone()).await);
                }
                cpu_direct += c1 - c0;
                cpu_through += cpu_seconds() - c1;
                k += 50;
            }
            let m = direct.len() as f64;
            let (d50, d99) = (quantile(&mut direct, 0.5), quantile(&mut direct, 0.99));
            let (t50, t99) = (quantile(&mut through, 0.5), quantile(&mut through, 0.99));
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            println!(
                "{kind:>4}: direct p50 {:7.0} µs p99 {:7.0} µs | through kvsync p50 {:7.0} µs p99 {:7.0} µs | added p50 {:6.0} µs p99 {:6.0} µs | CPU per request direct {:6.0} µs, through {:6.0} µs, added {:6.0} µs",
                us(d50), us(d99), us(t50), us(t99),
                us(t50) - us(d50), us(t99) - us(d99),
                cpu_direct / m * 1e6, cpu_through / m * 1e6, (cpu_through - cpu_direct) / m * 1e6,
            );
        }
        // kvsync's own account of tokenizing (`kvsync_tokenize_seconds`), per instance.
        for addr in std::iter::once(kvsync).chain(running_local.as_ref().map(|r| r.addr)) {
            let req = hyper::Request::get(format!("http://{addr}/metrics"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            let r = client.request(req).await.expect("metrics");
            let b = r.into_body().collect().await.expect("body").to_bytes();
            let text = String::from_utf8_lossy(&b).into_owned();
            for source in ["local", "remote"] {
                let value = |suffix: &str| -> f64 {
                    let key = format!("kvsync_tokenize_seconds_{suffix}{{source=\"{source}\"}} ");
                    text.lines()
                        .find_map(|l| l.strip_prefix(key.as_str()))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0.0)
                };
                let (sum, count) = (value("sum"), value("count"));
                if count > 0.0 {
                    println!(
                        "kvsync {addr}: kvsync_tokenize_seconds{{source=\"{source}\"}} mean {:.0} µs over {count} texts",
                        sum / count * 1e6
                    );
                }
            }
        }
    });
    rt.block_on(running.stop()).expect("stop");
    if let Some(r) = running_local {
        rt.block_on(r.stop()).expect("stop");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Prose of `TOKENS - 1` tokens of the model (with its BOS, if it adds one, `TOKENS`),
/// distinct per `k`.
fn prose(tok: &hf_tokenize::Tokenizer, k: usize) -> String {
    const WORDS: &[&str] = &[
        "the", "router", "sends", "each", "request", "to", "a", "pod", "whose", "cache", "already",
        "holds", "its", "prefix,", "and", "measures", "how", "long", "prefill", "takes", "when",
        "nothing", "is", "cached;", "then", "it", "compares", "figures.",
    ];
    let mut s = format!("Request {k}. ");
    let mut i = k;
    while s.len() < TOKENS as usize * 6 {
        s.push_str(WORDS[i % WORDS.len()]);
        s.push(' ');
        if i % 17 == 0 {
            s.push_str(&format!("{} ", i * 31));
        }
        i = i.wrapping_mul(7).wrapping_add(3) % 10_007;
    }
    let ids = tok.encode_prompt(&s, false).expect("encodes");
    tok.decode(&ids[..ids.len().min(TOKENS as usize - 1)], false)
        .expect("decodes")
}

fn pod_yaml(i: usize, a: SocketAddr) -> String {
    format!(
        "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: e{i}\n    namespace: bench\n    uid: e{i}\n    labels:\n      model.aibrix.ai/kv-events-enabled: \"true\"\n      model.aibrix.ai/name: {MODEL}\n    annotations:\n      model.aibrix.ai/port: \"{}\"\n  status:\n    phase: Running\n    podIP: {}\n    conditions:\n    - type: Ready\n      status: \"True\"\n",
        a.port(),
        a.ip()
    )
}
