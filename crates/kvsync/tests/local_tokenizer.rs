//! The in-process tokenizer against the remote one, end to end: `kvsync sim --tokenizer DIR`
//! (engines tokenizing with Qwen3's real files, as vLLM serving Qwen3 does) and two `kvsync
//! serve` on the same fleet, one tokenizing in process (`--tokenizer MODEL=DIR`), one with the
//! remote tokenizer (an engine's `/tokenize`). For text and chat requests: the same token ids
//! as the engine's `/tokenize` (kvsync's own `POST /tokenize`), the same route (block count,
//! matches, pod); a request proxied through the local one is found whole in the index from the
//! engine's own KV events. Also: bad files are one clear error at start; a chat the template
//! refuses is a 400 naming the problem.
//!
//! Needs `scripts/setup` (the tokenizers in `.cache/tokenizers`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kvsync::config::{Config, RemoteTokenizer, TokenizerEngine};
use kvsync::serve::{self, Options};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = "qwen3-sim";

fn qwen3_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers/qwen3");
    assert!(
        dir.join("tokenizer.json").exists(),
        "{} is missing: run scripts/setup",
        dir.display()
    );
    dir
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvsync-localtok-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `kvsync sim`, killed when dropped.
struct Sim {
    child: Child,
    engines: Vec<String>,
}

impl Sim {
    fn start(dir: &Path, pods: &Path) -> Sim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvsync"))
            .args(["sim", "--engines", "2", "--speed", "50", "--no-oracle"])
            .args(["--model", MODEL, "--max-model-len", "32768"])
            .arg("--tokenizer")
            .arg(dir)
            .arg("--pods-out")
            .arg(pods)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kvsync sim starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut engines = Vec::new();
        loop {
            let line = lines.next().expect("a line before ready").expect("utf-8");
            if line == "ready" {
                break;
            }
            let v: Value = serde_json::from_str(&line).expect("a JSON line");
            engines.push(v["url"].as_str().expect("url").to_owned());
        }
        Sim { child, engines }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Http = Client<HttpConnector, Full<Bytes>>;

/// POSTs `body` to `url`: the status, the `x-kvsync-tokenizer` header, the JSON answer.
async fn post(http: &Http, url: &str, body: &Value) -> (u16, Option<String>, Value) {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = http.request(req).await.expect("an answer");
    let status = resp.status().as_u16();
    let source = resp
        .headers()
        .get("x-kvsync-tokenizer")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, source, v)
}

async fn get(http: &Http, url: &str) -> Value {
    let req = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = http.request(req).await.expect("an answer");
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).expect("JSON")
}

/// `kvsync serve` in process on the sim's pod file, KV sync on, the remote tokenizer the
/// engine at `remote`; `local`: the in-process tokenizers.
async fn serve_with(pods: &Path, remote: &str, local: Vec<(String, PathBuf)>) -> serve::Running {
    let cfg = Config {
        kv_sync: true,
        tokenizer: Some(RemoteTokenizer {
            engine: TokenizerEngine::Vllm,
            endpoint: remote.to_owned(),
        }),
        poll_timeout: Duration::from_millis(100),
        replay_timeout: Duration::from_secs(5),
        max_contexts: 1000,
        max_prefixes_per_context: 100_000,
    };
    let opts = Options {
        listen: "127.0.0.1:0".parse().expect("addr"),
        pods_file: Some(pods.to_owned()),
        pods_interval: Duration::from_millis(50),
        tokenizers: local,
        ..Options::default()
    };
    serve::start(cfg, opts).await.expect("kvsync starts")
}

/// Waits for `cond` (30 s at most, then fails naming `what`).
async fn await_until<F, Fut>(what: &str, cond: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The text and chat requests compared (each a `/tokenize` body without `model`).
fn corpus() -> Vec<Value> {
    let long: String = (0..300)
        .map(|i| format!("Paragraph {i}: the quick brown fox jumps over the lazy dog. "))
        .collect();
    let weather_tool = json!({"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}});
    vec![
        json!({"prompt": "Hello, world! How are you today?"}),
        json!({"prompt": "東京の天気は？ 🌧️ café naïve e\u{301}  \t\n  spaces", "add_special_tokens": false}),
        json!({"prompt": long}),
        json!({"messages": [{"role": "user", "content": "What is KV cache routing?"}]}),
        json!({"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three primes."},
            {"role": "assistant", "content": "2, 3, 5."},
            {"role": "user", "content": [{"type": "text", "text": "And three more?"}]}]}),
        json!({"messages": [{"role": "user", "content": "Weather in Paris?"}],
               "tools": [weather_tool]}),
        json!({"messages": [{"role": "user", "content": format!("Summarize: {long}")}],
               "chat_template_kwargs": {"enable_thinking": false}}),
        json!({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": false}),
    ]
}

/// A `/tokenize` body as a `/v1/route` body.
fn route_body(req: &Value) -> Value {
    let mut r = req.clone();
    r["model"] = json!(MODEL);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_remote_tokenizers_give_the_same_tokens_and_routes() {
    let dir = temp_dir("e2e");
    let pods = dir.join("pods.yaml");
    let sim = Sim::start(&qwen3_dir(), &pods);
    let http: Http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let engine = sim.engines[0].clone();
    let local = serve_with(&pods, &engine, vec![(MODEL.to_owned(), qwen3_dir())]).await;
    let remote = serve_with(&pods, &engine, Vec::new()).await;
    let (l, r) = (
        format!("http://{}", local.addr),
        format!("http://{}", remote.addr),
    );
    for base in [&l, &r] {
        await_until("both pods listed", || async {
            get(&http, &format!("{base}/v1/models")).await["data"][0]["pods"] == 2
        })
        .await;
    }
    // Each says which tokenizer it uses.
    assert_eq!(
        get(&http, &format!("{l}/v1/models")).await["data"][0]["tokenizer"],
        "local"
    );
    assert_eq!(
        get(&http, &format!("{r}/v1/models")).await["data"][0]["tokenizer"],
        "remote"
    );

    // Warm engine 1 with the long prompt: its events reach both indexes.
    let long = &corpus()[2];
    let (status, _, _) = post(
        &http,
        &format!("{}/v1/completions", sim.engines[1]),
        &json!({"model": MODEL, "prompt": long["prompt"], "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200);
    // Awaited on /v1/pods, not /v1/route: both services must see the same route calls, in
    // the same order, for their choices (recent decisions, tie-breaks) to be comparable.
    for base in [&l, &r] {
        await_until("engine 1's blocks indexed", || async {
            let p = get(&http, &format!("{base}/v1/pods")).await;
            p["pods"].as_array().is_some_and(|pods| {
                pods.iter().any(|p| {
                    p["pod"].as_str().is_some_and(|n| n.ends_with("sim-1"))
                        && p["workers"][0]["blocks"].as_u64() > Some(10)
                })
            })
        })
        .await;
    }

    for req in corpus() {
        let mut body = req.clone();
        body["model"] = json!(MODEL);
        let (s_engine, _, from_engine) = post(&http, &format!("{engine}/tokenize"), &body).await;
        let (s_local, src_local, from_local) = post(&http, &format!("{l}/tokenize"), &body).await;
        let (s_remote, src_remote, from_remote) =
            post(&http, &format!("{r}/tokenize"), &body).await;
        assert_eq!((s_engine, s_local, s_remote), (200, 200, 200), "{req}");
        assert_eq!(src_local.as_deref(), Some("local"));
        assert_eq!(src_remote.as_deref(), Some("remote"));
        assert!(from_engine["count"].as_u64() > Some(3), "{from_engine}");
        assert_eq!(from_local["tokens"], from_engine["tokens"], "{req}");
        assert_eq!(from_local["count"], from_engine["count"], "{req}");
        assert_eq!(from_remote["tokens"], from_engine["tokens"], "{req}");
        assert_eq!(from_remote["max_model_len"], from_engine["max_model_len"]);

        // The same route: blocks, every pod's match, the pod chosen.
        let (_, _, a) = post(&http, &format!("{l}/v1/route"), &route_body(&req)).await;
        let (_, _, b) = post(&http, &format!("{r}/v1/route"), &route_body(&req)).await;
        for key in ["num_blocks", "block_size"] {
            assert_eq!(a[key], b[key], "{key} of {req}: {a} vs {b}");
        }
        let pods = |v: &Value| -> Vec<(Value, Value)> {
            let mut p: Vec<_> = v["pods"]
                .as_array()
                .expect("pods")
                .iter()
                .map(|p| (p["pod"].clone(), p["matched_blocks"].clone()))
                .collect();
            p.sort_by_key(|(pod, _)| pod.to_string());
            p
        };
        assert_eq!(pods(&a), pods(&b), "{req}");
        assert_eq!(a["selected"]["pod"], b["selected"]["pod"], "{req}");
        let expected_blocks = from_engine["count"].as_u64().expect("count") / 16;
        assert_eq!(a["num_blocks"].as_u64(), Some(expected_blocks), "{req}");
    }
    // The long prompt went to the engine holding it.
    let (_, _, a) = post(&http, &format!("{l}/v1/route"), &route_body(long)).await;
    assert!(a["selected"]["pod"]
        .as_str()
        .is_some_and(|p| p.ends_with("sim-1")));

    // Proxied through the local tokenizer: the engine's own events then cover the whole
    // prompt in the remote one's index (the local ids were the engine's).
    let chat = json!({"model": MODEL, "max_tokens": 1, "messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": format!("Which is larger? {}", "one two three ".repeat(40))}]});
    let (status, _, _) = post(&http, &format!("{l}/v1/chat/completions"), &chat).await;
    assert_eq!(status, 200);
    let mut route = chat.clone();
    route.as_object_mut().expect("object").remove("max_tokens");
    await_until("the proxied chat indexed whole", || async {
        let (_, _, b) = post(&http, &format!("{r}/v1/route"), &route).await;
        b["num_blocks"].as_u64().is_some_and(|n| n > 0)
            && b["selected"]["matched_blocks"] == b["num_blocks"]
    })
    .await;

    let metrics = {
        let req = hyper::Request::get(format!("{l}/metrics"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = http.request(req).await.expect("metrics");
        let b = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(b.to_vec()).expect("utf-8")
    };
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned())))
        .expect("metrics parse");
    // The histogram's +Inf bucket: how many texts each source tokenized.
    let count = |source: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "kvsync_tokenize_seconds" && s.labels.get("source") == Some(source)
            })
            .and_then(|s| match &s.value {
                prometheus_parse::Value::Histogram(b) => b.last().map(|b| b.count),
                _ => None,
            })
    };
    assert!(
        count("local").is_some_and(|n| n >= corpus().len() as f64),
        "{metrics}"
    );
    assert_eq!(
        count("remote"),
        Some(0.0),
        "the local one never asked an engine"
    );

    local.stop().await.expect("clean stop");
    remote.stop().await.expect("clean stop");
    drop(sim);
    let _ = std::fs::remove_dir_all(dir);
}

/// A tokenizer whose template refuses any role but user (as templates that check alternation
/// do, with `raise_exception`).
fn strict_tokenizer(dir: &Path) {
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "<s>"), added(1, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]",
                  "vocab": {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "user": 4, ":": 5}}
    });
    let config = json!({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "[UNK]",
        "chat_template": "{% for m in messages %}{% if m.role != 'user' %}{{ raise_exception('only user messages, not ' + m.role) }}{% endif %}{{ m.role }} : {{ m.content }} {% endfor %}"
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("write");
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("write");
}

#[tokio::test]
async fn a_chat_the_template_refuses_is_a_400_naming_the_problem() {
    let dir = temp_dir("strict");
    strict_tokenizer(&dir);
    // One pod serving the model (never reached: the request is refused before).
    let pods = dir.join("pods.yaml");
    std::fs::write(
        &pods,
        format!("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: p0\n    namespace: t\n    uid: p0-uid\n    labels:\n      model.aibrix.ai/kv-events-enabled: \"true\"\n      model.aibrix.ai/name: {MODEL}\n    annotations:\n      model.aibrix.ai/port: \"1\"\n      model.aibrix.ai/kv-events-port: \"1\"\n  status:\n    phase: Running\n    podIP: 127.0.0.1\n    conditions:\n    - type: Ready\n      status: \"True\"\n"),
    )
    .expect("pod file");
    let svc = serve_with(
        &pods,
        "http://127.0.0.1:1",
        vec![(MODEL.to_owned(), dir.clone())],
    )
    .await;
    let http: Http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let base = format!("http://{}", svc.addr);
    await_until("the pod listed", || async {
        get(&http, &format!("{base}/v1/models")).await["data"][0]["pods"] == 1
    })
    .await;
    let refused = json!({"model": MODEL, "messages": [{"role": "system", "content": "x"}]});
    for path in ["/v1/route", "/tokenize", "/v1/chat/completions"] {
        let (status, _, v) = post(&http, &format!("{base}{path}"), &refused).await;
        assert_eq!(status, 400, "{path}: {v}");
        let msg = v["error"]["message"]
            .as_str()
            .or(v["error"].as_str())
            .unwrap_or_default();
        assert!(
            msg.contains("only user messages, not system"),
            "{path}: {v}"
        );
    }
    // The shape vLLM answers (where kvsync answers as an engine).
    let (_, _, v) = post(&http, &format!("{base}/tokenize"), &refused).await;
    assert_eq!(v["error"]["type"], "BadRequestError");
    assert_eq!(v["error"]["code"], 400);
    // Accepted chats and prompts still tokenize.
    let (status, src, v) = post(
        &http,
        &format!("{base}/tokenize"),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    assert_eq!((status, src.as_deref()), (200, Some("local")), "{v}");
    assert_eq!(v["tokens"], json!([4, 5, 3]));
    assert_eq!(v["count"], 3);
    let (_, _, v) = post(
        &http,
        &format!("{base}/tokenize"),
        &json!({"model": MODEL, "prompt": "hello user"}),
    )
    .await;
    assert_eq!(v["tokens"], json!([3, 4]));
    svc.stop().await.expect("clean stop");
    let _ = std::fs::remove_dir_all(dir);
}

fn kvsync(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvsync"))
        .args(args)
        .env_remove("KVSYNC_TOKENIZERS")
        .output()
        .expect("kvsync runs")
}

#[test]
fn bad_tokenizer_files_are_one_clear_error_at_start() {
    let dir = temp_dir("bad");
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, "apiVersion: v1\nkind: List\nitems: []\n").expect("pod file");
    let pods = pods.to_str().expect("utf-8");
    // No such directory.
    let out = kvsync(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--pods",
        pods,
        "--tokenizer",
        "org/model-a=/nonexistent/model-a",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("\"org/model-a\"") && err.contains("/nonexistent/model-a/tokenizer.json"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.matches("tokenizer.json").count(), 1, "said once: {err}");
    // A tokenizer.json that is not JSON.
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).expect("dir");
    std::fs::write(broken.join("tokenizer.json"), "{not json").expect("write");
    std::fs::write(broken.join("tokenizer_config.json"), "{}").expect("write");
    let spec = format!("m={}", broken.display());
    let out = kvsync(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--pods",
        pods,
        "--tokenizer",
        &spec,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("\"m\"")
            && err.contains("broken/tokenizer.json")
            && err.contains("line 1 column 2"),
        "{err}"
    );
    // Not MODEL=DIR, or a model twice: refused before anything starts.
    for args in [
        vec!["--tokenizer", "just-a-model"],
        vec!["--tokenizer", "m=/a", "--tokenizer", "m=/b"],
    ] {
        let mut all = vec!["serve", "--listen", "127.0.0.1:0", "--pods", pods];
        all.extend(args);
        let out = kvsync(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("--tokenizer"), "{err}");
    }
    // `kvsync config` shows the choice per model (loading the files), from the variable too.
    let qwen = format!("Qwen/Qwen3-8B={}", qwen3_dir().display());
    let out = Command::new(env!("CARGO_BIN_EXE_kvsync"))
        .arg("config")
        .env("KVSYNC_TOKENIZERS", &qwen)
        .output()
        .expect("kvsync runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Qwen/Qwen3-8B: local "), "{text}");
    assert!(text.contains("other models: remote"), "{text}");
    let out = kvsync(&["config", "--tokenizer", "org/model-a=/nonexistent/model-a"]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}
