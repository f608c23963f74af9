//! In-process tokenizers: one per model configured with `--tokenizer MODEL=DIR` (or
//! `KVSYNC_TOKENIZERS`), loaded once at start from the model's Hugging Face files
//! ([`hf_tokenize::Tokenizer::from_dir`]); a model without one falls back to the remote
//! `/tokenize` ([`super::Tokenizer`]).
//!
//! Text is tokenized as vLLM's OpenAI server does (`vllm/entrypoints/openai/serving_engine.py`,
//! `_tokenize_prompt_input_async` and `_preprocess_chat`): a prompt with the request's
//! `add_special_tokens` (true by default), a chat rendered by the model's template with the
//! request's `tools` and `chat_template_kwargs`, then tokenized with `add_special_tokens`
//! (false by default, so a BOS the template writes is not added twice).
//!
//! Encoding is CPU work (about 1 ms per 1k tokens): a short text is encoded on the calling
//! task, a longer one on tokio's blocking pool, at most [`LocalTokenizers::permits`] at once
//! (the rest wait their turn without holding a thread), so the runtime's workers keep serving.
//! (`block_in_place` was measured too: no better in the proxy bench, and 1.7–2.5× slower than
//! the blocking pool for 8k–32k tokens in the tokenize bench, where it ran on the `block_on`
//! thread.)

use super::Text;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Texts up to this many bytes are encoded on the calling task (well under 100 µs).
pub const INLINE_BYTES: usize = 512;

/// Most models given local tokenizers (each holds its vocabulary, tens of MB).
pub const MAX_MODELS: usize = 64;

/// A model's tokenizer files could not be used (at start: the service refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "--tokenizer {spec:?}: expected MODEL=DIR (a model name, `=`, its tokenizer directory)"
    )]
    Spec { spec: String },
    #[error("--tokenizer: model {model:?} is given twice")]
    Duplicate { model: String },
    #[error("--tokenizer: at most {MAX_MODELS} models have local tokenizers")]
    TooMany,
    /// (The file's error is in the message, not a `source`: printed once.)
    #[error("the tokenizer of model {model:?} (from {}): {error}", dir.display())]
    Files {
        model: String,
        dir: PathBuf,
        error: Box<hf_tokenize::LoadError>,
    },
}

/// Parses one `MODEL=DIR` (split at the first `=`: model names have none, a directory may).
pub fn parse_spec(spec: &str) -> Result<(String, PathBuf), LoadError> {
    match spec.split_once('=') {
        Some((model, dir)) if !model.trim().is_empty() && !dir.trim().is_empty() => {
            Ok((model.trim().to_owned(), PathBuf::from(dir.trim())))
        }
        _ => Err(LoadError::Spec {
            spec: spec.to_owned(),
        }),
    }
}

/// Checks a list of `(model, dir)`: no model twice, at most [`MAX_MODELS`].
pub fn check_specs(specs: &[(String, PathBuf)]) -> Result<(), LoadError> {
    if specs.len() > MAX_MODELS {
        return Err(LoadError::TooMany);
    }
    let mut seen = std::collections::BTreeSet::new();
    for (model, _) in specs {
        if !seen.insert(model.as_str()) {
            return Err(LoadError::Duplicate {
                model: model.clone(),
            });
        }
    }
    Ok(())
}

/// One model's tokenizer.
#[derive(Debug, Clone)]
pub struct LocalTokenizer {
    /// Where its files were read.
    pub dir: PathBuf,
    pub tok: Arc<hf_tokenize::Tokenizer>,
}

/// Why a text could not be tokenized locally.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The request's chat cannot be rendered (vLLM answers 400 too).
    #[error("{0}")]
    Template(#[from] hf_tokenize::TemplateError),
    /// The request's `tools` or `chat_template_kwargs` have the wrong type.
    #[error("{0}")]
    Request(String),
    #[error("{0}")]
    Encode(#[from] hf_tokenize::EncodeError),
    /// The blocking task did not finish (the runtime is shutting down).
    #[error("tokenizing was interrupted: {0}")]
    Interrupted(String),
}

impl LocalError {
    /// Whether the request is at fault (answered 400) rather than kvsync (500).
    pub fn is_bad_request(&self) -> bool {
        matches!(self, LocalError::Template(_) | LocalError::Request(_))
    }
}

/// The local tokenizers of the configured models.
#[derive(Debug)]
pub struct LocalTokenizers {
    by_model: BTreeMap<String, LocalTokenizer>,
    permits: Arc<Semaphore>,
    n_permits: usize,
}

impl Default for LocalTokenizers {
    fn default() -> Self {
        LocalTokenizers::new(BTreeMap::new())
    }
}

impl LocalTokenizers {
    fn new(by_model: BTreeMap<String, LocalTokenizer>) -> LocalTokenizers {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        LocalTokenizers {
            by_model,
            permits: Arc::new(Semaphore::new(n)),
            n_permits: n,
        }
    }

    /// Loads every `(model, dir)` (blocking: call it off the runtime's workers). The first
    /// problem is the error, naming the model and the file.
    pub fn load(specs: &[(String, PathBuf)]) -> Result<LocalTokenizers, LoadError> {
        check_specs(specs)?;
        let mut by_model = BTreeMap::new();
        for (model, dir) in specs {
            let tok = load_one(model, dir)?;
            by_model.insert(model.clone(), tok);
        }
        Ok(LocalTokenizers::new(by_model))
    }

    /// The local tokenizer of `model`, if one is configured.
    pub fn get(&self, model: &str) -> Option<&LocalTokenizer> {
        self.by_model.get(model)
    }

    /// The models with a local tokenizer, by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &LocalTokenizer)> {
        self.by_model.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many texts are encoded on the blocking pool at once.
    pub fn permits(&self) -> usize {
        self.n_permits
    }

    /// `text`'s token ids under `tok`: on this task when short, else on the blocking pool.
    pub async fn encode(
        &self,
        tok: &LocalTokenizer,
        text: Text<'_>,
    ) -> Result<Vec<u32>, LocalError> {
        let owned = Owned::of(&text)?;
        if owned.size() <= INLINE_BYTES {
            return owned.encode(&tok.tok);
        }
        // The semaphore is never closed.
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| LocalError::Interrupted(e.to_string()))?;
        let t = tok.tok.clone();
        tokio::task::spawn_blocking(move || owned.encode(&t))
            .await
            .map_err(|e| LocalError::Interrupted(e.to_string()))?
    }
}

/// Loads one model's files.
pub fn load_one(model: &str, dir: &Path) -> Result<LocalTokenizer, LoadError> {
    let tok = hf_tokenize::Tokenizer::from_dir(dir).map_err(|error| LoadError::Files {
        model: model.to_owned(),
        dir: dir.to_owned(),
        error: Box::new(error),
    })?;
    Ok(LocalTokenizer {
        dir: dir.to_owned(),
        tok: Arc::new(tok),
    })
}

/// A text owned, to move to a blocking thread.
enum Owned {
    Prompt {
        prompt: String,
        add_special_tokens: bool,
    },
    Chat {
        messages: Vec<Value>,
        add_generation_prompt: bool,
        add_special_tokens: bool,
        tools: Option<Vec<Value>>,
        kwargs: Option<serde_json::Map<String, Value>>,
        size: usize,
    },
}

impl Owned {
    fn of(text: &Text<'_>) -> Result<Owned, LocalError> {
        Ok(match *text {
            Text::Prompt {
                prompt,
                add_special_tokens,
            } => Owned::Prompt {
                prompt: prompt.to_owned(),
                add_special_tokens,
            },
            Text::Messages {
                messages,
                add_generation_prompt,
                add_special_tokens,
                tools,
                template_kwargs,
            } => {
                let tools = match tools {
                    None | Some(Value::Null) => None,
                    Some(Value::Array(t)) => Some(t.clone()),
                    Some(_) => return Err(LocalError::Request("`tools` must be a list".into())),
                };
                let kwargs = match template_kwargs {
                    None | Some(Value::Null) => None,
                    Some(Value::Object(k)) => Some(k.clone()),
                    Some(_) => {
                        return Err(LocalError::Request(
                            "`chat_template_kwargs` must be an object".into(),
                        ))
                    }
                };
                let messages = match messages {
                    Value::Array(m) => m.clone(),
                    _ => return Err(LocalError::Request("`messages` must be a list".into())),
                };
                let size = text_bytes(&messages) + tools.as_ref().map_or(0, |t| text_bytes(t));
                Owned::Chat {
                    messages,
                    add_generation_prompt,
                    add_special_tokens,
                    tools,
                    kwargs,
                    size,
                }
            }
        })
    }

    /// About how many bytes of text there are to encode.
    fn size(&self) -> usize {
        match self {
            Owned::Prompt { prompt, .. } => prompt.len(),
            Owned::Chat { size, .. } => *size,
        }
    }

    fn encode(&self, tok: &hf_tokenize::Tokenizer) -> Result<Vec<u32>, LocalError> {
        match self {
            Owned::Prompt {
                prompt,
                add_special_tokens,
            } => Ok(tok.encode_prompt(prompt, *add_special_tokens)?),
            Owned::Chat {
                messages,
                add_generation_prompt,
                add_special_tokens,
                tools,
                kwargs,
                ..
            } => {
                let mut req = hf_tokenize::ChatRequest::new(
                    messages,
                    *add_generation_prompt,
                    tools.as_deref(),
                );
                req.template_kwargs = kwargs.as_ref();
                let rendered = tok.render_chat(&req)?;
                Ok(tok.encode_prompt(&rendered, *add_special_tokens)?)
            }
        }
    }
}

/// The bytes of the strings in `values` (deep), a measure of the work to encode them.
fn text_bytes(values: &[Value]) -> usize {
    fn walk(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(walk).sum(),
            Value::Object(o) => o.iter().map(|(k, v)| k.len() + walk(v)).sum(),
            _ => 8,
        }
    }
    values.iter().map(walk).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_split_at_the_first_equals_sign_and_are_checked() {
        assert_eq!(
            parse_spec("Qwen/Qwen3-8B=/models/q=3").expect("valid"),
            ("Qwen/Qwen3-8B".to_owned(), PathBuf::from("/models/q=3"))
        );
        for bad in ["", "model", "=dir", "model=", " = "] {
            assert!(
                matches!(parse_spec(bad), Err(LoadError::Spec { .. })),
                "{bad:?}"
            );
        }
        let twice = vec![
            ("m".to_owned(), PathBuf::from("/a")),
            ("m".to_owned(), PathBuf::from("/b")),
        ];
        let e = check_specs(&twice).expect_err("duplicate");
        assert!(e.to_string().contains("\"m\" is given twice"), "{e}");
    }

    #[test]
    fn a_missing_directory_is_one_error_naming_the_model_and_the_file() {
        let e = LocalTokenizers::load(&[("org/m".to_owned(), PathBuf::from("/nonexistent/x"))])
            .expect_err("no files");
        let msg = e.to_string();
        assert!(
            msg.contains("\"org/m\"") && msg.contains("/nonexistent/x"),
            "{msg}"
        );
    }
}
