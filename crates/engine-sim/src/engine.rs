//! One simulated vLLM engine served at once (no clock): a [`BlockPool`], and vLLM's ZeroMQ
//! event publisher ([`KvPublisher`], shared with the driver) — a PUB socket that binds and
//! sends `[topic, seq, payload]` per engine step with events, and a ROUTER that answers replay
//! requests from a bounded buffer of the last `buffer_steps` batches.

use crate::pool::{BlockPool, HashForm, Lora, PoolFull, Request};
use crate::tokenizer::output_tokens;
use kv_events::{encode_into, Event, EventBatch, WireFormat};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How one engine is built.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Blocks in the pool (block 0 is the null block).
    pub num_blocks: usize,
    pub block_size: usize,
    pub hash_form: HashForm,
    /// The vLLM version whose event layout is sent (array ≤ 0.23, map ≥ 0.24).
    pub wire: WireFormat,
    /// vLLM ≥ 0.26 puts the topic in replay replies.
    pub replay_with_topic: bool,
    pub host: IpAddr,
    /// 0: any free port.
    pub pub_port: u16,
    /// 0: any free port; `None`: no replay socket (vLLM without `replay_endpoint`).
    pub replay_port: Option<u16>,
    pub topic: String,
    /// The batch's `data_parallel_rank` (`None` for vLLM 0.9, which has none).
    pub dp_rank: Option<u32>,
    /// Batches kept for replay (vLLM's `buffer_steps`).
    pub buffer_steps: usize,
    /// Seeds the block hashes' root (vLLM's `NONE_HASH`): 0 is vLLM's default (the fixed
    /// `"vllm-none-hash"`, the same on every engine), another value plays `PYTHONHASHSEED`.
    pub seed: u64,
    /// Token ids of generated output are drawn from `[1000, vocab)`.
    pub vocab: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            num_blocks: 4096,
            block_size: 16,
            hash_form: HashForm::Int,
            wire: WireFormat::VLLM_0_33,
            replay_with_topic: true,
            host: IpAddr::from([127, 0, 0, 1]),
            pub_port: 0,
            replay_port: Some(0),
            topic: "kv-events".to_owned(),
            dp_rank: Some(0),
            buffer_steps: 10_000,
            seed: 0,
            vocab: 128_000,
        }
    }
}

/// What serving one request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache (the ground truth).
    pub hit_tokens: usize,
    /// The generated tokens.
    pub output: Vec<u32>,
}

/// Counters of one engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Batches published (sent or dropped on purpose).
    pub batches: u64,
    pub blocks_stored: u64,
    pub blocks_removed: u64,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub hit_tokens: u64,
    /// Requests whose decoding stopped because the pool ran out of blocks.
    pub decode_stopped: u64,
}

/// A request between [`Engine::begin`] and [`Engine::finish`] (it holds its blocks; finish it).
#[derive(Debug)]
pub struct Admitted {
    req: Request,
}

impl Admitted {
    /// Prompt tokens found in the prefix cache.
    pub fn hit_tokens(&self) -> usize {
        self.req.hit_tokens
    }

    pub fn prompt_tokens(&self) -> usize {
        self.req.prompt_tokens
    }
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("binding {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: zmq::Error,
    },
    #[error("ZeroMQ: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("starting the replay thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The last `buffer_steps` batches as (seq, payload), shared with the replay thread.
type ReplayBuffer = Arc<Mutex<VecDeque<(u64, Vec<u8>)>>>;

struct Publisher {
    socket: zmq::Socket,
    topic: Vec<u8>,
    wire: WireFormat,
    dp_rank: Option<u32>,
    next_seq: u64,
    drop_next: usize,
    buffer: ReplayBuffer,
    buffer_steps: usize,
}

impl Publisher {
    fn publish(&mut self, events: Vec<Event>) -> Result<(), zmq::Error> {
        if events.is_empty() {
            return Ok(());
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let batch = EventBatch {
            ts,
            events,
            data_parallel_rank: self.dp_rank,
        };
        let mut payload = Vec::with_capacity(64 + 16 * batch.block_count());
        encode_into(&batch, &self.wire, &mut payload);
        let seq = self.next_seq;
        self.next_seq += 1;
        {
            let mut buf = self.buffer.lock();
            if buf.len() == self.buffer_steps {
                buf.pop_front();
            }
            if self.buffer_steps > 0 {
                buf.push_back((seq, payload.clone()));
            }
        }
        if self.drop_next > 0 {
            self.drop_next -= 1;
            return Ok(());
        }
        self.socket
            .send_multipart([self.topic.as_slice(), &seq.to_be_bytes(), &payload], 0)
    }
}

struct Inner {
    pool: BlockPool,
    publisher: KvPublisher,
    stats: EngineStats,
}

impl Inner {
    fn step(&mut self) {
        let events = self.pool.take_events();
        for e in &events {
            match e {
                Event::BlockStored(s) => self.stats.blocks_stored += s.block_hashes.len() as u64,
                Event::BlockRemoved(r) => self.stats.blocks_removed += r.block_hashes.len() as u64,
                Event::AllBlocksCleared => {}
            }
        }
        if !events.is_empty() {
            self.stats.batches += 1;
        }
        self.publisher.publish(events);
    }
}

/// vLLM's KV event publisher on its sockets: a PUB that sends one batch per step with
/// events, and (when configured) a ROUTER on its own thread answering replay requests from
/// the last `buffer_steps` batches. Dropping it stops and joins the replay thread.
pub struct KvPublisher {
    publisher: Publisher,
    pub_port: u16,
    replay_port: Option<u16>,
    stop: Arc<AtomicBool>,
    replay: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KvPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPublisher")
            .field("pub_port", &self.pub_port)
            .field("replay_port", &self.replay_port)
            .finish_non_exhaustive()
    }
}

impl KvPublisher {
    /// Binds the sockets of `cfg` (its pool fields are not used) and starts the replay thread.
    pub fn start(cfg: &EngineConfig) -> Result<KvPublisher, EngineError> {
        let ctx = context();
        let pub_socket = ctx.socket(zmq::PUB)?;
        pub_socket.set_sndhwm(100_000)?;
        pub_socket.set_linger(0)?;
        let pub_port = bind(&pub_socket, cfg.host, cfg.pub_port)?;
        let buffer = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (replay, replay_port) = match cfg.replay_port {
            Some(port) => {
                let router = ctx.socket(zmq::ROUTER)?;
                router.set_linger(0)?;
                let port = bind(&router, cfg.host, port)?;
                let (buffer, stop) = (buffer.clone(), stop.clone());
                let topic = cfg
                    .replay_with_topic
                    .then(|| cfg.topic.clone().into_bytes());
                let handle = std::thread::Builder::new()
                    .name(format!("sim-replay-{port}"))
                    .spawn(move || serve_replay(router, buffer, topic, stop))?;
                (Some(handle), Some(port))
            }
            None => (None, None),
        };
        Ok(KvPublisher {
            publisher: Publisher {
                socket: pub_socket,
                topic: cfg.topic.clone().into_bytes(),
                wire: cfg.wire,
                dp_rank: cfg.dp_rank,
                next_seq: 0,
                drop_next: 0,
                buffer,
                buffer_steps: cfg.buffer_steps,
            },
            pub_port,
            replay_port,
            stop,
            replay,
        })
    }

    /// Sends one step's events as one batch (nothing when there are none); a send error is
    /// logged (a PUB socket drops what it cannot send, as vLLM's does).
    pub fn publish(&mut self, events: Vec<Event>) {
        if let Err(e) = self.publisher.publish(events) {
            tracing::warn!(error = %e, "publishing a KV event batch");
        }
    }

    pub fn pub_port(&self) -> u16 {
        self.pub_port
    }

    pub fn replay_port(&self) -> Option<u16> {
        self.replay_port
    }

    /// The next `n` batches are buffered for replay but not sent (a lost message).
    pub fn drop_next_batches(&mut self, n: usize) {
        self.publisher.drop_next += n;
    }

    /// The seq the next batch will carry.
    pub fn next_seq(&self) -> u64 {
        self.publisher.next_seq
    }
}

impl Drop for KvPublisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.replay.take() {
            let _ = h.join();
        }
    }
}

fn context() -> zmq::Context {
    static CTX: OnceLock<zmq::Context> = OnceLock::new();
    CTX.get_or_init(zmq::Context::new).clone()
}

fn bind(socket: &zmq::Socket, host: IpAddr, port: u16) -> Result<u16, EngineError> {
    let endpoint = match (host, port) {
        (IpAddr::V6(h), 0) => format!("tcp://[{h}]:*"),
        (IpAddr::V6(h), p) => format!("tcp://[{h}]:{p}"),
        (h, 0) => format!("tcp://{h}:*"),
        (h, p) => format!("tcp://{h}:{p}"),
    };
    if host.is_ipv6() {
        socket.set_ipv6(true)?;
    }
    // A port just released by a stopped engine (a restart) may take libzmq's I/O thread a
    // moment to let go of.
    let mut attempts = 0;
    while let Err(source) = socket.bind(&endpoint) {
        attempts += 1;
        if source != zmq::Error::EADDRINUSE || port == 0 || attempts == 100 {
            return Err(EngineError::Bind { endpoint, source });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = socket.get_last_endpoint()?.unwrap_or_default();
    Ok(last
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(port))
}

/// A running simulated engine. Dropping it (or [`Engine::shutdown`]) closes its sockets.
pub struct Engine {
    inner: Mutex<Inner>,
    vocab: u32,
    pub_port: u16,
    replay_port: Option<u16>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("pub_port", &self.pub_port)
            .field("replay_port", &self.replay_port)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Binds the sockets and starts the replay thread.
    pub fn start(cfg: EngineConfig) -> Result<Engine, EngineError> {
        let publisher = KvPublisher::start(&cfg)?;
        Ok(Engine {
            pub_port: publisher.pub_port(),
            replay_port: publisher.replay_port(),
            inner: Mutex::new(Inner {
                pool: BlockPool::new(cfg.num_blocks, cfg.block_size, cfg.seed, cfg.hash_form),
                publisher,
                stats: EngineStats::default(),
            }),
            vocab: cfg.vocab,
        })
    }

    pub fn pub_port(&self) -> u16 {
        self.pub_port
    }

    pub fn replay_port(&self) -> Option<u16> {
        self.replay_port
    }

    /// Serves one request at once: [`Engine::begin`] then [`Engine::finish`].
    pub fn serve(
        &self,
        prompt: &[u32],
        lora: Option<Lora>,
        output_len: usize,
    ) -> Result<Served, PoolFull> {
        let admitted = self.begin(prompt, lora)?;
        Ok(self.finish(admitted, output_len))
    }

    /// Schedules a request's prompt (one engine step, one batch): its cached prefix is taken,
    /// the rest allocated and cached. The blocks stay held until [`Engine::finish`], so other
    /// requests can run meanwhile. `PoolFull` when the running requests leave too few blocks
    /// (vLLM would keep it waiting).
    pub fn begin(&self, prompt: &[u32], lora: Option<Lora>) -> Result<Admitted, PoolFull> {
        let mut inner = self.inner.lock();
        let req = inner.pool.start(prompt, lora)?;
        inner.step();
        Ok(Admitted { req })
    }

    /// Generates `output_len` tokens ([`output_tokens`] of the prompt, so a client can predict
    /// them; a batch each step that fills or evicts a block), then releases the blocks. Decoding
    /// stops early if the pool runs out of blocks (vLLM would preempt).
    pub fn finish(&self, admitted: Admitted, output_len: usize) -> Served {
        let mut req = admitted.req;
        let output = output_tokens(req.tokens(), output_len, self.vocab);
        let mut inner = self.inner.lock();
        for &t in &output {
            let appended = inner.pool.append(&mut req, t);
            inner.step();
            if appended.is_err() {
                inner.stats.decode_stopped += 1;
                break;
            }
        }
        let served = Served {
            prompt_tokens: req.prompt_tokens,
            hit_tokens: req.hit_tokens,
            output,
        };
        inner.pool.finish(req);
        inner.stats.requests += 1;
        inner.stats.prompt_tokens += served.prompt_tokens as u64;
        inner.stats.hit_tokens += served.hit_tokens as u64;
        served
    }

    /// Prompt tokens a request would find cached now (nothing changes).
    pub fn peek_hit_tokens(&self, prompt: &[u32], lora: Option<&Lora>) -> usize {
        self.inner.lock().pool.peek_hit_tokens(prompt, lora)
    }

    /// Leading full blocks of `tokens` cached now (no cap for the last token).
    pub fn cached_prefix_blocks(&self, tokens: &[u32], lora: Option<&Lora>) -> usize {
        self.inner.lock().pool.cached_prefix_blocks(tokens, lora)
    }

    /// vLLM's `reset_prefix_cache` (publishes `AllBlocksCleared`).
    pub fn reset_prefix_cache(&self) -> bool {
        let mut inner = self.inner.lock();
        let ok = inner.pool.reset();
        inner.step();
        ok
    }

    /// The next `n` batches are buffered for replay but not sent (a lost message).
    pub fn drop_next_batches(&self, n: usize) {
        self.inner.lock().publisher.drop_next_batches(n);
    }

    pub fn stats(&self) -> EngineStats {
        self.inner.lock().stats
    }

    /// The seq the next batch will carry.
    pub fn next_seq(&self) -> u64 {
        self.inner.lock().publisher.next_seq()
    }

    /// Closes the sockets and joins the replay thread.
    pub fn shutdown(self) {
        drop(self);
    }
}

const REPLAY_END: [u8; 8] = [0xff; 8];

/// vLLM's replay service: a DEALER sends `[b"", start_seq]`; every buffered batch with
/// seq ≥ start is answered `[b"", (topic,) seq, payload]`, then the end marker.
fn serve_replay(
    router: zmq::Socket,
    buffer: ReplayBuffer,
    topic: Option<Vec<u8>>,
    stop: Arc<AtomicBool>,
) {
    let poll = Duration::from_millis(50).as_millis() as i64;
    while !stop.load(Ordering::Relaxed) {
        match router.poll(zmq::POLLIN, poll) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "replay socket poll");
                return;
            }
        }
        let Ok(frames) = router.recv_multipart(0) else {
            continue;
        };
        // [identity, b"", start_seq]
        let start = match frames.as_slice() {
            [_, empty, seq] if empty.is_empty() && seq.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(seq);
                u64::from_be_bytes(b)
            }
            _ => {
                tracing::debug!(frames = frames.len(), "malformed replay request ignored");
                continue;
            }
        };
        let ident = frames[0].clone();
        let batches: Vec<(u64, Vec<u8>)> = buffer
            .lock()
            .iter()
            .filter(|(s, _)| *s >= start)
            .cloned()
            .collect();
        let head = |seq: &[u8]| -> Vec<Vec<u8>> {
            let mut f = vec![ident.clone(), Vec::new()];
            if let Some(t) = &topic {
                f.push(t.clone());
            }
            f.push(seq.to_vec());
            f
        };
        for (seq, payload) in batches {
            let mut f = head(&seq.to_be_bytes());
            f.push(payload);
            if router.send_multipart(f, 0).is_err() {
                break;
            }
        }
        let mut end = head(&REPLAY_END);
        end.push(Vec::new());
        let _ = router.send_multipart(end, 0);
    }
}
