//! The route answer, written as JSON directly (byte-compared with serde's output in a test).

use crate::route::Candidate;

/// A candidate's score parts under the load-aware choice (see `crate::route::cost`).
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct Score {
    /// The estimated time to first token: prefill + queue + kv.
    pub(super) est_ttft_s: f64,
    pub(super) prefill_s: f64,
    pub(super) queue_s: f64,
    pub(super) kv_s: f64,
    pub(super) uncached_tokens: u64,
    /// This replica's requests in flight on the pod, and their tokens still to prefill.
    pub(super) in_flight: u64,
    pub(super) prefill_tokens: u64,
    /// The peer replicas' (`--peers`, last fresh reading), summed.
    pub(super) peer_in_flight: u64,
    pub(super) peer_prefill_tokens: u64,
    /// The pod's last fresh scrape (null without one).
    pub(super) waiting: Option<f64>,
    pub(super) running: Option<f64>,
    pub(super) kv_usage: Option<f64>,
    pub(super) cooling: bool,
}

impl Score {
    pub(super) fn of(c: &Candidate<'_>) -> Score {
        let sc = c.load.scraped;
        Score {
            est_ttft_s: c.cost.total,
            prefill_s: c.cost.prefill,
            queue_s: c.cost.queue,
            kv_s: c.cost.kv,
            uncached_tokens: c.cost.uncached_tokens,
            in_flight: c.load.in_flight,
            prefill_tokens: c.load.prefill_tokens,
            peer_in_flight: c.load.peer_in_flight,
            peer_prefill_tokens: c.load.peer_prefill_tokens,
            waiting: sc.map(|s| s.waiting),
            running: sc.map(|s| s.running),
            kv_usage: sc.map(|s| s.kv_usage),
            cooling: c.load.cooling,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        fn f(out: &mut Vec<u8>, key: &[u8], v: Option<f64>) {
            out.extend_from_slice(key);
            // Writing to a Vec cannot fail; a non-finite number is null, as serde_json writes.
            let _ = serde_json::to_writer(&mut *out, &v);
        }
        fn u(out: &mut Vec<u8>, key: &[u8], v: u64) {
            out.extend_from_slice(key);
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
        f(out, br#"{"est_ttft_s":"#, Some(self.est_ttft_s));
        f(out, br#","prefill_s":"#, Some(self.prefill_s));
        f(out, br#","queue_s":"#, Some(self.queue_s));
        f(out, br#","kv_s":"#, Some(self.kv_s));
        u(out, br#","uncached_tokens":"#, self.uncached_tokens);
        u(out, br#","in_flight":"#, self.in_flight);
        u(out, br#","prefill_tokens":"#, self.prefill_tokens);
        u(out, br#","peer_in_flight":"#, self.peer_in_flight);
        u(out, br#","peer_prefill_tokens":"#, self.peer_prefill_tokens);
        f(out, br#","waiting":"#, self.waiting);
        f(out, br#","running":"#, self.running);
        f(out, br#","kv_usage":"#, self.kv_usage);
        out.extend_from_slice(if self.cooling {
            br#","cooling":true}"#
        } else {
            br#","cooling":false}"#
        });
    }
}

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
    /// The choice's score parts.
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    pub(super) score: Option<Score>,
}

#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RouteAnswer<'a> {
    pub(super) model: &'a str,
    pub(super) lora: Option<&'a str>,
    pub(super) block_size: u32,
    pub(super) num_blocks: u32,
    pub(super) exact: bool,
    /// The `--policy` that ranked `pods`.
    pub(super) policy: &'a str,
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
        if let Some(sc) = &self.score {
            out.extend_from_slice(br#","score":"#);
            sc.write(out);
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
        out.extend_from_slice(br#","policy":"#);
        json_str(&mut out, self.policy);
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
            score: routed.map(|r| Score {
                est_ttft_s: 0.1 + f64::from(r),
                prefill_s: 1e-7,
                queue_s: 0.0,
                kv_s: f64::NAN,
                uncached_tokens: 12,
                in_flight: 3,
                prefill_tokens: u64::MAX,
                peer_in_flight: 2,
                peer_prefill_tokens: 1 << 40,
                waiting: None,
                running: Some(2.5),
                kv_usage: Some(0.125),
                cooling: r > 0,
            }),
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
                policy: "kv-aware",
                selected: m("ns/a", Some("GPU"), Some(0)),
                pods: vec![
                    m("ns/a", Some("GPU"), Some(0)),
                    m("ns/\"b\"", None, None),
                    m("c", None, Some(7)),
                ],
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
            policy: "prefix",
            selected: m("p", None, None),
            pods: Vec::new(),
        };
        assert_eq!(
            String::from_utf8(empty.to_json()).expect("utf-8"),
            serde_json::to_string(&empty).expect("json")
        );
    }
}
