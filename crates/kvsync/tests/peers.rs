//! Two kvsync replicas that name each other (`--peers`, each list holding both: a replica
//! skips itself): each reads the other's in-flight load and receives its routing decisions, so
//! a prompt one replica just sent to a pod is counted there by the other before the pod's KV
//! events could tell.

#[path = "support/proxy_fleet.rs"]
mod fleet;

use fleet::*;
use kvsync::route::cost::Policy;
use kvsync_demo::TokenizerServer;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

async fn route(k: &Kvsync, tokens: &[u32]) -> Value {
    let (status, _, v) = k
        .json(
            "POST",
            "/v1/route",
            json!({"model": MODEL, "token_ids": tokens}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_read_each_others_load_and_count_each_others_decisions() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    let engines: Vec<HttpEngine> = (0..3)
        .map(|i| HttpEngine::evented(&format!("e{i}"), i as u64))
        .collect();
    let refs: Vec<&HttpEngine> = engines.iter().collect();
    let (pa, pb) = (free_addr(), free_addr());
    let peered = |peers: Vec<String>| kvsync::proxy::ProxyConfig {
        peers,
        peer_interval: Duration::from_millis(50),
        ..proxy_config(Policy::Prefix)
    };
    let both = vec![pa.to_string(), pb.to_string()];
    let a = Kvsync::start_at(pa, "peer-a", &refs, true, tok.addr, peered(both.clone())).await;
    let b = Kvsync::start_at(pb, "peer-b", &refs, true, tok.addr, peered(both)).await;
    for k in [&a, &b] {
        k.await_until(
            "the other replica is read, itself skipped",
            |k| async move { k.metric("kvsync_proxy_peers", &[]).await == 1.0 },
        )
        .await;
    }
    let load = a.get("/v1/load").await;
    assert!(load["instance"].is_string(), "{load}");
    assert_eq!(load["pods"], json!([]), "nothing in flight");

    // a routes two new prompts: the first to e0 (by name among equals), the second to the
    // least recently selected, e1. Nothing is sent to the engines, so no KV event will ever
    // announce these blocks: only a's decisions can tell b.
    let p1: Vec<u32> = (1..=64).collect();
    let p2: Vec<u32> = (1001..=1064).collect();
    let first = route(&a, &p1).await;
    let second = route(&a, &p2).await;
    let chosen = second["pods"][0]["pod"].as_str().expect("a pod").to_owned();
    assert_ne!(
        first["pods"][0]["pod"], second["pods"][0]["pod"],
        "{first} {second}"
    );
    b.await_until("b received a's two decisions", |k| async move {
        k.metric("kvsync_proxy_peer_decisions_received_total", &[])
            .await
            >= 2.0
    })
    .await;
    // b, which never routed p2 and would take e0 first, counts p2's blocks on a's choice.
    let at_b = route(&b, &p2).await;
    assert_eq!(at_b["pods"][0]["pod"], chosen.as_str(), "{at_b}");
    assert_eq!(at_b["pods"][0]["routed_blocks"], 4, "{at_b}");
    assert!(
        a.metric("kvsync_proxy_peer_decisions_pushed_total", &[])
            .await
            >= 2.0
    );
    assert_eq!(
        a.metric("kvsync_proxy_peer_decisions_dropped_total", &[])
            .await,
        0.0
    );
    a.stop().await;
    b.stop().await;
}

/// A request one replica holds in flight on a pod (its engine has not answered) shows in the
/// other replica's estimate for that pod: its `/v1/route` score counts the peer's request and
/// its uncached tokens, and charges them as queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_through_one_replica_weighs_in_the_others_choice() {
    let tok = TokenizerServer::start().await.expect("tokenizer");
    // The engine holds every request until the test lets it go.
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let slow = scripted_engine("slow", move || {
        let gate = gate.clone();
        async move {
            let _ = gate.acquire().await;
            "done"
        }
    });
    let (pa, pb) = (free_addr(), free_addr());
    let both = vec![pa.to_string(), pb.to_string()];
    let peered = |peers: Vec<String>| kvsync::proxy::ProxyConfig {
        peers,
        peer_interval: Duration::from_millis(50),
        ..proxy_config(Policy::KvAware)
    };
    let a = Kvsync::start_at(
        pa,
        "held-a",
        &[&slow],
        false,
        tok.addr,
        peered(both.clone()),
    )
    .await;
    let b = Kvsync::start_at(pb, "held-b", &[&slow], false, tok.addr, peered(both)).await;
    let ids: Vec<u32> = (1..=512).collect();
    let body = json!({"model": MODEL, "prompt": ids, "max_tokens": 1});
    let held = {
        let a = &a;
        async move { a.json("POST", "/v1/completions", body).await }
    };
    let watch = async {
        b.await_until("b sees a's request in flight", |k| async move {
            let v = route(k, &[9001, 9002]).await;
            let s = &v["pods"][0]["score"];
            s["peer_in_flight"] == 1 && s["peer_prefill_tokens"] == 512 && s["in_flight"] == 0
        })
        .await;
        let v = route(&b, &[9001, 9002]).await;
        let s = &v["pods"][0]["score"];
        // 512 tokens at the default 250 µs each: 0.128 s of queue ahead.
        assert!(
            s["queue_s"].as_f64().is_some_and(|q| q >= 0.128 - 1e-9),
            "{v}"
        );
        release.add_permits(1);
    };
    let ((status, _, answer), ()) = tokio::join!(held, watch);
    assert_eq!(status, 200, "{answer}");
    b.await_until("a's request is over for b too", |k| async move {
        route(k, &[9001, 9002]).await["pods"][0]["score"]["peer_in_flight"] == 0
    })
    .await;
    a.stop().await;
    b.stop().await;
    tok.stop().await;
}
