//! 256 subscribers in one process (one publisher fans out to all): threads stay bounded (one
//! poller thread plus two libzmq threads per `SUBS_PER_CONTEXT` subscribers), file descriptors grow by a fixed
//! few per subscriber and return to the baseline after shutdown; memory is measured and printed.
//! Its own test binary, so no other test's sockets or threads are counted.

mod support;

use kv_events::{encode, EventBatch, WireFormat};
use kv_subscriber::{Delivery, Hub, SubscriberConfig, SubscriberEvent, SubscriberState};
use std::time::Duration;
use support::Publisher;
use tokio::sync::mpsc;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn wait(rx: &mut mpsc::Receiver<SubscriberEvent>, pred: impl Fn(&SubscriberEvent) -> bool) {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("in time")
            .expect("alive");
        if pred(&ev) {
            return;
        }
    }
}

#[tokio::test]
async fn subscribers_256_keep_threads_and_descriptors_bounded() {
    const N: usize = 256;
    let mut p = Publisher::start(&[]);
    let (threads0, fds0, rss0) = (count("/proc/self/task"), count("/proc/self/fd"), rss_kib());
    let hub = Hub::start().expect("hub");
    let threads_hub = count("/proc/self/task");
    let mut sinks = Vec::new();
    let mut ids = Vec::new();
    for i in 0..N {
        let (tx, rx) = mpsc::channel(64);
        let cfg =
            SubscriberConfig::new(format!("sub-{i}"), p.endpoint()).replay(p.replay_endpoint());
        ids.push(hub.subscribe(cfg, tx).id);
        sinks.push(rx);
    }
    for rx in &mut sinks {
        wait(rx, |e| *e == SubscriberEvent::State(SubscriberState::Live)).await;
    }
    let payload = encode(
        &EventBatch {
            ts: 1.0,
            events: Vec::new(),
            data_parallel_rank: Some(0),
        },
        &WireFormat::VLLM_0_33,
    );
    // A subscription reaches the PUB a moment after the connection (ZeroMQ has no ack for it):
    // a subscriber that missed seq 0 live sees the gap at seq 1 and replays it.
    p.send(0, &payload);
    p.send(1, &payload);
    for (i, rx) in sinks.iter_mut().enumerate() {
        let mut got = Vec::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("subscriber {i}: {got:?}"))
                .expect("alive");
            let done = matches!(ev, SubscriberEvent::Delivery(Delivery::Batch(1, _)));
            got.push(ev);
            if done {
                break;
            }
        }
        assert!(
            got.iter()
                .any(|e| matches!(e, SubscriberEvent::Delivery(Delivery::Batch(0, _)))),
            "subscriber {i}: {got:?}"
        );
    }
    let (threads1, fds1, rss1) = (count("/proc/self/task"), count("/proc/self/fd"), rss_kib());
    assert_eq!(hub.subscriptions(), N);
    println!(
        "{N} subscribers: threads {threads0} -> {threads_hub} (hub) -> {threads1}; fds {fds0} -> {fds1} ({:.1} per subscriber); RSS {:.1} MiB -> {:.1} MiB ({:.1} KiB per subscriber)",
        (fds1 - fds0) as f64 / N as f64,
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        (rss1.saturating_sub(rss0)) as f64 / N as f64
    );
    // The hub: its poller, and libzmq's I/O and reaper threads of its first context. Every
    // `SUBS_PER_CONTEXT` subscribers share one more context (two threads); a subscriber itself
    // adds none.
    assert_eq!(threads_hub, threads0 + 3, "poller + one libzmq context");
    assert_eq!(
        threads1,
        threads_hub + 2 * (N.div_ceil(kv_subscriber::SUBS_PER_CONTEXT) - 1),
        "threads per {} subscribers",
        kv_subscriber::SUBS_PER_CONTEXT
    );
    assert!(
        fds1 - fds0 <= 8 * N,
        "a few descriptors per subscriber: {} for {N}",
        fds1 - fds0
    );
    assert!(
        rss1.saturating_sub(rss0) < 256 * 1024,
        "under 1 MiB per subscriber"
    );

    for id in ids {
        hub.unsubscribe(id);
    }
    for rx in &mut sinks {
        wait(rx, |e| {
            *e == SubscriberEvent::State(SubscriberState::Stopped)
        })
        .await;
    }
    hub.shutdown();
    let (threads2, fds2) = (count("/proc/self/task"), count("/proc/self/fd"));
    println!("after shutdown: threads {threads2}, fds {fds2}");
    assert_eq!(threads2, threads0, "every thread joined");
    assert!(fds2 <= fds0 + 2, "descriptors released: {fds0} -> {fds2}");
}
