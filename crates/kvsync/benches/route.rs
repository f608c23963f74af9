//! `POST /v1/route` with 8192 `token_ids` over HTTP/1.1 on loopback (keep-alive, one client)
//! against the real router and handler with a 64-pod index. Prints median and p99.
//!
//! `cargo bench -p kvsync --bench route` (env: ROUTE_REQUESTS, default 5000)

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kv_events::{BlockHash, BlockStored, Event};
use kvsync::api::{self, AppState};
use kvsync::manager::{PodTable, PodView, WorkerTable};
use kvsync::metrics::Metrics;
use kvsync::pods::{PodInfo, Target};
use prefix_index::{Index, IndexConfig, Source, WorkerId};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PODS: usize = 64;
const TOKENS: usize = 8192;
const BS: usize = 16;

fn main() {
    let n: usize = std::env::var("ROUTE_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    // ROUTE_RUNTIME=current: client and server on one thread (no cross-thread wake-ups: the
    // CPU cost); default: a 2-worker runtime (wake-ups between threads, as in production).
    let rt = if std::env::var("ROUTE_RUNTIME").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    }
    .expect("runtime");
    rt.block_on(run(n));
}

fn chain(seed: u32) -> Vec<u32> {
    (0..TOKENS as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) % 128_000)
        .collect()
}

async fn run(n: usize) {
    let index = Arc::new(Index::new(
        IndexConfig::default().max_blocks_per_context(1 << 22),
    ));
    let pods = PodTable::default();
    let src = Source {
        model: "llama",
        default_lora: None,
    };
    let shared = chain(0);
    for p in 0..PODS {
        let key = format!("ml/vllm-{p}");
        // Every pod holds the first 1024 tokens (a shared system prompt) and its own 8k chain.
        let own: Vec<u32> = shared[..1024]
            .iter()
            .copied()
            .chain(chain(p as u32 + 1)[1024..].iter().copied())
            .collect();
        let w = WorkerId::new(key.clone(), 0);
        let mut parent = None;
        for (e, part) in own.chunks(128 * BS).enumerate() {
            let hashes: Vec<BlockHash> = (0..part.len() / BS)
                .map(|i| BlockHash::Uint(((p as u64) << 32) | (e * 128 + i) as u64))
                .collect();
            let last = *hashes.last().expect("blocks");
            index.apply(
                &w,
                src,
                &Event::BlockStored(BlockStored {
                    block_hashes: hashes,
                    parent_block_hash: parent,
                    token_ids: part.to_vec(),
                    block_size: BS as u32,
                    ..Default::default()
                }),
            );
            parent = Some(last);
        }
        pods.write().insert(
            key.clone(),
            PodView {
                info: PodInfo {
                    key,
                    uid: format!("u{p}"),
                    restarts: 0,
                    target: Ok(Target {
                        ip: format!("127.0.1.{p}"),
                        model: "llama".into(),
                        lora: None,
                        port: 5557,
                        replay_port: 5558,
                        dp_size: 1,
                        topic: String::new(),
                    }),
                },
                subscribed: true,
            },
        );
    }
    let stats = index.stats();
    let workers = WorkerTable::default();
    let metrics = Metrics::new(index.clone(), Arc::default(), workers.clone());
    let (_tx, ready) = tokio::sync::watch::channel(true);
    let state = Arc::new(AppState {
        index: index.clone(),
        pods,
        workers,
        metrics,
        tokenizer: None,
        pod_tokenizer_port: 8000,
        tokenizer_timeout: Duration::from_secs(1),
        kv_sync: true,
        recent: kvsync::approx::Approx::new(std::time::Duration::ZERO, 16, 1 << 22),
        ready,
        selected: parking_lot::Mutex::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, api::router(state)).await;
    });
    // The query: pod 7's whole chain (a full hit for one pod, 64 blocks for every other).
    let own7: Vec<u32> = shared[..1024]
        .iter()
        .copied()
        .chain(chain(8)[1024..].iter().copied())
        .collect();
    let body = Bytes::from(serde_json::json!({"model": "llama", "token_ids": own7}).to_string());
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let uri = format!("http://{addr}/v1/route");
    let call = || {
        let req = hyper::Request::post(&uri)
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .expect("request");
        client.request(req)
    };
    for _ in 0..500 {
        let r = call().await.expect("response");
        assert_eq!(r.status(), 200);
        let _ = r.into_body().collect().await;
    }
    let mut lat = Vec::with_capacity(n);
    let mut last = Bytes::new();
    for _ in 0..n {
        let t = Instant::now();
        let r = call().await.expect("response");
        last = r.into_body().collect().await.expect("body").to_bytes();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // The floor: the same path with a 16-token body (HTTP, handler, 64-pod answer).
    let small =
        Bytes::from(serde_json::json!({"model": "llama", "token_ids": &own7[..16]}).to_string());
    let mut floor = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let req = hyper::Request::post(&uri)
            .header("content-type", "application/json")
            .body(Full::new(small.clone()))
            .expect("request");
        let r = client.request(req).await.expect("response");
        let _ = r.into_body().collect().await.expect("body");
        floor.push(t.elapsed().as_secs_f64() * 1e6);
    }
    floor.sort_by(f64::total_cmp);
    let health_uri = format!("http://{addr}/healthz");
    let mut health = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client
            .request(
                hyper::Request::get(&health_uri)
                    .body(Full::new(Bytes::new()))
                    .expect("request"),
            )
            .await
            .expect("response");
        let _ = r.into_body().collect().await.expect("body");
        health.push(t.elapsed().as_secs_f64() * 1e6);
    }
    health.sort_by(f64::total_cmp);
    let body_len = body.len();
    let t = Instant::now();
    for _ in 0..n {
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        std::hint::black_box(v);
    }
    let parse_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let v: serde_json::Value = serde_json::from_slice(&last).expect("json");
    assert_eq!(v["selected"]["pod"], "ml/vllm-7");
    assert_eq!(v["selected"]["matched_blocks"], 512);
    let q: Vec<u32> = own7.clone();
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(index.lookup("llama", None, &q));
    }
    let lookup_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    println!(
        "route 8k token_ids over HTTP, {PODS} pods ({} blocks indexed), {n} requests: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs",
        stats.blocks,
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    println!(
        "  parts: in-process lookup {lookup_us:.1} µs; GET /healthz p50 {:.1} µs; 16-token route p50 {:.1} µs; serde_json::Value parse of the {body_len}-byte body {parse_us:.1} µs",
        health[health.len() / 2],
        floor[floor.len() / 2]
    );
}
