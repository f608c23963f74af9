//! `POST /v1/route` with 8192 `token_ids` (50 KB of JSON) over HTTP/1.1 on loopback against
//! the real router and handler with a 64-pod index, as `kvsync serve` runs it (recent-decision
//! overlay on, 2 s). Prints median and p99 of:
//! - `serve`: the server on a 2-worker runtime like `kvsync serve`, the client another thread
//!   with a blocking socket (a gateway process): two cross-thread wake-ups per request, whose
//!   cost on this machine is printed beside it as a bare TCP ping-pong between two threads;
//! - `one thread`: client and server tasks on one thread: no wake-ups, the CPU a route costs
//!   both ends;
//! - parts: request parse (kvsync's and serde_json's), index lookup, a 16-token route, healthz.
//!
//! `cargo bench -p kvsync --bench route` (env: ROUTE_REQUESTS, default 5000)

use kv_events::{BlockHash, BlockStored, Event};
use kvsync::http::{self, AppState};
use kvsync::manager::{PodTable, PodView, WorkerTable};
use kvsync::metrics::Metrics;
use kvsync::pods::{PodInfo, Target};
use prefix_index::{Index, IndexConfig, Source, WorkerId};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
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
    let (state, query, blocks) = setup();
    let body = serde_json::json!({"model": "llama", "token_ids": query}).to_string();
    let small = serde_json::json!({"model": "llama", "token_ids": &query[..16]}).to_string();
    let route = |b: &str| {
        format!(
            "POST /v1/route HTTP/1.1\r\nhost: kvsync\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
            b.len()
        )
        .into_bytes()
    };
    let (big_req, small_req) = (route(&body), route(&small));
    let health_req = b"GET /healthz HTTP/1.1\r\nhost: kvsync\r\n\r\n".to_vec();

    // `serve`: a 2-worker runtime; the client a plain thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = rt.block_on(listen(state.clone()));
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut answer = Vec::new();
    let serve = measure(n, || answer = call(&mut c, &big_req));
    let v: serde_json::Value = serde_json::from_slice(&answer).expect("json answer");
    assert_eq!(v["selected"]["pod"], "ml/vllm-7");
    assert_eq!(v["selected"]["matched_blocks"], 512);
    assert_eq!(v["pods"].as_array().map(Vec::len), Some(PODS));
    let serve_small = measure(n, || {
        call(&mut c, &small_req);
    });
    let serve_health = measure(n, || {
        call(&mut c, &health_req);
    });
    drop(c);
    drop(rt);
    let floor = ping_pong(n);

    // One thread: client and server tasks on a current-thread runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (one, one_small, one_health) = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = listen(state.clone()).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.set_nodelay(true).expect("nodelay");
        let mut buf = vec![0u8; 1 << 16];
        let mut out = Vec::new();
        let mut all = Vec::new();
        for req in [&big_req, &small_req, &health_req] {
            let mut lat = Vec::with_capacity(n);
            for k in 0..n + n / 10 {
                let t = Instant::now();
                c.write_all(req).await.expect("write");
                out.clear();
                while !complete(&out) {
                    let got = c.read(&mut buf).await.expect("read");
                    assert!(got > 0, "server closed");
                    out.extend_from_slice(&buf[..got]);
                }
                if k >= n / 10 {
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            lat.sort_by(f64::total_cmp);
            all.push(lat);
        }
        let mut it = all.into_iter();
        (
            it.next().expect("big"),
            it.next().expect("small"),
            it.next().expect("health"),
        )
    });

    // Parts, in process.
    let parse_kvsync = measure(n, || {
        std::hint::black_box(kvsync::http::request::parse(body.as_bytes()).expect("parse"));
    });
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Typed {
        model: String,
        token_ids: Vec<u32>,
    }
    let parse_serde = measure(n.min(2000), || {
        std::hint::black_box(serde_json::from_str::<Typed>(&body).expect("parse"));
    });
    let lookup = measure(n, || {
        std::hint::black_box(state.index.lookup("llama", None, &query));
    });
    let chain = measure(n, || {
        std::hint::black_box(state.index.chain("llama", None, BS as u32, &query));
    });
    let p = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "route 8k token_ids ({} bytes) over HTTP, {PODS} pods ({blocks} blocks indexed), {n} requests:",
        body.len()
    );
    println!(
        "  serve (2-worker runtime, client thread): p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs; machine floor (bare TCP ping-pong between two threads) p50 {:.1} µs",
        p(&serve, 0.5),
        p(&serve, 0.9),
        p(&serve, 0.99),
        p(&floor, 0.5)
    );
    println!(
        "  one thread (no wake-ups): p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs",
        p(&one, 0.5),
        p(&one, 0.9),
        p(&one, 0.99)
    );
    println!(
        "  16-token route p50: serve {:.1} µs, one thread {:.1} µs; GET /healthz p50: serve {:.1} µs, one thread {:.1} µs",
        p(&serve_small, 0.5),
        p(&one_small, 0.5),
        p(&serve_health, 0.5),
        p(&one_health, 0.5)
    );
    println!(
        "  in process p50: request parse {:.1} µs (serde_json typed {:.1} µs); block hash chain {:.1} µs; index lookup {:.1} µs",
        p(&parse_kvsync, 0.5),
        p(&parse_serde, 0.5),
        p(&chain, 0.5),
        p(&lookup, 0.5)
    );
    println!(
        "route serve_p50_us={:.1} serve_p99_us={:.1} one_thread_p50_us={:.1} one_thread_p99_us={:.1} floor_p50_us={:.1}",
        p(&serve, 0.5),
        p(&serve, 0.99),
        p(&one, 0.5),
        p(&one, 0.99),
        p(&floor, 0.5)
    );
}

/// Runs `f` `n` times after `n / 10` warm-up runs; the sorted latencies in µs.
fn measure(n: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..n / 10 {
        f();
    }
    let mut lat: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    lat
}

/// Whether `buf` holds one whole HTTP/1.1 response (headers and a `content-length` body).
fn complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = std::str::from_utf8(&buf[..end]).expect("utf-8 headers");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    buf.len() >= end + 4 + len
}

/// One request on a blocking keep-alive connection; the response body.
fn call(c: &mut TcpStream, req: &[u8]) -> Vec<u8> {
    c.write_all(req).expect("write");
    let mut out = Vec::with_capacity(16 << 10);
    let mut buf = [0u8; 16 << 10];
    while !complete(&out) {
        let got = c.read(&mut buf).expect("read");
        assert!(got > 0, "server closed");
        out.extend_from_slice(&buf[..got]);
    }
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    out.split_off(end)
}

/// 64 bytes there and back between two threads over loopback TCP: the machine's floor.
fn ping_pong(n: usize) -> Vec<f64> {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut b = [0u8; 64];
    let lat = measure(n, || {
        c.write_all(&b).expect("write");
        c.read_exact(&mut b).expect("read");
    });
    drop(c);
    let _ = echo.join();
    lat
}

/// Serves the API on a loopback port of the current runtime.
async fn listen(state: Arc<AppState>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, http::router(state)).await;
    });
    addr
}

fn chain(seed: u32) -> Vec<u32> {
    (0..TOKENS as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) % 128_000)
        .collect()
}

/// A 64-pod index: every pod holds a shared 1024-token prefix and its own 8k chain. Returns
/// the state, the query (pod 7's chain: a full hit there, 64 blocks elsewhere) and the blocks.
fn setup() -> (Arc<AppState>, Vec<u32>, usize) {
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
                        replay_port: Some(5558),
                        dp_size: 1,
                        topic: String::new(),
                        http_port: 8000,
                    }),
                },
                subscribed: true,
            },
        );
    }
    let stats = index.stats();
    let workers = WorkerTable::default();
    // As `kvsync serve` by default: decisions count for 2 s, in 64 MiB.
    let recent = Arc::new(kvsync::route::approx::Approx::new(
        Duration::from_secs(2),
        BS,
        64 << 20,
    ));
    let mut metrics = Metrics::new(
        index.clone(),
        Arc::default(),
        workers.clone(),
        recent.clone(),
    );
    let proxy = Arc::new(kvsync::proxy::Proxy::new(
        kvsync::proxy::ProxyConfig::default(),
        &mut metrics.registry,
    ));
    let (_tx, ready) = tokio::sync::watch::channel(true);
    let state = Arc::new(AppState {
        index: index.clone(),
        pods,
        workers,
        metrics,
        tokenizer: kvsync::tokenize::Tokenizer::new(
            Duration::from_secs(1),
            kvsync::tokenize::MAX_RESPONSE_BYTES,
        ),
        tokenizer_endpoint: None,
        pod_tokenizer_port: None,
        local: Default::default(),
        body_timeout: kvsync::http::BODY_TIMEOUT,
        kv_sync: true,
        recent,
        ready,
        selected: parking_lot::Mutex::default(),
        proxy,
    });
    let own7: Vec<u32> = shared[..1024]
        .iter()
        .copied()
        .chain(chain(8)[1024..].iter().copied())
        .collect();
    (state, own7, stats.blocks)
}
