//! What an adapter can do, declared once and enforced in one place.
//!
//! An adapter declares its [`Capabilities`]; [`CapabilityCheck`] (applied by
//! `surety::connect`, the conformance runner and the CLI) rejects a call that needs a
//! capability the adapter lacks before the call reaches the adapter. Every
//! [`ErrorKind::Unsupported`] error is built here, by [`Capability::unsupported`].

mod check;

use std::fmt;

pub use check::CapabilityCheck;

use crate::error::{Error, ErrorKind, Result};

/// One capability an adapter may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// Fire-and-forget publish (at-most-once).
    OnewayPublish,
    /// `send_in_transaction` with a check-back listener (native or store-backed).
    HalfMessages,
    /// Half messages kept by the broker itself (RocketMQ), not by Surety's store.
    NativeHalfMessages,
    /// Broker-native transactions (RabbitMQ tx, Kafka transactional producer).
    BrokerTransactions,
    /// Messages with one key are consumed in publish order.
    OrderingPerKey,
    /// `Outcome::Retry { after }` honours the delay.
    DelayedRetry,
    /// Exhausted or rejected messages go to a dead-letter destination.
    DeadLetter,
    /// Consume-process-produce inside one broker transaction (Kafka).
    ConsumerExactlyOnce,
}

impl Capability {
    /// A stable name for reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Capability::OnewayPublish => "oneway publish",
            Capability::HalfMessages => "half messages",
            Capability::NativeHalfMessages => "native half messages",
            Capability::BrokerTransactions => "broker transactions",
            Capability::OrderingPerKey => "ordering per key",
            Capability::DelayedRetry => "delayed retry",
            Capability::DeadLetter => "dead letter",
            Capability::ConsumerExactlyOnce => "consumer exactly-once",
        }
    }
}

impl Capability {
    /// The error for an operation that needs this capability, called on `adapter`, which
    /// does not have it: [`ErrorKind::Unsupported`], permanent, naming both.
    pub fn unsupported(self, adapter: &str) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!("{adapter} does not support {}", self.as_str()),
        )
        .with_context("adapter", adapter)
        .with_context("operation", self.as_str())
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The capabilities of one adapter. Confirmed publish and ack-after-process consumption
/// are not listed: every adapter has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// See [`Capability::OnewayPublish`].
    pub oneway_publish: bool,
    /// See [`Capability::HalfMessages`].
    pub half_messages: bool,
    /// See [`Capability::NativeHalfMessages`].
    pub native_half_messages: bool,
    /// See [`Capability::BrokerTransactions`].
    pub broker_transactions: bool,
    /// See [`Capability::OrderingPerKey`].
    pub ordering_per_key: bool,
    /// See [`Capability::DelayedRetry`].
    pub delayed_retry: bool,
    /// See [`Capability::DeadLetter`].
    pub dead_letter: bool,
    /// See [`Capability::ConsumerExactlyOnce`].
    pub consumer_exactly_once: bool,
    /// Largest message the adapter accepts, in bytes (payload, key and headers).
    pub max_message_size: Option<usize>,
}

impl Capabilities {
    /// No optional capability.
    pub fn none() -> Self {
        Capabilities::default()
    }

    /// Whether the adapter has `capability`.
    pub fn supports(&self, capability: Capability) -> bool {
        match capability {
            Capability::OnewayPublish => self.oneway_publish,
            Capability::HalfMessages => self.half_messages,
            Capability::NativeHalfMessages => self.native_half_messages,
            Capability::BrokerTransactions => self.broker_transactions,
            Capability::OrderingPerKey => self.ordering_per_key,
            Capability::DelayedRetry => self.delayed_retry,
            Capability::DeadLetter => self.dead_letter,
            Capability::ConsumerExactlyOnce => self.consumer_exactly_once,
        }
    }

    /// `Ok` if the adapter has `capability`, else an [`ErrorKind::Unsupported`] error
    /// naming adapter and capability.
    pub fn require(&self, adapter: &str, capability: Capability) -> Result<()> {
        if self.supports(capability) {
            Ok(())
        } else {
            Err(capability.unsupported(adapter))
        }
    }

    /// Sets one capability (builder style, for adapters).
    pub fn with(mut self, capability: Capability) -> Self {
        let flag = match capability {
            Capability::OnewayPublish => &mut self.oneway_publish,
            Capability::HalfMessages => &mut self.half_messages,
            Capability::NativeHalfMessages => &mut self.native_half_messages,
            Capability::BrokerTransactions => &mut self.broker_transactions,
            Capability::OrderingPerKey => &mut self.ordering_per_key,
            Capability::DelayedRetry => &mut self.delayed_retry,
            Capability::DeadLetter => &mut self.dead_letter,
            Capability::ConsumerExactlyOnce => &mut self.consumer_exactly_once,
        };
        *flag = true;
        self
    }

    /// Sets the size limit.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = Some(bytes);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_names_adapter_and_capability() {
        let caps = Capabilities::none().with(Capability::DeadLetter);
        assert!(caps.require("x", Capability::DeadLetter).is_ok());
        let e = caps
            .require("x", Capability::BrokerTransactions)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.to_string()
                .contains("x does not support broker transactions")
        );
    }
}
