//! kvsync in the request path: `kvsync serve` (in process, port 0) in front of simulated vLLM
//! engines serving vLLM's HTTP API on loopback (engine-sim's `http` over a `Backend`), with the
//! official `openai` client and hyper as the clients.
//!
//! Each engine's HTTP server runs on a runtime of its own, so that killing it (shutting that
//! runtime down) closes every connection at once, as a crashed engine would. The backends are
//! `Arc<dyn Backend>`: the simulator's clocked engine replaces them one for one.

#[path = "support/proxy_fleet.rs"]
mod fleet;

use engine_sim::http::{InstantBackend, InstantConfig};
use engine_sim::{Engine, EngineConfig};
use fleet::*;
use http_body_util::BodyExt;
use kvsync::route::cost::Policy;
use kvsync_demo::{TokenizerServer, VOCAB};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
                Arc::new(EventedBackend::new(
                    engine,
                    Some(Duration::from_micros(100)),
                )),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_never_answers_is_a_504_not_retried() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    let mute = scripted_engine("mute", || async {
        std::future::pending::<()>().await;
        "never"
    });
    let ok = HttpEngine::start(
        "ok",
        Arc::new(InstantBackend::new(InstantConfig {
            vocab: VOCAB,
            ..InstantConfig::default()
        })),
    );
    let mut cfg = proxy_config(Policy::RoundRobin);
    cfg.first_byte_timeout = Duration::from_millis(300);
    // Round robin by name: "mute" first.
    let k = Kvsync::start("mute", &[&mute, &ok], false, tok.addr, cfg).await;
    let (status, pod, v) = k
        .json(
            "POST",
            "/v1/completions",
            json!({"model": MODEL, "prompt": "a", "max_tokens": 1}),
        )
        .await;
    assert_eq!((status, pod), (504, None), "{v}");
    assert_eq!(v["error"]["type"], "GatewayTimeout", "{v}");
    // The engine may still be working on it: not sent elsewhere.
    assert_eq!(k.metric("kvsync_proxy_retries_total", &[]).await, 0.0);
    assert_eq!(
        k.metric("kvsync_proxy_rejected_total", &[("reason", "timeout")])
            .await,
        1.0
    );
    k.await_idle().await;
    k.stop().await;
    tok.stop().await;
}
