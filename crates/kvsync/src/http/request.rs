//! The body of `POST /v1/route`, read fast.
//!
//! A route request is mostly its `token_ids`: 8k tokens are ~50 KB of JSON, and a generic JSON
//! parser spends ~120 µs on them here, more than everything else a route costs. [`parse`]
//! reads the object itself, hands every other member to serde_json, and reads the token array
//! with a scanner that parses a number from one 8-byte load ([`scan_token_ids`]). Whatever that
//! path does not take exactly as serde_json would (escaped keys, duplicate members, a number
//! that is not a plain `u32`, odd whitespace inside the array…) makes it give up, and the whole
//! body is parsed again by serde_json, so errors and edge cases are serde_json's own: the fast
//! path only ever returns what the slow path returns (a property test checks it).

use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;

/// `POST /v1/route`'s body (unknown members are ignored).
#[derive(Debug, Default, PartialEq, serde::Deserialize)]
pub struct RouteRequest {
    pub model: Option<String>,
    pub lora: Option<String>,
    pub token_ids: Option<TokenIds>,
    pub prompt: Option<String>,
    pub messages: Option<Value>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    /// Chat: the tools the template renders (as vLLM's `ChatCompletionRequest.tools`).
    pub tools: Option<Value>,
    /// Chat: extra template variables (vLLM's `chat_template_kwargs`).
    pub chat_template_kwargs: Option<Value>,
}

/// Token ids read straight into a `Vec<u32>` (no intermediate JSON values).
#[derive(Debug, Default, PartialEq)]
pub struct TokenIds(pub Vec<u32>);

const TOKEN_IDS_ERROR: &str = "`token_ids` must be an array of token ids (u32)";

impl<'de> serde::Deserialize<'de> for TokenIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TokenIds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(TOKEN_IDS_ERROR)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TokenIds, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                loop {
                    match seq.next_element::<u32>() {
                        Ok(Some(t)) => v.push(t),
                        Ok(None) => return Ok(TokenIds(v)),
                        Err(_) => return Err(serde::de::Error::custom(TOKEN_IDS_ERROR)),
                    }
                }
            }
        }
        d.deserialize_seq(V)
    }
}

/// Parses a route request: the fast path, or serde_json when the fast path declines.
pub fn parse(body: &[u8]) -> Result<RouteRequest, serde_json::Error> {
    match parse_fast(body) {
        Some(r) => Ok(r),
        None => serde_json::from_slice(body),
    }
}

#[inline]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).copied().is_some_and(is_ws) {
        i += 1;
    }
    i
}

/// One JSON value of type `T` at `b[*i..]`, by serde_json; advances `*i` past it.
fn value<T: DeserializeOwned>(b: &[u8], i: &mut usize) -> Option<T> {
    let mut it = serde_json::Deserializer::from_slice(b.get(*i..)?).into_iter::<T>();
    let v = it.next()?.ok()?;
    *i += it.byte_offset();
    Some(v)
}

/// The fast path: `None` whenever it is not sure to agree with serde_json.
pub fn parse_fast(b: &[u8]) -> Option<RouteRequest> {
    let mut r = RouteRequest::default();
    let mut seen = 0u16;
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            // A key without escapes or control characters.
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let start = i + 1;
            let len = b.get(start..)?.iter().position(|&c| c == b'"')?;
            let key = &b[start..start + len];
            if key.iter().any(|&c| c == b'\\' || c < 0x20) {
                return None;
            }
            i = skip_ws(b, start + len + 1);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(b, i + 1);
            let bit = match key {
                b"model" => 1,
                b"lora" => 2,
                b"token_ids" => 4,
                b"prompt" => 8,
                b"messages" => 16,
                b"add_special_tokens" => 32,
                b"add_generation_prompt" => 64,
                b"tools" => 128,
                b"chat_template_kwargs" => 256,
                _ => 0,
            };
            if seen & bit != 0 {
                return None; // a duplicate member: serde_json's error
            }
            seen |= bit;
            match bit {
                1 => r.model = value(b, &mut i)?,
                2 => r.lora = value(b, &mut i)?,
                4 if b.get(i) == Some(&b'[') => {
                    let mut v = Vec::new();
                    i = scan_token_ids(b, i, &mut v)?;
                    r.token_ids = Some(TokenIds(v));
                }
                4 => r.token_ids = value(b, &mut i)?,
                8 => r.prompt = value(b, &mut i)?,
                16 => r.messages = value(b, &mut i)?,
                32 => r.add_special_tokens = value(b, &mut i)?,
                64 => r.add_generation_prompt = value(b, &mut i)?,
                128 => r.tools = value(b, &mut i)?,
                256 => r.chat_template_kwargs = value(b, &mut i)?,
                _ => {
                    value::<IgnoredAny>(b, &mut i)?;
                }
            }
            i = skip_ws(b, i);
            match b.get(i) {
                Some(b',') => i = skip_ws(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(b, i) == b.len()).then_some(r)
}

const ONES: u64 = 0x0101_0101_0101_0101;

/// The 8 bytes at `b[i..]`, padded with spaces past the end.
#[inline(always)]
fn load8(b: &[u8], i: usize) -> u64 {
    match b.get(i..i + 8) {
        Some(s) => {
            let mut w = [0u8; 8];
            w.copy_from_slice(s);
            u64::from_le_bytes(w)
        }
        None => {
            let mut w = [b' '; 8];
            let s = b.get(i..).unwrap_or_default();
            w[..s.len()].copy_from_slice(s);
            u64::from_le_bytes(w)
        }
    }
}

/// How many of the leading bytes of `x` (a word xor `'0'`s) are digits: 0 to 8.
#[inline(always)]
fn leading_digits(x: u64) -> u32 {
    // Byte c ^ '0' is below 10 exactly for a digit: adding 0x76 sets the top bit from 10 up,
    // and bytes at 0x80 and above already have it.
    let non_digit = (x.wrapping_add(0x76 * ONES) | x) & (0x80 * ONES);
    non_digit.trailing_zeros() / 8
}

/// The value of the `n` (1 to 8) leading digits of `x` (a word xor `'0'`s).
#[inline(always)]
fn digits_value(x: u64, n: u32) -> u64 {
    // Move the digits to the top bytes (the low ones become zeros, leading zeros of the
    // number), then combine pairs, quads and halves: three multiplies for up to 8 digits.
    let mut v = x << (8 * (8 - n));
    v = (v & (0x0f * ONES)).wrapping_mul(2561) >> 8;
    v = (v & 0x00ff_00ff_00ff_00ff).wrapping_mul(6_553_601) >> 16;
    (v & 0x0000_ffff_0000_ffff).wrapping_mul(42_949_672_960_001) >> 32
}

/// What one step of the token scan found.
enum Step {
    /// A number and its comma: the next number starts at the new position.
    More,
    /// The last number: the array ends just before the new position.
    End,
    /// Not a plain array of `u32`s (or whitespace where the fast path does not look).
    Fail,
}

/// Reads the number at `b[*i..]` and the comma after it, or what else follows it: the next
/// step starts where this one stops. Short numbers followed by a comma stay in these few
/// instructions; everything else is out of line.
#[inline(always)]
fn step(b: &[u8], i: &mut usize, out: &mut Vec<u32>) -> Step {
    let x = load8(b, *i) ^ (0x30 * ONES);
    let n = leading_digits(x);
    // One to seven digits, no leading zero.
    if n.wrapping_sub(1) < 7 && (n == 1 || x as u8 != 0) {
        out.push(digits_value(x, n) as u32);
        *i += n as usize;
        if (x >> (8 * n)) as u8 == b',' ^ b'0' {
            *i += 1;
            return Step::More;
        }
        return after_number(b, i);
    }
    step_slow(b, i, out)
}

/// What follows a number other than a comma right after it.
#[cold]
#[inline(never)]
fn after_number(b: &[u8], i: &mut usize) -> Step {
    *i = skip_ws(b, *i);
    match b.get(*i) {
        Some(b',') => {
            *i += 1;
            Step::More
        }
        Some(b']') => {
            *i += 1;
            Step::End
        }
        _ => Step::Fail,
    }
}

/// A step that does not start on a short number: whitespace after a comma (skipped: the step
/// ends on the number), a long number, or an error.
#[cold]
#[inline(never)]
fn step_slow(b: &[u8], i: &mut usize, out: &mut Vec<u32>) -> Step {
    match b.get(*i) {
        Some(c) if is_ws(*c) => {
            *i = skip_ws(b, *i);
            if b.get(*i).is_some_and(u8::is_ascii_digit) {
                Step::More
            } else {
                Step::Fail
            }
        }
        Some(b'1'..=b'9') => {
            // Eight digits or more, one at a time, checked.
            let mut v: u64 = 0;
            while let Some(d) = b.get(*i).filter(|c| c.is_ascii_digit()) {
                v = v * 10 + u64::from(d - b'0');
                if v > u64::from(u32::MAX) {
                    return Step::Fail;
                }
                *i += 1;
            }
            out.push(v as u32);
            after_number(b, i)
        }
        _ => Step::Fail, // a leading zero, a sign, a doubled comma, …
    }
}

/// Reads a JSON array of `u32`s starting at `b[i] == '['` into `out`; returns the index just
/// past its `]`. `None` (the caller falls back to serde_json) for anything else: a sign, a
/// fraction or exponent, a leading zero, a value above `u32::MAX`, a missing or doubled comma.
///
/// A long array is read as four lanes at once: split points are guessed at quarters of the
/// rest of the body, each moved to just after a comma, and lane k must land exactly on lane
/// k+1's start (the last one on the `]`); if not (a guess past the array's end, a comma inside
/// a string…) the array is read again in one lane. Each lane's step depends on the previous
/// one (where a number ends decides where the next begins), so one lane waits on its own
/// loads and shifts; four interleaved lanes keep the core busy.
pub fn scan_token_ids(b: &[u8], i: usize, out: &mut Vec<u32>) -> Option<usize> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    if b.len() - i >= 4096 {
        let base = out.len();
        if let Some(end) = scan_lanes(b, i, out) {
            return Some(end);
        }
        out.truncate(base);
    }
    scan_one(b, i, out)
}

/// The array at `b[i] == '['` in one lane.
fn scan_one(b: &[u8], i: usize, out: &mut Vec<u32>) -> Option<usize> {
    // About 6 bytes per token id in practice.
    out.reserve((b.len() - i) / 6 + 1);
    let mut i = skip_ws(b, i + 1);
    match b.get(i) {
        Some(b']') => return Some(i + 1),
        Some(c) if c.is_ascii_digit() => {}
        _ => return None,
    }
    loop {
        match step(b, &mut i, out) {
            Step::More => {}
            Step::End => return Some(i),
            Step::Fail => return None,
        }
    }
}

/// The array at `b[i] == '['` in four lanes; `None` when the split does not hold (the
/// caller reads it in one lane) or the array is not a plain one.
fn scan_lanes(b: &[u8], i: usize, out: &mut Vec<u32>) -> Option<usize> {
    const L: usize = 4;
    let first = i + 1;
    if !b.get(first).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    // Lane starts: the first number, then the number after the first comma past each guess.
    let mut start = [first; L];
    let span = b.len() - first;
    for (k, s) in start.iter_mut().enumerate().skip(1) {
        let guess = first + span * k / L;
        let comma = guess + b.get(guess..)?.iter().position(|&c| c == b',')?;
        *s = skip_ws(b, comma + 1);
        if !b.get(*s).is_some_and(u8::is_ascii_digit) {
            return None;
        }
    }
    if start.windows(2).any(|w| w[0] >= w[1]) {
        return None;
    }
    let per_lane = span / 6 / L + 16;
    let [mut o0, mut o1, mut o2, mut o3]: [Vec<u32>; L] =
        std::array::from_fn(|_| Vec::with_capacity(per_lane));
    let [mut p0, mut p1, mut p2, mut p3] = start;
    let [_, s1, s2, s3] = start;
    // Lockstep while every lane is before its successor's start: four independent chains.
    let mut last_end = false;
    while p0 < s1 && p1 < s2 && p2 < s3 {
        let r0 = step(b, &mut p0, &mut o0);
        let r1 = step(b, &mut p1, &mut o1);
        let r2 = step(b, &mut p2, &mut o2);
        let r3 = step(b, &mut p3, &mut o3);
        match (r0, r1, r2, r3) {
            (Step::More, Step::More, Step::More, Step::More) => {}
            (Step::More, Step::More, Step::More, Step::End) => {
                last_end = true;
                break;
            }
            _ => return None,
        }
    }
    // Then each lane on its own up to its stop (the last one up to the `]`).
    let finish = |p: &mut usize, stop: usize, o: &mut Vec<u32>| -> Option<()> {
        while *p < stop {
            match step(b, p, o) {
                Step::More => {}
                Step::End | Step::Fail => return None,
            }
        }
        (*p == stop).then_some(())
    };
    finish(&mut p0, s1, &mut o0)?;
    finish(&mut p1, s2, &mut o1)?;
    finish(&mut p2, s3, &mut o2)?;
    while !last_end {
        match step(b, &mut p3, &mut o3) {
            Step::More => {}
            Step::End => last_end = true,
            Step::Fail => return None,
        }
    }
    out.reserve(o0.len() + o1.len() + o2.len() + o3.len());
    for o in [o0, o1, o2, o3] {
        out.extend_from_slice(&o);
    }
    Some(p3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slow(b: &[u8]) -> Result<RouteRequest, serde_json::Error> {
        serde_json::from_slice(b)
    }

    /// The fast path agrees with serde_json whenever it answers, and answers for the shapes
    /// gateways send.
    fn check(body: &str, fast_expected: bool) {
        let fast = parse_fast(body.as_bytes());
        let slow = slow(body.as_bytes());
        match (&fast, &slow) {
            (Some(f), Ok(s)) => assert_eq!(f, s, "{body}"),
            (Some(f), Err(e)) => panic!("fast path took {body:?} as {f:?}; serde_json: {e}"),
            (None, _) => {}
        }
        assert_eq!(fast.is_some(), fast_expected, "fast path on {body:?}");
    }

    #[test]
    fn gateway_shapes_take_the_fast_path() {
        check(
            r#"{"model":"m","token_ids":[1,22,333,4444,55555,666666,7777777,88888888,999999999,4294967295,0]}"#,
            true,
        );
        check(r#"{"model": "m", "token_ids": [1, 2, 3]}"#, true);
        check(
            "{\n  \"model\": \"m\",\n  \"token_ids\": [\n    1,\n    2\n  ]\n}\n",
            true,
        );
        check(
            r#"{"token_ids":[],"model":"m","lora":null,"x":{"y":[1,{"z":"\""}]}}"#,
            true,
        );
        check(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"add_generation_prompt":false}"#,
            true,
        );
        check(
            r#"{"model":"m","prompt":"a \"quoted\" text","add_special_tokens":true}"#,
            true,
        );
        check(r#"{"model":"m","token_ids":null}"#, true);
        check("{}", true);
        check(" { } ", true);
    }

    #[test]
    fn anything_unusual_goes_to_serde_json() {
        for body in [
            r#"{"model":"m","token_ids":[1,-2]}"#,
            r#"{"model":"m","token_ids":[1,2.0]}"#,
            r#"{"model":"m","token_ids":[1,2e3]}"#,
            r#"{"model":"m","token_ids":[01]}"#,
            r#"{"model":"m","token_ids":[0123456789]}"#,
            r#"{"model":"m","token_ids":[4294967296]}"#,
            r#"{"model":"m","token_ids":[99999999999999999999999]}"#,
            r#"{"model":"m","token_ids":[1,,2]}"#,
            r#"{"model":"m","token_ids":[1 2]}"#,
            r#"{"model":"m","token_ids":[,1]}"#,
            r#"{"model":"m","token_ids":[1,]}"#,
            r#"{"model":"m","token_ids":[1"#,
            r#"{"model":"m","token_ids":["1"]}"#,
            r#"{"model":"m","model":"n"}"#,
            r#"{"mod\u0065l":"m"}"#,
            r#"{"model":7}"#,
            r#"{"model":"m",}"#,
            r#"{"model":"m"} x"#,
            r#"{"model":"m""#,
            r#"["model"]"#,
            r#"{"model":"m","token_ids":[1]]"#,
            "",
        ] {
            check(body, false);
        }
    }

    #[test]
    fn errors_are_serde_jsons() {
        let e = parse(br#"{"model":"m","token_ids":[1,-2]}"#).expect_err("negative");
        assert!(e.to_string().contains(TOKEN_IDS_ERROR), "{e}");
        let e = parse(br#"{"model":"m","model":"n"}"#).expect_err("duplicate");
        assert!(e.to_string().contains("duplicate field `model`"), "{e}");
        assert!(parse(b"{").expect_err("eof").is_eof());
    }

    /// Numbers of every length at every alignment, near the ends of the buffer too.
    #[test]
    fn every_width_and_offset() {
        for pad in 0..9 {
            for width in 1..=10u32 {
                let lo = if width == 1 { 0 } else { 10u64.pow(width - 1) };
                for v in [
                    lo,
                    lo + 7,
                    (lo * 10).saturating_sub(1).min(u64::from(u32::MAX)),
                ] {
                    let v = v.min(u64::from(u32::MAX)) as u32;
                    let body = format!("{}[{v},{v}]", " ".repeat(pad));
                    let mut out = Vec::new();
                    let end = scan_token_ids(body.as_bytes(), pad, &mut out);
                    assert_eq!(end, Some(body.len()), "{body}");
                    assert_eq!(out, [v, v], "{body}");
                }
            }
        }
    }

    /// Long arrays are read in lanes; whatever follows the array cannot fool the split.
    #[test]
    fn long_arrays_in_lanes() {
        let toks: Vec<u32> = (0..3000u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % 200_000)
            .collect();
        let arr = serde_json::to_string(&toks).expect("json");
        let spaced = format!(
            "[{}]",
            toks.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let digits = format!(
            "\"{}\"",
            toks.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        for (body, lanes) in [
            (format!(r#"{{"model":"m","token_ids":{arr}}}"#), true),
            (format!(r#"{{"token_ids":{spaced},"model":"m"}}"#), true),
            // The split's guesses land in the string or the array after: read in one lane.
            (format!(r#"{{"token_ids":{arr},"prompt":{digits}}}"#), false),
            (
                format!(r#"{{"token_ids":{arr},"x":{arr},"model":"m"}}"#),
                false,
            ),
        ] {
            let start = body.find('[').expect("array");
            let mut out = Vec::new();
            let by_lanes = scan_lanes(body.as_bytes(), start, &mut out);
            assert_eq!(by_lanes.is_some(), lanes, "{}", &body[..80]);
            if lanes {
                assert_eq!(out, toks);
            }
            check(&body, true);
            assert_eq!(
                parse(body.as_bytes()).expect("parse").token_ids,
                Some(TokenIds(toks.clone()))
            );
        }
        // A bad number late in a long array: serde_json's error.
        let bad = format!(
            r#"{{"model":"m","token_ids":{}}}"#,
            arr.replace(",1", ",-1")
        );
        check(&bad, false);
        let bad = format!(
            r#"{{"model":"m","token_ids":{}}}"#,
            arr.replacen(",", ",,", 2900)
        );
        check(&bad, false);
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => any::<u32>().prop_map(|v| v.to_string()),
            4 => (0u32..200_000).prop_map(|v| v.to_string()),
            1 => Just("-1".to_owned()),
            1 => Just("1.5".to_owned()),
            1 => Just("1e2".to_owned()),
            1 => Just("007".to_owned()),
            1 => Just("4294967296".to_owned()),
            1 => Just("\"3\"".to_owned()),
            1 => Just(String::new()),
        ]
    }

    fn sep() -> impl Strategy<Value = &'static str> {
        prop_oneof![8 => Just(","), 4 => Just(", "), 1 => Just(" ,"), 1 => Just(",\n  "), 1 => Just(",,"), 1 => Just(" ")]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Random bodies: whenever the fast path answers, serde_json gives the same request.
        #[test]
        fn fast_path_agrees_with_serde_json(
            toks in prop_oneof![
                4 => prop::collection::vec((token(), sep()), 0..40),
                1 => prop::collection::vec((token(), sep()), 500..1200),
            ],
            order in 0usize..3,
            extra in prop_oneof![Just(""), Just(r#","x":[1,{"a":null}]"#), Just(r#","model":"n""#), Just(r#","lora":"l""#)],
            trailing in prop_oneof![Just(""), Just(" "), Just("]"), Just(",")],
        ) {
            let mut arr = String::from("[");
            for (k, (t, s)) in toks.iter().enumerate() {
                if k > 0 {
                    arr.push_str(s);
                }
                arr.push_str(t);
            }
            arr.push(']');
            let members = [r#""model":"m""#.to_owned(), format!(r#""token_ids":{arr}"#)];
            let body = match order {
                0 => format!("{{{},{}{extra}}}{trailing}", members[0], members[1]),
                1 => format!("{{{},{}{extra}}}{trailing}", members[1], members[0]),
                _ => format!("{{{}{extra}}}{trailing}", members[1]),
            };
            let fast = parse_fast(body.as_bytes());
            let slow = slow(body.as_bytes());
            match (fast, slow) {
                (Some(f), Ok(s)) => prop_assert_eq!(f, s),
                (Some(f), Err(e)) => prop_assert!(false, "fast {:?} but serde_json: {}", f, e),
                (None, _) => {}
            }
        }
    }
}
