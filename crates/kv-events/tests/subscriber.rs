//! The subscriber against real libzmq peers: a vLLM-like publisher (pyzmq PUB + ROUTER) that
//! the test drives to skip, repeat and restart sequences and to send malformed frames.

mod support;

use kv_events::{
    encode, BlockHash, BlockStored, Delivery, Event, EventBatch, FrameError, Hub, SubscriberConfig,
    SubscriberEvent, SubscriberState, WireFormat,
};
use std::time::Duration;
use support::Publisher;
use tokio::sync::mpsc;

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

fn is_batch(e: &SubscriberEvent, seq: u64) -> bool {
    matches!(e, SubscriberEvent::Delivery(Delivery::Batch(s, _)) if *s == seq)
}

fn subscribe(hub: &Hub, p: &Publisher, replay: bool) -> Sink {
    let (tx, rx) = mpsc::channel(1024);
    let mut cfg = SubscriberConfig::new("test", p.endpoint());
    if replay {
        cfg = cfg.replay(p.replay_endpoint());
    }
    cfg.replay_timeout = Duration::from_secs(5);
    hub.subscribe(cfg, tx);
    Sink {
        rx,
        seen: Vec::new(),
    }
}

#[tokio::test]
async fn skipped_range_is_repaired_from_replay() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut s = subscribe(&hub, &p, true);
    s.live().await; // connected; the first replay found an empty buffer
    p.send(0, &payload(0));
    p.send(1, &payload(1));
    s.batch(1).await;
    p.skip(2, &payload(2)); // lost on the wire, kept in the replay buffer
    p.skip(3, &payload(3));
    p.send(4, &payload(4));
    s.until("repaired gap", |e| {
        matches!(
            e,
            SubscriberEvent::Delivery(Delivery::Gap { repaired: true, .. })
        )
    })
    .await;
    p.send(5, &payload(5));
    s.batch(5).await;
    assert_eq!(s.batches(), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(s.gaps(), vec![(2, 3, true)]);
    assert!(p.replays.contains(&2), "replayed from 2: {:?}", p.replays);
}

#[tokio::test]
async fn range_older_than_the_buffer_is_reported_unrepaired() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&["--buffer", "3"]);
    let mut s = subscribe(&hub, &p, true);
    s.live().await;
    p.send(0, &payload(0));
    s.batch(0).await;
    for q in 1..=5 {
        p.skip(q, &payload(q));
    }
    p.send(6, &payload(6));
    s.batch(6).await;
    assert_eq!(s.batches(), vec![0, 4, 5, 6]);
    assert_eq!(s.gaps(), vec![(1, 3, false)]);
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
    p.send(3, &payload(3));
    s.batch(3).await;
    assert_eq!(s.batches(), vec![0, 1, 2, 3]);
    assert!(s.gaps().is_empty(), "{:?}", s.gaps());
}

#[tokio::test]
async fn publisher_restarted_on_the_same_port_is_reconnected_and_reported() {
    let hub = Hub::start().expect("hub");
    let mut p = Publisher::start(&[]);
    let mut s = subscribe(&hub, &p, true);
    s.live().await;
    for q in 0..5 {
        p.send(q, &payload(q));
    }
    s.batch(4).await;
    p.cmd(r#"{"op":"restart"}"#);
    s.until("Disconnected", |e| *e == SubscriberEvent::Disconnected)
        .await;
    s.until("Connected again", |e| *e == SubscriberEvent::Connected)
        .await;
    s.live().await;
    p.send(0, &payload(0));
    p.send(1, &payload(1));
    let got = s
        .until("batch 1 of the new engine", |e| is_batch(e, 1))
        .await;
    assert!(
        got.iter().any(|e| matches!(
            e,
            SubscriberEvent::Delivery(Delivery::Restarted { last: 4, .. })
        )),
        "{got:?}"
    );
    assert_eq!(s.batches(), vec![0, 1, 2, 3, 4, 0, 1]);
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
    p.send(0, &payload(0));
    s.batch(0).await;
    p.raw(&[b"kv-events", &[0u8; 7], &payload(1)]); // 7-byte seq
    p.raw(&[b"kv-events", &1u64.to_be_bytes()]); // two frames
    p.raw(&[b"kv-events", &1u64.to_be_bytes(), b"\xc1 not msgpack"]); // garbage payload
    p.send(2, &payload(2));
    s.batch(2).await;
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
    assert!(s.seen.iter().any(|e| matches!(
        e,
        SubscriberEvent::Delivery(Delivery::Malformed { seq: 1, .. })
    )));
    assert_eq!(s.batches(), vec![0, 2]);
}
