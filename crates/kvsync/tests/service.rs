//! The service on port 0: real HTTP, a test tokenizer speaking vLLM's `/tokenize` schema, pods
//! from a pod file whose subscribers are fed by real ZeroMQ publishers (pyzmq).

#[path = "../../kv-subscriber/tests/support/mod.rs"]
mod support;

use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kv_events::{encode, BlockHash, BlockStored, Event, EventBatch, WireFormat};
use kvsync::config::{Config, RemoteTokenizer, TokenizerEngine};
use kvsync::http;
use kvsync::serve::{self, Options};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::Publisher;

const MODEL: &str = "llama";

/// The test tokenizer: each whitespace-separated word that is a number is that token id;
/// chat messages are their contents in order, plus token 9999 for the generation prompt.
async fn tokenizer() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    async fn tokenize(Json(req): Json<Value>) -> Json<Value> {
        let words = |s: &str| -> Vec<u32> {
            s.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        };
        let mut tokens = match req["prompt"].as_str() {
            Some(p) => words(p),
            None => req["messages"]
                .as_array()
                .map(|ms| {
                    ms.iter()
                        .flat_map(|m| words(m["content"].as_str().unwrap_or("")))
                        .collect()
                })
                .unwrap_or_default(),
        };
        if req["add_generation_prompt"].as_bool() == Some(true) {
            tokens.push(9999);
        }
        Json(json!({"count": tokens.len(), "max_model_len": 8192, "tokens": tokens}))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, Router::new().route("/tokenize", post(tokenize))).await;
    });
    (addr, task)
}

fn pod_yaml(name: &str, p: &Publisher) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: ml\n  uid: {name}\n  labels:\n    model.aibrix.ai/kv-events-enabled: \"true\"\n    model.aibrix.ai/name: {MODEL}\n  annotations:\n    model.aibrix.ai/kv-events-port: \"{}\"\n    model.aibrix.ai/kv-events-replay-port: \"{}\"\nstatus:\n  phase: Running\n  podIP: 127.0.0.1\n  conditions:\n  - type: Ready\n    status: \"True\"\n",
        p.pub_port, p.replay_port
    )
}

fn stored(seq: u64, hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>) -> Vec<u8> {
    encode(
        &EventBatch {
            ts: 1_700_000_000.0 + seq as f64,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: hashes.iter().copied().map(BlockHash::Uint).collect(),
                parent_block_hash: parent.map(BlockHash::Uint),
                token_ids: tokens,
                block_size: 4,
                ..Default::default()
            })],
            data_parallel_rank: Some(0),
        },
        &WireFormat::VLLM_0_33,
    )
}

struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    fn new(addr: SocketAddr) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            base: format!("http://{addr}"),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let resp = self.client.request(req).await.expect("response");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, bytes.to_vec())
    }

    async fn route(&self, body: &Value) -> (u16, Value) {
        let (s, b) = self
            .call("POST", "/v1/route", body.to_string().into_bytes())
            .await;
        (s, serde_json::from_slice(&b).expect("JSON answer"))
    }

    async fn get_json(&self, path: &str) -> Value {
        let (s, b) = self.call("GET", path, Vec::new()).await;
        assert_eq!(s, 200, "{path}");
        serde_json::from_slice(&b).expect("json")
    }
}

fn config(kv_sync: bool, tokenizer: SocketAddr) -> Config {
    Config {
        kv_sync,
        tokenizer: Some(RemoteTokenizer {
            engine: TokenizerEngine::Vllm,
            endpoint: format!("http://{tokenizer}"),
        }),
        poll_timeout: Duration::from_millis(100),
        replay_timeout: Duration::from_secs(5),
        max_contexts: 1000,
        max_prefixes_per_context: 10_000,
    }
}

fn options(pods_file: std::path::PathBuf) -> Options {
    Options {
        listen: "127.0.0.1:0".parse().expect("addr"),
        pods_file: Some(pods_file),
        pods_interval: Duration::from_millis(50),
        tokenizer_timeout: Duration::from_secs(2),
        ..Options::default()
    }
}

/// A passing test's pod file goes with its directory (the panic of a failing one skips this).
fn passed(file: &std::path::Path) {
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kvsync-svc-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let f = dir.join("pods.yaml");
    std::fs::write(&f, text).expect("write");
    f
}

/// Publishes until the pod's worker holds `want` blocks (the subscription needs a message to
/// prove it is through; replay covers the rest).
async fn feed(http: &Http, p: &mut Publisher, pod: &str, batches: &[Vec<u8>], want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seq = 0u64;
    for b in batches {
        p.send(seq, b);
        seq += 1;
    }
    loop {
        let pods = http.get_json("/v1/pods").await;
        let blocks = pods["pods"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["pod"] == pod))
            .and_then(|x| x["workers"][0]["blocks"].as_u64())
            .unwrap_or(0);
        if blocks >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pod} never reached {want} blocks: {pods}"
        );
        // An empty batch moves the seq on, so a subscriber that joined late sees the gap and
        // replays the stores.
        let empty = encode(
            &EventBatch {
                ts: 0.0,
                events: vec![],
                data_parallel_rank: Some(0),
            },
            &WireFormat::VLLM_0_33,
        );
        p.send(seq, &empty);
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_tokens_prompt_and_messages_rejects_bad_input_and_exports_metrics() {
    let (tok_addr, tok_task) = tokenizer().await;
    let mut a = Publisher::start(&[]);
    let mut b = Publisher::start(&[]);
    let file = temp_file(
        "route",
        &format!("{}---\n{}", pod_yaml("a", &a), pod_yaml("b", &b)),
    );
    let running = serve::start(config(true, tok_addr), options(file.clone()))
        .await
        .expect("service");
    let http = Http::new(running.addr);
    let tokens: Vec<u32> = (1..=16).collect();
    // Pod a caches 4 blocks of tokens 1..=16; pod b the first 2.
    feed(
        &http,
        &mut a,
        "ml/a",
        &[stored(0, &[11, 12, 13, 14], None, tokens.clone())],
        4,
    )
    .await;
    feed(
        &http,
        &mut b,
        "ml/b",
        &[stored(0, &[21, 22], None, tokens[..8].to_vec())],
        2,
    )
    .await;

    let expect = |r: &Value| {
        let pods: Vec<(String, u64)> = r["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .map(|p| {
                (
                    p["pod"].as_str().unwrap_or("").to_owned(),
                    p["matched_blocks"].as_u64().unwrap_or(99),
                )
            })
            .collect();
        pods
    };
    let (s, r) = http
        .route(&json!({"model": MODEL, "token_ids": tokens}))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        expect(&r),
        [("ml/a".to_owned(), 4), ("ml/b".to_owned(), 2)],
        "{r}"
    );
    assert_eq!(
        (r["block_size"].as_u64(), r["num_blocks"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(r["selected"]["pod"], "ml/a");
    assert_eq!(r["selected"]["matched_tokens"], 16);
    assert_eq!(r["selected"]["tier"], "gpu");
    assert_eq!(r["selected"]["address"], "127.0.0.1");

    let prompt = (1..=10)
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let (s, r) = http.route(&json!({"model": MODEL, "prompt": prompt})).await;
    assert_eq!(s, 200, "{r}");
    // 10 tokens: 2 full blocks, which both pods hold.
    assert_eq!(expect(&r).len(), 2, "{r}");
    assert!(expect(&r).iter().all(|(_, n)| *n == 2), "{r}");
    // Ties rotate: the pod selected last time is not selected again.
    let first = r["selected"]["pod"].clone();
    let (_, r2) = http.route(&json!({"model": MODEL, "prompt": prompt})).await;
    assert_ne!(
        r2["selected"]["pod"], first,
        "least recently selected among the best"
    );

    let (s, r) = http
        .route(&json!({"model": MODEL, "messages": [{"role": "user", "content": "1 2 3 4 5 6 7 8 9 10 11 12 13"}]}))
        .await;
    assert_eq!(s, 200, "{r}");
    // 13 words + the generation-prompt token = 14 tokens: 3 full blocks; a holds 3, b 2.
    assert_eq!(
        expect(&r),
        [("ml/a".to_owned(), 3), ("ml/b".to_owned(), 2)],
        "{r}"
    );

    // Bad input: status and a JSON error naming the problem.
    let (s, b) = http.call("POST", "/v1/route", b"{not json".to_vec()).await;
    let e: Value = serde_json::from_slice(&b).expect("json error");
    assert_eq!(s, 400);
    assert!(
        e["error"].as_str().unwrap_or("").contains("malformed JSON"),
        "{e}"
    );
    let cases = [
        (json!({"token_ids": [1, 2]}), 400, "`model`"),
        (
            json!({"model": MODEL, "token_ids": []}),
            400,
            "`token_ids` is empty",
        ),
        (
            json!({"model": MODEL, "token_ids": [1, -2]}),
            400,
            "`token_ids` must be",
        ),
        (json!({"model": MODEL}), 400, "exactly one of"),
        (
            json!({"model": MODEL, "prompt": "1", "token_ids": [1]}),
            400,
            "exactly one of",
        ),
        (
            json!({"model": "gpt-x", "token_ids": [1, 2]}),
            404,
            "unknown model",
        ),
    ];
    for (body, status, msg) in cases {
        let (s, r) = http.route(&body).await;
        assert_eq!(s, status, "{body}: {r}");
        assert!(
            r["error"].as_str().unwrap_or("").contains(msg),
            "{body}: {r}"
        );
    }
    let big = format!(
        "{{\"model\":\"{MODEL}\",\"token_ids\":[{}1]}}",
        "1,".repeat(3 << 20)
    );
    let (s, b) = http.call("POST", "/v1/route", big.into_bytes()).await;
    let e: Value = serde_json::from_slice(&b).expect("json error");
    assert_eq!(s, 413, "{e}");
    assert!(e["error"].as_str().unwrap_or("").contains("body"), "{e}");

    // /metrics through a Prometheus text parser.
    let (s, text) = http.call("GET", "/metrics", Vec::new()).await;
    assert_eq!(s, 200);
    let text = String::from_utf8(text).expect("utf-8");
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} {label:?} missing from\n{text}"))
    };
    // Four routes so far, each selecting a pod that holds every full block of its prompt.
    assert_eq!(
        value("kvsync_route_decisions_total", Some(("bucket", "full"))),
        4.0
    );
    assert_eq!(value("kvsync_subscribers", Some(("state", "live"))), 2.0);
    assert_eq!(value("kvsync_subscription_failures_total", None), 0.0);
    assert_eq!(value("kvsync_workers_failed", None), 0.0);
    assert_eq!(value("kvsync_index_blocks", None), 4.0);
    assert_eq!(value("kvsync_worker_blocks", Some(("pod", "ml/a"))), 4.0);
    assert_eq!(value("kvsync_worker_blocks", Some(("pod", "ml/b"))), 2.0);
    assert!(value("kvsync_events_applied_total", None) >= 2.0);
    assert!(text.contains("kvsync_lookup_seconds_bucket"), "{text}");

    // /v1/pods: where each rank is subscribed.
    let pods = http.get_json("/v1/pods").await;
    let w = pods["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|x| x["pod"] == "ml/a"))
        .map(|x| &x["workers"][0])
        .expect("pod a");
    assert_eq!(
        (
            &w["endpoint"],
            &w["replay_endpoint"],
            &w["state"],
            &w["subscription"],
            &w["failures"]
        ),
        (
            &json!(format!("tcp://127.0.0.1:{}", a.pub_port)),
            &json!(format!("tcp://127.0.0.1:{}", a.replay_port)),
            &json!("Live"),
            &json!("subscribed"),
            &json!(0)
        ),
        "{pods}"
    );

    // /v1/models, /healthz, /readyz.
    let m = http.get_json("/v1/models").await;
    assert_eq!(m["models"][0]["model"], MODEL);
    assert_eq!(m["models"][0]["pods"], 2);
    assert_eq!(http.call("GET", "/healthz", Vec::new()).await.0, 200);
    assert_eq!(http.call("GET", "/readyz", Vec::new()).await.0, 200);

    // The tokenizer down: 502 naming it.
    tok_task.abort();
    let _ = tok_task.await;
    let (s, r) = http
        .route(&json!({"model": MODEL, "prompt": "1 2 3 4"}))
        .await;
    assert_eq!(s, 502, "{r}");
    assert!(
        r["error"].as_str().unwrap_or("").contains("tokenizer"),
        "{r}"
    );

    let tracker = running.tracker.clone();
    running.stop().await.expect("clean stop");
    passed(&file);
    assert_eq!(tracker.len(), 0, "no task left running");
    assert!(
        tokio::net::TcpStream::connect(http.base.trim_start_matches("http://"))
            .await
            .is_err(),
        "no longer listening"
    );
}

/// Starts the service and waits until its pods are listed.
async fn start_listed(cfg: Config, opts: Options) -> (serve::Running, Http) {
    let running = serve::start(cfg, opts).await.expect("service");
    let http = Http::new(running.addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get_json("/v1/models").await["models"]
        .as_array()
        .is_none_or(|m| m.is_empty())
    {
        assert!(Instant::now() < deadline, "pods never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (running, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approximate_routing_when_kv_sync_is_off() {
    let (tok_addr, _tok) = tokenizer().await;
    let a = Publisher::start(&[]);
    let b = Publisher::start(&[]);
    let file = temp_file(
        "approx",
        &format!("{}---\n{}", pod_yaml("a", &a), pod_yaml("b", &b)),
    );
    let mut opts = options(file.clone());
    opts.approx_block_size = 4;
    let (running, http) = start_listed(config(false, tok_addr), opts).await;
    let body = json!({"model": MODEL, "token_ids": (1..=12).collect::<Vec<u32>>()});
    let (s, r1) = http.route(&body).await;
    assert_eq!(s, 200, "{r1}");
    assert_eq!(r1["exact"], false);
    assert_eq!(
        r1["selected"]["matched_blocks"], 0,
        "nothing remembered yet"
    );
    let (_, r2) = http.route(&body).await;
    assert_eq!(
        r2["selected"]["pod"], r1["selected"]["pod"],
        "sticks to the pod it sent the prefix to"
    );
    assert_eq!(r2["selected"]["matched_blocks"], 3);
    let pods = http.get_json("/v1/pods").await;
    assert!(
        pods["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .all(|p| p["subscribed"] == false),
        "{pods}"
    );
    running.stop().await.expect("clean stop");
    passed(&file);
}

/// With KV sync on, a decision counts for its prefix until the pod's events arrive
/// (`routed_blocks`), so the same new prefix sticks to one pod; with `routed_ttl` 0 only
/// announced blocks count and equal pods rotate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_decisions_hold_a_new_prefix_on_one_pod_until_events_arrive() {
    let (tok_addr, _tok) = tokenizer().await;
    let a = Publisher::start(&[]);
    let b = Publisher::start(&[]);
    for (ttl, sticks) in [(Duration::from_secs(60), true), (Duration::ZERO, false)] {
        let file = temp_file(
            &format!("routed-{}", ttl.as_secs()),
            &format!("{}---\n{}", pod_yaml("a", &a), pod_yaml("b", &b)),
        );
        let mut opts = options(file.clone());
        opts.routed_ttl = ttl;
        let (running, http) = start_listed(config(true, tok_addr), opts).await;
        let body = json!({"model": MODEL, "token_ids": (1..=48).collect::<Vec<u32>>()});
        let (s, r1) = http.route(&body).await;
        assert_eq!(s, 200, "{r1}");
        assert_eq!(r1["exact"], true);
        assert_eq!(
            r1["selected"]["matched_blocks"], 0,
            "no event announced anything"
        );
        let (_, r2) = http.route(&body).await;
        assert_eq!(r2["selected"]["matched_blocks"], 0);
        if sticks {
            assert_eq!(r2["selected"]["pod"], r1["selected"]["pod"], "{r2}");
            // No block size learned yet: the default (16) counts 3 blocks of 48 tokens.
            assert_eq!(r2["selected"]["routed_blocks"], 3, "{r2}");
        } else {
            assert_ne!(r2["selected"]["pod"], r1["selected"]["pod"], "{r2}");
            assert_eq!(r2["selected"]["routed_blocks"], 0, "{r2}");
        }
        running.stop().await.expect("clean stop");
        passed(&file);
    }
}

/// One HTTP/1.1 response read off a raw connection: status, lower-cased headers, body (by
/// `content-length`).
async fn read_response(conn: &mut tokio::net::TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).expect("utf-8 head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .expect("content-length");
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    (status, headers, body)
}

/// A body over the limit is a 413. A client that writes its whole request before reading (the
/// usual way) gets that answer and keeps its connection: the server reads the rest and drops
/// it (up to `MAX_DRAIN`), rather than closing on unread data, which resets the connection and
/// loses the answer. A declared length past `MAX_DRAIN` is refused before the body is sent, and
/// the connection closed; a body that stalls is a 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_stalled_bodies_are_answered_not_reset() {
    use tokio::io::AsyncWriteExt;
    let (tok_addr, _tok) = tokenizer().await;
    let a = Publisher::start(&[]);
    let file = temp_file("bodies", &pod_yaml("a", &a));
    let mut opts = options(file.clone());
    opts.body_timeout = Duration::from_millis(300);
    let (running, _http) = start_listed(config(true, tok_addr), opts).await;
    let connect = || tokio::net::TcpStream::connect(running.addr);
    let error_of = |body: &[u8]| -> String {
        let v: Value = serde_json::from_slice(body).expect("JSON error");
        v["error"].as_str().expect("error").to_owned()
    };
    let closes = |h: &[(String, String)]| h.iter().any(|(k, v)| k == "connection" && v == "close");

    // Ten times the accepted size, well past any socket buffer, written in full before a read.
    let len = 10 * http::MAX_BODY;
    assert!(len < http::MAX_DRAIN);
    let mut conn = connect().await.expect("connect");
    let mut req = format!(
        "POST /v1/route HTTP/1.1\r\nhost: kvsync\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\n\r\n"
    )
    .into_bytes();
    req.resize(req.len() + len, b' ');
    conn.write_all(&req).await.expect("the whole body is taken");
    let (status, headers, body) = read_response(&mut conn).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert!(error_of(&body).contains("body over"), "{body:?}");
    assert!(!closes(&headers), "drained, so kept: {headers:?}");
    // The same connection serves the next request.
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: kvsync\r\n\r\n")
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut conn).await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));

    // Refused from the headers alone, before any body is sent, and closed: a length declared
    // past MAX_DRAIN, or past MAX_BODY from a client waiting for `100 Continue`.
    for (expect, len) in [
        ("", http::MAX_DRAIN + 1),
        ("expect: 100-continue\r\n", http::MAX_BODY + 1),
    ] {
        let mut conn = connect().await.expect("connect");
        conn.write_all(
            format!(
                "POST /v1/route HTTP/1.1\r\nhost: kvsync\r\n{expect}content-length: {len}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let (status, headers, body) = read_response(&mut conn).await;
        assert_eq!(status, 413, "{expect}{}", String::from_utf8_lossy(&body));
        assert!(closes(&headers), "{expect}{headers:?}");
        let mut rest = Vec::new();
        use tokio::io::AsyncReadExt;
        conn.read_to_end(&mut rest).await.expect("read to the end");
        assert!(
            rest.is_empty(),
            "{expect}nothing after the answer: {rest:?}"
        );
    }

    // Half a body, then nothing: 408 once the body timeout passes, and closed.
    let mut conn = connect().await.expect("connect");
    conn.write_all(
        b"POST /v1/route HTTP/1.1\r\nhost: kvsync\r\ncontent-length: 100\r\n\r\n{\"model\"",
    )
    .await
    .expect("write");
    let (status, headers, body) =
        tokio::time::timeout(Duration::from_secs(20), read_response(&mut conn))
            .await
            .expect("an answer, not a wait for the rest of the body");
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    assert!(error_of(&body).contains("not received within"), "{body:?}");
    assert!(closes(&headers), "{headers:?}");

    running.stop().await.expect("clean stop");
    passed(&file);
}

/// A subscription whose feed panics (an injected fault cuts an index apply in the middle) is
/// counted in /v1/pods and /metrics and subscribed again: the pod's blocks come back, and the
/// index is consistent throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscription_is_shown_and_retried() {
    let (tok, _tok_task) = tokenizer().await;
    let mut a = Publisher::start(&[]);
    let file = temp_file("failed", &pod_yaml("a", &a));
    let (running, http) = start_listed(config(true, tok), options(file.clone())).await;
    // One block, then empty batches (seqs kept here) until it is applied.
    let empty = encode(
        &EventBatch {
            ts: 0.0,
            events: vec![],
            data_parallel_rank: Some(0),
        },
        &WireFormat::VLLM_0_33,
    );
    a.send(0, &stored(0, &[1], None, vec![1, 2, 3, 4]));
    let mut seq = 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get_json("/v1/pods").await["pods"][0]["workers"][0]["blocks"] != 1 {
        assert!(Instant::now() < deadline, "the first block never applied");
        a.send(seq, &empty);
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.index.inject_panic(0);
    // The next block's store panics; the retry's replay applies it.
    a.send(seq, &stored(seq, &[2], Some(1), vec![5, 6, 7, 8]));
    loop {
        let pods = http.get_json("/v1/pods").await;
        let (pod, w) = (&pods["pods"][0], &pods["pods"][0]["workers"][0]);
        if w["failures"] == 1 && w["subscription"] == "subscribed" && w["blocks"] == 2 {
            assert_eq!(pod["subscribed"], true, "{pods}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never failed and resubscribed: {pods}"
        );
        if w["subscription"] == "failed" {
            assert_eq!(pod["subscribed"], false, "{pods}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.index.check_invariants();
    assert_eq!(running.index.stats().panics_repaired, 1);
    let (_, body) = http.call("GET", "/metrics", Vec::new()).await;
    let text = String::from_utf8(body).expect("utf-8");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        value("kvsync_subscription_failures_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value("kvsync_workers_failed"), Some(0.0), "{text}");
    running.stop().await.expect("clean stop");
    passed(&file);
}

/// A test tokenizer on `ip:port` (port 0: any) that counts the connections it accepts and
/// the requests it answers.
async fn counting_tokenizer(
    ip: &str,
    port: u16,
) -> (
    SocketAddr,
    std::sync::Arc<[std::sync::atomic::AtomicUsize; 2]>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let counts: std::sync::Arc<[AtomicUsize; 2]> = std::sync::Arc::default();
    let listener = tokio::net::TcpListener::bind((ip, port))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (c1, c2) = (counts.clone(), counts.clone());
    let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
        c1[0].fetch_add(1, Relaxed);
    });
    let app = Router::new().route(
        "/tokenize",
        post(move |Json(req): Json<Value>| {
            let c = c2.clone();
            async move {
                c[1].fetch_add(1, Relaxed);
                let tokens: Vec<u32> = req["prompt"]
                    .as_str()
                    .unwrap_or("")
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                Json(json!({"count": tokens.len(), "max_model_len": 8192, "tokens": tokens}))
            }
        }),
    );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, counts, task)
}

fn pod_at(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: ml\n  uid: {name}\n  labels:\n    model.aibrix.ai/kv-events-enabled: \"true\"\n    model.aibrix.ai/name: {MODEL}\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions:\n  - type: Ready\n    status: \"True\"\n"
    )
}

/// Without a tokenizer endpoint, text is tokenized by the model's own pods: spread over them
/// (each live one gets a share), over pooled connections (far fewer connections than
/// requests), and a pod whose tokenizer refuses connections is skipped for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_tokenizers_are_spread_pooled_and_failed_over() {
    use std::sync::atomic::Ordering::Relaxed;
    // Three pods on three loopback addresses, one port: a (first by name) has no tokenizer.
    let (b_addr, b, _b) = counting_tokenizer("127.0.0.2", 0).await;
    let port = b_addr.port();
    let (_, c, _c) = counting_tokenizer("127.0.0.3", port).await;
    let file = temp_file(
        "pod-tokenizers",
        &format!(
            "{}---\n{}---\n{}",
            pod_at("a", "127.0.0.4"),
            pod_at("b", "127.0.0.2"),
            pod_at("c", "127.0.0.3")
        ),
    );
    let mut cfg = config(false, b_addr);
    cfg.tokenizer = None;
    let mut opts = options(file.clone());
    opts.pod_tokenizer_port = Some(port);
    let (running, http) = start_listed(cfg, opts).await;
    let n = 30;
    for i in 0..n {
        let (s, r) = http
            .route(&json!({"model": MODEL, "prompt": format!("{i} 1 2 3")}))
            .await;
        assert_eq!(s, 200, "route {i}: {r}");
    }
    let conns_reqs =
        |x: &[std::sync::atomic::AtomicUsize; 2]| (x[0].load(Relaxed), x[1].load(Relaxed));
    let (b_conns, b_reqs) = conns_reqs(&b);
    let (c_conns, c_reqs) = conns_reqs(&c);
    assert_eq!(
        b_reqs + c_reqs,
        n,
        "every text tokenized once by a live pod"
    );
    assert!(
        b_reqs >= n / 4 && c_reqs >= n / 4,
        "spread: b {b_reqs}, c {c_reqs}"
    );
    assert!(
        b_conns + c_conns <= 4,
        "pooled: {b_conns} + {c_conns} connections for {n} requests"
    );
    running.stop().await.expect("clean stop");
    passed(&file);
}

/// Without `--pod-tokenizer-port`, a pod's `/tokenize` is asked on its own HTTP port (the
/// `model.aibrix.ai/port` annotation, where the proxy sends its requests too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_tokenizer_is_asked_on_its_annotated_http_port() {
    use std::sync::atomic::Ordering::Relaxed;
    let (addr, counts, _t) = counting_tokenizer("127.0.0.5", 0).await;
    let pod = pod_at("p", "127.0.0.5").replace(
        "status:\n",
        &format!(
            "  annotations:\n    model.aibrix.ai/port: \"{}\"\nstatus:\n",
            addr.port()
        ),
    );
    let file = temp_file("pod-http-port", &pod);
    let mut cfg = config(false, addr);
    cfg.tokenizer = None;
    let opts = options(file.clone());
    assert_eq!(opts.pod_tokenizer_port, None);
    let (running, http) = start_listed(cfg, opts).await;
    let (s, r) = http
        .route(&json!({"model": MODEL, "prompt": "1 2 3 4"}))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(counts[1].load(Relaxed), 1, "asked on the annotated port");
    running.stop().await.expect("clean stop");
    passed(&file);
}

/// A tokenizer answer over `tokenizer_max_response_bytes` is refused (502 naming the cap) and
/// counted, not read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_tokenizer_answer_is_refused_and_counted() {
    let (addr, _, _t) = counting_tokenizer("127.0.0.1", 0).await;
    let file = temp_file("tok-cap", &pod_at("a", "127.0.0.1"));
    let mut opts = options(file.clone());
    opts.tokenizer_max_response_bytes = 16 << 10;
    let (running, http) = start_listed(config(false, addr), opts).await;
    // ~2 bytes per token in the answer: 4 000 tokens fit, 20 000 do not.
    let (s, r) = http
        .route(&json!({"model": MODEL, "prompt": "1 ".repeat(4_000)}))
        .await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = http
        .route(&json!({"model": MODEL, "prompt": "1 ".repeat(20_000)}))
        .await;
    assert_eq!(s, 502, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("larger than 16384 bytes"),
        "{r}"
    );
    let (_, text) = http.call("GET", "/metrics", Vec::new()).await;
    let text = String::from_utf8(text).expect("utf-8");
    assert!(
        text.lines()
            .any(|l| l == "kvsync_tokenizer_oversized_total 1"),
        "{text}"
    );
    running.stop().await.expect("clean stop");
    passed(&file);
}

/// `--events-max-message-mib` reaches the subscribers: a batch over the cap (here 64 KiB) is
/// refused by libzmq and counted, the sockets are reopened, and the next batches (the refused
/// one lost, so the worker reset) apply again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_events_message_cap_is_refused_counted_and_survived() {
    let (tok, _tok_task) = tokenizer().await;
    let mut a = Publisher::start(&[]);
    let file = temp_file("maxmsg", &pod_yaml("a", &a));
    let opts = Options {
        events_max_message_bytes: 64 << 10,
        ..options(file.clone())
    };
    let (running, http) = start_listed(config(true, tok), opts).await;
    feed(
        &http,
        &mut a,
        "ml/a",
        &[stored(0, &[1], None, vec![1, 2, 3, 4])],
        1,
    )
    .await;
    // 20 000 token ids of 3 bytes each: ~60 KB under the default cap of 64 MiB, over 64 KiB.
    let big_tokens: Vec<u32> = (0..20_000).map(|i| 70_000 + i).collect();
    let hashes: Vec<u64> = (0..5_000).map(|i| 1_000 + i).collect();
    let big = stored(0, &hashes, None, big_tokens);
    assert!(big.len() > 64 << 10, "{} bytes", big.len());
    let refused = || async {
        let (_, body) = http.call("GET", "/metrics", Vec::new()).await;
        let text = String::from_utf8(body).expect("utf-8");
        text.lines()
            .find_map(|l| l.strip_prefix("kvsync_connections_refused_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(refused().await, 0.0);
    // Sent again until refused: the first may reach the PUB before the SUB reconnects.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seq = 1_000;
    while refused().await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the oversized batch was never refused"
        );
        a.send(seq, &big);
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The worker still applies what comes after (the publisher's seqs go on from here).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        a.send(seq, &stored(seq, &[7], None, vec![9, 9, 9, 9]));
        seq += 1;
        let pods = http.get_json("/v1/pods").await;
        let blocks = pods["pods"][0]["workers"][0]["blocks"]
            .as_u64()
            .unwrap_or(0);
        let (status, answer) = http
            .route(&json!({"model": MODEL, "token_ids": [9, 9, 9, 9]}))
            .await;
        if status == 200 && answer["pods"][0]["matched_blocks"] == 1 && blocks >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing applied after the refusal: {pods} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.index.check_invariants();
    running.stop().await.expect("clean stop");
    passed(&file);
}
