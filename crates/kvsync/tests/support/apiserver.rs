//! A fake Kubernetes API server for pods, driven by the test, speaking what kube-runtime's
//! watcher uses: LIST (with `metadata.resourceVersion`), WATCH from a resourceVersion as a
//! stream of JSON lines (ADDED / MODIFIED / DELETED / BOOKMARK), `410 Gone` (an ERROR event
//! with a Status) for a resourceVersion older than the last compaction, label selectors
//! evaluated on the server, and cuts of open watch streams.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures::stream;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Default)]
struct Store {
    rv: u64,
    pods: BTreeMap<String, Pod>,
    /// (resourceVersion, type, object, the object before) of every change.
    log: Vec<(u64, &'static str, Value, Option<Value>)>,
    /// While paused, open watches deliver nothing (a network partition).
    paused: bool,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Watch cuts so far: a stream opened before the latest one ends. Kept with `paused`
    /// under one lock, so a stream that sees the partition over also sees the cut made before.
    cuts: u64,
    queries: Vec<String>,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    /// Bumped on every change, so open watches wake up.
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch.
    cut: watch::Sender<u64>,
}

pub struct FakeApiServer {
    shared: Shared,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

fn key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

fn matches(selector: Option<&str>, obj: &Value) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => obj["metadata"]["labels"][k.trim()].as_str() == Some(v.trim()),
        None => obj["metadata"]["labels"].get(term.trim()).is_some(),
    })
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let shared = Shared {
            store: Arc::new(Mutex::new(Store::default())),
            changed: watch::channel(0).0,
            cut: watch::channel(0).0,
        };
        let app = Router::new()
            .route("/api/v1/pods", get(all_pods))
            .route("/api/v1/namespaces/{ns}/pods", get(ns_pods))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeApiServer { shared, url, task }
    }

    pub fn client(&self) -> kube::Client {
        let cfg = kube::Config::new(self.url.parse().expect("url"));
        kube::Client::try_from(cfg).expect("client")
    }

    fn record(&self, kind: &'static str, mut pod: Pod) {
        let mut s = self.shared.store.lock().expect("store");
        s.rv += 1;
        pod.metadata.resource_version = Some(s.rv.to_string());
        let obj = serde_json::to_value(&pod).expect("pod json");
        let rv = s.rv;
        let before = if kind == "DELETED" {
            s.pods.remove(&key(&pod))
        } else {
            s.pods.insert(key(&pod), pod)
        };
        let before = before.map(|p| serde_json::to_value(&p).expect("pod json"));
        s.log.push((rv, kind, obj, before));
        drop(s);
        self.shared.changed.send_modify(|v| *v += 1);
    }

    /// Creates or updates a pod (ADDED or MODIFIED).
    pub fn apply(&self, pod: Pod) {
        let exists = self
            .shared
            .store
            .lock()
            .expect("store")
            .pods
            .contains_key(&key(&pod));
        self.record(if exists { "MODIFIED" } else { "ADDED" }, pod);
    }

    pub fn delete(&self, namespace: &str, name: &str) {
        let k = format!("{namespace}/{name}");
        let pod = self
            .shared
            .store
            .lock()
            .expect("store")
            .pods
            .get(&k)
            .cloned();
        if let Some(p) = pod {
            self.record("DELETED", p);
        }
    }

    /// Forgets the change history: a watch resuming from before now gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.shared.store.lock().expect("store");
        s.compacted = s.rv + 1;
    }

    /// Open watches stop delivering (or deliver again).
    pub fn pause(&self, on: bool) {
        self.shared.store.lock().expect("store").paused = on;
        self.shared.changed.send_modify(|v| *v += 1);
    }

    /// Ends every open watch stream (clients resume from their last resourceVersion).
    pub fn cut_watches(&self) {
        self.shared.store.lock().expect("store").cuts += 1;
        self.shared.cut.send_modify(|v| *v += 1);
    }

    /// Every request's query string so far.
    pub fn queries(&self) -> Vec<String> {
        self.shared.store.lock().expect("store").queries.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn all_pods(
    State(s): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    raw: axum::extract::RawQuery,
) -> Response {
    pods(s, None, q, raw.0.unwrap_or_default()).await
}

async fn ns_pods(
    State(s): State<Shared>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    raw: axum::extract::RawQuery,
) -> Response {
    pods(s, Some(ns), q, raw.0.unwrap_or_default()).await
}

async fn pods(s: Shared, ns: Option<String>, q: HashMap<String, String>, raw: String) -> Response {
    let selector = q.get("labelSelector").cloned();
    let in_ns = move |obj: &Value| {
        ns.as_deref()
            .is_none_or(|n| obj["metadata"]["namespace"].as_str() == Some(n))
    };
    s.store.lock().expect("store").queries.push(raw);
    if q.get("watch").map(String::as_str) != Some("true") {
        let st = s.store.lock().expect("store");
        let items: Vec<Value> = st
            .pods
            .values()
            .map(|p| serde_json::to_value(p).expect("json"))
            .filter(|o| in_ns(o) && matches(selector.as_deref(), o))
            .collect();
        let body = json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("response");
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    if from < s.store.lock().expect("store").compacted {
        let gone = json!({"type": "ERROR", "object": {
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": format!("too old resource version: {from}"),
            "reason": "Expired", "code": 410}});
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(format!("{gone}\n")))
            .expect("response");
    }
    // The stream: changes after `from`, then wait for more; a BOOKMARK at each wait when asked;
    // ends when the test cuts watches.
    struct W {
        s: Shared,
        /// `Store::cuts` when the stream opened.
        cuts: u64,
        last: u64,
        changed: watch::Receiver<u64>,
        cut: watch::Receiver<u64>,
        selector: Option<String>,
        bookmarks: bool,
        sent_bookmark_at: u64,
    }
    let mut changed = s.changed.subscribe();
    changed.mark_unchanged();
    let mut cut = s.cut.subscribe();
    cut.mark_unchanged();
    let cuts = s.store.lock().expect("store").cuts;
    let w = W {
        s,
        cuts,
        last: from,
        changed,
        cut,
        selector,
        bookmarks,
        sent_bookmark_at: from,
    };
    let body = stream::unfold((w, in_ns), |(mut w, in_ns)| async move {
        loop {
            // A cut ends the stream before it delivers anything more, even when the stream
            // wakes only after the partition is over (the changes made during it must come
            // through the resumed watch or a relist, never this stream).
            if w.cut.has_changed().unwrap_or(true) {
                return None;
            }
            let (lines, rv, paused) = {
                let st = w.s.store.lock().expect("store");
                if st.cuts != w.cuts {
                    // Cut between the check above and this lock (the test thread may also
                    // have ended the partition since): deliver nothing more.
                    return None;
                }
                let sel = w.selector.as_deref();
                // As the API server does: an object entering the selection is ADDED, one
                // leaving it is DELETED.
                let lines: Vec<String> = st
                    .log
                    .iter()
                    .filter(|(rv, _, o, _)| *rv > w.last && in_ns(o))
                    .filter_map(|(_, t, o, before)| {
                        let now = matches(sel, o) && *t != "DELETED";
                        let was = before.as_ref().is_some_and(|b| matches(sel, b));
                        let kind = match (was, now) {
                            (false, true) => "ADDED",
                            (true, true) => "MODIFIED",
                            (true, false) => "DELETED",
                            (false, false) => return None,
                        };
                        Some(json!({"type": kind, "object": o}).to_string() + "\n")
                    })
                    .collect();
                (lines, st.rv, st.paused)
            };
            if paused {
                tokio::select! {
                    biased; // a cut wins over anything else that happened meanwhile
                    _ = w.cut.changed() => return None,
                    r = w.changed.changed() => if r.is_err() { return None },
                }
                continue;
            }
            w.last = rv;
            if !lines.is_empty() {
                return Some((Ok::<_, Infallible>(lines.concat()), (w, in_ns)));
            }
            if w.bookmarks && w.sent_bookmark_at < rv {
                w.sent_bookmark_at = rv;
                let b = json!({"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"resourceVersion": rv.to_string()}}});
                return Some((Ok(format!("{b}\n")), (w, in_ns)));
            }
            tokio::select! {
                biased;
                _ = w.cut.changed() => return None,
                r = w.changed.changed() => if r.is_err() { return None },
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(body))
        .expect("response")
}
