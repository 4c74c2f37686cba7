//! One error type for every Surety operation, with a portable kind and a retry verdict.
//!
//! Callers decide whether to retry by asking [`Error::is_retryable`], never by matching
//! a broker client's own error types.

use std::fmt;

/// What went wrong, independent of the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The broker or database could not be reached, or the connection dropped before
    /// anything was sent. Retrying can help.
    Unavailable,
    /// The request was sent but its outcome was lost (connection dropped while a confirm
    /// was pending, timeout). The broker may or may not hold the message: retry, and rely
    /// on the message id to absorb a duplicate.
    OutcomeUnknown,
    /// The broker took the message but did not confirm it as durable (RocketMQ
    /// `FLUSH_DISK_TIMEOUT`, `FLUSH_SLAVE_TIMEOUT`, `SLAVE_NOT_AVAILABLE`).
    NotDurable,
    /// No queue, topic or route exists for the destination. Retrying the same message
    /// will not help until the topology changes.
    Unroutable,
    /// The broker refused the message (RabbitMQ `nack`, Kafka broker error). Whether a
    /// retry can help is carried by the error itself.
    Rejected,
    /// The message is invalid: empty or malformed id, destination or header, a payload
    /// that does not decode, or a size over the limit.
    InvalidMessage,
    /// The adapter does not offer the requested capability.
    Unsupported,
    /// The configuration is wrong (bad URL, topology mismatch, invalid table name).
    Configuration,
    /// The broker or database refused the credentials (wrong password, unknown user, a
    /// client certificate it does not accept). Retrying with the same settings will not
    /// help.
    Authentication,
    /// The credentials were accepted but do not allow the operation (publish to a topic,
    /// consume a group, use a transactional id). Retrying will not help until the rights
    /// change.
    Authorization,
    /// The local store (outbox, inbox, prepared messages) failed.
    Storage,
    /// The client is in a state it cannot leave on its own (fenced Kafka producer, closed
    /// publisher).
    Fatal,
}

impl ErrorKind {
    /// Whether an error of this kind is retryable unless the adapter says otherwise.
    pub const fn retryable_by_default(self) -> bool {
        matches!(
            self,
            ErrorKind::Unavailable
                | ErrorKind::OutcomeUnknown
                | ErrorKind::NotDurable
                | ErrorKind::Storage
        )
    }

    /// A short stable name, used in metrics labels and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::OutcomeUnknown => "outcome_unknown",
            ErrorKind::NotDurable => "not_durable",
            ErrorKind::Unroutable => "unroutable",
            ErrorKind::Rejected => "rejected",
            ErrorKind::InvalidMessage => "invalid_message",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Configuration => "configuration",
            ErrorKind::Authentication => "authentication",
            ErrorKind::Authorization => "authorization",
            ErrorKind::Storage => "storage",
            ErrorKind::Fatal => "fatal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error of every Surety operation.
///
/// It carries a [`ErrorKind`], a verdict on whether retrying can help, a message, context
/// pairs (adapter, operation, destination...) and the underlying cause. Adapters never put
/// credentials into any of these.
pub struct Error {
    kind: ErrorKind,
    retryable: bool,
    message: String,
    context: Vec<(&'static str, String)>,
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind`, retryable as the kind is by default.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            retryable: kind.retryable_by_default(),
            message: message.into(),
            context: Vec::new(),
            source: None,
        }
    }

    /// Shorthand for an [`ErrorKind::InvalidMessage`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidMessage, message)
    }

    /// Overrides the retry verdict.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Adds a context pair (never a secret).
    pub fn with_context(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.context.push((key, value.into()));
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether trying the same operation again can succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The human-readable message, without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The context pairs.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }

    /// The value of one context key, if present.
    pub fn context_value(&self, key: &str) -> Option<&str> {
        self.context
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.message, self.kind)?;
        f.write_str(if self.retryable {
            ", retryable"
        } else {
            ", permanent"
        })?;
        for (k, v) in &self.context {
            write!(f, ", {k}={v}")?;
        }
        f.write_str(")")?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("retryable", &self.retryable)
            .field("message", &self.message)
            .field("context", &self.context)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// The result of every Surety operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_carry_a_default_retry_verdict() {
        assert!(Error::new(ErrorKind::OutcomeUnknown, "lost confirm").is_retryable());
        assert!(!Error::new(ErrorKind::Unroutable, "no queue").is_retryable());
        assert!(
            Error::new(ErrorKind::Rejected, "nack")
                .with_retryable(true)
                .is_retryable()
        );
    }

    #[test]
    fn display_names_kind_verdict_and_context() {
        let e = crate::Capability::BrokerTransactions.unsupported("memory");
        let text = e.to_string();
        assert!(text.contains("unsupported"), "{text}");
        assert!(text.contains("permanent"), "{text}");
        assert!(text.contains("adapter=memory"), "{text}");
        assert_eq!(e.context_value("operation"), Some("broker transactions"));
    }
}
