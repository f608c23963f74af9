//! `encode` reproduces, byte for byte, what a given vLLM version's msgspec encoder sends.
//!
//! msgspec's rules, as observed in the golden captures:
//! - the batch is an array `[ts (float64), events, data_parallel_rank]`; a `None` rank is a
//!   trailing default and is omitted (so vLLM 0.9.0, which has no rank, sends 2 elements);
//! - fields without a default are always written (`nil` when `None`); fields with a default
//!   are omitted when `None` (in a map: the key is left out; in an array: only trailing ones);
//! - a struct that could hold more than 15 entries (tag included) gets a 16-bit header even
//!   when fewer are written (vLLM 0.33's `BlockStored` map starts `de 00 0a`);
//! - integers take the smallest encoding, non-negative ones from the unsigned family.

use crate::decode::{REMOVED_FIELDS, STORED_FIELDS};
use crate::msgpack::write;
use crate::types::{BlockHash, BlockRemoved, BlockStored, Event, EventBatch, Medium};

/// How events are laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `["BlockStored", f1, f2, …]` (vLLM <= 0.23).
    Array,
    /// `{"type": "BlockStored", f1: …, …}` (vLLM >= 0.24).
    Map,
}

/// The struct layout of one vLLM version: which fields exist and which have no default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireFormat {
    pub shape: Shape,
    /// How many of [`STORED_FIELDS`] this version has.
    pub stored_fields: usize,
    /// How many of the leading fields have no default (always written).
    pub stored_required: usize,
    pub removed_fields: usize,
    pub removed_required: usize,
}

impl WireFormat {
    /// vLLM 0.9.0: arrays, no `medium`.
    pub const VLLM_0_9: WireFormat = WireFormat {
        shape: Shape::Array,
        stored_fields: 5,
        stored_required: 5,
        removed_fields: 1,
        removed_required: 1,
    };
    /// vLLM 0.10.2: arrays, `medium` added.
    pub const VLLM_0_10_2: WireFormat = WireFormat {
        shape: Shape::Array,
        stored_fields: 6,
        stored_required: 6,
        removed_fields: 2,
        removed_required: 2,
    };
    /// vLLM 0.14: arrays, `lora_name` added.
    pub const VLLM_0_14: WireFormat = WireFormat {
        shape: Shape::Array,
        stored_fields: 7,
        stored_required: 7,
        removed_fields: 2,
        removed_required: 2,
    };
    /// vLLM 0.24: the first map-shaped version.
    pub const VLLM_0_24: WireFormat = WireFormat {
        shape: Shape::Map,
        stored_fields: 11,
        stored_required: 7,
        removed_fields: 3,
        removed_required: 2,
    };
    /// vLLM 0.33: maps with every field kvsync knows.
    pub const VLLM_0_33: WireFormat = WireFormat {
        shape: Shape::Map,
        stored_fields: 15,
        stored_required: 7,
        removed_fields: 5,
        removed_required: 2,
    };
    /// The 0.33 field set laid out as a tag-first array (what the array shape would carry).
    pub const ARRAY_ALL_FIELDS: WireFormat = WireFormat {
        shape: Shape::Array,
        ..WireFormat::VLLM_0_33
    };
}

/// Encodes a batch as `format`'s vLLM version would.
pub fn encode(batch: &EventBatch, format: &WireFormat) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 16 * batch.block_count());
    encode_into(batch, format, &mut out);
    out
}

/// [`encode`] into a reusable buffer (appends).
pub fn encode_into(batch: &EventBatch, format: &WireFormat, out: &mut Vec<u8>) {
    let n = if batch.data_parallel_rank.is_some() {
        3
    } else {
        2
    };
    write::array_len(out, n, false);
    write::f64(out, batch.ts);
    write::array_len(out, batch.events.len(), false);
    for e in &batch.events {
        match e {
            Event::BlockStored(s) => encode_event(
                out,
                format,
                "BlockStored",
                &STORED_FIELDS[..format.stored_fields],
                format.stored_required,
                |i| stored_value(s, i),
            ),
            Event::BlockRemoved(r) => encode_event(
                out,
                format,
                "BlockRemoved",
                &REMOVED_FIELDS[..format.removed_fields],
                format.removed_required,
                |i| removed_value(r, i),
            ),
            Event::AllBlocksCleared => {
                encode_event(out, format, "AllBlocksCleared", &[], 0, |_| None)
            }
        }
    }
    if let Some(rank) = batch.data_parallel_rank {
        write::uint(out, u64::from(rank));
    }
}

/// One field's value, or `None` when the field is `None`.
enum Value<'a> {
    Hashes(&'a [BlockHash]),
    Hash(&'a BlockHash),
    Tokens(&'a [u32]),
    U32(u32),
    I64(i64),
    Str(&'a str),
    Raw(&'a [u8]),
}

fn stored_value(s: &BlockStored, i: usize) -> Option<Value<'_>> {
    match i {
        0 => Some(Value::Hashes(&s.block_hashes)),
        1 => s.parent_block_hash.as_ref().map(Value::Hash),
        2 => Some(Value::Tokens(&s.token_ids)),
        3 => Some(Value::U32(s.block_size)),
        4 => s.lora_id.map(Value::I64),
        5 => s.medium.as_ref().map(Medium::as_str).map(Value::Str),
        6 => s.lora_name.as_deref().map(Value::Str),
        7 => s.extra_keys.as_deref().map(Value::Raw),
        8 => s.group_idx.map(Value::U32),
        9 => s.kv_cache_spec_kind.as_deref().map(Value::Str),
        10 => s.kv_cache_spec_sliding_window.map(Value::U32),
        11 => s.locality.as_deref().map(Value::Str),
        12 => s.ownership.as_deref().map(Value::Str),
        13 => s.session_id.as_deref().map(Value::Str),
        _ => s.lookahead_token_ids.as_deref().map(Value::Tokens),
    }
}

fn removed_value(r: &BlockRemoved, i: usize) -> Option<Value<'_>> {
    match i {
        0 => Some(Value::Hashes(&r.block_hashes)),
        1 => r.medium.as_ref().map(Medium::as_str).map(Value::Str),
        2 => r.group_idx.map(Value::U32),
        3 => r.locality.as_deref().map(Value::Str),
        _ => r.ownership.as_deref().map(Value::Str),
    }
}

fn encode_event<'a>(
    out: &mut Vec<u8>,
    format: &WireFormat,
    tag: &str,
    fields: &[&str],
    required: usize,
    value: impl Fn(usize) -> Option<Value<'a>>,
) {
    let wide = fields.len() + 1 > 15;
    match format.shape {
        Shape::Array => {
            // Required fields always; defaulted ones up to the last that is set.
            let last_set = (required..fields.len())
                .rev()
                .find(|&i| value(i).is_some())
                .map_or(required, |i| i + 1);
            write::array_len(out, last_set + 1, wide);
            write::str(out, tag);
            for i in 0..last_set {
                write_value(out, value(i));
            }
        }
        Shape::Map => {
            let present: Vec<usize> = (0..fields.len())
                .filter(|&i| i < required || value(i).is_some())
                .collect();
            write::map_len(out, present.len() + 1, wide);
            write::str(out, "type");
            write::str(out, tag);
            for i in present {
                write::str(out, fields[i]);
                write_value(out, value(i));
            }
        }
    }
}

fn write_hash(out: &mut Vec<u8>, h: &BlockHash) {
    match h {
        BlockHash::Uint(v) => write::uint(out, *v),
        BlockHash::Int(v) => write::int(out, *v),
        BlockHash::Bytes(b) => write::bin(out, b.as_slice()),
    }
}

fn write_value(out: &mut Vec<u8>, v: Option<Value<'_>>) {
    match v {
        None => write::nil(out),
        Some(Value::Hashes(hs)) => {
            write::array_len(out, hs.len(), false);
            for h in hs {
                write_hash(out, h);
            }
        }
        Some(Value::Hash(h)) => write_hash(out, h),
        Some(Value::Tokens(ts)) => {
            write::array_len(out, ts.len(), false);
            for t in ts {
                write::uint(out, u64::from(*t));
            }
        }
        Some(Value::U32(v)) => write::uint(out, u64::from(v)),
        Some(Value::I64(v)) => write::int(out, v),
        Some(Value::Str(s)) => write::str(out, s),
        Some(Value::Raw(b)) => out.extend_from_slice(b),
    }
}
