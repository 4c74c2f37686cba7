//! The contracts of Surety: reliable messaging with eventual consistency, the same way on
//! every broker.
//!
//! This crate has no broker dependency. Libraries depend on it alone and hold
//! `Arc<dyn Publisher>`, `Arc<dyn Subscriber>` or `Arc<dyn Broker>`; applications pick an
//! adapter (`surety-memory`, `surety-rabbitmq`, ...) through the `surety` facade.
//!
//! - [`Message`]: a stable [`MessageId`] (the deduplication key), a destination, an
//!   optional ordering key, string headers, bytes; JSON helpers.
//! - [`Publisher`]: send with confirm, pipelined batches, oneway (at-most-once).
//! - [`TransactionalPublisher`] and [`CheckBack`]: half messages.
//! - [`Subscriber`], [`Handler`], [`Outcome`]: ack after process, bounded redelivery
//!   under a [`RetryPolicy`], dead letters.
//! - [`Error`] with an [`ErrorKind`] and a retry verdict; [`Capabilities`] per adapter,
//!   enforced in front of every adapter by [`CapabilityCheck`].
//! - [`DeadLetters`]: list and re-drive a group's dead letters on any broker.
//! - [`telemetry`]: every metric and span name.
//! - [`raw`]: for adapter authors, the publish, consume and re-drive paths every adapter
//!   shares.
#![deny(missing_docs)]

mod broker;
mod capability;
mod consume;
mod dead_letter;
mod error;
mod message;
mod panic;
mod publish;
pub mod raw;
pub mod redact;
mod retry;
pub mod telemetry;
mod transaction;
mod wire;

pub use broker::{Broker, Topology};
pub use capability::{Capabilities, Capability, CapabilityCheck};
pub use consume::{
    Delivery, Handler, HandlerError, HandlerFn, Outcome, Subscriber, Subscription,
    SubscriptionHandle, handler_fn,
};
pub use dead_letter::{DeadLetter, DeadLetters, RedriveReport, RedriveSelection};
pub use error::{Error, ErrorKind, Result};
pub use message::{
    Codec, Json, MAX_DESTINATION_LEN, MAX_HEADER_NAME_LEN, MAX_HEADER_VALUE_LEN, MAX_ID_LEN,
    Message, MessageId, headers,
};
pub use publish::{Publisher, Receipt};
pub use retry::RetryPolicy;
pub use transaction::{
    BrokerTransaction, CheckBack, CheckBackFn, LocalTransaction, TransactionalPublisher, TxOutcome,
    TxState, check_back_fn,
};

// Compile-time only: each argument proves one trait is object safe.
#[allow(dead_code, clippy::too_many_arguments)]
fn assert_object_safe(
    _: &dyn Publisher,
    _: &dyn TransactionalPublisher,
    _: &dyn Subscriber,
    _: &dyn Handler,
    _: &dyn CheckBack,
    _: &dyn Broker,
    _: &dyn BrokerTransaction,
    _: &dyn DeadLetters,
) {
}
