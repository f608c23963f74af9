//! `serve` leaves nothing behind: after a run that subscribed, applied events and answered
//! requests is stopped — or its `Running` handle merely dropped — the process has the threads
//! and the runtime the tokio tasks it had before. One test in its own binary: the thread count
//! is the whole process's.

#[path = "../../kv-subscriber/tests/support/mod.rs"]
mod support;

use kv_events::{encode, BlockHash, BlockStored, Event, EventBatch, WireFormat};
use kvsync::config::Config;
use kvsync::serve::{self, Options};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::Publisher;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The names of the process's threads.
fn threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| e.ok())
        .map(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        })
        .collect();
    names.sort();
    names
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// One HTTP/1.1 exchange on its own connection (no client pool: no task of the test's own).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nhost: kvsync\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

fn stored(seq: u64) -> Vec<u8> {
    encode(
        &EventBatch {
            ts: 1_700_000_000.0 + seq as f64,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: vec![BlockHash::Uint(7)],
                token_ids: vec![1, 2, 3, 4],
                block_size: 4,
                ..Default::default()
            })],
            data_parallel_rank: Some(0),
        },
        &WireFormat::VLLM_0_33,
    )
}

/// Waits (up to 20 s) until the threads and tasks are those of the baseline.
async fn back_to(what: &str, threads0: &[String], tasks0: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (t, n) = (threads(), alive_tasks());
        if t == threads0 && n == tasks0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: threads {t:?} (before: {threads0:?}), tokio tasks {n} (before: {tasks0})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_stopped_or_dropped_service_leaves_no_thread_and_no_task() {
    // Idle blocking-pool threads (file reads) go after 50 ms instead of 10 s.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_keep_alive(Duration::from_millis(50))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut p = Publisher::start(&[]);
        let dir = std::env::temp_dir().join(format!("kvsync-shutdown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("pods.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: ml\n  uid: a\n  labels:\n    model.aibrix.ai/kv-events-enabled: \"true\"\n    model.aibrix.ai/name: llama\n  annotations:\n    model.aibrix.ai/kv-events-port: \"{}\"\n    model.aibrix.ai/kv-events-replay-port: \"{}\"\nstatus:\n  phase: Running\n  podIP: 127.0.0.1\n  conditions:\n  - type: Ready\n    status: \"True\"\n",
                p.pub_port, p.replay_port
            ),
        )
        .expect("pod file");
        let (threads0, tasks0) = (threads(), alive_tasks());
        let mut seq = 0;
        for how in ["stopped", "dropped"] {
            let cfg = Config {
                kv_sync: true,
                tokenizer: None,
                poll_timeout: Duration::from_millis(100),
                replay_timeout: Duration::from_secs(5),
                max_contexts: 1000,
                max_prefixes_per_context: 10_000,
            };
            let opts = Options {
                listen: "127.0.0.1:0".parse().expect("addr"),
                pods_file: Some(file.clone()),
                pods_interval: Duration::from_millis(20),
                ..Options::default()
            };
            let running = serve::start(cfg, opts).await.expect("service");
            // Subscribed, and an event applied.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (status, body) = get(running.addr, "/v1/pods").await;
                assert_eq!(status, 200, "{body}");
                let pods: serde_json::Value = serde_json::from_str(&body).expect("json");
                if pods["pods"][0]["workers"][0]["blocks"].as_u64() == Some(1) {
                    break;
                }
                assert!(Instant::now() < deadline, "no block applied: {pods}");
                p.send(seq, &stored(seq));
                seq += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(get(running.addr, "/metrics").await.0, 200);
            // A client connected that has sent nothing yet: its connection's task ends too.
            let mut idle = tokio::net::TcpStream::connect(running.addr)
                .await
                .expect("connect");
            // Accepted, not still in the kernel's backlog (where dropping the listener resets
            // it): the server counts it beside the scrape's own connection.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (_, text) = get(running.addr, "/metrics").await;
                let open = text
                    .lines()
                    .find_map(|l| l.strip_prefix("kvsync_http_connections "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0);
                if open >= 2.0 {
                    break;
                }
                assert!(Instant::now() < deadline, "the idle connection is never accepted");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let addr = running.addr;
            if how == "stopped" {
                running.stop().await.expect("clean stop");
            } else {
                drop(running);
            }
            back_to(how, &threads0, tasks0).await;
            let mut rest = Vec::new();
            assert_eq!(
                idle.read_to_end(&mut rest).await.map(|_| rest.len()).ok(),
                Some(0),
                "{how}: the idle connection is closed"
            );
            assert!(
                tokio::net::TcpStream::connect(addr).await.is_err(),
                "{how}: still listening"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
