//! The HTTP server against hostile and careless clients, on port 0 over real TCP: hundreds of
//! connections trickling their headers one byte at a time, connections that never send
//! anything, idle keep-alive connections, more connections than the cap, and one connection
//! asking more than its share of requests. A normal client must still be answered; the others
//! must be cut once the header timeout has passed.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kvsync::config::Config;
use kvsync::http::server::Limits;
use kvsync::serve::{self, Options};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MODEL: &str = "llama";

/// One eligible pod (KV sync off: no subscriber, routes by token ids need no tokenizer).
fn pod_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kvsync-slow-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let f = dir.join("pods.yaml");
    std::fs::write(
        &f,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: ml\n  uid: a\n  labels:\n    model.aibrix.ai/kv-events-enabled: \"true\"\n    model.aibrix.ai/name: {MODEL}\nstatus:\n  phase: Running\n  podIP: 127.0.0.1\n  conditions:\n  - type: Ready\n    status: \"True\"\n"
        ),
    )
    .expect("write");
    f
}

fn config() -> Config {
    Config {
        kv_sync: false,
        tokenizer: None,
        poll_timeout: Duration::from_millis(100),
        replay_timeout: Duration::from_secs(5),
        max_contexts: 1000,
        max_prefixes_per_context: 10_000,
    }
}

/// A client that opens a new connection for every request (so each one passes the accept
/// loop, as a new client would).
fn fresh_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(HttpConnector::new())
}

async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Starts the service and waits until its pod is listed.
async fn start(name: &str, limits: Limits) -> (serve::Running, std::path::PathBuf) {
    let file = pod_file(name);
    let opts = Options {
        listen: "127.0.0.1:0".parse().expect("addr"),
        pods_file: Some(file.clone()),
        pods_interval: Duration::from_millis(50),
        http: limits,
        ..Options::default()
    };
    let running = serve::start(config(), opts).await.expect("service");
    let client = fresh_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, m) = call(&client, running.addr, "GET", "/v1/models", &Value::Null).await;
        if m["models"].as_array().is_some_and(|m| !m.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "pod never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (running, file)
}

fn passed(file: &std::path::Path) {
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// How a client connection behaves until the server closes it.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Sends a request head one byte at a time, never finishing it.
    Trickle,
    /// Connects and sends nothing.
    Silent,
    /// Makes one request, reads its answer, then sends nothing.
    KeepAliveIdle,
}

/// Hostile connections cut so far, by [`Kind`].
type Cut = [AtomicUsize; 3];

fn cut_by_kind(c: &Cut) -> [usize; 3] {
    [0, 1, 2].map(|k| c[k].load(Relaxed))
}

/// Runs one client; returns how long its connection stayed open (until the server closed it).
/// Those cut so far are counted in `cut`, by kind.
async fn hostile(addr: SocketAddr, kind: Kind, every: Duration, cut: Arc<Cut>) -> Duration {
    let open = hostile_until_closed(addr, kind, every).await;
    cut[kind as usize].fetch_add(1, Relaxed);
    open
}

async fn hostile_until_closed(addr: SocketAddr, kind: Kind, every: Duration) -> Duration {
    // Timed from before the connect: the server's timer starts at its accept, after it.
    let opened = Instant::now();
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 4096];
    if let Kind::KeepAliveIdle = kind {
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: kvsync\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        while !got.ends_with(b"ok") {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the answer");
            got.extend_from_slice(&buf[..n]);
        }
    }
    // An endless head: a request line, then one header whose value never ends.
    let head = b"POST /v1/route HTTP/1.1\r\nhost: kvsync\r\nx-slow: ";
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            r = conn.read(&mut buf) => match r {
                Ok(0) | Err(_) => return opened.elapsed(),
                // Whatever the server says (hyper may answer 408), the close is what counts.
                Ok(_) => {}
            },
            _ = tick.tick(), if matches!(kind, Kind::Trickle) => {
                let byte = head.get(sent).copied().unwrap_or(b'a');
                sent += 1;
                if conn.write_all(&[byte]).await.is_err() {
                    return opened.elapsed();
                }
            }
        }
    }
}

/// Median and largest of a set of durations, in milliseconds.
fn summary(mut d: Vec<Duration>) -> (f64, f64) {
    d.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(d[d.len() / 2]), ms(d[d.len() - 1]))
}

/// Route requests on fresh connections, each answered 200; their latencies.
async fn normal_routes(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let client = fresh_client();
    let body = json!({"model": MODEL, "token_ids": (1..=64).collect::<Vec<u32>>()});
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let (s, r) = call(&client, addr, "POST", "/v1/route", &body).await;
        lat.push(t0.elapsed());
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["selected"]["pod"], "ml/a", "{r}");
    }
    lat
}

/// 500 connections trickle their headers a byte at a time, 100 never send anything, 20 go
/// idle after one request: a normal client's `/v1/route` is still answered while they are
/// open (its latency with and without them is printed), and each of them is closed by the
/// server, no sooner than the header timeout after it opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_and_normal_clients_still_served() {
    let timeout = Duration::from_secs(3);
    let (running, file) = start(
        "trickle",
        Limits {
            max_connections: 2048,
            header_timeout: timeout,
            max_requests_per_connection: 1000,
        },
    )
    .await;
    let addr = running.addr;
    let quiet = normal_routes(addr, 50).await;

    let mut clients = tokio::task::JoinSet::new();
    let cut_so_far: Arc<Cut> = Arc::default();
    let kinds = std::iter::repeat_n(Kind::Trickle, 500)
        .chain(std::iter::repeat_n(Kind::Silent, 100))
        .chain(std::iter::repeat_n(Kind::KeepAliveIdle, 20));
    for kind in kinds {
        let cut = cut_so_far.clone();
        clients.spawn(async move {
            let open = hostile(addr, kind, Duration::from_millis(100), cut).await;
            (kind, open)
        });
    }
    // While they hold their connections: the normal client, on new connections.
    let stormy = normal_routes(addr, 50).await;
    let open_after = 620 - cut_by_kind(&cut_so_far).iter().sum::<usize>();
    let (q_med, q_max) = summary(quiet);
    let (s_med, s_max) = summary(stormy);
    println!(
        "/v1/route latency, fresh connection each: alone median {q_med:.2} ms max {q_max:.2} ms; \
         with 500 trickling + 100 silent + 20 idle keep-alive connections median {s_med:.2} ms \
         max {s_max:.2} ms ({open_after} of them still open at its end)"
    );

    // Every hostile connection is cut, none before the header timeout. (The guard only stops
    // a hang: without a header timeout they are never cut.)
    let mut cut = 0;
    let mut slowest = Duration::ZERO;
    while let Some(r) = tokio::time::timeout(10 * timeout, clients.join_next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} hostile connections still open {:?} after the header timeout passed \
                 (cut so far: trickling, silent, idle keep-alive {:?})",
                clients.len(),
                cut_by_kind(&cut_so_far),
                10 * timeout
            )
        })
    {
        let (kind, open) = r.expect("client task");
        assert!(
            open >= timeout,
            "{kind:?} connection cut after {open:?}, before the header timeout {timeout:?}"
        );
        slowest = slowest.max(open);
        cut += 1;
    }
    assert_eq!(cut, 620);
    println!("all 620 hostile connections cut, the last {slowest:?} after it opened");
    // And counted, each once the server has closed it.
    let client = fresh_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = hyper::Request::get(format!("http://{addr}/metrics"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = client.request(req).await.expect("metrics");
        let text = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&text);
        let timeouts: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("kvsync_http_header_timeouts_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no kvsync_http_header_timeouts_total in\n{text}"));
        if timeouts == 620.0 {
            break;
        }
        assert!(timeouts < 620.0, "{timeouts} header timeouts counted");
        assert!(
            Instant::now() < deadline,
            "{timeouts} header timeouts counted, not 620"
        );
        tokio::task::yield_now().await;
    }
    running.stop().await.expect("clean stop");
    passed(&file);
}

/// One raw HTTP/1.1 answer off `conn`: its status line and headers (lower-cased), its body read
/// by `content-length`.
async fn answer(conn: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed before an answer: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, body)
}

async fn healthz(conn: &mut TcpStream) -> String {
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: kvsync\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = answer(conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"ok");
    head
}

/// The connection cap holds: with every permit taken by idle connections, a new connection is
/// served only once the header timeout has closed one of them. A connection is closed after
/// its `max_requests_per_connection`th answer, which says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_and_requests_per_connection() {
    let (running, file) = start(
        "cap",
        Limits {
            max_connections: 4,
            header_timeout: Duration::from_secs(1),
            max_requests_per_connection: 3,
        },
    )
    .await;
    let closes = |head: &str| head.contains("connection: close");

    // Three requests on one connection: the third answer closes it.
    let mut conn = TcpStream::connect(running.addr).await.expect("connect");
    for i in 1..=3 {
        let head = healthz(&mut conn).await;
        assert_eq!(closes(&head), i == 3, "answer {i}: {head}");
    }
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).await.expect("read to the end");
    assert!(rest.is_empty(), "{rest:?}");

    // Four connections, each answered once (so each holds a permit), then idle.
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(running.addr).await.expect("connect");
        healthz(&mut c).await;
        idle.push(c);
    }
    // A fifth is answered, but only after one of the four was closed for idleness.
    let mut fifth = TcpStream::connect(running.addr).await.expect("connect");
    tokio::time::timeout(Duration::from_secs(30), healthz(&mut fifth))
        .await
        .expect("the fifth connection is served once a permit is free");
    let closed = idle
        .iter()
        .filter(|c| {
            let mut b = [0u8; 16];
            match c.try_read(&mut b) {
                Ok(n) => n == 0,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        })
        .count();
    assert!(
        closed >= 1,
        "the fifth connection was served while the four others were all open"
    );
    running.stop().await.expect("clean stop");
    passed(&file);
}

/// Shutdown lets the request in flight finish: a client whose request is in its handler (it
/// got `100 Continue`) sends its body after the service stopped accepting, and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_is_answered_after_shutdown_began() {
    let (running, file) = start("inflight", Limits::default()).await;
    let addr = running.addr;
    let body = json!({"model": MODEL, "token_ids": [1, 2, 3, 4]}).to_string();
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    conn.write_all(
        format!(
            "POST /v1/route HTTP/1.1\r\nhost: kvsync\r\ncontent-type: application/json\r\n\
             expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 256];
    while !got.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed before 100 Continue");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 100"), "{got:?}");
    let stopping = tokio::spawn(running.stop());
    // Stopped accepting: new connections are refused.
    while let Ok(c) = TcpStream::connect(addr).await {
        drop(c);
        tokio::task::yield_now().await;
    }
    conn.write_all(body.as_bytes())
        .await
        .expect("write the body");
    let (head, answer_body) = answer(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let r: Value = serde_json::from_slice(&answer_body).expect("JSON");
    assert_eq!(r["selected"]["pod"], "ml/a", "{r}");
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)
        .await
        .expect("closed after the answer");
    assert!(rest.is_empty(), "{rest:?}");
    stopping.await.expect("stop task").expect("clean stop");
    passed(&file);
}
