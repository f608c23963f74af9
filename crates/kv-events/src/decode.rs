//! `decode(payload) -> EventBatch` for every wire shape vLLM 0.9 to 0.33 (and SGLang) send.
//!
//! One code path serves both event shapes: a tag-first array (`["BlockStored", f1, f2, …]`,
//! vLLM <= 0.23) is read by position, a map (`{"type": "BlockStored", …}`, >= 0.24) by key,
//! and both land in the same per-field reader indexed by the field's position in vLLM 0.33's
//! struct (fields were only ever appended, so positions are stable across versions).

use crate::msgpack::{Int, ReadError, Reader};
use crate::types::{BlockHash, BlockRemoved, BlockStored, ByteHash, Event, EventBatch, Medium};
use std::fmt;

/// Why a payload could not be decoded, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct DecodeError {
    /// Byte offset in the payload where the problem was found.
    pub offset: usize,
    /// Index of the event in the batch, when inside one.
    pub event: Option<usize>,
    /// The event's type, once known.
    pub event_type: Option<&'static str>,
    /// The field being read, when inside one.
    pub field: Option<&'static str>,
    pub kind: DecodeErrorKind,
}

/// What was wrong.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeErrorKind {
    /// The MessagePack itself is malformed or of the wrong type.
    Msgpack(ReadError),
    /// The batch array has fewer than 2 elements.
    ShortBatch(usize),
    /// The event's `type` tag is not one kvsync knows.
    UnknownEventType(String),
    /// A map event without a `type` key, or an empty array event.
    MissingTag,
    /// A required field is absent.
    MissingField(&'static str),
    /// A byte hash longer than [`ByteHash::MAX_LEN`].
    HashTooLong(usize),
    /// Bytes follow the batch.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {}", self.offset)?;
        if let Some(i) = self.event {
            write!(f, ", event {i}")?;
        }
        if let Some(t) = self.event_type {
            write!(f, " ({t})")?;
        }
        if let Some(field) = self.field {
            write!(f, ", field `{field}`")?;
        }
        write!(f, ": ")?;
        match &self.kind {
            DecodeErrorKind::Msgpack(e) => write!(f, "{e}"),
            DecodeErrorKind::ShortBatch(n) => {
                write!(f, "batch has {n} elements, expected [ts, events, …]")
            }
            DecodeErrorKind::UnknownEventType(t) => write!(f, "unknown event type {t:?}"),
            DecodeErrorKind::MissingTag => write!(f, "event has no type tag"),
            DecodeErrorKind::MissingField(name) => write!(f, "required field `{name}` is absent"),
            DecodeErrorKind::HashTooLong(n) => write!(
                f,
                "block hash of {n} bytes, at most {} supported",
                ByteHash::MAX_LEN
            ),
            DecodeErrorKind::TrailingBytes(n) => write!(f, "{n} bytes after the batch"),
        }
    }
}

/// Field names of `BlockStored` in vLLM 0.33's order (array events are read by position).
pub(crate) const STORED_FIELDS: [&str; 15] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
];

/// Field names of `BlockRemoved` in vLLM 0.33's order.
pub(crate) const REMOVED_FIELDS: [&str; 5] = [
    "block_hashes",
    "medium",
    "group_idx",
    "locality",
    "ownership",
];

/// Decodes one `KVEventBatch` payload (the last frame of a live or replayed message).
pub fn decode(payload: &[u8]) -> std::result::Result<EventBatch, DecodeError> {
    let mut d = Decoder {
        r: Reader::new(payload),
        event: None,
        event_type: None,
        field: None,
    };
    let batch = d.batch()?;
    if !d.r.is_empty() {
        return Err(d.err(DecodeErrorKind::TrailingBytes(d.r.remaining())));
    }
    Ok(batch)
}

struct Decoder<'a> {
    r: Reader<'a>,
    event: Option<usize>,
    event_type: Option<&'static str>,
    field: Option<&'static str>,
}

/// Reads with the reader, locating any error.
macro_rules! rd {
    ($d:ident, $method:ident) => {{
        let res = $d.r.$method();
        $d.m(res)
    }};
}

type Result<T> = std::result::Result<T, DecodeError>;

enum Kind {
    Stored,
    Removed,
    Cleared,
}

impl<'a> Decoder<'a> {
    fn err(&self, kind: DecodeErrorKind) -> DecodeError {
        DecodeError {
            offset: self.r.pos(),
            event: self.event,
            event_type: self.event_type,
            field: self.field,
            kind,
        }
    }

    /// Lifts a reader result into a located error.
    #[inline]
    fn m<T>(&self, res: std::result::Result<T, ReadError>) -> Result<T> {
        res.map_err(|e| self.err(DecodeErrorKind::Msgpack(e)))
    }

    fn batch(&mut self) -> Result<EventBatch> {
        let n = rd!(self, array_len)?;
        if n < 2 {
            return Err(self.err(DecodeErrorKind::ShortBatch(n)));
        }
        self.field = Some("ts");
        let ts = rd!(self, f64)?;
        self.field = Some("events");
        let count = rd!(self, array_len)?;
        self.field = None;
        let mut events = Vec::with_capacity(count);
        for i in 0..count {
            self.event = Some(i);
            events.push(self.event_value()?);
            self.event_type = None;
            self.field = None;
        }
        self.event = None;
        let mut data_parallel_rank = None;
        if n >= 3 {
            self.field = Some("data_parallel_rank");
            if !rd!(self, nil)? {
                data_parallel_rank = Some(rd!(self, u32)?);
            }
            self.field = None;
        }
        // Trailing elements from newer publishers (e.g. `publisher_id`) are ignored.
        for _ in 3..n {
            rd!(self, skip)?;
        }
        Ok(EventBatch {
            ts,
            events,
            data_parallel_rank,
        })
    }

    /// The event type named by a tag's bytes (an unknown tag must still be UTF-8).
    fn kind_of(&mut self, tag: &[u8]) -> Result<Kind> {
        let (kind, name) = match tag {
            b"BlockStored" => (Kind::Stored, "BlockStored"),
            b"BlockRemoved" => (Kind::Removed, "BlockRemoved"),
            b"AllBlocksCleared" => (Kind::Cleared, "AllBlocksCleared"),
            other => {
                let other = self.utf8(other)?;
                return Err(self.err(DecodeErrorKind::UnknownEventType(other.to_owned())));
            }
        };
        self.event_type = Some(name);
        Ok(kind)
    }

    /// A string read by `str_bytes` that is kept or shown: it must be UTF-8.
    fn utf8<'b>(&self, b: &'b [u8]) -> Result<&'b str> {
        std::str::from_utf8(b).map_err(|_| self.err(DecodeErrorKind::Msgpack(ReadError::Utf8)))
    }

    fn event_value(&mut self) -> Result<Event> {
        let m = rd!(self, peek)?;
        if matches!(m, 0x80..=0x8f | 0xde | 0xdf) {
            self.map_event()
        } else {
            self.array_event()
        }
    }

    fn array_event(&mut self) -> Result<Event> {
        let n = rd!(self, array_len)?;
        if n == 0 {
            return Err(self.err(DecodeErrorKind::MissingTag));
        }
        let tag = rd!(self, str_bytes)?;
        let kind = self.kind_of(tag)?;
        let mut fields = FieldSet::new(kind);
        for idx in 0..n - 1 {
            self.field(&mut fields, Some(idx))?;
        }
        self.finish(fields)
    }

    fn map_event(&mut self) -> Result<Event> {
        let n = rd!(self, map_len)?;
        // msgspec writes the tag first: then the fields follow it. Anything else gets a
        // look-ahead for the tag and is read again from its first key.
        let start = self.r.clone();
        let mut tag = None;
        let mut first = true;
        for _ in 0..n {
            let key = rd!(self, str_bytes)?;
            if key == b"type" {
                tag = Some(rd!(self, str_bytes)?);
                break;
            }
            self.utf8(key)?;
            rd!(self, skip)?;
            first = false;
        }
        let tag = tag.ok_or_else(|| self.err(DecodeErrorKind::MissingTag))?;
        let kind = self.kind_of(tag)?;
        let mut rest = n - 1;
        if !first {
            self.r = start;
            rest = n;
        }
        let mut fields = FieldSet::new(kind);
        for _ in 0..rest {
            // Keys compared as bytes: a known name is UTF-8 by construction; another key is
            // checked before it is skipped.
            let key = rd!(self, str_bytes)?;
            let idx = match fields.kind {
                Kind::Stored => STORED_FIELDS.iter().position(|f| f.as_bytes() == key),
                Kind::Removed => REMOVED_FIELDS.iter().position(|f| f.as_bytes() == key),
                Kind::Cleared => None,
            };
            if idx.is_none() {
                self.utf8(key)?;
                if key == b"type" {
                    rd!(self, skip)?;
                    continue;
                }
            }
            self.field(&mut fields, idx)?;
        }
        self.finish(fields)
    }

    /// Reads the value of field `idx` (vLLM 0.33 position) into `f`; `None` skips it.
    fn field(&mut self, f: &mut FieldSet, idx: Option<usize>) -> Result<()> {
        let names: &[&'static str] = match f.kind {
            Kind::Stored => &STORED_FIELDS,
            Kind::Removed => &REMOVED_FIELDS,
            Kind::Cleared => &[],
        };
        let Some((idx, name)) = idx.and_then(|i| names.get(i).map(|n| (i, *n))) else {
            return rd!(self, skip);
        };
        self.field = Some(name);
        f.seen |= 1 << idx;
        match f.kind {
            Kind::Stored => {
                let s = &mut f.stored;
                match idx {
                    0 => s.block_hashes = self.hashes()?,
                    1 => s.parent_block_hash = self.opt(Self::hash)?,
                    2 => s.token_ids = self.tokens()?,
                    3 => s.block_size = rd!(self, u32)?,
                    4 => s.lora_id = self.opt(|d| rd!(d, i64))?,
                    5 => s.medium = self.opt(Self::medium)?,
                    6 => s.lora_name = self.opt(Self::string)?,
                    7 => s.extra_keys = self.opt(Self::raw)?,
                    8 => s.group_idx = self.opt(|d| rd!(d, u32))?,
                    9 => s.kv_cache_spec_kind = self.opt(Self::string)?,
                    10 => s.kv_cache_spec_sliding_window = self.opt(|d| rd!(d, u32))?,
                    11 => s.locality = self.opt(Self::string)?,
                    12 => s.ownership = self.opt(Self::string)?,
                    13 => s.session_id = self.opt(Self::string)?,
                    _ => s.lookahead_token_ids = self.opt(Self::tokens)?,
                }
            }
            Kind::Removed => {
                let r = &mut f.removed;
                match idx {
                    0 => r.block_hashes = self.hashes()?,
                    1 => r.medium = self.opt(Self::medium)?,
                    2 => r.group_idx = self.opt(|d| rd!(d, u32))?,
                    3 => r.locality = self.opt(Self::string)?,
                    _ => r.ownership = self.opt(Self::string)?,
                }
            }
            Kind::Cleared => {}
        }
        self.field = None;
        Ok(())
    }

    fn finish(&mut self, f: FieldSet) -> Result<Event> {
        let required: &[(usize, &'static str)] = match f.kind {
            Kind::Stored => &[(0, "block_hashes"), (2, "token_ids"), (3, "block_size")],
            Kind::Removed => &[(0, "block_hashes")],
            Kind::Cleared => &[],
        };
        if let Some((_, name)) = required.iter().find(|(i, _)| f.seen & (1 << i) == 0) {
            return Err(self.err(DecodeErrorKind::MissingField(name)));
        }
        Ok(match f.kind {
            Kind::Stored => Event::BlockStored(f.stored),
            Kind::Removed => Event::BlockRemoved(f.removed),
            Kind::Cleared => Event::AllBlocksCleared,
        })
    }

    fn opt<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        if rd!(self, nil)? {
            Ok(None)
        } else {
            read(self).map(Some)
        }
    }

    fn hash(&mut self) -> Result<BlockHash> {
        let m = rd!(self, peek)?;
        if matches!(m, 0xc4..=0xc6) {
            let b = rd!(self, bin)?;
            return ByteHash::new(b)
                .map(BlockHash::Bytes)
                .ok_or_else(|| self.err(DecodeErrorKind::HashTooLong(b.len())));
        }
        match self.r.int() {
            Ok(Int::Uint(v)) => Ok(BlockHash::Uint(v)),
            Ok(Int::Int(v)) => Ok(BlockHash::Int(v)),
            Err(ReadError::Type { found, .. }) => {
                Err(self.err(DecodeErrorKind::Msgpack(ReadError::Type {
                    expected: "int or bin block hash",
                    found,
                })))
            }
            Err(e) => Err(self.err(DecodeErrorKind::Msgpack(e))),
        }
    }

    fn hashes(&mut self) -> Result<Vec<BlockHash>> {
        let n = rd!(self, array_len)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.hash()?);
        }
        Ok(v)
    }

    fn tokens(&mut self) -> Result<Vec<u32>> {
        let n = rd!(self, array_len)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(rd!(self, u32)?);
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String> {
        rd!(self, str).map(str::to_owned)
    }

    fn medium(&mut self) -> Result<Medium> {
        let b = rd!(self, str_bytes)?;
        Ok(match b {
            b"GPU" => Medium::Gpu,
            b"CPU" => Medium::Cpu,
            other => Medium::parse(self.utf8(other)?),
        })
    }

    fn raw(&mut self) -> Result<Vec<u8>> {
        let start = self.r.pos();
        rd!(self, skip)?;
        Ok(self.r.since(start).to_vec())
    }
}

/// The fields of one event as they are read, with a bit per field seen.
struct FieldSet {
    kind: Kind,
    seen: u32,
    stored: BlockStored,
    removed: BlockRemoved,
}

impl FieldSet {
    fn new(kind: Kind) -> Self {
        FieldSet {
            kind,
            seen: 0,
            stored: BlockStored::default(),
            removed: BlockRemoved::default(),
        }
    }
}
