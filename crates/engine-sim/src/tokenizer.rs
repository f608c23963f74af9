//! A deterministic tokenizer behind vLLM's `POST /tokenize` schema, and the engine's
//! deterministic "generation".
//!
//! Words (split on whitespace) map to ids in `[FIRST_WORD_ID, vocab)` by hash; special tokens:
//! `BOS` first when `add_special_tokens`; chat messages render as `role, words…, END_OF_TURN`,
//! and `add_generation_prompt` appends the assistant role. vLLM's defaults: a prompt adds
//! special tokens, chat messages do not and add the generation prompt.
//!
//! Detokenizing maps each word id to a word of a synthetic vocabulary chosen so that it
//! tokenizes back to the same id (pronounceable syllables, searched once per vocabulary size),
//! so `tokenize(detokenize(ids)) == ids` for word ids, and generated text fed back as chat
//! history hits the prefix cache as a real tokenizer's round trip does.
//!
//! With a model's Hugging Face files (`kvsync sim --tokenizer DIR`, [`Tokenizer::with_files`]),
//! every one of these goes through [`hf_tokenize`] instead, as vLLM serving that model does:
//! prompts `tokenizer(prompt, add_special_tokens)`, chats the model's chat template (with the
//! request's `tools` and `chat_template_kwargs`) tokenized with `add_special_tokens` (false by
//! default), `/detokenize` `tokenizer.decode(ids)`, and each generated token's text its own
//! decoded piece.

use std::sync::Arc;

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
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pub vocab: u32,
    pub max_model_len: usize,
    /// The model's own tokenizer; `None`: the deterministic word tokenizer.
    pub files: Option<Arc<hf_tokenize::Tokenizer>>,
}

/// A chat to tokenize: the members of a chat request the template reads.
#[derive(Debug, Clone, Copy)]
pub struct Chat<'a> {
    pub messages: &'a [Value],
    pub add_generation_prompt: bool,
    pub add_special_tokens: bool,
    /// The request's `tools` (only a model's own template reads them).
    pub tools: Option<&'a [Value]>,
    /// The request's `chat_template_kwargs` (likewise).
    pub template_kwargs: Option<&'a serde_json::Map<String, Value>>,
}

impl<'a> Chat<'a> {
    /// Messages alone, with vLLM's defaults otherwise.
    pub fn messages(messages: &'a [Value]) -> Chat<'a> {
        Chat {
            messages,
            add_generation_prompt: true,
            add_special_tokens: false,
            tools: None,
            template_kwargs: None,
        }
    }
}

impl Tokenizer {
    /// The deterministic word tokenizer of `vocab` ids.
    pub fn words(vocab: u32, max_model_len: usize) -> Tokenizer {
        Tokenizer {
            vocab,
            max_model_len,
            files: None,
        }
    }

    /// A model's own tokenizer (its vocabulary size includes the added tokens).
    pub fn with_files(files: Arc<hf_tokenize::Tokenizer>, max_model_len: usize) -> Tokenizer {
        Tokenizer {
            vocab: u32::try_from(files.vocab_size()).unwrap_or(u32::MAX),
            max_model_len,
            files: Some(files),
        }
    }

    /// A prompt's token ids (vLLM's completions: `add_special_tokens` true by default).
    pub fn prompt(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        match &self.files {
            Some(f) => f
                .encode_prompt(text, add_special_tokens)
                .map_err(|e| e.to_string()),
            None => Ok(self.words_of(text, add_special_tokens)),
        }
    }

    /// A chat's token ids: the model's template, or the word tokenizer's rendering.
    pub fn chat_request(&self, chat: &Chat<'_>) -> Result<Vec<u32>, String> {
        let Some(f) = &self.files else {
            return self.chat(
                chat.messages,
                chat.add_generation_prompt,
                chat.add_special_tokens,
            );
        };
        let mut req =
            hf_tokenize::ChatRequest::new(chat.messages, chat.add_generation_prompt, chat.tools);
        req.template_kwargs = chat.template_kwargs;
        let text = f.render_chat(&req).map_err(|e| e.to_string())?;
        f.encode_prompt(&text, chat.add_special_tokens)
            .map_err(|e| e.to_string())
    }

    pub fn word(&self, w: &str) -> u32 {
        FIRST_WORD_ID + (xxh3_64(w.as_bytes()) % u64::from(self.vocab - FIRST_WORD_ID)) as u32
    }

    /// The word tokenizer's ids of a prompt.
    pub fn words_of(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special_tokens {
            out.push(BOS);
        }
        out.extend(text.split_whitespace().map(|w| self.word(w)));
        out
    }

    /// The word tokenizer's chat. `messages`: `[{"role", "content"}]`. `content` is a string, a list of OpenAI content
    /// parts (the text of `{"type": "text", "text"}` parts, in order) or null (an assistant
    /// turn with tool calls); `developer` is the system role. An unknown role or another
    /// content is an error.
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
                Some("system" | "developer") => ROLE_SYSTEM,
                Some("user") => ROLE_USER,
                Some("assistant") => ROLE_ASSISTANT,
                other => return Err(format!("messages[{i}]: unknown role {other:?}")),
            };
            out.push(role);
            match &m["content"] {
                Value::String(text) => out.extend(text.split_whitespace().map(|w| self.word(w))),
                Value::Array(parts) => {
                    for part in parts {
                        if part["type"] != "text" {
                            return Err(format!(
                                "messages[{i}]: only text content parts are supported"
                            ));
                        }
                        let text = part["text"].as_str().ok_or_else(|| {
                            format!("messages[{i}]: a text part needs a string `text`")
                        })?;
                        out.extend(text.split_whitespace().map(|w| self.word(w)));
                    }
                }
                Value::Null => {}
                _ => {
                    return Err(format!(
                        "messages[{i}]: content must be a string or a list of parts"
                    ))
                }
            }
            out.push(END_OF_TURN);
        }
        if add_generation_prompt {
            out.push(ROLE_ASSISTANT);
        }
        Ok(out)
    }
}

impl Tokenizer {
    /// The text of `ids`: words separated by single spaces, special tokens by their names
    /// (`<s>`, `<|user|>`, ...). An id outside the vocabulary is an error.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
        if let Some(f) = &self.files {
            return f.decode(ids, false).map_err(|e| e.to_string());
        }
        let mut out = String::new();
        for (i, &id) in ids.iter().enumerate() {
            out.push_str(&self.token_text(id, i == 0)?);
        }
        Ok(out)
    }

    /// One token's text as a streaming delta: its word, preceded by a space unless `first`.
    pub fn token_text(&self, id: u32, first: bool) -> Result<String, String> {
        if let Some(f) = &self.files {
            return f.decode(&[id], false).map_err(|e| e.to_string());
        }
        let word: &str = match id {
            BOS => "<s>",
            ROLE_SYSTEM => "<|system|>",
            ROLE_USER => "<|user|>",
            ROLE_ASSISTANT => "<|assistant|>",
            END_OF_TURN => "<|eot|>",
            _ if id < FIRST_WORD_ID => "<unk>",
            _ if id < self.vocab => return Ok(self.word_text(id, first)),
            _ => {
                return Err(format!(
                    "token id {id} is out of vocabulary (size {})",
                    self.vocab
                ))
            }
        };
        Ok(if first {
            word.to_owned()
        } else {
            format!(" {word}")
        })
    }

    /// Builds the detokenizing vocabulary now rather than on the first generated token.
    pub fn prepare_vocabulary(&self) {
        if self.files.is_none() && self.vocab > FIRST_WORD_ID {
            vocabulary(self.vocab);
        }
    }

    fn word_text(&self, id: u32, first: bool) -> String {
        let vocab = vocabulary(self.vocab);
        let w = &vocab[(id - FIRST_WORD_ID) as usize];
        if first {
            w.to_string()
        } else {
            format!(" {w}")
        }
    }
}

/// The synthetic vocabulary of a `vocab`-id tokenizer: entry `i` is a word whose id is
/// `FIRST_WORD_ID + i`. Built once per size (a few milliseconds for 32k ids); a handful of
/// sizes are kept.
type Vocabulary = Arc<[Box<str>]>;

fn vocabulary(vocab: u32) -> Vocabulary {
    static CACHE: parking_lot::Mutex<Vec<(u32, Vocabulary)>> = parking_lot::Mutex::new(Vec::new());
    const KEEP: usize = 8;
    let mut cache = CACHE.lock();
    if let Some((_, v)) = cache.iter().find(|(n, _)| *n == vocab) {
        return v.clone();
    }
    let v = build_vocabulary(vocab);
    if cache.len() == KEEP {
        cache.remove(0);
    }
    cache.push((vocab, v.clone()));
    v
}

fn build_vocabulary(vocab: u32) -> Vocabulary {
    const CONSONANTS: &[u8] = b"bdfghjklmnprstvz";
    const VOWELS: &[u8] = b"aeiou";
    let tok = Tokenizer::words(vocab, 0);
    let size = (vocab - FIRST_WORD_ID) as usize;
    let mut words: Vec<Option<Box<str>>> = vec![None; size];
    let mut missing = size;
    let syllables = (CONSONANTS.len() * VOWELS.len()) as u64;
    let mut w = String::new();
    // Coupon collecting needs about size·ln(size) draws; the cap is far beyond that.
    for n in syllables..(size as u64 * 64).max(syllables * 2) {
        w.clear();
        let mut k = n;
        while k > 0 {
            let s = (k % syllables) as usize;
            w.push(CONSONANTS[s / VOWELS.len()] as char);
            w.push(VOWELS[s % VOWELS.len()] as char);
            k /= syllables;
        }
        let slot = &mut words[(tok.word(&w) - FIRST_WORD_ID) as usize];
        if slot.is_none() {
            *slot = Some(w.as_str().into());
            missing -= 1;
            if missing == 0 {
                break;
            }
        }
    }
    words
        .into_iter()
        .enumerate()
        .map(|(i, w)| w.unwrap_or_else(|| format!("<tok{}>", i as u32 + FIRST_WORD_ID).into()))
        .collect()
}

/// `POST /tokenize`'s answer to `req` (vLLM's `TokenizeCompletionRequest` or
/// `TokenizeChatRequest`), or the error message of a 400.
pub fn tokenize_json(tok: &Tokenizer, req: &Value) -> Result<Value, String> {
    let flag = |k: &str, default: bool| req[k].as_bool().unwrap_or(default);
    let tokens = if let Some(p) = req["prompt"].as_str() {
        tok.prompt(p, flag("add_special_tokens", true))?
    } else if let Some(ms) = req["messages"].as_array() {
        tok.chat_request(&Chat {
            messages: ms,
            add_generation_prompt: flag("add_generation_prompt", true),
            add_special_tokens: flag("add_special_tokens", false),
            tools: req["tools"].as_array().map(Vec::as_slice),
            template_kwargs: req["chat_template_kwargs"].as_object(),
        })?
    } else {
        return Err("either `prompt` or `messages` is required".to_owned());
    };
    let token_strs = if flag("return_token_strs", false) {
        let strs = tokens
            .iter()
            .map(|&t| tok.token_text(t, true))
            .collect::<Result<Vec<_>, _>>()?;
        json!(strs)
    } else {
        Value::Null
    };
    Ok(json!({
        "count": tokens.len(),
        "max_model_len": tok.max_model_len,
        "tokens": tokens,
        "token_strs": token_strs,
    }))
}

/// `POST /detokenize`'s answer to `{"tokens": [ids]}` (vLLM's `DetokenizeResponse`:
/// `{"prompt": text}`), or the error message of a 400.
pub fn detokenize_json(tok: &Tokenizer, req: &Value) -> Result<Value, String> {
    let ids = req["tokens"]
        .as_array()
        .ok_or("`tokens` (a list of token ids) is required")?
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| format!("`tokens`: {v} is not a token id"))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    Ok(json!({ "prompt": tok.detokenize(&ids)? }))
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
    tokenize_json(&tok, &req)
        .map(Json)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))
}

async fn detokenize(
    State(tok): State<Tokenizer>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    let req: Value = serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
    detokenize_json(&tok, &req)
        .map(Json)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))
}

/// Serves `POST /tokenize` and `POST /detokenize` on `listener` until `shutdown` resolves.
pub async fn serve_tokenizer(
    listener: tokio::net::TcpListener,
    tok: Tokenizer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
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
        let t = Tokenizer::words(32_000, 8192);
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
            t.words_of("be brief", true),
            vec![BOS, t.word("be"), t.word("brief")]
        );
        assert!(t
            .chat(&[json!({"role": "robot", "content": "x"})], true, false)
            .is_err());
        let parts = json!([{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]);
        assert_eq!(
            t.chat(&[json!({"role": "system", "content": parts})], false, false),
            Ok(vec![
                ROLE_SYSTEM,
                t.word("be"),
                t.word("brief"),
                END_OF_TURN
            ])
        );
        assert!(t
            .chat(&[json!({"role": "user", "content": 3})], true, false)
            .is_err());
    }

    #[test]
    fn detokenize_round_trips_word_ids() {
        let t = Tokenizer::words(32_000, 8192);
        let ids = t.words_of("the quick brown fox", false);
        let text = t.detokenize(&ids).expect("in vocabulary");
        assert_eq!(text.split(' ').count(), 4);
        assert_eq!(t.words_of(&text, false), ids);
        let generated = output_tokens(&ids, 200, 32_000);
        let text = t.detokenize(&generated).expect("in vocabulary");
        assert_eq!(t.prompt(&text, false), Ok(generated));
        assert!(!text.contains("<tok"), "every word id has a word");
        assert_eq!(
            t.detokenize(&[BOS, ROLE_USER, END_OF_TURN]).as_deref(),
            Ok("<s> <|user|> <|eot|>")
        );
        assert!(t.detokenize(&[32_000]).is_err());
    }

    #[test]
    fn output_depends_on_the_prompt_only() {
        let a = output_tokens(&[1, 2, 3], 20, 32_000);
        assert_eq!(a, output_tokens(&[1, 2, 3], 20, 32_000));
        assert_ne!(a, output_tokens(&[1, 2, 4], 20, 32_000));
        assert!(a.iter().all(|&t| (FIRST_WORD_ID..32_000).contains(&t)));
    }
}
