//! Load per pod, as the proxy knows it: this replica's own in-flight requests and in-flight
//! uncached prompt tokens (exact and instant, held by guards that cannot leak), each pod's
//! scraped `/metrics` (shared by every replica but lagging; see [`scrape`]), its recent
//! failures (a pod failing again and again is skipped for a cool-down), and the proxy's
//! counts of requests per pod (exported by [`crate::proxy::metrics`], gone with the pod).
//!
//! ```text
//!  proxy: begin(pod, uncached) ─▶ RequestGuard (in_flight)  ─ dropped at stream end / error / client gone
//!                               └▶ PrefillGuard (prefill_tokens) ─ dropped at the first response byte
//!  scrape task, every interval: sync(eligible pods) ─▶ GET /metrics ─▶ Scraped { waiting, running, kv_usage, at }
//!  choice: view(pod, now) ─▶ route::cost::LoadView (a reading older than 3 intervals is left out, counted)
//! ```

pub mod peers;
pub mod scrape;

use crate::route::cost::{LoadView, Scraped as ScrapedView};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Failures in a row (connection refused/reset, 5xx before the first byte) that put a pod in
/// cool-down.
pub const FAILURES_BEFORE_COOLDOWN: u32 = 3;
/// A scraped reading older than this many intervals is ignored.
pub const STALE_INTERVALS: u32 = 3;
/// Runs `f` every `interval` (a slow run delays the next tick rather than bunching them)
/// until `stop`, which also cuts a run short.
pub(crate) async fn every<F, Fut>(interval: Duration, stop: CancellationToken, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = f() => {}
        }
    }
}

/// `GET url`'s body when it answers 200 within `timeout` and in at most `limit` bytes (the
/// scraper's and the peer reader's one request shape); `None` otherwise.
pub(crate) async fn get_limited(
    client: &crate::proxy::upstream::HttpClient,
    url: &str,
    limit: usize,
    timeout: Duration,
) -> Option<bytes::Bytes> {
    use http_body_util::BodyExt;
    let req = hyper::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .ok()?;
    let call = async {
        let resp = client.request(req).await.ok()?;
        if resp.status() != hyper::StatusCode::OK {
            return None;
        }
        let body = http_body_util::Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .ok()?;
        Some(body.to_bytes())
    };
    tokio::time::timeout(timeout, call).await.ok().flatten()
}

/// Longest wait, in scrape intervals, before a pod whose `/metrics` keeps failing is asked
/// again (32 s at the default 1 s interval): the wait doubles per failure in a row from one
/// interval, and one good answer brings the pod back to every interval.
pub const MAX_SCRAPE_BACKOFF_INTERVALS: u32 = 32;
/// Distinct (model, outcome) series kept per pod (models come from the pods' labels, outcomes
/// are a fixed set: the bound only guards against a misconfiguration).
const MAX_SERIES_PER_POD: usize = 256;

/// One reading of a pod's `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scraped {
    /// `vllm:num_requests_waiting`, summed over the pod's engines.
    pub waiting: f64,
    /// `vllm:num_requests_running`, summed.
    pub running: f64,
    /// `vllm:kv_cache_usage_perc` (0..1; `vllm:gpu_cache_usage_perc` before vLLM 0.10), the
    /// largest of the pod's engines.
    pub kv_usage: f64,
    pub at: Instant,
}

#[derive(Debug, Default)]
struct Health {
    failures: u32,
    cool_until: Option<Instant>,
}

/// The scrape's own failure streak (apart from [`Health`], which is about requests: a pod
/// that does not serve `/metrics` may serve requests well).
#[derive(Debug, Default, Clone, Copy)]
struct ScrapeHealth {
    misses: u32,
    next: Option<Instant>,
}

/// What the proxy knows of one pod's load.
#[derive(Debug)]
pub struct PodLoad {
    /// `namespace/name`.
    pub key: String,
    /// The engine's HTTP API (`http://ip:port`).
    pub base_url: String,
    in_flight: AtomicU64,
    prefill_tokens: AtomicU64,
    scraped: Mutex<Option<Scraped>>,
    health: Mutex<Health>,
    scrape_health: Mutex<ScrapeHealth>,
    /// The other replicas' requests and uncached tokens in flight here, summed, and when.
    peers: Mutex<Option<(u64, u64, Instant)>>,
    /// Requests answered through this pod, by (model, outcome).
    requests: Mutex<HashMap<(String, &'static str), u64>>,
}

impl PodLoad {
    fn new(key: String, base_url: String) -> PodLoad {
        PodLoad {
            key,
            base_url,
            in_flight: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
            scraped: Mutex::new(None),
            health: Mutex::new(Health::default()),
            scrape_health: Mutex::new(ScrapeHealth::default()),
            peers: Mutex::new(None),
            requests: Mutex::new(HashMap::new()),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed)
    }

    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens.load(Relaxed)
    }

    pub fn scraped(&self) -> Option<Scraped> {
        *self.scraped.lock()
    }

    pub fn set_scraped(&self, s: Scraped) {
        *self.scraped.lock() = Some(s);
        *self.scrape_health.lock() = ScrapeHealth::default();
    }

    /// The other replicas' requests and uncached prompt tokens in flight on this pod, read at
    /// `at` (see [`peers`]).
    pub fn set_peers(&self, in_flight: u64, prefill_tokens: u64, at: Instant) {
        *self.peers.lock() = Some((in_flight, prefill_tokens, at));
    }

    /// The peers' last reading: (requests, uncached tokens, when).
    pub fn peers(&self) -> Option<(u64, u64, Instant)> {
        *self.peers.lock()
    }

    /// Whether the scrape should ask this pod at `now` (false while it backs off).
    pub fn scrape_due(&self, now: Instant) -> bool {
        self.scrape_health.lock().next.is_none_or(|t| now >= t)
    }

    /// Whether the pod's scrape is backing off after failures.
    pub fn scrape_backing_off(&self) -> bool {
        self.scrape_health.lock().misses > 1
    }

    /// A scrape of this pod failed at `now`: the `n`th failure in a row defers the next
    /// attempt by `2^(n-1) - 1` intervals beyond the next, up to
    /// [`MAX_SCRAPE_BACKOFF_INTERVALS`] (so one failure costs nothing, a pod that never serves
    /// `/metrics` is asked about twice a minute, not every second).
    pub fn scrape_failed(&self, now: Instant, interval: Duration) {
        let mut h = self.scrape_health.lock();
        h.misses = h.misses.saturating_add(1);
        let wait = 1u32
            .checked_shl(h.misses - 1)
            .unwrap_or(u32::MAX)
            .min(MAX_SCRAPE_BACKOFF_INTERVALS);
        // Due a little before `wait` intervals, so the tick that far away finds it due.
        h.next = Some(now + interval * wait - interval / 2);
    }

    /// Counts a request through this pod by model and outcome.
    pub fn count(&self, model: &str, outcome: &'static str) {
        let mut r = self.requests.lock();
        if let Some(n) = r.get_mut(&(model.to_owned(), outcome)) {
            *n += 1;
        } else if r.len() < MAX_SERIES_PER_POD {
            r.insert((model.to_owned(), outcome), 1);
        }
    }

    /// The request counts, for the metrics.
    pub fn requests(&self) -> Vec<((String, &'static str), u64)> {
        self.requests
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// A request reached the pod and got its first byte: the failure streak ends.
    pub fn succeeded(&self) {
        let mut h = self.health.lock();
        h.failures = 0;
        h.cool_until = None;
    }

    /// A failure before the first byte; the streak's `FAILURES_BEFORE_COOLDOWN`th puts the
    /// pod in cool-down until `now + cooldown`. True when it did.
    pub fn failed(&self, now: Instant, cooldown: Duration) -> bool {
        let mut h = self.health.lock();
        h.failures = h.failures.saturating_add(1);
        if h.failures >= FAILURES_BEFORE_COOLDOWN && !cooldown.is_zero() {
            h.failures = 0;
            h.cool_until = Some(now + cooldown);
            return true;
        }
        false
    }

    /// Whether the pod is in cool-down at `now`.
    pub fn cooling(&self, now: Instant) -> bool {
        self.health.lock().cool_until.is_some_and(|t| now < t)
    }

    /// Holds one request (and its `prefill` uncached prompt tokens until the first byte).
    pub fn begin(self: &Arc<Self>, prefill: u64) -> (RequestGuard, PrefillGuard) {
        self.in_flight.fetch_add(1, Relaxed);
        self.prefill_tokens.fetch_add(prefill, Relaxed);
        (
            RequestGuard(self.clone()),
            PrefillGuard {
                pod: Some(self.clone()),
                tokens: prefill,
            },
        )
    }
}

/// One in-flight request on a pod; dropping it gives the count back (stream end, error, client
/// gone, panic).
#[derive(Debug)]
pub struct RequestGuard(Arc<PodLoad>);

impl RequestGuard {
    pub fn pod(&self) -> &Arc<PodLoad> {
        &self.0
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A request's uncached prompt tokens, in flight until its first response byte.
#[derive(Debug)]
pub struct PrefillGuard {
    pod: Option<Arc<PodLoad>>,
    tokens: u64,
}

impl PrefillGuard {
    /// Gives the tokens back now (the first byte arrived); the later drop does nothing.
    pub fn release(&mut self) {
        if let Some(p) = self.pod.take() {
            p.prefill_tokens.fetch_sub(self.tokens, Relaxed);
        }
    }
}

impl Drop for PrefillGuard {
    fn drop(&mut self) {
        self.release();
    }
}

/// Every eligible pod's load (entries come with a pod and leave with it).
#[derive(Debug)]
pub struct LoadTable {
    pods: RwLock<HashMap<String, Arc<PodLoad>>>,
    /// The scrape interval: a reading older than `STALE_INTERVALS` of it is ignored.
    interval: Duration,
    /// Readings ignored as stale by a decision.
    pub stale_readings: AtomicU64,
    /// Scrapes that failed (unreachable, timeout, not 200, no vLLM load metric).
    pub scrape_errors: AtomicU64,
    /// How often the peers are read: a peer reading older than `STALE_INTERVALS` of it is
    /// ignored.
    peer_interval: Duration,
    /// This replica's id in its `/v1/load` answers (so it skips its own when a peer name
    /// resolves to itself too).
    instance: u64,
    /// Peer reads that failed (unresolved name, unreachable, timeout, not 200, not JSON).
    pub peer_errors: AtomicU64,
    /// Peers read in the last round.
    pub peers_read: AtomicU64,
    /// The peers' addresses found in the last round (this replica's own left out): where
    /// decisions are pushed.
    pub peer_addrs: RwLock<Vec<std::net::SocketAddr>>,
    /// This replica's decisions on their way to the peers.
    pub share: peers::Share,
}

impl LoadTable {
    pub fn new(interval: Duration) -> LoadTable {
        LoadTable::with_peers(interval, Duration::from_millis(100), false)
    }

    /// A table whose peers are read every `peer_interval`; `share`: decisions are queued for
    /// them ([`peers::Share`]).
    pub fn with_peers(interval: Duration, peer_interval: Duration, share: bool) -> LoadTable {
        // Random enough to tell replicas apart: the clock's nanoseconds and the process id,
        // mixed (splitmix64's finaliser).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut z = nanos ^ (u64::from(std::process::id()) << 32);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        LoadTable {
            pods: RwLock::new(HashMap::new()),
            interval,
            stale_readings: AtomicU64::new(0),
            scrape_errors: AtomicU64::new(0),
            peer_interval,
            instance: z,
            peer_errors: AtomicU64::new(0),
            peers_read: AtomicU64::new(0),
            peer_addrs: RwLock::new(Vec::new()),
            share: peers::Share::new(share),
        }
    }

    /// This replica's instance id.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The entry of `key` at `base_url` (created when missing, replaced when the pod moved).
    pub fn entry(&self, key: &str, base_url: &str) -> Arc<PodLoad> {
        if let Some(p) = self.pods.read().get(key).filter(|p| p.base_url == base_url) {
            return p.clone();
        }
        let mut pods = self.pods.write();
        match pods.get(key) {
            Some(p) if p.base_url == base_url => p.clone(),
            _ => {
                let p = Arc::new(PodLoad::new(key.to_owned(), base_url.to_owned()));
                pods.insert(key.to_owned(), p.clone());
                p
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<PodLoad>> {
        self.pods.read().get(key).cloned()
    }

    /// Keeps exactly the entries of `eligible` (key, base URL); returns how many left.
    pub fn sync(&self, eligible: &[(String, String)]) -> usize {
        let want: HashMap<&str, &str> = eligible
            .iter()
            .map(|(k, u)| (k.as_str(), u.as_str()))
            .collect();
        let mut pods = self.pods.write();
        let before = pods.len();
        pods.retain(|k, p| want.get(k.as_str()) == Some(&p.base_url.as_str()));
        let removed = before - pods.len();
        for (k, u) in eligible {
            pods.entry(k.clone())
                .or_insert_with(|| Arc::new(PodLoad::new(k.clone(), u.clone())));
        }
        removed
    }

    /// Every entry (for the scraper and the metrics).
    pub fn all(&self) -> Vec<Arc<PodLoad>> {
        let mut v: Vec<_> = self.pods.read().values().cloned().collect();
        v.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        v
    }

    pub fn len(&self) -> usize {
        self.pods.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the choice sees of `key` at `now`: a stale reading is left out (and counted).
    pub fn view(&self, key: &str, now: Instant) -> LoadView {
        match self.get(key) {
            Some(p) => self.view_of(&p, now),
            None => LoadView::default(),
        }
    }

    pub fn view_of(&self, p: &PodLoad, now: Instant) -> LoadView {
        let scraped = p.scraped().and_then(|s| {
            let age = now.saturating_duration_since(s.at);
            if age > self.interval * STALE_INTERVALS {
                self.stale_readings.fetch_add(1, Relaxed);
                None
            } else {
                Some(ScrapedView {
                    waiting: s.waiting,
                    running: s.running,
                    kv_usage: s.kv_usage,
                })
            }
        });
        let (peer_in_flight, peer_prefill_tokens) = p
            .peers()
            .filter(|&(_, _, at)| {
                now.saturating_duration_since(at) <= self.peer_interval * STALE_INTERVALS
            })
            .map_or((0, 0), |(n, t, _)| (n, t));
        LoadView {
            in_flight: p.in_flight(),
            prefill_tokens: p.prefill_tokens(),
            peer_in_flight,
            peer_prefill_tokens,
            scraped,
            cooling: p.cooling(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_give_back_what_they_hold_on_every_path() {
        let t = LoadTable::new(Duration::from_secs(1));
        let p = t.entry("ns/a", "http://10.0.0.1:8000");
        let (req, mut pre) = p.begin(300);
        let (req2, pre2) = p.begin(50);
        assert_eq!((p.in_flight(), p.prefill_tokens()), (2, 350));
        pre.release();
        pre.release();
        assert_eq!(p.prefill_tokens(), 50, "released once");
        drop(pre);
        drop(req);
        assert_eq!((p.in_flight(), p.prefill_tokens()), (1, 50));
        // A request that ends before its first byte gives back both.
        drop((req2, pre2));
        assert_eq!((p.in_flight(), p.prefill_tokens()), (0, 0));
        // A panic unwinding through a holder gives them back too.
        let p2 = p.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _g = p2.begin(7);
            panic!("handler panicked");
        }));
        assert!(r.is_err());
        assert_eq!((p.in_flight(), p.prefill_tokens()), (0, 0));
    }

    #[test]
    fn entries_follow_the_pods_and_a_moved_pod_starts_afresh() {
        let t = LoadTable::new(Duration::from_secs(1));
        let a = t.entry("ns/a", "http://10.0.0.1:8000");
        let _held = a.begin(10);
        t.entry("ns/b", "http://10.0.0.2:8000");
        assert_eq!(t.len(), 2);
        // b left, a moved to a new IP, c arrived.
        let removed = t.sync(&[
            ("ns/a".into(), "http://10.0.0.9:8000".into()),
            ("ns/c".into(), "http://10.0.0.3:8000".into()),
        ]);
        assert_eq!(removed, 2);
        let keys: Vec<_> = t.all().iter().map(|p| p.key.clone()).collect();
        assert_eq!(keys, ["ns/a", "ns/c"]);
        assert_eq!(t.get("ns/a").map(|p| p.in_flight()), Some(0));
        assert_eq!(a.in_flight(), 1, "the old entry's guard still works");
    }

    #[test]
    fn a_stale_reading_is_left_out_and_counted() {
        let t = LoadTable::new(Duration::from_secs(1));
        let p = t.entry("ns/a", "http://x:1");
        let t0 = Instant::now();
        p.set_scraped(Scraped {
            waiting: 3.0,
            running: 5.0,
            kv_usage: 0.5,
            at: t0,
        });
        let fresh = t.view("ns/a", t0 + Duration::from_secs(3));
        assert_eq!(fresh.scraped.map(|s| s.waiting), Some(3.0));
        let stale = t.view("ns/a", t0 + Duration::from_millis(3001));
        assert_eq!(stale.scraped, None);
        assert_eq!(t.stale_readings.load(Relaxed), 1);
    }

    /// The ticks (interval 1 s, at 0, 1, 2 … s) at which a pod whose scrape always fails is
    /// asked, over `secs` seconds.
    fn asked_at(p: &PodLoad, t0: Instant, secs: u64) -> Vec<u64> {
        let i = Duration::from_secs(1);
        (0..secs)
            .filter(|&s| {
                let now = t0 + i * s as u32;
                let due = p.scrape_due(now);
                if due {
                    p.scrape_failed(now, i);
                }
                due
            })
            .collect()
    }

    #[test]
    fn a_pod_whose_scrape_keeps_failing_is_asked_ever_less_often_until_it_answers() {
        let t = LoadTable::new(Duration::from_secs(1));
        let p = t.entry("ns/a", "http://x:1");
        let t0 = Instant::now();
        assert!(!p.scrape_backing_off());
        // Waits of 1, 2, 4, 8, 16, 32, 32 … intervals.
        assert_eq!(
            asked_at(&p, t0, 200),
            [0, 1, 3, 7, 15, 31, 63, 95, 127, 159, 191]
        );
        assert!(p.scrape_backing_off());
        // One answer: back to every interval.
        let t1 = t0 + Duration::from_secs(1000);
        p.set_scraped(Scraped {
            waiting: 0.0,
            running: 0.0,
            kv_usage: 0.0,
            at: t1,
        });
        assert!(!p.scrape_backing_off());
        assert!(p.scrape_due(t1));
        assert_eq!(asked_at(&p, t1, 4), [0, 1, 3]);
        // A single failure costs nothing: the next tick asks again.
        let p2 = t.entry("ns/b", "http://x:2");
        p2.scrape_failed(t0, Duration::from_secs(1));
        assert!(p2.scrape_due(t0 + Duration::from_secs(1)));
        assert!(!p2.scrape_backing_off());
    }

    #[test]
    fn three_failures_in_a_row_cool_a_pod_down_and_a_success_forgives() {
        let t = LoadTable::new(Duration::from_secs(1));
        let p = t.entry("ns/a", "http://x:1");
        let now = Instant::now();
        let cd = Duration::from_secs(10);
        assert!(!p.failed(now, cd));
        assert!(!p.failed(now, cd));
        p.succeeded();
        assert!(!p.failed(now, cd));
        assert!(!p.failed(now, cd));
        assert!(!p.cooling(now));
        assert!(p.failed(now, cd));
        assert!(p.cooling(now + Duration::from_secs(9)));
        assert!(!p.cooling(now + cd));
    }
}
