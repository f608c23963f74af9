//! [`Tokenizer`]: a model's tokenizer and chat template, used as vLLM uses them.
//!
//! - Text prompts (`/v1/completions`): `tokenizer(prompt, add_special_tokens=...)`, where the
//!   request's `add_special_tokens` defaults to true (vLLM's `CompletionRequest`).
//! - Chats (`/v1/chat/completions`): the messages normalized as vLLM's `parse_chat_messages`
//!   does ([`crate::messages`]), rendered with `apply_chat_template(..., tokenize=False)`, then
//!   tokenized with `add_special_tokens=False` (the default of vLLM's `ChatCompletionRequest`),
//!   so a BOS the template writes is not added a second time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::Value;
use serde_json::Value as Json;

use crate::load::{load, LoadError};
use crate::messages::normalize;
use crate::template::{ChatTemplates, TemplateError};

/// A tokenizing error of the `tokenizers` library (for byte-level BPE models it cannot occur).
#[derive(Debug, thiserror::Error)]
#[error("tokenizing failed: {0}")]
pub struct EncodeError(String);

/// One chat to render, with every option vLLM passes to the template.
#[derive(Debug, Clone, Copy)]
pub struct ChatRequest<'a> {
    /// OpenAI chat messages (`content` a string, a list of text parts, or null).
    pub messages: &'a [Json],
    /// `add_generation_prompt` (vLLM's default: true).
    pub add_generation_prompt: bool,
    /// Tool definitions as given in the request (`{"type": "function", "function": {...}}`).
    pub tools: Option<&'a [Json]>,
    /// `chat_template_kwargs`: extra template variables (e.g. `enable_thinking`); they
    /// override the special-token variables of the same name.
    pub template_kwargs: Option<&'a serde_json::Map<String, Json>>,
    /// The time `strftime_now` formats, as seconds since the Unix epoch.
    pub now_unix: i64,
}

impl<'a> ChatRequest<'a> {
    /// A request with the wall clock's time and no extra template variables.
    pub fn new(
        messages: &'a [Json],
        add_generation_prompt: bool,
        tools: Option<&'a [Json]>,
    ) -> Self {
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        ChatRequest {
            messages,
            add_generation_prompt,
            tools,
            template_kwargs: None,
            now_unix,
        }
    }
}

/// A model's tokenizer, loaded once from its Hugging Face files; cheap to share (`Send + Sync`).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    templates: Option<ChatTemplates>,
    /// The template variables of `special_tokens_map`.
    special_vars: BTreeMap<&'static str, Value>,
    special: BTreeMap<&'static str, String>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("has_chat_template", &self.templates.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and (if present) `chat_template.jinja`,
    /// `special_tokens_map.json` and `generation_config.json` from `dir`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Tokenizer, LoadError> {
        let loaded = load(dir.as_ref())?;
        let mut special_vars = BTreeMap::new();
        for (name, text) in &loaded.special {
            special_vars.insert(*name, Value::from(text.as_str()));
        }
        if !loaded.additional_special.is_empty() {
            let list: Vec<Value> = loaded
                .additional_special
                .iter()
                .map(|t| Value::from(t.as_str()))
                .collect();
            special_vars.insert("additional_special_tokens", Value::from(list));
        }
        let mut eos_ids = Vec::new();
        if let Some(id) = loaded
            .special
            .get("eos_token")
            .and_then(|t| loaded.inner.token_to_id(t))
        {
            eos_ids.push(id);
        }
        for id in &loaded.generation_eos {
            if !eos_ids.contains(id) {
                eos_ids.push(*id);
            }
        }
        Ok(Tokenizer {
            inner: loaded.inner,
            templates: loaded.templates,
            special_vars,
            special: loaded.special,
            eos_ids,
        })
    }

    /// A text prompt's token ids, as vLLM's completions API computes them.
    pub fn encode_prompt(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, EncodeError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EncodeError(e.to_string()))
    }

    /// The chat template rendered with the wall clock's time (see [`Tokenizer::render_chat`]).
    pub fn apply_chat_template(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        tools: Option<&[Json]>,
    ) -> Result<String, TemplateError> {
        self.render_chat(&ChatRequest::new(messages, add_generation_prompt, tools))
    }

    /// A chat's token ids, as vLLM's chat completions API computes them.
    pub fn encode_chat(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        tools: Option<&[Json]>,
    ) -> Result<Vec<u32>, TemplateError> {
        self.encode_chat_request(&ChatRequest::new(messages, add_generation_prompt, tools))
    }

    /// The prompt text vLLM renders for a chat request.
    pub fn render_chat(&self, req: &ChatRequest<'_>) -> Result<String, TemplateError> {
        let templates = self.templates.as_ref().ok_or(TemplateError::NoTemplate)?;
        if req.messages.is_empty() {
            return Err(TemplateError::Empty);
        }
        let format = templates.content_format(req.tools.is_some())?;
        let messages = normalize(req.messages, format)?;
        templates.render(
            &messages,
            req.tools,
            req.add_generation_prompt,
            req.now_unix,
            &self.special_vars,
            req.template_kwargs,
        )
    }

    /// [`Tokenizer::render_chat`], tokenized without adding special tokens again.
    pub fn encode_chat_request(&self, req: &ChatRequest<'_>) -> Result<Vec<u32>, TemplateError> {
        let text = self.render_chat(req)?;
        self.encode_prompt(&text, false)
            .map_err(|e| TemplateError::Encode(e.0))
    }

    /// Whether the model's files carry a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.templates.is_some()
    }

    /// A named special token's text (`"bos_token"`, `"eos_token"`, ...), if the model has one.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special.get(name).map(String::as_str)
    }

    /// The ids that end generation: the tokenizer's EOS, then `generation_config.json`'s
    /// `eos_token_id`s not already listed.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The text of `ids` (`tokenizer.decode(ids, skip_special_tokens=...)`), e.g. a generated
    /// completion; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EncodeError> {
        if let Some(id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(EncodeError(format!(
                "token id {id} is out of vocabulary (size {})",
                self.vocab_size()
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EncodeError(e.to_string()))
    }

    /// The vocabulary size without the added tokens (ids below it are the model's own).
    pub fn base_vocab_size(&self) -> usize {
        self.inner.get_vocab_size(false)
    }

    /// The vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A token's id, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
