//! What vLLM does to an OpenAI chat request's messages before the template sees them, and the
//! conversion of JSON into template values (keys keep their order, as in Python dicts).
//!
//! From vLLM's `vllm/entrypoints/chat_utils.py`:
//! - `_parse_chat_message_content`: `content` that is a list of parts becomes, for a template
//!   of the "string" content format, the text parts joined with `"\n"`; for the "openai"
//!   format, a list of `{"type": "text", "text": ...}`. A plain string stays a string.
//!   A missing or null content is no parts (`""` or `[]`); each message is rebuilt with only
//!   the fields vLLM keeps (see [`normalize`]).
//! - `_postprocess_messages`: an assistant message's `tool_calls[].function.arguments` given
//!   as a JSON string is parsed into an object (an empty or missing one becomes `{}`); an empty
//!   `tool_calls` list is removed.
//! - `_resolve_chat_template_content_format` / `_detect_content_format`: "openai" when the
//!   template loops over a message's `content`, else "string".

use minijinja::value::Value;
use serde_json::Value as Json;

/// How a template expects `content`: vLLM's `ChatTemplateContentFormat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// `content` is one string (text parts joined with `"\n"`).
    String,
    /// `content` is a list of `{"type": "text", "text": ...}` parts.
    OpenAi,
}

/// Why a message cannot be given to the template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message {index} is not a JSON object")]
    NotAnObject { index: usize },
    #[error("message {index} has no string \"role\"")]
    NoRole { index: usize },
    #[error(
        "message {index}: content part {part} is not a text part (only text is tokenized here)"
    )]
    NotText { index: usize, part: usize },
    #[error("message {index}: content must be a string, a list of parts or null")]
    BadContent { index: usize },
    #[error("message {index}: tool call {call} has arguments that are not valid JSON: {reason}")]
    BadArguments {
        index: usize,
        call: usize,
        reason: String,
    },
}

/// Guess vLLM's content format from the template source: "openai" when a `for` loop iterates
/// over something named `content` (vLLM inspects the Jinja AST for `for x in m['content']`;
/// this looks at the text of each `{% for ... in ... %}` tag).
pub fn detect_content_format(template: &str) -> ContentFormat {
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        let tag_end = rest[start + 2..]
            .find("%}")
            .map_or(rest.len(), |e| start + 2 + e);
        let tag = rest[start + 2..tag_end]
            .trim_start_matches(['-', '+'])
            .trim();
        if let Some(head) = tag.strip_prefix("for ") {
            if let Some((_, iterable)) = head.split_once(" in ") {
                let iterable = iterable.split(['|', ' ']).next().unwrap_or("");
                if iterable.ends_with("content")
                    || iterable.ends_with("content']")
                    || iterable.ends_with("content\"]")
                {
                    return ContentFormat::OpenAi;
                }
            }
        }
        rest = &rest[tag_end.min(rest.len())..];
        if rest.len() < 2 {
            break;
        }
        rest = &rest[2..];
    }
    ContentFormat::String
}

/// The messages as vLLM hands them to `apply_chat_template`: each rebuilt as a
/// `ConversationMessage` with, in order, `role`, `content` (always present: a missing or null
/// content is no parts), then `tool_calls`, `reasoning` and `reasoning_content` (assistant),
/// `tool_call_id` (tool), `name` (if a string), `tools` (developer). Other fields are dropped.
pub fn normalize(messages: &[Json], format: ContentFormat) -> Result<Vec<Json>, MessageError> {
    let mut out = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let Some(obj) = message.as_object() else {
            return Err(MessageError::NotAnObject { index });
        };
        let Some(role) = obj.get("role").and_then(Json::as_str) else {
            return Err(MessageError::NoRole { index });
        };
        let texts: Vec<&str> = match obj.get("content") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::String(s)) => vec![s.as_str()],
            Some(Json::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (part, p) in parts.iter().enumerate() {
                    texts.push(match p {
                        Json::String(s) => s.as_str(),
                        Json::Object(o) => {
                            match (o.get("type").and_then(Json::as_str), o.get("text")) {
                                (Some("text"), Some(Json::String(t))) => t.as_str(),
                                _ => return Err(MessageError::NotText { index, part }),
                            }
                        }
                        _ => return Err(MessageError::NotText { index, part }),
                    });
                }
                texts
            }
            Some(_) => return Err(MessageError::BadContent { index }),
        };
        let content = match format {
            ContentFormat::String => Json::String(texts.join("\n")),
            ContentFormat::OpenAi => Json::Array(
                texts
                    .iter()
                    .map(|t| serde_json::json!({"type": "text", "text": t}))
                    .collect(),
            ),
        };
        let mut msg = serde_json::Map::new();
        msg.insert("role".into(), Json::String(role.into()));
        msg.insert("content".into(), content);
        match role {
            "assistant" => {
                if let Some(calls) = obj.get("tool_calls").filter(|c| !c.is_null()) {
                    msg.insert("tool_calls".into(), calls.clone());
                }
                if let Some(reasoning) = obj.get("reasoning").filter(|r| !r.is_null()) {
                    msg.insert("reasoning".into(), reasoning.clone());
                    msg.insert("reasoning_content".into(), reasoning.clone());
                }
                fix_tool_calls(&mut msg, index)?;
            }
            "tool" => {
                if let Some(id) = obj.get("tool_call_id") {
                    msg.insert("tool_call_id".into(), id.clone());
                }
            }
            _ => {}
        }
        if let Some(name) = obj.get("name").filter(|n| n.is_string()) {
            msg.insert("name".into(), name.clone());
        }
        if role == "developer" {
            msg.insert(
                "tools".into(),
                obj.get("tools").cloned().unwrap_or(Json::Null),
            );
        }
        out.push(Json::Object(msg));
    }
    Ok(out)
}

fn fix_tool_calls(
    msg: &mut serde_json::Map<String, Json>,
    index: usize,
) -> Result<(), MessageError> {
    let Some(Json::Array(calls)) = msg.get_mut("tool_calls") else {
        return Ok(());
    };
    if calls.is_empty() {
        msg.remove("tool_calls");
        return Ok(());
    }
    for (call, item) in calls.iter_mut().enumerate() {
        let Some(function) = item.get_mut("function").and_then(Json::as_object_mut) else {
            continue;
        };
        let parsed = match function.get("arguments") {
            Some(Json::Object(_)) | Some(Json::Array(_)) => continue,
            Some(Json::String(s)) if !s.is_empty() => {
                serde_json::from_str::<Json>(s).map_err(|e| MessageError::BadArguments {
                    index,
                    call,
                    reason: e.to_string(),
                })?
            }
            // None, "", false, 0: Python's falsy `arguments` become {}.
            Some(Json::String(_)) | Some(Json::Null) | None | Some(Json::Bool(false)) => {
                Json::Object(Default::default())
            }
            Some(other) if other.as_f64() == Some(0.0) => Json::Object(Default::default()),
            Some(other) => {
                return Err(MessageError::BadArguments {
                    index,
                    call,
                    reason: format!("expected a JSON string or object, got {other}"),
                })
            }
        };
        function.insert("arguments".into(), parsed);
    }
    Ok(())
}

/// JSON as a template value; object keys keep their order (serde_json's `preserve_order`).
pub(crate) fn to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => Value::from(items.iter().map(to_value).collect::<Vec<_>>()),
        Json::Object(map) => Value::from_pairs(
            map.iter()
                .map(|(k, v)| (Value::from(k.as_str()), to_value(v))),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_parts_join_with_newline_for_string_templates() {
        let msgs = [
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
        ];
        let got = normalize(&msgs, ContentFormat::String).expect("normalize");
        assert_eq!(got, vec![json!({"role": "user", "content": "a\nb"})]);
        let plain = [json!({"role": "user", "content": "a", "extra": 1, "name": "n"})];
        let got = normalize(&plain, ContentFormat::OpenAi).expect("normalize");
        assert_eq!(
            got,
            vec![json!({"role": "user", "content": [{"type": "text", "text": "a"}], "name": "n"})]
        );
        let got = normalize(&msgs, ContentFormat::OpenAi).expect("normalize");
        assert_eq!(got[0]["content"][1], json!({"type": "text", "text": "b"}));
    }

    #[test]
    fn image_parts_are_refused() {
        let msgs = [
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
        ];
        assert_eq!(
            normalize(&msgs, ContentFormat::String),
            Err(MessageError::NotText { index: 0, part: 0 })
        );
    }

    #[test]
    fn tool_call_arguments_become_objects() {
        let msgs = [json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"b\": 1, \"a\": 2}"}},
            {"id": "2", "type": "function", "function": {"name": "g", "arguments": ""}}]})];
        let got = normalize(&msgs, ContentFormat::String).expect("normalize");
        let args = &got[0]["tool_calls"][0]["function"]["arguments"];
        assert_eq!(args, &json!({"b": 1, "a": 2}));
        let keys: Vec<&String> = args.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["b", "a"], "key order kept");
        assert_eq!(got[0]["tool_calls"][1]["function"]["arguments"], json!({}));
        assert_eq!(got[0]["content"], json!(""), "null content is no parts");
        let bad = [
            json!({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}),
        ];
        assert!(matches!(
            normalize(&bad, ContentFormat::String),
            Err(MessageError::BadArguments { .. })
        ));
    }

    #[test]
    fn bad_messages_are_named() {
        assert_eq!(
            normalize(&[json!("hi")], ContentFormat::String),
            Err(MessageError::NotAnObject { index: 0 })
        );
        assert_eq!(
            normalize(&[json!({"content": "x"})], ContentFormat::String),
            Err(MessageError::NoRole { index: 0 })
        );
        assert_eq!(
            normalize(
                &[json!({"role": "user", "content": 3})],
                ContentFormat::String
            ),
            Err(MessageError::BadContent { index: 0 })
        );
    }

    #[test]
    fn content_format_detection() {
        assert_eq!(
            detect_content_format("{% for m in messages %}{{ m.content }}{% endfor %}"),
            ContentFormat::String
        );
        assert_eq!(
            detect_content_format("{%- for m in messages %}{%- for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}"),
            ContentFormat::OpenAi
        );
        for odd in ["{%}", "{%", "{%-%}x{%", "{% for %}", "{%}%}"] {
            assert_eq!(detect_content_format(odd), ContentFormat::String, "{odd:?}");
        }
        assert_eq!(
            detect_content_format("{% for c in message.content %}{% endfor %}"),
            ContentFormat::OpenAi
        );
    }
}
