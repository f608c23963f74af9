//! Replicas share their in-flight load. Each replica knows its own requests on each pod
//! exactly (guards, see [`super`]) but another replica's only through the engines' `/metrics`,
//! which count requests, not the prompt tokens still to prefill, and lag a scrape interval. Two
//! replicas then send bursts to the same engine, each blind to the other's. So every replica
//! answers `GET /v1/load` with what it holds in flight per pod, and reads its peers' every
//! `--peer-interval-ms`: the choice adds the peers' in-flight requests and uncached tokens to
//! its own (a peer's reading older than three intervals is left out).
//!
//! ```text
//!  --peers kvsync-peers.ns.svc:8090 ─ resolve (a headless Service: every replica's IP) ─▶ GET /v1/load
//!     ─▶ {"instance": id, "pods": [{"pod", "in_flight", "prefill_tokens"}]}   (own id: skipped)
//!     ─▶ summed per pod over the peers ─▶ PodLoad::set_peers ─▶ LoadView.peer_*
//! ```
//!
//! Each routing decision is also pushed to the peers at once (`POST /v1/peers/routed`, batched,
//! from a bounded queue: dropped and counted when the peers cannot keep up), so a peer counts
//! the prompt's blocks as on their way to the chosen pod, as the replica that chose does,
//! until the pod's KV events announce them (`--routed-ttl-ms`): without it, two replicas send
//! the first requests of a new shared prefix to two pods and both prefill it.
//!
//! Dynamo's kv-router shares the same things between router replicas (active sequences and
//! their blocks, over its event plane); here it is the HTTP API every replica already serves,
//! so a deployment needs nothing but a headless Service.

use super::LoadTable;
use crate::proxy::upstream::HttpClient;
use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Most peer addresses read per round (all names' addresses together).
pub const MAX_PEERS: usize = 64;
/// Decisions queued for the peers; more are dropped (counted).
pub const SHARE_QUEUE: usize = 4096;
/// Most decisions in one push (and accepted in one).
pub const MAX_DECISIONS_PER_PUSH: usize = 256;
/// Most blocks of one shared decision (a longer prompt shares its first blocks: 8192 blocks
/// are 128k tokens at block size 16).
pub const MAX_SHARED_BLOCKS: usize = 8192;
/// Most blocks in one push, all decisions together: at most ~21 bytes each in JSON, so a push
/// stays near 1.4 MB, well under the receiver's 4 MiB body limit.
pub const MAX_BLOCKS_PER_PUSH: usize = 65_536;
/// Largest `/v1/load` answer read (one line per pod with load: ~80 bytes each).
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Most pods taken from one peer's answer.
const MAX_PODS_PER_PEER: usize = 8192;

/// This replica's `/v1/load` answer: its instance id and, per pod with requests in flight, the
/// requests and their uncached prompt tokens not yet prefilled.
pub fn answer(table: &LoadTable) -> Value {
    let pods: Vec<Value> = table
        .all()
        .iter()
        .filter(|p| p.in_flight() > 0 || p.prefill_tokens() > 0)
        .map(|p| {
            json!({
                "pod": p.key,
                "in_flight": p.in_flight(),
                "prefill_tokens": p.prefill_tokens(),
            })
        })
        .collect();
    json!({"instance": format!("{:016x}", table.instance()), "pods": pods})
}

/// One peer's answer: `None` when it is this replica's own (same instance) or malformed.
pub fn parse(own: u64, v: &Value) -> Option<HashMap<String, (u64, u64)>> {
    let instance = u64::from_str_radix(v["instance"].as_str()?, 16).ok()?;
    if instance == own {
        return None;
    }
    let mut pods = HashMap::new();
    for p in v["pods"].as_array()?.iter().take(MAX_PODS_PER_PEER) {
        let (Some(pod), Some(n), Some(t)) = (
            p["pod"].as_str(),
            p["in_flight"].as_u64(),
            p["prefill_tokens"].as_u64(),
        ) else {
            continue;
        };
        let e = pods.entry(pod.to_owned()).or_insert((0u64, 0u64));
        *e = (e.0.saturating_add(n), e.1.saturating_add(t));
    }
    Some(pods)
}

/// Every address of `peers` (`host:port` each; a name may resolve to several), at most
/// [`MAX_PEERS`], deduplicated. A name that does not resolve is skipped (counted by the caller).
async fn resolve(peers: &[String]) -> (Vec<SocketAddr>, usize) {
    let mut out = Vec::new();
    let mut failed = 0;
    for p in peers {
        match tokio::net::lookup_host(p.as_str()).await {
            Ok(addrs) => {
                for a in addrs {
                    if out.len() < MAX_PEERS && !out.contains(&a) {
                        out.push(a);
                    }
                }
            }
            Err(e) => {
                failed += 1;
                tracing::debug!(peer = %p, error = %e, "peer name does not resolve");
            }
        }
    }
    (out, failed)
}

async fn read_one(client: &HttpClient, addr: SocketAddr, timeout: Duration) -> Option<Value> {
    let url = format!("http://{addr}/v1/load");
    let body = super::get_limited(client, &url, MAX_ANSWER_BYTES, timeout).await?;
    serde_json::from_slice(&body).ok()
}

/// One round: resolve the peers, read each one's load, and set every pod's peer sums (pods no
/// peer holds anything on get zeros, stamped now: they are known idle, not unknown; when no
/// peer could be read, nothing is set).
pub async fn round(table: &LoadTable, peers: &[String], client: &HttpClient, timeout: Duration) {
    let (addrs, unresolved) = resolve(peers).await;
    table.peer_errors.fetch_add(unresolved as u64, Relaxed);
    let reads = addrs.iter().map(|&a| read_one(client, a, timeout));
    let answers = futures::future::join_all(reads).await;
    let own = table.instance();
    let mut sums: HashMap<String, (u64, u64)> = HashMap::new();
    let mut peers_read = 0u64;
    let mut peer_addrs = Vec::new();
    for (&addr, a) in addrs.iter().zip(answers) {
        let Some(v) = a else {
            table.peer_errors.fetch_add(1, Relaxed);
            continue;
        };
        let Some(pods) = parse(own, &v) else {
            continue;
        };
        peers_read += 1;
        peer_addrs.push(addr);
        for (pod, (n, t)) in pods {
            // Only pods this replica knows (the sums are bounded by its own table).
            if table.get(&pod).is_none() {
                continue;
            }
            let e = sums.entry(pod).or_insert((0, 0));
            *e = (e.0.saturating_add(n), e.1.saturating_add(t));
        }
    }
    table.peers_read.store(peers_read, Relaxed);
    *table.peer_addrs.write() = peer_addrs;
    if peers_read == 0 {
        // Nothing known this round: the last readings age out (stale after three intervals)
        // rather than being replaced by zeros.
        return;
    }
    let now = Instant::now();
    for p in table.all() {
        let (n, t) = sums.get(&p.key).copied().unwrap_or((0, 0));
        p.set_peers(n, t, now);
    }
}

/// Reads the peers every `interval` until `stop`; returns at once without peers.
pub async fn run(
    table: std::sync::Arc<LoadTable>,
    peers: Vec<String>,
    interval: Duration,
    client: HttpClient,
    stop: CancellationToken,
) {
    if peers.is_empty() {
        return;
    }
    let timeout = interval.max(Duration::from_millis(50));
    super::every(interval, stop, || round(&table, &peers, &client, timeout)).await;
}

/// One routing decision, for the peers: the prompt's block chain went to (pod, rank).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub pod: String,
    pub rank: u32,
    pub chain: Vec<u64>,
}

/// The queue of decisions to push to the peers (none without peers).
#[derive(Debug)]
pub struct Share {
    tx: Option<tokio::sync::mpsc::Sender<Decision>>,
    rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Decision>>>,
    /// Decisions dropped: the queue was full, or no peer was known when they were taken.
    pub dropped: std::sync::atomic::AtomicU64,
    /// Decisions pushed to at least one peer.
    pub pushed: std::sync::atomic::AtomicU64,
    /// Decisions received from peers and recorded.
    pub received: std::sync::atomic::AtomicU64,
}

impl Share {
    pub fn new(enabled: bool) -> Share {
        let (tx, rx) = if enabled {
            let (tx, rx) = tokio::sync::mpsc::channel(SHARE_QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Share {
            tx,
            rx: parking_lot::Mutex::new(rx),
            dropped: Default::default(),
            pushed: Default::default(),
            received: Default::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a decision for the peers (never waits: a full queue drops it, counted).
    pub fn offer(&self, pod: &str, rank: u32, chain: &[u64]) {
        let Some(tx) = &self.tx else { return };
        if chain.is_empty() {
            return;
        }
        let d = Decision {
            pod: pod.to_owned(),
            rank,
            chain: chain[..chain.len().min(MAX_SHARED_BLOCKS)].to_vec(),
        };
        if tx.try_send(d).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

/// A push's body.
pub fn push_body(instance: u64, decisions: &[Decision]) -> Value {
    let list: Vec<Value> = decisions
        .iter()
        .map(|d| json!({"pod": d.pod, "rank": d.rank, "chain": d.chain}))
        .collect();
    json!({"instance": format!("{instance:016x}"), "decisions": list})
}

/// A push received: its decisions, or `None` when it is this replica's own or malformed
/// (at most [`MAX_DECISIONS_PER_PUSH`], each at most [`MAX_SHARED_BLOCKS`] blocks).
pub fn parse_push(own: u64, v: &Value) -> Option<Vec<Decision>> {
    let instance = u64::from_str_radix(v["instance"].as_str()?, 16).ok()?;
    if instance == own {
        return None;
    }
    let mut out = Vec::new();
    for d in v["decisions"]
        .as_array()?
        .iter()
        .take(MAX_DECISIONS_PER_PUSH)
    {
        let (Some(pod), Some(rank), Some(chain)) = (
            d["pod"].as_str(),
            d["rank"].as_u64().and_then(|r| u32::try_from(r).ok()),
            d["chain"].as_array(),
        ) else {
            continue;
        };
        let chain: Option<Vec<u64>> = chain
            .iter()
            .take(MAX_SHARED_BLOCKS)
            .map(Value::as_u64)
            .collect();
        if let Some(chain) = chain {
            out.push(Decision {
                pod: pod.to_owned(),
                rank,
                chain,
            });
        }
    }
    Some(out)
}

/// Pushes queued decisions to the peers the reader last found, in batches, until `stop`.
pub async fn push(
    table: std::sync::Arc<LoadTable>,
    client: HttpClient,
    timeout: Duration,
    stop: CancellationToken,
) {
    let share = &table.share;
    let Some(mut rx) = share.rx.lock().take() else {
        return;
    };
    let mut batch = Vec::with_capacity(MAX_DECISIONS_PER_PUSH);
    loop {
        batch.clear();
        tokio::select! {
            () = stop.cancelled() => return,
            n = rx.recv_many(&mut batch, MAX_DECISIONS_PER_PUSH) => if n == 0 { return },
        }
        let addrs = table.peer_addrs.read().clone();
        if addrs.is_empty() {
            // No peer answered the last read: these decisions reach no one.
            share.dropped.fetch_add(batch.len() as u64, Relaxed);
            continue;
        }
        for part in split_by_blocks(&batch, MAX_BLOCKS_PER_PUSH) {
            tokio::select! {
                () = stop.cancelled() => return,
                () = push_part(&table, &client, &addrs, part, timeout) => {}
            }
        }
    }
}

/// `batch` in runs of at most `max_blocks` blocks (a decision longer than that alone).
fn split_by_blocks(batch: &[Decision], max_blocks: usize) -> Vec<&[Decision]> {
    let mut parts = Vec::new();
    let (mut start, mut blocks) = (0, 0);
    for (i, d) in batch.iter().enumerate() {
        if i > start && blocks + d.chain.len() > max_blocks {
            parts.push(&batch[start..i]);
            (start, blocks) = (i, 0);
        }
        blocks += d.chain.len();
    }
    if start < batch.len() {
        parts.push(&batch[start..]);
    }
    parts
}

/// Sends one push to every peer at once; counts the failures and the decisions delivered.
async fn push_part(
    table: &LoadTable,
    client: &HttpClient,
    addrs: &[SocketAddr],
    batch: &[Decision],
    timeout: Duration,
) {
    let body = Bytes::from(push_body(table.instance(), batch).to_string());
    let sends = addrs.iter().map(|a| {
        let req = hyper::Request::post(format!("http://{a}/v1/peers/routed"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()));
        async move {
            let req = req.ok()?;
            let call = async { client.request(req).await.ok().map(|r| r.status()) };
            tokio::time::timeout(timeout, call).await.ok().flatten()
        }
    });
    let results = futures::future::join_all(sends).await;
    let ok = results
        .iter()
        .filter(|r| r.is_some_and(|s| s.is_success()))
        .count();
    table
        .peer_errors
        .fetch_add((results.len() - ok) as u64, Relaxed);
    if ok > 0 {
        table.share.pushed.fetch_add(batch.len() as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_round_trips_and_ones_own_is_skipped() {
        let t = LoadTable::new(Duration::from_secs(1));
        let a = t.entry("ns/a", "http://10.0.0.1:8000");
        t.entry("ns/b", "http://10.0.0.2:8000");
        let _held = a.begin(300);
        let _held2 = a.begin(20);
        let v = answer(&t);
        assert_eq!(v["pods"].as_array().map(Vec::len), Some(1), "{v}");
        assert_eq!(parse(t.instance(), &v), None, "own answer");
        let other = LoadTable::new(Duration::from_secs(1));
        let got = parse(other.instance(), &v).expect("a peer's answer");
        assert_eq!(got.get("ns/a"), Some(&(2, 320)));
        assert_eq!(got.len(), 1);
        // Malformed answers and entries.
        assert_eq!(parse(1, &json!({"pods": []})), None);
        assert_eq!(parse(1, &json!({"instance": "zz", "pods": []})), None);
        let partial = parse(
            1,
            &json!({"instance": "2", "pods": [{"pod": "x"}, {"pod": "y", "in_flight": 1, "prefill_tokens": 5}]}),
        )
        .expect("partial");
        assert_eq!(partial.len(), 1);
        assert_eq!(partial.get("y"), Some(&(1, 5)));
    }

    #[test]
    fn a_push_round_trips_and_bad_decisions_are_skipped() {
        let d = vec![
            Decision {
                pod: "ns/a".into(),
                rank: 1,
                chain: vec![u64::MAX, 7, 1 << 60],
            },
            Decision {
                pod: "ns/b".into(),
                rank: 0,
                chain: vec![3],
            },
        ];
        let body = push_body(5, &d);
        assert_eq!(parse_push(5, &body), None, "own push");
        let text = body.to_string();
        let back: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(
            parse_push(6, &back),
            Some(d),
            "u64 hashes exact through JSON"
        );
        let bad = json!({"instance": "6", "decisions": [
            {"pod": "x", "rank": 0, "chain": [1, -2]},
            {"pod": "y", "rank": 5_000_000_000u64, "chain": [1]},
            {"pod": "z", "rank": 0, "chain": [9]},
        ]});
        let got = parse_push(1, &bad).expect("parsed");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].pod, "z");
    }

    #[test]
    fn pushes_are_split_by_blocks() {
        let d = |n: usize| Decision {
            pod: "p".into(),
            rank: 0,
            chain: vec![1; n],
        };
        let batch = vec![d(3), d(3), d(5), d(1), d(9)];
        let sizes: Vec<usize> = split_by_blocks(&batch, 6).iter().map(|p| p.len()).collect();
        assert_eq!(sizes, [2, 2, 1], "3+3 | 5+1 | 9 alone");
        assert!(split_by_blocks(&[], 6).is_empty());
        // The largest push within the receiver's body limit.
        let max = vec![
            Decision {
                pod: "default/a-pod-name-of-some-length".into(),
                rank: 7,
                chain: vec![u64::MAX; MAX_BLOCKS_PER_PUSH],
            };
            1
        ];
        let body = push_body(u64::MAX, &max).to_string();
        assert!(body.len() < crate::http::MAX_BODY, "{} bytes", body.len());
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let s = Share::new(true);
        for i in 0..SHARE_QUEUE + 3 {
            s.offer("ns/a", 0, &[i as u64]);
        }
        assert_eq!(s.dropped.load(Relaxed), 3);
        s.offer("ns/a", 0, &[]);
        assert_eq!(s.dropped.load(Relaxed), 3, "an empty chain is not queued");
        let off = Share::new(false);
        off.offer("ns/a", 0, &[1]);
        assert!(!off.enabled());
        assert_eq!(off.dropped.load(Relaxed), 0);
    }
}
