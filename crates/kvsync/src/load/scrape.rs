//! The background scraper of each eligible pod's `/metrics`: every interval it brings the
//! [`LoadTable`] in line with the eligible pods (entries of pods gone are removed), then reads
//! every pod's `vllm:num_requests_waiting`, `vllm:num_requests_running` and
//! `vllm:kv_cache_usage_perc` concurrently, each within one interval. The task is owned by
//! `serve` and stops with its token.
//!
//! Names from vLLM's `vllm/v1/metrics/loggers.py` (`PrometheusStatLogger`: the gauges
//! `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, with
//! `vllm:gpu_cache_usage_perc` its name before 0.10); each carries an `engine` label, one
//! series per data-parallel engine of the pod.

use super::{LoadTable, Scraped};
use crate::manager::PodTable;
use crate::proxy::upstream::HttpClient;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A `/metrics` answer larger than this is refused (vLLM's is ~30 KB with its histograms).
const MAX_METRICS_BYTES: usize = 4 << 20;

/// The load gauges of a Prometheus text exposition: `None` when neither queue gauge is there
/// (not a vLLM engine). Values of several series (engines) are summed, the KV usage's largest
/// kept; unparsable lines are skipped.
pub fn parse(text: &str) -> Option<(f64, f64, f64)> {
    let (mut waiting, mut running, mut kv) = (None::<f64>, None::<f64>, None::<f64>);
    for line in text.lines() {
        if !line.starts_with("vllm:") {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let slot = match name {
            "vllm:num_requests_waiting" => &mut waiting,
            "vllm:num_requests_running" => &mut running,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => &mut kv,
            _ => continue,
        };
        // After the labels (a label value may hold spaces or braces, quoted).
        let rest = &line[name_end..];
        let rest = if rest.starts_with('{') {
            match closing_brace(rest) {
                Some(i) => &rest[i + 1..],
                None => continue,
            }
        } else {
            rest
        };
        let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        *slot = Some(match (*slot, name.contains("cache_usage")) {
            (None, _) => v,
            (Some(old), true) => old.max(v),
            (Some(old), false) => old + v,
        });
    }
    if waiting.is_none() && running.is_none() {
        return None;
    }
    Some((
        waiting.unwrap_or(0.0),
        running.unwrap_or(0.0),
        kv.unwrap_or(0.0),
    ))
}

/// The index of the `}` closing a label set, skipping quoted values.
fn closing_brace(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// The eligible pods' (key, base URL).
pub fn eligible(pods: &PodTable) -> Vec<(String, String)> {
    pods.read()
        .values()
        .filter_map(|v| {
            v.info
                .target
                .as_ref()
                .ok()
                .map(|t| (v.info.key.clone(), t.base_url()))
        })
        .collect()
}

async fn scrape_one(client: &HttpClient, url: &str, timeout: Duration) -> Option<(f64, f64, f64)> {
    let body = super::get_limited(
        client,
        &format!("{url}/metrics"),
        MAX_METRICS_BYTES,
        timeout,
    )
    .await?;
    parse(std::str::from_utf8(&body).ok()?)
}

/// One round: sync the table with the eligible pods, then scrape once each pod that is not
/// backing off after failures ([`super::PodLoad::scrape_failed`]).
pub async fn round(table: &LoadTable, pods: &PodTable, client: &HttpClient) {
    table.sync(&eligible(pods));
    let timeout = table.interval().max(Duration::from_millis(100));
    let now = Instant::now();
    let due: Vec<_> = table
        .all()
        .into_iter()
        .filter(|p| p.scrape_due(now))
        .collect();
    let reads = due.iter().map(|p| async move {
        let got = scrape_one(client, &p.base_url, timeout).await;
        (p, got)
    });
    for (p, got) in futures::future::join_all(reads).await {
        match got {
            Some((waiting, running, kv_usage)) => p.set_scraped(Scraped {
                waiting,
                running,
                kv_usage,
                at: Instant::now(),
            }),
            None => {
                table.scrape_errors.fetch_add(1, Relaxed);
                p.scrape_failed(Instant::now(), table.interval());
            }
        }
    }
}

/// Scrapes every `interval` until `stop`.
pub async fn run(
    table: Arc<LoadTable>,
    pods: PodTable,
    client: HttpClient,
    stop: CancellationToken,
) {
    super::every(table.interval(), stop, || round(&table, &pods, &client)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_gauges_summed_over_engines() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"m {x}\"} 3.0\n\
vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 2.0\n\
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 7.0 1700000000\n\
vllm:kv_cache_usage_perc{engine=\"0\"} 0.25\n\
vllm:kv_cache_usage_perc{engine=\"1\"} 0.75\n\
vllm:num_requests_waiting_total 99\n\
vllm:prompt_tokens_total{engine=\"0\"} 1e6\n";
        assert_eq!(parse(text), Some((5.0, 7.0, 0.75)));
        assert_eq!(
            parse("vllm:num_requests_running 4\nvllm:gpu_cache_usage_perc 0.5\n"),
            Some((0.0, 4.0, 0.5))
        );
        assert_eq!(parse("process_cpu_seconds_total 3\n"), None);
        assert_eq!(
            parse("vllm:num_requests_waiting{engine=\"0\" 3\nvllm:num_requests_running NaN\n"),
            None,
            "a broken label set and a NaN are skipped"
        );
    }
}
