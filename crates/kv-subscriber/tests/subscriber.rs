//! The subscriber against real libzmq peers: a vLLM-like publisher (pyzmq PUB + ROUTER) that
//! the test drives to skip, repeat and restart sequences and to send malformed frames.

mod support;

use kv_events::{encode, BlockHash, BlockStored, Event, EventBatch, FrameError, WireFormat};
use kv_subscriber::{
    Delivery, Hub, SubscriberConfig, SubscriberCounters, SubscriberEvent, SubscriberState,
};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use support::Publisher;
use tokio::sync::{mpsc, oneshot};

fn payload(seq: u64) -> Vec<u8> {
    let b = EventBatch {
        ts: seq as f64,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: vec![BlockHash::Uint(1000 + seq)],
            token_ids: vec![seq as u32; 4],
            block_size: 4,
            ..Default::default()
        })],
        data_parallel_rank: Some(0),
    };
    encode(&b, &WireFormat::VLLM_0_33)
}

struct Sink {
    rx: mpsc::Receiver<SubscriberEvent>,
    seen: Vec<SubscriberEvent>,
    counters: Arc<SubscriberCounters>,
}

impl Sink {
    /// Waits (up to 20 s) until `pred` holds for an event; returns every event up to it.
    async fn until(
        &mut self,
        what: &str,
        pred: impl Fn(&SubscriberEvent) -> bool,
    ) -> Vec<SubscriberEvent> {
        let mut got = Vec::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(20), self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {:?}", self.seen))
                .expect("subscriber alive");
            self.seen.push(ev.clone());
            let done = pred(&ev);
            got.push(ev);
            if done {
                return got;
            }
        }
    }

    async fn batch(&mut self, seq: u64) {
        self.until(&format!("batch {seq}"), |e| is_batch(e, seq))
            .await;
    }

    /// Waits for batch `seq` unless it was already seen.
    async fn have_batch(&mut self, seq: u64) {
        if !self.seen.iter().any(|e| is_batch(e, seq)) {
            self.batch(seq).await;
        }
    }

    async fn repaired_gap(&mut self) {
        self.until("repaired gap", |e| {
            matches!(
                e,
                SubscriberEvent::Delivery(Delivery::Gap { repaired: true, .. })
            )
        })
        .await;
    }

    async fn live(&mut self) {
        self.until("Live", |e| {
            *e == SubscriberEvent::State(SubscriberState::Live)
        })
        .await;
    }

    fn batches(&self) -> Vec<u64> {
        self.seen
            .iter()
            .filter_map(|e| match e {
                SubscriberEvent::Delivery(Delivery::Batch(s, b)) => {
                    assert_eq!(b.ts, *s as f64, "batch {s} carries its payload");
                    Some(*s)
                }
                _ => None,
            })
            .collect()
    }

    fn gaps(&self) -> Vec<(u64, u64, bool)> {
        self.seen
            .iter()
            .filter_map(|e| match e {
                SubscriberEvent::Delivery(Delivery::Gap { from, to, repaired }) => {
                    Some((*from, *to, *repaired))
                }
                _ => None,
            })
            .collect()
    }
}

/// The old engine's batches `0..old`, `Restarted { last: old - 1 }`, then the new engine's
/// batches `0..new` (live or replayed), in order.
fn assert_restarted(s: &Sink, old: u64, new: u64) {
    assert!(
        s.seen.iter().any(|e| matches!(
            e,
            SubscriberEvent::Delivery(Delivery::Restarted { last, .. }) if *last == old - 1
        )),
        "{:?}",
        s.seen
    );
    let want: Vec<u64> = (0..old).chain(0..new).collect();
    assert_eq!(s.batches(), want);
}

fn is_batch(e: &SubscriberEvent, seq: u64) -> bool {
    matches!(e, SubscriberEvent::Delivery(Delivery::Batch(s, _)) if *s == seq)
}

fn subscribe(hub: &Hub, p: &Publisher, replay: bool) -> Sink {
    let mut cfg = SubscriberConfig::new("test", p.endpoint());
    if replay {
        cfg = cfg.replay(p.replay_endpoint());
    }
    cfg.replay_timeout = Duration::from_secs(5);
    sink_for(hub, cfg)
}

fn sink_for(hub: &Hub, cfg: SubscriberConfig) -> Sink {
    let (tx, rx) = mpsc::channel(1024);
    let counters = hub.subscribe(cfg, tx).counters;
    Sink {
        rx,
        seen: Vec::new(),
        counters,
    }
}

/// Publishes seqs from `seq` on until one arrives: ZeroMQ has no acknowledgement of a
/// subscription, so only a received message proves the PUB now sends to this SUB (later
/// messages then arrive in order). Waits for the last seq it published, then returns the next.
async fn prime(p: &mut Publisher, s: &mut Sink, mut seq: u64) -> u64 {
    let start = s.seen.len();
    loop {
        p.send(seq, &payload(seq));
        seq += 1;
        let got = tokio::time::timeout(Duration::from_millis(200), s.rx.recv()).await;
        if let Ok(Some(ev)) = got {
            let done = matches!(ev, SubscriberEvent::Delivery(Delivery::Batch(..)));
            s.seen.push(ev);
            if done {
                // Another event than a batch (a state change) may have come first and made
                // this loop publish again: those seqs are on their way too. (Only what came
                // since this call counts: a restarted engine repeats seqs.)
                let last = seq - 1;
                if !s.seen[start..].iter().any(|e| is_batch(e, last)) {
                    s.batch(last).await;
                }
                return seq;
            }
        }
        assert!(seq < 100, "no message arrived: {:?}", s.seen);
    }
}

#[tokio::test]
async fn skipped_range_is_repaired_from_replay() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut s = subscribe(&hub, &p, true);
    s.live().await; // connected; the first replay found an empty buffer
    let n = prime(&mut p, &mut s, 0).await;
    p.skip(n, &payload(n)); // lost on the wire, kept in the replay buffer
    p.skip(n + 1, &payload(n + 1));
    p.send(n + 2, &payload(n + 2));
    s.repaired_gap().await;
    p.send(n + 3, &payload(n + 3));
    s.batch(n + 3).await;
    assert_eq!(s.batches(), (0..n + 4).collect::<Vec<u64>>());
    assert!(s.gaps().contains(&(n, n + 1, true)), "{:?}", s.gaps());
    assert!(s.gaps().iter().all(|g| g.2), "nothing lost: {:?}", s.gaps());
    assert!(p.replays.contains(&n), "replayed from {n}: {:?}", p.replays);
    let c = &s.counters;
    assert_eq!(c.batches.load(Relaxed), n + 4);
    assert_eq!(c.gaps_repaired.load(Relaxed), 1);
    assert_eq!(c.batches_lost.load(Relaxed), 0);
    assert_eq!(c.next_seq.load(Relaxed), n + 4);
    assert!(
        c.replays_requested.load(Relaxed) >= 2,
        "on connect and for the gap"
    );
    assert_eq!(c.state(), SubscriberState::Live);
}

/// A batch published after the replay at the connect but before the SUB's subscription
/// reached the PUB reaches no one live; with the engine quiet afterwards no later batch shows
/// the gap. The replay a while after the connect catches it up.
#[tokio::test]
async fn a_batch_missed_right_after_the_connect_is_caught_up_while_the_engine_is_quiet() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut cfg = SubscriberConfig::new("catch-up", p.endpoint()).replay(p.replay_endpoint());
    // Wide enough that the batch below is surely published before it ends.
    cfg.catch_up_after = Duration::from_secs(2);
    let mut s = sink_for(&hub, cfg);
    s.live().await; // connected; the replay at the connect found an empty buffer
    p.skip(0, &payload(0)); // lost on the wire (as in that window), kept for replay
    s.batch(0).await;
    assert_eq!(s.batches(), vec![0]);
    assert!(s.gaps().is_empty(), "{:?}", s.gaps());
    assert_eq!(
        s.counters.replays_requested.load(Relaxed),
        2,
        "connect, catch-up"
    );
    // A live batch then comes in order: no gap, no further replay.
    p.send(1, &payload(1));
    s.batch(1).await;
    assert_eq!(p.replays, vec![0, 0], "both from 0");
    assert_eq!(s.counters.replays_requested.load(Relaxed), 2);
    assert_eq!(s.counters.state(), SubscriberState::Live);
}

#[tokio::test]
async fn range_older_than_the_buffer_is_reported_unrepaired() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&["--buffer", "3"]);
    let mut s = subscribe(&hub, &p, true);
    s.live().await;
    let n = prime(&mut p, &mut s, 0).await;
    for q in n..n + 5 {
        p.skip(q, &payload(q));
    }
    p.send(n + 5, &payload(n + 5));
    s.batch(n + 5).await;
    // The buffer (3 batches) holds only n+3..=n+5 when the replay from n is asked.
    let got = s.batches();
    assert_eq!(&got[got.len() - 3..], &[n + 3, n + 4, n + 5]);
    assert!(!got.contains(&n) && !got.contains(&(n + 2)));
    assert!(s.gaps().contains(&(n, n + 2, false)), "{:?}", s.gaps());
}

#[tokio::test]
async fn late_subscriber_learns_the_buffer_from_replay() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&["--replay-topic"]);
    for q in 0..3 {
        p.send(q, &payload(q)); // nobody listens yet
    }
    let mut s = subscribe(&hub, &p, true);
    s.live().await;
    // The replay on connect delivered 0..=2 before Live.
    assert_eq!(s.batches(), vec![0, 1, 2]);
    let n = prime(&mut p, &mut s, 3).await;
    assert_eq!(s.batches(), (0..n).collect::<Vec<u64>>());
    assert!(s.gaps().iter().all(|g| g.2), "{:?}", s.gaps());
}

#[tokio::test]
async fn publisher_restarted_on_the_same_port_is_reconnected_and_reported() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut s = subscribe(&hub, &p, true);
    s.live().await;
    let n = prime(&mut p, &mut s, 0).await;
    p.cmd(r#"{"op":"restart"}"#);
    s.until("Disconnected", |e| *e == SubscriberEvent::Disconnected)
        .await;
    s.until("Connected again", |e| *e == SubscriberEvent::Connected)
        .await;
    s.live().await;
    // The new engine counts from 0 again.
    let m = prime(&mut p, &mut s, 0).await;
    p.send(m, &payload(m));
    s.batch(m).await;
    assert_restarted(&s, n, m + 1);
}

#[tokio::test]
async fn malformed_frames_are_counted_and_skipped() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut s = subscribe(&hub, &p, false);
    s.until("Live", |e| {
        *e == SubscriberEvent::State(SubscriberState::Live)
    })
    .await;
    let n = prime(&mut p, &mut s, 0).await;
    p.raw(&[b"kv-events", &[0u8; 7], &payload(n)]); // 7-byte seq
    p.raw(&[b"kv-events", &n.to_be_bytes()]); // two frames
    p.raw(&[b"kv-events", &n.to_be_bytes(), b"\xc1 not msgpack"]); // garbage payload
    p.send(n + 1, &payload(n + 1));
    s.batch(n + 1).await;
    let bad: Vec<&FrameError> = s
        .seen
        .iter()
        .filter_map(|e| match e {
            SubscriberEvent::BadFrame(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(bad.len(), 2, "{:?}", s.seen);
    assert_eq!(*bad[0], FrameError::SeqLength(7));
    assert!(matches!(bad[1], FrameError::FrameCount { got: 2, .. }));
    assert!(s.seen.iter().any(
        |e| matches!(e, SubscriberEvent::Delivery(Delivery::Malformed { seq, .. }) if *seq == n)
    ));
    let got = s.batches();
    assert_eq!(got.last(), Some(&(n + 1)), "the subscriber kept going");
    assert!(!got.contains(&n), "the garbage batch is skipped");
    assert_eq!(s.counters.bad_frames.load(Relaxed), 2);
    assert_eq!(s.counters.malformed.load(Relaxed), 1);
}

/// A peer that sends seq u64::MAX, live or in a replay, must not take down the poller thread
/// that serves every pod (`seq + 1` overflows) nor wrap the expected seq: the frame is refused,
/// counted, and the subscriber goes on, losing nothing real.
#[tokio::test]
async fn a_batch_under_seq_u64_max_live_or_replayed_is_a_counted_bad_frame() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut s = subscribe(&hub, &p, true);
    s.live().await;
    let n = prime(&mut p, &mut s, 0).await;
    let max = u64::MAX.to_be_bytes();
    p.raw(&[b"kv-events", &max, &payload(n)]);
    // Replayed: the buffer holds n (lost live) and a batch under u64::MAX; n + 1 asks for it.
    p.skip(n, &payload(n));
    p.skip(u64::MAX, &payload(n));
    p.send(n + 1, &payload(n + 1));
    s.repaired_gap().await;
    p.send(n + 2, &payload(n + 2));
    s.batch(n + 2).await;
    let bad: Vec<&FrameError> = s
        .seen
        .iter()
        .filter_map(|e| match e {
            SubscriberEvent::BadFrame(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(bad, [&FrameError::ReservedSeq; 2], "{:?}", s.seen);
    assert_eq!(s.batches(), (0..n + 3).collect::<Vec<u64>>());
    assert!(s.gaps().iter().all(|g| g.2), "nothing lost: {:?}", s.gaps());
    let c = &s.counters;
    assert_eq!(c.bad_frames.load(Relaxed), 2);
    assert_eq!(c.batches_lost.load(Relaxed), 0);
    assert_eq!(c.next_seq.load(Relaxed), n + 3);
}

/// A peer can claim gaps of ~2^64 batches again and again (seq u64::MAX - 1, then a restart
/// at 0, then u64::MAX - 1 again): the lost-batches counter saturates, it never wraps (a
/// Prometheus counter that goes back reads as a reset).
#[tokio::test]
async fn huge_gaps_saturate_the_lost_batches_counter() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut s = subscribe(&hub, &p, false);
    s.live().await;
    let n = prime(&mut p, &mut s, 0).await;
    // Seqs published before the subscription was through count as lost: count from here.
    let lost = s.counters.batches_lost.load(Relaxed);
    let top = u64::MAX - 1;
    p.send(top, &payload(n));
    s.batch(top).await;
    assert_eq!(s.counters.batches_lost.load(Relaxed), lost + (top - n));
    p.send(0, &payload(n)); // a restart
    s.batch(0).await;
    p.send(top, &payload(n));
    s.batch(top).await;
    assert!(s.gaps().contains(&(1, top - 1, false)), "{:?}", s.gaps());
    assert_eq!(s.counters.batches_lost.load(Relaxed), u64::MAX);
    assert_eq!(s.counters.next_seq.load(Relaxed), u64::MAX);
}

#[tokio::test]
async fn a_pod_not_up_yet_neither_blocks_nor_fails_and_is_joined_when_it_comes() {
    let hub = Hub::start().expect("hub");
    let (pub_port, replay_port) = (support::free_port(), support::free_port());
    let cfg = SubscriberConfig::new("early", format!("tcp://127.0.0.1:{pub_port}"))
        .replay(format!("tcp://127.0.0.1:{replay_port}"));
    // Returns at once: nothing listens on those ports yet.
    let mut s = sink_for(&hub, cfg);
    s.until("Connecting", |e| {
        *e == SubscriberEvent::State(SubscriberState::Connecting)
    })
    .await;
    let (pp, rp) = (pub_port.to_string(), replay_port.to_string());
    let mut p = Publisher::start(&["--ports", &pp, &rp]);
    s.live().await;
    let n = prime(&mut p, &mut s, 0).await;
    assert_eq!(s.batches(), (0..n).collect::<Vec<u64>>());
}

#[tokio::test]
async fn publisher_killed_and_restarted_on_the_same_ports_is_rejoined() {
    let hub = Hub::start().expect("hub");
    let p = Publisher::start(&[]);
    let ports = (p.pub_port.to_string(), p.replay_port.to_string());
    let mut s = subscribe(&hub, &p, true);
    s.live().await;
    let mut p = p;
    let n = prime(&mut p, &mut s, 0).await;
    p.kill();
    s.until("Disconnected", |e| *e == SubscriberEvent::Disconnected)
        .await;
    let mut p = Publisher::start(&["--ports", &ports.0, &ports.1]);
    s.until("Connected again", |e| *e == SubscriberEvent::Connected)
        .await;
    s.live().await;
    let m = prime(&mut p, &mut s, 0).await;
    // Seqs the new engine sent before the subscription got through come back by replay.
    s.have_batch(m - 1).await;
    assert_restarted(&s, n, m);
}

#[tokio::test]
async fn a_publisher_that_stops_answering_is_detected_by_heartbeats() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut cfg = SubscriberConfig::new("hb", p.endpoint());
    cfg.heartbeat = Duration::from_millis(100);
    let mut s = sink_for(&hub, cfg);
    s.live().await;
    prime(&mut p, &mut s, 0).await;
    // Frozen, not closed: the TCP connection stays up, only heartbeats can tell.
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &p.pid().to_string()])
        .status()
        .expect("kill");
    assert!(stop.success());
    s.until("Disconnected", |e| *e == SubscriberEvent::Disconnected)
        .await;
    let cont = std::process::Command::new("kill")
        .args(["-CONT", &p.pid().to_string()])
        .status()
        .expect("kill");
    assert!(cont.success());
    s.until("Connected again", |e| *e == SubscriberEvent::Connected)
        .await;
}

#[tokio::test]
async fn batches_of_another_data_parallel_rank_are_refused() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut cfg = SubscriberConfig::new("rank1", p.endpoint());
    cfg.dp_rank = Some(1); // the test payloads carry rank 0
    let mut s = sink_for(&hub, cfg);
    s.live().await;
    let mut seq = 0;
    loop {
        p.send(seq, &payload(seq));
        seq += 1;
        let got = tokio::time::timeout(Duration::from_millis(200), s.rx.recv()).await;
        if let Ok(Some(ev)) = got {
            s.seen.push(ev.clone());
            // Before it may come a gap for what the slow join lost (no replay socket here).
            if let SubscriberEvent::RankMismatch { seq: q, got } = ev {
                assert!(q < seq && got == 0, "seq {q} carried rank {got}");
                break;
            }
        }
        assert!(seq < 100, "nothing arrived: {:?}", s.seen);
    }
    assert!(s.batches().is_empty());
}

/// Many publishers at once, each sending more than two read bursts while its sink holds far
/// fewer (the poller stops reading a SUB whose sink is full and comes back when it drains):
/// every subscriber gets every batch, in order, with no gap. What the epoll-driven poller must
/// not do is miss a socket: libzmq's `ZMQ_FD` signals only a change, so a socket left with
/// messages unread must be read again without one.
#[tokio::test]
async fn many_publishers_bursting_into_small_sinks_lose_nothing() {
    const PUBS: usize = 24;
    const BURST: u64 = 600;
    let ctx = zmq::Context::new();
    let hub = Hub::start().expect("hub");
    let mut pubs = Vec::new();
    let mut sinks = Vec::new();
    for i in 0..PUBS {
        let p = ctx.socket(zmq::PUB).expect("PUB");
        p.bind("tcp://127.0.0.1:*").expect("bind");
        let ep = p
            .get_last_endpoint()
            .expect("endpoint")
            .expect("utf-8 endpoint");
        let (tx, rx) = mpsc::channel(64);
        let counters = hub
            .subscribe(SubscriberConfig::new(format!("pub-{i}"), ep), tx)
            .counters;
        pubs.push(p);
        sinks.push(Sink {
            rx,
            seen: Vec::new(),
            counters,
        });
    }
    let send = |p: &zmq::Socket, seq: u64| {
        p.send_multipart([&b""[..], &seq.to_be_bytes(), &payload(seq)], 0)
            .expect("send");
    };
    // Publish to every publisher that has not reached its subscriber yet until each has (a
    // subscription reaches a PUB a moment after connecting); `next` is then its next seq.
    let mut next = [0u64; PUBS];
    let mut primed = [false; PUBS];
    while primed.iter().any(|p| !p) {
        for i in (0..PUBS).filter(|&i| !primed[i]) {
            send(&pubs[i], next[i]);
            next[i] += 1;
        }
        for i in 0..PUBS {
            if primed[i] {
                continue;
            }
            if let Ok(Some(ev)) =
                tokio::time::timeout(Duration::from_millis(50), sinks[i].rx.recv()).await
            {
                primed[i] |= matches!(ev, SubscriberEvent::Delivery(Delivery::Batch(..)));
                sinks[i].seen.push(ev);
            }
        }
        assert!(next.iter().all(|&n| n < 200), "never reached: {primed:?}");
    }
    // Interleaved bursts, then every subscriber drained one after another (the others' sinks
    // stay full meanwhile).
    for k in 0..BURST {
        for (i, p) in pubs.iter().enumerate() {
            send(p, next[i] + k);
        }
    }
    for (i, s) in sinks.iter_mut().enumerate() {
        let last = next[i] + BURST - 1;
        s.batch(last).await;
        let got = s.batches();
        let first = got[0];
        assert_eq!(
            got,
            (first..=last).collect::<Vec<u64>>(),
            "subscriber {i}: every batch, in order"
        );
        // (Seqs published before the subscription reached the PUB are a gap at the start.)
        let lost_priming = s.counters.batches_lost.load(Relaxed);
        assert!(
            s.gaps().iter().all(|g| g.1 < next[i] - 1),
            "subscriber {i}: no gap in the bursts: {:?}",
            s.gaps()
        );
        assert!(lost_priming < next[i], "subscriber {i}");
    }
}

/// A direct sink: a function the poller thread calls for each event. This one records the
/// thread it runs on and forwards to a channel the test reads; it owns `guard`, whose drop the
/// test awaits.
fn direct_sink_for(
    hub: &Hub,
    cfg: SubscriberConfig,
    panic_on_batch: bool,
) -> (
    Sink,
    kv_subscriber::SubscriptionId,
    oneshot::Receiver<()>,
    Arc<AtomicBool>,
) {
    let (tx, rx) = mpsc::channel(1024);
    let (guard, dropped) = oneshot::channel::<()>();
    let off_thread = Arc::new(AtomicBool::new(false));
    let off = off_thread.clone();
    let f = move |ev: SubscriberEvent| {
        let _owned = &guard;
        if std::thread::current().name() != Some("kv-events-poller") {
            off.store(true, Relaxed);
        }
        if panic_on_batch && matches!(ev, SubscriberEvent::Delivery(Delivery::Batch(..))) {
            panic!("a consumer bug");
        }
        match tx.try_send(ev) {
            Err(mpsc::error::TrySendError::Full(_)) => {
                panic!("the test reads as fast as it publishes")
            }
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {} // the test has ended
        }
    };
    let s = hub.subscribe(cfg, kv_subscriber::Sink::Direct(Box::new(f)));
    let sink = Sink {
        rx,
        seen: Vec::new(),
        counters: s.counters,
    };
    (sink, s.id, dropped, off_thread)
}

/// Events reach a direct sink on the poller thread, in order and with a gap repaired as for a
/// channel; after `unsubscribe` it gets `State(Stopped)` last and is then dropped (so a
/// consumer that awaits the drop knows nothing more will come).
#[tokio::test]
async fn a_direct_sink_is_called_on_the_poller_thread_in_order_then_dropped_on_unsubscribe() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let cfg = SubscriberConfig::new("direct", p.endpoint()).replay(p.replay_endpoint());
    let (mut s, id, dropped, off_thread) = direct_sink_for(&hub, cfg, false);
    s.live().await;
    let n = prime(&mut p, &mut s, 0).await;
    p.skip(n, &payload(n)); // lost on the wire, kept in the replay buffer
    p.send(n + 1, &payload(n + 1));
    s.repaired_gap().await;
    p.send(n + 2, &payload(n + 2));
    s.have_batch(n + 2).await;
    assert_eq!(s.batches(), (0..n + 3).collect::<Vec<_>>());
    assert_eq!(s.gaps(), vec![(n, n, true)]);
    hub.unsubscribe(id);
    s.until("Stopped", |e| {
        *e == SubscriberEvent::State(SubscriberState::Stopped)
    })
    .await;
    tokio::time::timeout(Duration::from_secs(20), dropped)
        .await
        .expect("the sink is dropped after Stopped")
        .expect_err("dropped, never sent on");
    assert!(s.rx.recv().await.is_none(), "nothing after Stopped");
    assert!(!off_thread.load(Relaxed), "called off the poller thread");
    subscriptions_become(&hub, 0).await;
}

async fn subscriptions_become(hub: &Hub, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while hub.subscriptions() != n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} subscriptions, not {n}",
            hub.subscriptions()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A direct sink that panics loses its own subscription (and is dropped); the poller thread
/// and the hub's other subscribers go on.
#[tokio::test]
async fn a_panicking_direct_sink_stops_only_its_own_subscription() {
    let hub = Hub::start().expect("hub");
    let mut bad_pub = Publisher::start(&[]);
    let mut good_pub = Publisher::start(&[]);
    let (_bad, _, mut bad_dropped, _) = direct_sink_for(
        &hub,
        SubscriberConfig::new("panics", bad_pub.endpoint()),
        true,
    );
    let (mut good, _, _good_dropped, _) = direct_sink_for(
        &hub,
        SubscriberConfig::new("good", good_pub.endpoint()),
        false,
    );
    let mut next = prime(&mut good_pub, &mut good, 0).await;
    // Publish until the panicking sink has met a batch (its SUB joins at some point).
    let mut seq = 0;
    loop {
        bad_pub.send(seq, &payload(seq));
        seq += 1;
        match tokio::time::timeout(Duration::from_millis(100), &mut bad_dropped).await {
            Ok(r) => {
                r.expect_err("dropped, never sent on");
                break;
            }
            Err(_) => assert!(seq < 200, "the panicking sink never got a batch"),
        }
    }
    subscriptions_become(&hub, 1).await;
    for _ in 0..3 {
        good_pub.send(next, &payload(next));
        next += 1;
    }
    good.have_batch(next - 1).await;
    // From the batch that proved the subscription on (those before it met no SUB yet).
    let got = good.batches();
    assert_eq!(got, (got[0]..next).collect::<Vec<_>>());
}

/// A frame over `max_message_bytes` is refused by libzmq, which drops the connection: the
/// batch is never delivered, the drop is counted, the loss is reported as an unrepaired gap
/// (the replay buffer's copy is over the cap too), and later batches flow again.
#[tokio::test]
async fn a_message_over_the_size_cap_is_refused_and_later_ones_flow() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut cfg = SubscriberConfig::new("cap", p.endpoint()).replay(p.replay_endpoint());
    cfg.max_message_bytes = 64 << 10;
    cfg.replay_timeout = Duration::from_secs(1);
    let mut s = sink_for(&hub, cfg);
    s.live().await;
    let n = prime(&mut p, &mut s, 0).await;
    let big = encode(
        &EventBatch {
            ts: n as f64,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: (0..1000).map(BlockHash::Uint).collect(),
                token_ids: vec![100_000; 64 * 1000],
                block_size: 64,
                ..Default::default()
            })],
            data_parallel_rank: Some(0),
        },
        &WireFormat::VLLM_0_33,
    );
    assert!(big.len() > 4 * (64 << 10), "{} bytes", big.len());
    p.send(n, &big);
    let mut seq = n + 1;
    'flowing: loop {
        p.send(seq, &payload(seq));
        seq += 1;
        while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), s.rx.recv()).await
        {
            let later = matches!(&ev, SubscriberEvent::Delivery(Delivery::Batch(q, _)) if *q > n);
            s.seen.push(ev);
            if later {
                break 'flowing;
            }
        }
        assert!(seq < n + 200, "no later batch arrived: {:?}", s.seen);
    }
    assert!(
        !s.batches().contains(&n),
        "the oversized batch was delivered: {:?}",
        s.batches()
    );
    assert!(
        s.gaps()
            .iter()
            .any(|&(from, to, repaired)| from <= n && n <= to && !repaired),
        "its loss reported: {:?}",
        s.gaps()
    );
    assert!(
        s.counters.disconnects.load(Relaxed) >= 1,
        "the drop counted"
    );
    assert!(
        s.counters.connections_refused.load(Relaxed) >= 1,
        "the refusal counted"
    );
    // The replay socket works again: a batch lost on the wire is repaired from the buffer.
    p.skip(seq, &payload(seq));
    p.send(seq + 1, &payload(seq + 1));
    // (The replayed batches come before the gap's report.)
    s.repaired_gap().await;
    let b = s.batches();
    assert!(b.contains(&seq) && b.contains(&(seq + 1)), "{b:?}");
}
