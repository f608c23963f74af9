//! Events as JSON lines, the format `kvsync tap` and `kvsync capture` print:
//! `{"seq","ts","dp_rank","type","block_hashes","parent_block_hash","token_ids","block_size",
//! "lora_id","lora_name","medium","group_idx"}`; integer hashes are JSON integers, byte hashes
//! `"0x…"` strings, absent fields `null`.

use kv_events::{BlockHash, Event, EventBatch, Medium};
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
