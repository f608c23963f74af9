//! Fuzzes `decode` and the frame parsers: no panic, no unbounded allocation (run with
//! `-malloc_limit_mb`), and whatever decodes re-encodes to something that decodes the same.
#![no_main]

use kv_events::{decode, encode, parse_live, parse_replay, WireFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode(data) {
        if !batch.ts.is_nan() {
            for format in [WireFormat::VLLM_0_33, WireFormat::ARRAY_ALL_FIELDS] {
                let again = encode(&batch, &format);
                assert_eq!(decode(&again).as_ref(), Ok(&batch));
            }
        }
    }
    // The same bytes split into frames at the first two 0xff bytes.
    let mut parts = data.splitn(4, |b| *b == 0xff);
    let frames: Vec<&[u8]> = parts.by_ref().collect();
    let _ = parse_live(&frames);
    let _ = parse_replay(&frames);
});
