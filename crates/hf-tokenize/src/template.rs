//! Chat templates rendered as Hugging Face `transformers` renders them (what vLLM calls through
//! `apply_chat_template(..., tokenize=False)`), on minijinja with Python compatibility.
//!
//! From `transformers/utils/chat_template_utils.py` (`_compile_jinja_template`,
//! `render_jinja_template`) and `tokenization_utils_base.py` (`apply_chat_template`,
//! `get_chat_template`, `special_tokens_map`): a sandboxed Jinja2 environment with
//! `trim_blocks` and `lstrip_blocks`, loop controls, a `tojson` filter that is Python's
//! `json.dumps` (no HTML escaping, `ensure_ascii=False`), the globals `raise_exception(msg)`
//! and `strftime_now(fmt)`, and the variables `messages`, `tools`, `documents`,
//! `add_generation_prompt` plus the tokenizer's named special tokens (`bos_token`, ...).
//! Printed values are Python's `str()` (`None`, `True`, `['a']`), not minijinja's.
//!
//! `strftime_now` reads the render's `now` (an input, not the wall clock) in UTC; Python's
//! `datetime.now()` is the server's local time, UTC in the usual container.

use std::collections::BTreeMap;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use serde_json::Value as Json;

use crate::messages::{detect_content_format, to_value, ContentFormat, MessageError};
use crate::pyfmt::{json_dumps, py_str, strftime, Civil, JsonOptions};

/// The context variable carrying the render's time for `strftime_now` (not a Jinja name a
/// template would use).
const NOW_VAR: &str = "__hf_tokenize_now_unix";

/// Why a chat could not be rendered or tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model's files define no chat template")]
    NoTemplate,
    #[error("the model has several chat templates ({names}) and none named \"default\"")]
    NoDefault { names: String },
    #[error("no messages to render")]
    Empty,
    #[error(transparent)]
    Message(#[from] MessageError),
    /// The template called `raise_exception(message)`.
    #[error("chat template refused the request: {0}")]
    Raised(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
    #[error("tokenizing the rendered chat failed: {0}")]
    Encode(String),
}

/// The chat templates of a model, compiled once.
pub(crate) struct ChatTemplates {
    env: Environment<'static>,
    /// Template names with their content formats, in the order of the files.
    names: Vec<(String, ContentFormat)>,
}

/// Marks an error raised by the template itself through `raise_exception`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

impl ChatTemplates {
    /// Compiles `(name, source)` pairs; a syntax error names the template and the problem.
    pub(crate) fn compile(
        sources: Vec<(String, String)>,
    ) -> Result<ChatTemplates, (String, String)> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| (String::new(), e.to_string()))?;
        env.set_syntax(syntax);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_formatter(|out, _state, value| {
            let mut s = String::new();
            py_str(value, &mut s);
            out.write_str(&s)
                .map_err(|_| Error::new(ErrorKind::WriteFailure, "write failed"))
        });
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: Option<Value>| -> Result<Value, Error> {
                let msg = msg.map(|m| m.to_string()).unwrap_or_default();
                Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
            },
        );
        env.add_function(
            "strftime_now",
            |state: &State, fmt: String| -> Result<Value, Error> {
                let now = state.lookup(NOW_VAR).and_then(|v| v.as_i64()).unwrap_or(0);
                Ok(Value::from(strftime(&Civil::from_unix(now), &fmt)))
            },
        );
        let mut names = Vec::with_capacity(sources.len());
        for (name, source) in sources {
            let format = detect_content_format(&source);
            env.add_template_owned(name.clone(), without_generation_tags(&source))
                .map_err(|e| (name.clone(), describe(&e)))?;
            names.push((name, format));
        }
        Ok(ChatTemplates { env, names })
    }

    /// `get_chat_template`: the only template; with several, "tool_use" when tools are given
    /// and there is one, else "default".
    fn choose(&self, with_tools: bool) -> Result<&(String, ContentFormat), TemplateError> {
        if let [only] = self.names.as_slice() {
            return Ok(only);
        }
        let find = |n: &str| self.names.iter().find(|(name, _)| name == n);
        let tool_use = if with_tools { find("tool_use") } else { None };
        tool_use
            .or_else(|| find("default"))
            .ok_or_else(|| TemplateError::NoDefault {
                names: self
                    .names
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The content format of the template that a request with or without tools renders with.
    pub(crate) fn content_format(&self, with_tools: bool) -> Result<ContentFormat, TemplateError> {
        self.choose(with_tools).map(|(_, f)| *f)
    }

    /// Renders already-normalized messages.
    pub(crate) fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        now_unix: i64,
        special: &BTreeMap<&'static str, Value>,
        extra: Option<&serde_json::Map<String, Json>>,
    ) -> Result<String, TemplateError> {
        let (name, _) = self.choose(tools.is_some())?;
        let template = self
            .env
            .get_template(name)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        let mut ctx: Vec<(Value, Value)> = Vec::with_capacity(special.len() + 8);
        for (k, v) in special {
            ctx.push((Value::from(*k), v.clone()));
        }
        // Caller's template kwargs override special tokens, as in `{**special_tokens_map, **kwargs}`.
        for (k, v) in extra.into_iter().flatten() {
            ctx.push((Value::from(k.as_str()), to_value(v)));
        }
        let tools_value = tools.map_or(Value::from(()), |t| {
            Value::from(t.iter().map(to_value).collect::<Vec<_>>())
        });
        ctx.push((
            Value::from("messages"),
            Value::from(messages.iter().map(to_value).collect::<Vec<_>>()),
        ));
        ctx.push((Value::from("tools"), tools_value));
        ctx.push((Value::from("documents"), Value::from(())));
        ctx.push((
            Value::from("add_generation_prompt"),
            Value::from(add_generation_prompt),
        ));
        ctx.push((Value::from(NOW_VAR), Value::from(now_unix)));
        template
            .render(Value::from_pairs(ctx))
            .map_err(|e| match raised(&e) {
                Some(msg) => TemplateError::Raised(msg),
                None => TemplateError::Render(describe(&e)),
            })
    }
}

/// `{% generation %}...{% endgeneration %}` (transformers' `AssistantTracker` extension, which
/// renders its body unchanged) as `{% if true %}...{% endif %}`, keeping whitespace control.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start + 2..].find("%}").map(|e| e + 2) else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = &tag[2..tag.len() - 2];
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+']);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        out.push_str(&rest[..start]);
        match replacement {
            Some(r) => {
                let open = &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()];
                let close = &inner[inner.trim_end_matches(['-', '+']).len()..];
                out.push_str(&format!("{{%{open} {r} {close}%}}"));
            }
            None => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

fn raised(e: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        source = s.source();
    }
    None
}

/// One line naming the problem and where: "undefined value (in default line 3)".
fn describe(e: &Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(detail) = e.detail() {
        s.push_str(": ");
        s.push_str(detail);
    }
    if let (Some(name), Some(line)) = (e.name(), e.line()) {
        s.push_str(&format!(" (template {name:?}, line {line})"));
    }
    s
}

/// Hugging Face's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let mut opts = JsonOptions::default();
    if let Some(v) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        opts.ensure_ascii = v;
    }
    if let Some(v) = kwargs.get::<Option<Value>>("indent")? {
        opts.indent = match v.kind() {
            ValueKind::None | ValueKind::Undefined => None,
            ValueKind::Number => Some(" ".repeat(v.as_usize().unwrap_or(0))),
            _ => Some(v.as_str().unwrap_or_default().to_string()),
        };
    }
    if let Some(v) = kwargs.get::<Option<Value>>("separators")? {
        if !v.is_none() {
            let seps: Vec<Value> = v.try_iter()?.collect();
            match seps.as_slice() {
                [item, key] => {
                    opts.item_sep = item.as_str().unwrap_or_default().to_string();
                    opts.key_sep = key.as_str().unwrap_or_default().to_string();
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "separators must be (item, key)",
                    ))
                }
            }
        }
    }
    if let Some(v) = kwargs.get::<Option<bool>>("sort_keys")? {
        opts.sort_keys = v;
    }
    kwargs.assert_all_used()?;
    json_dumps(value, &opts)
        .map(Value::from)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(src: &str) -> ChatTemplates {
        ChatTemplates::compile(vec![("default".into(), src.into())]).expect("compile")
    }

    fn render(
        t: &ChatTemplates,
        messages: Json,
        tools: Option<Json>,
    ) -> Result<String, TemplateError> {
        let msgs = messages.as_array().cloned().unwrap_or_default();
        let tools = tools.map(|t| t.as_array().cloned().unwrap_or_default());
        let mut special = BTreeMap::new();
        special.insert("bos_token", Value::from("<s>"));
        t.render(&msgs, tools.as_deref(), true, 1_722_000_000, &special, None)
    }

    #[test]
    fn python_text_forms_and_helpers() {
        let t = one(concat!(
            "{{ bos_token }}{{ none }}|{{ true }}|{{ [1, 'a'] }}|{{ {'k': none} }}|{{ 1.0 }}\n",
            "{% for m in messages %}{{ m.content.strip() | upper }}{% if m.x is defined %}!{% endif %}{% endfor %}\n",
            "{{ tools | tojson }}|{{ {'a': 1} | tojson(indent=2) }}|{{ strftime_now('%d %b %Y') }}",
        ));
        let out = render(
            &t,
            json!([{"role": "user", "content": "  hi é  "}]),
            Some(json!([{"b": 1, "a": "<é>"}])),
        )
        .expect("render");
        // As Jinja2 under transformers prints it (trim_blocks eats the newline after endfor).
        assert_eq!(out, "<s>None|True|[1, 'a']|{'k': None}|1.0\nHI É[{\"b\": 1, \"a\": \"<é>\"}]|{\n  \"a\": 1\n}|26 Jul 2024");
    }

    #[test]
    fn generation_tags_render_their_body() {
        assert_eq!(
            without_generation_tags("a {%- generation -%} b {% endgeneration %}{% if x %}"),
            "a {%- if true -%} b {% endif %}{% if x %}"
        );
        for odd in ["{%}", "{%", "{%}%}", "x{%-%}y{%generation%}"] {
            let want = odd.replace("{%generation%}", "{% if true %}");
            assert_eq!(without_generation_tags(odd), want, "{odd:?}");
        }
        let t = one(
            "{% for m in messages %}{% generation %}{{ m.role }}{% endgeneration %}\n{% endfor %}",
        );
        assert_eq!(
            render(&t, json!([{"role": "a"}]), None).expect("render"),
            "a",
            "as Jinja2 renders it (trim_blocks)"
        );
    }

    proptest::proptest! {
        /// Any text (tag fragments included) is scanned without panicking, and text without a
        /// generation tag comes back unchanged.
        #[test]
        fn tag_scanning_never_panics(src in "[{}%+\\- a-z\u{e9}\u{4e2d}]{0,40}") {
            let out = without_generation_tags(&src);
            if !src.contains("generation") {
                proptest::prop_assert_eq!(out, src.clone());
            }
            let _ = crate::messages::detect_content_format(&src);
        }
    }

    #[test]
    fn trim_and_lstrip_blocks() {
        let t = one("{% for m in messages %}\n    {% if true %}\n{{ m.role }}\n    {% endif %}\n{% endfor %}\n");
        assert_eq!(
            render(&t, json!([{"role": "a"}, {"role": "b"}]), None).expect("render"),
            "a\nb\n"
        );
    }

    #[test]
    fn raise_exception_is_named() {
        let t = one("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok");
        match render(&t, json!([{"role": "system"}]), None) {
            Err(TemplateError::Raised(m)) => assert_eq!(m, "first must be user"),
            other => panic!("expected Raised, got {other:?}"),
        }
        assert_eq!(
            render(&t, json!([{"role": "user"}]), None).expect("render"),
            "ok"
        );
    }

    #[test]
    fn render_errors_name_the_problem() {
        let t = one("{{ messages[0].content.nosuchmethod() }}");
        match render(&t, json!([{"role": "user", "content": "x"}]), None) {
            Err(TemplateError::Render(m)) => assert!(m.contains("nosuchmethod"), "{m}"),
            other => panic!("expected Render, got {other:?}"),
        }
        let Err((name, detail)) =
            ChatTemplates::compile(vec![("tool_use".into(), "{% if %}".into())])
        else {
            panic!("a syntax error must not compile");
        };
        assert_eq!(name, "tool_use");
        assert!(detail.contains("syntax error"), "{detail}");
    }

    #[test]
    fn named_templates_choose_like_transformers() {
        let t = ChatTemplates::compile(vec![
            ("default".into(), "D".into()),
            ("tool_use".into(), "T".into()),
        ])
        .expect("compile");
        assert_eq!(
            render(&t, json!([{"role": "user"}]), None).expect("render"),
            "D"
        );
        assert_eq!(
            render(&t, json!([{"role": "user"}]), Some(json!([]))).expect("render"),
            "T"
        );
        let t = ChatTemplates::compile(vec![("a".into(), "A".into()), ("b".into(), "B".into())])
            .expect("compile");
        assert!(matches!(
            render(&t, json!([]), None),
            Err(TemplateError::NoDefault { .. })
        ));
    }
}
