//! The scheduler on a virtual clock (no sleeps, no wall clock), against a simple reference
//! model: every scheduled token is computed once unless its request is preempted; every
//! request ends (no starvation) with the tokens `output_tokens` predicts; blocks are conserved
//! (`BlockPool::check`, all free at the end); each admission's prefix hit equals what the
//! published KV events say is cached; a burst on one engine queues as the cost model predicts.

use engine_sim::sched::Admitted;
use engine_sim::{
    output_tokens, BlockPool, CostModel, HashForm, NewRequest, ReqId, SchedConfig, Scheduler,
    StepShape,
};
use kv_events::{BlockHash, Event};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

const VOCAB: u32 = 50_000;

/// One request of a scenario.
#[derive(Debug, Clone)]
struct Spec {
    at: f64,
    prompt: Vec<u32>,
    max_tokens: usize,
    /// Aborted by the client at this time, if still running.
    abort_at: Option<f64>,
}

/// The reference model's view of one request.
#[derive(Debug, Default)]
struct Model {
    tokens: Vec<u32>,
    computed: usize,
    admitted: bool,
    outputs: Vec<u32>,
    first_token: Option<f64>,
    finished_at: Option<f64>,
    aborted: bool,
}

#[derive(Debug, Default)]
struct Trace {
    reqs: BTreeMap<ReqId, Model>,
    steps: usize,
    preemptions: usize,
    recomputed: usize,
    end: f64,
}

/// Replays KV events into the multiset of cached hashes a subscriber would hold.
#[derive(Default)]
struct EventView(HashMap<BlockHash, usize>);

impl EventView {
    fn apply(&mut self, e: &Event) {
        match e {
            Event::BlockStored(s) => {
                for h in &s.block_hashes {
                    *self.0.entry(*h).or_default() += 1;
                }
            }
            Event::BlockRemoved(r) => {
                for h in &r.block_hashes {
                    let n = self.0.get_mut(h).expect("removed hash was stored");
                    *n -= 1;
                    if *n == 0 {
                        self.0.remove(h);
                    }
                }
            }
            Event::AllBlocksCleared => self.0.clear(),
        }
    }
}

fn run(sched: &mut Scheduler, specs: &[Spec]) -> Trace {
    let cfg = sched.config().clone();
    let bs = sched.pool().block_size();
    let form = sched.pool().hash_form();
    let mut trace = Trace::default();
    let mut view = EventView::default();
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by(|&a, &b| specs[a].at.total_cmp(&specs[b].at));
    let mut next = 0;
    let mut clock = 0.0f64;
    loop {
        while next < order.len() && specs[order[next]].at <= clock {
            let i = order[next];
            let s = &specs[i];
            let id = i as ReqId;
            let r = NewRequest {
                id,
                prompt: s.prompt.clone(),
                max_tokens: s.max_tokens,
                lora: None,
            };
            sched.add(r, clock).expect("valid request");
            trace.reqs.insert(
                id,
                Model {
                    tokens: s.prompt.clone(),
                    ..Model::default()
                },
            );
            next += 1;
        }
        for (i, s) in specs.iter().enumerate() {
            let id = i as ReqId;
            if let (Some(t), Some(m)) = (s.abort_at, trace.reqs.get_mut(&id)) {
                if t <= clock && m.finished_at.is_none() && !m.aborted {
                    assert!(sched.abort(id), "request {id} is live");
                    m.aborted = true;
                }
            }
        }
        if !sched.has_work() {
            if next == order.len() {
                break;
            }
            clock = specs[order[next]].at;
            continue;
        }
        let out = sched.step(clock);
        trace.steps += 1;
        assert!(trace.steps < 200_000, "no progress: starvation");
        assert!(!out.is_idle(), "work remains but nothing was scheduled");
        check_step(&cfg, &out.scheduled);
        // Admissions: the hit is what the events published so far say is cached.
        let mut applied = 0;
        for Admitted {
            id,
            cached_tokens,
            event_index,
            ..
        } in &out.admitted
        {
            for e in &out.events[applied..*event_index] {
                view.apply(e);
            }
            applied = *event_index;
            let m = trace.reqs.get_mut(id).expect("known");
            assert!(!m.admitted && m.computed == 0, "{id} admitted twice");
            let hashes = sched.pool_mut().block_hashes(&m.tokens, None);
            let max_blocks = (m.tokens.len() - 1) / bs;
            let want = hashes
                .iter()
                .take(max_blocks)
                .take_while(|h| view.0.contains_key(&form.external(h)))
                .count()
                * bs;
            assert_eq!(*cached_tokens, want, "{id}: hit vs the event stream");
            m.admitted = true;
            m.computed = *cached_tokens;
        }
        for e in &out.events[applied..] {
            view.apply(e);
        }
        for id in &out.preempted {
            let m = trace.reqs.get_mut(id).expect("known");
            trace.preemptions += 1;
            trace.recomputed += m.computed;
            m.computed = 0;
            m.admitted = false;
        }
        let sampled: HashMap<ReqId, u32> = out.tokens.iter().copied().collect();
        assert_eq!(sampled.len(), out.tokens.len(), "one token per request");
        for &(id, n) in &out.scheduled {
            let m = trace.reqs.get_mut(&id).expect("known");
            assert!(m.admitted, "{id} scheduled while waiting");
            assert!(
                n >= 1 && m.computed + n <= m.tokens.len(),
                "{id} computes a token twice"
            );
            m.computed += n;
            let caught_up = m.computed == m.tokens.len();
            assert_eq!(
                caught_up,
                sampled.contains_key(&id),
                "{id} samples iff caught up"
            );
            if let Some(&t) = sampled.get(&id) {
                m.tokens.push(t);
                m.outputs.push(t);
                m.first_token.get_or_insert(out.end);
            }
        }
        for f in &out.finished {
            let m = trace.reqs.get_mut(&f.id).expect("known");
            assert_eq!(f.completion_tokens, m.outputs.len());
            assert_eq!(
                m.computed + 1,
                m.tokens.len(),
                "the last token is never computed"
            );
            m.finished_at = Some(out.end);
        }
        sched.pool().check();
        clock = out.end;
    }
    trace.end = clock;
    // Blocks conserved: everything is free again.
    let pool = sched.pool();
    assert_eq!(pool.free_blocks(), pool.num_blocks() - 1, "blocks leaked");
    assert_eq!(sched.metrics().kv_cache_usage, 0.0);
    for (id, m) in &trace.reqs {
        let s = &specs[*id as usize];
        if m.aborted {
            continue;
        }
        assert!(m.finished_at.is_some(), "{id} never finished");
        let room = cfg.max_model_len - s.prompt.len();
        let want = s.max_tokens.min(room).max(1);
        assert_eq!(
            m.outputs,
            output_tokens(&s.prompt, want, VOCAB),
            "{id}'s output"
        );
    }
    trace
}

fn check_step(cfg: &SchedConfig, scheduled: &[(ReqId, usize)]) {
    let total: usize = scheduled.iter().map(|s| s.1).sum();
    assert!(total <= cfg.max_num_batched_tokens, "token budget");
    assert!(scheduled.len() <= cfg.max_num_seqs, "max_num_seqs");
}

/// vLLM's defaults, with the tests' vocabulary.
fn config() -> SchedConfig {
    SchedConfig {
        vocab: VOCAB,
        ..SchedConfig::default()
    }
}

fn scheduler(blocks: usize, bs: usize, cfg: SchedConfig) -> Scheduler {
    let pool = BlockPool::new(blocks, bs, 0, HashForm::Int);
    Scheduler::new(cfg, CostModel::default(), pool).expect("config")
}

fn spec_strategy(max_prompt: usize) -> impl Strategy<Value = Spec> {
    (
        0..4u32,
        0..48usize,
        1..max_prompt - 48,
        1..24usize,
        0..20u32,
        prop::option::weighted(0.15, 0..40u32),
    )
        .prop_map(|(family, shared, own, max_tokens, at, abort)| {
            let at = f64::from(at) * 0.05;
            let mut prompt: Vec<u32> = (0..shared as u32)
                .map(|i| 1000 + family * 100 + i)
                .collect();
            prompt.extend((0..own as u32).map(|i| 5000 + (at * 1000.0) as u32 * 64 + i * 7));
            Spec {
                at,
                prompt,
                max_tokens,
                abort_at: abort.map(|a| at + f64::from(a) * 0.05),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Small pools (preemption), small budgets (chunking), few seats; aborts on the way.
    #[test]
    fn scheduler_matches_the_reference_model(
        specs in prop::collection::vec(spec_strategy(120), 1..24),
        blocks in 31usize..80,
        budget in prop::sample::select(vec![8usize, 33, 8192]),
        seats in prop::sample::select(vec![1usize, 3, 256]),
    ) {
        let cfg = SchedConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: seats,
            max_model_len: 120,
            max_waiting: 64,
            vocab: VOCAB,
        };
        let mut s = scheduler(blocks, 4, cfg);
        let trace = run(&mut s, &specs);
        let m = s.metrics();
        prop_assert_eq!(m.num_preemptions as usize, trace.preemptions);
        prop_assert_eq!(m.num_requests_running + m.num_requests_waiting, 0);
    }
}

#[test]
fn a_full_pool_preempts_the_latest_and_recomputes_it() {
    // 9 usable blocks of 4 tokens; two requests of 12-token prompts that grow to 30 tokens each
    // cannot both fit: the later one is preempted, goes back to the front, and is recomputed.
    let cfg = SchedConfig {
        max_model_len: 36,
        vocab: VOCAB,
        ..SchedConfig::default()
    };
    let mut s = scheduler(10, 4, cfg);
    let specs: Vec<Spec> = (0..2u32)
        .map(|k| Spec {
            at: 0.0,
            prompt: (0..12).map(|i| 100 * (k + 1) + i).collect(),
            max_tokens: 18,
            abort_at: None,
        })
        .collect();
    let trace = run(&mut s, &specs);
    assert!(trace.preemptions >= 1);
    assert!(trace.recomputed > 0);
    let (a, b) = (&trace.reqs[&0], &trace.reqs[&1]);
    assert!(
        a.finished_at < b.finished_at,
        "the earlier request is not the victim"
    );
    assert_eq!(s.metrics().num_preemptions as usize, trace.preemptions);
}

#[test]
fn a_repeated_prompt_hits_its_full_blocks_and_skips_their_prefill() {
    let mut s = scheduler(600, 16, config());
    let prompt: Vec<u32> = (0..100).collect();
    let specs = vec![
        Spec {
            at: 0.0,
            prompt: prompt.clone(),
            max_tokens: 4,
            abort_at: None,
        },
        Spec {
            at: 10.0,
            prompt,
            max_tokens: 4,
            abort_at: None,
        },
    ];
    let trace = run(&mut s, &specs);
    let m = s.metrics();
    assert_eq!(m.prefix_cache_queries, 200);
    assert_eq!(m.prefix_cache_hits, 96, "six full blocks of 16");
    let cost = CostModel::default();
    let ttft = |id: ReqId, at: f64| trace.reqs[&id].first_token.expect("token") - at;
    assert!((ttft(0, 0.0) - cost.ttft_alone(100, 0)).abs() < 1e-9);
    assert!((ttft(1, 10.0) - cost.ttft_alone(100, 96)).abs() < 1e-9);
}

/// 32 long distinct prompts at once: TTFT spread on one engine, and on four.
fn burst(engines: usize) -> (Vec<f64>, f64) {
    let per = 32 / engines;
    let mut firsts = Vec::new();
    let mut end = 0.0f64;
    for e in 0..engines {
        let mut s = scheduler(8192, 16, config());
        let specs: Vec<Spec> = (0..per)
            .map(|k| {
                let base = ((e * per + k) as u32 + 1) * 10_000;
                Spec {
                    at: 0.0,
                    prompt: (base..base + 2000).collect(),
                    max_tokens: 16,
                    abort_at: None,
                }
            })
            .collect();
        let trace = run(&mut s, &specs);
        firsts.extend(trace.reqs.values().map(|m| m.first_token.expect("token")));
        end = end.max(trace.end);
    }
    firsts.sort_by(f64::total_cmp);
    (firsts, end)
}

#[test]
fn a_burst_on_one_engine_queues_as_the_cost_model_predicts() {
    let cost = CostModel::default();
    let (one, one_end) = burst(1);
    // The first step prefills 8192 tokens (four prompts and a chunk of the fifth).
    let full_step = cost.step_time(&StepShape {
        prefill_tokens: 8192,
        decode_seqs: 0,
        context_tokens: 0,
    });
    assert!(
        (one[0] - full_step).abs() < 1e-9,
        "{} vs {full_step}",
        one[0]
    );
    // The last first token waits for all 64,000 prompt tokens: at least eight prefilling
    // steps; the decodes sharing them add a little.
    let total: f64 = 32.0 * 2000.0;
    let floor = (total / 8192.0).ceil() * (cost.step_overhead + cost.prefill_step_overhead)
        + total * cost.per_prefill_token;
    let last = one[31];
    assert!(
        last >= floor && last <= floor * 1.05,
        "last TTFT {last:.3} s, cost model {floor:.3} s"
    );
    assert!(last > 5.0 * one[0], "queueing: {last:.3} vs {:.3}", one[0]);

    let (four, four_end) = burst(4);
    let floor4 = 2.0 * (cost.step_overhead + cost.prefill_step_overhead)
        + total / 4.0 * cost.per_prefill_token;
    assert!(four[31] >= floor4 && four[31] <= floor4 * 1.05);
    assert!(four[31] < last / 3.0 && four_end < one_end / 2.0);
}

#[test]
fn bad_requests_and_configs_are_refused() {
    use engine_sim::sched::{AddError, ConfigError};
    let mut s = scheduler(
        64,
        4,
        SchedConfig {
            max_model_len: 100,
            max_waiting: 1,
            ..SchedConfig::default()
        },
    );
    let req = |id, n, max_tokens| NewRequest {
        id,
        prompt: vec![7; n],
        max_tokens,
        lora: None,
    };
    assert_eq!(s.add(req(1, 0, 1), 0.0), Err(AddError::EmptyPrompt));
    assert_eq!(s.add(req(1, 3, 0), 0.0), Err(AddError::NoOutput));
    assert!(matches!(
        s.add(req(1, 101, 1), 0.0),
        Err(AddError::PromptTooLong { len: 101, .. })
    ));
    s.add(req(1, 3, 1), 0.0).expect("valid");
    assert_eq!(s.add(req(1, 3, 1), 0.0), Err(AddError::Duplicate(1)));
    assert_eq!(s.add(req(2, 3, 1), 0.0), Err(AddError::QueueFull(1)));
    assert!(s.abort(1) && !s.abort(1));
    let pool = BlockPool::new(8, 4, 0, HashForm::Int);
    let err = Scheduler::new(SchedConfig::default(), CostModel::default(), pool)
        .expect_err("8192 tokens do not fit 28");
    assert!(matches!(err, ConfigError::PoolTooSmall { .. }));
}

#[test]
fn reset_is_refused_while_blocks_are_held() {
    let mut s = scheduler(
        64,
        4,
        SchedConfig {
            max_model_len: 100,
            ..SchedConfig::default()
        },
    );
    let r = NewRequest {
        id: 1,
        prompt: (0..10).collect(),
        max_tokens: 3,
        lora: None,
    };
    s.add(r, 0.0).expect("valid");
    let out = s.step(0.0);
    assert_eq!(out.tokens.len(), 1);
    assert!(!s.reset_prefix_cache());
    assert!(s.abort(1));
    assert!(s.reset_prefix_cache());
    let out = s.step(1.0);
    assert!(out.is_idle());
    assert_eq!(out.events, vec![Event::AllBlocksCleared]);
}

/// A long prompt arriving while others decode is chunked into their steps: those steps carry
/// both decodes and a prefill chunk, and last longer than the pure decode steps around them.
#[test]
fn chunked_prefill_shares_steps_with_decode() {
    let mut s = scheduler(
        2048,
        16,
        SchedConfig {
            max_num_batched_tokens: 512,
            vocab: VOCAB,
            ..SchedConfig::default()
        },
    );
    for id in 0..4u64 {
        let r = NewRequest {
            id,
            prompt: (0..64).map(|i| id as u32 * 1000 + i).collect(),
            max_tokens: 40,
            lora: None,
        };
        s.add(r, 0.0).expect("valid");
    }
    let mut clock = 0.0;
    for _ in 0..5 {
        clock = s.step(clock).end;
    }
    let decode_only = s.step(clock);
    assert_eq!(
        (
            decode_only.shape.decode_seqs,
            decode_only.shape.prefill_tokens
        ),
        (4, 0)
    );
    let long = NewRequest {
        id: 9,
        prompt: (50_000..52_000).collect(),
        max_tokens: 1,
        lora: None,
    };
    s.add(long, decode_only.end).expect("valid");
    let mixed = s.step(decode_only.end);
    // Four decodes first, then 508 tokens of the new prompt.
    assert_eq!(
        (mixed.shape.decode_seqs, mixed.shape.prefill_tokens),
        (4, 508)
    );
    assert_eq!(mixed.tokens.len(), 4, "the chunk samples nothing");
    assert!(mixed.end - mixed.start > 5.0 * (decode_only.end - decode_only.start));
    let cost = CostModel::default();
    let want = cost.step_time(&mixed.shape);
    assert!((mixed.end - mixed.start - want).abs() < 1e-12);
}
