//! Events as JSON lines, the format `kvsync tap` and `kvsync capture` print:
//! `{"seq","ts","dp_rank","type","block_hashes","parent_block_hash","token_ids","block_size",
//! "lora_id","lora_name","medium","group_idx"}`; integer hashes are JSON integers, byte hashes
//! `"0x…"` strings, absent fields `null`.

use kv_events::{BlockHash, Event, EventBatch, Medium};
use kv_subscriber::Delivery;
use serde_json::{json, Value};

fn hash(h: &BlockHash) -> Value {
    match h {
        BlockHash::Uint(v) => json!(v),
        BlockHash::Int(v) => json!(v),
        BlockHash::Bytes(b) => json!(b.to_string()),
    }
}

fn hashes(hs: &[BlockHash]) -> Value {
    Value::Array(hs.iter().map(hash).collect())
}

/// One JSON object per event of the batch.
pub fn event_lines(seq: u64, batch: &EventBatch) -> Vec<Value> {
    batch
        .events
        .iter()
        .map(|e| {
            let mut v = json!({
                "seq": seq,
                "ts": batch.ts,
                "dp_rank": batch.data_parallel_rank,
                "type": e.kind(),
                "block_hashes": null,
                "parent_block_hash": null,
                "token_ids": null,
                "block_size": null,
                "lora_id": null,
                "lora_name": null,
                "medium": null,
                "group_idx": null,
            });
            match e {
                Event::BlockStored(s) => {
                    v["block_hashes"] = hashes(&s.block_hashes);
                    v["parent_block_hash"] = s.parent_block_hash.as_ref().map_or(Value::Null, hash);
                    v["token_ids"] = json!(s.token_ids);
                    v["block_size"] = json!(s.block_size);
                    v["lora_id"] = json!(s.lora_id);
                    v["lora_name"] = json!(s.lora_name);
                    v["medium"] = json!(s.medium.as_ref().map(Medium::as_str));
                    v["group_idx"] = json!(s.group_idx);
                }
                Event::BlockRemoved(r) => {
                    v["block_hashes"] = hashes(&r.block_hashes);
                    v["medium"] = json!(r.medium.as_ref().map(Medium::as_str));
                    v["group_idx"] = json!(r.group_idx);
                }
                Event::AllBlocksCleared => {}
            }
            v
        })
        .collect()
}

/// The lines of one subscriber delivery: a batch's events, or one line for a gap, a restart
/// or a malformed batch.
pub fn delivery_lines(d: &Delivery) -> Vec<Value> {
    match d {
        Delivery::Batch(seq, b) => event_lines(*seq, b),
        Delivery::Gap { from, to, repaired } => {
            vec![json!({"type": "Gap", "from": from, "to": to, "repaired": repaired})]
        }
        Delivery::Restarted { last, seq } => {
            vec![json!({"type": "Restarted", "last": last, "seq": seq})]
        }
        Delivery::Malformed { seq, error } => {
            vec![json!({"type": "Malformed", "seq": seq, "error": error.to_string()})]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_events::{BlockRemoved, BlockStored, ByteHash};

    #[test]
    fn int_hashes_are_integers_byte_hashes_hex_and_absent_fields_null() {
        let batch = EventBatch {
            ts: 1.5,
            events: vec![
                Event::BlockStored(BlockStored {
                    block_hashes: vec![BlockHash::Uint(u64::MAX), BlockHash::Int(-3)],
                    parent_block_hash: Some(BlockHash::Bytes(
                        ByteHash::new(&[0xab, 0x01]).expect("short"),
                    )),
                    token_ids: vec![1, 2],
                    block_size: 1,
                    ..Default::default()
                }),
                Event::BlockRemoved(BlockRemoved {
                    block_hashes: vec![BlockHash::Uint(7)],
                    medium: Some(Medium::Cpu),
                    ..Default::default()
                }),
                Event::AllBlocksCleared,
            ],
            data_parallel_rank: None,
        };
        let lines = event_lines(9, &batch);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["block_hashes"], json!([u64::MAX, -3]));
        assert_eq!(lines[0]["parent_block_hash"], json!("0xab01"));
        assert_eq!(lines[0]["medium"], Value::Null);
        assert_eq!(lines[0]["dp_rank"], Value::Null);
        assert_eq!(lines[1]["medium"], json!("CPU"));
        assert_eq!(lines[1]["token_ids"], Value::Null);
        assert_eq!(lines[2]["type"], json!("AllBlocksCleared"));
        assert!(lines
            .iter()
            .all(|l| l["seq"] == json!(9) && l["ts"] == json!(1.5)));
        let keys: Vec<&str> = lines[2]
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 12, "every field present: {keys:?}");
    }
}
