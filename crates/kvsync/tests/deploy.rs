//! The deployment files agree with the binary: every manifest parses into the typed Kubernetes
//! objects; selectors, probe paths, ports, RBAC verbs and environment variables match what
//! `kvsync serve` serves and reads; the example vLLM pods are what kvsync subscribes to; and
//! the docs' commands that need no cluster run as written.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The documents of a manifest file, as (kind, YAML value).
fn docs(file: &str) -> Vec<(String, serde_yaml::Value)> {
    let text = std::fs::read_to_string(repo().join(file)).expect("manifest");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .map(|v| (v["kind"].as_str().unwrap_or("").to_owned(), v))
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(docs: &[(String, serde_yaml::Value)], kind: &str) -> T {
    let found: Vec<&serde_yaml::Value> = docs
        .iter()
        .filter(|(k, _)| k == kind)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    serde_yaml::from_value(found[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// The one object of `kind` called `name`.
fn named<T: serde::de::DeserializeOwned>(
    docs: &[(String, serde_yaml::Value)],
    kind: &str,
    name: &str,
) -> T {
    let found: Vec<&serde_yaml::Value> = docs
        .iter()
        .filter(|(k, v)| k == kind && v["metadata"]["name"].as_str() == Some(name))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name}");
    serde_yaml::from_value(found[0].clone()).unwrap_or_else(|e| panic!("{kind} {name}: {e}"))
}

fn kvsync_help(sub: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kvsync"))
        .args([sub, "--help"])
        .output()
        .expect("runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kvsync_manifests_match_the_binary() {
    let d = docs("deploy/kubernetes/kvsync.yaml");
    let sa: ServiceAccount = one(&d, "ServiceAccount");
    let role: ClusterRole = one(&d, "ClusterRole");
    let binding: ClusterRoleBinding = one(&d, "ClusterRoleBinding");
    let deploy: Deployment = one(&d, "Deployment");
    let svc: Service = named(&d, "Service", "kvsync");
    let peers_svc: Service = named(&d, "Service", "kvsync-peers");

    // RBAC: pods, get/list/watch, nothing else; bound to the Deployment's ServiceAccount.
    let rules = role.rules.expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["pods".to_owned()][..])
    );
    let mut verbs = rules[0].verbs.clone();
    verbs.sort();
    assert_eq!(verbs, ["get", "list", "watch"]);
    assert_eq!(
        binding.role_ref.name,
        role.metadata.name.clone().expect("name")
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    let spec = deploy.spec.expect("spec");
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name, sa.metadata.name);

    // Selectors: Deployment → its pods → the Service.
    let pod_labels = spec
        .template
        .metadata
        .expect("metadata")
        .labels
        .expect("labels");
    let selector = spec.selector.match_labels.expect("matchLabels");
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    let svc_spec = svc.spec.expect("spec");
    let svc_selector: BTreeMap<String, String> = svc_spec.selector.expect("selector");
    assert!(svc_selector
        .iter()
        .all(|(k, v)| pod_labels.get(k) == Some(v)));

    // The container: `serve`, listening where the port, probes and Service point.
    let c = &pod.containers[0];
    let args = c.args.clone().expect("args");
    assert_eq!(args[0], "serve");
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .map(|i| args[i + 1].clone())
        .expect("--listen");
    let port: i32 = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let cport = &c.ports.as_ref().expect("ports")[0];
    assert_eq!(cport.container_port, port);
    let name = cport.name.clone().expect("port name");
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let g = p
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet");
        assert_eq!(
            g.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name.clone())
        );
        g.path.clone().expect("path")
    };
    assert_eq!(probe_path(&c.liveness_probe), "/healthz");
    assert_eq!(probe_path(&c.readiness_probe), "/readyz");
    let sport = &svc_spec.ports.expect("ports")[0];
    assert_eq!(
        sport.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name.clone()))
    );
    // The default listen port of `serve` is the one the manifests use.
    assert!(
        kvsync_help("serve").contains(&format!("0.0.0.0:{port}")),
        "serve --help default"
    );

    // The replicas' peers: a headless Service over the same pods and port, named by
    // KVSYNC_PEERS in the ServiceAccount's namespace (where the Deployment goes).
    let peers_spec = peers_svc.spec.expect("spec");
    assert_eq!(peers_spec.cluster_ip.as_deref(), Some("None"), "headless");
    assert!(peers_spec
        .selector
        .expect("selector")
        .iter()
        .all(|(k, v)| pod_labels.get(k) == Some(v)));
    assert_eq!(
        peers_spec.ports.expect("ports")[0].target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name.clone()))
    );
    let ns = subject.namespace.clone().expect("namespace");
    let env_peers = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "KVSYNC_PEERS")
        .and_then(|e| e.value.clone());
    assert_eq!(
        env_peers,
        Some(format!("kvsync-peers.{ns}.svc:{port}")),
        "KVSYNC_PEERS names the headless Service"
    );

    // Every environment variable is one kvsync reads.
    let help = kvsync_help("serve");
    for e in c.env.clone().expect("env") {
        let known = kvsync::config::VARIABLES.iter().any(|(k, _)| *k == e.name)
            || help.contains(&format!("env: {}=", e.name))
            || e.name == "RUST_LOG";
        assert!(known, "unknown variable {}", e.name);
    }
}

#[test]
fn servicemonitor_scrapes_the_metrics_port() {
    let d = docs("deploy/kubernetes/servicemonitor.yaml");
    let svc: Service = named(&docs("deploy/kubernetes/kvsync.yaml"), "Service", "kvsync");
    let peers_svc: Service = named(
        &docs("deploy/kubernetes/kvsync.yaml"),
        "Service",
        "kvsync-peers",
    );
    let sm = &d[0].1;
    assert_eq!(d[0].0, "ServiceMonitor");
    let want = svc.metadata.labels.expect("labels");
    let sel = sm["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels");
    for (k, v) in sel {
        assert_eq!(
            want.get(k.as_str().expect("key")).map(String::as_str),
            v.as_str()
        );
    }
    // The peers' headless Service covers the same pods: selected too, each replica would be
    // scraped twice.
    let peers_labels = peers_svc.metadata.labels.unwrap_or_default();
    assert!(
        !sel.iter().all(|(k, v)| {
            peers_labels
                .get(k.as_str().expect("key"))
                .map(String::as_str)
                == v.as_str()
        }),
        "the ServiceMonitor selects the peers' Service too"
    );
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["path"].as_str(), Some("/metrics"));
    let port_names: Vec<String> = svc
        .spec
        .expect("spec")
        .ports
        .expect("ports")
        .into_iter()
        .filter_map(|p| p.name)
        .collect();
    assert!(port_names
        .iter()
        .any(|n| Some(n.as_str()) == ep["port"].as_str()));
}

#[test]
fn the_example_vllm_pods_are_eligible_and_publish_where_kvsync_listens() {
    let d = docs("deploy/kubernetes/vllm-example.yaml");
    let deploy: Deployment = one(&d, "Deployment");
    let template = deploy.spec.expect("spec").template;
    let meta = template.metadata.clone().expect("metadata");
    // The template as a running, ready pod with an IP: kvsync subscribes to it.
    let mut pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "vllm-llama-0", "namespace": "default", "uid": "u",
                     "labels": meta.labels, "annotations": meta.annotations},
        "status": {"phase": "Running", "podIP": "10.0.0.9",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .expect("pod");
    pod.spec = template.spec.clone();
    let info = kvsync::pods::info(&pod);
    let target = info.target.expect("eligible");
    let args = template.spec.expect("spec").containers[0]
        .args
        .clone()
        .expect("args");
    assert!(
        args.contains(&"--enable-prefix-caching".to_owned()),
        "events need prefix caching"
    );
    let cfg_at = args
        .iter()
        .position(|a| a == "--kv-events-config")
        .expect("--kv-events-config");
    let cfg: serde_json::Value = serde_json::from_str(&args[cfg_at + 1]).expect("JSON config");
    assert_eq!(cfg["enable_kv_cache_events"], true);
    assert_eq!(cfg["publisher"], "zmq");
    let port_of = |ep: &str| {
        ep.rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("port")
    };
    let ep = cfg["endpoint"].as_str().expect("endpoint");
    assert!(ep.contains('*'), "the PUB binds so kvsync can connect");
    assert_eq!(port_of(ep), target.port);
    assert_eq!(
        port_of(cfg["replay_endpoint"].as_str().expect("replay on")),
        target.replay_port.expect("replay port")
    );
    assert_eq!(
        target.model,
        meta.labels.expect("labels")["model.aibrix.ai/name"]
    );
}

/// Code blocks fenced as ```sh no-cluster in the docs run as written (with `kvsync` on PATH,
/// from the repository root; in a clone without ../shared beside it, `../shared` stands for
/// `KVSYNC_SHARED_DIR`, as scripts/test sets it).
#[test]
fn docs_commands_that_need_no_cluster_run() {
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_kvsync"))
        .parent()
        .expect("dir")
        .to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let shared = std::env::var("KVSYNC_SHARED_DIR")
        .ok()
        .filter(|_| !repo().join("../shared").exists());
    let mut ran = 0;
    for doc in [
        "docs/operators-guide.md",
        "docs/architecture.md",
        "docs/performance.md",
        "docs/replicas.md",
    ] {
        let text = std::fs::read_to_string(repo().join(doc)).expect("doc");
        let mut in_block = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_block = !in_block && line.contains("no-cluster");
                continue;
            }
            if in_block && !line.trim().is_empty() {
                let cmd = match &shared {
                    Some(dir) => line.replace("../shared", dir),
                    None => line.to_owned(),
                };
                let out = Command::new("bash")
                    .args(["-c", &cmd])
                    .current_dir(repo())
                    .env("PATH", &path)
                    .output()
                    .expect("bash");
                assert!(
                    out.status.success(),
                    "{doc}: `{line}` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                ran += 1;
            }
        }
    }
    assert!(ran >= 3, "the docs' no-cluster commands were found ({ran})");
}

/// The operator's guide's flag table matches `kvsync serve --help`: every flag, its variable
/// and its default; and every `kvsync SUB --flag` written in the docs or the README exists.
#[test]
fn documented_flags_exist_with_their_defaults() {
    let guide = std::fs::read_to_string(repo().join("docs/operators-guide.md")).expect("guide");
    let help = kvsync_help("serve");
    let mut rows = 0;
    for line in guide.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (flag, var, default) = (
            cells[1].trim_matches('`'),
            cells[2].trim_matches('`'),
            cells[3],
        );
        assert!(
            help.contains(&format!("{flag} <")),
            "{flag} not in serve --help"
        );
        if !var.is_empty() {
            assert!(
                help.contains(&format!("[env: {var}=]")),
                "{var} not in serve --help"
            );
        }
        if !default.starts_with('(') {
            assert!(
                help.contains(&format!("[default: {default}]")),
                "{flag} default {default}"
            );
        }
        rows += 1;
    }
    assert_eq!(
        rows,
        help.matches("\n      --").count(),
        "every serve flag is in the table"
    );
    let mut texts = vec![
        std::fs::read_to_string(repo().join("README.md")).expect("readme"),
        guide,
    ];
    for d in [
        "docs/architecture.md",
        "docs/performance.md",
        "docs/replicas.md",
    ] {
        texts.push(std::fs::read_to_string(repo().join(d)).expect("doc"));
    }
    for text in &texts {
        for line in text.lines() {
            for sub in ["serve", "tap", "capture", "config"] {
                let Some(at) = line.find(&format!("kvsync {sub}")) else {
                    continue;
                };
                let h = kvsync_help(sub);
                for flag in line[at..]
                    .split_whitespace()
                    .filter(|w| w.starts_with("--"))
                {
                    let flag: String = flag
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    assert!(
                        h.contains(&format!("{flag} ")) || h.contains(&format!("{flag}\n")),
                        "`kvsync {sub} {flag}` in the docs: not a flag"
                    );
                }
            }
        }
    }
}
