//! kvsync in the request path: `kvsync serve` (in process, port 0) in front of simulated vLLM
//! engines serving vLLM's HTTP API on loopback (engine-sim's `http` over a `Backend`), with the
//! official `openai` client and hyper as the clients.
//!
//! Each engine's HTTP server runs on a runtime of its own, so that killing it (shutting that
//! runtime down) closes every connection at once, as a crashed engine would. The backends are
//! `Arc<dyn Backend>`: the simulator's clocked engine replaces them one for one.

use bytes::Bytes;
use engine_sim::http::{
    Backend, EngineMetrics, FinishReason, GenerateRequest, HttpConfig, InstantBackend,
    InstantConfig, SubmitError, TokenEvent,
};
use engine_sim::{Engine, EngineConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kvsync::config::{Config, RemoteTokenizer, TokenizerEngine};
use kvsync::proxy::ProxyConfig;
use kvsync::route::cost::Policy;
use kvsync::serve::{self, Options};
use kvsync_demo::{TokenizerServer, VOCAB};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODEL: &str = "sim-llm";
const BLOCK_SIZE: usize = 16;

// ---------------------------------------------------------------------------------------------
// Engines

/// A [`Backend`] over engine-sim's [`Engine`]: its block pool publishes vLLM's KV events on real
/// ZeroMQ sockets, so kvsync's index learns what each engine caches. Each request is served at
/// once (prefill, then its tokens).
struct EventedBackend {
    engine: Engine,
    started: Instant,
}

impl Backend for EventedBackend {
    fn submit(
        &self,
        req: GenerateRequest,
    ) -> Result<tokio::sync::mpsc::Receiver<TokenEvent>, SubmitError> {
        let admitted = self
            .engine
            .begin(&req.prompt, req.lora.clone())
            .map_err(|_| SubmitError::Overloaded)?;
        let (prompt_tokens, cached_tokens) = (admitted.prompt_tokens(), admitted.hit_tokens());
        let served = self.engine.finish(admitted, req.max_tokens);
        let (tx, rx) = tokio::sync::mpsc::channel(served.output.len() + 2);
        let t = self.now();
        let _ = tx.try_send(TokenEvent::Scheduled { t, cached_tokens });
        for &id in &served.output {
            let _ = tx.try_send(TokenEvent::Token { t, id });
        }
        let _ = tx.try_send(TokenEvent::Finished {
            t,
            reason: FinishReason::Length,
            prompt_tokens,
            cached_tokens,
            completion_tokens: served.output.len(),
        });
        Ok(rx)
    }

    fn stats(&self) -> EngineMetrics {
        EngineMetrics::default()
    }

    fn reset_prefix_cache(&self) -> bool {
        self.engine.reset_prefix_cache()
    }

    fn max_model_len(&self) -> usize {
        32_768
    }

    fn block_size(&self) -> usize {
        BLOCK_SIZE
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// An engine's HTTP API on loopback, on its own runtime.
struct HttpEngine {
    name: String,
    port: u16,
    /// The KV event ports (of an evented engine).
    kv_ports: Option<(u16, Option<u16>)>,
    /// Its pod's data-parallel size.
    dp_size: u32,
    rt: Option<tokio::runtime::Runtime>,
}

impl HttpEngine {
    fn start(name: &str, backend: Arc<dyn Backend>) -> HttpEngine {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = engine_sim::http::serve(
                listener,
                backend,
                HttpConfig::new(MODEL),
                std::future::pending(),
            )
            .await;
        });
        HttpEngine {
            name: name.to_owned(),
            port,
            kv_ports: None,
            dp_size: 1,
            rt: Some(rt),
        }
    }

    fn evented(name: &str, seed: u64) -> HttpEngine {
        let engine = Engine::start(EngineConfig {
            num_blocks: 2048,
            block_size: BLOCK_SIZE,
            vocab: VOCAB,
            seed,
            ..EngineConfig::default()
        })
        .expect("engine");
        let kv = (engine.pub_port(), engine.replay_port());
        let mut e = HttpEngine::start(
            name,
            Arc::new(EventedBackend {
                engine,
                started: Instant::now(),
            }),
        );
        e.kv_ports = Some(kv);
        e
    }

    /// The engine dies: its server and every connection go at once.
    fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    fn pod(&self) -> String {
        format!("sim/{}", self.name)
    }

    fn yaml(&self) -> String {
        // Without events: a fixed port nothing publishes on (no replay), so the pod stays the
        // same incarnation when the file is rewritten.
        let (pub_port, replay) = self.kv_ports.unwrap_or((1, None));
        let replay = replay.map_or("none".to_owned(), |p| p.to_string());
        format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: {}\n    namespace: sim\n    uid: {}-uid\n    labels:\n      model.aibrix.ai/kv-events-enabled: \"true\"\n      model.aibrix.ai/name: {MODEL}\n    annotations:\n      model.aibrix.ai/port: \"{}\"\n      model.aibrix.ai/kv-events-port: \"{pub_port}\"\n      model.aibrix.ai/kv-events-replay-port: \"{replay}\"\n      model.aibrix.ai/data-parallel-size: \"{}\"\n  status:\n    phase: Running\n    podIP: 127.0.0.1\n    conditions:\n    - type: Ready\n      status: \"True\"\n",
            self.name, self.name, self.port, self.dp_size
        )
    }
}

impl Drop for HttpEngine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An engine answering every completion with `answer` (an axum handler's output).
fn scripted_engine<H, T>(name: &str, answer: H) -> HttpEngine
where
    H: axum::handler::Handler<T, ()> + Clone + Send + Sync + 'static,
    T: 'static,
{
    use axum::routing::post;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.spawn(async move {
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(answer.clone()))
            .route("/v1/completions", post(answer));
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let _ = axum::serve(listener, app).await;
    });
    HttpEngine {
        name: name.to_owned(),
        port,
        kv_ports: None,
        dp_size: 1,
        rt: Some(rt),
    }
}

// ---------------------------------------------------------------------------------------------
// kvsync

struct Kvsync {
    running: serve::Running,
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
    dir: PathBuf,
}

impl Kvsync {
    async fn start(
        name: &str,
        engines: &[&HttpEngine],
        kv_sync: bool,
        tok: SocketAddr,
        proxy: ProxyConfig,
    ) -> Kvsync {
        let dir = std::env::temp_dir().join(format!("kvsync-proxy-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pods = dir.join("pods.yaml");
        let items: String = engines.iter().map(|e| e.yaml()).collect();
        std::fs::write(
            &pods,
            format!("apiVersion: v1\nkind: List\nitems:\n{items}"),
        )
        .expect("pod file");
        let cfg = Config {
            kv_sync,
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
            tokenizer_timeout: Duration::from_secs(5),
            proxy,
            ..Options::default()
        };
        let running = serve::start(cfg, opts).await.expect("kvsync starts");
        let k = Kvsync {
            base: format!("http://{}", running.addr),
            running,
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            dir,
        };
        // Ready, with every pod listed.
        k.await_until("every pod listed", |k| async move {
            let m = k.get("/v1/models").await;
            m["data"][0]["pods"].as_u64() == Some(engines.len() as u64)
        })
        .await;
        k
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Value,
    ) -> hyper::Response<hyper::body::Incoming> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(if body.is_null() {
                Vec::new()
            } else {
                body.to_string().into_bytes()
            })))
            .expect("request");
        self.http.request(req).await.expect("kvsync answers")
    }

    async fn json(&self, method: &str, path: &str, body: Value) -> (u16, Option<String>, Value) {
        let resp = self.call(method, path, body).await;
        let status = resp.status().as_u16();
        let pod = resp
            .headers()
            .get("x-kvsync-pod")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, pod, v)
    }

    async fn get(&self, path: &str) -> Value {
        self.json("GET", path, Value::Null).await.2
    }

    async fn metrics(&self) -> String {
        let resp = self.call("GET", "/metrics", Value::Null).await;
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.metrics().await;
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("metrics parse");
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// Waits for `cond` (20 s at most, then fails naming `what`).
    async fn await_until<'a, F, Fut>(&'a self, what: &str, cond: F)
    where
        F: Fn(&'a Kvsync) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond(self).await {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every pod's in-flight counts back to 0.
    async fn await_idle(&self) {
        self.await_until("in-flight counts back to 0", |k| async move {
            k.metric("kvsync_proxy_in_flight", &[]).await == 0.0
                && k.metric("kvsync_proxy_prefill_tokens", &[]).await == 0.0
        })
        .await;
    }

    async fn stop(self) {
        let dir = self.dir.clone();
        self.running.stop().await.expect("clean stop");
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn proxy_config(policy: Policy) -> ProxyConfig {
    ProxyConfig {
        policy,
        scrape_interval: Duration::from_millis(100),
        cooldown: Duration::from_secs(600),
        ..ProxyConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Python

/// The interpreter with `openai`: `KVSYNC_PYTHON`, else the repo's `.venv` (`scripts/setup`).
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KVSYNC_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/setup",
        venv.display()
    );
    venv
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// Runs `tests/py/SCRIPT ARGS` to completion; fails the test with its output if it fails.
async fn run_python(name: &str, args: Vec<String>) -> String {
    let out = tokio::process::Command::new(python())
        .arg(script(name))
        .args(args)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{stdout}");
    stdout
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_goes_through_kvsync_and_next_turns_land_on_their_prefix() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    let engines: Vec<HttpEngine> = (0..4)
        .map(|i| HttpEngine::evented(&format!("e{i}"), i as u64))
        .collect();
    let refs: Vec<&HttpEngine> = engines.iter().collect();
    let k = Kvsync::start(
        "openai",
        &refs,
        true,
        tok.addr,
        proxy_config(Policy::KvAware),
    )
    .await;

    let out = run_python(
        "proxy_client.py",
        vec![
            format!("{}/v1", k.base),
            MODEL.to_owned(),
            BLOCK_SIZE.to_string(),
            "6".to_owned(),
        ],
    )
    .await;
    let sent: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("requests "))
        .and_then(|n| n.parse().ok())
        .expect("the script's request count");

    // Every request that reached an engine is counted, by outcome; nothing is left in flight.
    k.await_until("every relayed request counted", |k| async move {
        k.metric("kvsync_proxy_requests_total", &[]).await == sent
    })
    .await;
    let policy = [("policy", "kv-aware")];
    assert_eq!(k.metric("kvsync_proxy_requests_total", &policy).await, sent);
    assert_eq!(
        k.metric(
            "kvsync_proxy_requests_total",
            &[("outcome", "error_status")]
        )
        .await,
        1.0,
        "the engine's 400"
    );
    assert_eq!(
        k.metric("kvsync_proxy_rejected_total", &[("reason", "no_pod")])
            .await,
        1.0
    );
    assert_eq!(k.metric("kvsync_proxy_retries_total", &[]).await, 0.0);
    k.await_idle().await;
    let text = k.metrics().await;
    for h in ["ttft", "duration", "overhead"] {
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("kvsync_proxy_{h}_seconds_count ")))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(count.is_some_and(|c| c >= sent), "{h}: {count:?}");
    }
    // The scraper reads each engine's /metrics.
    k.await_until("every pod scraped", |k| async move {
        k.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("kvsync_proxy_scrape_age_seconds{"))
            .count()
            == 4
    })
    .await;

    // /v1/route: the same decision as a dry run, with each pod's score parts.
    let (status, _, answer) = k
        .json(
            "POST",
            "/v1/route",
            json!({"model": MODEL, "prompt": "one two three"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["policy"], "kv-aware");
    let pods = answer["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 4);
    for p in pods {
        let s = &p["score"];
        assert!(s["est_ttft_s"].as_f64().is_some(), "{p}");
        assert_eq!(s["in_flight"], 0, "{p}");
        assert!(
            p["matched_blocks"].is_u64() && p["address"] == "127.0.0.1",
            "{p}"
        );
    }
    k.stop().await;
    tok.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_dying_mid_stream_or_a_client_leaving_lose_nothing_and_leak_nothing() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    let stall = InstantBackend::new(InstantConfig {
        stall_after: Some(2),
        vocab: VOCAB,
        ..InstantConfig::default()
    });
    let mut a = HttpEngine::start("a-stall", Arc::new(stall.clone()));
    let mut b = HttpEngine::start(
        "b-ok",
        Arc::new(InstantBackend::new(InstantConfig {
            vocab: VOCAB,
            ..InstantConfig::default()
        })),
    );
    // Round robin over [a, b] by name: even requests try a first.
    let k = Kvsync::start(
        "fail",
        &[&a, &b],
        false,
        tok.addr,
        proxy_config(Policy::RoundRobin),
    )
    .await;
    let chat = |stream: bool| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 8, "stream": stream})
    };

    // 1. A client that goes away mid-stream: the engine's request is aborted at once.
    let resp = k.call("POST", "/v1/chat/completions", chat(true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-kvsync-pod"], a.pod().as_str());
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    let held = stall
        .next_stalled()
        .await
        .expect("the engine holds the request");
    drop(body);
    tokio::time::timeout(Duration::from_secs(20), held.closed())
        .await
        .expect("the engine's request was dropped when the client went away");
    k.await_idle().await;
    assert_eq!(
        k.metric("kvsync_proxy_requests_total", &[("outcome", "client_gone")])
            .await,
        1.0
    );

    // 2. b answers.
    let (status, pod, _) = k.json("POST", "/v1/chat/completions", chat(false)).await;
    assert_eq!((status, pod.as_deref()), (200, Some(b.pod().as_str())));

    // 3. The engine dies mid-stream: the openai client's stream ends with the error event.
    let mut child = tokio::process::Command::new(python())
        .arg(script("proxy_midstream.py"))
        .args([format!("{}/v1", k.base), MODEL.to_owned(), a.pod()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let ready = lines.next_line().await.expect("read");
    assert_eq!(ready.as_deref(), Some("READY"), "the script never streamed");
    a.kill();
    let rest = lines.next_line().await.expect("read").unwrap_or_default();
    let status = child.wait().await.expect("python exits");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut err).await;
    }
    assert!(status.success(), "proxy_midstream.py: {rest}\n{err}");
    assert!(rest.starts_with("error event: "), "{rest}");
    k.await_idle().await;
    assert_eq!(
        k.metric(
            "kvsync_proxy_requests_total",
            &[("pod", &a.pod()), ("outcome", "upstream_error")]
        )
        .await,
        1.0
    );
    assert_eq!(
        k.metric(
            "kvsync_proxy_upstream_errors_total",
            &[("reason", "mid_stream")]
        )
        .await,
        1.0
    );

    // 4. New requests go to b: a refuses connections, each such request is retried once on b,
    // and after 3 failures in a row a cools down (no retry needed any more).
    for _ in 0..8 {
        let (status, pod, v) = k.json("POST", "/v1/chat/completions", chat(false)).await;
        assert_eq!(
            (status, pod.as_deref()),
            (200, Some(b.pod().as_str())),
            "{v}"
        );
    }
    assert_eq!(k.metric("kvsync_proxy_retries_total", &[]).await, 3.0);
    assert_eq!(
        k.metric(
            "kvsync_proxy_upstream_errors_total",
            &[("reason", "connect")]
        )
        .await,
        3.0
    );
    let (_, _, route) = k
        .json(
            "POST",
            "/v1/route",
            json!({"model": MODEL, "token_ids": [1, 2, 3]}),
        )
        .await;
    let cooling: Vec<(String, bool)> = route["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| {
            (
                p["pod"].as_str().unwrap_or("").to_owned(),
                p["score"]["cooling"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(cooling, [(b.pod(), false), (a.pod(), true)]);
    k.await_idle().await;

    // 5. Every pod failing: 503 in OpenAI's shape, nothing left in flight.
    b.kill();
    let (status, pod, v) = k
        .json(
            "POST",
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x", "max_tokens": 1}),
        )
        .await;
    assert_eq!((status, pod), (503, None), "{v}");
    assert_eq!(v["error"]["type"], "ServiceUnavailableError", "{v}");
    assert_eq!(v["error"]["code"], 503);
    k.await_idle().await;
    k.stop().await;
    tok.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_before_the_first_byte_is_retried_and_a_silent_stream_times_out() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    let a = scripted_engine("a-500", || async {
        (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": {"message": "engine core died",
                "type": "InternalServerError", "param": null, "code": 500}})),
        )
    });
    let b = HttpEngine::start(
        "b-ok",
        Arc::new(InstantBackend::new(InstantConfig {
            vocab: VOCAB,
            ..InstantConfig::default()
        })),
    );
    let c = HttpEngine::start(
        "c-stall",
        Arc::new(InstantBackend::new(InstantConfig {
            vocab: VOCAB,
            stall_after: Some(1),
            ..InstantConfig::default()
        })),
    );
    let mut cfg = proxy_config(Policy::RoundRobin);
    cfg.idle_timeout = Duration::from_millis(300);
    let k = Kvsync::start("retry", &[&a, &b, &c], false, tok.addr, cfg).await;
    let body = |stream: bool| json!({"model": MODEL, "prompt": "a b c", "max_tokens": 5, "stream": stream});

    // Turn 0: a answers 500, the request goes once more to the next pod, b.
    let (status, pod, v) = k.json("POST", "/v1/completions", body(false)).await;
    assert_eq!(
        (status, pod.as_deref()),
        (200, Some(b.pod().as_str())),
        "{v}"
    );
    assert_eq!(k.metric("kvsync_proxy_retries_total", &[]).await, 1.0);
    assert_eq!(
        k.metric(
            "kvsync_proxy_upstream_errors_total",
            &[("reason", "status_5xx")]
        )
        .await,
        1.0
    );
    // Turn 1: b. Turn 2: c sends one token and falls silent: the stream ends with an error
    // event after the idle timeout.
    let (status, pod, _) = k.json("POST", "/v1/completions", body(false)).await;
    assert_eq!((status, pod.as_deref()), (200, Some(b.pod().as_str())));
    let resp = k.call("POST", "/v1/completions", body(true)).await;
    assert_eq!(resp.headers()["x-kvsync-pod"], c.pod().as_str());
    let text = resp
        .into_body()
        .collect()
        .await
        .expect("the stream ends")
        .to_bytes();
    let text = String::from_utf8_lossy(&text);
    let last = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .last()
        .expect("events");
    let err: Value = serde_json::from_str(last.trim_start_matches("data: ")).expect("json event");
    assert_eq!(err["error"]["code"], 504, "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert_eq!(
        k.metric(
            "kvsync_proxy_upstream_errors_total",
            &[("reason", "idle_timeout")]
        )
        .await,
        1.0
    );
    // Turn 3: a again, its 500 retried on b.
    let (status, _, _) = k.json("POST", "/v1/completions", body(false)).await;
    assert_eq!(status, 200);
    k.await_idle().await;

    // c leaves the pod file: its per-pod series leave /metrics with it.
    let c_label = format!("pod=\"{}\"", c.pod());
    assert!(k.metrics().await.contains(&c_label));
    let items: String = [&a, &b].iter().map(|e| e.yaml()).collect();
    std::fs::write(
        k.dir.join("pods.yaml"),
        format!("apiVersion: v1\nkind: List\nitems:\n{items}"),
    )
    .expect("pod file");
    k.await_until("c's series gone", |k| {
        let c_label = c_label.clone();
        async move { !k.metrics().await.contains(&c_label) }
    })
    .await;
    k.stop().await;
    tok.stop().await;
}

/// An evented engine with a clock: one prefill at a time, each taking `per_token` per uncached
/// prompt token (decode is free), so requests queue on a busy engine as they do on vLLM.
struct QueuedBackend {
    engine: Arc<Engine>,
    prefill: Arc<tokio::sync::Mutex<()>>,
    per_token: Duration,
    started: Instant,
}

impl Backend for QueuedBackend {
    fn submit(
        &self,
        req: GenerateRequest,
    ) -> Result<tokio::sync::mpsc::Receiver<TokenEvent>, SubmitError> {
        let admitted = self
            .engine
            .begin(&req.prompt, req.lora.clone())
            .map_err(|_| SubmitError::Overloaded)?;
        let (prompt_tokens, cached_tokens) = (admitted.prompt_tokens(), admitted.hit_tokens());
        let (tx, rx) = tokio::sync::mpsc::channel(req.max_tokens + 2);
        let (engine, prefill, started) = (self.engine.clone(), self.prefill.clone(), self.started);
        let busy = self.per_token * (prompt_tokens - cached_tokens) as u32;
        tokio::spawn(async move {
            {
                let _one_at_a_time = prefill.lock().await;
                tokio::time::sleep(busy).await;
            }
            let served = engine.finish(admitted, req.max_tokens);
            let t = started.elapsed().as_secs_f64();
            let _ = tx.send(TokenEvent::Scheduled { t, cached_tokens }).await;
            for &id in &served.output {
                let _ = tx.send(TokenEvent::Token { t, id }).await;
            }
            let _ = tx
                .send(TokenEvent::Finished {
                    t,
                    reason: FinishReason::Length,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens: served.output.len(),
                })
                .await;
        });
        Ok(rx)
    }

    fn stats(&self) -> EngineMetrics {
        EngineMetrics::default()
    }

    fn reset_prefix_cache(&self) -> bool {
        self.engine.reset_prefix_cache()
    }

    fn max_model_len(&self) -> usize {
        32_768
    }

    fn block_size(&self) -> usize {
        BLOCK_SIZE
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// 64 concurrent requests sharing one 1024-token system prompt, over 4 queueing engines:
/// per engine the requests it served, and the fraction of prompt tokens found cached.
async fn burst(policy: Policy, tok: SocketAddr) -> (Vec<usize>, f64) {
    let engines: Vec<HttpEngine> = (0..4)
        .map(|i| {
            let engine = Engine::start(EngineConfig {
                num_blocks: 4096,
                block_size: BLOCK_SIZE,
                vocab: VOCAB,
                seed: i,
                ..EngineConfig::default()
            })
            .expect("engine");
            let kv = (engine.pub_port(), engine.replay_port());
            let mut e = HttpEngine::start(
                &format!("q{i}"),
                Arc::new(QueuedBackend {
                    engine: Arc::new(engine),
                    prefill: Arc::default(),
                    per_token: Duration::from_micros(100),
                    started: Instant::now(),
                }),
            );
            e.kv_ports = Some(kv);
            e
        })
        .collect();
    let refs: Vec<&HttpEngine> = engines.iter().collect();
    let k = Kvsync::start(policy.name(), &refs, true, tok, proxy_config(policy)).await;
    let system: Vec<u32> = (0..1024).map(|i| 2000 + i).collect();
    let calls = (0..64u32).map(|r| {
        let mut prompt = system.clone();
        prompt.extend((0..32).map(|i| 10_000 + r * 32 + i));
        let k = &k;
        async move {
            let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2});
            let (status, pod, v) = k.json("POST", "/v1/completions", body).await;
            assert_eq!(status, 200, "{v}");
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .expect("cached_tokens");
            (pod.expect("x-kvsync-pod"), cached)
        }
    });
    let answers = futures::future::join_all(calls).await;
    let mut served = vec![0; engines.len()];
    for (pod, _) in &answers {
        let i = engines
            .iter()
            .position(|e| e.pod() == *pod)
            .expect("a known pod");
        served[i] += 1;
    }
    let cached: u64 = answers.iter().map(|(_, c)| c).sum();
    k.await_idle().await;
    k.stop().await;
    (served, cached as f64 / (64.0 * 1056.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_sharing_a_system_prompt_spreads_over_pods_and_keeps_its_hits() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    let (kv_served, kv_hit) = burst(Policy::KvAware, tok.addr).await;
    let (prefix_served, prefix_hit) = burst(Policy::Prefix, tok.addr).await;
    println!(
        "kv-aware: served {kv_served:?}, hit {kv_hit:.3}; prefix: served {prefix_served:?}, hit {prefix_hit:.3}"
    );
    assert!(
        kv_served.iter().all(|&n| n <= 2 * 64 / 4),
        "kv-aware: no engine over twice its fair share: {kv_served:?}"
    );
    assert!(
        kv_hit >= 0.9 * prefix_hit,
        "kv-aware hit {kv_hit:.3} within 10 % of prefix's {prefix_hit:.3}"
    );
    assert!(
        prefix_served.iter().any(|&n| n > 2 * 64 / 4),
        "prefix alone piles the burst on its pod: {prefix_served:?}"
    );
    tok.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_parallel_pod_is_sent_the_chosen_rank() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    // The engine answers with the rank header it was sent.
    let mut e = scripted_engine("dp", |headers: axum::http::HeaderMap| async move {
        let rank = headers
            .get("x-data-parallel-rank")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        axum::Json(json!({ "rank": rank }))
    });
    e.dp_size = 2;
    let k = Kvsync::start(
        "dp",
        &[&e],
        false,
        tok.addr,
        proxy_config(Policy::RoundRobin),
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let resp = k
            .call(
                "POST",
                "/v1/completions",
                json!({"model": MODEL, "prompt": [1, 2], "max_tokens": 1}),
            )
            .await;
        let header = resp.headers()["x-kvsync-dp-rank"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["rank"].as_str(), Some(header.as_str()), "{v}");
        seen.push(header);
    }
    seen.sort();
    assert_eq!(seen, ["0", "1"]);
    k.await_idle().await;
    k.stop().await;
    tok.stop().await;
}
