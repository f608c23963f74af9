//! The load-aware choice (pure: no I/O, no clock; the draw for random choices is an input).
//!
//! `kv-aware` ranks candidates by an estimate of the request's time to first token on each:
//!
//! ```text
//!  est = prefill × (uncached prompt tokens + in-flight uncached tokens of the replicas)
//!      + waiting × (scraped waiting requests beyond the replicas' in-flight ones)
//!      + running × max(scraped running requests, the replicas' in-flight ones)
//!      + kv × scraped KV cache usage (0..1)
//! ```
//!
//! in seconds, with the weights as `serve` flags. The first term is the request's own prefill
//! (its cached prefix is free) plus the prefill queued ahead of it that the replicas know
//! exactly: this one's at once, its peers' as read from their `/v1/load` every peer interval
//! (`crate::load::peers`); the scraped queue counts what other clients sent (the scrape lags
//! and includes the replicas' requests, hence the `beyond` and the `max`, so nothing is
//! counted twice). A reading older than three intervals is not used (see `crate::load`).
//!
//! What the peers do, read before writing this:
//! - Dynamo's kv-router (`lib/kv-router`, the scheduler's `DefaultWorkerSelector`): a cost
//!   logit per worker of `overlap_score_weight × prefill blocks + decode (active) blocks`, the
//!   lowest chosen, or a softmax sample at `router_temperature` > 0. Its units are blocks;
//!   here they are seconds, so the prefill and the queue weigh against each other through a
//!   measured rate rather than a unitless weight, and a temperature is offered the same way.
//! - vLLM's router (`src/policies/kv_aware.rs` in vllm-project/router): the longest prefix
//!   from the same KV events wins, falling back to the least loaded when no worker holds any
//!   block, with speculative entries for 2 s (kvsync's `routed_blocks`). Load only breaks the
//!   no-hit case there; here it is weighed on every request, so a hot prefix stops piling on
//!   one pod once its queue costs more than a re-prefill elsewhere.
//! - llm-d's endpoint picker: weighted scorers (prefix cache, queue, KV cache utilisation)
//!   summed; `kv` here is its KV-utilisation scorer, `waiting` its queue scorer.
//! - AIBrix's least-request: the fewest in-flight requests (`least-load` here, with the
//!   scraped queue added to this replica's own count).
//!
//! The other policies: `prefix` (longest cached prefix, the index's ranking before this
//! module), `least-load` (the queue terms alone), `round-robin`, `random`. With every policy a
//! pod in cool-down (failing again and again) goes last.

use super::Candidate;
use std::fmt;
use std::str::FromStr;

/// How the proxy and `/v1/route` choose among candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// Exact cached prefix weighed against load: the lowest estimated time to first token.
    #[default]
    KvAware,
    /// The longest cached prefix (load ignored).
    Prefix,
    /// The least queued work (prefix ignored).
    LeastLoad,
    RoundRobin,
    Random,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::KvAware,
        Policy::Prefix,
        Policy::LeastLoad,
        Policy::RoundRobin,
        Policy::Random,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::KvAware => "kv-aware",
            Policy::Prefix => "prefix",
            Policy::LeastLoad => "least-load",
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown policy {s:?} (one of {})",
                    Policy::ALL.map(Policy::name).join(", ")
                )
            })
    }
}

/// The weights of the estimate, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Seconds to prefill one prompt token (`--prefill-us-per-token`).
    pub prefill_per_token: f64,
    /// Seconds one waiting request (not this replica's) adds (`--waiting-request-ms`).
    pub waiting_request: f64,
    /// Seconds one running request adds (`--running-request-ms`): decode steps batched with
    /// the new request's prefill.
    pub running_request: f64,
    /// Seconds added at a full KV cache, linear in its usage (`--kv-usage-ms`).
    pub kv_usage: f64,
    /// Softmax temperature over the estimates relative to the largest (0: the lowest always;
    /// Dynamo's `router_temperature`).
    pub temperature: f64,
}

impl Default for Weights {
    fn default() -> Weights {
        Weights {
            prefill_per_token: 250e-6,
            waiting_request: 0.05,
            running_request: 0.002,
            kv_usage: 0.0,
            temperature: 0.0,
        }
    }
}

/// A pod's scraped gauges (fresh ones only).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scraped {
    pub waiting: f64,
    pub running: f64,
    pub kv_usage: f64,
}

/// What the choice knows of a candidate's load.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LoadView {
    /// This replica's requests in flight on the pod.
    pub in_flight: u64,
    /// Their uncached prompt tokens not yet prefilled (no first byte yet).
    pub prefill_tokens: u64,
    /// The other replicas' requests in flight on the pod (their `/v1/load`, fresh only).
    pub peer_in_flight: u64,
    /// Their uncached prompt tokens not yet prefilled.
    pub peer_prefill_tokens: u64,
    pub scraped: Option<Scraped>,
    /// In cool-down after repeated failures.
    pub cooling: bool,
}

/// A candidate's estimate and its parts (answered by `/v1/route`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Cost {
    /// The request's prompt tokens the candidate would have to prefill.
    pub uncached_tokens: u64,
    /// Seconds of that prefill.
    pub prefill: f64,
    /// Seconds of the work queued ahead (in-flight prefill, waiting, running).
    pub queue: f64,
    /// Seconds charged for the KV cache's usage.
    pub kv: f64,
    /// The estimated time to first token: their sum.
    pub total: f64,
}

/// The estimate for a prompt of `prompt_tokens` of which `cached_tokens` are cached.
pub fn estimate(prompt_tokens: u64, cached_tokens: u64, load: &LoadView, w: &Weights) -> Cost {
    let uncached = prompt_tokens.saturating_sub(cached_tokens);
    let prefill = uncached as f64 * w.prefill_per_token;
    // This replica's requests and its peers': all the replicas' (the scrape counts them too).
    let ours = (load.in_flight + load.peer_in_flight) as f64;
    let (waiting, running, kv_usage) = match load.scraped {
        Some(s) => (
            (s.waiting - ours).max(0.0),
            s.running.max(ours),
            s.kv_usage.clamp(0.0, 1.0),
        ),
        None => (0.0, ours, 0.0),
    };
    let queue = (load.prefill_tokens + load.peer_prefill_tokens) as f64 * w.prefill_per_token
        + waiting * w.waiting_request
        + running * w.running_request;
    let kv = kv_usage * w.kv_usage;
    Cost {
        uncached_tokens: uncached,
        prefill,
        queue,
        kv,
        total: prefill + queue + kv,
    }
}

/// What a choice needs besides the candidates: the prompt's length, the weights, a uniform
/// draw in [0, 1) (random and softmax choices) and a counter (round robin).
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub policy: Policy,
    pub prompt_tokens: u64,
    pub block_size: u32,
    pub weights: Weights,
    pub draw: f64,
    pub turn: u64,
}

/// Fills each candidate's cost and orders the list best first under `ask.policy`. Candidates
/// must be filled ([`super::fill`]) and carry their load and last selection.
pub fn choose(list: &mut [Candidate<'_>], ask: &Ask) {
    for c in list.iter_mut() {
        let cached = (u64::from(c.rank()) * u64::from(ask.block_size)).min(ask.prompt_tokens);
        c.cost = estimate(ask.prompt_tokens, cached, &c.load, &ask.weights);
    }
    // A total order first (by name and rank) so that every policy is deterministic given its
    // inputs.
    list.sort_unstable_by(|a, b| {
        a.worker
            .pod
            .cmp(b.worker.pod)
            .then(a.worker.dp_rank.cmp(&b.worker.dp_rank))
    });
    let n = list.len();
    match ask.policy {
        Policy::Prefix => super::order(list),
        Policy::KvAware => {
            list.sort_by(|a, b| {
                a.cost
                    .total
                    .total_cmp(&b.cost.total)
                    .then_with(|| b.rank().cmp(&a.rank()))
                    .then_with(|| a.last.cmp(&b.last))
            });
            if ask.weights.temperature > 0.0 && n > 1 {
                let i = softmax_pick(list, ask.weights.temperature, ask.draw);
                list[..=i].rotate_right(1);
            }
        }
        Policy::LeastLoad => list.sort_by(|a, b| {
            a.cost
                .queue
                .total_cmp(&b.cost.queue)
                .then_with(|| a.load.in_flight.cmp(&b.load.in_flight))
                .then_with(|| a.last.cmp(&b.last))
        }),
        Policy::RoundRobin if n > 0 => list.rotate_left((ask.turn % n as u64) as usize),
        Policy::Random if n > 0 => {
            let i = ((ask.draw.clamp(0.0, 1.0) * n as f64) as usize).min(n - 1);
            list[..=i].rotate_right(1);
        }
        Policy::RoundRobin | Policy::Random => {}
    }
    // Pods in cool-down last, the order otherwise kept.
    list.sort_by_key(|c| c.load.cooling);
}

/// A softmax sample over `-total / max_total / temperature` (the list sorted by total).
fn softmax_pick(list: &[Candidate<'_>], temperature: f64, draw: f64) -> usize {
    let max = list
        .iter()
        .map(|c| c.cost.total)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let logits: Vec<f64> = list
        .iter()
        .map(|c| -(c.cost.total / max) / temperature)
        .collect();
    let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
    let sum: f64 = weights.iter().sum();
    let mut at = draw.clamp(0.0, 1.0) * sum;
    for (i, w) in weights.iter().enumerate() {
        if at < *w {
            return i;
        }
        at -= w;
    }
    list.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::WorkerRef;
    use prefix_index::Tier;

    fn cand(pod: &'static str, blocks: u32, load: LoadView) -> Candidate<'static> {
        Candidate {
            worker: WorkerRef { pod, dp_rank: 0 },
            address: "10.0.0.1",
            http_port: 8000,
            dp_size: 1,
            blocks,
            per_tier: [0; Tier::COUNT],
            routed: 0,
            last: None,
            load,
            cost: Cost::default(),
        }
    }

    fn ask(policy: Policy, prompt_tokens: u64) -> Ask {
        Ask {
            policy,
            prompt_tokens,
            block_size: 16,
            weights: Weights {
                prefill_per_token: 1e-4,
                waiting_request: 0.1,
                running_request: 0.01,
                kv_usage: 0.05,
                temperature: 0.0,
            },
            draw: 0.0,
            turn: 0,
        }
    }

    fn names<'a>(list: &[Candidate<'a>]) -> Vec<&'a str> {
        list.iter().map(|c| c.worker.pod).collect()
    }

    #[test]
    fn the_estimate_adds_prefill_and_queue_without_counting_ours_twice() {
        let w = ask(Policy::KvAware, 0).weights;
        let idle = estimate(1000, 600, &LoadView::default(), &w);
        assert_eq!(idle.uncached_tokens, 400);
        assert!((idle.total - 0.04).abs() < 1e-12, "{idle:?}");
        // 2 of ours in flight (300 tokens still to prefill); the scrape sees 5 waiting and 1
        // running, which includes ours: 3 others waiting, max(1, 2) running.
        let busy = LoadView {
            in_flight: 2,
            prefill_tokens: 300,
            scraped: Some(Scraped {
                waiting: 5.0,
                running: 1.0,
                kv_usage: 0.5,
            }),
            cooling: false,
            ..LoadView::default()
        };
        let c = estimate(1000, 1200, &busy, &w);
        assert_eq!(c.uncached_tokens, 0);
        assert!((c.queue - (0.03 + 0.3 + 0.02)).abs() < 1e-12, "{c:?}");
        assert!((c.kv - 0.025).abs() < 1e-12);
        assert!((c.total - (c.prefill + c.queue + c.kv)).abs() < 1e-15);
        // A peer replica's 2 requests (500 tokens to prefill) on the same pod: their prefill
        // queues ahead, they are among the scrape's 5 waiting (1 other left), and the running
        // term is max(1, 2 + 2).
        let shared = LoadView {
            peer_in_flight: 2,
            peer_prefill_tokens: 500,
            ..busy
        };
        let c = estimate(1000, 1200, &shared, &w);
        assert!((c.queue - (0.08 + 0.1 + 0.04)).abs() < 1e-12, "{c:?}");
    }

    #[test]
    fn a_peers_in_flight_prefill_turns_the_choice_as_ones_own_would() {
        // a holds the prefix (64 blocks); a peer replica has just sent it 3000 uncached
        // tokens, which the engines' scrape does not show yet.
        let peer_busy = LoadView {
            peer_in_flight: 1,
            peer_prefill_tokens: 3000,
            ..LoadView::default()
        };
        let mut list = vec![
            cand("a", 64, LoadView::default()),
            cand("b", 0, LoadView::default()),
        ];
        choose(&mut list, &ask(Policy::KvAware, 1100));
        assert_eq!(names(&list), ["a", "b"], "alone: the prefix wins");
        let mut list = vec![cand("a", 64, peer_busy), cand("b", 0, LoadView::default())];
        choose(&mut list, &ask(Policy::KvAware, 1100));
        assert_eq!(
            names(&list),
            ["b", "a"],
            "300 ms queued > 102.4 ms of prefill"
        );
        // The same load held by this replica turns it the same way.
        let own_busy = LoadView {
            in_flight: 1,
            prefill_tokens: 3000,
            ..LoadView::default()
        };
        let mut list = vec![cand("a", 64, own_busy), cand("b", 0, LoadView::default())];
        choose(&mut list, &ask(Policy::KvAware, 1100));
        assert_eq!(names(&list), ["b", "a"]);
    }

    #[test]
    fn kv_aware_leaves_a_hot_prefix_when_its_queue_costs_more_than_a_prefill() {
        // 64 cached blocks (1024 tokens) on a; b and c hold nothing.
        let queued = |n: u64| LoadView {
            in_flight: n,
            ..LoadView::default()
        };
        let mut list = vec![
            cand("c", 0, queued(0)),
            cand("a", 64, queued(3)),
            cand("b", 0, queued(1)),
        ];
        choose(&mut list, &ask(Policy::KvAware, 1100));
        assert_eq!(names(&list), ["a", "c", "b"], "3 × 10 ms < 102.4 ms");
        assert_eq!(list[0].cost.uncached_tokens, 76);
        let mut list = vec![
            cand("c", 0, queued(0)),
            cand("a", 64, queued(12)),
            cand("b", 0, queued(1)),
        ];
        choose(&mut list, &ask(Policy::KvAware, 1100));
        assert_eq!(names(&list), ["c", "b", "a"], "12 × 10 ms > 102.4 ms");
        // `prefix` stays with the hot pod whatever its queue.
        choose(&mut list, &ask(Policy::Prefix, 1100));
        assert_eq!(names(&list)[0], "a");
        // `least-load` ignores the prefix.
        choose(&mut list, &ask(Policy::LeastLoad, 1100));
        assert_eq!(names(&list), ["c", "b", "a"]);
    }

    #[test]
    fn round_robin_random_and_cool_down() {
        let mut list = vec![
            cand("b", 0, LoadView::default()),
            cand("a", 0, LoadView::default()),
            cand("c", 0, LoadView::default()),
        ];
        let mut seen = Vec::new();
        for turn in 0..3 {
            let mut a = ask(Policy::RoundRobin, 10);
            a.turn = turn;
            choose(&mut list, &a);
            seen.push(names(&list)[0]);
        }
        assert_eq!(seen, ["a", "b", "c"]);
        for (draw, want) in [(0.0, "a"), (0.5, "b"), (0.99, "c"), (1.0, "c")] {
            let mut a = ask(Policy::Random, 10);
            a.draw = draw;
            choose(&mut list, &a);
            assert_eq!(names(&list)[0], want, "draw {draw}");
        }
        // A cooling pod goes last even with the whole prompt cached.
        list[0].load.cooling = true;
        list[0].blocks = 10;
        let hot = list[0].worker.pod;
        for p in Policy::ALL {
            choose(&mut list, &ask(p, 160));
            assert_eq!(names(&list)[2], hot, "{p}");
        }
    }

    #[test]
    fn temperature_samples_cheaper_pods_more_often() {
        let mut counts = [0usize; 2];
        for k in 0..1000 {
            let mut list = vec![
                cand("a", 10, LoadView::default()),
                cand("b", 0, LoadView::default()),
            ];
            let mut a = ask(Policy::KvAware, 160);
            a.weights.temperature = 0.5;
            a.draw = (k as f64 + 0.5) / 1000.0;
            choose(&mut list, &a);
            counts[usize::from(list[0].worker.pod == "b")] += 1;
        }
        // a costs 0, b 16 ms (the largest): weights 1 and e^-2.
        let expected_b = 1000.0 * (-2.0f64).exp() / (1.0 + (-2.0f64).exp());
        assert!((counts[1] as f64 - expected_b).abs() <= 2.0, "{counts:?}");
        // Temperature 0: always the cheapest.
        let mut list = vec![
            cand("b", 0, LoadView::default()),
            cand("a", 10, LoadView::default()),
        ];
        let mut a = ask(Policy::KvAware, 160);
        a.draw = 0.99;
        choose(&mut list, &a);
        assert_eq!(names(&list)[0], "a");
    }

    #[test]
    fn policies_parse_by_name() {
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
        }
        assert!("kv_aware".parse::<Policy>().is_err());
    }
}
