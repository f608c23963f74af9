//! The fleet through its real sockets: queueing seen on the wall clock through the HTTP API,
//! `/metrics` read by `prometheus_client`'s parser while it moves, the oracle router's
//! choices, and the fault knobs (HTTP killed mid-stream, restart on the same ports).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use test_support::python;

use bytes::Bytes;
use engine_sim::fleet::{Fleet, FleetConfig};
use engine_sim::GenerateRequest;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

const MODEL: &str = "sim-llama";

type Http = Client<HttpConnector, Full<Bytes>>;

fn client() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

fn config(engines: usize, speed: f64) -> FleetConfig {
    let mut cfg = FleetConfig::new(engines, MODEL);
    cfg.sim.speed = speed;
    cfg.sim.engine.num_blocks = 2048;
    cfg
}

/// `n` distinct words: a prompt of `n + 1` tokens (with BOS).
fn text(tag: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{tag}w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one streamed completion showed the client.
#[derive(Debug)]
struct Streamed {
    /// From sending to the first token's chunk.
    ttft: Duration,
    /// From sending to the end of the body.
    total: Duration,
    pod: Option<String>,
    body: String,
}

async fn stream(http: &Http, url: &str, prompt: &str, max_tokens: usize) -> Streamed {
    let body = json!({
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": true,
    });
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let sent = Instant::now();
    let resp = http.request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let pod = resp
        .headers()
        .get("x-kvsync-pod")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut ttft = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(data));
            if ttft.is_none() && text.contains("\"text\"") {
                ttft = Some(sent.elapsed());
            }
        }
    }
    Streamed {
        ttft: ttft.expect("a token chunk"),
        total: sent.elapsed(),
        pod,
        body: text,
    }
}

/// A non-streamed completion's JSON and its pod header.
async fn complete(
    http: &Http,
    url: &str,
    prompt: &str,
    max_tokens: usize,
) -> (Value, Option<String>) {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens});
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = http.request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let pod = resp
        .headers()
        .get("x-kvsync-pod")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (serde_json::from_slice(&bytes).expect("json"), pod)
}

/// Sends every prompt at once, prompt `i` to `urls[i % urls.len()]`.
async fn burst(http: &Http, urls: &[String], prompts: &[String]) -> Vec<Streamed> {
    let tasks: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (http, url, p) = (http.clone(), urls[i % urls.len()].clone(), p.clone());
            tokio::spawn(async move { stream(&http, &url, &p, 4).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_queues_on_one_engine_and_spreads_over_four() {
    // 32 prompts of 501 tokens, 2 per 1,024-token step: one engine needs 16 steps of about
    // 0.29 s (engine time), four engines 4; at speed 10, 0.46 s and 0.12 s of wall clock.
    let mut cfg = config(4, 10.0);
    cfg.sim.sched.max_num_batched_tokens = 1024;
    let fleet = Fleet::start(cfg).await.expect("fleet");
    let http = client();
    let urls: Vec<String> = fleet.infos().into_iter().map(|e| e.url).collect();
    let prompts: Vec<String> = (0..32).map(|i| text(&format!("q{i}"), 500)).collect();

    let one = burst(&http, &urls[..1], &prompts).await;
    let first = one.iter().map(|s| s.ttft).min().expect("some");
    let last = one.iter().map(|s| s.ttft).max().expect("some");
    let one_end = one.iter().map(|s| s.total).max().expect("some");
    println!("one engine: first token {first:?}, last {last:?}, all done {one_end:?}");
    assert!(
        last > first * 3,
        "queueing: the last first token ({last:?}) should come several times later than the first ({first:?})"
    );

    // The same prompts again would hit the first engine's cache: new ones, spread over 4.
    let prompts: Vec<String> = (0..32).map(|i| text(&format!("r{i}"), 500)).collect();
    let four = burst(&http, &urls, &prompts).await;
    let four_last = four.iter().map(|s| s.ttft).max().expect("some");
    let four_end = four.iter().map(|s| s.total).max().expect("some");
    println!("four engines: last first token {four_last:?}, all done {four_end:?}");
    assert!(
        four_end * 2 < one_end,
        "four engines ({four_end:?}) should finish well before one ({one_end:?})"
    );
    assert!(four_last * 2 < last, "{four_last:?} vs {last:?}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_fleet_engine_move_with_load() {
    // Speed 2: a burst of long prompts keeps the engine busy for seconds while it is scraped.
    let fleet = Fleet::start(config(2, 2.0)).await.expect("fleet");
    let url = fleet.engine(1).info().url;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/fleet_metrics.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .args([url, MODEL.to_owned()])
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fleet_metrics.py failed:\n{stdout}\n{stderr}"
    );
    print!("{stdout}");
    fleet.shutdown().await;
}

/// Long requests submitted straight to engine `i`, kept running while the receivers live.
fn load(
    fleet: &Fleet,
    i: usize,
    n: usize,
) -> Vec<tokio::sync::mpsc::Receiver<engine_sim::TokenEvent>> {
    let h = fleet.engine(i).handle().expect("engine");
    (0..n)
        .map(|k| {
            h.submit(GenerateRequest {
                request_id: format!("load-{i}-{k}"),
                prompt: (0..4000)
                    .map(|t| 1000 + (k * 7919 + t) as u32 % 30_000)
                    .collect(),
                max_tokens: 500,
                lora: None,
            })
            .expect("submit")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_follows_the_prefix_and_avoids_a_queue() {
    let fleet = Fleet::start(config(2, 20.0)).await.expect("fleet");
    let http = client();
    let oracle = fleet.oracle_url().expect("oracle");
    let engine = |i: usize| fleet.engine(i).info().url;
    let (p, q) = (text("p", 600), text("q", 600));

    // Equal loads (idle): each engine warmed with one prompt; the oracle sends each prompt
    // to the engine holding it, whichever asks first.
    complete(&http, &engine(1), &p, 1).await;
    complete(&http, &engine(0), &q, 1).await;
    for _ in 0..2 {
        let (v, pod) = complete(&http, &oracle, &p, 2).await;
        assert_eq!(pod.as_deref(), Some("sim-1"), "{v}");
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 592);
        let (_, pod) = complete(&http, &oracle, &q, 2).await;
        assert_eq!(pod.as_deref(), Some("sim-0"));
    }

    // Both hold p; a queue on one sends p to the other, either way round.
    for busy in [1usize, 0] {
        complete(&http, &engine(0), &p, 1).await;
        complete(&http, &engine(1), &p, 1).await;
        let running = load(&fleet, busy, 24);
        let t = Instant::now();
        let (v, pod) = complete(&http, &oracle, &p, 2).await;
        println!("routed past a queue of 24 in {:?}", t.elapsed());
        assert_eq!(pod, Some(format!("sim-{}", 1 - busy)), "{v}");
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 592);
        drop(running);
        // The engine aborts them at its next step.
        let h = fleet.engine(busy).handle().expect("engine");
        while h.stats().num_requests_running + h.stats().num_requests_waiting > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // The streamed answer names its pod too.
    let s = stream(&http, &oracle, &q, 3).await;
    assert_eq!(s.pod.as_deref(), Some("sim-0"));
    assert!(s.body.ends_with("data: [DONE]\n\n"), "{}", s.body);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_http_cuts_streams_and_a_restart_keeps_the_ports() {
    let fleet = Fleet::start(config(1, 2.0)).await.expect("fleet");
    let http = client();
    let e = fleet.engine(0);
    let before = e.info();
    let handle = e.handle().expect("engine");

    // A long stream is cut when the HTTP side dies; the engine aborts its request.
    let body =
        json!({"model": MODEL, "prompt": text("k", 100), "max_tokens": 2000, "stream": true});
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/v1/completions", before.url))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = http.request(req).await.expect("response");
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("ok");
    assert!(first.data_ref().is_some());
    assert_eq!(handle.stats().num_requests_running, 1);
    e.kill_http().await;
    assert!(!e.http_running().await);
    let mut cut = false;
    while let Some(f) = body.frame().await {
        if f.is_err() {
            cut = true;
            break;
        }
        if let Some(d) = f.expect("frame").data_ref() {
            assert!(
                !String::from_utf8_lossy(d).contains("[DONE]"),
                "the stream finished"
            );
        }
    }
    assert!(cut, "the stream should end in an error, not cleanly");
    // The engine notices the dropped receiver at its next step.
    while handle.stats().num_requests_running > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = http
        .request(
            Request::get(format!("{}/health", before.url))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await;
    assert!(refused.is_err(), "nothing listens any more");

    // Back on the same port.
    e.start_http().await.expect("http back");
    let (v, _) = complete(&http, &before.url, &text("k", 100), 2).await;
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 96);
    drop(handle);

    // A restart: same ports, an empty cache.
    e.restart().await.expect("restart");
    assert_eq!(e.info(), before);
    let h = e.handle().expect("restarted");
    let port = |s: &str| s.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    assert_eq!(Some(h.pub_port()), port(&before.kv_events));
    assert_eq!(h.replay_port(), before.replay.as_deref().and_then(port));
    assert_eq!(h.next_seq(), 0, "a new process counts from 0");
    drop(h);
    let (v, _) = complete(&http, &before.url, &text("k", 100), 2).await;
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    fleet.shutdown().await;
}
