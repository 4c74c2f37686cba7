//! librdkafka errors mapped to Surety's error kinds.

use rdkafka::error::{KafkaError, RDKafkaError, RDKafkaErrorCode as Code};
use surety_core::{Error, ErrorKind};

use crate::ADAPTER;

/// Maps the error of a delivery report (or of enqueueing a message) to an error kind.
///
/// The idempotent producer already retried transient errors for `delivery.timeout.ms`:
/// what reaches here is either permanent or an outcome nobody knows.
pub(crate) fn delivery_error(e: &KafkaError, destination: &str) -> Error {
    let code = e.rdkafka_error_code();
    let (kind, retryable, text) = match code {
        Some(Code::MessageSizeTooLarge | Code::MessageBatchTooLarge | Code::InvalidRecord) => (
            ErrorKind::InvalidMessage,
            false,
            "the broker refused the message as too large or malformed",
        ),
        Some(Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition) => (
            ErrorKind::Unroutable,
            false,
            "the topic does not exist (declare it first)",
        ),
        Some(Code::InvalidTopic) => (ErrorKind::InvalidMessage, false, "invalid topic name"),
        Some(Code::TopicAuthorizationFailed | Code::ClusterAuthorizationFailed) => (
            ErrorKind::Rejected,
            false,
            "not authorized to write to the topic",
        ),
        Some(Code::QueueFull) => (
            ErrorKind::Unavailable,
            true,
            "the producer queue is full; nothing was sent",
        ),
        Some(Code::NotEnoughReplicasAfterAppend) => (
            ErrorKind::NotDurable,
            true,
            "written to the leader but not to enough replicas",
        ),
        Some(Code::NotEnoughReplicas) => (
            ErrorKind::Unavailable,
            true,
            "not enough in-sync replicas; nothing was written",
        ),
        Some(Code::MessageTimedOut | Code::PurgeInflight | Code::PurgeQueue) => (
            ErrorKind::OutcomeUnknown,
            true,
            "no delivery report within the delivery timeout; the message may or may not be stored",
        ),
        Some(Code::Fatal | Code::ProducerFenced | Code::InvalidProducerEpoch) => (
            ErrorKind::OutcomeUnknown,
            true,
            "the producer hit a fatal error and is rebuilt; the message may or may not be stored",
        ),
        _ => (
            ErrorKind::OutcomeUnknown,
            true,
            "the broker did not confirm the message",
        ),
    };
    Error::new(kind, text)
        .with_retryable(retryable)
        .with_context("adapter", ADAPTER)
        .with_context("destination", destination)
        .with_source(e.clone())
}

/// Maps an error of a metadata, admin or commit call.
pub(crate) fn broker_error(what: &str, e: &KafkaError) -> Error {
    let kind = match e.rdkafka_error_code() {
        Some(
            Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::GroupAuthorizationFailed,
        ) => ErrorKind::Configuration,
        _ => ErrorKind::Unavailable,
    };
    Error::new(kind, format!("{what} failed"))
        .with_context("adapter", ADAPTER)
        .with_source(e.clone())
}

/// How librdkafka classifies a transaction error, and what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxnClass {
    /// The same call can be retried.
    Retriable,
    /// The transaction must be aborted; the producer stays usable.
    AbortRequired,
    /// The producer is fenced or broken: it must be dropped and rebuilt.
    Fatal,
    /// Anything else (timeouts of non-retriable calls, invalid state).
    Other,
}

pub(crate) fn classify(e: &KafkaError) -> TxnClass {
    match e {
        KafkaError::Transaction(t) => classify_rd(t),
        _ => TxnClass::Other,
    }
}

fn classify_rd(t: &RDKafkaError) -> TxnClass {
    if t.is_fatal() {
        TxnClass::Fatal
    } else if t.txn_requires_abort() {
        TxnClass::AbortRequired
    } else if t.is_retriable() {
        TxnClass::Retriable
    } else {
        TxnClass::Other
    }
}

/// A Surety error for a failed transaction call.
pub(crate) fn transaction_error(what: &str, e: &KafkaError) -> Error {
    let class = classify(e);
    let (kind, retryable) = match class {
        TxnClass::Fatal => (ErrorKind::Fatal, false),
        TxnClass::AbortRequired => (ErrorKind::Rejected, true),
        TxnClass::Retriable => (ErrorKind::Unavailable, true),
        TxnClass::Other => (ErrorKind::OutcomeUnknown, true),
    };
    Error::new(kind, format!("{what} failed ({class:?})"))
        .with_retryable(retryable)
        .with_context("adapter", ADAPTER)
        .with_source(e.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_errors_map_to_kinds() {
        let kind = |c| delivery_error(&KafkaError::MessageProduction(c), "t").kind();
        assert_eq!(kind(Code::MessageSizeTooLarge), ErrorKind::InvalidMessage);
        assert_eq!(kind(Code::UnknownTopicOrPartition), ErrorKind::Unroutable);
        assert_eq!(kind(Code::MessageTimedOut), ErrorKind::OutcomeUnknown);
        assert_eq!(kind(Code::QueueFull), ErrorKind::Unavailable);
        assert!(
            !delivery_error(&KafkaError::MessageProduction(Code::UnknownTopic), "t").is_retryable()
        );
        assert!(
            delivery_error(&KafkaError::MessageProduction(Code::MessageTimedOut), "t")
                .is_retryable()
        );
    }
}
