//! The manager through the real kube-rs client and watcher, against a fake API server driven
//! by the test (list + watch with resourceVersion, bookmarks, 410 Gone), with real ZeroMQ
//! publishers (pyzmq, vLLM's protocol) on loopback addresses standing in for pod IPs.

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "../../kv-subscriber/tests/support/mod.rs"]
mod support;

use apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Pod;
use kv_events::{encode, BlockHash, BlockStored, Event, EventBatch, WireFormat};
use kv_subscriber::Hub;
use kvsync::manager::{Manager, ManagerConfig, ManagerStats, PodTable, WorkerStatus};
use kvsync::pods::{source, Ineligible};
use prefix_index::{Index, IndexConfig};
use serde_json::json;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::Publisher;
use tokio_util::sync::CancellationToken;

const MODEL: &str = "llama";

/// A pod object as the API server would hold it.
fn pod(
    name: &str,
    uid: &str,
    ip: &str,
    phase: &str,
    ready: bool,
    ports: (u16, u16),
    extra: serde_json::Value,
) -> Pod {
    let mut annotations = json!({
        "model.aibrix.ai/kv-events-port": ports.0.to_string(),
        "model.aibrix.ai/kv-events-replay-port": ports.1.to_string(),
    });
    if let Some(m) = extra.get("annotations").and_then(|a| a.as_object()) {
        for (k, v) in m {
            annotations[k] = v.clone();
        }
    }
    let mut labels = json!({
        "model.aibrix.ai/kv-events-enabled": "true",
        "model.aibrix.ai/name": MODEL,
    });
    if let Some(m) = extra.get("labels").and_then(|a| a.as_object()) {
        for (k, v) in m {
            labels[k] = v.clone();
        }
    }
    let restarts = extra.get("restarts").and_then(|r| r.as_i64()).unwrap_or(0);
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "uid": uid,
                     "labels": labels, "annotations": annotations},
        "status": {
            "phase": phase, "podIP": ip,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [{"name": "vllm", "restartCount": restarts, "ready": ready,
                                   "image": "vllm", "imageID": ""}],
        },
    }))
    .expect("pod")
}

/// A Running, Ready pod with no extra labels or annotations.
fn ready_pod(name: &str, uid: &str, ip: &str, ports: (u16, u16)) -> Pod {
    ready_pod_with(name, uid, ip, ports, json!({}))
}

/// A Running, Ready pod with extra labels or annotations.
fn ready_pod_with(
    name: &str,
    uid: &str,
    ip: &str,
    ports: (u16, u16),
    extra: serde_json::Value,
) -> Pod {
    pod(name, uid, ip, "Running", true, ports, extra)
}

fn stored(seq: u64, rank: u32) -> Vec<u8> {
    stored_block(seq, rank, 77, [1, 2, 3, 4])
}

/// A batch storing one block, `hash` over `tokens`.
fn stored_block(seq: u64, rank: u32, hash: u64, tokens: [u32; 4]) -> Vec<u8> {
    encode(
        &EventBatch {
            ts: seq as f64,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: vec![BlockHash::Uint(hash)],
                token_ids: tokens.to_vec(),
                block_size: 4,
                ..Default::default()
            })],
            data_parallel_rank: Some(rank),
        },
        &WireFormat::VLLM_0_33,
    )
}

/// Waits (up to 20 s) for a condition that has no notification of its own.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Fixture {
    api: FakeApiServer,
    index: Arc<Index>,
    hub: Arc<Hub>,
    stats: Arc<ManagerStats>,
    pods: PodTable,
    workers: kvsync::manager::WorkerTable,
    tracker: tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Fixture {
    async fn start(cfg: ManagerConfig) -> Fixture {
        let api = FakeApiServer::start().await;
        let index = Arc::new(Index::new(IndexConfig::default()));
        let hub = Arc::new(Hub::start().expect("hub"));
        let m = Manager::new(cfg, index.clone(), Some(hub.clone()));
        let (stats, tracker, pods, workers) = (m.stats(), m.tracker(), m.pods(), m.workers());
        let mut ready = m.ready();
        let shutdown = CancellationToken::new();
        let events = source::kubernetes(api.client(), &[]);
        let task = tokio::spawn(m.run(events, 1, shutdown.clone()));
        tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
            .await
            .expect("first list in time")
            .expect("manager alive");
        Fixture {
            api,
            index,
            hub,
            stats,
            pods,
            workers,
            tracker,
            shutdown,
            task,
        }
    }

    /// The status of a worker's task and its failures so far.
    fn worker(&self, pod: &str, rank: u32) -> Option<(WorkerStatus, u64)> {
        let w = prefix_index::WorkerId::new(pod, rank);
        self.workers
            .read()
            .get(&w)
            .map(|i| (i.status(), i.failures.load(Relaxed)))
    }

    /// Blocks the worker holds for the test's block (tokens 1..=4).
    fn held_by(&self, pod: &str, rank: u32) -> u32 {
        self.held_tokens(pod, rank, &[1, 2, 3, 4])
    }

    /// Blocks the worker holds of a prefix of `tokens`.
    fn held_tokens(&self, pod: &str, rank: u32, tokens: &[u32]) -> u32 {
        self.index
            .lookup(MODEL, None, tokens)
            .matches
            .iter()
            .find(|m| &*m.worker.pod == pod && m.worker.dp_rank == rank)
            .map_or(0, |m| m.blocks)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("manager task");
        assert_eq!(self.tracker.len(), 0, "every worker task ended");
        assert_eq!(self.stats.workers_running.load(Relaxed), 0);
        // Unsubscriptions reach the poller thread asynchronously.
        let hub = self.hub.clone();
        eventually("no subscription left", || hub.subscriptions() == 0).await;
    }
}

impl Fixture {
    /// Publishes stores from `p` (as rank `rank`, seqs from `seq`) until `pod`'s worker of that
    /// rank holds the block: a subscription needs a message to prove it is through. Returns
    /// the next seq.
    async fn feed(&self, p: &mut Publisher, pod: &str, rank: u32, mut seq: u64) -> u64 {
        let first = seq;
        while self.held_by(pod, rank) == 0 {
            p.send(seq, &stored(seq, rank));
            seq += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                seq - first < 500,
                "events for {pod} rank {rank} never reached the index"
            );
        }
        seq
    }
}

fn test_config() -> ManagerConfig {
    ManagerConfig {
        heartbeat: Duration::from_millis(200),
        ..ManagerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_exactly_once_and_only_when_ready() {
    let f = Fixture::start(test_config()).await;
    let mut p = Publisher::start(&[]);
    let ports = (p.pub_port, p.replay_port);
    let started = || f.stats.subscriptions_started.load(Relaxed);
    f.api.apply(pod(
        "vllm-0",
        "u1",
        "127.0.0.1",
        "Pending",
        false,
        ports,
        json!({}),
    ));
    eventually("pod known", || f.stats.pods_known.load(Relaxed) == 1).await;
    f.api.apply(pod(
        "vllm-0",
        "u1",
        "127.0.0.1",
        "Running",
        false,
        ports,
        json!({}),
    ));
    // The pod table shows when the Running/not Ready state was handled (`pods_eligible` is
    // already 0 for the Pending pod: waiting on it proves nothing).
    let target = || {
        f.pods
            .read()
            .get("ml/vllm-0")
            .map(|v| v.info.target.clone())
    };
    eventually("running pod seen", || {
        !matches!(target(), None | Some(Err(Ineligible::NotRunning(_))))
    })
    .await;
    assert!(
        matches!(target(), Some(Err(Ineligible::NotReady))),
        "{:?}",
        target()
    );
    assert_eq!(f.stats.pods_eligible.load(Relaxed), 0);
    assert_eq!(started(), 0, "not Ready: no subscription");
    f.api.apply(ready_pod("vllm-0", "u1", "127.0.0.1", ports));
    eventually("subscribed", || started() == 1).await;
    // The same pod again (a status update that changes nothing kvsync uses).
    f.api.apply(ready_pod_with(
        "vllm-0",
        "u1",
        "127.0.0.1",
        ports,
        json!({"labels": {"team": "a"}}),
    ));
    f.feed(&mut p, "ml/vllm-0", 0, 0).await;
    assert_eq!(started(), 1, "exactly once");
    assert_eq!(f.stats.workers_running.load(Relaxed), 1);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_change_replaces_the_subscriber_and_drops_the_old_blocks() {
    let f = Fixture::start(test_config()).await;
    let ports = (support::free_port(), support::free_port());
    let (pp, rp) = (ports.0.to_string(), ports.1.to_string());
    let mut a = Publisher::start(&["--host", "127.0.0.2", "--ports", &pp, &rp]);
    let mut b = Publisher::start(&["--host", "127.0.0.3", "--ports", &pp, &rp]);
    f.api.apply(ready_pod("vllm-0", "u1", "127.0.0.2", ports));
    let seq = f.feed(&mut a, "ml/vllm-0", 0, 0).await;
    f.api.apply(ready_pod("vllm-0", "u1", "127.0.0.3", ports));
    eventually("old incarnation's blocks gone", || {
        f.held_by("ml/vllm-0", 0) == 0
    })
    .await;
    eventually("resubscribed", || {
        f.stats.subscriptions_started.load(Relaxed) == 2
    })
    .await;
    // The old IP still publishes, but the one subscriber left is on the new IP. The old IP's
    // batch stores another block: were it the test's block, a subscriber still on the old IP
    // would make `feed` from the new one return at once, having proven nothing.
    let old = [9, 10, 11, 12];
    a.send(seq, &stored_block(seq, 0, 79, old));
    f.feed(&mut b, "ml/vllm-0", 0, 0).await;
    assert_eq!(
        f.held_tokens("ml/vllm-0", 0, &old),
        0,
        "the old IP's batch was not applied"
    );
    assert_eq!(
        f.stats.workers_running.load(Relaxed),
        1,
        "one subscriber, not two"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_removed_deleted_and_watch_cuts_leave_no_duplicate_or_leak() {
    let f = Fixture::start(test_config()).await;
    let p = Publisher::start(&[]);
    let ports = (p.pub_port, p.replay_port);
    let running = || f.stats.workers_running.load(Relaxed);
    let started = || f.stats.subscriptions_started.load(Relaxed);
    for name in ["a", "b", "c"] {
        f.api.apply(ready_pod(name, name, "127.0.0.1", ports));
    }
    eventually("three subscribed", || started() == 3 && running() == 3).await;

    // Watch cut and resumed from the last resourceVersion: nothing changes.
    f.api.cut_watches();
    f.api.apply(ready_pod("d", "d", "127.0.0.1", ports));
    eventually("the resumed watch delivers", || started() == 4).await;
    assert_eq!(running(), 4);

    // Label removed: the server-side selector turns it into a DELETED event.
    f.api.apply(ready_pod_with(
        "a",
        "a",
        "127.0.0.1",
        ports,
        json!({"labels": {"model.aibrix.ai/kv-events-enabled": "false"}}),
    ));
    eventually("unlabelled pod unsubscribed", || running() == 3).await;
    f.api.delete("ml", "b");
    eventually("deleted pod unsubscribed", || running() == 2).await;

    // A partition: the watch hears nothing, a pod is deleted and the history compacted; the
    // resumed watch gets 410 Gone, relists, and the vanished pod is dropped.
    f.api.pause(true);
    f.api.delete("ml", "c");
    f.api.compact();
    f.api.cut_watches();
    f.api.pause(false);
    eventually("relist dropped the vanished pod", || running() == 1).await;
    assert_eq!(
        started(),
        4,
        "no resubscription of unchanged pods across cuts and relists"
    );
    let q = f.api.queries();
    assert!(
        q.iter()
            .all(|q| q.contains("labelSelector=model.aibrix.ai%2Fkv-events-enabled%3Dtrue")),
        "selector on the server: {q:?}"
    );
    assert!(
        q.iter().filter(|q| !q.contains("watch=true")).count() >= 2,
        "the pod could only vanish through a relist: {q:?}"
    );
    assert!(
        q.iter().any(|q| q.contains("allowWatchBookmarks=true")),
        "{q:?}"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_size_two_subscribes_ports_plus_zero_and_plus_one() {
    let f = Fixture::start(test_config()).await;
    // Two publishers on ports P, R and P+1, R+1 (retried if a port is taken meanwhile).
    // Ports below the ephemeral range, which the other tests' connections keep using.
    let mut pick = std::collections::hash_map::RandomState::new().build_hasher();
    let (base, rbase, mut r0, mut r1) = loop {
        pick.write_u8(0);
        let p = 20_000 + (pick.finish() % 5_000) as u16 * 2;
        let r = p + 1_000;
        let (ps, rs) = (p.to_string(), r.to_string());
        let (p1, r1) = ((p + 1).to_string(), (r + 1).to_string());
        let Some(a) = Publisher::try_start(&["--ports", &ps, &rs]) else {
            continue;
        };
        let Some(b) = Publisher::try_start(&["--ports", &p1, &r1]) else {
            continue;
        };
        break (p, r, a, b);
    };
    f.api.apply(ready_pod_with(
        "dp",
        "dp",
        "127.0.0.1",
        (base, rbase),
        json!({"annotations": {"model.aibrix.ai/data-parallel-size": "2"}}),
    ));
    eventually("two subscribers", || {
        f.stats.workers_running.load(Relaxed) == 2
    })
    .await;
    f.feed(&mut r0, "ml/dp", 0, 0).await;
    f.feed(&mut r1, "ml/dp", 1, 0).await;
    assert_eq!(
        f.stats.events_rejected.load(Relaxed),
        0,
        "each rank on its own port"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_500_pods_ten_times_leaves_nothing_behind() {
    let f = Fixture::start(test_config()).await;
    let mut p = Publisher::start(&[]);
    let ports = (p.pub_port, p.replay_port);
    let base = f.index.stats();
    let (tasks0, subs0) = (f.tracker.len(), f.hub.subscriptions());
    let mut seq = 0;
    let mut peak_bytes = 0;
    for round in 0..10 {
        for i in 0..500 {
            let uid = format!("u{round}-{i}");
            f.api
                .apply(ready_pod(&format!("p{i}"), &uid, "127.0.0.1", ports));
        }
        eventually("500 subscribed", || {
            f.stats.workers_running.load(Relaxed) == 500
        })
        .await;
        // Events flow to all of them while they churn.
        p.repeat(seq, 20, &stored(0, 0));
        seq += 20;
        eventually("some blocks indexed", || f.index.stats().worker_blocks > 0).await;
        peak_bytes = peak_bytes.max(f.index.stats().bytes);
        for i in 0..500 {
            f.api.delete("ml", &format!("p{i}"));
        }
        eventually("all unsubscribed", || {
            f.stats.workers_running.load(Relaxed) == 0
        })
        .await;
    }
    let hub = f.hub.clone();
    eventually("no subscription left", || hub.subscriptions() == subs0).await;
    // A worker task counts itself out of `workers_running` just before it returns, so the
    // tracker may still count it for a moment.
    eventually("zero worker tasks left", || f.tracker.len() == tasks0).await;
    let after = f.index.stats();
    println!(
        "churn: {} subscriptions; index bytes {} -> peak {} -> {}; workers {} -> {}; tasks {} -> {}",
        f.stats.subscriptions_started.load(Relaxed),
        base.bytes,
        peak_bytes,
        after.bytes,
        base.workers,
        after.workers,
        tasks0,
        f.tracker.len()
    );
    assert_eq!(f.stats.subscriptions_started.load(Relaxed), 5000);
    assert_eq!(
        (after.bytes, after.blocks, after.workers, after.contexts),
        (base.bytes, 0, 0, 0)
    );
    assert!(
        peak_bytes > base.bytes,
        "the index did hold blocks during the churn"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_sync_off_creates_no_socket_and_no_task() {
    let api = FakeApiServer::start().await;
    let index = Arc::new(Index::new(IndexConfig::default()));
    let m = Manager::new(test_config(), index.clone(), None);
    let (stats, tracker, pods) = (m.stats(), m.tracker(), m.pods());
    let mut ready = m.ready();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(m.run(source::kubernetes(api.client(), &[]), 1, shutdown.clone()));
    ready.wait_for(|r| *r).await.expect("ready");
    api.apply(ready_pod("x", "x", "127.0.0.1", (5557, 5558)));
    eventually("pod tracked", || stats.pods_known.load(Relaxed) == 1).await;
    assert_eq!(tracker.len(), 0);
    assert_eq!(stats.subscriptions_started.load(Relaxed), 0);
    assert!(pods
        .read()
        .get("ml/x")
        .is_some_and(|v| v.info.target.is_ok() && !v.subscribed));
    shutdown.cancel();
    task.await.expect("manager");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_pod_file_is_reread_when_it_changes() {
    let p = Publisher::start(&[]);
    let dir = std::env::temp_dir().join(format!("kvsync-podfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("pods.yaml");
    let write = |names: &[&str]| {
        let docs: Vec<String> = names
            .iter()
            .map(|n| {
                serde_yaml::to_string(&ready_pod(n, n, "127.0.0.1", (p.pub_port, p.replay_port)))
                    .expect("yaml")
            })
            .collect();
        std::fs::write(&file, docs.join("---\n")).expect("write");
    };
    write(&["a", "b"]);
    let index = Arc::new(Index::new(IndexConfig::default()));
    let hub = Arc::new(Hub::start().expect("hub"));
    let m = Manager::new(test_config(), index, Some(hub));
    let (stats, tracker) = (m.stats(), m.tracker());
    let shutdown = CancellationToken::new();
    let events = source::file(file.clone(), Duration::from_millis(20));
    let task = tokio::spawn(m.run(events, 1, shutdown.clone()));
    eventually("two pods from the file", || {
        stats.workers_running.load(Relaxed) == 2
    })
    .await;
    write(&["b", "c", "d"]);
    eventually("the file's new list", || {
        stats.workers_running.load(Relaxed) == 3 && stats.subscriptions_started.load(Relaxed) == 4
    })
    .await;
    shutdown.cancel();
    task.await.expect("manager");
    assert_eq!(tracker.len(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_restart_is_a_new_incarnation_and_a_crash_loop_is_backed_off() {
    let cfg = ManagerConfig {
        churn_backoff: kv_subscriber::Backoff {
            start: Duration::from_secs(2),
            cap: Duration::from_secs(4),
            factor: 2.0,
        },
        ..test_config()
    };
    let f = Fixture::start(cfg).await;
    let mut p = Publisher::start(&[]);
    let ports = (p.pub_port, p.replay_port);
    let started = || f.stats.subscriptions_started.load(Relaxed);
    f.api.apply(ready_pod("cl", "cl", "127.0.0.1", ports));
    f.feed(&mut p, "ml/cl", 0, 0).await;
    // The container restarts five times in a row: each is a new engine, whose blocks are
    // unknown; the re-subscriptions wait (1 s and more) and each waiting one is superseded.
    for restarts in 1..=5 {
        f.api.apply(ready_pod_with(
            "cl",
            "cl",
            "127.0.0.1",
            ports,
            json!({"restarts": restarts}),
        ));
    }
    eventually("the old incarnation's blocks dropped", || {
        f.held_by("ml/cl", 0) == 0
    })
    .await;
    assert_eq!(
        started(),
        1,
        "no subscription storm: the waiting ones were superseded"
    );
    eventually("the last incarnation subscribed after its backoff", || {
        started() == 2
    })
    .await;
    assert_eq!(f.stats.workers_running.load(Relaxed), 1);
    f.stop().await;
}

/// An engine without a replay socket (replay-port annotation `none`, as for vLLM run without
/// `replay_endpoint`) is never asked to replay, and a gap clears its worker at once (nothing
/// could repair it) rather than after a replay request times out. With an hour-long replay
/// timeout, a single replay request would stall this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_without_a_replay_socket_is_never_asked_to_replay() {
    let f = Fixture::start(ManagerConfig {
        replay_timeout: Duration::from_secs(3600),
        ..test_config()
    })
    .await;
    let mut p = Publisher::start(&[]);
    let none = json!({"annotations": {"model.aibrix.ai/kv-events-replay-port": "none"}});
    let ports = (p.pub_port, p.replay_port);
    f.api
        .apply(ready_pod_with("vllm-0", "u1", "127.0.0.1", ports, none));
    let seq = f.feed(&mut p, "ml/vllm-0", 0, 0).await;
    // Seqs published before the subscription was through count as lost too (no replay to
    // recover them): count from here.
    let (resets, lost) = (
        f.stats.resets.load(Relaxed),
        f.stats.batches_lost.load(Relaxed),
    );
    p.skip(seq, &stored(seq, 0)); // lost on the wire
                                  // The batch after the gap stores another block: the one held before the gap (77) would
                                  // make "the next batch applied" true already, and hide a reset that clears nothing.
    let next = [5, 6, 7, 8];
    p.send(seq + 1, &stored_block(seq + 1, 0, 78, next));
    eventually("the gap cleared the worker", || {
        f.stats.resets.load(Relaxed) == resets + 1
    })
    .await;
    assert_eq!(f.stats.batches_lost.load(Relaxed), lost + 1);
    // The batch after the gap is applied after the reset, which dropped what came before.
    eventually("the next batch applied", || {
        f.held_tokens("ml/vllm-0", 0, &next) == 1
    })
    .await;
    assert_eq!(f.held_by("ml/vllm-0", 0), 0, "the gap cleared the worker");
    p.send(seq + 2, &stored(seq + 2, 0)); // reads any replay request logged meanwhile
    assert!(p.replays.is_empty(), "replays requested: {:?}", p.replays);
    f.stop().await;
}

/// Blocks 78 and 79 (tokens 5..=12) after the test's block 77.
fn chained(seq: u64) -> Vec<u8> {
    encode(
        &EventBatch {
            ts: seq as f64,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: vec![BlockHash::Uint(78), BlockHash::Uint(79)],
                parent_block_hash: Some(BlockHash::Uint(77)),
                token_ids: (5..=12).collect(),
                block_size: 4,
                ..Default::default()
            })],
            data_parallel_rank: Some(0),
        },
        &WireFormat::VLLM_0_33,
    )
}

/// A panic in the feed (here: in the middle of an index apply) loses the subscription: the
/// index is left consistent, the failure is counted, and the manager subscribes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_that_panics_mid_apply_is_retried_and_leaves_the_index_consistent() {
    let f = Fixture::start(ManagerConfig {
        failure_backoff: kv_subscriber::Backoff {
            start: Duration::from_millis(50),
            cap: Duration::from_secs(1),
            factor: 2.0,
        },
        ..test_config()
    })
    .await;
    let mut p = Publisher::start(&[]);
    let ports = (p.pub_port, p.replay_port);
    let started = || f.stats.subscriptions_started.load(Relaxed);
    f.api.apply(ready_pod("vllm-0", "u1", "127.0.0.1", ports));
    let seq = f.feed(&mut p, "ml/vllm-0", 0, 0).await;
    // The second block of the next store is filed, then the apply panics.
    f.index.inject_panic(1);
    p.send(seq, &chained(seq));
    eventually("the worker's blocks dropped after the panic", || {
        f.held_by("ml/vllm-0", 0) == 0
    })
    .await;
    f.index.check_invariants();
    assert_eq!(f.index.stats().panics_repaired, 1);
    eventually("subscribed again", || started() == 2).await;
    assert_eq!(f.stats.subscription_failures.load(Relaxed), 1);
    assert_eq!(
        f.worker("ml/vllm-0", 0),
        Some((WorkerStatus::Subscribed, 1)),
        "subscribed again, one failure"
    );
    // The new subscription replays what the engine holds.
    f.feed(&mut p, "ml/vllm-0", 0, seq + 1).await;
    f.index.check_invariants();
    let full: Vec<u32> = (1..=12).collect();
    eventually("the whole chain is back", || {
        f.index
            .lookup(MODEL, None, &full)
            .matches
            .first()
            .map(|m| m.blocks)
            == Some(3)
    })
    .await;
    f.stop().await;
}

/// A failed subscription is visible while its retry waits: the worker says `Failed`, the
/// manager counts it, and it holds nothing. Stopping the pod ends the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscription_is_shown_until_its_retry() {
    let f = Fixture::start(ManagerConfig {
        failure_backoff: kv_subscriber::Backoff {
            start: Duration::from_secs(3600),
            cap: Duration::from_secs(3600),
            factor: 2.0,
        },
        ..test_config()
    })
    .await;
    let mut p = Publisher::start(&[]);
    f.api.apply(ready_pod(
        "vllm-0",
        "u1",
        "127.0.0.1",
        (p.pub_port, p.replay_port),
    ));
    let seq = f.feed(&mut p, "ml/vllm-0", 0, 0).await;
    assert_eq!(
        f.worker("ml/vllm-0", 0),
        Some((WorkerStatus::Subscribed, 0))
    );
    f.index.inject_panic(0);
    p.send(seq, &chained(seq));
    eventually("the failure seen", || {
        f.worker("ml/vllm-0", 0) == Some((WorkerStatus::Failed, 1))
    })
    .await;
    assert_eq!(f.stats.subscription_failures.load(Relaxed), 1);
    assert_eq!(f.stats.workers_failed.load(Relaxed), 1);
    assert_eq!(f.held_by("ml/vllm-0", 0), 0);
    f.index.check_invariants();
    // The pod goes: its task ends during the hour-long backoff.
    f.api.delete("ml", "vllm-0");
    eventually("the failed worker's task ended", || {
        f.stats.workers_running.load(Relaxed) == 0
    })
    .await;
    assert_eq!(f.stats.workers_failed.load(Relaxed), 0);
    assert_eq!(f.stats.subscriptions_started.load(Relaxed), 1);
    f.stop().await;
}
/// A pod deleted and created again under its name: the new incarnation's worker (same pod
/// name and rank) subscribes only after the old one has unsubscribed and dropped its blocks,
/// which would otherwise wipe what the new one applied. The old one's cleanup is held up here
/// by a sink that keeps the hub's poller thread busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_recreated_under_its_name_subscribes_after_the_old_incarnation_cleaned_up() {
    use kv_subscriber::{Delivery, Sink, SubscriberConfig, SubscriberEvent};
    let f = Fixture::start(test_config()).await;
    let mut p = Publisher::start(&[]);
    let ports = (p.pub_port, p.replay_port);
    let started = || f.stats.subscriptions_started.load(Relaxed);
    let running = || f.stats.workers_running.load(Relaxed);
    f.api.apply(ready_pod("vllm-0", "u1", "127.0.0.1", ports));
    let seq = f.feed(&mut p, "ml/vllm-0", 0, 0).await;

    // Another subscriber's sink holds the poller thread until `release` is dropped.
    let mut q = Publisher::start(&[]);
    let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let blocker = f.hub.subscribe(
        SubscriberConfig::new("blocker", q.endpoint()),
        Sink::Direct(Box::new(move |ev| {
            if matches!(ev, SubscriberEvent::Delivery(Delivery::Batch(..))) {
                let _ = entered_tx.send(());
                let _ = hold.recv();
            }
        })),
    );
    let mut qseq = 0;
    while entered.try_recv().is_err() {
        q.send(qseq, &stored(qseq, 0));
        qseq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(qseq < 500, "the blocker never received a batch");
    }

    f.api.delete("ml", "vllm-0");
    f.api.apply(ready_pod("vllm-0", "u2", "127.0.0.1", ports));
    eventually("the new incarnation's task started", || running() == 2).await;
    assert_eq!(
        started(),
        1,
        "the new incarnation subscribed while the old one still holds the worker"
    );
    drop(release);
    eventually("the old incarnation gone, the new one subscribed", || {
        running() == 1 && started() == 2
    })
    .await;
    f.feed(&mut p, "ml/vllm-0", 0, seq).await;
    f.index.check_invariants();
    f.hub.unsubscribe(blocker.id);
    f.stop().await;
}
