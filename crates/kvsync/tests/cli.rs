//! The binary's configuration outcomes and `serve` on a static pod file, as an operator runs
//! them: environment in, exit status and messages out.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKENIZER: [(&str, &str); 3] = [
    ("AIBRIX_USE_REMOTE_TOKENIZER", "true"),
    ("AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE", "remote"),
    ("AIBRIX_REMOTE_TOKENIZER_ENDPOINT", "http://127.0.0.1:9"),
];

/// An environment, whether it turns KV sync on, and the warning it must give.
type Case<'a> = (Vec<(&'a str, &'a str)>, bool, Option<&'a str>);

fn kvsync(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvsync"));
    c.args(args);
    for (k, _) in kvsync::config::VARIABLES {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    c.output().expect("kvsync runs")
}

#[test]
fn config_matrix_outcomes_and_messages() {
    let mut cases: Vec<Case> = vec![
        (vec![], false, None),
        (
            vec![("AIBRIX_KV_EVENT_SYNC_ENABLED", "true")],
            false,
            Some("AIBRIX_USE_REMOTE_TOKENIZER=true"),
        ),
    ];
    let mut full = TOKENIZER.to_vec();
    full.push(("AIBRIX_KV_EVENT_SYNC_ENABLED", "true"));
    cases.push((full.clone(), true, None));
    let mut no_type = full.clone();
    no_type.retain(|(k, _)| *k != "AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE");
    cases.push((
        no_type,
        false,
        Some("AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE=remote"),
    ));
    let mut no_endpoint = full.clone();
    no_endpoint.retain(|(k, _)| *k != "AIBRIX_REMOTE_TOKENIZER_ENDPOINT");
    cases.push((no_endpoint, false, Some("AIBRIX_REMOTE_TOKENIZER_ENDPOINT")));
    for (env, on, warning) in cases {
        let out = kvsync(&["config"], &env);
        assert!(out.status.success(), "{env:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stdout.contains(&format!("kv_sync: {on}")),
            "{env:?}: {stdout}"
        );
        match warning {
            Some(w) => {
                assert_eq!(
                    stderr.matches("warning:").count(),
                    1,
                    "one warning: {stderr}"
                );
                assert!(stderr.contains(w), "{env:?}: {stderr}");
            }
            None => assert!(stderr.is_empty(), "{env:?}: {stderr}"),
        }
    }
}

#[test]
fn invalid_values_are_listed_in_one_error_and_serve_refuses_to_start() {
    let env = [
        ("AIBRIX_KV_EVENT_SYNC_ENABLED", "yes please"),
        ("AIBRIX_SYNC_MAX_CONTEXTS", "0"),
        ("AIBRIX_KV_EVENT_REPLAY_TIMEOUT_S", "soon"),
    ];
    for cmd in [&["config"][..], &["serve", "--pods", "/nonexistent"][..]] {
        let out = kvsync(cmd, &env);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
        for (k, _) in env {
            assert!(stderr.contains(k), "{k} in {stderr}");
        }
    }
}

#[test]
fn serve_on_a_pod_file_gets_ready_and_stops_cleanly_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("kvsync-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("pods.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: ml\n  uid: u\n  labels:\n    model.aibrix.ai/kv-events-enabled: \"true\"\n    model.aibrix.ai/name: m\nstatus:\n  phase: Running\n  podIP: 127.0.0.1\n  conditions:\n  - type: Ready\n    status: \"True\"\n",
    )
    .expect("write");
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvsync"));
    for (k, _) in kvsync::config::VARIABLES {
        c.env_remove(k);
    }
    let mut child = c
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pods",
            file.to_str().expect("path"),
        ])
        .envs(TOKENIZER)
        .env("AIBRIX_KV_EVENT_SYNC_ENABLED", "true")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).expect("read") > 0,
            "serve exited: {seen:?}"
        );
        seen.push(line.clone());
        if line.contains("ready: the first pod list is applied") {
            break;
        }
        assert!(Instant::now() < deadline, "{seen:?}");
    }
    assert!(seen.iter().any(|l| l.contains("subscribing")), "{seen:?}");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status = child.wait().expect("wait");
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's variable table and the configuration code agree: same names, same defaults.
#[test]
fn readme_variable_table_matches_the_code() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README");
    let rows: Vec<(String, String)> = readme
        .lines()
        .filter(|l| l.starts_with("| `AIBRIX_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[3].to_owned())
        })
        .collect();
    let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
    let code: Vec<&str> = kvsync::config::VARIABLES.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, code, "README rows vs config::VARIABLES");
    for ((name, doc), (_, default)) in rows.iter().zip(kvsync::config::VARIABLES) {
        let want = if default.is_empty() {
            "(unset)"
        } else {
            default
        };
        assert_eq!(doc, want, "{name}");
    }
}
