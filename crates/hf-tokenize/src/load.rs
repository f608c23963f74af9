//! Reading a model's Hugging Face tokenizer files into what [`crate::Tokenizer`] needs, as
//! `transformers`' `AutoTokenizer.from_pretrained(dir)` (which vLLM uses) reads them:
//!
//! - `tokenizer.json`: the `tokenizers` pipeline, with truncation and padding off (transformers
//!   switches both off on every call unless asked);
//! - `tokenizer_config.json`: `chat_template` (a string, or a list of `{name, template}`),
//!   the named special tokens (a string or an `AddedToken` object `{"content": ...}`), and for
//!   the Llama and Gemma tokenizer classes `add_bos_token`/`add_eos_token`, from which
//!   `LlamaTokenizerFast.update_post_processor` rebuilds the post-processor;
//! - `chat_template.jinja` if present (it takes the place of the config's template, as in
//!   transformers ≥ 4.43); `special_tokens_map.json` if present (its tokens win over the
//!   config's, as `from_pretrained` reads it last);
//! - `generation_config.json` if present: `eos_token_id` (a number or a list).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::template::ChatTemplates;

/// Why a model's tokenizer files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is not a tokenizer the `tokenizers` library can load: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{path}: field {field:?} {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("chat template {name:?} in {path} does not compile: {reason}")]
    Template {
        path: PathBuf,
        name: String,
        reason: String,
    },
}

/// The named special tokens, as `tokenizer.special_tokens_map` (the template sees these).
pub(crate) const SPECIAL_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Everything read from the files.
pub(crate) struct Loaded {
    pub inner: tokenizers::Tokenizer,
    pub templates: Option<ChatTemplates>,
    /// Named special tokens present (non-empty), by name.
    pub special: BTreeMap<&'static str, String>,
    pub additional_special: Vec<String>,
    pub generation_eos: Vec<u32>,
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Json, LoadError> {
    serde_json::from_str(&read(path)?).map_err(|source| LoadError::Json {
        path: path.to_owned(),
        source,
    })
}

fn read_json_if_present(path: &Path) -> Result<Option<Json>, LoadError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A special token's text: a string, or an `AddedToken` object's `content`; null is absent.
fn token_text(v: &Json, path: &Path, field: &str) -> Result<Option<String>, LoadError> {
    match v {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(o) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(field_err(
                path,
                field,
                "is an object without a string \"content\"",
            )),
        },
        _ => Err(field_err(
            path,
            field,
            "must be a string, an object with \"content\", or null",
        )),
    }
}

fn field_err(path: &Path, field: &str, reason: &str) -> LoadError {
    LoadError::Field {
        path: path.to_owned(),
        field: field.into(),
        reason: reason.into(),
    }
}

pub(crate) fn load(dir: &Path) -> Result<Loaded, LoadError> {
    let tok_path = dir.join("tokenizer.json");
    let bytes = std::fs::read(&tok_path).map_err(|source| LoadError::Read {
        path: tok_path.clone(),
        source,
    })?;
    let mut inner =
        tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| LoadError::Tokenizer {
            path: tok_path.clone(),
            reason: e.to_string(),
        })?;
    inner
        .with_truncation(None)
        .map_err(|e| LoadError::Tokenizer {
            path: tok_path.clone(),
            reason: e.to_string(),
        })?;
    inner.with_padding(None);

    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = read_json_if_present(&cfg_path)?.unwrap_or(Json::Object(Default::default()));
    let Some(cfg) = cfg.as_object() else {
        return Err(field_err(&cfg_path, "", "the file must hold a JSON object"));
    };
    let map_path = dir.join("special_tokens_map.json");
    let map = read_json_if_present(&map_path)?;

    // `from_pretrained` reads special_tokens_map.json after the config: its values win.
    let from_map = |name: &str| {
        map.as_ref()
            .and_then(|m| m.get(name))
            .filter(|v| !v.is_null())
    };
    let mut special = BTreeMap::new();
    for name in SPECIAL_NAMES {
        let text = match from_map(name) {
            Some(v) => token_text(v, &map_path, name)?,
            None => match cfg.get(name) {
                Some(v) => token_text(v, &cfg_path, name)?,
                None => None,
            },
        };
        if let Some(t) = text.filter(|t| !t.is_empty()) {
            special.insert(name, t);
        }
    }
    let mut additional_special = Vec::new();
    let (additional, add_path) = match from_map("additional_special_tokens") {
        Some(v) => (Some(v), &map_path),
        None => (cfg.get("additional_special_tokens"), &cfg_path),
    };
    match additional {
        None | Some(Json::Null) => {}
        Some(Json::Array(items)) => {
            for item in items {
                if let Some(t) = token_text(item, add_path, "additional_special_tokens")? {
                    additional_special.push(t);
                }
            }
        }
        Some(_) => {
            return Err(field_err(
                add_path,
                "additional_special_tokens",
                "must be a list",
            ));
        }
    }

    apply_llama_post_processor(&mut inner, cfg, &special, &cfg_path)?;

    let jinja_path = dir.join("chat_template.jinja");
    let sources: Vec<(String, String)> = if jinja_path.exists() {
        vec![("default".into(), read(&jinja_path)?)]
    } else {
        match cfg.get("chat_template") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::String(s)) => vec![("default".into(), s.clone())],
            Some(Json::Array(items)) => {
                let mut v = Vec::with_capacity(items.len());
                for item in items {
                    match (
                        item.get("name").and_then(Json::as_str),
                        item.get("template").and_then(Json::as_str),
                    ) {
                        (Some(n), Some(t)) => v.push((n.to_string(), t.to_string())),
                        _ => {
                            return Err(field_err(
                                &cfg_path,
                                "chat_template",
                                "list items must be {\"name\": string, \"template\": string}",
                            ))
                        }
                    }
                }
                v
            }
            Some(_) => {
                return Err(field_err(
                    &cfg_path,
                    "chat_template",
                    "must be a string or a list",
                ))
            }
        }
    };
    let template_path = if jinja_path.exists() {
        jinja_path
    } else {
        cfg_path.clone()
    };
    let templates = if sources.is_empty() {
        None
    } else {
        Some(
            ChatTemplates::compile(sources).map_err(|(name, reason)| LoadError::Template {
                path: template_path,
                name,
                reason,
            })?,
        )
    };

    let gen_path = dir.join("generation_config.json");
    let mut generation_eos = Vec::new();
    if let Some(gen) = read_json_if_present(&gen_path)? {
        let ids = match gen.get("eos_token_id") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(a)) => a.clone(),
            Some(one) => vec![one.clone()],
        };
        for id in ids {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| field_err(&gen_path, "eos_token_id", "must be token ids"))?;
            generation_eos.push(id);
        }
    }
    Ok(Loaded {
        inner,
        templates,
        special,
        additional_special,
        generation_eos,
    })
}

/// `LlamaTokenizerFast` / `GemmaTokenizerFast` (and `CodeLlama`) rebuild the post-processor at
/// load from `add_bos_token` (default true) and `add_eos_token` (default false); other
/// classes use `tokenizer.json`'s post-processor as is.
fn apply_llama_post_processor(
    inner: &mut tokenizers::Tokenizer,
    cfg: &serde_json::Map<String, Json>,
    special: &BTreeMap<&'static str, String>,
    cfg_path: &Path,
) -> Result<(), LoadError> {
    let class = cfg
        .get("tokenizer_class")
        .and_then(Json::as_str)
        .unwrap_or("");
    let class = class.strip_suffix("Fast").unwrap_or(class);
    if !matches!(
        class,
        "LlamaTokenizer" | "GemmaTokenizer" | "CodeLlamaTokenizer"
    ) {
        return Ok(());
    }
    let flag = |name: &str, default: bool| cfg.get(name).and_then(Json::as_bool).unwrap_or(default);
    let (add_bos, add_eos) = (flag("add_bos_token", true), flag("add_eos_token", false));
    let mut tokens = Vec::new();
    let mut part = |name: &'static str, on: bool, seq: u32| -> Result<String, LoadError> {
        if !on {
            return Ok(String::new());
        }
        let Some(text) = special.get(name) else {
            return Err(field_err(
                cfg_path,
                &format!("add_{name}"),
                "is true but the token is not set",
            ));
        };
        let Some(id) = inner.token_to_id(text) else {
            return Err(field_err(cfg_path, name, "is not in the vocabulary"));
        };
        if !tokens.iter().any(|(t, _)| t == text) {
            tokens.push((text.clone(), id));
        }
        Ok(format!("{text}:{seq}"))
    };
    let (bos0, eos0, bos1, eos1) = (
        part("bos_token", add_bos, 0)?,
        part("eos_token", add_eos, 0)?,
        part("bos_token", add_bos, 1)?,
        part("eos_token", add_eos, 1)?,
    );
    let join = |xs: &[&str]| {
        xs.iter()
            .filter(|x| !x.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let single = join(&[&bos0, "$A:0", &eos0]);
    let pair = join(&[&single, &bos1, "$B:1", &eos1]);
    let processor = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single(single.as_str())
        .and_then(|b| b.try_pair(pair.as_str()))
        .map_err(|e| field_err(cfg_path, "tokenizer_class", &format!("post-processor: {e}")))?
        .special_tokens(tokens)
        .build()
        .map_err(|e| field_err(cfg_path, "tokenizer_class", &format!("post-processor: {e}")))?;
    inner.with_post_processor(Some(processor));
    Ok(())
}
