//! vLLM KV cache events, the codec alone: the typed events, a decoder for every wire shape vLLM
//! 0.9–0.33 (and SGLang) publish, the ZeroMQ frame layouts, and an encoder that reproduces
//! vLLM's bytes. No sockets, no threads: the subscribers are the `kv-subscriber` crate.
//!
//! - `types`: [`Event`], [`EventBatch`], [`BlockHash`], [`Medium`];
//! - `decode`: `&[u8]` → [`EventBatch`] for every shape; [`msgpack`]: the reader and writer;
//! - `encode`: an [`EventBatch`] → the bytes a [`WireFormat`] (vLLM version) sends;
//! - [`frames`]: live `[topic, seq, payload]` and replay reply layouts, the replay request.
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
mod types;

pub use decode::{decode, DecodeError, DecodeErrorKind};
pub use encode::{encode, encode_into, Shape, WireFormat};
pub use frames::{parse_live, parse_replay, FrameError, LiveMessage, ReplayMessage};
pub use types::{BlockHash, BlockRemoved, BlockStored, ByteHash, Event, EventBatch, Medium};
