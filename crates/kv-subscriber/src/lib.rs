//! Subscribers to vLLM's KV event publishers: one SUB (and one replay DEALER) per engine and
//! data-parallel rank, on one poller thread over libzmq, each feeding its own sink in order.
//!
//! ```text
//!  Hub::subscribe(cfg, sink) ──command──▶ poller thread (hub) ── epoll ──▶ Sub (sub)
//!                                                                  │ SUB [topic, seq, payload]
//!                                                                  │ DEALER replay replies
//!                                                                  ▼
//!                                     Sequencer (pure: order, once, replay merge, gaps, restarts)
//!                                                                  │ Delivery { seq, batch }
//!                                                                  ▼
//!                                          Sink: a bounded channel, or a function on the poller
//! ```
//!
//! - [`sequencer`]: the pure core, bytes and timeouts in, [`Action`]s and [`Delivery`]s out;
//!   decoding is `kv_events::decode`.
//! - `hub`: the owner of the poller thread, its commands, timers and libzmq contexts.
//! - `sub`: one subscriber's sockets and state, read by the poller.
//! - `subscription`: what a caller gives ([`SubscriberConfig`], [`Sink`]) and gets back
//!   ([`SubscriberEvent`], [`SubscriberCounters`]).
//! - `backoff`: the reconnect delay.

mod backoff;
mod hub;
pub mod sequencer;
mod sub;
mod subscription;

pub use backoff::Backoff;
pub use hub::{Hub, HubError, SUBS_PER_CONTEXT};
pub use sequencer::{Action, Delivery, Sequencer};
pub use subscription::{
    Sink, SubscriberConfig, SubscriberCounters, SubscriberEvent, SubscriberState, Subscription,
    SubscriptionId, MAX_HELD_BYTES, MAX_MESSAGE_BYTES,
};
