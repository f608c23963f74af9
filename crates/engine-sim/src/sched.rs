//! vLLM v1's scheduler as a pure state machine on a clock: no threads, no sockets, no wall
//! clock. [`Scheduler::add`] queues a request, [`Scheduler::abort`] drops one,
//! [`Scheduler::step`] runs one engine step starting at `now` and says what it did and when it
//! ends (its duration from the [`CostModel`]).
//!
//! One step, as `vllm/v1/core/sched/scheduler.py` (`schedule`, `update_from_output`) does it
//! with chunked prefill and first-come-first-served policy:
//!
//! 1. Token budget `max_num_batched_tokens`. The running requests, in admission order, each
//!    get the tokens they still need (one for a decoding request, the rest of its prompt,
//!    capped by the budget, for a request whose prefill is chunked). Blocks are allocated for
//!    them ([`BlockPool::allocate_slots`]); when the pool cannot, the most recently admitted
//!    running request is preempted (its blocks freed, back to the front of the waiting queue,
//!    to be recomputed), until the allocation succeeds or the request itself was preempted.
//! 2. If nothing was preempted: while budget remains and fewer than `max_num_seqs` run, the
//!    head of the waiting queue takes its prefix-cache hit ([`BlockPool::computed_blocks`]),
//!    then as much of the rest of its tokens as the budget allows; if its blocks cannot be
//!    allocated it stays at the head and admission stops (no overtaking).
//! 3. The step lasts what the cost model gives for its shape. At its end every request whose
//!    computed tokens reached its length samples one token (a chunked prefill that is not
//!    finished samples none). A request ends at `max_tokens` output tokens or at
//!    `max_model_len` tokens (both are vLLM's `FinishReason.LENGTH`) and frees its blocks.
//!
//! Output tokens are [`OutputTokens`] of the prompt: deterministic, so tests can predict them.
//! Counters are vLLM's `/metrics` values ([`EngineMetrics`]); prefix-cache queries and hits
//! are counted in tokens each time a request is admitted from the waiting queue (a preempted
//! request counts again when it is readmitted, as vLLM's `get_computed_blocks` does).

use std::collections::VecDeque;

use hashbrown::HashMap;
use kv_events::Event;

use crate::cost::{CostModel, StepShape};
use crate::pool::{BlockPool, Lora, Request};
use crate::tokenizer::OutputTokens;

/// The scheduler's name for a request (the driver maps request ids to these).
pub type ReqId = u64;

/// Scheduler limits (vLLM's flags of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedConfig {
    /// Tokens computed per step, over all requests (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Requests running at once (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Prompt plus output tokens of one request (`--max-model-len`).
    pub max_model_len: usize,
    /// Requests waiting at most; more are refused ([`AddError::QueueFull`]).
    pub max_waiting: usize,
    /// Output token ids are drawn from `[1000, vocab)`.
    pub vocab: u32,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            max_model_len: 8192,
            max_waiting: 16_384,
            vocab: 128_000,
        }
    }
}

/// A request to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    pub id: ReqId,
    pub prompt: Vec<u32>,
    /// Output tokens at most (the request also ends at `max_model_len`).
    pub max_tokens: usize,
    pub lora: Option<Lora>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    NoOutput,
    #[error("the prompt has {len} tokens, more than max_model_len {max_model_len}")]
    PromptTooLong { len: usize, max_model_len: usize },
    #[error("request {0} is already queued or running")]
    Duplicate(ReqId),
    #[error("{0} requests are waiting already")]
    QueueFull(usize),
}

/// A configuration the pool cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("max_model_len {max_model_len} needs more than the pool's {usable_tokens} tokens")]
    PoolTooSmall {
        max_model_len: usize,
        usable_tokens: usize,
    },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` or `max_model_len` reached.
    Length,
    /// A stop condition (the simulator generates no end-of-sequence token, so never yet).
    Stop,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// A request leaving the waiting queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub id: ReqId,
    /// Tokens found in the prefix cache.
    pub cached_tokens: usize,
    /// Readmitted after a preemption (it was reported the first time).
    pub resumed: bool,
    /// How many of the step's [`StepOutcome::events`] precede its prefix lookup.
    pub event_index: usize,
}

/// A request that ended in this step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub id: ReqId,
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Its prefix-cache hit when first admitted (vLLM's `num_cached_tokens`).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutcome {
    /// Engine time the step started and ended (seconds); equal when nothing ran.
    pub start: f64,
    pub end: f64,
    pub shape: StepShape,
    /// Requests and the tokens computed for them in this step.
    pub scheduled: Vec<(ReqId, usize)>,
    pub admitted: Vec<Admitted>,
    pub preempted: Vec<ReqId>,
    /// Tokens sampled at `end`, in schedule order.
    pub tokens: Vec<(ReqId, u32)>,
    pub finished: Vec<Finished>,
    /// The block pool's KV events since the previous step (aborts and resets between steps
    /// included), in order.
    pub events: Vec<Event>,
}

impl StepOutcome {
    /// Nothing was scheduled.
    pub fn is_idle(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// What vLLM's `/metrics` needs, as running values and counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineMetrics {
    pub num_requests_running: usize,
    pub num_requests_waiting: usize,
    /// 0..1, used blocks / usable blocks.
    pub kv_cache_usage: f64,
    /// Tokens queried (vLLM counts tokens).
    pub prefix_cache_queries: u64,
    /// Tokens hit.
    pub prefix_cache_hits: u64,
    pub num_preemptions: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub requests_finished: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    req: Request,
    max_tokens: usize,
    /// Tokens whose KV is computed (vLLM's `num_computed_tokens`).
    computed: usize,
    outputs: usize,
    gen: OutputTokens,
    /// The hit at first admission.
    cached_tokens: Option<usize>,
}

/// The scheduler of one engine.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: SchedConfig,
    cost: CostModel,
    pool: BlockPool,
    waiting: VecDeque<ReqId>,
    running: Vec<ReqId>,
    reqs: HashMap<ReqId, Entry>,
    clock: f64,
    metrics: EngineMetrics,
}

impl Scheduler {
    /// A scheduler over `pool`; refused when one request of `max_model_len` tokens could not
    /// fit the pool alone (it would wait forever).
    pub fn new(cfg: SchedConfig, cost: CostModel, pool: BlockPool) -> Result<Self, ConfigError> {
        for (name, v) in [
            ("max_num_batched_tokens", cfg.max_num_batched_tokens),
            ("max_num_seqs", cfg.max_num_seqs),
            ("max_model_len", cfg.max_model_len),
            ("max_waiting", cfg.max_waiting),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        let usable_tokens = (pool.num_blocks() - 1) * pool.block_size();
        if cfg.max_model_len > usable_tokens {
            return Err(ConfigError::PoolTooSmall {
                max_model_len: cfg.max_model_len,
                usable_tokens,
            });
        }
        Ok(Scheduler {
            cfg,
            cost,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reqs: HashMap::new(),
            clock: 0.0,
            metrics: EngineMetrics::default(),
        })
    }

    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    pub fn cost(&self) -> &CostModel {
        &self.cost
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// The pool, for lookups that hash (e.g. [`BlockPool::peek_hit_tokens`]).
    pub fn pool_mut(&mut self) -> &mut BlockPool {
        &mut self.pool
    }

    /// The end of the last step (engine seconds).
    pub fn clock(&self) -> f64 {
        self.clock
    }

    /// Requests waiting or running.
    pub fn has_work(&self) -> bool {
        !self.reqs.is_empty()
    }

    pub fn is_running(&self, id: ReqId) -> bool {
        self.running.contains(&id)
    }

    /// Queues a request at the back of the waiting queue (first come, first served: the order
    /// of the calls). `now`, its arrival, is not needed by the policy: it is scheduled by the
    /// next step, which starts at or after it.
    pub fn add(&mut self, r: NewRequest, now: f64) -> Result<(), AddError> {
        let _ = now;
        if r.prompt.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        if r.max_tokens == 0 {
            return Err(AddError::NoOutput);
        }
        if r.prompt.len() > self.cfg.max_model_len {
            return Err(AddError::PromptTooLong {
                len: r.prompt.len(),
                max_model_len: self.cfg.max_model_len,
            });
        }
        if self.reqs.contains_key(&r.id) {
            return Err(AddError::Duplicate(r.id));
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(AddError::QueueFull(self.waiting.len()));
        }
        let gen = OutputTokens::new(&r.prompt, self.cfg.vocab);
        let req = self.pool.request(&r.prompt, r.lora);
        self.reqs.insert(
            r.id,
            Entry {
                req,
                max_tokens: r.max_tokens,
                computed: 0,
                outputs: 0,
                gen,
                cached_tokens: None,
            },
        );
        self.waiting.push_back(r.id);
        Ok(())
    }

    /// Drops a request wherever it is and frees its blocks; false if it is unknown (finished
    /// already, or never added).
    pub fn abort(&mut self, id: ReqId) -> bool {
        let Some(mut e) = self.reqs.remove(&id) else {
            return false;
        };
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
        } else if let Some(i) = self.waiting.iter().position(|&r| r == id) {
            self.waiting.remove(i);
        }
        self.pool.free(&mut e.req);
        true
    }

    /// vLLM's `reset_prefix_cache`: refused (false) while a request holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset()
    }

    pub fn metrics(&self) -> EngineMetrics {
        let usable = (self.pool.num_blocks() - 1) as f64;
        EngineMetrics {
            num_requests_running: self.running.len(),
            num_requests_waiting: self.waiting.len(),
            kv_cache_usage: 1.0 - self.pool.free_blocks() as f64 / usable,
            ..self.metrics.clone()
        }
    }

    /// Runs one step starting at `max(now, end of the previous step)`.
    pub fn step(&mut self, now: f64) -> StepOutcome {
        let start = now.max(self.clock);
        let mut out = StepOutcome {
            start,
            end: start,
            ..StepOutcome::default()
        };
        let mut budget = self.cfg.max_num_batched_tokens;
        self.schedule_running(&mut budget, &mut out);
        if out.preempted.is_empty() {
            self.schedule_waiting(&mut budget, &mut out);
        }
        let mut shape = StepShape::default();
        for &(id, n) in &out.scheduled {
            let e = &self.reqs[&id];
            if n == 1 && e.computed >= e.req.prompt_tokens {
                shape.decode_seqs += 1;
            } else {
                shape.prefill_tokens += n;
            }
            shape.context_tokens += e.computed;
        }
        out.shape = shape;
        out.end = start + self.cost.step_time(&shape);
        self.clock = out.end;
        self.update(&mut out);
        out.events = self.pool.take_events();
        out
    }

    fn schedule_running(&mut self, budget: &mut usize, out: &mut StepOutcome) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let e = &self.reqs[&id];
            let n = (e.req.tokens().len() - e.computed).min(*budget);
            let mut scheduled = false;
            loop {
                let e = self.reqs.get_mut(&id).expect("running requests are known");
                if self
                    .pool
                    .allocate_slots(&mut e.req, &[], e.computed, n)
                    .is_ok()
                {
                    scheduled = true;
                    break;
                }
                let victim = self.running.pop().expect("the request itself runs");
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == id {
                    break;
                }
            }
            if !scheduled {
                break;
            }
            out.scheduled.push((id, n));
            *budget -= n;
            i += 1;
        }
    }

    fn preempt(&mut self, id: ReqId) {
        let e = self
            .reqs
            .get_mut(&id)
            .expect("preempted requests are known");
        self.pool.free(&mut e.req);
        e.computed = 0;
        self.waiting.push_front(id);
        self.metrics.num_preemptions += 1;
    }

    fn schedule_waiting(&mut self, budget: &mut usize, out: &mut StepOutcome) {
        let bs = self.pool.block_size();
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let e = self.reqs.get_mut(&id).expect("waiting requests are known");
            let hits = self.pool.computed_blocks(&e.req);
            let cached = hits.len() * bs;
            let len = e.req.tokens().len();
            let n = (len - cached).min(*budget);
            let event_index = self.pool.pending_events();
            if self
                .pool
                .allocate_slots(&mut e.req, &hits, cached, n)
                .is_err()
            {
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            e.computed = cached;
            e.req.hit_tokens = cached;
            let resumed = e.cached_tokens.is_some();
            e.cached_tokens.get_or_insert(cached);
            self.metrics.prefix_cache_queries += len as u64;
            self.metrics.prefix_cache_hits += cached as u64;
            out.admitted.push(Admitted {
                id,
                cached_tokens: cached,
                resumed,
                event_index,
            });
            out.scheduled.push((id, n));
            *budget -= n;
        }
    }

    /// The end of the step: computed tokens advance, requests that caught up sample a token,
    /// finished ones free their blocks.
    fn update(&mut self, out: &mut StepOutcome) {
        let mut done = Vec::new();
        for &(id, n) in &out.scheduled {
            let e = self
                .reqs
                .get_mut(&id)
                .expect("scheduled requests are known");
            e.computed += n;
            if e.computed < e.req.tokens().len() {
                continue;
            }
            let t = e.gen.next().expect("OutputTokens is endless");
            self.pool.push_token(&mut e.req, t);
            e.outputs += 1;
            if e.outputs == 1 {
                self.metrics.prompt_tokens += e.req.prompt_tokens as u64;
            }
            self.metrics.generation_tokens += 1;
            out.tokens.push((id, t));
            if e.outputs >= e.max_tokens || e.req.tokens().len() >= self.cfg.max_model_len {
                done.push(id);
            }
        }
        if done.is_empty() {
            return;
        }
        self.running.retain(|r| !done.contains(r));
        for id in done {
            let mut e = self.reqs.remove(&id).expect("finished requests are known");
            self.pool.free(&mut e.req);
            self.metrics.requests_finished += 1;
            out.finished.push(Finished {
                id,
                reason: FinishReason::Length,
                prompt_tokens: e.req.prompt_tokens,
                cached_tokens: e.cached_tokens.unwrap_or(0),
                completion_tokens: e.outputs,
            });
        }
    }
}
