//! The fixtures of `tests/proxy.rs`: simulated vLLM engines serving vLLM's HTTP API on
//! loopback (engine-sim's `http` over a `Backend`), each on a runtime of its own so that
//! killing it closes every connection at once, as a crashed engine would; `kvsync serve` in
//! process on port 0 with a static pod file; the Python clients.
//!
//! The backends are `Arc<dyn Backend>`: the simulator's clocked engine replaces them one for
//! one.

#![allow(dead_code)]

use bytes::Bytes;
use engine_sim::http::{
    Backend, EngineMetrics, FinishReason, GenerateRequest, HttpConfig, SubmitError, TokenEvent,
};
use engine_sim::{Engine, EngineConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kvsync::config::{Config, RemoteTokenizer, TokenizerEngine};
use kvsync::proxy::ProxyConfig;
use kvsync::route::cost::Policy;
use kvsync::serve::{self, Options};
use kvsync_demo::VOCAB;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MODEL: &str = "sim-llm";
pub const BLOCK_SIZE: usize = 16;

// ---------------------------------------------------------------------------------------------
// Engines

/// A [`Backend`] over engine-sim's [`Engine`]: its block pool publishes vLLM's KV events on real
/// ZeroMQ sockets, so kvsync's index learns what each engine caches. Without a prefill clock a
/// request is served at once (prefill, then its tokens); with one, one prefill at a time takes
/// `per_token` per uncached prompt token (decode is free), so requests queue on a busy engine
/// as they do on vLLM.
pub struct EventedBackend {
    pub engine: Arc<Engine>,
    pub started: Instant,
    pub prefill: Option<PrefillClock>,
}

/// One prefill at a time, at `per_token` per uncached prompt token.
pub struct PrefillClock {
    pub one_at_a_time: Arc<tokio::sync::Mutex<()>>,
    pub per_token: Duration,
}

impl EventedBackend {
    pub fn new(engine: Engine, prefill_per_token: Option<Duration>) -> EventedBackend {
        EventedBackend {
            engine: Arc::new(engine),
            started: Instant::now(),
            prefill: prefill_per_token.map(|per_token| PrefillClock {
                one_at_a_time: Arc::default(),
                per_token,
            }),
        }
    }
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
        let (tx, rx) = tokio::sync::mpsc::channel(req.max_tokens + 2);
        let (engine, started) = (self.engine.clone(), self.started);
        let prefill = self.prefill.as_ref().map(|c| {
            let busy = c.per_token * (prompt_tokens - cached_tokens) as u32;
            (c.one_at_a_time.clone(), busy)
        });
        tokio::spawn(async move {
            if let Some((one_at_a_time, busy)) = prefill {
                let _held = one_at_a_time.lock().await;
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

/// An engine's HTTP API on loopback, on its own runtime.
pub struct HttpEngine {
    pub name: String,
    pub port: u16,
    /// The KV event ports (of an evented engine).
    pub kv_ports: Option<(u16, Option<u16>)>,
    /// Its pod's data-parallel size.
    pub dp_size: u32,
    pub rt: Option<tokio::runtime::Runtime>,
}

impl HttpEngine {
    /// An engine called `name` whose HTTP server is `serve` on a loopback listener, on a
    /// runtime of its own (dropping it closes every connection at once).
    fn serving<F>(
        name: &str,
        serve: impl FnOnce(tokio::net::TcpListener) -> F + Send + 'static,
    ) -> HttpEngine
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
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
            serve(listener).await;
        });
        HttpEngine {
            name: name.to_owned(),
            port,
            kv_ports: None,
            dp_size: 1,
            rt: Some(rt),
        }
    }

    pub fn start(name: &str, backend: Arc<dyn Backend>) -> HttpEngine {
        HttpEngine::serving(name, move |listener| async move {
            let _ = engine_sim::http::serve(
                listener,
                backend,
                HttpConfig::new(MODEL),
                std::future::pending(),
            )
            .await;
        })
    }

    pub fn evented(name: &str, seed: u64) -> HttpEngine {
        let engine = Engine::start(EngineConfig {
            num_blocks: 2048,
            block_size: BLOCK_SIZE,
            vocab: VOCAB,
            seed,
            ..EngineConfig::default()
        })
        .expect("engine");
        let kv = (engine.pub_port(), engine.replay_port());
        let mut e = HttpEngine::start(name, Arc::new(EventedBackend::new(engine, None)));
        e.kv_ports = Some(kv);
        e
    }

    /// The engine dies: its server and every connection go at once.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    pub fn pod(&self) -> String {
        format!("sim/{}", self.name)
    }

    pub fn yaml(&self) -> String {
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
pub fn scripted_engine<H, T>(name: &str, answer: H) -> HttpEngine
where
    H: axum::handler::Handler<T, ()> + Clone + Send + Sync + 'static,
    T: 'static,
{
    use axum::routing::post;
    HttpEngine::serving(name, move |listener| async move {
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(answer.clone()))
            .route("/v1/completions", post(answer));
        let _ = axum::serve(listener, app).await;
    })
}

// ---------------------------------------------------------------------------------------------
// kvsync

pub struct Kvsync {
    pub running: serve::Running,
    pub base: String,
    pub http: Client<HttpConnector, Full<Bytes>>,
    pub dir: PathBuf,
}

impl Kvsync {
    pub async fn start(
        name: &str,
        engines: &[&HttpEngine],
        kv_sync: bool,
        tok: SocketAddr,
        proxy: ProxyConfig,
    ) -> Kvsync {
        let any = "127.0.0.1:0".parse().expect("addr");
        Kvsync::start_at(any, name, engines, kv_sync, tok, proxy).await
    }

    /// [`Kvsync::start`] listening on `listen` (replicas that name each other as peers).
    pub async fn start_at(
        listen: SocketAddr,
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
            listen,
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

    pub async fn call(
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

    pub async fn json(
        &self,
        method: &str,
        path: &str,
        body: Value,
    ) -> (u16, Option<String>, Value) {
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

    pub async fn get(&self, path: &str) -> Value {
        self.json("GET", path, Value::Null).await.2
    }

    pub async fn metrics(&self) -> String {
        let resp = self.call("GET", "/metrics", Value::Null).await;
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
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
    pub async fn await_until<'a, F, Fut>(&'a self, what: &str, cond: F)
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
    pub async fn await_idle(&self) {
        self.await_until("in-flight counts back to 0", |k| async move {
            k.metric("kvsync_proxy_in_flight", &[]).await == 0.0
                && k.metric("kvsync_proxy_prefill_tokens", &[]).await == 0.0
        })
        .await;
    }

    pub async fn stop(self) {
        let dir = self.dir.clone();
        self.running.stop().await.expect("clean stop");
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub fn proxy_config(policy: Policy) -> ProxyConfig {
    ProxyConfig {
        policy,
        scrape_interval: Duration::from_millis(100),
        cooldown: Duration::from_secs(600),
        ..ProxyConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Python

pub use test_support::python;

pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// Runs `tests/py/SCRIPT ARGS` to completion; fails the test with its output if it fails.
pub async fn run_python(name: &str, args: Vec<String>) -> String {
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
