//! What a request would see on an engine if it arrived now: its prefix-cache hit and its time
//! to first token, predicted by running a copy of the engine's [`Scheduler`] (its exact block
//! pool, waiting queue and running set) forward on a virtual clock with the request added at
//! the back of the queue, until the step that samples its first token.
//!
//! The copy sees every request ahead — queued prefill, chunks still to compute, the decodes
//! sharing each step, preemptions when the pool runs out — and the cost model, so the
//! prediction is exact for an engine that receives nothing else before that token. It is the
//! oracle router's reading of an engine ([`crate::fleet`]): the limit any router can reach.

use crate::pool::Lora;
use crate::sched::{NewRequest, ReqId, Scheduler};

/// The id the predicted request takes in the copy (the driver numbers requests from 0).
const PROBE: ReqId = ReqId::MAX;

/// A request's predicted fate on one engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Seconds (engine time) from `now` to its first token.
    pub ttft: f64,
    /// Prompt tokens it finds in the prefix cache when it is scheduled.
    pub cached_tokens: usize,
    /// Requests waiting or running ahead of it.
    pub ahead: usize,
    /// Steps simulated.
    pub steps: usize,
}

/// Runs a copy of `sched` from `now` with the request added last; `None` when the engine
/// would refuse it or no first token comes within `max_steps` steps.
pub fn first_token(
    sched: &Scheduler,
    prompt: &[u32],
    lora: Option<&Lora>,
    now: f64,
    max_steps: usize,
) -> Option<Prediction> {
    let mut copy = sched.clone();
    let m = copy.metrics();
    let ahead = m.num_requests_running + m.num_requests_waiting;
    copy.pool_mut().take_events();
    copy.add(
        NewRequest {
            id: PROBE,
            prompt: prompt.to_vec(),
            max_tokens: 1,
            lora: lora.cloned(),
        },
        now,
    )
    .ok()?;
    let mut cached_tokens = 0;
    for steps in 1..=max_steps {
        let out = copy.step(now);
        if out.is_idle() {
            return None;
        }
        if let Some(a) = out.admitted.iter().find(|a| a.id == PROBE && !a.resumed) {
            cached_tokens = a.cached_tokens;
        }
        if out.tokens.iter().any(|&(id, _)| id == PROBE) {
            return Some(Prediction {
                ttft: out.end - now,
                cached_tokens,
                ahead,
                steps,
            });
        }
    }
    None
}
