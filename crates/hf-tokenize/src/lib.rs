//! Tokenize exactly as vLLM does, from a model's Hugging Face files, in process.
//!
//! ```text
//!  model dir ── tokenizer.json ─────────────▶ tokenizers (HF's Rust library, pure Rust regex)
//!           ├── tokenizer_config.json ──────▶ special tokens, chat template(s), add_bos_token
//!           └── generation_config.json ─────▶ eos ids
//!
//!  prompt text ──────────────────────────────────────────── encode(add_special_tokens) ─▶ ids
//!  messages ─ normalize as vLLM ─ render template as transformers ─ encode(false) ──────▶ ids
//! ```
//!
//! [`Tokenizer::from_dir`] loads once (every file problem is one [`LoadError`]);
//! [`Tokenizer::encode_prompt`] is vLLM's completions path; [`Tokenizer::apply_chat_template`] /
//! [`Tokenizer::encode_chat`] its chat path (a template problem is a [`TemplateError`]).
//! Token ids are checked against Hugging Face `transformers` in `tests/parity.rs`.

mod load;
mod messages;
mod pyfmt;
mod template;
mod tokenizer;

pub use load::LoadError;
pub use messages::{ContentFormat, MessageError};
pub use template::TemplateError;
pub use tokenizer::{ChatRequest, EncodeError, Tokenizer};
