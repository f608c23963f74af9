//! End to end: simulated vLLM engines (real PUB/ROUTER sockets, vLLM's wire formats) → the
//! `kvsync serve` binary (subscribers, index, HTTP) → routing, judged by the engines' own
//! prefix-cache hits.

use engine_sim::Tokenizer;
use kvsync_demo::{metric_value, DemoConfig, Fleet, Policy, Service, TokenizerServer, VOCAB};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn work_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvsync-e2e-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

/// A passing test's work dir goes (a failing one keeps its logs: the panic skips this).
fn passed(name: &str) {
    let _ = std::fs::remove_dir_all(work_dir(name));
}

/// kvsync serving `fleet` (KV sync on, one replica).
async fn service(fleet: &Fleet, name: &str, tok: SocketAddr) -> Service {
    let dir = work_dir(name);
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, fleet.pod_file()).expect("pod file");
    Service::start(
        PathBuf::from(env!("CARGO_BIN_EXE_kvsync")).as_path(),
        &pods,
        true,
        tok,
        fleet.engines.len(),
        dir.join("kvsync.log"),
    )
    .await
    .expect("kvsync serve starts and subscribes")
}

/// Per engine, the leading blocks of `tokens` kvsync says it holds.
async fn matched(svc: &Service, body: serde_json::Value, n: usize) -> Vec<u64> {
    let (status, bytes) = svc
        .http
        .call("POST", "/v1/route", body.to_string().into_bytes())
        .await
        .expect("route");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let answer: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let mut out = vec![0; n];
    for p in answer["pods"].as_array().expect("pods") {
        let name = p["pod"].as_str().expect("pod");
        let i: usize = name
            .rsplit('-')
            .next()
            .and_then(|i| i.parse().ok())
            .expect("sim-N");
        out[i] = p["matched_blocks"].as_u64().expect("matched_blocks");
    }
    out
}

/// Where kvsync's view of a probe differs from what the engines really hold: (truth, kvsync).
async fn disagreement(
    svc: &Service,
    fleet: &Fleet,
    probes: &[Vec<u32>],
) -> Option<(Vec<u64>, Vec<u64>)> {
    for p in probes {
        let truth: Vec<u64> = fleet
            .engines
            .iter()
            .map(|e| e.cached_prefix_blocks(p, None) as u64)
            .collect();
        let seen = matched(
            svc,
            json!({"model": kvsync_demo::MODEL, "token_ids": p}),
            fleet.engines.len(),
        )
        .await;
        if seen != truth {
            return Some((truth, seen));
        }
    }
    None
}

/// Waits until kvsync's view of every probe equals what every engine really holds; `tick`
/// runs between checks (for instance to keep an engine publishing).
async fn await_truth_with(
    svc: &Service,
    fleet: &Fleet,
    probes: &[Vec<u32>],
    mut tick: impl FnMut(&Fleet),
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some((truth, seen)) = disagreement(svc, fleet, probes).await {
        assert!(
            Instant::now() < deadline,
            "kvsync never agreed with the engines: truth {truth:?}, kvsync {seen:?}; see {}",
            svc.log.display()
        );
        tick(fleet);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn await_truth(svc: &Service, fleet: &Fleet, probes: &[Vec<u32>]) {
    await_truth_with(svc, fleet, probes, |_| {}).await
}

fn tokens(seed: u32, n: u32) -> Vec<u32> {
    (0..n)
        .map(|i| 1000 + (seed * 7919 + i * 104_729) % 30_000)
        .collect()
}

async fn counter(svc: &Service, name: &str) -> f64 {
    metric_value(&svc.metrics().await.expect("metrics"), name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_on_events_beats_round_robin() {
    let mut cfg = DemoConfig::new(PathBuf::from(env!("CARGO_BIN_EXE_kvsync")));
    cfg.engines = 4;
    cfg.blocks_per_engine = 256;
    cfg.system_prompts = 8;
    cfg.system_prompt_tokens = 512;
    cfg.conversations = 80;
    cfg.clients = 8;
    cfg.replicas = 1;
    cfg.policies = vec![Policy::Kvsync, Policy::RoundRobin];
    cfg.progress = false;
    cfg.work_dir = work_dir("demo");
    let report = kvsync_demo::run(&cfg).await.expect("demo runs");
    let kv = report.get(Policy::Kvsync).expect("kvsync ran");
    let rr = report.get(Policy::RoundRobin).expect("round robin ran");
    assert_eq!(kv.requests as usize, report.requests);
    assert_eq!(rr.prompt_tokens, kv.prompt_tokens, "the same load");
    assert!(
        kv.hit_rate() > rr.hit_rate() + 0.15 && kv.hit_rate() > 1.5 * rr.hit_rate(),
        "kvsync {:.3} vs round robin {:.3}",
        kv.hit_rate(),
        rr.hit_rate()
    );
    let svc = kv.service.as_ref().expect("service figures");
    assert!(svc.blocks > 0 && svc.batches > 0 && svc.index_bytes > 0);
    assert!(svc.lag_p50_s > 0.0 && svc.lag_p99_s >= svc.lag_p50_s);
    let text = report.render();
    let last = text.lines().last().expect("lines");
    assert!(
        last.starts_with("demo kvsync_hit=") && last.contains(" index_bytes="),
        "{last}"
    );
    passed("demo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_engine_is_reset_and_relearned_and_text_routes_like_tokens() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    let mut fleet = Fleet::start(2, 256, 3).expect("fleet");
    let svc = service(&fleet, "restart", tok.addr).await;
    let (p1, p2) = (tokens(1, 200), tokens(2, 150));
    fleet.engines[0].serve(&p1, None, 40).expect("room");
    fleet.engines[1].serve(&p2, None, 10).expect("room");
    fleet.engines[1].serve(&p1[..100], None, 0).expect("room");
    await_truth(&svc, &fleet, &[p1.clone(), p2.clone()]).await;
    assert_eq!(
        matched(
            &svc,
            json!({"model": kvsync_demo::MODEL, "token_ids": p1}),
            2
        )
        .await,
        vec![12, 6],
        "200 prompt tokens + 40 generated = 15 blocks, 12 of them in the probe"
    );

    // Text: the engines' tokenizer gives the router the engine's tokens.
    let text: String = (0..40).map(|i| format!("w{i} ")).collect();
    let t = Tokenizer::words(VOCAB, 32_768);
    fleet.engines[1]
        .serve(&t.words_of(&text, true), None, 0)
        .expect("room");
    let by_text = json!({"model": kvsync_demo::MODEL, "prompt": text});
    let deadline = Instant::now() + Duration::from_secs(20);
    while matched(&svc, by_text.clone(), 2).await != vec![0, 2] {
        assert!(
            Instant::now() < deadline,
            "the text prompt never matched engine 1's 2 blocks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Some traffic on engine 0 (its seq reaches 20 and more).
    for i in 0..20 {
        fleet.engines[0]
            .serve(&tokens(100 + i, 16), None, 0)
            .expect("room");
    }
    await_truth(&svc, &fleet, std::slice::from_ref(&p1)).await;

    // Restart engine 0 on the same ports: kvsync must drop what the old process held and
    // learn what the new one stores. The new process's first batches may go out before the
    // subscriber has reconnected (PUB drops them); its next batches carry a lower seq than the
    // old process reached: a restart, relearned by replay from 0.
    let restarts = counter(&svc, "kvsync_engine_restarts_total").await;
    fleet.restart(0).expect("restart");
    let p3 = tokens(3, 64);
    fleet.engines[0].serve(&p3, None, 0).expect("room");
    let mut tiny = 200;
    await_truth_with(&svc, &fleet, &[p1.clone(), p2, p3.clone()], |f| {
        tiny += 1;
        f.engines[0]
            .serve(&tokens(tiny, 16), None, 0)
            .expect("room");
    })
    .await;
    assert_eq!(
        matched(
            &svc,
            json!({"model": kvsync_demo::MODEL, "token_ids": p1}),
            2
        )
        .await[0],
        0
    );
    assert!(counter(&svc, "kvsync_engine_restarts_total").await > restarts);
    svc.stop().await.expect("clean stop");
    tok.stop().await;
    passed("restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_batch_is_repaired_by_replay() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    let fleet = Fleet::start(3, 256, 4).expect("fleet");
    let svc = service(&fleet, "drop", tok.addr).await;
    let warm = tokens(10, 64);
    for e in &fleet.engines {
        e.serve(&warm, None, 0).expect("room");
    }
    await_truth(&svc, &fleet, std::slice::from_ref(&warm)).await;
    let repaired = counter(&svc, "kvsync_gaps_repaired_total").await;
    let resets = counter(&svc, "kvsync_worker_resets_total").await;
    // Every engine (each wire format) loses its next batch: the prompt's store. The decode
    // steps' batches reveal the gap.
    let p: Vec<Vec<u32>> = (0..3).map(|i| tokens(20 + i, 96)).collect();
    for (e, p) in fleet.engines.iter().zip(&p) {
        e.drop_next_batches(1);
        e.serve(p, None, 32).expect("room");
    }
    await_truth(&svc, &fleet, &p).await;
    for (i, p) in p.iter().enumerate() {
        assert_eq!(
            fleet.engines[i].cached_prefix_blocks(p, None),
            6,
            "96 tokens"
        );
    }
    assert!(counter(&svc, "kvsync_gaps_repaired_total").await >= repaired + 3.0);
    assert_eq!(
        counter(&svc, "kvsync_worker_resets_total").await,
        resets,
        "nothing lost"
    );
    svc.stop().await.expect("clean stop");
    tok.stop().await;
    passed("drop");
}
