//! A deterministic tokenizer behind vLLM's `POST /tokenize` schema, and the engine's
//! deterministic "generation".
//!
//! Words (split on whitespace) map to ids in `[FIRST_WORD_ID, vocab)` by hash; special tokens:
//! `BOS` first when `add_special_tokens`; chat messages render as `role, words…, END_OF_TURN`,
//! and `add_generation_prompt` appends the assistant role. vLLM's defaults: a prompt adds
//! special tokens, chat messages do not and add the generation prompt.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use xxhash_rust::xxh3::xxh3_64;

pub const BOS: u32 = 1;
pub const ROLE_SYSTEM: u32 = 2;
pub const ROLE_USER: u32 = 3;
pub const ROLE_ASSISTANT: u32 = 4;
pub const END_OF_TURN: u32 = 5;
pub const FIRST_WORD_ID: u32 = 1000;

/// The tokenizer of a model with `vocab` ids.
#[derive(Debug, Clone, Copy)]
pub struct Tokenizer {
    pub vocab: u32,
    pub max_model_len: usize,
}

impl Tokenizer {
    pub fn word(&self, w: &str) -> u32 {
        FIRST_WORD_ID + (xxh3_64(w.as_bytes()) % u64::from(self.vocab - FIRST_WORD_ID)) as u32
    }

    pub fn prompt(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special_tokens {
            out.push(BOS);
        }
        out.extend(text.split_whitespace().map(|w| self.word(w)));
        out
    }

    /// `messages`: `[{"role", "content"}]`; an unknown role or a non-string content is an error.
    pub fn chat(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        if add_special_tokens {
            out.push(BOS);
        }
        for (i, m) in messages.iter().enumerate() {
            let role = match m["role"].as_str() {
                Some("system") => ROLE_SYSTEM,
                Some("user") => ROLE_USER,
                Some("assistant") => ROLE_ASSISTANT,
                other => return Err(format!("messages[{i}]: unknown role {other:?}")),
            };
            let content = m["content"]
                .as_str()
                .ok_or_else(|| format!("messages[{i}]: content must be a string"))?;
            out.push(role);
            out.extend(content.split_whitespace().map(|w| self.word(w)));
            out.push(END_OF_TURN);
        }
        if add_generation_prompt {
            out.push(ROLE_ASSISTANT);
        }
        Ok(out)
    }
}

/// The `n` tokens an engine generates after `prompt` (a pure function of the prompt).
pub fn output_tokens(prompt: &[u32], n: usize, vocab: u32) -> Vec<u32> {
    OutputTokens::new(prompt, vocab).take(n).collect()
}

/// [`output_tokens`] one at a time (an endless iterator).
#[derive(Debug, Clone)]
pub struct OutputTokens {
    x: u64,
    vocab: u32,
}

impl OutputTokens {
    pub fn new(prompt: &[u32], vocab: u32) -> OutputTokens {
        OutputTokens {
            x: xxh3_64(le_bytes(prompt).as_slice()) | 1,
            vocab,
        }
    }
}

impl Iterator for OutputTokens {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        // xorshift64
        let x = &mut self.x;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        Some(FIRST_WORD_ID + (*x % u64::from(self.vocab - FIRST_WORD_ID)) as u32)
    }
}

fn le_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn error(status: StatusCode, msg: String) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(
            json!({"object": "error", "message": msg, "type": "BadRequestError", "code": status.as_u16()}),
        ),
    )
}

async fn tokenize(
    State(tok): State<Tokenizer>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    let req: Value = serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
    let flag = |k: &str, default: bool| req[k].as_bool().unwrap_or(default);
    let tokens = if let Some(p) = req["prompt"].as_str() {
        tok.prompt(p, flag("add_special_tokens", true))
    } else if let Some(ms) = req["messages"].as_array() {
        tok.chat(
            ms,
            flag("add_generation_prompt", true),
            flag("add_special_tokens", false),
        )
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))?
    } else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "either `prompt` or `messages` is required".to_owned(),
        ));
    };
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": tok.max_model_len,
        "tokens": tokens,
        "token_strs": null,
    })))
}

/// Serves `POST /tokenize` on `listener` until `shutdown` resolves.
pub async fn serve_tokenizer(
    listener: tokio::net::TcpListener,
    tok: Tokenizer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/tokenize", post(tokenize))
        .with_state(tok);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_renders_roles_and_generation_prompt() {
        let t = Tokenizer {
            vocab: 32_000,
            max_model_len: 8192,
        };
        let ms = vec![
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": "hi"}),
        ];
        let got = t.chat(&ms, true, false).expect("chat");
        assert_eq!(
            got,
            vec![
                ROLE_SYSTEM,
                t.word("be"),
                t.word("brief"),
                END_OF_TURN,
                ROLE_USER,
                t.word("hi"),
                END_OF_TURN,
                ROLE_ASSISTANT
            ]
        );
        assert!(got[1] >= FIRST_WORD_ID && got[1] < 32_000);
        assert_eq!(
            t.prompt("be brief", true),
            vec![BOS, t.word("be"), t.word("brief")]
        );
        assert!(t
            .chat(&[json!({"role": "robot", "content": "x"})], true, false)
            .is_err());
    }

    #[test]
    fn output_depends_on_the_prompt_only() {
        let a = output_tokens(&[1, 2, 3], 20, 32_000);
        assert_eq!(a, output_tokens(&[1, 2, 3], 20, 32_000));
        assert_ne!(a, output_tokens(&[1, 2, 4], 20, 32_000));
        assert!(a.iter().all(|&t| (FIRST_WORD_ID..32_000).contains(&t)));
    }
}
