//! `kvsync bench`'s load generator against a real HTTP server speaking vLLM's OpenAI API (the
//! simulator's engine on a loopback port): what it sends, what it reads back, what it writes.

use engine_sim::http::{serve, Backend, HttpConfig, InstantBackend, InstantConfig};
use kvsync_demo::bench::workload::{Api, Workload};
use kvsync_demo::bench::{run, BenchConfig, Load, Stop};
use std::sync::Arc;
use std::time::Duration;

const MODEL: &str = "bench-llm";

/// A running engine: its URL, its stop and task, its backend (to read its counters).
type Engine = (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
    Arc<dyn Backend>,
);

async fn engine() -> Engine {
    let backend: Arc<dyn Backend> = Arc::new(InstantBackend::new(InstantConfig {
        num_blocks: 4096,
        max_model_len: 16_384,
        ..InstantConfig::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        backend.clone(),
        HttpConfig::new(MODEL),
        async {
            let _ = stopped.await;
        },
    ));
    (url, stop, task, backend)
}

fn config(
    url: &str,
    workload: Workload,
    loads: Vec<Load>,
    out: Option<std::path::PathBuf>,
) -> BenchConfig {
    BenchConfig {
        urls: vec![url.to_owned()],
        model: None,
        api: Api::Chat,
        workload,
        loads,
        stop: Stop::Requests(40),
        max_tokens: 8,
        ignore_eos: true,
        seed: 5,
        out,
        timeout: Duration::from_secs(30),
        max_inflight: 64,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_report_the_servers_cache_hits_and_write_one_line_per_request() {
    let (url, stop, task, _) = engine().await;
    let out = std::env::temp_dir().join(format!("kvsync-bench-{}.jsonl", std::process::id()));
    let cfg = config(
        &url,
        Workload::Conversations {
            system_prompts: 2,
            system_prompt_tokens: 200,
            max_turns: 4,
            user_tokens: 10,
        },
        vec![Load::Closed { concurrency: 4 }],
        Some(out.clone()),
    );
    let summaries = run(&cfg).await.expect("bench runs");
    assert_eq!(summaries.len(), 1);
    let s = &summaries[0];
    assert_eq!(s.requests, 40);
    assert_eq!(s.errors, 0, "{:?}", s.errors_by_kind);
    // Two system prompts of 200 words shared by every conversation, and later turns extend
    // earlier ones: the engine reports most prompt tokens as cached.
    assert!(s.hit > 0.5, "hit {}", s.hit);
    assert!(s.out_tok_s > 0.0);
    assert!(s.ttft_ms.p50 > 0.0 && s.ttft_ms.p99 >= s.ttft_ms.p50);
    let text = std::fs::read_to_string(&out).expect("--out written");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 40);
    for l in &lines {
        assert_eq!(l["output_tokens"], 8, "{l}");
        assert!(l["prompt_tokens"].as_u64().unwrap_or(0) > 200, "{l}");
        assert!(l["error"].is_null());
        assert!(l["ttft_s"].as_f64().is_some_and(|t| t >= 0.0));
    }
    // A conversation's second turn finds its first turn cached (prompt and answer).
    let second = lines
        .iter()
        .find(|l| l["turn"] == 1)
        .expect("a conversation with two turns");
    let first = lines
        .iter()
        .find(|l| l["turn"] == 0 && l["session"] == second["session"])
        .expect("its first turn");
    assert!(
        second["cached_tokens"].as_u64() >= first["prompt_tokens"].as_u64().map(|p| p / 16 * 16),
        "{first} then {second}"
    );
    let _ = std::fs::remove_file(&out);
    let _ = stop.send(());
    task.await.expect("join").expect("serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_sweep_gives_one_summary_per_rate_and_unreachable_servers_are_errors() {
    let (url, stop, task, _) = engine().await;
    let mut cfg = config(
        &url,
        Workload::SharedPrefix {
            groups: 3,
            users: 2,
            context_tokens: 100,
            question_tokens: 10,
        },
        vec![Load::Open { rate: 200.0 }, Load::Open { rate: 400.0 }],
        None,
    );
    cfg.api = Api::Completions;
    cfg.model = Some(MODEL.to_owned());
    let summaries = run(&cfg).await.expect("bench runs");
    assert_eq!(summaries.len(), 2);
    for (s, rate) in summaries.iter().zip([200.0, 400.0]) {
        assert_eq!(s.rate, Some(rate));
        assert_eq!(s.requests, 40);
        assert_eq!(s.errors, 0, "{:?}", s.errors_by_kind);
        assert!(s.hit > 0.3, "three shared contexts: {}", s.hit);
        assert!(s
            .line()
            .starts_with(&format!("bench rate={rate} requests=40 errors=0 ")));
    }
    let _ = stop.send(());
    task.await.expect("join").expect("serve");
    // The server is gone: every request is a counted connect error, none hangs.
    cfg.loads = vec![Load::Closed { concurrency: 2 }];
    cfg.stop = Stop::Requests(6);
    let s = &run(&cfg).await.expect("bench runs")[0];
    assert_eq!((s.requests, s.errors), (6, 6));
    assert_eq!(s.errors_by_kind.get("connect"), Some(&6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_several_urls() {
    let (url_a, stop_a, task_a, a) = engine().await;
    let (url_b, stop_b, task_b, b) = engine().await;
    let mut cfg = config(
        &url_a,
        Workload::Random { prompt_tokens: 20 },
        vec![Load::Closed { concurrency: 3 }],
        None,
    );
    cfg.urls = vec![url_a, url_b];
    let s = &run(&cfg).await.expect("bench runs")[0];
    assert_eq!((s.requests, s.errors), (40, 0));
    // One-request sessions, in turn: 20 each.
    assert_eq!(a.stats().requests_finished, 20);
    assert_eq!(b.stats().requests_finished, 20);
    for (stop, task) in [(stop_a, task_a), (stop_b, task_b)] {
        let _ = stop.send(());
        task.await.expect("join").expect("serve");
    }
}
