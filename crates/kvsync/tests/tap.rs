//! `kvsync tap` against vLLM's own recorded frames, played by `serve_golden.py` on real libzmq
//! sockets: every capture arrives complete and in order, exactly as the offline decode of the
//! same capture (`kvsync capture`) prints it.

#[path = "../../kv-subscriber/tests/support/mod.rs"]
mod support;

use std::process::Command;
use support::GoldenServer;

const CAPTURES: [&str; 6] = [
    "vllm-0.9.0_signed-int-hashes.json",
    "vllm-0.10.2_int-hashes.json",
    "vllm-0.14.0_int-hashes.json",
    "vllm-0.24.0_int-hashes.json",
    "vllm-0.33.0_int-hashes.json",
    "vllm-0.33.0_bytes-hashes.json",
];

fn kvsync(args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_kvsync"))
        .args(args)
        .output()
        .expect("kvsync runs");
    assert!(
        out.status.success(),
        "kvsync {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_golden_capture_arrives_complete_and_in_order_through_tap() {
    for capture in CAPTURES {
        let file = support::shared()
            .join("testdata/vllm-kv-events")
            .join(capture);
        let want = kvsync(&["capture", file.to_str().expect("path")]);
        assert_eq!(want.len(), 9, "{capture}: 9 events in 7 batches");
        let server = GoldenServer::start(capture);
        let got = kvsync(&[
            "tap",
            &format!("tcp://127.0.0.1:{}", server.pub_port),
            "--replay",
            &format!("tcp://127.0.0.1:{}", server.replay_port),
            "--max-batches",
            "7",
        ]);
        assert_eq!(got, want, "{capture}");
    }
}
