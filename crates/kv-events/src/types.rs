//! The typed events vLLM publishes (field set of vLLM 0.33).

use std::fmt;

/// An engine block hash, kept exactly as published: an unsigned integer (vLLM's default, the
/// last 8 bytes of its sha256), a negative signed integer (vLLM <= 0.10.1 and SGLang publish
/// signed 64-bit hashes; their non-negative values arrive as unsigned integers), or raw bytes
/// (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`, up to 32 bytes).
///
/// It is opaque: two hashes are the same block only if they are equal here.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockHash {
    Uint(u64),
    /// Always negative when decoded; a non-negative value is encoded as an unsigned int.
    Int(i64),
    Bytes(ByteHash),
}

impl BlockHash {
    /// A 64-bit key for hash maps: the integer's bits, or an xxh3 of the bytes.
    #[inline]
    pub fn key64(&self) -> u64 {
        match self {
            BlockHash::Uint(v) => *v,
            BlockHash::Int(v) => *v as u64,
            BlockHash::Bytes(b) => xxhash_rust::xxh3::xxh3_64(b.as_slice()),
        }
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockHash::Uint(v) => write!(f, "{v}"),
            BlockHash::Int(v) => write!(f, "{v}"),
            BlockHash::Bytes(b) => write!(f, "{b}"),
        }
    }
}

/// A byte block hash of at most [`ByteHash::MAX_LEN`] bytes, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteHash {
    len: u8,
    buf: [u8; ByteHash::MAX_LEN],
}

impl ByteHash {
    /// sha256 digests are 32 bytes; nothing vLLM publishes is longer.
    pub const MAX_LEN: usize = 32;

    /// `None` when `b` is longer than [`ByteHash::MAX_LEN`].
    pub fn new(b: &[u8]) -> Option<Self> {
        if b.len() > Self::MAX_LEN {
            return None;
        }
        let mut buf = [0u8; Self::MAX_LEN];
        buf[..b.len()].copy_from_slice(b);
        Some(ByteHash {
            len: b.len() as u8,
            buf,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl fmt::Display for ByteHash {
    /// `0x` and lower-case hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x")?;
        for b in self.as_slice() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ByteHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The storage tier (`medium`) a block lives on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Medium {
    Gpu,
    Cpu,
    /// vLLM's "STORAGE" (disk or remote offload).
    Storage,
    /// SGLang's names.
    CpuPinned,
    Disk,
    External,
    Other(Box<str>),
}

impl Medium {
    pub fn parse(s: &str) -> Medium {
        match s {
            "GPU" => Medium::Gpu,
            "CPU" => Medium::Cpu,
            "STORAGE" => Medium::Storage,
            "CPU_PINNED" => Medium::CpuPinned,
            "DISK" => Medium::Disk,
            "EXTERNAL" => Medium::External,
            other => Medium::Other(other.into()),
        }
    }

    /// The string as published.
    pub fn as_str(&self) -> &str {
        match self {
            Medium::Gpu => "GPU",
            Medium::Cpu => "CPU",
            Medium::Storage => "STORAGE",
            Medium::CpuPinned => "CPU_PINNED",
            Medium::Disk => "DISK",
            Medium::External => "EXTERNAL",
            Medium::Other(s) => s,
        }
    }
}

/// A run of contiguous blocks became cached.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    pub block_hashes: Vec<BlockHash>,
    /// The engine hash of the block before the first; `None` at the prompt start (or in
    /// `kv_cache_report_mode="full"` re-announcements).
    pub parent_block_hash: Option<BlockHash>,
    /// Flat: `block_hashes.len() * block_size` tokens, or empty for token-less tier stores.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    /// `None` means GPU.
    pub medium: Option<Medium>,
    pub lora_name: Option<String>,
    /// Raw MessagePack of the per-block extra keys (multimodal hashes, LoRA, salt), kept
    /// verbatim: kvsync does not interpret it.
    pub extra_keys: Option<Vec<u8>>,
    pub group_idx: Option<u32>,
    pub kv_cache_spec_kind: Option<String>,
    pub kv_cache_spec_sliding_window: Option<u32>,
    pub locality: Option<String>,
    pub ownership: Option<String>,
    pub session_id: Option<String>,
    pub lookahead_token_ids: Option<Vec<u32>>,
}

/// Blocks were evicted from one tier (vLLM sends one event per block).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    pub block_hashes: Vec<BlockHash>,
    pub medium: Option<Medium>,
    pub group_idx: Option<u32>,
    pub locality: Option<String>,
    pub ownership: Option<String>,
}

/// One KV cache event.
///
/// `BlockStored` is much larger than the others; it is not boxed because stores dominate real
/// streams and a box would cost an allocation per event while saving only transient space.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Event {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    /// The engine's prefix cache was reset: the worker holds nothing afterwards.
    AllBlocksCleared,
}

impl Event {
    /// The wire tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::BlockStored(_) => "BlockStored",
            Event::BlockRemoved(_) => "BlockRemoved",
            Event::AllBlocksCleared => "AllBlocksCleared",
        }
    }
}

/// One published batch (`KVEventBatch`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventBatch {
    /// Seconds since the epoch at publication.
    pub ts: f64,
    pub events: Vec<Event>,
    /// Absent in vLLM 0.9.0.
    pub data_parallel_rank: Option<u32>,
}

impl EventBatch {
    /// Blocks named by all events (stored and removed).
    pub fn block_count(&self) -> usize {
        self.events
            .iter()
            .map(|e| match e {
                Event::BlockStored(s) => s.block_hashes.len(),
                Event::BlockRemoved(r) => r.block_hashes.len(),
                Event::AllBlocksCleared => 0,
            })
            .sum()
    }
}
