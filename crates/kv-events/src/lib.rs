//! vLLM KV cache events: the typed events, a decoder for every wire shape vLLM 0.9–0.33 (and
//! SGLang) publish, the ZeroMQ frame layouts, and an encoder that reproduces vLLM's bytes.
//!
//! ```text
//!  ZeroMQ frames ──frames::parse_live / parse_replay──▶ (seq, payload)
//!                                                          │ decode()
//!                                                          ▼
//!                                       EventBatch { ts, events: [Event], dp rank }
//!                                                          │ encode(format)  (tests, simulator)
//!                                                          ▼
//!                                        the bytes that vLLM version would have sent
//! ```
//!
//! The decoder is pure (`&[u8]` in, owned events out), never panics on input, and trusts no
//! length header beyond the bytes that follow it.

mod decode;
mod encode;
pub mod frames;
pub mod msgpack;
mod sequencer;
mod subscriber;
mod types;

pub use decode::{decode, DecodeError, DecodeErrorKind};
pub use encode::{encode, encode_into, Shape, WireFormat};
pub use frames::{parse_live, parse_replay, FrameError, LiveMessage, ReplayMessage};
pub use sequencer::{Action, Delivery, Sequencer};
pub use subscriber::{
    Backoff, Hub, HubError, Sink, SubscriberConfig, SubscriberCounters, SubscriberEvent,
    SubscriberState, Subscription, SubscriptionId, SUBS_PER_CONTEXT,
};
pub use types::{BlockHash, BlockRemoved, BlockStored, ByteHash, Event, EventBatch, Medium};
