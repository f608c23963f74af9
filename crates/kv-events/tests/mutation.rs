//! Structure-aware mutation of real captures of vLLM's publisher
//! (../shared/testdata/vllm-kv-events, every version): each live message's payload is parsed
//! into a MessagePack tree, mutated where it matters (a field's value flipped, a value's type
//! swapped, an array, map, string or hash resized, an element dropped or repeated, a length
//! header that lies, the encoding widened, the bytes truncated or flipped), re-encoded and
//! decoded; its frames are mutated too (seq flipped or resized, frames dropped or added).
//! Whatever the mutation, `decode` returns an error or a valid batch and never panics; a
//! mutation whose effect is known decodes to exactly what it should (or is refused).
//!
//! The tree parser and encoder here are the test's own, independent of the decoder's reader.

use kv_events::{
    decode, encode, parse_live, BlockHash, ByteHash, Event, EventBatch, FrameError, LiveMessage,
    WireFormat,
};
use proptest::prelude::*;
use proptest::sample::Index;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A MessagePack value, as the captures use them (no ext types).
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Nil,
    Bool(bool),
    UInt(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(Vec<u8>),
    Bin(Vec<u8>),
    Array(Vec<Val>),
    Map(Vec<(Val, Val)>),
}

fn take<'a>(b: &'a [u8], pos: &mut usize, n: usize) -> &'a [u8] {
    let s = &b[*pos..*pos + n];
    *pos += n;
    s
}

fn be(b: &[u8], pos: &mut usize, n: usize) -> u64 {
    take(b, pos, n)
        .iter()
        .fold(0u64, |v, x| (v << 8) | u64::from(*x))
}

/// Parses one value of a capture (valid MessagePack: indexing may panic only on a bad capture).
fn parse(b: &[u8], pos: &mut usize) -> Val {
    let m = b[*pos];
    *pos += 1;
    let array =
        |n: usize, b: &[u8], pos: &mut usize| Val::Array((0..n).map(|_| parse(b, pos)).collect());
    let map = |n: usize, b: &[u8], pos: &mut usize| {
        Val::Map((0..n).map(|_| (parse(b, pos), parse(b, pos))).collect())
    };
    match m {
        0x00..=0x7f => Val::UInt(u64::from(m)),
        0x80..=0x8f => map(usize::from(m & 0x0f), b, pos),
        0x90..=0x9f => array(usize::from(m & 0x0f), b, pos),
        0xa0..=0xbf => Val::Str(take(b, pos, usize::from(m & 0x1f)).to_vec()),
        0xc0 => Val::Nil,
        0xc2 => Val::Bool(false),
        0xc3 => Val::Bool(true),
        0xc4..=0xc6 => {
            let n = be(b, pos, 1 << (m - 0xc4)) as usize;
            Val::Bin(take(b, pos, n).to_vec())
        }
        0xca => Val::F32(f32::from_bits(be(b, pos, 4) as u32)),
        0xcb => Val::F64(f64::from_bits(be(b, pos, 8))),
        0xcc..=0xcf => Val::UInt(be(b, pos, 1 << (m - 0xcc))),
        0xd0..=0xd3 => {
            let n = 1usize << (m - 0xd0);
            let v = be(b, pos, n);
            let shift = 64 - 8 * n as u32;
            Val::Int(((v << shift) as i64) >> shift)
        }
        0xd9..=0xdb => {
            let n = be(b, pos, 1 << (m - 0xd9)) as usize;
            Val::Str(take(b, pos, n).to_vec())
        }
        0xdc | 0xdd => {
            let n = be(b, pos, 2 << (m - 0xdc)) as usize;
            array(n, b, pos)
        }
        0xde | 0xdf => {
            let n = be(b, pos, 2 << (m - 0xde)) as usize;
            map(n, b, pos)
        }
        0xe0..=0xff => Val::Int(i64::from(m as i8)),
        other => panic!("marker {other:#x} not expected in a capture"),
    }
}

/// A header of a `len`-long string, bin, array or map: `fix` (with its capacity) or the 8, 16
/// and 32-bit forms (`None` where the type has none). `wide`: always the 32-bit form.
fn header(out: &mut Vec<u8>, len: usize, wide: bool, fix: Option<(u8, usize)>, m: [Option<u8>; 3]) {
    let len32 = u32::try_from(len).expect("test sizes");
    if !wide {
        if let Some((f, cap)) = fix {
            if len <= cap {
                out.push(f | len as u8);
                return;
            }
        }
        if let (Some(m8), Ok(l)) = (m[0], u8::try_from(len)) {
            out.extend([m8, l]);
            return;
        }
        if let (Some(m16), Ok(l)) = (m[1], u16::try_from(len)) {
            out.push(m16);
            out.extend(l.to_be_bytes());
            return;
        }
    }
    out.push(m[2].expect("32-bit form"));
    out.extend(len32.to_be_bytes());
}

/// How to encode: `wide` writes every int and header in its widest form (valid MessagePack
/// that msgspec reads as the same values); `lie` writes the header of the array or map at a
/// path with its length changed by a delta, its contents unchanged.
#[derive(Default, Clone)]
struct Enc {
    wide: bool,
    lie: Option<(Vec<usize>, i64)>,
}

fn encode_val(v: &Val, e: &Enc, path: &mut Vec<usize>, out: &mut Vec<u8>) {
    let count = |n: usize, path: &Vec<usize>| match &e.lie {
        Some((p, d)) if p == path => (n as i64 + d).max(0) as usize,
        _ => n,
    };
    match v {
        Val::Nil => out.push(0xc0),
        Val::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Val::UInt(u) => {
            if e.wide {
                out.push(0xcf);
                out.extend(u.to_be_bytes());
            } else if *u < 0x80 {
                out.push(*u as u8);
            } else if let Ok(x) = u8::try_from(*u) {
                out.extend([0xcc, x]);
            } else if let Ok(x) = u16::try_from(*u) {
                out.push(0xcd);
                out.extend(x.to_be_bytes());
            } else if let Ok(x) = u32::try_from(*u) {
                out.push(0xce);
                out.extend(x.to_be_bytes());
            } else {
                out.push(0xcf);
                out.extend(u.to_be_bytes());
            }
        }
        Val::Int(i) if *i >= 0 => encode_val(&Val::UInt(*i as u64), e, path, out),
        Val::Int(i) => {
            if e.wide {
                out.push(0xd3);
                out.extend(i.to_be_bytes());
            } else if *i >= -32 {
                out.push(*i as i8 as u8);
            } else if let Ok(x) = i8::try_from(*i) {
                out.extend([0xd0, x as u8]);
            } else if let Ok(x) = i16::try_from(*i) {
                out.push(0xd1);
                out.extend(x.to_be_bytes());
            } else if let Ok(x) = i32::try_from(*i) {
                out.push(0xd2);
                out.extend(x.to_be_bytes());
            } else {
                out.push(0xd3);
                out.extend(i.to_be_bytes());
            }
        }
        Val::F32(f) => {
            out.push(0xca);
            out.extend(f.to_bits().to_be_bytes());
        }
        Val::F64(f) => {
            out.push(0xcb);
            out.extend(f.to_bits().to_be_bytes());
        }
        Val::Str(s) => {
            header(
                out,
                s.len(),
                e.wide,
                Some((0xa0, 31)),
                [Some(0xd9), Some(0xda), Some(0xdb)],
            );
            out.extend(s);
        }
        Val::Bin(b) => {
            header(
                out,
                b.len(),
                e.wide,
                None,
                [Some(0xc4), Some(0xc5), Some(0xc6)],
            );
            out.extend(b);
        }
        Val::Array(a) => {
            header(
                out,
                count(a.len(), path),
                e.wide,
                Some((0x90, 15)),
                [None, Some(0xdc), Some(0xdd)],
            );
            for (i, x) in a.iter().enumerate() {
                path.push(i);
                encode_val(x, e, path, out);
                path.pop();
            }
        }
        Val::Map(m) => {
            header(
                out,
                count(m.len(), path),
                e.wide,
                Some((0x80, 15)),
                [None, Some(0xde), Some(0xdf)],
            );
            for (i, (k, x)) in m.iter().enumerate() {
                path.push(2 * i);
                encode_val(k, e, path, out);
                path.pop();
                path.push(2 * i + 1);
                encode_val(x, e, path, out);
                path.pop();
            }
        }
    }
}

fn to_bytes(v: &Val, e: &Enc) -> Vec<u8> {
    let mut out = Vec::new();
    encode_val(v, e, &mut Vec::new(), &mut out);
    out
}

/// Every node's path: array elements by index, map keys at `2i` and values at `2i + 1`.
fn paths(v: &Val, path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    out.push(path.clone());
    match v {
        Val::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(i);
                paths(x, path, out);
                path.pop();
            }
        }
        Val::Map(m) => {
            for (i, (k, x)) in m.iter().enumerate() {
                for (j, y) in [(2 * i, k), (2 * i + 1, x)] {
                    path.push(j);
                    paths(y, path, out);
                    path.pop();
                }
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(v: &'a mut Val, path: &[usize]) -> &'a mut Val {
    path.iter().fold(v, |v, &i| match v {
        Val::Array(a) => &mut a[i],
        Val::Map(m) => {
            let (k, x) = &mut m[i / 2];
            if i % 2 == 0 {
                k
            } else {
                x
            }
        }
        _ => unreachable!("paths lead through containers"),
    })
}

/// A field of an event node: by key in a map event, by position in a tag-first array event.
fn field_mut<'a>(ev: &'a mut Val, name: &str) -> Option<&'a mut Val> {
    match ev {
        Val::Map(m) => m
            .iter_mut()
            .find(|(k, _)| *k == Val::Str(name.as_bytes().to_vec()))
            .map(|(_, v)| v),
        Val::Array(a) => a.get_mut(match name {
            "block_hashes" => 1,
            "token_ids" => 3,
            "extra_keys" => 8,
            _ => return None,
        }),
        _ => None,
    }
}

fn event_mut(root: &mut Val, i: usize) -> &mut Val {
    node_mut(root, &[1, i])
}

/// `batch` as the widest encoding of `tree` decodes: the same values, but `extra_keys` (kept
/// as raw MessagePack) in its widened bytes.
fn widened(tree: &Val, batch: &EventBatch) -> EventBatch {
    let mut want = batch.clone();
    let mut tree = tree.clone();
    for (i, e) in want.events.iter_mut().enumerate() {
        if let Event::BlockStored(s) = e {
            let v = field_mut(event_mut(&mut tree, i), "extra_keys");
            if let (Some(raw), Some(v)) = (&mut s.extra_keys, v) {
                *raw = to_bytes(
                    v,
                    &Enc {
                        wide: true,
                        lie: None,
                    },
                );
            }
        }
    }
    want
}

struct Message {
    name: String,
    frames: Vec<Vec<u8>>,
    tree: Val,
    batch: EventBatch,
}

fn testdata() -> PathBuf {
    test_support::vllm_captures()
}

/// Every live message of every capture, its payload parsed and decoded.
fn corpus() -> &'static [Message] {
    static CORPUS: OnceLock<Vec<Message>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut files: Vec<PathBuf> = std::fs::read_dir(testdata())
            .unwrap_or_else(|e| panic!("{}: {e} (set KVSYNC_SHARED_DIR)", testdata().display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut out = Vec::new();
        for f in files {
            let doc: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&f).expect("read")).expect("JSON");
            for (i, msg) in doc["live"].as_array().expect("live").iter().enumerate() {
                let frames: Vec<Vec<u8>> = msg["frames_hex"]
                    .as_array()
                    .expect("frames_hex")
                    .iter()
                    .map(|h| hex::decode(h.as_str().expect("hex")).expect("hex"))
                    .collect();
                let payload = &frames[2];
                let mut pos = 0;
                let tree = parse(payload, &mut pos);
                assert_eq!(pos, payload.len());
                let batch = decode(payload).expect("a capture decodes");
                // msgspec writes some headers wider than needed (a struct's map as map16): the
                // test's minimal encoding differs in bytes, never in what it decodes to.
                let plain = to_bytes(&tree, &Enc::default());
                assert_eq!(decode(&plain).as_ref(), Ok(&batch), "the test's encoder");
                let name = format!(
                    "{} live[{i}]",
                    f.file_name().expect("name").to_string_lossy()
                );
                out.push(Message {
                    name,
                    frames,
                    tree,
                    batch,
                });
            }
        }
        assert!(out.len() >= 30, "captures found: {}", out.len());
        out
    })
}

/// Values of every MessagePack type, to swap a node's type with.
fn sample(i: u64) -> Val {
    let all = [
        Val::Nil,
        Val::Bool(true),
        Val::UInt(0),
        Val::UInt(u64::MAX),
        Val::UInt(1 << 40),
        Val::Int(-1),
        Val::Int(i64::MIN),
        Val::F32(0.5),
        Val::F64(f64::NAN),
        Val::F64(-1e300),
        Val::Str(b"BlockStored".to_vec()),
        Val::Str(b"type".to_vec()),
        Val::Str(vec![0xff, 0xfe]),
        Val::Str(vec![b'x'; 300]),
        Val::Bin(vec![7; 40]),
        Val::Bin(Vec::new()),
        Val::Array(Vec::new()),
        Val::Array(vec![Val::UInt(1), Val::Nil]),
        Val::Map(Vec::new()),
        Val::Map(vec![(
            Val::Str(b"type".to_vec()),
            Val::Str(b"BlockRemoved".to_vec()),
        )]),
    ];
    all[(i % all.len() as u64) as usize].clone()
}

/// What a mutated payload must decode to.
#[derive(Debug)]
enum Expect {
    /// Exactly this batch.
    Batch(EventBatch),
    /// An error.
    Error,
    /// An error or a valid batch.
    Any,
}

/// A decoded batch is valid when it encodes in vLLM 0.33's shape and in the all-fields array
/// shape to bytes that decode to the same batch (its hashes, strings and ints are
/// representable; a NaN `ts` never equals itself and is compared by bits).
fn assert_valid(b: &EventBatch, what: &str) {
    for format in [WireFormat::VLLM_0_33, WireFormat::ARRAY_ALL_FIELDS] {
        let again = decode(&encode(b, &format))
            .unwrap_or_else(|e| panic!("{what}: a decoded batch re-encodes to an error: {e}"));
        assert_eq!(again.ts.to_bits(), b.ts.to_bits(), "{what}");
        assert_eq!(again.events, b.events, "{what}");
        assert_eq!(again.data_parallel_rank, b.data_parallel_rank, "{what}");
    }
}

/// Applies mutation `kind` (parameters `at`, `a`, `b`) to message `m`; returns the payload
/// and what it must decode to.
fn mutate(m: &Message, kind: u8, at: Index, a: u64, b: u64) -> (Vec<u8>, Expect) {
    let mut tree = m.tree.clone();
    let mut want = m.batch.clone();
    let mut all = Vec::new();
    paths(&tree, &mut Vec::new(), &mut all);
    let path = at.get(&all).clone();
    let events = want.events.len();
    let plain = Enc::default();
    match kind {
        // Known effects.
        0 => {
            // Every int and header in its widest form: the same values.
            let wide = Enc {
                wide: true,
                lie: None,
            };
            return (to_bytes(&tree, &wide), Expect::Batch(widened(&tree, &want)));
        }
        1 => {
            // Another timestamp.
            let ts = f64::from_bits(a);
            let ts = if ts.is_nan() { a as f64 } else { ts };
            *node_mut(&mut tree, &[0]) = Val::F64(ts);
            want.ts = ts;
        }
        2 | 3 => {
            // A token id flipped to another u32 (2) or pushed out of range (3).
            let Some(i) = (0..events).map(|k| (k + a as usize) % events).find(
                |&k| matches!(&want.events[k], Event::BlockStored(s) if !s.token_ids.is_empty()),
            ) else {
                return (to_bytes(&tree, &plain), Expect::Batch(want));
            };
            let Event::BlockStored(s) = &mut want.events[i] else {
                unreachable!()
            };
            let j = (b as usize) % s.token_ids.len();
            let Some(Val::Array(tokens)) = field_mut(event_mut(&mut tree, i), "token_ids") else {
                panic!("{}: event {i} has token_ids", m.name);
            };
            if kind == 2 {
                s.token_ids[j] = a as u32;
                tokens[j] = Val::UInt(u64::from(a as u32));
            } else {
                tokens[j] = if a % 2 == 0 {
                    Val::UInt(u64::from(u32::MAX) + 1 + (b >> 1))
                } else {
                    Val::Int(-1 - (b >> 2) as i64)
                };
                return (to_bytes(&tree, &plain), Expect::Error);
            }
        }
        4 | 5 => {
            // A block hash flipped to another (4) or resized past 32 bytes (5).
            let Some(i) = (0..events).map(|k| (k + a as usize) % events).find(|&k| {
                matches!(&want.events[k],
                    Event::BlockStored(s) if !s.block_hashes.is_empty())
                    || matches!(&want.events[k],
                    Event::BlockRemoved(r) if !r.block_hashes.is_empty())
            }) else {
                return (to_bytes(&tree, &plain), Expect::Batch(want));
            };
            let hashes = match &mut want.events[i] {
                Event::BlockStored(s) => &mut s.block_hashes,
                Event::BlockRemoved(r) => &mut r.block_hashes,
                Event::AllBlocksCleared => unreachable!(),
            };
            let j = (b as usize) % hashes.len();
            let Some(Val::Array(vals)) = field_mut(event_mut(&mut tree, i), "block_hashes") else {
                panic!("{}: event {i} has block_hashes", m.name);
            };
            let bytes: Vec<u8> = a
                .to_be_bytes()
                .iter()
                .cycle()
                .take((b % 65) as usize)
                .copied()
                .collect();
            if kind == 5 {
                vals[j] = Val::Bin(vec![0xab; 33 + (b % 64) as usize]);
                return (to_bytes(&tree, &plain), Expect::Error);
            }
            match hashes[j] {
                BlockHash::Bytes(_) if bytes.len() <= ByteHash::MAX_LEN => {
                    vals[j] = Val::Bin(bytes.clone());
                    hashes[j] = BlockHash::Bytes(ByteHash::new(&bytes).expect("<= 32"));
                }
                _ if (a as i64) < 0 && b % 2 == 0 => {
                    vals[j] = Val::Int(a as i64);
                    hashes[j] = BlockHash::Int(a as i64);
                }
                _ => {
                    vals[j] = Val::UInt(a);
                    hashes[j] = BlockHash::Uint(a);
                }
            }
        }
        6 => {
            // Map events: an unknown key added, and the keys in reverse order.
            for i in 0..events {
                if let Val::Map(fields) = event_mut(&mut tree, i) {
                    fields.push((Val::Str(format!("zz_new_{a}").into_bytes()), sample(b)));
                    fields.reverse();
                }
            }
        }
        7 => {
            // Trailing batch elements of a newer publisher are ignored (when the batch already
            // has its data_parallel_rank slot).
            if let Val::Array(root) = &mut tree {
                if root.len() >= 3 {
                    root.push(sample(a));
                }
            }
        }
        8 => {
            // A strict prefix.
            let bytes = to_bytes(&tree, &plain);
            let cut = (a as usize) % bytes.len();
            return (bytes[..cut].to_vec(), Expect::Error);
        }
        // Unknown effects: an error or a valid batch.
        9 => *node_mut(&mut tree, &path) = sample(a),
        10 | 11 => {
            // An element or a map entry dropped (10) or repeated (11).
            if let Some((&i, parent)) = path.split_last() {
                match node_mut(&mut tree, parent) {
                    Val::Array(v) if kind == 10 => {
                        v.remove(i);
                    }
                    Val::Array(v) => v.insert(i, v[i].clone()),
                    Val::Map(v) if kind == 10 => {
                        v.remove(i / 2);
                    }
                    Val::Map(v) => v.insert(i / 2, v[i / 2].clone()),
                    _ => unreachable!(),
                }
            }
        }
        12 => {
            // A string or bin resized, an int flipped.
            match node_mut(&mut tree, &path) {
                Val::Str(s) | Val::Bin(s) => s.resize((a % 70) as usize, b as u8),
                Val::UInt(u) => *u ^= a,
                Val::Int(i) => *i ^= a as i64,
                Val::Array(v) => v.truncate((a % 4) as usize),
                _ => {}
            }
        }
        13 => {
            // An array or map header that lies about its length.
            let delta = (a % 7) as i64 - 3;
            let lie = Enc {
                wide: b % 2 == 0,
                lie: Some((path, delta)),
            };
            return (to_bytes(&tree, &lie), Expect::Any);
        }
        _ => {
            // A byte flipped.
            let mut bytes = to_bytes(&tree, &plain);
            let i = (a as usize) % bytes.len();
            bytes[i] ^= (b as u8).max(1);
            return (bytes, Expect::Any);
        }
    }
    let expect = if kind <= 7 {
        Expect::Batch(want)
    } else {
        Expect::Any
    };
    (to_bytes(&tree, &plain), expect)
}

const KINDS: u8 = 15;

/// The capture's bytes themselves: every strict prefix is an error, the widest encoding of the
/// same values decodes to the same batch.
#[test]
fn every_prefix_of_every_capture_is_an_error_and_wide_ints_decode_the_same() {
    for m in corpus() {
        let payload = &m.frames[2];
        for cut in 0..payload.len() {
            assert!(decode(&payload[..cut]).is_err(), "{} cut at {cut}", m.name);
        }
        let wide = to_bytes(
            &m.tree,
            &Enc {
                wide: true,
                lie: None,
            },
        );
        assert_eq!(decode(&wide), Ok(widened(&m.tree, &m.batch)), "{}", m.name);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// A mutated capture payload decodes to what it should, or to an error, or (when the
    /// mutation's effect is unknown) to a valid batch; never a panic.
    #[test]
    fn mutated_captures_decode_as_they_should(
        msg in any::<Index>(),
        kind in 0..KINDS,
        at in any::<Index>(),
        a in any::<u64>(),
        b in any::<u64>(),
    ) {
        let m = msg.get(corpus());
        let (payload, expect) = mutate(m, kind, at, a, b);
        let what = format!("{} mutation {kind}", m.name);
        let got = decode(&payload);
        match (&expect, &got) {
            (Expect::Batch(want), Ok(b)) => prop_assert_eq!(b, want, "{}", what),
            (Expect::Batch(_), Err(e)) => prop_assert!(false, "{}: {}", what, e),
            (Expect::Error, Ok(b)) => prop_assert!(false, "{}: decoded {:?}", what, b),
            (Expect::Error, Err(_)) | (Expect::Any, Err(_)) => {}
            (Expect::Any, Ok(b)) => assert_valid(b, &what),
        }
    }

    /// Frames of a capture with the seq flipped, the seq frame resized, or frames dropped or
    /// added: parsed to exactly that seq, or the error that names what is wrong.
    #[test]
    fn mutated_capture_frames_parse_as_they_should(
        msg in any::<Index>(),
        kind in 0..3u8,
        seq in prop_oneof![any::<u64>(), Just(u64::MAX), Just(u64::MAX - 1)],
        len in 0..16usize,
        n in 0..6usize,
    ) {
        let m = msg.get(corpus());
        let mut frames = m.frames.clone();
        match kind {
            0 => {
                frames[1] = seq.to_be_bytes().to_vec();
                let got = parse_live(&frames);
                if seq == u64::MAX {
                    prop_assert_eq!(got, Err(FrameError::ReservedSeq));
                } else {
                    prop_assert_eq!(got, Ok(LiveMessage { topic: &frames[0], seq, payload: &frames[2] }));
                }
            }
            1 => {
                frames[1].resize(len, 0xff);
                let got = parse_live(&frames);
                if len == 8 {
                    let seq = u64::from_be_bytes(m.frames[1].as_slice().try_into().expect("8"));
                    prop_assert_eq!(got.map(|l| l.seq), Ok(seq));
                } else {
                    prop_assert_eq!(got, Err(FrameError::SeqLength(len)));
                }
            }
            _ => {
                frames.resize(n, b"extra".to_vec());
                let got = parse_live(&frames);
                if n == 3 {
                    prop_assert!(got.is_ok());
                } else {
                    let is_count = matches!(got, Err(FrameError::FrameCount { got, .. }) if got == n);
                    prop_assert!(is_count, "{:?}", got);
                }
            }
        }
    }
}
