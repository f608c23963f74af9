//! `POST /v1/completions` and `POST /v1/chat/completions`: parse, check the model and the
//! context length, submit, then answer in one JSON or as an SSE stream of vLLM's chunks
//! (`serving_completion.py`, `serving_chat.py`): chat first sends a chunk with the `role` and
//! empty content when the first token arrives, then one chunk per token, `finish_reason` on the
//! last token's chunk, then with `stream_options.include_usage` a chunk with no choices and the
//! usage, then `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::Receiver;

use super::backend::{GenerateRequest, SubmitError, TokenEvent};
use super::metrics::RequestObserver;
use super::protocol::{self, ApiError, Endpoint, Head};
use super::App;

pub(super) async fn completions(
    State(app): State<Arc<App>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    generate(app, Endpoint::Completions, &body).await
}

pub(super) async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    generate(app, Endpoint::Chat, &body).await
}

async fn generate(app: Arc<App>, endpoint: Endpoint, body: &[u8]) -> Result<Response, ApiError> {
    let p = protocol::parse(endpoint, body, &app.tok)?;
    let (model, lora) = app.resolve_model(p.model.as_deref())?;
    let max_tokens =
        protocol::resolve_max_tokens(p.max_tokens, p.prompt.len(), app.backend.max_model_len())?;
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl-",
        Endpoint::Chat => "chatcmpl-",
    };
    let head = app.head(prefix, model);
    let prompt_len = p.prompt.len();
    let arrival = app.backend.now();
    let (rx, pod) = app
        .backend
        .submit_routed(GenerateRequest {
            request_id: head.id.clone(),
            prompt: p.prompt,
            max_tokens,
            lora,
        })
        .map_err(|e| match e {
            SubmitError::Invalid(m) => ApiError::bad_request(m, None),
            other => ApiError::unavailable(other.to_string()),
        })?;
    let reply = Reply {
        app,
        endpoint,
        head,
        rx,
        observer: RequestObserver::new(arrival, max_tokens),
        prompt_len,
        cached_tokens: 0,
        completion_tokens: 0,
        text: String::new(),
    };
    let mut response = if p.stream {
        reply.stream(p.include_usage, p.continuous_usage)
    } else {
        reply.collect().await.map(|v| Json(v).into_response())?
    };
    if let Some(value) = pod.and_then(|p| HeaderValue::from_str(&p).ok()) {
        response.headers_mut().insert(super::POD_HEADER, value);
    }
    Ok(response)
}

/// One request's answer in the making.
struct Reply {
    app: Arc<App>,
    endpoint: Endpoint,
    head: Head,
    rx: Receiver<TokenEvent>,
    observer: RequestObserver,
    prompt_len: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    /// The whole text (non-streaming) or the last token's (streaming).
    text: String,
}

/// A finished request: its reason and usage.
struct Done {
    finish: &'static str,
    usage: Value,
}

impl Reply {
    /// Records `ev` and, for a token, appends its text; `Some` when the request finished.
    fn apply(&mut self, ev: &TokenEvent) -> Result<Option<Done>, ApiError> {
        self.observer.on_event(&self.app.metrics, ev);
        match *ev {
            TokenEvent::Scheduled { cached_tokens, .. } => {
                self.cached_tokens = cached_tokens;
                Ok(None)
            }
            TokenEvent::Token { id, .. } => {
                let piece = self
                    .app
                    .tok
                    .token_text(id, self.completion_tokens == 0)
                    .map_err(ApiError::internal)?;
                self.text.push_str(&piece);
                self.completion_tokens += 1;
                Ok(None)
            }
            TokenEvent::Finished {
                reason,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                ..
            } => Ok(Some(Done {
                finish: reason.as_str(),
                usage: protocol::usage(prompt_tokens, completion_tokens, cached_tokens),
            })),
        }
    }

    async fn collect(mut self) -> Result<Value, ApiError> {
        while let Some(ev) = self.rx.recv().await {
            if let Some(done) = self.apply(&ev)? {
                return Ok(protocol::response(
                    self.endpoint,
                    &self.head,
                    &self.text,
                    done.finish,
                    done.usage,
                ));
            }
        }
        Err(ApiError::internal(
            "the engine dropped the request before it finished".to_owned(),
        ))
    }

    fn stream(self, include_usage: bool, continuous_usage: bool) -> Response {
        let state = Streaming {
            reply: self,
            pending: None,
            queued: None,
            phase: Phase::Tokens,
            include_usage,
            continuous_usage,
        };
        let frames = futures::stream::unfold(state, |mut s| async move {
            s.next_frame()
                .await
                .map(|frame| (Ok::<_, Infallible>(frame), s))
        });
        (
            [
                (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(frames),
        )
            .into_response()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Sending a chunk per token.
    Tokens,
    /// The last token's chunk is sent; the usage chunk (if asked) is next.
    Usage(Value),
    /// Only `data: [DONE]` is left.
    DoneMarker,
    /// The stream is over.
    Over,
}

struct Streaming {
    reply: Reply,
    /// An event read ahead while looking for the end.
    pending: Option<TokenEvent>,
    /// A frame to send before anything else (the first token's, after chat's role chunk).
    queued: Option<Bytes>,
    phase: Phase,
    include_usage: bool,
    continuous_usage: bool,
}

fn frame(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl Streaming {
    async fn next_frame(&mut self) -> Option<Bytes> {
        if let Some(queued) = self.queued.take() {
            return Some(queued);
        }
        match std::mem::replace(&mut self.phase, Phase::Over) {
            Phase::Over => None,
            Phase::DoneMarker => Some(Bytes::from_static(b"data: [DONE]\n\n")),
            Phase::Usage(usage) => {
                self.phase = Phase::DoneMarker;
                let r = &self.reply;
                Some(frame(&protocol::usage_chunk(r.endpoint, &r.head, usage)))
            }
            Phase::Tokens => {
                let out = self.next_token_frame().await;
                Some(out.unwrap_or_else(|e| {
                    // vLLM's streaming error: the error object as a data line, then [DONE].
                    self.phase = Phase::DoneMarker;
                    frame(&e.body())
                }))
            }
        }
    }

    /// The next token's chunk (or the end's), reading ahead one event so the last token's
    /// chunk carries `finish_reason` when the engine delivers both at once.
    async fn next_token_frame(&mut self) -> Result<Bytes, ApiError> {
        loop {
            let ev = match self.pending.take() {
                Some(ev) => ev,
                None => self.reply.rx.recv().await.ok_or_else(|| {
                    ApiError::internal("the engine dropped the request before it finished".into())
                })?,
            };
            let first = self.reply.completion_tokens == 0;
            let before = self.reply.text.len();
            let mut done = self.reply.apply(&ev)?;
            let is_token = matches!(ev, TokenEvent::Token { .. });
            if !is_token && done.is_none() {
                continue;
            }
            if is_token {
                match self.reply.rx.try_recv() {
                    Ok(next) if matches!(next, TokenEvent::Finished { .. }) => {
                        done = self.reply.apply(&next)?;
                    }
                    Ok(next) => self.pending = Some(next),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
                }
            }
            let r = &self.reply;
            let text = &r.text[before..];
            let usage = self
                .continuous_usage
                .then(|| protocol::usage(r.prompt_len, r.completion_tokens, r.cached_tokens));
            let chunk = frame(&protocol::chunk(
                r.endpoint,
                &r.head,
                text,
                false,
                done.as_ref().map(|d| d.finish),
                usage,
            ));
            let role = (first && r.endpoint == Endpoint::Chat).then(|| {
                let usage = self
                    .continuous_usage
                    .then(|| protocol::usage(r.prompt_len, 0, r.cached_tokens));
                frame(&protocol::chunk(r.endpoint, &r.head, "", true, None, usage))
            });
            // Streaming keeps only the text still to send.
            self.reply.text.clear();
            self.phase = match done {
                None => Phase::Tokens,
                Some(d) if self.include_usage => Phase::Usage(d.usage),
                Some(_) => Phase::DoneMarker,
            };
            return Ok(match role {
                Some(role) => {
                    self.queued = Some(chunk);
                    role
                }
                None => chunk,
            });
        }
    }
}
