//! `POST /tokenize` in vLLM's shape (`vllm/entrypoints/openai/protocol.py`:
//! `TokenizeCompletionRequest` / `TokenizeChatRequest` → `TokenizeResponse`), answered with the
//! tokenizer kvsync routes the model with (local or remote), so an operator can compare it
//! with an engine's own `/tokenize`.
//!
//! Request: `model`, and `prompt` (`add_special_tokens`, default true) or `messages`
//! (`add_generation_prompt` default true, `add_special_tokens` default false, `tools`,
//! `chat_template_kwargs`). Answer: `{"count", "max_model_len", "tokens", "token_strs": null}`
//! and `x-kvsync-tokenizer: local|remote`; `max_model_len` is the engine's when the remote
//! tokenizer answered, null when kvsync tokenized (it does not know the engine's limit).
//! Errors in vLLM's shape: 400 for a bad request or a chat the template refuses, 404 for a
//! model kvsync has no tokenizer for, 502 when the remote tokenizer fails.

use super::body::read_body;
use super::AppState;
use crate::proxy::openai_error;
use crate::tokenize::Text;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::Arc;

/// The response header naming the tokenizer that answered.
pub const TOKENIZER_HEADER: &str = "x-kvsync-tokenizer";

fn bad(msg: impl Into<String>) -> Response {
    openai_error(StatusCode::BAD_REQUEST, "BadRequestError", msg)
}

/// An optional boolean member (the error: the message of a 400).
fn flag(req: &Value, key: &str, default: bool) -> Result<bool, String> {
    match &req[key] {
        Value::Null => Ok(default),
        Value::Bool(b) => Ok(*b),
        _ => Err(format!("`{key}` must be a boolean")),
    }
}

pub(super) async fn tokenize(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, s.body_timeout).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return bad("the body must be a JSON object"),
        Err(e) => return bad(format!("JSON decode error: {e}")),
    };
    drop(body);
    let Some(name) = req["model"].as_str().filter(|m| !m.is_empty()) else {
        return bad("`model` (a non-empty string) is required");
    };
    let text = match (&req["prompt"], &req["messages"]) {
        (Value::String(p), Value::Null) => Text::Prompt {
            prompt: p,
            add_special_tokens: match flag(&req, "add_special_tokens", true) {
                Ok(f) => f,
                Err(m) => return bad(m),
            },
        },
        (Value::Null, m @ Value::Array(_)) => {
            let (gen, special) = match (
                flag(&req, "add_generation_prompt", true),
                flag(&req, "add_special_tokens", false),
            ) {
                (Ok(g), Ok(sp)) => (g, sp),
                (Err(m), _) | (_, Err(m)) => return bad(m),
            };
            if flag(&req, "continue_final_message", false).unwrap_or(false) {
                return bad("`continue_final_message` is not supported by kvsync's /tokenize");
            }
            Text::Messages {
                messages: m,
                add_generation_prompt: gen,
                add_special_tokens: special,
                tools: Some(&req["tools"]),
                template_kwargs: Some(&req["chat_template_kwargs"]),
            }
        }
        _ => return bad("exactly one of `prompt` (a string) or `messages` (a list) is required"),
    };
    // A LoRA adapter's name: its base model's tokenizer.
    let base = crate::proxy::resolve(&s, name).map_or_else(|| name.to_owned(), |r| r.0);
    match super::tokenize_as(&s, name, &base, text).await {
        Ok(t) => {
            let answer = json!({
                "count": t.tokens.len(),
                "max_model_len": t.max_model_len,
                "tokens": t.tokens,
                "token_strs": null,
            });
            let mut r = (
                [(header::CONTENT_TYPE, "application/json")],
                answer.to_string(),
            )
                .into_response();
            r.headers_mut()
                .insert(TOKENIZER_HEADER, HeaderValue::from_static(t.source.name()));
            r
        }
        Err(f) => {
            let kind = match f.status {
                StatusCode::BAD_REQUEST => "BadRequestError",
                StatusCode::NOT_FOUND => "NotFoundError",
                StatusCode::BAD_GATEWAY => "BadGatewayError",
                _ => "InternalServerError",
            };
            let mut r = openai_error(f.status, kind, f.message);
            r.headers_mut()
                .insert(TOKENIZER_HEADER, HeaderValue::from_static(f.source.name()));
            r
        }
    }
}
