//! Sustained receive + decode from a local publisher: blocks/s and the subscriber process's
//! CPU seconds per million blocks. The publisher (real libzmq PUB over loopback TCP) runs in a
//! child process (this same binary), so the CPU figure is the subscriber side only: the poller
//! thread, libzmq's I/O thread and the consumer.
//!
//! `cargo bench -p kv-subscriber --bench receive` (env: RECEIVE_BATCHES, default 20000 batches of
//! 128 blocks × 16 tokens)

use kv_events::{encode, BlockHash, BlockStored, Event, EventBatch, Medium, WireFormat};
use kv_subscriber::{Delivery, Hub, SubscriberConfig, SubscriberEvent};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BLOCKS: usize = 128;

fn payload(seq: u64) -> Vec<u8> {
    let b = EventBatch {
        ts: seq as f64,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: (0..BLOCKS as u64)
                .map(|i| BlockHash::Uint(seq << 8 | i))
                .collect(),
            parent_block_hash: Some(BlockHash::Uint(seq)),
            token_ids: (0..BLOCKS * 16)
                .map(|i| (i as u32 * 7919 + seq as u32) % 128_000)
                .collect(),
            block_size: 16,
            medium: Some(Medium::Gpu),
            ..Default::default()
        })],
        data_parallel_rank: Some(0),
    };
    encode(&b, &WireFormat::VLLM_0_33)
}

/// Publisher mode: bind, print the port, then on each "N" line send the next N batches.
fn publisher() {
    let ctx = zmq::Context::new();
    let pubsock = ctx.socket(zmq::PUB).expect("pub");
    pubsock.set_sndhwm(1_000_000).expect("hwm");
    pubsock.bind("tcp://127.0.0.1:*").expect("bind");
    let ep = pubsock
        .get_last_endpoint()
        .expect("endpoint")
        .expect("utf-8");
    println!("{}", ep.rsplit(':').next().unwrap_or("0"));
    std::io::stdout().flush().expect("flush");
    let payloads: Vec<Vec<u8>> = (0..64).map(payload).collect();
    let mut seq = 0u64;
    for line in std::io::stdin().lock().lines() {
        let Ok(n) = line.expect("line").trim().parse::<u64>() else {
            break;
        };
        for _ in 0..n {
            let p = &payloads[(seq % 64) as usize];
            pubsock
                .send_multipart([&b"kv-events"[..], &seq.to_be_bytes(), p], 0)
                .expect("send");
            seq += 1;
        }
        println!("sent {seq}");
        std::io::stdout().flush().expect("flush");
    }
}

/// utime + stime of this process, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is 0, utime 11, stime 12; 100 ticks per second.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    if std::env::var_os("RECEIVE_PUBLISHER").is_some() {
        publisher();
        return;
    }
    let n: u64 = std::env::var("RECEIVE_BATCHES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .env("RECEIVE_PUBLISHER", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("publisher");
    let mut to_pub = child.stdin.take().expect("stdin");
    let mut from_pub = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    from_pub.read_line(&mut line).expect("port");
    let port: u16 = line.trim().parse().expect("port number");

    let hub = Hub::start().expect("hub");
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    hub.subscribe(
        SubscriberConfig::new("bench", format!("tcp://127.0.0.1:{port}")),
        tx,
    );
    // Warm up until a batch arrives (the subscription has reached the publisher).
    let mut last = None;
    while last.is_none() {
        writeln!(to_pub, "1").expect("cmd");
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline && last.is_none() {
            if let Ok(SubscriberEvent::Delivery(Delivery::Batch(s, _))) = rx.try_recv() {
                last = Some(s);
            } else {
                std::thread::yield_now();
            }
        }
    }
    let first = last.unwrap_or(0) + 1;
    let (t0, c0) = (Instant::now(), cpu_seconds());
    writeln!(to_pub, "{n}").expect("cmd");
    let (mut batches, mut blocks, mut lost) = (0u64, 0u64, 0u64);
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            SubscriberEvent::Delivery(Delivery::Batch(s, b)) => {
                batches += 1;
                blocks += b.block_count() as u64;
                if s + 1 >= first + n {
                    break;
                }
            }
            SubscriberEvent::Delivery(Delivery::Gap { from, to, .. }) => {
                lost += to - from + 1;
                if to + 1 >= first + n {
                    break;
                }
            }
            _ => {}
        }
    }
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    println!(
        "received {batches} batches ({blocks} blocks, {lost} batches lost) in {wall:.2}s: {:.2} M blocks/s, {:.0} batches/s; subscriber CPU {cpu:.2}s = {:.3} CPU s per million blocks",
        blocks as f64 / wall / 1e6,
        batches as f64 / wall,
        cpu / (blocks as f64 / 1e6)
    );
    drop(to_pub);
    let _ = child.wait();
    hub.shutdown();
}
