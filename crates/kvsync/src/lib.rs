//! kvsync: an exact, fleet-wide index of which vLLM pod holds which prefix of tokens in its KV
//! cache, fed by vLLM's KV cache events, answering routing queries.
//!
//! ```text
//!  pods/ (Kubernetes watcher or a static file) ──PodEvent──▶ manager ──subscribe──▶ kv-subscriber
//!                                                               │ applies each batch (poller thread)
//!                                                               ▼
//!  http/ POST /v1/route ──tokens (tokenize/ for text)──▶ prefix-index ──lookup──▶ route/ (choice)
//!  http/ /metrics (metrics), /v1/pods, /v1/models, /healthz, /readyz
//!  proxy/ POST /v1/chat/completions, /v1/completions ──tokens──▶ the same choice (index + load/)
//!         ──body unchanged──▶ the pod's HTTP port ──answer relayed as it arrives──▶ client
//! ```
//!
//! - [`pods`]: eligibility and the pod sources; [`manager`]: one subscription per eligible pod
//!   and rank, incarnations, the index's feed;
//! - [`http`]: the server, request parsing, the route handler; [`route`]: the choice (pure) and
//!   the recent decisions; [`tokenize`]: the remote tokenizer client;
//! - [`proxy`]: the OpenAI-compatible front that forwards to the chosen pod; [`load`]: in-flight
//!   requests per pod (guards) and the scraped `/metrics` of each pod;
//! - [`metrics`], [`config`] (the `AIBRIX_*` variables), [`serve`] (wires it all and runs until
//!   shutdown), [`cli`] (the subcommands; `kvsync demo` is the `kvsync-demo` crate).

pub mod cli;
pub mod config;
pub mod http;
pub mod load;
pub mod manager;
pub mod metrics;
pub mod pods;
pub mod proxy;
pub mod route;
pub mod serve;
pub mod tokenize;
