//! vLLM's block hashes, bit for bit, for its two reproducible algorithms
//! (`--prefix-caching-hash-algo`): `sha256` (vLLM's default) and `sha256_cbor`.
//!
//! From vLLM's source (`vllm/utils/hashing.py`, `vllm/v1/core/kv_cache_utils.py`):
//!
//! - `sha256(x) = sha256(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL))` (protocol 5);
//!   `sha256_cbor(x) = sha256(cbor2.dumps(x, canonical=True))`;
//! - `hash_block_tokens(fn, parent, tokens, extra_keys) = fn((parent or NONE_HASH,
//!   tuple(tokens), extra_keys))`: a 3-tuple of the parent's 32 digest bytes, the token ids and
//!   the extra keys (a tuple, or `None` when the block has none);
//! - `NONE_HASH = fn(seed)` where `seed` (`resolve_none_hash_seed`) is `PYTHONHASHSEED` when set
//!   and otherwise, for a cryptographic algorithm, the fixed `DEFAULT_NONE_HASH_SEED =
//!   "vllm-none-hash"`: every vLLM process agrees on it;
//! - a LoRA request's blocks carry the extra key `("lora", lora_name, lora_path)`
//!   (`_gen_lora_extra_hash_keys` of vLLM 0.33, the version the golden captures' hashes come
//!   from; older versions used the bare name, and before that the adapter's integer id).
//!
//! Only the serialisation these values need is written here. CBOR: integers, byte and text
//! strings, arrays and `null`, each head in its shortest form (what `canonical=True` gives; its
//! ordering rule only concerns maps, which never occur). Pickle protocol 5 as CPython writes it:
//! `PROTO 5`, one `FRAME`, `SHORT_BINBYTES`, `BININT1/BININT2/BININT/LONG1`,
//! `SHORT_BINUNICODE/BINUNICODE`, `EMPTY_TUPLE/TUPLE1-3/MARK…TUPLE`, `NONE`, a `MEMOIZE` after
//! each bytes, string and non-empty tuple, `STOP`. Limits (far beyond a block's size): one frame
//! (under 64 KiB), and no string repeated within one block's extra keys (pickle would emit a
//! memo reference for the second occurrence of the same object).
//!
//! Checked against the digests vLLM's own `hash_block_tokens` produced (`sha256`) for the golden
//! captures in `testdata/vllm-kv-events/` (`tests/vllm_hash.rs`), and `sha256_cbor` against
//! digests computed with `cbor2` (unit tests below).

use sha2::{Digest, Sha256};

/// The seed vLLM derives `NONE_HASH` from when `PYTHONHASHSEED` is unset and the hash is
/// cryptographic (`kv_cache_utils.DEFAULT_NONE_HASH_SEED`).
pub const DEFAULT_NONE_HASH_SEED: &str = "vllm-none-hash";

/// vLLM's `--prefix-caching-hash-algo` values this module reproduces.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Algo {
    /// `sha256`: SHA-256 over the pickle (vLLM's default).
    #[default]
    Sha256,
    /// `sha256_cbor`: SHA-256 over canonical CBOR.
    Sha256Cbor,
}

/// One extra key of a block (`generate_block_hash_extra_keys`): the LoRA name, a cache salt, a
/// multimodal identifier with its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtraKey {
    Text(String),
    Int(i64),
    Tuple(Vec<ExtraKey>),
}

/// A value of the hashed tuple.
enum Val<'a> {
    Bytes(&'a [u8]),
    Tokens(&'a [u32]),
    Keys(Option<&'a [ExtraKey]>),
    /// `(("lora", name, path),)` without building an [`ExtraKey`].
    Lora(Option<(&'a str, &'a str)>),
}

/// vLLM's `NONE_HASH` for a seed string: `fn(seed)`.
pub fn none_hash(algo: Algo, seed: &str) -> [u8; 32] {
    let mut buf = Vec::with_capacity(seed.len() + 16);
    match algo {
        Algo::Sha256 => pickle::document(&mut buf, |b| pickle::text(b, seed)),
        Algo::Sha256Cbor => cbor::text(&mut buf, seed),
    }
    Sha256::digest(&buf).into()
}

/// `hash_block_tokens(fn, parent, tokens, extra_keys)`; `parent` is the previous block's digest,
/// or `NONE_HASH` for a prompt's first block. `scratch` is reused between calls.
pub fn hash_block_tokens(
    algo: Algo,
    scratch: &mut Vec<u8>,
    parent: &[u8; 32],
    tokens: &[u32],
    extra_keys: Option<&[ExtraKey]>,
) -> [u8; 32] {
    hash3(algo, scratch, parent, tokens, Val::Keys(extra_keys))
}

/// [`hash_block_tokens`] for a block whose only extra key is a LoRA adapter's
/// `("lora", name, path)`, or that has none.
pub fn hash_block_tokens_lora(
    algo: Algo,
    scratch: &mut Vec<u8>,
    parent: &[u8; 32],
    tokens: &[u32],
    lora_name_path: Option<(&str, &str)>,
) -> [u8; 32] {
    hash3(algo, scratch, parent, tokens, Val::Lora(lora_name_path))
}

/// The extra keys of a LoRA adapter's blocks: `(("lora", name, path),)`.
pub fn lora_extra_keys(name: &str, path: &str) -> Vec<ExtraKey> {
    vec![ExtraKey::Tuple(vec![
        ExtraKey::Text("lora".into()),
        ExtraKey::Text(name.into()),
        ExtraKey::Text(path.into()),
    ])]
}

fn hash3(
    algo: Algo,
    buf: &mut Vec<u8>,
    parent: &[u8; 32],
    tokens: &[u32],
    keys: Val<'_>,
) -> [u8; 32] {
    buf.clear();
    let items = [Val::Bytes(parent), Val::Tokens(tokens), keys];
    match algo {
        Algo::Sha256 => pickle::document(buf, |b| pickle::tuple(b, &items, pickle::val)),
        Algo::Sha256Cbor => {
            cbor::head(buf, 4, 3);
            for v in &items {
                cbor::val(buf, v);
            }
        }
    }
    Sha256::digest(buf.as_slice()).into()
}

/// The canonical CBOR subset.
mod cbor {
    use super::{ExtraKey, Val};

    /// The head of major type `major` with argument `n`, shortest form.
    pub(super) fn head(out: &mut Vec<u8>, major: u8, n: u64) {
        let m = major << 5;
        match n {
            0..=23 => out.push(m | n as u8),
            24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
            0x100..=0xffff => {
                out.push(m | 25);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(m | 26);
                out.extend_from_slice(&(n as u32).to_be_bytes());
            }
            _ => {
                out.push(m | 27);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    pub(super) fn int(out: &mut Vec<u8>, v: i64) {
        if v >= 0 {
            head(out, 0, v as u64);
        } else {
            head(out, 1, (-1 - v) as u64);
        }
    }

    pub(super) fn text(out: &mut Vec<u8>, s: &str) {
        head(out, 3, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    fn key(out: &mut Vec<u8>, k: &ExtraKey) {
        match k {
            ExtraKey::Text(s) => text(out, s),
            ExtraKey::Int(v) => int(out, *v),
            ExtraKey::Tuple(items) => {
                head(out, 4, items.len() as u64);
                items.iter().for_each(|i| key(out, i));
            }
        }
    }

    pub(super) fn val(out: &mut Vec<u8>, v: &Val<'_>) {
        match v {
            Val::Bytes(b) => {
                head(out, 2, b.len() as u64);
                out.extend_from_slice(b);
            }
            Val::Tokens(t) => {
                head(out, 4, t.len() as u64);
                t.iter().for_each(|&t| head(out, 0, u64::from(t)));
            }
            Val::Keys(None) | Val::Lora(None) => out.push(0xf6),
            Val::Keys(Some(keys)) => {
                head(out, 4, keys.len() as u64);
                keys.iter().for_each(|k| key(out, k));
            }
            Val::Lora(Some((name, path))) => {
                head(out, 4, 1);
                head(out, 4, 3);
                text(out, "lora");
                text(out, name);
                text(out, path);
            }
        }
    }
}

/// The pickle protocol 5 subset, as CPython's `_pickle` writes it.
mod pickle {
    use super::{ExtraKey, Val};

    const PROTO: u8 = 0x80;
    const FRAME: u8 = 0x95;
    const MEMOIZE: u8 = 0x94;
    const STOP: u8 = b'.';
    const NONE: u8 = b'N';
    const MARK: u8 = b'(';
    const TUPLE: u8 = b't';
    const EMPTY_TUPLE: u8 = b')';
    const TUPLE1: u8 = 0x85;
    const BININT: u8 = b'J';
    const BININT1: u8 = b'K';
    const BININT2: u8 = b'M';
    const LONG1: u8 = 0x8a;
    const SHORT_BINBYTES: u8 = b'C';
    const BINBYTES: u8 = b'B';
    const SHORT_BINUNICODE: u8 = 0x8c;
    const BINUNICODE: u8 = b'X';

    /// `PROTO 5`, a frame holding what `body` writes, `STOP`.
    pub(super) fn document(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
        out.extend_from_slice(&[PROTO, 5, FRAME, 0, 0, 0, 0, 0, 0, 0, 0]);
        body(out);
        out.push(STOP);
        let len = (out.len() - 11) as u64;
        out[3..11].copy_from_slice(&len.to_le_bytes());
    }

    pub(super) fn int(out: &mut Vec<u8>, v: i64) {
        match v {
            0..=0xff => out.extend_from_slice(&[BININT1, v as u8]),
            0x100..=0xffff => {
                out.push(BININT2);
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
            -0x8000_0000..=0x7fff_ffff => {
                out.push(BININT);
                out.extend_from_slice(&(v as i32).to_le_bytes());
            }
            _ => {
                // Python's encode_long: the shortest little-endian two's complement.
                let bytes = v.to_le_bytes();
                let mut n = 8;
                while n > 1 {
                    let (last, prev) = (bytes[n - 1], bytes[n - 2]);
                    let redundant =
                        (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0);
                    if !redundant {
                        break;
                    }
                    n -= 1;
                }
                out.extend_from_slice(&[LONG1, n as u8]);
                out.extend_from_slice(&bytes[..n]);
            }
        }
    }

    pub(super) fn text(out: &mut Vec<u8>, s: &str) {
        if s.len() < 256 {
            out.extend_from_slice(&[SHORT_BINUNICODE, s.len() as u8]);
        } else {
            out.push(BINUNICODE);
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(s.as_bytes());
        out.push(MEMOIZE);
    }

    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        if b.len() < 256 {
            out.extend_from_slice(&[SHORT_BINBYTES, b.len() as u8]);
        } else {
            out.push(BINBYTES);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(b);
        out.push(MEMOIZE);
    }

    /// A tuple of `items` (`save_tuple`): `EMPTY_TUPLE`, the items and `TUPLE1..3`, or `MARK`,
    /// the items and `TUPLE`; memoized unless empty.
    pub(super) fn tuple<T>(out: &mut Vec<u8>, items: &[T], each: fn(&mut Vec<u8>, &T)) {
        match items.len() {
            0 => return out.push(EMPTY_TUPLE),
            n @ 1..=3 => {
                items.iter().for_each(|i| each(out, i));
                out.push(TUPLE1 + n as u8 - 1);
            }
            _ => {
                out.push(MARK);
                items.iter().for_each(|i| each(out, i));
                out.push(TUPLE);
            }
        }
        out.push(MEMOIZE);
    }

    fn key(out: &mut Vec<u8>, k: &ExtraKey) {
        match k {
            ExtraKey::Text(s) => text(out, s),
            ExtraKey::Int(v) => int(out, *v),
            ExtraKey::Tuple(items) => tuple(out, items, key),
        }
    }

    pub(super) fn val(out: &mut Vec<u8>, v: &Val<'_>) {
        match v {
            Val::Bytes(b) => bytes(out, b),
            Val::Tokens(t) => tuple(out, t, |o, &t| int(o, i64::from(t))),
            Val::Keys(None) | Val::Lora(None) => out.push(NONE),
            Val::Keys(Some(keys)) => tuple(out, keys, key),
            Val::Lora(Some((name, path))) => {
                let inner = ["lora", name, path];
                tuple(out, &[inner], |o, i| tuple(o, i, |o, s| text(o, s)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn cbor_heads_are_shortest() {
        let cases: [(u64, &[u8]); 6] = [
            (0, &[0x00]),
            (23, &[0x17]),
            (24, &[0x18, 24]),
            (256, &[0x19, 1, 0]),
            (65536, &[0x1a, 0, 1, 0, 0]),
            (1 << 32, &[0x1b, 0, 0, 0, 1, 0, 0, 0, 0]),
        ];
        for (n, want) in cases {
            let mut out = Vec::new();
            cbor::head(&mut out, 0, n);
            assert_eq!(out, want, "{n}");
        }
        let mut out = Vec::new();
        cbor::int(&mut out, -1);
        cbor::int(&mut out, -25);
        cbor::text(&mut out, "ab");
        assert_eq!(out, [0x20, 0x38, 24, 0x62, b'a', b'b']);
    }

    /// Digests from `hashlib.sha256(cbor2.dumps(x, canonical=True))` (cbor2 5, Python 3.11).
    #[test]
    fn sha256_cbor_matches_cbor2() {
        let a = Algo::Sha256Cbor;
        let root = none_hash(a, DEFAULT_NONE_HASH_SEED);
        assert_eq!(
            hex(&root),
            "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"
        );
        let mut s = Vec::new();
        let h = hash_block_tokens(a, &mut s, &root, &[1, 2, 3, 4], None);
        assert_eq!(
            hex(&h),
            "58d0879dff3800f65f8c5fd449d73048c0f7699dd238a03b84b146b151d55111"
        );
        let t = [5, 300, 70000, (1 << 31) + 5];
        let keys = [ExtraKey::Text("sql-lora".into())];
        let h2 = hash_block_tokens(a, &mut s, &h, &t, Some(&keys));
        assert_eq!(
            hex(&h2),
            "9b9b912da629e4d04b7e0b5d7d0d2c2bf296d17f55d76aec5dfa91e721c3b980"
        );
        let lora = Some(("sql-lora", "/adapters/sql-lora"));
        let h3 = hash_block_tokens_lora(a, &mut s, &h, &t, lora);
        assert_eq!(
            hex(&h3),
            "63714a8d7036bcc9d49989f375c909b28958bf6a8c60c10bb52db6d5dd2ab0e5"
        );
    }

    /// Bytes and digests from `pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)` (Python 3.11):
    /// large and negative integers, a long string, nested and short tuples, the empty tuple.
    #[test]
    fn sha256_pickle_matches_cpython() {
        let a = Algo::Sha256;
        let mut s = Vec::new();
        let root = none_hash(a, DEFAULT_NONE_HASH_SEED);
        let h = hash_block_tokens(a, &mut s, &root, &[1, 2, 3, 4], None);
        let t = [5, 300, 70000, (1 << 31) + 5, u32::MAX];
        let keys = [ExtraKey::Text("sql-lora".into())];
        let got = hash_block_tokens(a, &mut s, &h, &t, Some(&keys));
        assert_eq!(
            hex(&s),
            "8005954e00000000000000432052a7f141c60918f65779927090482b5a24adbe68c8613a211a1eb4e3edd9361a94284b054d2c014a701101008a0505000080008a05ffffffff0074948c0873716c2d6c6f726194859487942e"
        );
        assert_eq!(
            hex(&got),
            "25140aacd1a884e66fa6e90220ab0db470989bdac12fbb7cab0ac7c1e441c250"
        );
        let keys = [
            ExtraKey::Text("a".repeat(300)),
            ExtraKey::Int(-5),
            ExtraKey::Int(-70000),
            ExtraKey::Tuple(vec![ExtraKey::Text("mm".into()), ExtraKey::Int(3)]),
        ];
        let got = hash_block_tokens(a, &mut s, &h, &[7], Some(&keys));
        assert_eq!(
            hex(&got),
            "6490ec3326f0cbc664a2abe9c5b0c23dd023a58e4bd9315faef51a88aae0a8e2"
        );
        hash_block_tokens(a, &mut s, &h, &[], None);
        assert_eq!(
            hex(&s),
            "8005952800000000000000432052a7f141c60918f65779927090482b5a24adbe68c8613a211a1eb4e3edd9361a94294e87942e"
        );
    }

    #[test]
    fn lora_shortcut_equals_the_general_form() {
        for a in [Algo::Sha256, Algo::Sha256Cbor] {
            let mut s = Vec::new();
            let p = none_hash(a, DEFAULT_NONE_HASH_SEED);
            let x = hash_block_tokens_lora(a, &mut s, &p, &[1, 2, 300], Some(("x", "/p")));
            let keys = lora_extra_keys("x", "/p");
            assert_eq!(
                x,
                hash_block_tokens(a, &mut s, &p, &[1, 2, 300], Some(&keys))
            );
            let none = hash_block_tokens_lora(a, &mut s, &p, &[1, 2, 300], None);
            assert_eq!(none, hash_block_tokens(a, &mut s, &p, &[1, 2, 300], None));
            assert_ne!(x, none);
        }
    }
}
