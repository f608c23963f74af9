//! The route answer, written as JSON directly (byte-compared with serde's output in a test).

#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct PodMatch<'a> {
    pub(super) pod: &'a str,
    pub(super) address: &'a str,
    pub(super) dp_rank: u32,
    pub(super) matched_blocks: u32,
    pub(super) matched_tokens: u32,
    pub(super) tier: Option<&'static str>,
    /// With KV sync: leading blocks of this prompt routed here recently, whose events may not
    /// have arrived yet (ranking uses the larger of the two).
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    pub(super) routed_blocks: Option<u32>,
}

#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RouteAnswer<'a> {
    pub(super) model: &'a str,
    pub(super) lora: Option<&'a str>,
    pub(super) block_size: u32,
    pub(super) num_blocks: u32,
    pub(super) exact: bool,
    pub(super) selected: PodMatch<'a>,
    pub(super) pods: Vec<PodMatch<'a>>,
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|c| c < 0x20 || c == b'"' || c == b'\\') {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

fn json_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

impl PodMatch<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"pod":"#);
        json_str(out, self.pod);
        out.extend_from_slice(br#","address":"#);
        json_str(out, self.address);
        out.extend_from_slice(br#","dp_rank":"#);
        json_u32(out, self.dp_rank);
        out.extend_from_slice(br#","matched_blocks":"#);
        json_u32(out, self.matched_blocks);
        out.extend_from_slice(br#","matched_tokens":"#);
        json_u32(out, self.matched_tokens);
        out.extend_from_slice(br#","tier":"#);
        match self.tier {
            Some(t) => json_str(out, t),
            None => out.extend_from_slice(b"null"),
        }
        if let Some(r) = self.routed_blocks {
            out.extend_from_slice(br#","routed_blocks":"#);
            json_u32(out, r);
        }
        out.push(b'}');
    }
}

impl RouteAnswer<'_> {
    /// The answer as JSON, written directly: a 64-pod answer is ~10 KB of fixed keys and
    /// numbers, where a generic serializer's per-key escaping showed in the route's profile.
    pub(super) fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + 160 * (self.pods.len() + 1));
        out.extend_from_slice(br#"{"model":"#);
        json_str(&mut out, self.model);
        out.extend_from_slice(br#","lora":"#);
        match self.lora {
            Some(l) => json_str(&mut out, l),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","block_size":"#);
        json_u32(&mut out, self.block_size);
        out.extend_from_slice(br#","num_blocks":"#);
        json_u32(&mut out, self.num_blocks);
        out.extend_from_slice(if self.exact {
            br#","exact":true"#
        } else {
            br#","exact":false"#
        });
        out.extend_from_slice(br#","selected":"#);
        self.selected.write(&mut out);
        out.extend_from_slice(br#","pods":["#);
        for (k, p) in self.pods.iter().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            p.write(&mut out);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_answer_json_is_serde_jsons() {
        let m = |pod, tier, routed| PodMatch {
            pod,
            address: "10.0.0.1",
            dp_rank: 3,
            matched_blocks: 7,
            matched_tokens: 112,
            tier,
            routed_blocks: routed,
        };
        for (model, lora, exact) in [
            ("m", None, true),
            ("we\"ird\\ \u{1}mödel", Some("l\n"), false),
        ] {
            let a = RouteAnswer {
                model,
                lora,
                block_size: 16,
                num_blocks: u32::MAX,
                exact,
                selected: m("ns/a", Some("GPU"), Some(0)),
                pods: vec![m("ns/a", Some("GPU"), Some(0)), m("ns/\"b\"", None, None)],
            };
            assert_eq!(
                String::from_utf8(a.to_json()).expect("utf-8"),
                serde_json::to_string(&a).expect("json")
            );
        }
        let empty = RouteAnswer {
            model: "m",
            lora: None,
            block_size: 0,
            num_blocks: 0,
            exact: true,
            selected: m("p", None, None),
            pods: Vec::new(),
        };
        assert_eq!(
            String::from_utf8(empty.to_json()).expect("utf-8"),
            serde_json::to_string(&empty).expect("json")
        );
    }
}
