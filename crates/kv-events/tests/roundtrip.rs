//! Random batches round-trip through encode/decode in both shapes; malformed input gets a
//! typed error that names what was wrong and where.

use kv_events::msgpack::write;
use kv_events::{
    decode, encode, BlockHash, BlockRemoved, BlockStored, ByteHash, DecodeErrorKind, Event,
    EventBatch, Medium, WireFormat,
};
use proptest::prelude::*;

fn hash() -> impl Strategy<Value = BlockHash> {
    prop_oneof![
        any::<u64>().prop_map(BlockHash::Uint),
        (i64::MIN..0).prop_map(BlockHash::Int),
        proptest::collection::vec(any::<u8>(), 0..=32)
            .prop_map(|b| BlockHash::Bytes(ByteHash::new(&b).expect("<= 32"))),
    ]
}

fn medium() -> impl Strategy<Value = Medium> {
    prop_oneof![
        Just(Medium::Gpu),
        Just(Medium::Cpu),
        Just(Medium::Storage),
        Just(Medium::CpuPinned),
        Just(Medium::Disk),
        Just(Medium::External),
        "[a-z]{1,40}".prop_map(|s| Medium::Other(s.into())),
    ]
}

fn raw_msgpack() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(proptest::option::of("[a-z0-9-]{0,12}"), 0..4).prop_map(|keys| {
        let mut out = Vec::new();
        write::array_len(&mut out, keys.len(), false);
        for k in keys {
            match k {
                None => write::nil(&mut out),
                Some(s) => {
                    write::array_len(&mut out, 1, false);
                    write::str(&mut out, &s);
                }
            }
        }
        out
    })
}

fn opt_str() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("\\PC{0,40}")
}

fn stored() -> impl Strategy<Value = Event> {
    (
        (
            proptest::collection::vec(hash(), 0..6),
            proptest::option::of(hash()),
            proptest::collection::vec(any::<u32>(), 0..40),
            any::<u32>(),
            proptest::option::of(any::<i64>()),
            proptest::option::of(medium()),
            opt_str(),
            proptest::option::of(raw_msgpack()),
        ),
        (
            proptest::option::of(any::<u32>()),
            opt_str(),
            proptest::option::of(any::<u32>()),
            opt_str(),
            opt_str(),
            opt_str(),
            proptest::option::of(proptest::collection::vec(any::<u32>(), 0..8)),
        ),
    )
        .prop_map(|(a, b)| {
            Event::BlockStored(BlockStored {
                block_hashes: a.0,
                parent_block_hash: a.1,
                token_ids: a.2,
                block_size: a.3,
                lora_id: a.4,
                medium: a.5,
                lora_name: a.6,
                extra_keys: a.7,
                group_idx: b.0,
                kv_cache_spec_kind: b.1,
                kv_cache_spec_sliding_window: b.2,
                locality: b.3,
                ownership: b.4,
                session_id: b.5,
                lookahead_token_ids: b.6,
            })
        })
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => stored(),
        2 => (
            proptest::collection::vec(hash(), 0..4),
            proptest::option::of(medium()),
            proptest::option::of(any::<u32>()),
            opt_str(),
            opt_str(),
        )
            .prop_map(|(h, m, g, l, o)| Event::BlockRemoved(BlockRemoved {
                block_hashes: h,
                medium: m,
                group_idx: g,
                locality: l,
                ownership: o,
            })),
        1 => Just(Event::AllBlocksCleared),
    ]
}

fn batch() -> impl Strategy<Value = EventBatch> {
    (
        any::<f64>().prop_filter("NaN never equals itself", |f| !f.is_nan()),
        proptest::collection::vec(event(), 0..20),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(ts, events, data_parallel_rank)| EventBatch {
            ts,
            events,
            data_parallel_rank,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn round_trips_in_map_shape(b in batch()) {
        let bytes = encode(&b, &WireFormat::VLLM_0_33);
        prop_assert_eq!(decode(&bytes), Ok(b));
    }

    #[test]
    fn round_trips_in_array_shape(b in batch()) {
        let bytes = encode(&b, &WireFormat::ARRAY_ALL_FIELDS);
        prop_assert_eq!(decode(&bytes), Ok(b));
    }

    /// Any prefix of a valid payload is an error, never a panic or a wrong batch.
    #[test]
    fn truncated_payloads_are_errors(b in batch(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&b, &WireFormat::VLLM_0_33);
        let at = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..at]).is_err());
    }
}

/// Builds a batch payload whose single event is `event` (already msgpack).
fn one_event_batch(event: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write::array_len(&mut out, 3, false);
    write::f64(&mut out, 1.0);
    write::array_len(&mut out, 1, false);
    out.extend_from_slice(event);
    write::uint(&mut out, 0);
    out
}

#[test]
fn unknown_event_type_is_named() {
    let mut ev = Vec::new();
    write::map_len(&mut ev, 1, false);
    write::str(&mut ev, "type");
    write::str(&mut ev, "BlockTeleported");
    let err = decode(&one_event_batch(&ev)).unwrap_err();
    assert_eq!(
        err.kind,
        DecodeErrorKind::UnknownEventType("BlockTeleported".into())
    );
    assert_eq!(err.event, Some(0));
    assert!(err.to_string().contains("BlockTeleported"), "{err}");
}

#[test]
fn wrong_field_type_names_event_and_field() {
    let mut ev = Vec::new();
    write::map_len(&mut ev, 4, false);
    write::str(&mut ev, "type");
    write::str(&mut ev, "BlockStored");
    write::str(&mut ev, "block_hashes");
    write::array_len(&mut ev, 0, false);
    write::str(&mut ev, "token_ids");
    write::array_len(&mut ev, 1, false);
    write::str(&mut ev, "seven");
    write::str(&mut ev, "block_size");
    write::uint(&mut ev, 4);
    let err = decode(&one_event_batch(&ev)).unwrap_err();
    assert_eq!(err.field, Some("token_ids"));
    assert_eq!(err.event_type, Some("BlockStored"));
    let msg = err.to_string();
    assert!(
        msg.contains("event 0 (BlockStored), field `token_ids`: expected unsigned int, found str"),
        "{msg}"
    );
}

#[test]
fn negative_token_id_is_out_of_range() {
    let mut ev = Vec::new();
    write::array_len(&mut ev, 5, false);
    write::str(&mut ev, "BlockStored");
    write::array_len(&mut ev, 0, false);
    write::nil(&mut ev);
    write::array_len(&mut ev, 1, false);
    write::int(&mut ev, -5);
    write::uint(&mut ev, 1);
    let err = decode(&one_event_batch(&ev)).unwrap_err();
    assert_eq!(err.field, Some("token_ids"));
    assert!(err.to_string().contains("-5 out of range"), "{err}");
}

#[test]
fn missing_required_field_is_named() {
    let mut ev = Vec::new();
    write::map_len(&mut ev, 2, false);
    write::str(&mut ev, "type");
    write::str(&mut ev, "BlockStored");
    write::str(&mut ev, "block_hashes");
    write::array_len(&mut ev, 0, false);
    let err = decode(&one_event_batch(&ev)).unwrap_err();
    assert_eq!(err.kind, DecodeErrorKind::MissingField("token_ids"));
}

#[test]
fn tag_anywhere_in_map_unknown_keys_and_extra_batch_elements_are_accepted() {
    let mut ev = Vec::new();
    write::map_len(&mut ev, 4, false);
    write::str(&mut ev, "future_field");
    write::map_len(&mut ev, 1, false);
    write::str(&mut ev, "nested");
    write::array_len(&mut ev, 2, false);
    write::f64(&mut ev, 0.5);
    write::bin(&mut ev, b"xy");
    write::str(&mut ev, "block_hashes");
    write::array_len(&mut ev, 1, false);
    write::uint(&mut ev, 9);
    write::str(&mut ev, "type");
    write::str(&mut ev, "BlockRemoved");
    write::str(&mut ev, "medium");
    write::str(&mut ev, "CPU");
    // A 4-element batch (`publisher_id`), with an empty idle batch after it in the stream.
    let mut out = Vec::new();
    write::array_len(&mut out, 4, false);
    write::f64(&mut out, 2.0);
    write::array_len(&mut out, 1, false);
    out.extend_from_slice(&ev);
    write::nil(&mut out);
    write::str(&mut out, "publisher-7");
    let b = decode(&out).expect("decodes");
    assert_eq!(b.data_parallel_rank, None);
    assert_eq!(
        b.events,
        vec![Event::BlockRemoved(BlockRemoved {
            block_hashes: vec![BlockHash::Uint(9)],
            medium: Some(Medium::Cpu),
            ..Default::default()
        })]
    );

    let mut idle = Vec::new();
    write::array_len(&mut idle, 4, false);
    write::f64(&mut idle, 3.0);
    write::array_len(&mut idle, 0, false);
    write::uint(&mut idle, 1);
    write::uint(&mut idle, 42);
    let b = decode(&idle).expect("empty batch");
    assert!(b.events.is_empty());
    assert_eq!(b.data_parallel_rank, Some(1));
}

#[test]
fn huge_headers_fail_fast() {
    // An events array that claims 2^32-1 elements in a 20-byte payload.
    let mut out = Vec::new();
    write::array_len(&mut out, 3, false);
    write::f64(&mut out, 1.0);
    out.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
    let err = decode(&out).unwrap_err();
    assert_eq!(err.field, Some("events"));
    assert!(matches!(err.kind, DecodeErrorKind::Msgpack(_)), "{err}");
}

#[test]
fn trailing_bytes_and_short_batches_are_errors() {
    let mut out = encode(&EventBatch::default(), &WireFormat::VLLM_0_33);
    out.push(0xc0);
    assert_eq!(
        decode(&out).unwrap_err().kind,
        DecodeErrorKind::TrailingBytes(1)
    );
    assert_eq!(
        decode(&[0x91, 0x00]).unwrap_err().kind,
        DecodeErrorKind::ShortBatch(1)
    );
    let long_hash = {
        let mut ev = Vec::new();
        write::array_len(&mut ev, 2, false);
        write::str(&mut ev, "BlockRemoved");
        write::array_len(&mut ev, 1, false);
        write::bin(&mut ev, &[7u8; 33]);
        ev
    };
    assert_eq!(
        decode(&one_event_batch(&long_hash)).unwrap_err().kind,
        DecodeErrorKind::HashTooLong(33)
    );
}

/// Keys, tags and media are compared as bytes; one that matches nothing must still be UTF-8
/// (msgpack strings are), wherever it stands.
#[test]
fn invalid_utf8_in_a_key_a_tag_or_a_medium_is_an_error() {
    let bad: &[u8] = &[0xa2, 0xff, 0xfe]; // a 2-byte str that is not UTF-8
    let removed = |key_first: bool, tag: &[u8], medium: &[u8], extra_key: Option<&[u8]>| {
        let mut ev = Vec::new();
        write::map_len(&mut ev, 3 + usize::from(extra_key.is_some()), false);
        let tag_entry = |ev: &mut Vec<u8>| {
            write::str(ev, "type");
            ev.extend_from_slice(tag);
        };
        if !key_first {
            tag_entry(&mut ev);
        }
        if let Some(k) = extra_key {
            ev.extend_from_slice(k);
            write::uint(&mut ev, 1);
        }
        if key_first {
            tag_entry(&mut ev);
        }
        write::str(&mut ev, "block_hashes");
        write::array_len(&mut ev, 1, false);
        write::uint(&mut ev, 9);
        write::str(&mut ev, "medium");
        ev.extend_from_slice(medium);
        decode(&one_event_batch(&ev))
    };
    let mut tag = Vec::new();
    write::str(&mut tag, "BlockRemoved");
    let mut gpu = Vec::new();
    write::str(&mut gpu, "GPU");
    let utf8 = DecodeErrorKind::Msgpack(kv_events::msgpack::ReadError::Utf8);
    for key_first in [false, true] {
        assert!(removed(key_first, &tag, &gpu, None).is_ok());
        assert_eq!(
            removed(key_first, &tag, &gpu, Some(bad)).unwrap_err().kind,
            utf8,
            "an unknown key, tag first: {}",
            !key_first
        );
        assert_eq!(removed(key_first, bad, &gpu, None).unwrap_err().kind, utf8);
        assert_eq!(removed(key_first, &tag, bad, None).unwrap_err().kind, utf8);
    }
}
