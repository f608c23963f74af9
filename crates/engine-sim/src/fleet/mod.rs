//! A fleet of simulated vLLM engines on one host, what `kvsync sim` runs:
//!
//! ```text
//!  engine i: EngineHandle (thread)  ── KV events: PUB tcp://HOST:P, replay ROUTER tcp://HOST:R
//!            └─ HttpServer :H  vLLM's OpenAI API + /metrics over the handle
//!  oracle:   HttpServer :O  the same API over every engine (lowest predicted TTFT)
//!  pod file: one ready pod per engine (KV event ports, HTTP port), for `kvsync serve --pods`
//! ```
//!
//! Engines cycle through [`Flavour`]s (wire format, hash form, replay socket), as vLLM
//! versions mix in a real fleet. Fault knobs per engine ([`FleetEngine`]): lost event batches,
//! a restart on the same ports (empty cache, seq from 0, another hash seed), and killing the
//! HTTP side mid-stream (listener and every open connection dropped). [`Fleet::shutdown`]
//! stops every server and engine and joins every task and thread.

mod cli;
mod oracle;
mod server;

use std::fmt;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_events::WireFormat;
use parking_lot::{Mutex, RwLock};
use serde_json::json;

pub use cli::{run, ArgsError, RunError, SimArgs};
pub use oracle::MAX_STEPS;
pub use server::HttpServer;

use crate::driver::{EngineHandle, SimConfig, StartError};
use crate::http::{self, Backend, HttpConfig};
use crate::pool::HashForm;

/// The vocabulary of the fleet's tokenizer and generated tokens.
pub const VOCAB: u32 = 32_000;

/// How long open requests may finish when the fleet stops.
pub const GRACE: Duration = Duration::from_secs(2);

/// Pod annotation: the engine's HTTP (OpenAI API) port, which kvsync's proxy sends requests to.
pub const ANN_HTTP_PORT: &str = "model.aibrix.ai/port";

/// An engine's KV event replay socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// A ROUTER whose replies carry the topic (vLLM ≥ 0.26).
    Topic,
    /// A ROUTER whose replies do not.
    Plain,
    /// None (vLLM without `replay_endpoint`).
    None,
}

/// What an engine speaks on its KV event sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flavour {
    pub wire: WireFormat,
    pub hash_form: HashForm,
    pub replay: Replay,
}

/// The wire formats [`Flavour`] names, by vLLM version.
const WIRES: [(&str, WireFormat); 5] = [
    ("0.9", WireFormat::VLLM_0_9),
    ("0.10.2", WireFormat::VLLM_0_10_2),
    ("0.14", WireFormat::VLLM_0_14),
    ("0.24", WireFormat::VLLM_0_24),
    ("0.33", WireFormat::VLLM_0_33),
];

impl Flavour {
    /// The demo's mix: map 0.33 with integer hashes and a topic in replies, map 0.24 with
    /// 32-byte hashes, array 0.14 with integer hashes.
    pub fn demo_mix() -> Vec<Flavour> {
        ["0.33:int:topic", "0.24:bytes:plain", "0.14:int:plain"]
            .iter()
            .map(|s| s.parse().expect("the demo's flavours parse"))
            .collect()
    }
}

/// `VERSION:HASH:REPLAY`, e.g. `0.33:int:topic`, `0.24:bytes:plain`, `0.14:int:none`.
impl FromStr for Flavour {
    type Err = String;

    fn from_str(s: &str) -> Result<Flavour, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [version, hash, replay] = parts[..] else {
            return Err(format!(
                "{s:?}: expected VERSION:HASH:REPLAY, e.g. 0.33:int:topic"
            ));
        };
        let wire = WIRES
            .iter()
            .find(|(v, _)| *v == version)
            .map(|&(_, w)| w)
            .ok_or_else(|| {
                let known: Vec<&str> = WIRES.iter().map(|(v, _)| *v).collect();
                format!(
                    "{s:?}: unknown vLLM version {version:?} (known: {})",
                    known.join(", ")
                )
            })?;
        let hash_form = match hash {
            "int" => HashForm::Int,
            "bytes" => HashForm::Bytes,
            _ => {
                return Err(format!(
                    "{s:?}: the hash form is int or bytes, not {hash:?}"
                ))
            }
        };
        let replay = match replay {
            "topic" => Replay::Topic,
            "plain" => Replay::Plain,
            "none" => Replay::None,
            _ => {
                return Err(format!(
                    "{s:?}: the replay is topic, plain or none, not {replay:?}"
                ))
            }
        };
        Ok(Flavour {
            wire,
            hash_form,
            replay,
        })
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let version = WIRES
            .iter()
            .find(|(_, w)| *w == self.wire)
            .map_or("?", |(v, _)| v);
        let hash = match self.hash_form {
            HashForm::Int => "int",
            HashForm::Bytes => "bytes",
        };
        let replay = match self.replay {
            Replay::Topic => "topic",
            Replay::Plain => "plain",
            Replay::None => "none",
        };
        write!(f, "{version}:{hash}:{replay}")
    }
}

/// How a fleet is built.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub engines: usize,
    /// Every engine's configuration; ports, wire format, hash form, replay and seed are set
    /// per engine (the hash seed is `sim.engine.seed × 1000 + i`).
    pub sim: SimConfig,
    /// Cycled over the engines.
    pub flavours: Vec<Flavour>,
    /// The served model (`model.aibrix.ai/name` in the pod file).
    pub model: String,
    /// The pods' namespace in the pod file.
    pub namespace: String,
    /// Serve the oracle router on this port (0: any free one); `None`: no oracle.
    pub oracle_port: Option<u16>,
    /// The model's own tokenizer (its Hugging Face files); `None`: the word tokenizer. With
    /// it, set `sim.sched.vocab` to its base vocabulary so generated ids decode.
    pub tokenizer: Option<Arc<hf_tokenize::Tokenizer>>,
}

impl FleetConfig {
    /// `engines` default engines (the demo's flavours) serving `model`, with an oracle.
    pub fn new(engines: usize, model: &str) -> FleetConfig {
        let mut sim = SimConfig::default();
        sim.sched.vocab = VOCAB;
        FleetConfig {
            engines,
            sim,
            flavours: Flavour::demo_mix(),
            model: model.to_owned(),
            namespace: "default".to_owned(),
            oracle_port: Some(0),
            tokenizer: None,
        }
    }
}

/// Why a fleet could not start (or an engine restart).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("a fleet needs at least one engine and one flavour")]
    Empty,
    #[error("engine {0}: {1}")]
    Engine(usize, #[source] StartError),
    #[error("binding {what}: {source}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP layer: {0}")]
    Http(#[from] http::ConfigError),
    #[error("writing the pod file {path}: {source}")]
    PodFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One engine of the fleet as a client sees it: the JSON line `kvsync sim` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// Its pod name, `sim-I`.
    pub name: String,
    /// Its OpenAI API, `http://HOST:PORT`.
    pub url: String,
    /// Its KV events PUB endpoint.
    pub kv_events: String,
    /// Its replay ROUTER endpoint, if it has one.
    pub replay: Option<String>,
    pub flavour: Flavour,
}

impl EngineInfo {
    /// `{"name", "url", "kv_events", "replay", "wire"}` on one line.
    pub fn json_line(&self) -> String {
        json!({
            "name": self.name,
            "url": self.url,
            "kv_events": self.kv_events,
            "replay": self.replay,
            "wire": self.flavour.to_string(),
        })
        .to_string()
    }
}

/// One engine's place in the fleet: its name, ports and current incarnation.
pub(crate) struct Slot {
    name: String,
    flavour: Flavour,
    http_addr: SocketAddr,
    http_cfg: HttpConfig,
    /// With its ports bound: a restart binds the same.
    cfg: Mutex<SimConfig>,
    index: usize,
    /// Replaced by a restart (`None` in between). Held only while used: a restart must drop
    /// the last handle to free its sockets.
    handle: RwLock<Option<EngineHandle>>,
    server: tokio::sync::Mutex<Option<HttpServer>>,
}

impl Slot {
    /// `f` of the current engine; `None` while a restart replaces it.
    pub(crate) fn with_handle<R>(&self, f: impl FnOnce(&EngineHandle) -> R) -> Option<R> {
        self.handle.read().as_ref().map(f)
    }

    fn info(&self) -> EngineInfo {
        let cfg = self.cfg.lock();
        let host = cfg.engine.host;
        let endpoint = |p: u16| match host {
            IpAddr::V6(h) => format!("tcp://[{h}]:{p}"),
            IpAddr::V4(h) => format!("tcp://{h}:{p}"),
        };
        EngineInfo {
            name: self.name.clone(),
            url: format!("http://{}", self.http_addr),
            kv_events: endpoint(cfg.engine.pub_port),
            replay: cfg.engine.replay_port.map(endpoint),
            flavour: self.flavour,
        }
    }

    async fn start_http(
        &self,
        listener: Option<tokio::net::TcpListener>,
    ) -> Result<(), FleetError> {
        let mut server = self.server.lock().await;
        if server.is_some() {
            return Ok(());
        }
        let listener = match listener {
            Some(l) => l,
            None => tokio::net::TcpListener::bind(self.http_addr)
                .await
                .map_err(|source| FleetError::Bind {
                    what: format!("{}'s HTTP port {}", self.name, self.http_addr),
                    source,
                })?,
        };
        let Some(handle) = self.handle.read().clone() else {
            return Ok(());
        };
        let backend: Arc<dyn Backend> = Arc::new(handle);
        let router = http::router(backend, self.http_cfg.clone())?;
        *server = Some(
            HttpServer::start(listener, router).map_err(|source| FleetError::Bind {
                what: format!("{}'s HTTP port", self.name),
                source,
            })?,
        );
        Ok(())
    }
}

/// One engine's controls ([`Fleet::engine`]).
pub struct FleetEngine {
    slot: Arc<Slot>,
}

impl FleetEngine {
    pub fn name(&self) -> &str {
        &self.slot.name
    }

    pub fn info(&self) -> EngineInfo {
        self.slot.info()
    }

    /// Its OpenAI API's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.slot.http_addr
    }

    /// The current engine (a restart replaces it: do not keep the clone across one, or the
    /// restart cannot bind its ports); `None` during a restart.
    pub fn handle(&self) -> Option<EngineHandle> {
        self.slot.handle.read().clone()
    }

    /// The next `n` KV event batches are buffered for replay but not sent.
    pub fn drop_next_batches(&self, n: usize) {
        self.slot.with_handle(|h| h.drop_next_batches(n));
    }

    /// Kills its HTTP side as a crashed API server: the listener and every open connection
    /// (streams mid-response) are dropped at once; their requests abort in the engine. The
    /// engine and its KV events go on. Returns when every connection task is joined.
    pub async fn kill_http(&self) {
        let server = self.slot.server.lock().await.take();
        if let Some(s) = server {
            s.kill().await;
        }
    }

    /// Whether its HTTP side is up.
    pub async fn http_running(&self) -> bool {
        self.slot.server.lock().await.is_some()
    }

    /// Brings its HTTP side back on the same port (nothing if it runs).
    pub async fn start_http(&self) -> Result<(), FleetError> {
        self.slot.start_http(None).await
    }

    /// Restarts it as a new vLLM process on the same ports (KV events, replay, HTTP): open
    /// connections are dropped, the cache is empty, seq starts from 0 and the hash seed
    /// changes.
    pub async fn restart(&self) -> Result<(), FleetError> {
        self.kill_http().await;
        let cfg = {
            let mut cfg = self.slot.cfg.lock();
            cfg.engine.seed = cfg.engine.seed.wrapping_add(1 << 32);
            cfg.clone()
        };
        {
            let mut handle = self.slot.handle.write();
            // The old engine's sockets close with its last handle: drop it before binding.
            if let Some(old) = handle.take() {
                old.shutdown();
            }
            *handle = Some(start_engine(&cfg, self.slot.index)?);
        }
        self.slot.start_http(None).await
    }
}

fn start_engine(cfg: &SimConfig, i: usize) -> Result<EngineHandle, FleetError> {
    EngineHandle::start(cfg.clone()).map_err(|e| FleetError::Engine(i, e))
}

/// A running fleet. Stop it with [`Fleet::shutdown`]; dropping it aborts its servers and
/// joins its engines.
pub struct Fleet {
    slots: Arc<[Arc<Slot>]>,
    oracle: Option<HttpServer>,
    cfg: FleetConfig,
}

impl Fleet {
    /// Starts the engines, their HTTP servers and the oracle on the current tokio runtime.
    pub async fn start(cfg: FleetConfig) -> Result<Fleet, FleetError> {
        if cfg.engines == 0 || cfg.flavours.is_empty() {
            return Err(FleetError::Empty);
        }
        let epoch = cfg.sim.epoch.unwrap_or_else(Instant::now);
        let host = cfg.sim.engine.host;
        let mut slots = Vec::with_capacity(cfg.engines);
        let mut listeners = Vec::with_capacity(cfg.engines);
        for i in 0..cfg.engines {
            let flavour = cfg.flavours[i % cfg.flavours.len()];
            let mut sim = cfg.sim.clone();
            sim.epoch = Some(epoch);
            sim.engine.wire = flavour.wire;
            sim.engine.hash_form = flavour.hash_form;
            sim.engine.replay_with_topic = flavour.replay == Replay::Topic;
            sim.engine.replay_port = match flavour.replay {
                Replay::None => None,
                _ => Some(sim.engine.replay_port.unwrap_or(0)),
            };
            sim.engine.seed = cfg
                .sim
                .engine
                .seed
                .wrapping_mul(1000)
                .wrapping_add(i as u64);
            sim.engine.vocab = cfg.sim.sched.vocab;
            let handle = start_engine(&sim, i)?;
            // A restart binds the same ports.
            sim.engine.pub_port = handle.pub_port();
            sim.engine.replay_port = handle.replay_port();
            let name = format!("sim-{i}");
            let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, 0))
                .await
                .map_err(|source| FleetError::Bind {
                    what: format!("{name}'s HTTP port"),
                    source,
                })?;
            let http_addr = listener.local_addr().map_err(|source| FleetError::Bind {
                what: format!("{name}'s HTTP port"),
                source,
            })?;
            let mut http_cfg = HttpConfig::new(&cfg.model);
            http_cfg.vocab = cfg.sim.sched.vocab;
            http_cfg.tokenizer = cfg.tokenizer.clone();
            http_cfg.num_gpu_blocks = Some(cfg.sim.engine.num_blocks);
            slots.push(Arc::new(Slot {
                name,
                flavour,
                http_addr,
                http_cfg,
                cfg: Mutex::new(sim),
                index: i,
                handle: RwLock::new(Some(handle)),
                server: tokio::sync::Mutex::new(None),
            }));
            listeners.push(listener);
        }
        for (slot, listener) in slots.iter().zip(listeners) {
            slot.start_http(Some(listener)).await?;
        }
        let slots: Arc<[Arc<Slot>]> = slots.into();
        let oracle = match cfg.oracle_port {
            None => None,
            Some(port) => {
                let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, port))
                    .await
                    .map_err(|source| FleetError::Bind {
                        what: format!("the oracle's port {port}"),
                        source,
                    })?;
                let mut http_cfg = HttpConfig::new(&cfg.model);
                http_cfg.vocab = cfg.sim.sched.vocab;
                http_cfg.tokenizer = cfg.tokenizer.clone();
                http_cfg.engine_label = "oracle".to_owned();
                let backend: Arc<dyn Backend> = Arc::new(oracle::Oracle::new(slots.clone(), epoch));
                let router = http::router(backend, http_cfg)?;
                Some(
                    HttpServer::start(listener, router).map_err(|source| FleetError::Bind {
                        what: "the oracle's port".to_owned(),
                        source,
                    })?,
                )
            }
        };
        Ok(Fleet { slots, oracle, cfg })
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Engine `i`'s controls. Panics when `i >= len()` (as slice indexing).
    pub fn engine(&self, i: usize) -> FleetEngine {
        FleetEngine {
            slot: self.slots[i].clone(),
        }
    }

    /// Every engine, as the JSON lines say.
    pub fn infos(&self) -> Vec<EngineInfo> {
        self.slots.iter().map(|s| s.info()).collect()
    }

    /// The oracle router's URL, if it runs.
    pub fn oracle_url(&self) -> Option<String> {
        self.oracle.as_ref().map(|o| format!("http://{}", o.addr()))
    }

    /// A static pod file (`kubectl get pods -o yaml` shape) with one ready pod per engine:
    /// what `kvsync serve --pods` reads.
    pub fn pod_file(&self) -> String {
        let mut s = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for slot in self.slots.iter() {
            let (pub_port, replay_port) = {
                let cfg = slot.cfg.lock();
                (cfg.engine.pub_port, cfg.engine.replay_port)
            };
            s.push_str(&pod_yaml(&PodSpec {
                name: &slot.name,
                namespace: &self.cfg.namespace,
                model: &self.cfg.model,
                ip: slot.http_addr.ip(),
                pub_port,
                replay_port,
                http_port: slot.http_addr.port(),
            }));
        }
        s
    }

    /// Writes [`Fleet::pod_file`] to `path` atomically (a watcher never reads half a file).
    pub fn write_pod_file(&self, path: &Path) -> Result<(), FleetError> {
        let err = |source| FleetError::PodFile {
            path: path.display().to_string(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(self.pod_file().as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Stops the oracle and every engine's HTTP side (open requests get [`GRACE`] to finish),
    /// then every engine; every task and thread is joined.
    pub async fn shutdown(mut self) {
        if let Some(o) = self.oracle.take() {
            o.stop(GRACE).await;
        }
        for slot in self.slots.iter() {
            let server = slot.server.lock().await.take();
            if let Some(s) = server {
                s.stop(GRACE).await;
            }
        }
        for slot in self.slots.iter() {
            if let Some(h) = slot.handle.write().take() {
                h.shutdown();
            }
        }
    }
}

/// What one pod of the pod file says.
#[derive(Debug, Clone)]
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub model: &'a str,
    pub ip: IpAddr,
    pub pub_port: u16,
    pub replay_port: Option<u16>,
    pub http_port: u16,
}

/// One list item of a pod file: a ready pod with the labels and annotations kvsync reads
/// (`crates/kvsync/src/pods/mod.rs`) and its HTTP port as [`ANN_HTTP_PORT`].
pub fn pod_yaml(p: &PodSpec<'_>) -> String {
    // An engine without a replay socket is announced as such (not left to the default port).
    let replay = p.replay_port.map_or("none".to_owned(), |p| p.to_string());
    // JSON strings are YAML double-quoted scalars: any model name stays one value.
    let q = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: {name}\n    namespace: {ns}\n    uid: {uid}\n    labels:\n      model.aibrix.ai/kv-events-enabled: \"true\"\n      model.aibrix.ai/name: {model}\n    annotations:\n      model.aibrix.ai/kv-events-port: \"{pub_port}\"\n      model.aibrix.ai/kv-events-replay-port: \"{replay}\"\n      {ANN_HTTP_PORT}: \"{http}\"\n  status:\n    phase: Running\n    podIP: \"{ip}\"\n    conditions:\n    - type: Ready\n      status: \"True\"\n",
        name = q(p.name),
        uid = q(&format!("{}-uid", p.name)),
        ns = q(p.namespace),
        model = q(p.model),
        pub_port = p.pub_port,
        http = p.http_port,
        ip = p.ip,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavours_parse_and_print() {
        for s in [
            "0.33:int:topic",
            "0.24:bytes:plain",
            "0.14:int:none",
            "0.9:int:plain",
        ] {
            assert_eq!(s.parse::<Flavour>().expect(s).to_string(), s);
        }
        for bad in [
            "0.33",
            "0.99:int:topic",
            "0.33:hex:topic",
            "0.33:int:maybe",
            "",
        ] {
            let e = bad.parse::<Flavour>().expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(Flavour::demo_mix().len(), 3);
    }
}
