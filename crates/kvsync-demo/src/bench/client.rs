//! One streamed OpenAI request, timed: the first content token, each later one, the usage
//! chunk, the pod header. SSE is parsed line by line across body frames.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// What one request did. Times are seconds since the run started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub session: u64,
    pub turn: usize,
    pub sent: f64,
    /// First content token (absent when none came).
    pub first_token: Option<f64>,
    pub end: f64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// `x-kvsync-pod` (or `x-pod`) of the answer, when the server names one.
    pub pod: Option<String>,
    /// Error kind (`connect`, `status_503`, `stream`, `timeout`, `error_event`, ...).
    pub error: Option<String>,
    /// Gaps between consecutive content chunks, seconds (inter-token latency samples).
    pub itl: Vec<f64>,
    /// The answer's text (fed into the next turn of a conversation).
    pub text: String,
}

impl Record {
    pub fn to_json(&self) -> Value {
        json!({
            "session": self.session,
            "turn": self.turn,
            "sent_s": self.sent,
            "first_token_s": self.first_token,
            "end_s": self.end,
            "ttft_s": self.first_token.map(|t| t - self.sent),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "pod": self.pod,
            "error": self.error,
        })
    }
}

/// A pooled HTTP/1.1 client to one OpenAI-compatible server.
#[derive(Clone, Debug)]
pub struct OpenAi {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    timeout: Duration,
}

impl OpenAi {
    /// `url`: `http://host:port` (a trailing `/` or `/v1` is dropped).
    pub fn new(url: &str, timeout: Duration) -> Result<OpenAi, String> {
        let base = url.trim_end_matches('/').trim_end_matches("/v1").to_owned();
        if !base.starts_with("http://") {
            return Err(format!(
                "--url {url:?}: only http:// is supported (put a TLS terminator in front)"
            ));
        }
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        c.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(c);
        Ok(OpenAi {
            client,
            base,
            timeout,
        })
    }

    /// Sends `body` to `path` and reads the SSE stream to its end; `t0` is the run's start.
    pub async fn stream(&self, path: &str, body: &Value, t0: Instant) -> Record {
        let mut r = Record {
            sent: t0.elapsed().as_secs_f64(),
            ..Record::default()
        };
        let outcome = tokio::time::timeout(self.timeout, self.read(path, body, t0, &mut r)).await;
        match outcome {
            Err(_) => r.error = Some("timeout".into()),
            Ok(Err(kind)) => r.error = Some(kind),
            Ok(Ok(())) => {}
        }
        r.end = t0.elapsed().as_secs_f64();
        r
    }

    async fn read(
        &self,
        path: &str,
        body: &Value,
        t0: Instant,
        r: &mut Record,
    ) -> Result<(), String> {
        let bytes = serde_json::to_vec(body).map_err(|_| "encode".to_owned())?;
        let req = hyper::Request::post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|_| "request".to_owned())?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|_| "connect".to_owned())?;
        r.pod = ["x-kvsync-pod", "x-pod"]
            .iter()
            .find_map(|h| resp.headers().get(*h))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if status != 200 {
            // Drain (bounded) so the connection can be reused.
            let _ = tokio::time::timeout(Duration::from_secs(5), body.collect()).await;
            return Err(format!("status_{status}"));
        }
        let mut sse = SseLines::default();
        let mut last: Option<f64> = None;
        let mut done = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| "stream".to_owned())?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for line in sse.push(&data) {
                let Some(payload) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if payload == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(payload) else {
                    return Err("bad_chunk".into());
                };
                if v.get("error").is_some_and(|e| !e.is_null()) {
                    return Err("error_event".into());
                }
                let text = chunk_text(&v);
                if !text.is_empty() {
                    let now = t0.elapsed().as_secs_f64();
                    match last {
                        None => r.first_token = Some(now),
                        Some(prev) => r.itl.push(now - prev),
                    }
                    last = Some(now);
                    r.text.push_str(text);
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    r.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                    r.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                    r.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0);
                }
            }
        }
        if !done {
            return Err("truncated".into());
        }
        Ok(())
    }
}

/// The generated text of a chunk: chat's `delta.content` or completions' `text`.
fn chunk_text(v: &Value) -> &str {
    let c = &v["choices"][0];
    c["delta"]["content"]
        .as_str()
        .or_else(|| c["text"].as_str())
        .unwrap_or("")
}

/// Splits an SSE byte stream into lines, whatever the frame boundaries.
#[derive(Debug, Default)]
pub struct SseLines {
    partial: Vec<u8>,
}

impl SseLines {
    /// The complete lines `data` ends (without their line break; empty lines dropped).
    pub fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_owned();
                self.partial.clear();
                if !line.is_empty() {
                    out.push(line);
                }
            } else if self.partial.len() < 16 << 20 {
                self.partial.push(b);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_survive_any_split() {
        let text = b"data: {\"a\":1}\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..text.len() {
            let mut s = SseLines::default();
            let mut lines = s.push(&text[..cut]);
            lines.extend(s.push(&text[cut..]));
            assert_eq!(
                lines,
                vec!["data: {\"a\":1}", "data: [DONE]"],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn chunk_text_reads_chat_and_completions() {
        let chat = json!({"choices": [{"delta": {"content": "hi"}}]});
        let comp = json!({"choices": [{"text": "yo"}]});
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 3}});
        assert_eq!(chunk_text(&chat), "hi");
        assert_eq!(chunk_text(&comp), "yo");
        assert_eq!(chunk_text(&usage), "");
    }
}
