//! `kvsync sim` as a user runs it: the binary serves a fleet, prints its engines and `ready`,
//! writes a pod file `kvsync serve --pods` accepts, answers the official `openai` client with
//! the prefix-cache usage, and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use test_support::python;

use serde_json::Value;

/// The port of an endpoint or URL (`...:PORT`).
fn port(s: &str) -> u16 {
    s.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

#[test]
fn sim_serves_two_engines_to_the_openai_client_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("kvsync-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let pods = dir.join("pods.yaml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvsync"))
        .args([
            "sim",
            "--engines",
            "2",
            "--speed",
            "20",
            "--model",
            "sim-llama",
        ])
        .arg("--pods-out")
        .arg(&pods)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvsync sim starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut engines = Vec::new();
    let mut oracle = None;
    loop {
        let line = lines.next().expect("a line before ready").expect("utf-8");
        if line == "ready" {
            break;
        }
        let v: Value = serde_json::from_str(&line).expect("a JSON line");
        match v.get("oracle") {
            Some(url) => oracle = url.as_str().map(str::to_owned),
            None => engines.push(v),
        }
    }
    assert_eq!(engines.len(), 2, "{engines:?}");
    assert!(oracle.is_some_and(|u| u.starts_with("http://127.0.0.1:")));
    for (i, e) in engines.iter().enumerate() {
        assert_eq!(e["name"], format!("sim-{i}"));
        for key in ["url", "kv_events"] {
            assert!(e[key].is_string(), "{e}");
        }
        assert!(e["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("http://127.0.0.1:")));
    }

    // The pod file is what `kvsync serve --pods` reads: every engine eligible, on its ports.
    let text = std::fs::read_to_string(&pods).expect("pod file written");
    let parsed = kvsync::pods::parse_pod_file(&text).expect("pod file parses");
    assert_eq!(parsed.len(), 2);
    for (pod, e) in parsed.iter().zip(&engines) {
        let info = kvsync::pods::info(pod);
        let target = info.target.as_ref().expect("eligible");
        assert_eq!(target.model, "sim-llama");
        assert_eq!(target.endpoint(0), e["kv_events"].as_str().expect("string"));
        assert_eq!(target.replay_endpoint(0).as_deref(), e["replay"].as_str());
        let annotations = pod.metadata.annotations.as_ref().expect("annotations");
        let http_port: u16 = annotations["model.aibrix.ai/port"].parse().expect("port");
        assert_eq!(http_port, port(e["url"].as_str().expect("url")));
    }

    // The official client streams chat with usage; the second identical request hits.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/sim_chat.py");
    let base = format!("{}/v1", engines[0]["url"].as_str().expect("url"));
    let out = Command::new(python())
        .arg(script)
        .args([base.as_str(), "sim-llama", "16"])
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sim_chat.py failed:\n{stdout}\n{stderr}"
    );
    print!("{stdout}");

    // SIGTERM: a clean stop.
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status = child.wait().expect("kvsync sim exits");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("stopping the simulated fleet"), "{err}");
    assert!(lines.next().is_none(), "nothing after ready on stdout");
    let _ = std::fs::remove_dir_all(&dir);
}
