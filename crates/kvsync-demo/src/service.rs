//! A `kvsync serve` child process on the fleet's pod file, the small HTTP client the demo
//! speaks to it with, and reading its `/metrics`.

use crate::config::*;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A small HTTP/1.1 client with pooled connections.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http::new_url(&format!("http://{addr}"))
    }

    /// A client of `base` (`http://host:port`, without a trailing `/`).
    pub fn new_url(base: &str) -> Http {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        Http {
            client: Client::builder(TokioExecutor::new()).build(c),
            base: base
                .trim_end_matches('/')
                .trim_end_matches("/v1")
                .to_owned(),
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Vec<u8>) -> Result<(u16, Bytes)> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .context("building a request")?;
        let resp = self
            .client
            .request(req)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {path}: body"))?
            .to_bytes();
        Ok((status, body))
    }

    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let (status, body) = self.call("GET", path, Vec::new()).await?;
        if status != 200 {
            bail!("GET {path}: {status}");
        }
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
    }

    /// `POST /v1/route` by token ids; the answer's JSON.
    pub async fn route(&self, tokens: &[u32]) -> Result<Value> {
        let body = serde_json::to_vec(&json!({"model": MODEL, "token_ids": tokens}))
            .context("encoding a route request")?;
        let (status, body) = self.call("POST", "/v1/route", body).await?;
        if status != 200 {
            bail!("route: {status} {}", String::from_utf8_lossy(&body));
        }
        serde_json::from_slice(&body).context("route answer is not JSON")
    }
}

/// A `kvsync serve` child process.
pub struct Service {
    child: Child,
    pub addr: SocketAddr,
    pub http: Http,
    pub log: PathBuf,
}

/// A free loopback address (bound and released: fine on loopback for a child to take).
pub fn free_addr() -> Result<SocketAddr> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port();
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

impl Service {
    /// Starts `kvsync serve` on `pods_file` and waits until it is ready (and, with KV sync,
    /// until every pod's subscriber is live).
    pub async fn start(
        bin: &Path,
        pods_file: &Path,
        kv_sync: bool,
        tokenizer: SocketAddr,
        pods: usize,
        log: PathBuf,
    ) -> Result<Service> {
        Service::start_at(
            free_addr()?,
            bin,
            pods_file,
            kv_sync,
            tokenizer,
            pods,
            log,
            &[],
        )
        .await
    }

    /// [`Service::start`] listening on `addr` (e.g. one of [`free_addr`], chosen before
    /// starting replicas that name each other as peers), with more `serve` arguments.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_at(
        addr: SocketAddr,
        bin: &Path,
        pods_file: &Path,
        kv_sync: bool,
        tokenizer: SocketAddr,
        pods: usize,
        log: PathBuf,
        extra: &[String],
    ) -> Result<Service> {
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = std::process::Command::new(bin);
        // The service's whole configuration comes from the arguments and variables below,
        // not from whatever the caller's environment sets.
        for (name, _) in std::env::vars_os() {
            let n = name.to_string_lossy();
            if n.starts_with("AIBRIX_") || n.starts_with("KVSYNC_") {
                cmd.env_remove(&name);
            }
        }
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--pods")
            .arg(pods_file)
            .arg("--pods-interval-ms")
            .arg("200")
            .args(extra)
            .env("AIBRIX_KV_EVENT_SYNC_ENABLED", kv_sync.to_string())
            .env("AIBRIX_USE_REMOTE_TOKENIZER", "true")
            .env("AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE", "remote")
            .env("AIBRIX_REMOTE_TOKENIZER_ENGINE", "vllm")
            .env(
                "AIBRIX_REMOTE_TOKENIZER_ENDPOINT",
                format!("http://{tokenizer}"),
            )
            .env(
                "RUST_LOG",
                std::env::var("KVSYNC_DEMO_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("log file")?)
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut svc = Service {
            child,
            addr,
            http: Http::new(addr),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = svc.child.try_wait().context("checking the service")? {
                bail!("kvsync serve exited ({status}); see {}", svc.log.display());
            }
            if svc.is_ready(kv_sync, pods).await {
                return Ok(svc);
            }
            if Instant::now() > deadline {
                bail!(
                    "kvsync serve not ready within 30 s; see {}",
                    svc.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn is_ready(&self, kv_sync: bool, pods: usize) -> bool {
        if !matches!(
            self.http.call("GET", "/readyz", Vec::new()).await,
            Ok((200, _))
        ) {
            return false;
        }
        let Ok(v) = self.http.get_json("/v1/pods").await else {
            return false;
        };
        let list = v["pods"].as_array().map_or(&[][..], Vec::as_slice);
        list.len() == pods
            && (!kv_sync
                || list.iter().all(|p| {
                    p["workers"]
                        .as_array()
                        .is_some_and(|ws| ws.iter().all(|w| w["state"].as_str() == Some("Live")))
                }))
    }

    /// The child's CPU time (user + system), from /proc (USER_HZ is 100 on Linux).
    pub fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .context("reading the service's /proc stat")?;
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("unexpected /proc stat")?;
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            f.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .context("unexpected /proc stat")
        };
        Ok((ticks(11)? + ticks(12)?) / 100.0)
    }

    /// Waits (up to `timeout`) until the service applied `batches` batches; its metrics then.
    pub async fn await_applied(&self, batches: u64, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics().await?;
            let applied = metric_value(&text, "kvsync_batches_applied_total").unwrap_or(0.0) as u64;
            if applied >= batches {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!(
                    "kvsync applied {applied} of {batches} batches within {timeout:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = self.http.call("GET", "/metrics", Vec::new()).await?;
        if status != 200 {
            bail!("/metrics: {status}");
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let status = tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .context("waiting for the service")?
            .context("waiting for the service")?;
        if !status.success() {
            bail!("kvsync serve exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One sample (unlabelled, or the first series) of a metric in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let base = series.split('{').next()?;
        (base == name).then(|| value.parse().ok()).flatten()
    })
}

/// A quantile of a Prometheus histogram, by linear interpolation inside its bucket.
pub fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lo + (le - lo) * frac);
        }
        (lo, below) = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_inside_buckets() {
        let text = "# HELP x_seconds x\nx_seconds_sum 1\nx_seconds_count 100\n\
                    x_seconds_bucket{le=\"0.001\"} 50\nx_seconds_bucket{le=\"0.002\"} 90\n\
                    x_seconds_bucket{le=\"0.005\"} 100\nx_seconds_bucket{le=\"+Inf\"} 100\n";
        let q = |q| histogram_quantile(text, "x_seconds", q).expect("quantile");
        assert!((q(0.5) - 0.001).abs() < 1e-12);
        assert!((q(0.7) - 0.0015).abs() < 1e-12);
        assert!((q(0.95) - 0.0035).abs() < 1e-12);
        assert_eq!(histogram_quantile("", "x_seconds", 0.5), None);
        assert_eq!(metric_value(text, "x_seconds_count"), Some(100.0));
        assert_eq!(metric_value(text, "x_seconds_bucket"), Some(50.0));
    }
}
