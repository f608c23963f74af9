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

/// How far a prediction may look.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Horizon {
    /// Steps the copy may run.
    pub max_steps: usize,
    /// Give up once the copy's clock passes `now + max_ttft` (a router that has a better
    /// engine already needs no more).
    pub max_ttft: f64,
}

impl Horizon {
    pub fn steps(max_steps: usize) -> Horizon {
        Horizon {
            max_steps,
            max_ttft: f64::INFINITY,
        }
    }
}

/// Runs a copy of `sched` from `now` with the request added last; `None` when the engine
/// would refuse it or no first token comes within the horizon.
pub fn first_token(
    sched: &Scheduler,
    prompt: &[u32],
    lora: Option<&Lora>,
    now: f64,
    horizon: Horizon,
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
    for steps in 1..=horizon.max_steps {
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
        if out.end - now > horizon.max_ttft {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::CostModel;
    use crate::pool::{BlockPool, HashForm};
    use crate::sched::SchedConfig;

    fn sched() -> Scheduler {
        let cfg = SchedConfig {
            max_num_batched_tokens: 1024,
            max_model_len: 2048,
            vocab: 32_000,
            ..SchedConfig::default()
        };
        let pool = BlockPool::new(512, 16, 0, HashForm::Int);
        Scheduler::new(cfg, CostModel::default(), pool).expect("config")
    }

    fn prompt(tag: u32, n: u32) -> Vec<u32> {
        (0..n).map(|i| 1000 + tag * 10_000 + i).collect()
    }

    /// Runs the real scheduler with the request added at `now`: its first token's time.
    fn actual(mut s: Scheduler, p: &[u32], now: f64) -> f64 {
        s.add(
            NewRequest {
                id: 999,
                prompt: p.to_vec(),
                max_tokens: 1,
                lora: None,
            },
            now,
        )
        .expect("add");
        loop {
            let out = s.step(now);
            assert!(!out.is_idle(), "the request never ran");
            if out.tokens.iter().any(|&(id, _)| id == 999) {
                return out.end - now;
            }
        }
    }

    #[test]
    fn prediction_is_the_schedulers_own_future() {
        let mut s = sched();
        // A queue ahead: three long prompts and a decoding one.
        for (id, n) in [(1, 900), (2, 1500), (3, 700)] {
            let r = NewRequest {
                id,
                prompt: prompt(id as u32, n),
                max_tokens: 20,
                lora: None,
            };
            s.add(r, 0.0).expect("add");
        }
        s.step(0.0);
        let p = prompt(9, 500);
        let now = s.clock() / 2.0;
        let predicted =
            first_token(&s, &p, None, now, Horizon::steps(1000)).expect("a token comes");
        assert_eq!(predicted.ahead, 3);
        assert!((predicted.ttft - actual(s.clone(), &p, now)).abs() < 1e-12);
        // Alone it is faster; with its prefix cached, faster still.
        let idle = sched();
        let alone = first_token(&idle, &p, None, 0.0, Horizon::steps(1000)).expect("token");
        assert!(
            alone.ttft < predicted.ttft / 2.0,
            "{alone:?} vs {predicted:?}"
        );
        let mut warm = sched();
        warm.add(
            NewRequest {
                id: 5,
                prompt: p.clone(),
                max_tokens: 1,
                lora: None,
            },
            0.0,
        )
        .expect("add");
        while warm.has_work() {
            warm.step(0.0);
        }
        let hit = first_token(&warm, &p, None, warm.clock(), Horizon::steps(1000)).expect("token");
        assert_eq!(hit.cached_tokens, 496);
        assert!(hit.ttft < alone.ttft / 4.0, "{hit:?} vs {alone:?}");
        // The copy leaves the engine untouched; a refused request has no prediction.
        assert_eq!(
            s.metrics().num_requests_waiting + s.metrics().num_requests_running,
            3
        );
        assert!(first_token(&idle, &prompt(1, 4000), None, 0.0, Horizon::steps(1000)).is_none());
    }
}
