//! vLLM's OpenAI-compatible wire shapes: request parsing (with errors naming the field, as
//! vLLM's validation handler does) and the JSON of responses, stream chunks and errors.
//!
//! Shapes from vLLM's `entrypoints/openai/protocol.py` (now split into
//! `completion/protocol.py`, `chat_completion/protocol.py`, `engine/protocol.py`):
//! `CompletionRequest` (`max_tokens` defaults to 16, `null` means "up to max_model_len"),
//! `ChatCompletionRequest` (`max_completion_tokens` before the deprecated `max_tokens`, default
//! up to max_model_len), `UsageInfo` with `prompt_tokens_details.cached_tokens`, `ErrorResponse`
//! (`{"error": {"message", "type", "param", "code"}}` with `code` the HTTP status, from
//! `serve/exception_handling/error_response.py` and `handlers/validation.py`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::tokenizer::{Chat, Tokenizer};

/// An error answered in vLLM's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// vLLM's `type`: `BadRequestError`, `NotFoundError`, `Bad Request` (validation), ...
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    /// A body field failed validation: 400, `param` is `body.FIELD` as pydantic's `loc`.
    /// An empty `field` is the body itself (not JSON, not an object).
    pub fn field(field: &str, msg: impl std::fmt::Display) -> ApiError {
        let loc = if field.is_empty() {
            "body".to_owned()
        } else {
            format!("body.{field}")
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "Bad Request",
            message: format!("1 validation error:\n  {loc}: {msg}"),
            param: Some(loc),
        }
    }

    pub fn bad_request(message: String, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "BadRequestError",
            message,
            param: param.map(str::to_owned),
        }
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "NotFoundError",
            message: format!("The model `{model}` does not exist."),
            param: None,
        }
    }

    pub fn unavailable(message: String) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "ServiceUnavailableError",
            message,
            param: None,
        }
    }

    pub fn internal(message: String) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "InternalServerError",
            message,
            param: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Which endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// A generation request, parsed and tokenized; `max_tokens` still as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    /// `None`: the served model.
    pub model: Option<String>,
    pub prompt: Vec<u32>,
    pub max_tokens: MaxTokens,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
}

/// `max_tokens` as the request gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokens {
    Given(usize),
    /// Up to `max_model_len` (vLLM's default when unset or null).
    ToLimit,
}

type Body = Map<String, Value>;

/// `body[key]`, with JSON `null` read as absent (pydantic's `Optional` fields).
fn get<'a>(body: &'a Body, key: &str) -> Option<&'a Value> {
    body.get(key).filter(|v| !v.is_null())
}

fn get_bool(body: &Body, key: &str) -> Result<Option<bool>, ApiError> {
    get(body, key)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| ApiError::field(key, "Input should be a valid boolean"))
        })
        .transpose()
}

fn get_uint(body: &Body, key: &str) -> Result<Option<usize>, ApiError> {
    get(body, key)
        .map(|v| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| ApiError::field(key, "Input should be a valid non-negative integer"))
        })
        .transpose()
}

/// Parses a request body of `endpoint` and tokenizes its prompt or messages. Unknown fields
/// are ignored, as vLLM does (it logs them).
pub fn parse(endpoint: Endpoint, bytes: &[u8], tok: &Tokenizer) -> Result<GenParams, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::field("", format!("JSON decode error: {e}")))?;
    let Value::Object(body) = value else {
        return Err(ApiError::field(
            "",
            "Input should be a valid dictionary or object",
        ));
    };
    let model = match get(&body, "model") {
        None => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err(ApiError::field("model", "Input should be a valid string")),
    };
    if let Some(n) = get_uint(&body, "n")? {
        if n != 1 {
            return Err(ApiError::bad_request(
                format!("n={n} is not supported by this simulator (only n=1)"),
                Some("n"),
            ));
        }
    }
    let stream = get_bool(&body, "stream")?.unwrap_or(false);
    let (include_usage, continuous_usage) = match get(&body, "stream_options") {
        None => (false, false),
        Some(Value::Object(o)) => (
            get_bool(o, "include_usage")
                .map_err(|_| {
                    ApiError::field(
                        "stream_options.include_usage",
                        "Input should be a valid boolean",
                    )
                })?
                .unwrap_or(true),
            get_bool(o, "continuous_usage_stats")
                .map_err(|_| {
                    ApiError::field(
                        "stream_options.continuous_usage_stats",
                        "Input should be a valid boolean",
                    )
                })?
                .unwrap_or(false),
        ),
        Some(_) => {
            return Err(ApiError::field(
                "stream_options",
                "Input should be a valid dictionary or object",
            ))
        }
    };
    if !stream && get(&body, "stream_options").is_some() {
        return Err(ApiError::bad_request(
            "Stream options can only be defined when `stream=True`.".to_owned(),
            Some("stream_options"),
        ));
    }
    let (prompt, max_tokens) = match endpoint {
        Endpoint::Completions => {
            let prompt = completion_prompt(&body, tok)?;
            // `CompletionRequest.max_tokens: int | None = 16`: absent is 16, null is no limit.
            let max_tokens = match body.get("max_tokens") {
                None => MaxTokens::Given(16),
                Some(Value::Null) => MaxTokens::ToLimit,
                Some(_) => MaxTokens::Given(get_uint(&body, "max_tokens")?.unwrap_or(16)),
            };
            (prompt, max_tokens)
        }
        Endpoint::Chat => {
            let messages = match get(&body, "messages") {
                Some(Value::Array(ms)) => ms,
                Some(_) => return Err(ApiError::field("messages", "Input should be a valid list")),
                None => return Err(ApiError::field("messages", "Field required")),
            };
            let add_generation_prompt = get_bool(&body, "add_generation_prompt")?.unwrap_or(true);
            let add_special_tokens = get_bool(&body, "add_special_tokens")?.unwrap_or(false);
            let tools = match get(&body, "tools") {
                None | Some(Value::Null) => None,
                Some(Value::Array(t)) => Some(t.as_slice()),
                Some(_) => return Err(ApiError::field("tools", "Input should be a valid list")),
            };
            let template_kwargs = match get(&body, "chat_template_kwargs") {
                None | Some(Value::Null) => None,
                Some(Value::Object(o)) => Some(o),
                Some(_) => {
                    return Err(ApiError::field(
                        "chat_template_kwargs",
                        "Input should be a valid dictionary",
                    ))
                }
            };
            let prompt = tok
                .chat_request(&Chat {
                    messages,
                    add_generation_prompt,
                    add_special_tokens,
                    tools,
                    template_kwargs,
                })
                .map_err(|e| ApiError::field("messages", e))?;
            let max_tokens = match get_uint(&body, "max_completion_tokens")? {
                Some(n) => MaxTokens::Given(n),
                None => get_uint(&body, "max_tokens")?.map_or(MaxTokens::ToLimit, MaxTokens::Given),
            };
            (prompt, max_tokens)
        }
    };
    Ok(GenParams {
        model,
        prompt,
        max_tokens,
        stream,
        include_usage: stream && include_usage,
        continuous_usage: stream && include_usage && continuous_usage,
    })
}

/// `prompt`: a string, a list of token ids, or a list of one of those (vLLM batches lists; the
/// simulator takes one prompt).
fn completion_prompt(body: &Body, tok: &Tokenizer) -> Result<Vec<u32>, ApiError> {
    let add_special_tokens = get_bool(body, "add_special_tokens")?.unwrap_or(true);
    let ids = |items: &[Value]| -> Option<Vec<u32>> {
        items
            .iter()
            .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    };
    let text = |s: &str| {
        tok.prompt(s, add_special_tokens)
            .map_err(|e| ApiError::bad_request(e, Some("prompt")))
    };
    let prompt = match get(body, "prompt") {
        None => return Err(ApiError::field("prompt", "Field required")),
        Some(Value::String(s)) => text(s)?,
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => text(s)?,
            [Value::Array(inner)] => ids(inner)
                .ok_or_else(|| ApiError::field("prompt", "Input should be a list of token ids"))?,
            _ => ids(items).ok_or_else(|| {
                ApiError::field(
                    "prompt",
                    "Input should be a string, a list of token ids, or a list of one of those",
                )
            })?,
        },
        Some(_) => {
            return Err(ApiError::field(
                "prompt",
                "Input should be a valid string or list of token ids",
            ))
        }
    };
    if let Some(&t) = prompt.iter().find(|&&t| t >= tok.vocab) {
        return Err(ApiError::bad_request(
            format!("Token id {t} is out of vocabulary"),
            Some("prompt"),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            "The prompt cannot be empty".to_owned(),
            Some("prompt"),
        ));
    }
    Ok(prompt)
}

/// Resolves `max_tokens` against the context length, with vLLM's errors.
pub fn resolve_max_tokens(
    max_tokens: MaxTokens,
    prompt_len: usize,
    max_model_len: usize,
) -> Result<usize, ApiError> {
    if prompt_len >= max_model_len {
        return Err(ApiError::bad_request(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your \
                 request has {prompt_len} input tokens. Please reduce the length of the input \
                 messages."
            ),
            None,
        ));
    }
    let room = max_model_len - prompt_len;
    match max_tokens {
        MaxTokens::Given(0) => Err(ApiError::bad_request(
            "max_tokens must be at least 1, got 0.".to_owned(),
            Some("max_tokens"),
        )),
        MaxTokens::ToLimit => Ok(room),
        MaxTokens::Given(n) if n > room => Err(ApiError::bad_request(
            format!(
                "'max_tokens' or 'max_completion_tokens' is too large: {n}. This model's maximum \
                 context length is {max_model_len} tokens and your request has {prompt_len} \
                 input tokens ({n} > {max_model_len} - {prompt_len}). (parameter=max_tokens, \
                 value={n})"
            ),
            Some("max_tokens"),
        )),
        MaxTokens::Given(n) => Ok(n),
    }
}

/// vLLM's `UsageInfo`, with `prompt_tokens_details` always filled (vLLM fills it only with
/// `--enable-prompt-tokens-details`).
pub fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

/// The identity of one response: id, creation time, model name.
#[derive(Debug, Clone)]
pub struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// A non-streaming response.
pub fn response(endpoint: Endpoint, head: &Head, text: &str, finish: &str, usage: Value) -> Value {
    match endpoint {
        Endpoint::Completions => json!({
            "id": head.id, "object": "text_completion", "created": head.created,
            "model": head.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                         "stop_reason": null, "prompt_logprobs": null}],
            "usage": usage, "system_fingerprint": null, "kv_transfer_params": null,
        }),
        Endpoint::Chat => json!({
            "id": head.id, "object": "chat.completion", "created": head.created,
            "model": head.model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": text,
                                     "reasoning_content": null, "tool_calls": []},
                         "logprobs": null, "finish_reason": finish, "stop_reason": null}],
            "usage": usage, "prompt_logprobs": null, "kv_transfer_params": null,
        }),
    }
}

/// One streamed chunk carrying `text` (and `finish` on the last); `first` makes chat's role
/// chunk. Chat chunks are dumped with `exclude_unset` (no `usage` key unless continuous usage
/// is on, `stop_reason` only on the last), completion chunks without (`usage: null`), as
/// vLLM's serving code does.
pub fn chunk(
    endpoint: Endpoint,
    head: &Head,
    text: &str,
    first: bool,
    finish: Option<&str>,
    usage: Option<Value>,
) -> Value {
    let mut v = match endpoint {
        Endpoint::Completions => json!({
            "id": head.id, "object": "text_completion", "created": head.created,
            "model": head.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                         "stop_reason": null}],
            "usage": null,
        }),
        Endpoint::Chat => {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else {
                json!({"content": text})
            };
            let mut choice = json!({"index": 0, "delta": delta, "logprobs": null,
                                    "finish_reason": finish});
            if finish.is_some() {
                choice["stop_reason"] = Value::Null;
            }
            json!({
                "id": head.id, "object": "chat.completion.chunk", "created": head.created,
                "model": head.model, "choices": [choice],
            })
        }
    };
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

/// The final chunk of `stream_options.include_usage`: no choices, the usage (dumped with
/// `exclude_none`).
pub fn usage_chunk(endpoint: Endpoint, head: &Head, usage: Value) -> Value {
    let object = match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    };
    json!({
        "id": head.id, "object": object, "created": head.created, "model": head.model,
        "choices": [], "usage": usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::words(32_000, 100)
    }

    fn parse_ok(endpoint: Endpoint, body: Value) -> GenParams {
        parse(endpoint, body.to_string().as_bytes(), &tok()).expect("valid")
    }

    #[test]
    fn max_tokens_defaults_as_vllm() {
        let c = |body: Value| parse_ok(Endpoint::Completions, body).max_tokens;
        assert_eq!(c(json!({"prompt": "a"})), MaxTokens::Given(16));
        assert_eq!(
            c(json!({"prompt": "a", "max_tokens": null})),
            MaxTokens::ToLimit
        );
        assert_eq!(
            c(json!({"prompt": "a", "max_tokens": 3})),
            MaxTokens::Given(3)
        );
        let m = json!([{"role": "user", "content": "hi"}]);
        let chat = |extra: Value| {
            let mut body = json!({"messages": m});
            if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
                b.extend(e);
            }
            parse_ok(Endpoint::Chat, body).max_tokens
        };
        assert_eq!(chat(json!({})), MaxTokens::ToLimit);
        assert_eq!(chat(json!({"max_tokens": 5})), MaxTokens::Given(5));
        assert_eq!(
            chat(json!({"max_tokens": 5, "max_completion_tokens": 7})),
            MaxTokens::Given(7)
        );
        assert_eq!(resolve_max_tokens(MaxTokens::ToLimit, 40, 100), Ok(60));
        assert_eq!(resolve_max_tokens(MaxTokens::Given(60), 40, 100), Ok(60));
        let e = resolve_max_tokens(MaxTokens::Given(61), 40, 100).expect_err("too long");
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(resolve_max_tokens(MaxTokens::ToLimit, 100, 100).is_err());
        assert!(resolve_max_tokens(MaxTokens::Given(0), 1, 100).is_err());
    }

    #[test]
    fn stream_options_need_stream_and_default_to_usage() {
        let p = parse_ok(
            Endpoint::Completions,
            json!({"prompt": "a", "stream": true, "stream_options": {}, "unknown": 1}),
        );
        assert!(p.stream && p.include_usage && !p.continuous_usage);
        let e = parse(
            Endpoint::Completions,
            br#"{"prompt": "a", "stream_options": {"include_usage": true}}"#,
            &tok(),
        )
        .expect_err("stream_options without stream");
        assert_eq!(e.param.as_deref(), Some("stream_options"));
    }

    #[test]
    fn prompts_as_text_or_token_ids() {
        let p = |prompt: Value| parse_ok(Endpoint::Completions, json!({"prompt": prompt})).prompt;
        assert_eq!(p(json!("x y")), tok().words_of("x y", true));
        assert_eq!(p(json!(["x y"])), tok().words_of("x y", true));
        assert_eq!(p(json!([5, 1200])), vec![5, 1200]);
        assert_eq!(p(json!([[5, 1200]])), vec![5, 1200]);
        for bad in [json!([]), json!([-1]), json!([40_000]), json!({"a": 1})] {
            let body = json!({"prompt": bad}).to_string();
            assert!(
                parse(Endpoint::Completions, body.as_bytes(), &tok()).is_err(),
                "{bad}"
            );
        }
    }
}
