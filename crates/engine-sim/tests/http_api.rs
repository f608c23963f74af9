//! The simulator's HTTP API against real clients: the official `openai` Python package,
//! `prometheus_client`'s text parser, and a Rust HTTP client (hyper) for errors and the other
//! routes. Each test starts the server on port 0 over the instant test backend.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use test_support::python;

use bytes::Bytes;
use engine_sim::http::{serve, Backend, HttpConfig, InstantBackend, InstantConfig};
use engine_sim::Lora;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::oneshot;

const MODEL: &str = "sim-llama";
const BLOCK_SIZE: usize = 16;

/// A server on a loopback port; stops when dropped.
struct Server {
    url: String,
    backend: InstantBackend,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    async fn start(cfg: InstantConfig) -> Server {
        let backend = InstantBackend::new(cfg.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let mut http = HttpConfig::new(MODEL);
        http.num_gpu_blocks = Some(cfg.num_blocks);
        http.loras = vec![Lora {
            id: 1,
            name: "sql-lora".to_owned(),
            path: "/adapters/sql-lora".to_owned(),
        }];
        let (stop, stopped) = oneshot::channel::<()>();
        let dyn_backend: Arc<dyn Backend> = Arc::new(backend.clone());
        let task = tokio::spawn(serve(listener, dyn_backend, http, async {
            let _ = stopped.await;
        }));
        Server {
            url,
            backend,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn instant() -> InstantConfig {
    InstantConfig {
        block_size: BLOCK_SIZE,
        max_model_len: 2048,
        ..InstantConfig::default()
    }
}

/// Runs `tests/py/SCRIPT ARGS` to completion and fails the test with its output if it fails.
async fn run_python(script: &str, args: Vec<String>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(path)
            .args(args)
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    print!("{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_completes_and_chats_streamed_and_not() {
    let server = Server::start(instant()).await;
    let base = format!("{}/v1", server.url);
    run_python(
        "openai_client.py",
        vec![base, MODEL.to_owned(), BLOCK_SIZE.to_string()],
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_parser_reads_vllm_metrics_that_move_with_load() {
    let server = Server::start(instant()).await;
    run_python(
        "metrics_client.py",
        vec![server.url.clone(), MODEL.to_owned()],
    )
    .await;
    server.stop().await;
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `METHOD url` with `body`: the status and the whole body.
async fn call(c: &HttpClient, method: Method, url: &str, body: &str) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let resp = c.request(req).await.expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}

async fn post_json(c: &HttpClient, url: &str, body: &str) -> (StatusCode, Value) {
    let (status, bytes) = call(c, Method::POST, url, body).await;
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {bytes:?}"));
    (status, v)
}

/// Asserts vLLM's error shape and returns the error object.
fn error_of(status: StatusCode, v: &Value, want: StatusCode, kind: &str) -> Value {
    assert_eq!(status, want, "{v}");
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{v}");
    assert_eq!(e["code"], want.as_u16(), "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some(), "param is always present: {v}");
    e.clone()
}

#[tokio::test]
async fn errors_come_in_vllm_shape() {
    let server = Server::start(instant()).await;
    let c = client();
    let completions = format!("{}/v1/completions", server.url);
    let chat = format!("{}/v1/chat/completions", server.url);

    let long = json!({"model": MODEL, "prompt": "a b c", "max_tokens": 2046}).to_string();
    let (s, v) = post_json(&c, &completions, &long).await;
    let e = error_of(s, &v, StatusCode::BAD_REQUEST, "BadRequestError");
    assert_eq!(e["param"], "max_tokens");
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("maximum context length is 2048 tokens"),
        "{msg}"
    );
    assert!(msg.contains("your request has 4 input tokens"), "{msg}");
    // One token less fits.
    let fits = json!({"model": MODEL, "prompt": "a b c", "max_tokens": 2044}).to_string();
    assert_eq!(post_json(&c, &completions, &fits).await.0, StatusCode::OK);

    let (s, v) = post_json(
        &c,
        &chat,
        &json!({"model": "gpt-9", "messages": []}).to_string(),
    )
    .await;
    let e = error_of(s, &v, StatusCode::NOT_FOUND, "NotFoundError");
    assert!(e["message"]
        .as_str()
        .unwrap_or_default()
        .contains("`gpt-9`"));

    for (url, body, param) in [
        (
            &completions,
            r#"{"prompt": "x", "max_tokens": "ten"}"#,
            "body.max_tokens",
        ),
        (&completions, r#"{"prompt": 7}"#, "body.prompt"),
        (&completions, r#"{"max_tokens": 3}"#, "body.prompt"),
        (
            &completions,
            r#"{"prompt": "x", "stream": "yes"}"#,
            "body.stream",
        ),
        (&completions, r#"{"prompt": "x", "#, "body"),
        (&chat, r#"{"model": "sim-llama"}"#, "body.messages"),
        (
            &chat,
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
            "body.messages",
        ),
    ] {
        let (s, v) = post_json(&c, url, body).await;
        let e = error_of(s, &v, StatusCode::BAD_REQUEST, "Bad Request");
        assert_eq!(e["param"], param, "{body}: {v}");
    }

    let (s, v) = post_json(&c, &completions, r#"{"prompt": "x", "n": 2}"#).await;
    let e = error_of(s, &v, StatusCode::BAD_REQUEST, "BadRequestError");
    assert_eq!(e["param"], "n");
    server.stop().await;
}

#[tokio::test]
async fn the_other_routes_answer_as_vllm() {
    let server = Server::start(instant()).await;
    let c = client();
    let url = |p: &str| format!("{}{p}", server.url);

    let (s, body) = call(&c, Method::GET, &url("/health"), "").await;
    assert_eq!((s, body.len()), (StatusCode::OK, 0));
    let (s, body) = call(&c, Method::GET, &url("/version"), "").await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert!(v["version"].as_str().is_some_and(|v| !v.is_empty()), "{v}");

    let (s, body) = call(&c, Method::GET, &url("/v1/models"), "").await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["object"], "list");
    let base = &v["data"][0];
    assert_eq!(base["id"], MODEL);
    assert_eq!(base["owned_by"], "vllm");
    assert_eq!(base["max_model_len"], 2048);
    assert_eq!(base["permission"][0]["object"], "model_permission");
    assert_eq!(v["data"][1]["id"], "sql-lora");
    assert_eq!(v["data"][1]["parent"], MODEL);

    // A LoRA adapter is served under its own name and hashes its blocks apart from the base.
    let req = |m: &str| json!({"model": m, "prompt": "q ".repeat(40), "max_tokens": 1}).to_string();
    let (s, v) = post_json(&c, &url("/v1/completions"), &req("sql-lora")).await;
    assert_eq!(
        (s, v["model"].as_str()),
        (StatusCode::OK, Some("sql-lora")),
        "{v}"
    );
    let (_, v) = post_json(&c, &url("/v1/completions"), &req(MODEL)).await;
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{v}"
    );

    let (s, v) = post_json(&c, &url("/tokenize"), r#"{"prompt": "hello big world"}"#).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["count"], 4);
    let tokens = v["tokens"].clone();
    let (s, v) = post_json(
        &c,
        &url("/detokenize"),
        &json!({"tokens": tokens}).to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let text = v["prompt"].as_str().expect("prompt").to_owned();
    let (_, again) = post_json(
        &c,
        &url("/tokenize"),
        &json!({"prompt": text, "add_special_tokens": false}).to_string(),
    )
    .await;
    // The words come back as the same ids (the `<s>` text is a word, not the special token).
    let ids = |v: &Value| v.as_array().map(|a| a[1..].to_vec()).unwrap_or_default();
    assert_eq!(ids(&again["tokens"]), ids(&tokens), "{text}");
    assert_eq!(ids(&tokens).len(), 3);
    let (s, v) = post_json(&c, &url("/detokenize"), r#"{"tokens": [99999999]}"#).await;
    error_of(s, &v, StatusCode::BAD_REQUEST, "BadRequestError");

    // After a request, the prompt's blocks are cached; a reset forgets them.
    let prompt = json!({"prompt": "r ".repeat(40), "max_tokens": 1}).to_string();
    post_json(&c, &url("/v1/completions"), &prompt).await;
    let (_, v) = post_json(&c, &url("/v1/completions"), &prompt).await;
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 32);
    let (s, body) = call(&c, Method::POST, &url("/reset_prefix_cache"), "").await;
    assert_eq!((s, body.len()), (StatusCode::OK, 0));
    let (_, v) = post_json(&c, &url("/v1/completions"), &prompt).await;
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    server.stop().await;
}

#[tokio::test]
async fn a_client_gone_mid_stream_drops_the_receiver() {
    let server = Server::start(InstantConfig {
        stall_after: Some(2),
        ..instant()
    })
    .await;
    let c = client();
    let body = json!({"prompt": "s t u", "max_tokens": 50, "stream": true}).to_string();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/v1/completions", server.url))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = c.request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/event-stream")));
    let mut body = resp.into_body();
    let frame = body
        .frame()
        .await
        .expect("a frame")
        .expect("frame ok")
        .into_data()
        .expect("data");
    let text = String::from_utf8_lossy(&frame);
    assert!(text.starts_with("data: {"), "{text}");
    let stalled = server
        .backend
        .next_stalled()
        .await
        .expect("a stalled request");
    assert!(!stalled.is_closed(), "the request is still streaming");
    drop(body);
    drop(c);
    // The server drops the stream with the connection, and the stream drops the receiver.
    stalled.closed().await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_gone_before_a_full_response_drops_the_receiver() {
    let server = Server::start(InstantConfig {
        stall_after: Some(1),
        ..instant()
    })
    .await;
    let url = format!("{}/v1/chat/completions", server.url);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9});
    let waiting = tokio::spawn(async move {
        let c = client();
        post_json(&c, &url, &body.to_string()).await
    });
    let stalled = server
        .backend
        .next_stalled()
        .await
        .expect("a stalled request");
    assert!(!stalled.is_closed(), "the handler waits for the rest");
    // The client gives up: its connection closes, hyper drops the handler and its receiver.
    waiting.abort();
    assert!(waiting.await.is_err_and(|e| e.is_cancelled()));
    stalled.closed().await;
    server.stop().await;
}

/// The `data:` payloads of an SSE body, in order.
fn sse_events(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    assert!(text.ends_with("\n\n"), "{text}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn streams_end_with_usage_then_done_in_vllm_chunk_shapes() {
    let server = Server::start(instant()).await;
    let c = client();
    let body = json!({"prompt": "x y z", "max_tokens": 3, "stream": true,
                      "stream_options": {"include_usage": true}});
    let url = format!("{}/v1/completions", server.url);
    let (s, raw) = call(&c, Method::POST, &url, &body.to_string()).await;
    assert_eq!(s, StatusCode::OK);
    let events = sse_events(&raw);
    assert_eq!(events.len(), 3 + 1 + 1, "{events:?}");
    assert_eq!(events[4], "[DONE]");
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    for (i, ch) in chunks[..3].iter().enumerate() {
        assert_eq!(ch["object"], "text_completion");
        assert!(ch.get("usage").is_some_and(Value::is_null), "{ch}");
        let finish = if i == 2 { json!("length") } else { Value::Null };
        assert_eq!(ch["choices"][0]["finish_reason"], finish, "{ch}");
    }
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(chunks[3]["usage"]["prompt_tokens"], 4);
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 3);
    assert_eq!(chunks[3]["usage"]["total_tokens"], 7);

    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                      "stream": true});
    let url = format!("{}/v1/chat/completions", server.url);
    let (_, raw) = call(&c, Method::POST, &url, &body.to_string()).await;
    let events = sse_events(&raw);
    assert_eq!(
        events.len(),
        1 + 2 + 1,
        "role, two tokens, [DONE]: {events:?}"
    );
    assert_eq!(events[3], "[DONE]");
    let role: Value = serde_json::from_str(&events[0]).expect("json");
    assert_eq!(role["object"], "chat.completion.chunk");
    assert_eq!(
        role["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(role.get("usage").is_none(), "exclude_unset: {role}");
    let last: Value = serde_json::from_str(&events[2]).expect("json");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(last["choices"][0]["delta"].get("role").is_none(), "{last}");
    server.stop().await;
}
