//! Tokenizing a request's text, as the engine does.
//!
//! - [`local`]: in process, from the model's Hugging Face files (`--tokenizer MODEL=DIR`), via
//!   `hf_tokenize`: the fast path, exact by the parity tests of that crate.
//! - this module: the remote tokenizer, the engine's own `POST /tokenize` (vLLM's schema),
//!   exact by construction, the fallback for a model without local files. One client for the
//!   service: pooled HTTP/1.1 connections to every endpoint it asks, a timeout per request.
//!   Either the configured endpoint is asked, or ([`Tokenizer::tokenize_any`]) the model's own
//!   pods, in turn, the next one when a pod cannot be connected to.

pub mod local;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// Why text could not be tokenized (the API answers 502 with this message).
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("tokenizer at {endpoint} unreachable: {detail}")]
    Unreachable { endpoint: String, detail: String },
    /// No connection could be made (refused, no route, connect timeout): nothing was sent.
    #[error("tokenizer at {endpoint} cannot be connected to: {detail}")]
    Connect { endpoint: String, detail: String },
    #[error("tokenizer at {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("tokenizer at {endpoint} answered {status}: {body}")]
    Status {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("tokenizer at {endpoint} answered a body larger than {limit} bytes")]
    TooLarge { endpoint: String, limit: usize },
    #[error("tokenizer at {endpoint} answered without a `tokens` list of ids: {body}")]
    Malformed { endpoint: String, body: String },
}

/// Default largest `/tokenize` answer read: 32 MiB. The text comes from a request body of at
/// most `http::MAX_BODY` (4 MiB), so at most ~4 M tokens (one per byte, at worst), each at most
/// 7 bytes in the answer's `tokens` list (`151935,`): 28 MB.
pub const MAX_RESPONSE_BYTES: usize = 32 << 20;

/// Most pods asked for one text before giving up (each may take up to the connect timeout).
pub const MAX_ATTEMPTS: usize = 3;

/// Longest wait for a connection to a tokenizer (in-cluster connects take well under a
/// millisecond; a pod that does not answer SYNs is given up on for the next one).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The service's `/tokenize` client.
#[derive(Debug)]
pub struct Tokenizer {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    /// Largest answer read ([`MAX_RESPONSE_BYTES`] by default).
    max_response_bytes: usize,
    /// Where the next [`Tokenizer::tokenize_any`] starts in its list (spreads the load).
    next: AtomicUsize,
}

/// What to tokenize.
#[derive(Debug, Clone)]
pub enum Text<'a> {
    /// A completion prompt.
    Prompt {
        prompt: &'a str,
        add_special_tokens: bool,
    },
    /// Chat messages, rendered by the engine's chat template.
    Messages {
        messages: &'a Value,
        add_generation_prompt: bool,
        add_special_tokens: bool,
        /// The request's `tools` (templates that support tools render them).
        tools: Option<&'a Value>,
        /// The request's `chat_template_kwargs` (e.g. `enable_thinking`).
        template_kwargs: Option<&'a Value>,
    },
}

/// A `/tokenize` answer: the ids, and the engine's `max_model_len` when it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub tokens: Vec<u32>,
    pub max_model_len: Option<u64>,
}

impl Tokenizer {
    /// A client whose requests each take at most `timeout` and whose answers are read up to
    /// `max_response_bytes`.
    pub fn new(timeout: Duration, max_response_bytes: usize) -> Tokenizer {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout.min(CONNECT_TIMEOUT)));
        Tokenizer {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(16)
                .build(connector),
            timeout,
            max_response_bytes,
            next: AtomicUsize::new(0),
        }
    }

    /// Tokenizes with one of `bases` (e.g. a model's pods, `http://10.0.0.7:8000`): the
    /// list is taken in turn from a rotating start, so calls spread over it, and a base that
    /// cannot be connected to is skipped for the next (at most [`MAX_ATTEMPTS`]). Other
    /// failures (a timeout, an error status, a malformed answer) are returned as they are.
    pub async fn tokenize_any(
        &self,
        bases: &[String],
        model: &str,
        text: Text<'_>,
    ) -> Result<Tokenized, TokenizeError> {
        let start = self.next.fetch_add(1, Relaxed);
        let mut last = None;
        for base in attempt_order(bases, start) {
            match self.tokenize(base, model, text.clone()).await {
                Err(e @ TokenizeError::Connect { .. }) => {
                    tracing::debug!(error = %e, "tokenizer unreachable, trying the next pod");
                    last = Some(e);
                }
                r => return r,
            }
        }
        Err(last.unwrap_or(TokenizeError::Connect {
            endpoint: "(no pod)".into(),
            detail: "no pod to ask".into(),
        }))
    }

    /// The engine's token ids for `text` under `model`, from `base` (e.g.
    /// `http://vllm-service:8000`, no trailing `/tokenize`).
    pub async fn tokenize(
        &self,
        base: &str,
        model: &str,
        text: Text<'_>,
    ) -> Result<Tokenized, TokenizeError> {
        let body = match text {
            Text::Prompt {
                prompt,
                add_special_tokens,
            } => {
                json!({"model": model, "prompt": prompt, "add_special_tokens": add_special_tokens})
            }
            Text::Messages {
                messages,
                add_generation_prompt,
                add_special_tokens,
                tools,
                template_kwargs,
            } => {
                let mut b = json!({"model": model, "messages": messages,
                            "add_generation_prompt": add_generation_prompt,
                            "add_special_tokens": add_special_tokens});
                if let Some(t) = tools.filter(|t| !t.is_null()) {
                    b["tools"] = t.clone();
                }
                if let Some(k) = template_kwargs.filter(|k| !k.is_null()) {
                    b["chat_template_kwargs"] = k.clone();
                }
                b
            }
        };
        let endpoint = format!("{}/tokenize", base.trim_end_matches('/'));
        let req = hyper::Request::post(&endpoint)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| TokenizeError::Unreachable {
                endpoint: endpoint.clone(),
                detail: e.to_string(),
            })?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let (endpoint, detail) = (endpoint.clone(), error_chain(&e));
                if e.is_connect() {
                    TokenizeError::Connect { endpoint, detail }
                } else {
                    TokenizeError::Unreachable { endpoint, detail }
                }
            })?;
            let status = resp.status().as_u16();
            let too_large = || TokenizeError::TooLarge {
                endpoint: endpoint.clone(),
                limit: self.max_response_bytes,
            };
            let declared = resp
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > self.max_response_bytes as u64) {
                return Err(too_large());
            }
            let bytes = Limited::new(resp.into_body(), self.max_response_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        too_large()
                    } else {
                        TokenizeError::Unreachable {
                            endpoint: endpoint.clone(),
                            detail: e.to_string(),
                        }
                    }
                })?
                .to_bytes();
            Ok::<_, TokenizeError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| TokenizeError::Timeout {
                endpoint: endpoint.clone(),
                timeout: self.timeout,
            })??;
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
        if status != 200 {
            return Err(TokenizeError::Status {
                endpoint,
                status,
                body: text,
            });
        }
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| TokenizeError::Malformed {
            endpoint: endpoint.clone(),
            body: text.clone(),
        })?;
        let tokens = v["tokens"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or(TokenizeError::Malformed {
                endpoint,
                body: text,
            })?;
        Ok(Tokenized {
            tokens,
            max_model_len: v["max_model_len"].as_u64(),
        })
    }
}

/// `bases` from `start` (mod its length), wrapping, at most [`MAX_ATTEMPTS`] of them.
fn attempt_order(bases: &[String], start: usize) -> impl Iterator<Item = &String> {
    let n = bases.len();
    (0..n.min(MAX_ATTEMPTS)).map(move |i| &bases[(start % n + i) % n])
}

/// An error and its sources, `: `-separated (hyper's own message is only "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_rotate_wrap_and_are_bounded() {
        let bases: Vec<String> = (0..5).map(|i| i.to_string()).collect();
        let order = |start| attempt_order(&bases, start).cloned().collect::<Vec<_>>();
        assert_eq!(order(0), ["0", "1", "2"]);
        assert_eq!(order(4), ["4", "0", "1"]);
        assert_eq!(order(usize::MAX), ["0", "1", "2"]);
        assert_eq!(attempt_order(&bases[..2], 1).count(), 2);
        assert_eq!(attempt_order(&[], 7).count(), 0);
    }
}
