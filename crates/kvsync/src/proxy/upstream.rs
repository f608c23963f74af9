//! The one pooled keep-alive HTTP/1.1 client to the engines (hyper-util's legacy `Client`,
//! shared by the proxy and the load scraper), and one forwarding attempt: the client's body
//! bytes unchanged, its headers but the hop-by-hop ones, within the connect and first-byte
//! timeouts; failures sorted by what the proxy does next.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// The client to the engines.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// vLLM's API server sends a request to this data-parallel rank (`_get_data_parallel_rank` in
/// `vllm/entrypoints/openai/serving_engine.py`).
pub const DP_RANK_HEADER: &str = "x-data-parallel-rank";

/// Idle pooled connections kept per engine.
const MAX_IDLE_PER_HOST: usize = 256;

/// The client: `connect_timeout` per connection, Nagle off, idle connections kept 90 s.
pub fn client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(30)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .build(connector)
}

/// Why an attempt failed before the first response byte.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// No connection (refused, unreachable, connect timeout): nothing reached the engine.
    #[error("connecting to {url}: {detail}")]
    Connect { url: String, detail: String },
    /// The connection failed after the request was sent (reset, closed) with no answer.
    #[error("{url} closed the connection without an answer: {detail}")]
    Reset { url: String, detail: String },
    /// No response head within the first-byte timeout (the engine may be working on it).
    #[error("{url} did not answer within {timeout:?}")]
    FirstByteTimeout { url: String, timeout: Duration },
}

impl AttemptError {
    /// The `reason` label of `kvsync_proxy_upstream_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AttemptError::Connect { .. } => "connect",
            AttemptError::Reset { .. } => "reset",
            AttemptError::FirstByteTimeout { .. } => "first_byte_timeout",
        }
    }

    /// Whether another pod may be tried: only when the engine cannot have started the request
    /// or dropped it (a timed-out request may still be running there).
    pub fn retriable(&self) -> bool {
        !matches!(self, AttemptError::FirstByteTimeout { .. })
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the client sets itself.
fn skipped(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "expect"
    ) || name == DP_RANK_HEADER
}

/// The response headers to pass back to the client: all but the hop-by-hop ones.
pub fn response_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !skipped(k) || k == header::CONTENT_LENGTH {
            to.append(k.clone(), v.clone());
        }
    }
}

/// Sends `body` to `url` (the engine's base URL and the client's path) and waits for the
/// response head.
pub async fn attempt(
    client: &HttpClient,
    url: String,
    headers: &HeaderMap,
    dp_rank: Option<u32>,
    body: Bytes,
    first_byte_timeout: Duration,
) -> Result<hyper::Response<Incoming>, AttemptError> {
    let mut req = hyper::Request::post(&url);
    if let Some(h) = req.headers_mut() {
        for (k, v) in headers {
            if !skipped(k) {
                h.append(k.clone(), v.clone());
            }
        }
        if let Some(r) = dp_rank {
            h.insert(DP_RANK_HEADER, HeaderValue::from(r));
        }
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| AttemptError::Connect {
            url: url.clone(),
            detail: e.to_string(),
        })?;
    match tokio::time::timeout(first_byte_timeout, client.request(req)).await {
        Err(_) => Err(AttemptError::FirstByteTimeout {
            url,
            timeout: first_byte_timeout,
        }),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            let detail = error_chain(&e);
            if e.is_connect() {
                Err(AttemptError::Connect { url, detail })
            } else {
                Err(AttemptError::Reset { url, detail })
            }
        }
    }
}

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
