//! The oracle router: a [`Backend`] over the whole fleet that sends each request to the engine
//! with the lowest predicted time to first token, read from every engine's exact state at
//! routing time ([`EngineHandle::predict`]: its block pool, waiting queue, running set and
//! cost model, run forward on a copy). No router outside the engines can know more, so its
//! latency is the reference a real router is measured against (issue 22's `oracle` policy).
//!
//! Ties (equal predictions, e.g. idle engines none of which holds the prefix) go to the
//! engine with the fewest requests ahead, then in turn from a rotating start, so an idle
//! fleet is filled evenly. Predictions run on the caller's thread, the least busy engines
//! first: the best so far is the horizon of the next, so a deep queue costs the copy's steps
//! up to that time only (at most [`MAX_STEPS`]).
//!
//! Requests it routes go to the engines' handles, not through their HTTP servers: the
//! engines' `/metrics` gauges and counters see them, the latency histograms of the oracle's
//! own `/metrics` do (its gauges and counters are the fleet's sums).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::Receiver;

use super::Slot;
use crate::http::{Backend, EngineMetrics, GenerateRequest, SubmitError, TokenEvent};
use crate::predict::{Horizon, Prediction};

/// Steps a prediction may simulate; an engine needing more counts as hopeless.
pub const MAX_STEPS: usize = 4096;

/// Routes over the fleet's engines (restarts included: it reads the slots each time).
pub(super) struct Oracle {
    slots: Arc<[Arc<Slot>]>,
    next: AtomicUsize,
    max_model_len: usize,
    block_size: usize,
    /// The engines' shared clock (holding no engine: a restart must free the old one's ports).
    epoch: Instant,
    speed: f64,
}

impl Oracle {
    pub(super) fn new(slots: Arc<[Arc<Slot>]>, epoch: Instant) -> Oracle {
        let (max_model_len, block_size, speed) = slots[0]
            .with_handle(|h| (h.max_model_len(), h.block_size(), h.speed()))
            .unwrap_or((0, 1, 1.0));
        Oracle {
            max_model_len,
            block_size,
            epoch,
            speed,
            slots,
            next: AtomicUsize::new(0),
        }
    }
}

/// The better of two engines' predictions (see the module doc for ties).
fn better(a: (usize, Option<Prediction>), b: (usize, Option<Prediction>)) -> bool {
    match (a.1, b.1) {
        (Some(_), None) => true,
        (None, _) => false,
        (Some(pa), Some(pb)) => {
            let eps = 1e-9 * pa.ttft.abs().max(pb.ttft.abs()).max(1.0);
            if (pa.ttft - pb.ttft).abs() > eps {
                pa.ttft < pb.ttft
            } else {
                pa.ahead < pb.ahead
            }
        }
    }
}

/// The engines in order of preference for `req`, best first; `start` rotates the order of
/// equals.
pub(super) fn rank(predictions: &[Option<Prediction>], start: usize) -> Vec<usize> {
    let n = predictions.len();
    let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n.max(1)).collect();
    // A stable insertion sort: equals keep the rotated order.
    for i in 1..order.len() {
        let mut j = i;
        while j > 0
            && better(
                (order[j], predictions[order[j]]),
                (order[j - 1], predictions[order[j - 1]]),
            )
        {
            order.swap(j, j - 1);
            j -= 1;
        }
    }
    order
}

impl Backend for Oracle {
    fn submit(&self, req: GenerateRequest) -> Result<Receiver<TokenEvent>, SubmitError> {
        self.submit_routed(req).map(|(rx, _)| rx)
    }

    fn submit_routed(
        &self,
        req: GenerateRequest,
    ) -> Result<(Receiver<TokenEvent>, Option<String>), SubmitError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // The least busy engines first: the best prediction so far bounds the others'.
        let n = self.slots.len();
        let mut order: Vec<(usize, usize)> = (0..n)
            .map(|k| (start + k) % n)
            .map(|i| {
                let m = self.slots[i].with_handle(|h| h.stats()).unwrap_or_default();
                (m.num_requests_running + m.num_requests_waiting, i)
            })
            .collect();
        order.sort_by_key(|&(ahead, _)| ahead);
        let mut predictions: Vec<Option<Prediction>> = vec![None; n];
        let mut best = f64::INFINITY;
        for (_, i) in order {
            let horizon = Horizon {
                max_steps: MAX_STEPS,
                max_ttft: best,
            };
            let p = self.slots[i]
                .with_handle(|h| h.predict(&req.prompt, req.lora.as_ref(), horizon))
                .flatten();
            if let Some(p) = p {
                best = best.min(p.ttft);
            }
            predictions[i] = p;
        }
        let mut last = SubmitError::Stopped;
        for i in rank(&predictions, start) {
            let slot = &self.slots[i];
            let submitted = slot
                .with_handle(|h| h.submit(req.clone()))
                .unwrap_or(Err(SubmitError::Stopped));
            match submitted {
                Ok(rx) => {
                    tracing::debug!(
                        engine = %slot.name,
                        prediction = ?predictions[i],
                        "oracle routed"
                    );
                    return Ok((rx, Some(slot.name.clone())));
                }
                // Invalid on one engine is invalid on all (they share their limits).
                Err(e @ SubmitError::Invalid(_)) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The fleet's sums (KV cache usage: the mean).
    fn stats(&self) -> EngineMetrics {
        let mut sum = EngineMetrics::default();
        for s in self.slots.iter() {
            let m = s.with_handle(|h| h.stats()).unwrap_or_default();
            sum.num_requests_running += m.num_requests_running;
            sum.num_requests_waiting += m.num_requests_waiting;
            sum.kv_cache_usage += m.kv_cache_usage / self.slots.len() as f64;
            sum.prefix_cache_queries += m.prefix_cache_queries;
            sum.prefix_cache_hits += m.prefix_cache_hits;
            sum.num_preemptions += m.num_preemptions;
            sum.prompt_tokens += m.prompt_tokens;
            sum.generation_tokens += m.generation_tokens;
            sum.requests_finished += m.requests_finished;
        }
        sum
    }

    /// Every engine's; true when all reset.
    fn reset_prefix_cache(&self) -> bool {
        let mut all = true;
        for s in self.slots.iter() {
            all &= s.with_handle(|h| h.reset_prefix_cache()).unwrap_or(false);
        }
        all
    }

    fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64() * self.speed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ttft: f64, ahead: usize) -> Option<Prediction> {
        Some(Prediction {
            ttft,
            cached_tokens: 0,
            ahead,
            steps: 1,
        })
    }

    #[test]
    fn ranks_by_ttft_then_queue_then_rotation() {
        assert_eq!(rank(&[p(0.3, 0), p(0.1, 5), p(0.2, 0)], 0), vec![1, 2, 0]);
        assert_eq!(rank(&[p(0.1, 2), p(0.1, 1), None], 0), vec![1, 0, 2]);
        assert_eq!(rank(&[p(0.1, 0), p(0.1, 0), p(0.1, 0)], 1), vec![1, 2, 0]);
        assert_eq!(rank(&[None, p(9.0, 9)], 0), vec![1, 0]);
        assert!(rank(&[], 3).is_empty());
    }
}
