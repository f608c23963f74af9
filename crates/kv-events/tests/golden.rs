//! Every golden capture of vLLM's own publisher (../shared/testdata/vllm-kv-events) decodes to
//! exactly the scenario in its README, and re-encodes to the captured bytes.

use kv_events::{
    decode, encode, parse_live, parse_replay, BlockHash, Event, EventBatch, Medium, ReplayMessage,
    WireFormat,
};
use serde_json::Value;
use std::path::PathBuf;

fn testdata() -> PathBuf {
    test_support::vllm_captures()
}

struct Capture {
    name: &'static str,
    format: WireFormat,
    doc: Value,
}

const CAPTURES: [(&str, WireFormat); 6] = [
    ("vllm-0.9.0_signed-int-hashes.json", WireFormat::VLLM_0_9),
    ("vllm-0.10.2_int-hashes.json", WireFormat::VLLM_0_10_2),
    ("vllm-0.14.0_int-hashes.json", WireFormat::VLLM_0_14),
    ("vllm-0.24.0_int-hashes.json", WireFormat::VLLM_0_24),
    ("vllm-0.33.0_int-hashes.json", WireFormat::VLLM_0_33),
    ("vllm-0.33.0_bytes-hashes.json", WireFormat::VLLM_0_33),
];

fn captures() -> Vec<Capture> {
    CAPTURES
        .iter()
        .map(|(name, format)| {
            let path = testdata().join(name);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (set KVSYNC_SHARED_DIR)", path.display()));
            Capture {
                name,
                format: *format,
                doc: serde_json::from_str(&text).expect("capture is JSON"),
            }
        })
        .collect()
}

fn frames(msg: &Value) -> Vec<Vec<u8>> {
    msg["frames_hex"]
        .as_array()
        .expect("frames_hex")
        .iter()
        .map(|f| hex::decode(f.as_str().expect("hex string")).expect("hex"))
        .collect()
}

/// A published hash as the capture's `expected` section writes it.
fn json_hash(v: &Value) -> BlockHash {
    if let Some(b) = v.get("$bin") {
        let bytes = hex::decode(b.as_str().expect("$bin")).expect("hex");
        BlockHash::Bytes(kv_events::ByteHash::new(&bytes).expect("<= 32 bytes"))
    } else if let Some(u) = v.as_u64() {
        BlockHash::Uint(u)
    } else {
        BlockHash::Int(v.as_i64().expect("integer hash"))
    }
}

fn chain(doc: &Value, name: &str) -> Vec<BlockHash> {
    doc["expected"]["block_hashes_as_published"][name]
        .as_array()
        .expect("chain")
        .iter()
        .map(json_hash)
        .collect()
}

fn version(c: &Capture) -> (u32, u32) {
    let v = c.doc["vllm_version"].as_str().expect("version");
    let mut it = v.split('.').map(|p| p.parse::<u32>().expect("number"));
    (it.next().expect("major"), it.next().expect("minor"))
}

fn stored(e: &Event) -> &kv_events::BlockStored {
    match e {
        Event::BlockStored(s) => s,
        other => panic!("expected BlockStored, got {other:?}"),
    }
}

fn removed(e: &Event) -> &kv_events::BlockRemoved {
    match e {
        Event::BlockRemoved(r) => r,
        other => panic!("expected BlockRemoved, got {other:?}"),
    }
}

/// The README's scenario, asserted field by field.
fn assert_scenario(c: &Capture, batches: &[(u64, EventBatch)], rank: u32) {
    let (a, b, lora) = (
        chain(&c.doc, "A"),
        chain(&c.doc, "B"),
        chain(&c.doc, "C_lora"),
    );
    let v = version(c);
    let has_medium = v >= (0, 10);
    let gpu = has_medium.then_some(Medium::Gpu);
    let want_rank = (v >= (0, 10)).then_some(rank);
    assert_eq!(batches.len(), 7, "{}", c.name);
    for (i, (seq, batch)) in batches.iter().enumerate() {
        assert_eq!(*seq, i as u64, "{}: seq", c.name);
        assert_eq!(
            batch.ts,
            1_700_000_000.0 + (i as f64) + f64::from(rank) * 100.0
        );
        assert_eq!(batch.data_parallel_rank, want_rank, "{}: rank", c.name);
    }
    let ev = |i: usize| &batches[i].1.events;
    // seq 0: A0..A2, parent nil, tokens 1..12.
    assert_eq!(ev(0).len(), 1);
    let s = stored(&ev(0)[0]);
    assert_eq!(s.block_hashes, a[..3]);
    assert_eq!(s.parent_block_hash, None);
    assert_eq!(s.token_ids, (1..=12).collect::<Vec<u32>>());
    assert_eq!(
        (s.block_size, s.medium.clone(), s.lora_id),
        (4, gpu.clone(), None)
    );
    assert_eq!(s.lora_name, None);
    // seq 1: A3 (parent A2); B2 (parent B1 == A1).
    assert_eq!(ev(1).len(), 2);
    let (s0, s1) = (stored(&ev(1)[0]), stored(&ev(1)[1]));
    assert_eq!(
        (s0.block_hashes.clone(), s0.parent_block_hash),
        (vec![a[3]], Some(a[2]))
    );
    assert_eq!(s0.token_ids, vec![13, 14, 15, 16]);
    assert_eq!(b[1], a[1]);
    assert_eq!(
        (s1.block_hashes.clone(), s1.parent_block_hash),
        (vec![b[2]], Some(b[1]))
    );
    assert_eq!(s1.token_ids, vec![201, 202, 203, 204]);
    // seq 2: C0, C1 under LoRA "sql-lora", same tokens as A0, A1, different hashes.
    let s = stored(&ev(2)[0]);
    assert_eq!(s.block_hashes, lora);
    assert_ne!(s.block_hashes, a[..2]);
    assert_eq!(s.token_ids, (1..=8).collect::<Vec<u32>>());
    assert_eq!(s.lora_id, Some(1));
    let want_name = (v >= (0, 14)).then(|| "sql-lora".to_owned());
    assert_eq!(s.lora_name, want_name, "{}", c.name);
    assert_eq!(
        s.extra_keys.is_some(),
        v >= (0, 24),
        "{}: extra_keys",
        c.name
    );
    if v >= (0, 33) {
        assert_eq!(s.session_id.as_deref(), Some("session-c"));
    }
    // seq 3: one BlockRemoved per block.
    assert_eq!(ev(3).len(), 2);
    assert_eq!(removed(&ev(3)[0]).block_hashes, vec![a[3]]);
    assert_eq!(removed(&ev(3)[1]).block_hashes, vec![b[2]]);
    assert_eq!(removed(&ev(3)[0]).medium, gpu);
    // seq 4: token-less CPU store of A0.
    let s = stored(&ev(4)[0]);
    assert_eq!(s.block_hashes, vec![a[0]]);
    assert!(s.token_ids.is_empty());
    assert_eq!(s.block_size, 0);
    assert_eq!(s.medium, has_medium.then_some(Medium::Cpu));
    // seq 5: AllBlocksCleared.
    assert_eq!(ev(5), &vec![Event::AllBlocksCleared]);
    // seq 6: A0 again, parent nil.
    let s = stored(&ev(6)[0]);
    assert_eq!(
        (s.block_hashes.clone(), s.parent_block_hash),
        (vec![a[0]], None)
    );
    assert_eq!(s.token_ids, vec![1, 2, 3, 4]);
    if v >= (0, 24) {
        assert_eq!(s.group_idx, Some(0));
        assert_eq!(s.kv_cache_spec_kind.as_deref(), Some("full_attention"));
    }
}

#[test]
fn every_capture_decodes_to_the_scenario() {
    for c in captures() {
        let live = c.doc["live"].as_array().expect("live");
        let batches: Vec<(u64, EventBatch)> = live
            .iter()
            .map(|m| {
                let fr = frames(m);
                let msg = parse_live(&fr).expect("live frames");
                assert_eq!(msg.topic, b"kv-events");
                (msg.seq, decode(msg.payload).expect(c.name))
            })
            .collect();
        assert_scenario(&c, &batches, 0);
    }
}

#[test]
fn every_capture_reencodes_byte_for_byte() {
    for c in captures() {
        let mut messages: Vec<Value> = c.doc["live"].as_array().expect("live").clone();
        if let Some(dp) = c.doc["dp_rank1"]["live"].as_array() {
            messages.extend(dp.iter().cloned());
        }
        for m in &messages {
            let fr = frames(m);
            let payload = parse_live(&fr).expect("frames").payload;
            let batch = decode(payload).expect("decodes");
            let again = encode(&batch, &c.format);
            assert_eq!(
                hex::encode(&again),
                hex::encode(payload),
                "{} seq {}",
                c.name,
                m["seq"]
            );
        }
    }
}

#[test]
fn dp_rank1_carries_its_rank() {
    for c in captures() {
        let Some(live) = c.doc["dp_rank1"]["live"].as_array() else {
            assert_eq!(version(&c), (0, 9), "only 0.9.0 has no DP capture");
            continue;
        };
        let fr = frames(&live[0]);
        let msg = parse_live(&fr).expect("frames");
        let batch = decode(msg.payload).expect("decodes");
        assert_eq!(batch.data_parallel_rank, Some(1), "{}", c.name);
        assert_eq!(
            stored(&batch.events[0]).block_hashes,
            chain(&c.doc, "A")[..3]
        );
    }
}

#[test]
fn replay_replies_decode_in_order_then_end() {
    for c in captures() {
        let replies = c.doc["replay_dealer_from_seq2"]["received"]
            .as_array()
            .expect("replay");
        let live = c.doc["live"].as_array().expect("live");
        let mut seqs = Vec::new();
        let mut ended = false;
        for r in replies {
            let fr = frames(r);
            match parse_replay(&fr).expect("replay frames") {
                ReplayMessage::Batch {
                    topic,
                    seq,
                    payload,
                } => {
                    assert!(!ended, "{}: batch after end marker", c.name);
                    let with_topic = version(&c) >= (0, 26);
                    assert_eq!(topic.is_some(), with_topic, "{}", c.name);
                    if let Some(t) = topic {
                        assert_eq!(t, b"kv-events");
                    }
                    let live_fr = frames(&live[seq as usize]);
                    let live_payload = parse_live(&live_fr).expect("live").payload;
                    assert_eq!(payload, live_payload, "{}: replayed seq {seq}", c.name);
                    seqs.push(seq);
                }
                ReplayMessage::End => ended = true,
            }
        }
        assert!(ended, "{}: no end marker", c.name);
        assert_eq!(seqs, vec![2, 3, 4, 5, 6], "{}", c.name);

        let past = c.doc["replay_dealer_from_seq1000"]["received"]
            .as_array()
            .expect("replay 1000");
        assert_eq!(past.len(), 1);
        assert_eq!(parse_replay(&frames(&past[0])), Ok(ReplayMessage::End));
    }
}
