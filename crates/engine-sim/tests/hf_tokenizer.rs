//! The simulator with a model's own tokenizer (`kvsync sim --tokenizer DIR`): its `/tokenize`,
//! `/detokenize`, prompt token counts and chat rendering are the model's (through
//! `hf_tokenize`, whose ids are checked against `transformers` in that crate's parity test),
//! with vLLM's defaults. Uses Qwen3's files from `scripts/setup`.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use engine_sim::http::{serve, Backend, HttpConfig, InstantBackend, InstantConfig};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

fn qwen3() -> Arc<hf_tokenize::Tokenizer> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers/qwen3");
    Arc::new(
        hf_tokenize::Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{e}: run scripts/setup")),
    )
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = client.request(req).await.expect("answer");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

#[tokio::test]
async fn an_engine_with_model_files_tokenizes_counts_and_detokenizes_as_the_model() {
    let tok = qwen3();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let mut http = HttpConfig::new("qwen3");
    http.tokenizer = Some(tok.clone());
    let backend: Arc<dyn Backend> = Arc::new(InstantBackend::new(InstantConfig {
        max_model_len: 4096,
        ..InstantConfig::default()
    }));
    let server = tokio::spawn(serve(listener, backend, http, std::future::pending()));

    // A prompt: special tokens as the model adds them (Qwen3 adds none), CJK and emoji.
    let text = "Hello 世界 🌍 — naïve café";
    let (status, v) = post(&format!("{url}/tokenize"), json!({"prompt": text})).await;
    assert_eq!(status, 200, "{v}");
    let ids = tok.encode_prompt(text, true).expect("encodes");
    assert_eq!(v["tokens"], json!(ids));
    assert_eq!(v["count"], ids.len());
    assert_eq!(v["max_model_len"], 4096);
    // Round trip through /detokenize.
    let (_, d) = post(&format!("{url}/detokenize"), json!({"tokens": ids})).await;
    assert_eq!(d["prompt"], text);

    // A chat with tools and template arguments: the model's template, no special tokens added.
    let messages = vec![
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "Weather in Oslo?"}),
    ];
    let tools = vec![
        json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
    ];
    let kwargs = json!({"enable_thinking": false});
    let mut req = hf_tokenize::ChatRequest::new(&messages, true, Some(&tools));
    req.template_kwargs = kwargs.as_object();
    let rendered = tok.render_chat(&req).expect("renders");
    assert!(rendered.contains("get_weather") && rendered.contains("<think>"));
    let chat_ids = tok.encode_prompt(&rendered, false).expect("encodes");
    let body = json!({"messages": messages, "tools": tools, "chat_template_kwargs": kwargs});
    let (_, v) = post(&format!("{url}/tokenize"), body.clone()).await;
    assert_eq!(v["tokens"], json!(chat_ids));

    // The chat completion counts the same prompt, and its text is the model's decoding.
    let mut completion = body;
    completion["max_tokens"] = json!(4);
    let (status, v) = post(&format!("{url}/v1/chat/completions"), completion).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], chat_ids.len());
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));

    // A chat the template cannot render is a 400 naming it, as vLLM's.
    let (status, v) = post(
        &format!("{url}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": 3}]}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    server.abort();
}
