//! vLLM's block hashes against the digests vLLM's own `hash_block_tokens` computed for the golden
//! captures (`testdata/vllm-kv-events/*.json`, `expected`; `config.prefix_caching_hash_algo` is
//! `sha256`, vLLM's default), through `vllm_hash` and through the
//! block pool's default hashing.

use engine_sim::vllm_hash::{
    hash_block_tokens, lora_extra_keys, none_hash, Algo, DEFAULT_NONE_HASH_SEED,
};
use engine_sim::{BlockPool, HashForm, Lora};
use kv_events::BlockHash;
use serde_json::Value;
use std::path::PathBuf;

fn testdata() -> PathBuf {
    test_support::vllm_captures()
}

fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The golden scenario's requests: (name, tokens, LoRA name; its path is
/// `expected.lora.path`, `/adapters/sql-lora`).
fn scenario() -> Vec<(&'static str, Vec<u32>, Option<&'static str>)> {
    vec![
        ("A", (1..=16).collect(), None),
        ("B", (1..=8).chain(201..=204).collect(), None),
        ("C_lora", (1..=8).collect(), Some("sql-lora")),
    ]
}

fn captures() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(testdata()).expect("testdata dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("capture");
            let v: Value = serde_json::from_str(&text).expect("json");
            out.push((path.display().to_string(), v));
        }
    }
    assert!(out.len() >= 6, "the six golden captures");
    out
}

fn expected<'a>(v: &'a Value, name: &str, key: &str) -> &'a Vec<Value> {
    v["expected"][key][name]
        .as_array()
        .unwrap_or_else(|| panic!("expected.{key}.{name}"))
}

#[test]
fn sha256_matches_vllm_hash_block_tokens() {
    let root = none_hash(Algo::Sha256, DEFAULT_NONE_HASH_SEED);
    let mut scratch = Vec::new();
    for (file, v) in captures() {
        for (name, tokens, lora) in scenario() {
            let want = expected(&v, name, "raw_sha256_block_hashes_hex");
            let keys = lora.map(|l| lora_extra_keys(l, "/adapters/sql-lora"));
            let mut parent = root;
            let mut got = Vec::new();
            for block in tokens.chunks_exact(4) {
                parent =
                    hash_block_tokens(Algo::Sha256, &mut scratch, &parent, block, keys.as_deref());
                got.push(Value::String(hex(&parent)));
            }
            assert_eq!(&got, want, "{file}: {name}");
        }
    }
}

#[test]
fn the_pool_publishes_vllms_hashes_by_default() {
    let lora = Lora {
        id: 1,
        name: "sql-lora".into(),
        path: "/adapters/sql-lora".into(),
    };
    for (file, v) in captures() {
        let signed = v["config"]["legacy_signed_hashes"] == Value::Bool(true);
        let form = match v["config"]["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"].as_str() {
            Some("0") => HashForm::Bytes,
            _ => HashForm::Int,
        };
        let mut pool = BlockPool::new(64, 4, 0, form);
        for (name, tokens, l) in scenario() {
            let l = l.map(|_| lora.clone());
            let got: Vec<Value> = pool
                .block_hashes(&tokens, l.as_ref())
                .iter()
                .map(|h| match form.external(h) {
                    // vLLM 0.9 published the same 8 bytes as a signed integer.
                    BlockHash::Uint(u) if signed => Value::from(u as i64),
                    BlockHash::Uint(u) => Value::from(u),
                    BlockHash::Bytes(b) => {
                        assert_eq!(b.as_slice(), &h.0);
                        serde_json::json!({ "$bin": hex(&h.0) })
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(
                &got,
                expected(&v, name, "block_hashes_as_published"),
                "{file}: {name}"
            );
        }
    }
}

#[test]
fn pythonhashseed_changes_the_root() {
    let t: Vec<u32> = (1..=4).collect();
    let mut unset = BlockPool::new(8, 4, 0, HashForm::Int);
    let mut seeded = BlockPool::new(8, 4, 42, HashForm::Int);
    let mut scratch = Vec::new();
    let want = hash_block_tokens(
        Algo::Sha256,
        &mut scratch,
        &none_hash(Algo::Sha256, "42"),
        &t,
        None,
    );
    assert_eq!(seeded.block_hashes(&t, None)[0].0, want);
    assert_ne!(unset.block_hashes(&t, None), seeded.block_hashes(&t, None));
}
