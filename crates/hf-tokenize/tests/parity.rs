//! Token ids identical to Hugging Face `transformers` (the library vLLM tokenizes with), case
//! by case, on a generated corpus: two real tokenizers (Qwen3 and Llama 3.1, fetched by
//! `scripts/setup` into `.cache/tokenizers/`) and a tiny Llama-class tokenizer written here
//! (named chat templates, `AddedToken` special tokens, `add_bos_token`/`add_eos_token`).
//! One Python run (`tests/parity.py`, `.venv`) computes the reference ids for every case.

mod corpus;

use std::path::{Path, PathBuf};
use std::process::Command;

use hf_tokenize::{ChatRequest, Tokenizer};
use serde_json::{json, Value as Json};

use corpus::{chats, fixed_prompts, long_prompt, random_prompts, ChatCase, Rng};

use test_support::repo_root;

/// A tokenizer's directory, or `None` (with the reason printed) when `scripts/setup` has not
/// fetched it; under CI a missing tokenizer is a failure, not a skip.
fn real_tokenizer_dir(name: &str) -> Option<PathBuf> {
    let dir = repo_root().join(".cache/tokenizers").join(name);
    if dir.join("tokenizer.json").is_file() && dir.join("tokenizer_config.json").is_file() {
        return Some(dir);
    }
    let msg = format!(
        "SKIPPED {name}: {} has no tokenizer files; run `bash scripts/setup`",
        dir.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{msg} (CI must run it)");
    eprintln!("{msg}");
    None
}

/// The tiny Llama-class tokenizer of [`corpus::tiny_tokenizer`], written to `dir`, with a
/// special_tokens_map.json whose EOS overrides the config's (the post-processor then appends
/// "world", as transformers reads that file last).
fn write_tiny(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("tokenizer.json"),
        corpus::tiny_tokenizer().to_string(),
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        corpus::tiny_config().to_string(),
    )?;
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"eos_token": "world", "pad_token": {"content": "</s>"}}"#,
    )
}

/// The tiny tokenizer with [`corpus::FEATURE_TEMPLATE`] as its one chat template.
fn write_features(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut config = corpus::tiny_config();
    config["chat_template"] = json!(corpus::FEATURE_TEMPLATE);
    std::fs::write(
        dir.join("tokenizer.json"),
        corpus::tiny_tokenizer().to_string(),
    )?;
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string())
}

struct Suite {
    name: String,
    dir: PathBuf,
    prompts: Vec<(String, bool)>,
    chats: Vec<ChatCase>,
}

fn suite(name: &str, dir: PathBuf, specials: &[&str], seed: u64, with_tools: bool) -> Suite {
    let mut rng = Rng::new(seed);
    let fixed = fixed_prompts(specials);
    let mut prompts: Vec<(String, bool)> = fixed.iter().map(|p| (p.clone(), true)).collect();
    prompts.extend(fixed.into_iter().map(|p| (p, false)));
    prompts.extend(
        random_prompts(&mut rng, 120, 60)
            .into_iter()
            .map(|p| (p, true)),
    );
    prompts.extend(
        random_prompts(&mut rng, 20, 400)
            .into_iter()
            .map(|p| (p, false)),
    );
    for tokens in [1_000, 8_000, 32_000] {
        prompts.push((long_prompt(&mut rng, tokens), true));
    }
    let chats = chats(&mut rng, with_tools, false);
    Suite {
        name: name.into(),
        dir,
        prompts,
        chats,
    }
}

fn tiny_suite(dir: PathBuf) -> Suite {
    let mut rng = Rng::new(7);
    let prompts = [
        "",
        "hello",
        "hello world",
        "world hello hello",
        "unknown words here",
        "<s> hello </s>",
    ]
    .iter()
    .flat_map(|p| [(p.to_string(), true), (p.to_string(), false)])
    .collect();
    Suite {
        name: "tiny_llama_class".into(),
        dir,
        prompts,
        chats: chats(&mut rng, true, true),
    }
}

fn feature_suite(dir: PathBuf) -> Suite {
    let mut rng = Rng::new(11);
    let mut chats = chats(&mut rng, true, false);
    let mut excited = chats.remove(0);
    excited.request = json!([{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "hi there!"}]);
    excited.messages = excited.request.clone();
    chats.push(excited);
    Suite {
        name: "jinja_features".into(),
        dir,
        prompts: Vec::new(),
        chats,
    }
}

use test_support::python;

fn reference(suites: &[Suite], work: &Path) -> Json {
    let mut toks = serde_json::Map::new();
    for s in suites {
        let prompts: Vec<Json> = s
            .prompts
            .iter()
            .map(|(t, add)| json!({"text": t, "add_special_tokens": add}))
            .collect();
        let chats: Vec<Json> = s
            .chats
            .iter()
            .map(|c| {
                json!({"messages": c.messages, "tools": c.tools, "add_generation_prompt": c.add_generation_prompt,
                       "kwargs": c.kwargs})
            })
            .collect();
        toks.insert(
            s.name.clone(),
            json!({"dir": s.dir, "prompts": prompts, "chats": chats}),
        );
    }
    let corpus_path = work.join("corpus.json");
    let out_path = work.join("reference.json");
    std::fs::write(&corpus_path, json!({"tokenizers": toks}).to_string()).expect("write corpus");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(&corpus_path)
        .arg(&out_path)
        .env("TRANSFORMERS_VERBOSITY", "error")
        // strftime_now: Python formats local time, we format the request's time in UTC.
        .env("TZ", "UTC")
        .output()
        .expect("run .venv/bin/python (made by scripts/setup)");
    assert!(
        out.status.success(),
        "parity.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&out_path).expect("read reference"))
        .expect("reference json")
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn first_diff(a: &[u32], b: &[u32]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

fn short(s: &str) -> String {
    let s: String = s.chars().take(120).collect();
    format!("{s:?}")
}

/// Compares one suite; returns the mismatches as readable lines and the number of chats that
/// both sides refused.
fn check(suite: &Suite, reference: &Json) -> (Vec<String>, usize) {
    let tok = Tokenizer::from_dir(&suite.dir).expect("load tokenizer");
    let mut bad = Vec::new();
    let mut refused = 0;
    let want_prompts = reference["prompts"].as_array().expect("prompts");
    assert_eq!(want_prompts.len(), suite.prompts.len());
    for (i, ((text, add), want)) in suite.prompts.iter().zip(want_prompts).enumerate() {
        let want = ids(want);
        let got = tok.encode_prompt(text, *add).expect("encode");
        if got != want {
            let at = first_diff(&got, &want);
            bad.push(format!(
                "{} prompt {i} (add_special_tokens={add}) {}: {} vs {} ids, first difference at {at}",
                suite.name,
                short(text),
                got.len(),
                want.len()
            ));
        }
    }
    let want_chats = reference["chats"].as_array().expect("chats");
    assert_eq!(want_chats.len(), suite.chats.len());
    for (i, (case, want)) in suite.chats.iter().zip(want_chats).enumerate() {
        let request = case.request.as_array().expect("messages");
        let tools = case
            .tools
            .as_ref()
            .map(|t| t.as_array().expect("tools").as_slice());
        let mut req = ChatRequest::new(request, case.add_generation_prompt, tools);
        req.template_kwargs = case.kwargs.as_ref().and_then(Json::as_object);
        if let Some(err) = want.get("error") {
            if let Ok(text) = tok.render_chat(&req) {
                bad.push(format!(
                    "{} chat {i}: transformers failed ({err}) but we rendered {}",
                    suite.name,
                    short(&text)
                ));
            }
            refused += 1;
            continue;
        }
        let want_text = want["text"].as_str().expect("text");
        match tok.render_chat(&req) {
            Ok(text) if text != want_text => {
                let at = text
                    .chars()
                    .zip(want_text.chars())
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                let ctx =
                    |s: &str| short(&s.chars().skip(at.saturating_sub(20)).collect::<String>());
                bad.push(format!(
                    "{} chat {i} text differs at char {at}: {} vs {}",
                    suite.name,
                    ctx(&text),
                    ctx(want_text)
                ));
            }
            Ok(_) => {}
            Err(e) => bad.push(format!("{} chat {i}: {e}", suite.name)),
        }
        let want_ids = ids(&want["ids"]);
        match tok.encode_chat_request(&req) {
            Ok(got) if got != want_ids => bad.push(format!(
                "{} chat {i}: ids differ at {}",
                suite.name,
                first_diff(&got, &want_ids)
            )),
            Ok(_) => {}
            Err(e) => bad.push(format!("{} chat {i}: {e}", suite.name)),
        }
    }
    (bad, refused)
}

#[test]
fn token_ids_match_transformers() {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hf-tokenize-parity-{}", std::process::id()));
    let tiny_dir = work.join("tiny");
    write_tiny(&tiny_dir).expect("write tiny tokenizer");
    let features_dir = work.join("features");
    write_features(&features_dir).expect("write feature tokenizer");
    let mut suites = vec![tiny_suite(tiny_dir), feature_suite(features_dir)];
    if let Some(dir) = real_tokenizer_dir("qwen3") {
        suites.push(suite(
            "qwen3",
            dir,
            &["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>"],
            1,
            true,
        ));
    }
    if let Some(dir) = real_tokenizer_dir("llama3_1") {
        suites.push(suite(
            "llama3_1",
            dir,
            &["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"],
            2,
            false,
        ));
    }
    assert!(
        python().is_file(),
        "{} missing: run `bash scripts/setup`",
        python().display()
    );
    let started = std::time::Instant::now();
    let reference = reference(&suites, &work);
    let python_took = started.elapsed();
    let mut bad = Vec::new();
    for s in &suites {
        let long = s.prompts.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        let (mismatches, refused) = check(s, &reference[&s.name]);
        bad.extend(mismatches);
        // A case both sides refuse proves little: the corpus is built so that none are.
        if refused > 0 {
            bad.push(format!(
                "{}: {refused} chats refused by transformers too",
                s.name
            ));
        }
        let longest_ids = reference[&s.name]["prompts"].as_array().map_or(0, |ps| {
            ps.iter()
                .map(|p| p.as_array().map_or(0, Vec::len))
                .max()
                .unwrap_or(0)
        });
        println!(
            "parity {}: {} prompts ({} with special tokens; longest {} bytes, {} tokens) and {} chats ({} with tools) compared",
            s.name,
            s.prompts.len(),
            s.prompts.iter().filter(|(_, add)| *add).count(),
            long,
            longest_ids,
            s.chats.len(),
            s.chats.iter().filter(|c| c.tools.is_some()).count(),
        );
    }
    println!(
        "parity timing: transformers {:.1} s, this crate {:.1} s (an unoptimized build in `cargo test`)",
        python_took.as_secs_f64(),
        (started.elapsed() - python_took).as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&work);
    assert!(
        bad.is_empty(),
        "{} mismatches with transformers:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
