//! Pod sources behind one stream type: Kubernetes (kube-runtime's watcher, label selector on
//! the server) or a static pod file, re-read when it changes.
//!
//! Both speak the watcher's vocabulary: `Init`, `InitApply`…, `InitDone` is a complete list
//! (pods absent from it are gone), then `Apply`/`Delete` one by one. Each stream item carries a
//! scope (one per namespace watched) so a relist of one namespace does not touch another.

use crate::pods::{parse_pod_file, LABEL_ENABLED};
use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// One change to the set of pods.
#[derive(Debug, Clone)]
pub enum PodEvent {
    /// A full list starts.
    Init,
    InitApply(Box<Pod>),
    /// The full list is complete: pods of this scope not in it are gone.
    InitDone,
    Apply(Box<Pod>),
    Delete(Box<Pod>),
}

/// A stream of (scope, event).
pub type PodStream = BoxStream<'static, (usize, PodEvent)>;

/// The server-side label selector.
pub fn selector() -> String {
    format!("{LABEL_ENABLED}=true")
}

/// Watches pods through the API server: every namespace, or each of `namespaces`.
pub fn kubernetes(client: Client, namespaces: &[String]) -> PodStream {
    let apis: Vec<Api<Pod>> = if namespaces.is_empty() {
        vec![Api::all(client)]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let streams = apis.into_iter().enumerate().map(|(scope, api)| {
        watcher(api, watcher::Config::default().labels(&selector()))
            .default_backoff()
            .filter_map(move |r| async move {
                match r {
                    Ok(e) => Some((scope, convert(e))),
                    Err(e) => {
                        tracing::warn!(error = %e, "pod watch error (retrying with backoff)");
                        None
                    }
                }
            })
            .boxed()
    });
    stream::select_all(streams).boxed()
}

fn convert(e: watcher::Event<Pod>) -> PodEvent {
    match e {
        watcher::Event::Init => PodEvent::Init,
        watcher::Event::InitApply(p) => PodEvent::InitApply(Box::new(p)),
        watcher::Event::InitDone => PodEvent::InitDone,
        watcher::Event::Apply(p) => PodEvent::Apply(Box::new(p)),
        watcher::Event::Delete(p) => PodEvent::Delete(Box::new(p)),
    }
}

/// A static pod file (`kubectl get pods -o yaml`, or `---`-separated Pods): listed at start and
/// again whenever its modification time or size changes (checked every `interval`). A file that
/// does not parse is reported and the last good list kept.
pub fn file(path: PathBuf, interval: Duration) -> PodStream {
    struct State {
        path: PathBuf,
        interval: Duration,
        seen: Option<(SystemTime, u64)>,
        first: bool,
    }
    let init = State {
        path,
        interval,
        seen: None,
        first: true,
    };
    stream::unfold(init, |mut st| async move {
        loop {
            if !st.first {
                tokio::time::sleep(st.interval).await;
            }
            st.first = false;
            let meta = match tokio::fs::metadata(&st.path).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(path = %st.path.display(), error = %e, "pod file unreadable");
                    continue;
                }
            };
            let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
            if st.seen == Some(stamp) {
                continue;
            }
            let text = match tokio::fs::read_to_string(&st.path).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(path = %st.path.display(), error = %e, "pod file unreadable");
                    continue;
                }
            };
            st.seen = Some(stamp);
            match parse_pod_file(&text) {
                Ok(pods) => {
                    tracing::info!(path = %st.path.display(), pods = pods.len(), "pod file loaded");
                    let mut events = vec![(0, PodEvent::Init)];
                    events.extend(
                        pods.into_iter()
                            .map(|p| (0, PodEvent::InitApply(Box::new(p)))),
                    );
                    events.push((0, PodEvent::InitDone));
                    return Some((stream::iter(events), st));
                }
                Err(e) => {
                    tracing::error!(path = %st.path.display(), error = %e, "pod file rejected; keeping the last good list");
                }
            }
        }
    })
    .flatten()
    .boxed()
}
