//! Real libzmq peers for the interop tests: Python processes (pyzmq) from the repo's .venv.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub use test_support::{python, shared};

/// A free loopback port (bound and released; fine on loopback for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The vLLM-like test publisher (tests/support/vllm_publisher.py), driven line by line.
pub struct Publisher {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pub_port: u16,
    pub replay_port: u16,
    /// The loopback address it binds (`--host`, default 127.0.0.1).
    pub host: String,
    /// `replay FROM` lines seen so far.
    pub replays: Vec<u64>,
}

impl Publisher {
    pub fn start(args: &[&str]) -> Publisher {
        Self::try_start(args).expect("the publisher started (python with pyzmq: scripts/setup)")
    }

    /// Like `start`, but None when the publisher cannot bind (a port taken meanwhile).
    pub fn try_start(args: &[&str]) -> Option<Publisher> {
        let script =
            // From whichever crate includes this module: the script lives with kv-events' tests.
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kv-subscriber/tests/support/vllm_publisher.py");
        let mut child = Command::new(python())
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python with pyzmq (run scripts/setup)");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ready line");
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.first() != Some(&"ready") {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        let host = args
            .iter()
            .position(|a| *a == "--host")
            .and_then(|i| args.get(i + 1))
            .map_or("127.0.0.1".to_owned(), |h| (*h).to_owned());
        Some(Publisher {
            child,
            stdin,
            stdout,
            host,
            pub_port: parts[1].parse().expect("port"),
            replay_port: parts[2].parse().expect("port"),
            replays: Vec::new(),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("tcp://{}:{}", self.host, self.pub_port)
    }

    pub fn replay_endpoint(&self) -> String {
        format!("tcp://{}:{}", self.host, self.replay_port)
    }

    /// Sends one command and waits for its `ok`.
    pub fn cmd(&mut self, json: &str) {
        writeln!(self.stdin, "{json}").expect("write command");
        self.stdin.flush().expect("flush");
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read");
            assert!(n > 0, "publisher exited");
            let line = line.trim();
            if line == "ok" {
                return;
            }
            if let Some(from) = line.strip_prefix("replay ") {
                self.replays.push(from.parse().expect("seq"));
            }
        }
    }

    pub fn send(&mut self, seq: u64, payload: &[u8]) {
        self.cmd(&format!(
            r#"{{"op":"send","seq":{seq},"payload":"{}"}}"#,
            hex::encode(payload)
        ));
    }

    pub fn skip(&mut self, seq: u64, payload: &[u8]) {
        self.cmd(&format!(
            r#"{{"op":"skip","seq":{seq},"payload":"{}"}}"#,
            hex::encode(payload)
        ));
    }

    /// Publishes `n` batches from `seq` on, all carrying `payload`.
    pub fn repeat(&mut self, seq: u64, n: u64, payload: &[u8]) {
        self.cmd(&format!(
            r#"{{"op":"repeat","seq":{seq},"n":{n},"payload":"{}"}}"#,
            hex::encode(payload)
        ));
    }

    pub fn raw(&mut self, frames: &[&[u8]]) {
        let hexes: Vec<String> = frames
            .iter()
            .map(|f| format!("\"{}\"", hex::encode(f)))
            .collect();
        self.cmd(&format!(r#"{{"op":"raw","frames":[{}]}}"#, hexes.join(",")));
    }
}

impl Publisher {
    /// The publisher's process id (to stop or continue it with signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once (no goodbye on any socket).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, r#"{{"op":"quit"}}"#);
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// Golden captures' `serve_golden.py`, on two free ports.
pub struct GoldenServer {
    child: Child,
    pub pub_port: u16,
    pub replay_port: u16,
}

impl GoldenServer {
    pub fn start(capture: &str) -> GoldenServer {
        let (pub_port, replay_port) = (free_port(), free_port());
        let child = Command::new(python())
            .arg(shared().join("tools/serve_golden.py"))
            .arg(shared().join("testdata/vllm-kv-events").join(capture))
            .args(["--pub", &format!("tcp://127.0.0.1:{pub_port}")])
            .args(["--replay", &format!("tcp://127.0.0.1:{replay_port}")])
            .args(["--interval", "0.01", "--linger", "-1"])
            .stdout(Stdio::null())
            .spawn()
            .expect("python with pyzmq (run scripts/setup)");
        GoldenServer {
            child,
            pub_port,
            replay_port,
        }
    }
}

impl Drop for GoldenServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
