//! The remote tokenizer: the engine's own `POST /tokenize` (vLLM's schema), so the router's
//! token ids are exactly the engine's. Pooled HTTP/1.1 connections and a timeout per request.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::time::Duration;

/// Why text could not be tokenized (the API answers 502 with this message).
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("tokenizer at {endpoint} unreachable: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("tokenizer at {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("tokenizer at {endpoint} answered {status}: {body}")]
    Status {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("tokenizer at {endpoint} answered without a `tokens` list of ids: {body}")]
    Malformed { endpoint: String, body: String },
}

/// A client of one `/tokenize` endpoint.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    timeout: Duration,
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
    },
}

impl Tokenizer {
    /// `base`: e.g. `http://vllm-service:8000` (no trailing `/tokenize`).
    pub fn new(base: &str, timeout: Duration) -> Tokenizer {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        Tokenizer {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(16)
                .build(connector),
            base: base.trim_end_matches('/').to_owned(),
            timeout,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("{}/tokenize", self.base)
    }

    /// The engine's token ids for `text` under `model`.
    pub async fn tokenize(&self, model: &str, text: Text<'_>) -> Result<Vec<u32>, TokenizeError> {
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
            } => json!({"model": model, "messages": messages,
                        "add_generation_prompt": add_generation_prompt,
                        "add_special_tokens": add_special_tokens}),
        };
        let endpoint = self.endpoint();
        let req = hyper::Request::post(&endpoint)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| TokenizeError::Unreachable {
                endpoint: endpoint.clone(),
                detail: e.to_string(),
            })?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| TokenizeError::Unreachable {
                    endpoint: endpoint.clone(),
                    detail: e.to_string(),
                })?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| TokenizeError::Unreachable {
                    endpoint: endpoint.clone(),
                    detail: e.to_string(),
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
        v["tokens"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or(TokenizeError::Malformed {
                endpoint,
                body: text,
            })
    }
}
