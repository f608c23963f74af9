//! Loading a model's files: every bad file is one clear `LoadError` naming the file and the
//! field; a template that fails for a request is a `TemplateError` naming the problem; the
//! optional files (chat_template.jinja, special_tokens_map.json, generation_config.json) are
//! honoured. Runs on the tiny tokenizer the test writes (no download, no Python).

mod corpus;

use std::path::{Path, PathBuf};

use hf_tokenize::{ChatRequest, LoadError, MessageError, TemplateError, Tokenizer};
use serde_json::{json, Value as Json};

/// A fresh model directory with the tiny tokenizer and `config` as tokenizer_config.json.
fn model_dir(test: &str, config: &Json) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hf-tokenize-files-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    write(
        &dir,
        "tokenizer.json",
        &corpus::tiny_tokenizer().to_string(),
    );
    write(&dir, "tokenizer_config.json", &config.to_string());
    dir
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

fn config_with(key: &str, value: Json) -> Json {
    let mut c = corpus::tiny_config();
    c[key] = value;
    c
}

fn load_err(dir: &Path) -> LoadError {
    match Tokenizer::from_dir(dir) {
        Ok(_) => panic!("{} must not load", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_and_malformed_files_are_one_clear_error() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(matches!(e, LoadError::Read { .. }), "{e:?}");
    assert!(
        e.to_string().contains("/nonexistent/model/tokenizer.json"),
        "{e}"
    );

    let dir = model_dir("badtok", &corpus::tiny_config());
    write(&dir, "tokenizer.json", "{\"model\": 1}");
    let e = load_err(&dir);
    assert!(matches!(e, LoadError::Tokenizer { .. }), "{e:?}");

    let dir = model_dir("badcfg", &corpus::tiny_config());
    write(&dir, "tokenizer_config.json", "{ not json");
    let e = load_err(&dir);
    assert!(
        matches!(e, LoadError::Json { ref path, .. } if path.ends_with("tokenizer_config.json")),
        "{e:?}"
    );
}

#[test]
fn bad_fields_name_the_field() {
    let cases = [
        ("chat_template", json!(42), "chat_template"),
        (
            "chat_template",
            json!([{"name": "default"}]),
            "chat_template",
        ),
        ("bos_token", json!(7), "bos_token"),
        ("bos_token", json!({"lstrip": false}), "bos_token"),
        (
            "additional_special_tokens",
            json!("x"),
            "additional_special_tokens",
        ),
    ];
    for (key, value, field) in cases {
        let e = load_err(&model_dir(
            &format!("field-{field}"),
            &config_with(key, value.clone()),
        ));
        match &e {
            LoadError::Field { field: f, .. } => assert_eq!(f, field, "{key}={value}: {e}"),
            other => panic!("{key}={value}: expected a Field error, got {other:?}"),
        }
    }
    // A Llama-class tokenizer asked to add a BOS it does not have.
    let mut c = corpus::tiny_config();
    c.as_object_mut().expect("object").remove("bos_token");
    let e = load_err(&model_dir("nobos", &c));
    assert!(e.to_string().contains("add_bos_token"), "{e}");
}

#[test]
fn a_template_that_does_not_compile_is_named() {
    let c = config_with(
        "chat_template",
        json!([{"name": "default", "template": "ok"}, {"name": "tool_use", "template": "{% for %}"}]),
    );
    match load_err(&model_dir("syntax", &c)) {
        LoadError::Template { name, reason, .. } => {
            assert_eq!(name, "tool_use");
            assert!(reason.contains("syntax error"), "{reason}");
        }
        other => panic!("expected Template, got {other:?}"),
    }
}

#[test]
fn llama_class_post_processor_adds_bos_and_eos_as_configured() {
    let tok = Tokenizer::from_dir(model_dir("llama", &corpus::tiny_config())).expect("load");
    assert_eq!(
        tok.encode_prompt("hello world", true).expect("encode"),
        [0, 3, 4, 1]
    );
    assert_eq!(
        tok.encode_prompt("hello world", false).expect("encode"),
        [3, 4]
    );
    let tok = Tokenizer::from_dir(model_dir(
        "llama-noeos",
        &config_with("add_eos_token", json!(false)),
    ))
    .expect("load");
    assert_eq!(tok.encode_prompt("hello", true).expect("encode"), [0, 3]);
    // Another class keeps tokenizer.json's post-processor (none here).
    let tok = Tokenizer::from_dir(model_dir(
        "other",
        &config_with("tokenizer_class", json!("PreTrainedTokenizerFast")),
    ))
    .expect("load");
    assert_eq!(tok.encode_prompt("hello", true).expect("encode"), [3]);
}

#[test]
fn chat_encoding_does_not_add_special_tokens_twice() {
    let tok = Tokenizer::from_dir(model_dir("chat", &corpus::tiny_config())).expect("load");
    let msgs = [json!({"role": "user", "content": "hello"})];
    assert_eq!(
        tok.apply_chat_template(&msgs, true, None).expect("render"),
        "<s>user : hello assistant :"
    );
    // One BOS (the template's), no EOS: rendered text tokenized without special tokens.
    assert_eq!(
        tok.encode_chat(&msgs, true, None).expect("encode"),
        [0, 5, 8, 3, 6, 8]
    );
    let tools = [json!({"type": "function", "function": {"name": "search"}})];
    assert_eq!(
        tok.apply_chat_template(&msgs, false, Some(&tools))
            .expect("render"),
        "<s>search user : hello "
    );
}

#[test]
fn request_problems_are_template_errors() {
    let c = config_with("chat_template", json!("{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}{{ messages[0].content.upper() }}"));
    let tok = Tokenizer::from_dir(model_dir("raise", &c)).expect("load");
    match tok.encode_chat(&[json!({"role": "system", "content": "x"})], true, None) {
        Err(TemplateError::Raised(m)) => assert_eq!(m, "Conversation roles must alternate"),
        other => panic!("expected Raised, got {other:?}"),
    }
    assert!(matches!(
        tok.encode_chat(&[], true, None),
        Err(TemplateError::Empty)
    ));
    let image =
        [json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]})];
    assert!(matches!(
        tok.encode_chat(&image, true, None),
        Err(TemplateError::Message(MessageError::NotText {
            index: 0,
            part: 0
        }))
    ));
    let c = config_with("chat_template", json!("{{ messages[0].content.nosuch() }}"));
    let tok = Tokenizer::from_dir(model_dir("unknown-method", &c)).expect("load");
    let e = tok
        .encode_chat(&[json!({"role": "user", "content": "x"})], true, None)
        .expect_err("must fail");
    assert!(
        matches!(e, TemplateError::Render(_)) && e.to_string().contains("nosuch"),
        "{e}"
    );

    let mut c = corpus::tiny_config();
    c.as_object_mut().expect("object").remove("chat_template");
    let tok = Tokenizer::from_dir(model_dir("notemplate", &c)).expect("load");
    assert!(!tok.has_chat_template());
    assert!(matches!(
        tok.encode_chat(&[json!({"role": "user"})], true, None),
        Err(TemplateError::NoTemplate)
    ));
}

#[test]
fn optional_files_are_honoured() {
    let mut c = corpus::tiny_config();
    c.as_object_mut().expect("object").remove("eos_token");
    c["add_eos_token"] = json!(false);
    let dir = model_dir("optional", &c);
    write(
        &dir,
        "chat_template.jinja",
        "{{ eos_token }}|{{ strftime_now('%Y-%m-%d %H:%M') }}|{{ greeting }}\n",
    );
    write(
        &dir,
        "special_tokens_map.json",
        r#"{"eos_token": {"content": "</s>"}, "unk_token": "hello"}"#,
    );
    write(
        &dir,
        "generation_config.json",
        r#"{"eos_token_id": [4, 1]}"#,
    );
    let tok = Tokenizer::from_dir(&dir).expect("load");
    assert_eq!(
        tok.special_token("eos_token"),
        Some("</s>"),
        "filled from special_tokens_map.json"
    );
    assert_eq!(
        tok.special_token("bos_token"),
        Some("<s>"),
        "kept from tokenizer_config.json"
    );
    assert_eq!(
        tok.special_token("unk_token"),
        Some("hello"),
        "special_tokens_map.json wins"
    );
    assert_eq!(tok.eos_token_ids(), [1, 4]);
    let msgs = [json!({"role": "user", "content": "hello"})];
    let kwargs = json!({"greeting": "hi"});
    let mut req = ChatRequest::new(&msgs, true, None);
    req.now_unix = 1_722_000_000; // 2024-07-26 13:20 UTC
    req.template_kwargs = kwargs.as_object();
    assert_eq!(
        tok.render_chat(&req).expect("render"),
        "</s>|2024-07-26 13:20|hi"
    );

    write(&dir, "generation_config.json", r#"{"eos_token_id": "x"}"#);
    assert!(
        matches!(load_err(&dir), LoadError::Field { ref field, .. } if field == "eos_token_id")
    );
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
}
