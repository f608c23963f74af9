//! The cost model: how long one engine step lasts, from what the step computes.
//!
//! A vLLM step is one forward pass over a batch that mixes decoding sequences (one token each)
//! and prefill chunks (chunked prefill shares the step with decode). Its duration here is
//!
//! ```text
//! step = step_overhead
//!      + prefill_step_overhead            (only when the step prefills)
//!      + per_prefill_token  × prefilled tokens
//!      + per_decode_seq     × decoding sequences
//!      + per_context_token  × tokens of attention context read
//! ```
//!
//! where the context read is, for each decoding sequence, its length so far, and for each
//! prefill chunk, the tokens before it (its earlier chunks or its cached prefix). So decode
//! slows with the batch and with its context, and a long prefill chunk slows the decodes that
//! share its step: what a fixed per-token figure cannot show.
//!
//! # Calibration of the default profile, `llama3-8b-h100`
//! Public figures:
//! - vLLM's v0.6.0 performance post (blog.vllm.ai, September 2024): about 13 ms per output
//!   token (TPOT) for Llama-3-8B on one H100 under light load.
//! - llm-d's inference simulator (`llm-d-inference-sim`) ships an estimate for an 8B model on
//!   an H100: time to first token = 30 ms + 250 µs per prompt token, and 12 ms per output
//!   token.
//!
//! Derivation (values in [`CostModel::llama3_8b_h100`]):
//! - `step_overhead = 12 ms`: llm-d's time per output token of a lone request is the cost of a
//!   decode step whose batch is one short sequence, i.e. the fixed part (reading 16 GB of
//!   weights at 3.35 TB/s is 4.8 ms of it; launch, sampling and scheduling the rest).
//! - `prefill_step_overhead = 18 ms`, `per_prefill_token = 250 µs`: a lone prompt of P tokens
//!   is prefilled in one step (P ≤ `max_num_batched_tokens`) whose first token ends the
//!   prefill, so TTFT = 12 ms + 18 ms + 250 µs × P = llm-d's 30 ms + 250 µs × P. (vLLM replays
//!   CUDA graphs for decode-only batches and runs prefill batches piecewise: a prefilling step
//!   does pay more fixed cost.)
//! - `per_context_token = 40 ns`: Llama-3-8B keeps 32 layers × 8 KV heads × 128 dims × 2 (K and
//!   V) × 2 bytes = 128 KiB of KV cache per token; reading it at 3.35 TB/s takes 39 ns.
//! - `per_decode_seq = 100 µs`: a sequence's share of the matmuls (2 × 8 GFLOP at ~400 TFLOP/s
//!   effective = 40 µs) plus its sampling and output processing.
//! - Check against vLLM's 13 ms at light load: a batch of 4 sequences of 4,000 tokens costs
//!   12 ms + 4 × 0.1 ms + 16,000 × 40 ns = 13.04 ms.
//!
//! # Other profiles, derived from the default by hardware ratios
//! - `llama3-70b-4xh100` (tensor parallel 4): 70.6 B / 8.0 B parameters = 8.8× the work, split
//!   over 4 GPUs = 2.2× per GPU: overheads and per-token prefill × 2.2 (26.4 ms, 39.6 ms,
//!   550 µs; the all-reduces are taken as covered by the rounding up). KV per token 80 layers × 8 heads × 128 × 2 × 2 B = 320 KiB,
//!   a quarter per GPU: 80 KiB at 3.35 TB/s = 24 ns. Per sequence 200 µs.
//! - `llama3-8b-a100` (A100 80 GB): the memory-bound terms scale with bandwidth, 3.35 / 2.04
//!   TB/s = 1.64× (19.7 ms and 29.5 ms overheads, 66 ns per context token, 160 µs per
//!   sequence); the compute-bound prefill with dense BF16 throughput, 989 / 312 TFLOP/s = 3.2×
//!   (800 µs per prompt token).

use std::fmt;

/// What one step computes, as the cost model needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepShape {
    /// Prompt (or recomputed) tokens computed in this step, over all prefill chunks.
    pub prefill_tokens: usize,
    /// Sequences that decode one token in this step.
    pub decode_seqs: usize,
    /// Tokens of KV cache the step's attention reads (see the module doc).
    pub context_tokens: usize,
}

impl StepShape {
    pub fn is_empty(&self) -> bool {
        self.prefill_tokens == 0 && self.decode_seqs == 0
    }
}

/// A named set of cost parameters, all in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct CostModel {
    pub name: &'static str,
    /// Fixed cost of any step (weights read, kernel launches, scheduling, sampling setup).
    pub step_overhead: f64,
    /// Extra fixed cost of a step that prefills (no full CUDA graph for mixed batches).
    pub prefill_step_overhead: f64,
    /// Per prompt token computed.
    pub per_prefill_token: f64,
    /// Per sequence decoding a token.
    pub per_decode_seq: f64,
    /// Per token of KV cache the attention reads.
    pub per_context_token: f64,
}

/// An unknown profile name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cost profile {0:?}; known: {known}", known = CostModel::NAMES.join(", "))]
pub struct UnknownProfile(pub String);

impl CostModel {
    /// The names [`CostModel::by_name`] knows, the default first.
    pub const NAMES: [&'static str; 3] = ["llama3-8b-h100", "llama3-70b-4xh100", "llama3-8b-a100"];

    /// Llama-3-8B on one H100: the default (see the module doc for the arithmetic).
    pub fn llama3_8b_h100() -> CostModel {
        CostModel {
            name: "llama3-8b-h100",
            step_overhead: 12e-3,
            prefill_step_overhead: 18e-3,
            per_prefill_token: 250e-6,
            per_decode_seq: 100e-6,
            per_context_token: 40e-9,
        }
    }

    /// Llama-3-70B on four H100s, tensor parallel.
    pub fn llama3_70b_4xh100() -> CostModel {
        CostModel {
            name: "llama3-70b-4xh100",
            step_overhead: 26.4e-3,
            prefill_step_overhead: 39.6e-3,
            per_prefill_token: 550e-6,
            per_decode_seq: 200e-6,
            per_context_token: 24e-9,
        }
    }

    /// Llama-3-8B on one A100 80 GB.
    pub fn llama3_8b_a100() -> CostModel {
        CostModel {
            name: "llama3-8b-a100",
            step_overhead: 19.7e-3,
            prefill_step_overhead: 29.5e-3,
            per_prefill_token: 800e-6,
            per_decode_seq: 160e-6,
            per_context_token: 66e-9,
        }
    }

    pub fn by_name(name: &str) -> Result<CostModel, UnknownProfile> {
        match name {
            "llama3-8b-h100" => Ok(CostModel::llama3_8b_h100()),
            "llama3-70b-4xh100" => Ok(CostModel::llama3_70b_4xh100()),
            "llama3-8b-a100" => Ok(CostModel::llama3_8b_a100()),
            other => Err(UnknownProfile(other.to_owned())),
        }
    }

    /// The duration of a step of this shape (0 for an empty step: nothing runs).
    pub fn step_time(&self, s: &StepShape) -> f64 {
        if s.is_empty() {
            return 0.0;
        }
        let prefill = if s.prefill_tokens > 0 {
            self.prefill_step_overhead + self.per_prefill_token * s.prefill_tokens as f64
        } else {
            0.0
        };
        self.step_overhead
            + prefill
            + self.per_decode_seq * s.decode_seqs as f64
            + self.per_context_token * s.context_tokens as f64
    }

    /// Time to first token of a lone request whose `prompt` tokens are all computed in one
    /// step, `cached` of them found in the prefix cache.
    pub fn ttft_alone(&self, prompt: usize, cached: usize) -> f64 {
        self.step_time(&StepShape {
            prefill_tokens: prompt - cached,
            decode_seqs: 0,
            context_tokens: cached,
        })
    }

    /// Inter-token latency of `batch` sequences decoding together at `context` tokens each.
    pub fn itl(&self, batch: usize, context: usize) -> f64 {
        self.step_time(&StepShape {
            prefill_tokens: 0,
            decode_seqs: batch,
            context_tokens: batch * context,
        })
    }
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel::llama3_8b_h100()
    }
}

impl fmt::Display for CostModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: step {:.1} ms (+{:.1} ms prefilling), {:.0} us/prompt token, {:.0} us/decoding seq, {:.0} ns/context token",
            self.name,
            self.step_overhead * 1e3,
            self.prefill_step_overhead * 1e3,
            self.per_prefill_token * 1e6,
            self.per_decode_seq * 1e6,
            self.per_context_token * 1e9
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn default_profile_reproduces_its_sources() {
        let m = CostModel::default();
        // llm-d: TTFT = 30 ms + 250 us x prompt tokens; 12 ms per output token (batch 1, short).
        for p in [1, 100, 2000] {
            assert!(close(m.ttft_alone(p, 0), 0.030 + 250e-6 * p as f64), "{p}");
        }
        assert!((m.itl(1, 0) - 0.012).abs() < 2e-4);
        // vLLM v0.6: ~13 ms at light load (4 sequences of 4k tokens).
        assert!((m.itl(4, 4000) - 0.013).abs() < 1e-4);
    }

    #[test]
    fn decode_grows_with_batch_and_context_and_shares_with_prefill() {
        let m = CostModel::default();
        assert!(m.itl(64, 1000) > m.itl(16, 1000));
        assert!(m.itl(16, 8000) > m.itl(16, 1000));
        let mixed = StepShape {
            prefill_tokens: 512,
            decode_seqs: 16,
            context_tokens: 16_000,
        };
        assert!(m.step_time(&mixed) > m.itl(16, 1000) + 512.0 * m.per_prefill_token);
        assert_eq!(m.step_time(&StepShape::default()), 0.0);
        // A cached prefix is read, not recomputed.
        assert!(m.ttft_alone(1000, 992) < m.ttft_alone(1000, 0) / 5.0);
    }

    #[test]
    fn profiles_by_name() {
        for n in CostModel::NAMES {
            assert_eq!(CostModel::by_name(n).expect("known").name, n);
        }
        let err = CostModel::by_name("gpt-5").expect_err("unknown");
        assert!(err.to_string().contains("llama3-8b-h100"), "{err}");
        assert_eq!(CostModel::default().name, CostModel::NAMES[0]);
    }
}
