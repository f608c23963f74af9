//! Pods: what kvsync needs to know of a pod and whether it is eligible for KV event sync
//! (labels, phase, readiness, IP, ports and data-parallel size from annotations), the static
//! pod file's format, and [`source`]: where pod events come from (the Kubernetes API through
//! kube-runtime's watcher, or the static file re-read when it changes).

pub mod source;

use k8s_openapi::api::core::v1::Pod;
use std::fmt;

/// The label that opts a pod in (selected on the API server side).
pub const LABEL_ENABLED: &str = "model.aibrix.ai/kv-events-enabled";
/// The label naming the pod's model.
pub const LABEL_MODEL: &str = "model.aibrix.ai/name";
/// The label naming the pod's LoRA adapter (used when an event names none).
pub const LABEL_LORA: &str = "model.aibrix.ai/lora-id";
/// Annotations overriding the defaults.
pub const ANN_PORT: &str = "model.aibrix.ai/kv-events-port";
pub const ANN_REPLAY_PORT: &str = "model.aibrix.ai/kv-events-replay-port";
pub const ANN_DP_SIZE: &str = "model.aibrix.ai/data-parallel-size";
pub const ANN_TOPIC: &str = "model.aibrix.ai/kv-events-topic";
/// The annotation naming the port of the pod's OpenAI-compatible HTTP API (what the proxy
/// forwards to; AIBrix's name for the engine's port).
pub const ANN_HTTP_PORT: &str = "model.aibrix.ai/port";

pub const DEFAULT_PORT: u16 = 5557;
pub const DEFAULT_REPLAY_PORT: u16 = 5558;
/// vLLM's default `--port`.
pub const DEFAULT_HTTP_PORT: u16 = 8000;
/// A sanity bound on `data-parallel-size`.
pub const MAX_DP_SIZE: u32 = 256;

/// Why a pod gets no subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ineligible {
    NotOptedIn,
    NoModel,
    NotRunning(String),
    NotReady,
    NoIp,
    Terminating,
    BadAnnotation(String),
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::NotOptedIn => write!(f, "label {LABEL_ENABLED}=\"true\" missing"),
            Ineligible::NoModel => write!(f, "label {LABEL_MODEL} missing"),
            Ineligible::NotRunning(p) => write!(f, "phase {p}, not Running"),
            Ineligible::NotReady => write!(f, "not Ready"),
            Ineligible::NoIp => write!(f, "no pod IP"),
            Ineligible::Terminating => write!(f, "terminating"),
            Ineligible::BadAnnotation(a) => write!(f, "bad annotation: {a}"),
        }
    }
}

/// Where and how to subscribe to one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub ip: String,
    pub model: String,
    pub lora: Option<String>,
    pub port: u16,
    /// None: the engine has no replay socket (annotation value `none`; vLLM's default when
    /// `replay_endpoint` is not configured): gaps are reported at once instead of after a
    /// replay request times out.
    pub replay_port: Option<u16>,
    pub dp_size: u32,
    pub topic: String,
    /// The engine's HTTP API port (one for every rank: vLLM's API server picks the rank from
    /// the `X-data-parallel-rank` header).
    pub http_port: u16,
}

impl Target {
    pub fn endpoint(&self, rank: u32) -> String {
        format!("tcp://{}:{}", host(&self.ip), u32::from(self.port) + rank)
    }

    /// The engine's HTTP API, e.g. `http://10.0.0.7:8000`.
    pub fn base_url(&self) -> String {
        format!("http://{}:{}", host(&self.ip), self.http_port)
    }

    pub fn replay_endpoint(&self, rank: u32) -> Option<String> {
        let p = self.replay_port?;
        Some(format!("tcp://{}:{}", host(&self.ip), u32::from(p) + rank))
    }
}

/// IPv6 addresses go in brackets in a ZeroMQ endpoint.
fn host(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    }
}

/// A pod as kvsync sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `namespace/name`.
    pub key: String,
    pub uid: String,
    /// Restarts of all its containers: a container restart is a new engine.
    pub restarts: i64,
    pub target: Result<Target, Ineligible>,
}

impl PodInfo {
    /// The identity of one engine incarnation: subscriptions and index state belong to it.
    pub fn incarnation(&self) -> Option<(String, i64, Target)> {
        self.target
            .as_ref()
            .ok()
            .map(|t| (self.uid.clone(), self.restarts, t.clone()))
    }
}

/// The `namespace/name` key of a pod.
pub fn key_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// Reads what kvsync needs of a pod and decides its eligibility.
pub fn info(pod: &Pod) -> PodInfo {
    let restarts = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| i64::from(c.restart_count)).sum());
    PodInfo {
        key: key_of(pod),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        restarts,
        target: target(pod),
    }
}

fn target(pod: &Pod) -> Result<Target, Ineligible> {
    let labels = pod.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    if label(LABEL_ENABLED) != Some("true") {
        return Err(Ineligible::NotOptedIn);
    }
    let model = label(LABEL_MODEL)
        .filter(|m| !m.is_empty())
        .ok_or(Ineligible::NoModel)?;
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(Ineligible::Terminating);
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    if phase != "Running" {
        return Err(Ineligible::NotRunning(phase.to_owned()));
    }
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return Err(Ineligible::NotReady);
    }
    let ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
        .ok_or(Ineligible::NoIp)?;
    let ann = pod.metadata.annotations.as_ref();
    let annotation = |k: &str| ann.and_then(|a| a.get(k)).map(|v| v.trim());
    let port = |k: &str, default: u16| -> Result<u16, Ineligible> {
        match annotation(k) {
            None => Ok(default),
            Some(v) => v
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Ineligible::BadAnnotation(format!("{k}={v:?} is not a port"))),
        }
    };
    let pub_port = port(ANN_PORT, DEFAULT_PORT)?;
    let http_port = port(ANN_HTTP_PORT, DEFAULT_HTTP_PORT)?;
    let replay_port = match annotation(ANN_REPLAY_PORT) {
        Some(v) if v.eq_ignore_ascii_case("none") => None,
        _ => Some(port(ANN_REPLAY_PORT, DEFAULT_REPLAY_PORT)?),
    };
    let dp_size = match annotation(ANN_DP_SIZE) {
        None => 1,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_DP_SIZE).contains(n))
            .ok_or_else(|| {
                Ineligible::BadAnnotation(format!("{ANN_DP_SIZE}={v:?} is not 1..={MAX_DP_SIZE}"))
            })?,
    };
    // Rank r uses port + r and replay port + r: the two ranges must not meet or overflow.
    let p0 = u32::from(pub_port);
    let r0 = replay_port.map(u32::from);
    if p0 + dp_size > 65_536 || r0.is_some_and(|r0| r0 + dp_size > 65_536) {
        return Err(Ineligible::BadAnnotation(format!(
            "ports + data-parallel-size {dp_size} exceed 65535"
        )));
    }
    if let Some(r0) = r0.filter(|&r0| p0 < r0 + dp_size && r0 < p0 + dp_size) {
        return Err(Ineligible::BadAnnotation(format!(
            "port range {p0}..{} and replay range {r0}..{} overlap",
            p0 + dp_size,
            r0 + dp_size
        )));
    }
    Ok(Target {
        ip: ip.to_owned(),
        model: model.to_owned(),
        lora: label(LABEL_LORA)
            .filter(|l| !l.is_empty())
            .map(str::to_owned),
        port: pub_port,
        replay_port,
        dp_size,
        topic: annotation(ANN_TOPIC).unwrap_or("").to_owned(),
        http_port,
    })
}

/// Parses a static pod file: a `List`/`PodList` (as `kubectl get pods -o yaml` prints) or a
/// stream of `Pod` documents.
pub fn parse_pod_file(text: &str) -> Result<Vec<Pod>, String> {
    let mut pods = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        match kind {
            "Pod" => pods.push(
                serde_yaml::from_value(value)
                    .map_err(|e| format!("document {}: Pod: {e}", i + 1))?,
            ),
            "List" | "PodList" => {
                let items = value
                    .get("items")
                    .and_then(|v| v.as_sequence())
                    .cloned()
                    .unwrap_or_default();
                for (j, item) in items.into_iter().enumerate() {
                    pods.push(
                        serde_yaml::from_value(item)
                            .map_err(|e| format!("document {}: items[{j}]: {e}", i + 1))?,
                    );
                }
            }
            other => {
                return Err(format!(
                    "document {}: kind {other:?} is not Pod or List",
                    i + 1
                ))
            }
        }
    }
    Ok(pods)
}

use serde::Deserialize;

#[cfg(test)]
mod tests {
    use super::*;

    const READY: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: vllm-0
  namespace: ml
  uid: u-1
  labels:
    model.aibrix.ai/kv-events-enabled: "true"
    model.aibrix.ai/name: llama
status:
  phase: Running
  podIP: 10.0.0.7
  conditions:
  - type: Ready
    status: "True"
  containerStatuses:
  - name: vllm
    restartCount: 2
    ready: true
    image: vllm
    imageID: ""
"#;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).expect("pod yaml")
    }

    #[test]
    fn a_ready_labelled_pod_is_eligible_with_defaults() {
        let i = info(&pod(READY));
        assert_eq!(i.key, "ml/vllm-0");
        assert_eq!(i.restarts, 2);
        let t = i.target.expect("eligible");
        assert_eq!(t.endpoint(0), "tcp://10.0.0.7:5557");
        assert_eq!(t.replay_endpoint(1).as_deref(), Some("tcp://10.0.0.7:5559"));
        assert_eq!(
            (t.model.as_str(), t.lora.as_deref(), t.dp_size),
            ("llama", None, 1)
        );
        assert_eq!(t.http_port, DEFAULT_HTTP_PORT);
        assert_eq!(t.base_url(), "http://10.0.0.7:8000");
    }

    #[test]
    fn each_missing_condition_is_named() {
        let cases = [
            (
                READY.replace(
                    "kv-events-enabled: \"true\"",
                    "kv-events-enabled: \"false\"",
                ),
                Ineligible::NotOptedIn,
            ),
            (
                READY.replace("model.aibrix.ai/name: llama", "other: x"),
                Ineligible::NoModel,
            ),
            (
                READY.replace("phase: Running", "phase: Pending"),
                Ineligible::NotRunning("Pending".into()),
            ),
            (
                READY.replace("status: \"True\"", "status: \"False\""),
                Ineligible::NotReady,
            ),
            (
                READY.replace("podIP: 10.0.0.7", "podIP: \"\""),
                Ineligible::NoIp,
            ),
            (
                READY.replace(
                    "  uid: u-1",
                    "  uid: u-1\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"",
                ),
                Ineligible::Terminating,
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(info(&pod(&yaml)).target, Err(want));
        }
    }

    #[test]
    fn annotations_override_ports_dp_size_and_topic_and_are_checked() {
        let with =
            |ann: &str| READY.replace("  uid: u-1", &format!("  uid: u-1\n  annotations:\n{ann}"));
        let t = info(&pod(&with(
            "    model.aibrix.ai/kv-events-port: \"6000\"\n    model.aibrix.ai/kv-events-replay-port: \"7000\"\n    model.aibrix.ai/data-parallel-size: \"2\"\n    model.aibrix.ai/kv-events-topic: kv",
        )))
        .target
        .expect("eligible");
        assert_eq!(
            (t.port, t.replay_port, t.dp_size, t.topic.as_str()),
            (6000, Some(7000), 2, "kv")
        );
        assert_eq!(t.replay_endpoint(1).as_deref(), Some("tcp://10.0.0.7:7001"));
        // An engine without a replay socket.
        let none = info(&pod(&with(
            "    model.aibrix.ai/kv-events-replay-port: \"None\"\n    model.aibrix.ai/data-parallel-size: \"2\"",
        )))
        .target
        .expect("eligible");
        assert_eq!((none.replay_port, none.replay_endpoint(0)), (None, None));
        assert_eq!(none.endpoint(1), "tcp://10.0.0.7:5558");
        assert_eq!(t.endpoint(1), "tcp://10.0.0.7:6001");
        // Ranges 5557..5559 and 5558..5560 overlap.
        let bad = info(&pod(&with("    model.aibrix.ai/data-parallel-size: \"2\""))).target;
        assert!(
            matches!(bad, Err(Ineligible::BadAnnotation(ref m)) if m.contains("overlap")),
            "{bad:?}"
        );
        let bad = info(&pod(&with("    model.aibrix.ai/kv-events-port: \"http\""))).target;
        assert!(matches!(bad, Err(Ineligible::BadAnnotation(_))));
        // The HTTP API's port.
        let http = info(&pod(&with("    model.aibrix.ai/port: \"8080\""))).target;
        assert_eq!(
            http.map(|t| t.base_url()),
            Ok("http://10.0.0.7:8080".into())
        );
        let bad = info(&pod(&with("    model.aibrix.ai/port: \"0\""))).target;
        assert!(
            matches!(bad, Err(Ineligible::BadAnnotation(ref m)) if m.contains("model.aibrix.ai/port")),
            "{bad:?}"
        );
    }

    #[test]
    fn pod_files_are_lists_or_document_streams() {
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n{}",
            READY
                .trim_start()
                .lines()
                .map(|l| format!("  {l}\n"))
                .collect::<String>()
                .replacen("  apiVersion", "- apiVersion", 1)
        );
        assert_eq!(parse_pod_file(&list).expect("list").len(), 1);
        let stream = format!("{READY}\n---\n{}", READY.replace("vllm-0", "vllm-1"));
        let pods = parse_pod_file(&stream).expect("stream");
        assert_eq!(
            pods.iter().map(key_of).collect::<Vec<_>>(),
            ["ml/vllm-0", "ml/vllm-1"]
        );
        let err = parse_pod_file("kind: Service\n").expect_err("not pods");
        assert!(err.contains("Service"), "{err}");
    }
}
