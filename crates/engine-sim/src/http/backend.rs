//! The seam between the HTTP shell and an engine: the request the HTTP layer submits, the
//! events it gets back, the metrics snapshot it exports, and the [`Backend`] trait over them.
//!
//! The types are the core's (`driver`, `sched`); the simulated engine's [`EngineHandle`] is the
//! backend `kvsync sim` serves, the instant test backend another.

use tokio::sync::mpsc::Receiver;

use crate::driver::EngineHandle;
pub use crate::driver::{GenerateRequest, SubmitError, TokenEvent};
pub use crate::sched::{EngineMetrics, FinishReason};

/// An engine the HTTP layer serves. `EngineHandle` implements it; so does the test backend
/// [`crate::http::InstantBackend`].
pub trait Backend: Send + Sync + 'static {
    /// Queues the request; its events arrive on the returned bounded receiver. Dropping the
    /// receiver aborts the request.
    fn submit(&self, req: GenerateRequest) -> Result<Receiver<TokenEvent>, SubmitError>;
    /// [`Backend::submit`] by a backend that routes: also names the pod that serves the
    /// request, which the HTTP layer returns in the [`super::POD_HEADER`] header.
    fn submit_routed(
        &self,
        req: GenerateRequest,
    ) -> Result<(Receiver<TokenEvent>, Option<String>), SubmitError> {
        self.submit(req).map(|rx| (rx, None))
    }
    fn stats(&self) -> EngineMetrics;
    /// vLLM refuses (false) while requests hold blocks.
    fn reset_prefix_cache(&self) -> bool;
    fn max_model_len(&self) -> usize;
    fn block_size(&self) -> usize;
    /// Engine time in seconds: a request's arrival, from which TTFT and end-to-end latency are
    /// measured in the same clock as the events' `t`.
    fn now(&self) -> f64;
}

impl Backend for EngineHandle {
    fn submit(&self, req: GenerateRequest) -> Result<Receiver<TokenEvent>, SubmitError> {
        EngineHandle::submit(self, req)
    }
    fn stats(&self) -> EngineMetrics {
        EngineHandle::stats(self)
    }
    fn reset_prefix_cache(&self) -> bool {
        EngineHandle::reset_prefix_cache(self)
    }
    fn max_model_len(&self) -> usize {
        EngineHandle::max_model_len(self)
    }
    fn block_size(&self) -> usize {
        EngineHandle::block_size(self)
    }
    fn now(&self) -> f64 {
        EngineHandle::now(self)
    }
}
