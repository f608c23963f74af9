//! `kvsync serve`: the index, the subscriber hub (when KV sync is on), a pod source and the
//! manager, run until shutdown. (The HTTP API comes with the service issue.)

use crate::config::Config;
use crate::manager::{Manager, ManagerConfig};
use crate::source;
use anyhow::{Context, Result};
use kv_events::Hub;
use prefix_index::{Index, IndexConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Command-line options of `serve` (the AIBRIX_* variables are in [`Config`]).
#[derive(Debug, Clone)]
pub struct Options {
    pub pods_file: Option<PathBuf>,
    pub namespaces: Vec<String>,
    pub pods_interval: Duration,
    pub index_max_bytes: usize,
}

/// Runs until `shutdown` resolves; then stops every subscriber and waits for every task.
pub async fn run(
    cfg: Config,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let index = Arc::new(Index::new(
        IndexConfig::default()
            .max_bytes(opts.index_max_bytes)
            .max_contexts(cfg.max_contexts)
            .max_blocks_per_context(cfg.max_prefixes_per_context),
    ));
    let hub = if cfg.kv_sync {
        Some(Arc::new(
            Hub::start().context("starting the ZeroMQ poller")?,
        ))
    } else {
        tracing::info!("KV event sync is off: no subscriber will be created");
        None
    };
    let mcfg = ManagerConfig {
        replay_timeout: cfg.replay_timeout,
        ..ManagerConfig::default()
    };
    let manager = Manager::new(mcfg, index.clone(), hub.clone());
    let (events, scopes) = match &opts.pods_file {
        Some(path) => (source::file(path.clone(), opts.pods_interval), 1),
        None => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to Kubernetes (in-cluster or KUBECONFIG); use --pods FILE without a cluster")?;
            let n = opts.namespaces.len().max(1);
            (source::kubernetes(client, &opts.namespaces), n)
        }
    };
    let mut ready = manager.ready();
    let token = CancellationToken::new();
    let task = tokio::spawn(manager.run(events, scopes, token.clone()));
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => {},
        r = ready.wait_for(|r| *r) => {
            if r.is_ok() {
                tracing::info!("ready: the first pod list is applied");
            }
            shutdown.await;
        }
    }
    token.cancel();
    task.await.context("manager task")?;
    if let Some(hub) = hub {
        if let Ok(h) = Arc::try_unwrap(hub) {
            h.shutdown();
        }
    }
    let s = index.stats();
    tracing::info!(blocks = s.blocks, workers = s.workers, "stopped");
    Ok(())
}
