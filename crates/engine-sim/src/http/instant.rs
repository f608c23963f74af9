//! [`InstantBackend`]: a [`Backend`] on the block pool that answers every request at once, on
//! a virtual clock that advances a fixed amount per token. For the HTTP layer's tests and for
//! anyone who needs vLLM's API without a scheduler; the simulator proper is the core's engine.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc::{self, Receiver, Sender};

use super::backend::{
    Backend, EngineMetrics, FinishReason, GenerateRequest, SubmitError, TokenEvent,
};
use crate::pool::{BlockPool, HashForm};
use crate::tokenizer::output_tokens;

/// The engine seconds one step takes on the virtual clock.
pub const STEP_SECONDS: f64 = 0.01;
/// At most this many stalled requests are kept; more are refused as overloaded.
const MAX_STALLED: usize = 1024;

/// How an [`InstantBackend`] is built.
#[derive(Debug, Clone)]
pub struct InstantConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_model_len: usize,
    pub vocab: u32,
    /// `Some(n)`: each request sends `Scheduled` and `n` tokens, then stalls (holds its sender)
    /// until the receiver is dropped, so tests can watch a client going away.
    pub stall_after: Option<usize>,
}

impl Default for InstantConfig {
    fn default() -> InstantConfig {
        InstantConfig {
            num_blocks: 1024,
            block_size: 16,
            max_model_len: 4096,
            vocab: 32_000,
            stall_after: None,
        }
    }
}

struct State {
    pool: BlockPool,
    now: f64,
    stats: EngineMetrics,
    /// Senders of stalled requests, for tests to watch (bounded by `MAX_STALLED`).
    stalled_tx: Sender<Sender<TokenEvent>>,
    /// Stalled requests whose receiver may still be open (for `num_requests_running`).
    running: Vec<Sender<TokenEvent>>,
}

/// Serves each request in full when submitted: a prefill step, then one step per token.
#[derive(Clone)]
pub struct InstantBackend {
    cfg: InstantConfig,
    state: Arc<Mutex<State>>,
    stalled_rx: Arc<tokio::sync::Mutex<Receiver<Sender<TokenEvent>>>>,
}

impl InstantBackend {
    pub fn new(cfg: InstantConfig) -> InstantBackend {
        let pool = BlockPool::new(cfg.num_blocks, cfg.block_size, 0, HashForm::Int);
        let (stalled_tx, stalled_rx) = mpsc::channel(MAX_STALLED);
        InstantBackend {
            cfg,
            state: Arc::new(Mutex::new(State {
                pool,
                now: 0.0,
                stats: EngineMetrics::default(),
                stalled_tx,
                running: Vec::new(),
            })),
            stalled_rx: Arc::new(tokio::sync::Mutex::new(stalled_rx)),
        }
    }

    /// The sender of the next stalled request (see [`InstantConfig::stall_after`]), once one
    /// is submitted: `closed().await` on it returns when the HTTP side drops the receiver.
    pub async fn next_stalled(&self) -> Option<Sender<TokenEvent>> {
        self.stalled_rx.lock().await.recv().await
    }

    fn serve(&self, req: GenerateRequest, tx: &Sender<TokenEvent>) -> Result<bool, SubmitError> {
        let mut st = self.state.lock();
        let st = &mut *st;
        let mut running = st
            .pool
            .start(&req.prompt, req.lora.clone())
            .map_err(|_| SubmitError::Overloaded)?;
        let prompt_tokens = req.prompt.len();
        let cached_tokens = running.hit_tokens;
        st.stats.prefix_cache_queries += prompt_tokens as u64;
        st.stats.prefix_cache_hits += cached_tokens as u64;
        st.stats.prompt_tokens += prompt_tokens as u64;
        let send = |ev: TokenEvent| tx.try_send(ev).is_ok();
        send(TokenEvent::Scheduled {
            t: st.now,
            cached_tokens,
        });
        let limit = self.cfg.stall_after.unwrap_or(usize::MAX);
        let mut completion_tokens = 0;
        for id in output_tokens(&req.prompt, req.max_tokens, self.cfg.vocab) {
            if completion_tokens == limit {
                break;
            }
            st.now += STEP_SECONDS;
            if st.pool.append(&mut running, id).is_err() {
                break;
            }
            completion_tokens += 1;
            st.stats.generation_tokens += 1;
            send(TokenEvent::Token { t: st.now, id });
        }
        st.pool.finish(running);
        if self.cfg.stall_after.is_some() {
            return Ok(true);
        }
        st.stats.requests_finished += 1;
        send(TokenEvent::Finished {
            t: st.now,
            reason: FinishReason::Length,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
        });
        Ok(false)
    }
}

impl Backend for InstantBackend {
    fn submit(&self, req: GenerateRequest) -> Result<Receiver<TokenEvent>, SubmitError> {
        if req.prompt.len() + req.max_tokens > self.cfg.max_model_len {
            return Err(SubmitError::Overloaded);
        }
        let (tx, rx) = mpsc::channel(req.max_tokens + 2);
        if self.serve(req, &tx)? {
            let mut st = self.state.lock();
            st.running.retain(|t| !t.is_closed());
            if st.running.len() == MAX_STALLED || st.stalled_tx.try_send(tx.clone()).is_err() {
                return Err(SubmitError::Overloaded);
            }
            st.running.push(tx);
        }
        Ok(rx)
    }

    fn stats(&self) -> EngineMetrics {
        let st = self.state.lock();
        let usable = self.cfg.num_blocks - 1;
        EngineMetrics {
            num_requests_running: st.running.iter().filter(|t| !t.is_closed()).count(),
            kv_cache_usage: (usable - st.pool.free_blocks()) as f64 / usable as f64,
            ..st.stats.clone()
        }
    }

    fn reset_prefix_cache(&self) -> bool {
        self.state.lock().pool.reset()
    }

    fn max_model_len(&self) -> usize {
        self.cfg.max_model_len
    }

    fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    fn now(&self) -> f64 {
        self.state.lock().now
    }
}
