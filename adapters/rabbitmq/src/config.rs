//! Settings of the RabbitMQ adapter, from a URL or the environment.

use std::fmt;
use std::time::Duration;

use surety_core::redact::{redact_text, redact_url};
use surety_core::{Error, ErrorKind, Result, RetryPolicy};

/// The queue type of a consumer group's queue (and of the dead-letter holding queues).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    /// Raft-replicated, always durable; gives `x-delivery-count` on redelivery, so the
    /// attempt count keeps growing across consumer crashes. The default.
    Quorum,
    /// Classic durable queue with persistent messages. A redelivery after a crash is seen
    /// through the `redelivered` flag only, so repeated crashes count as one extra attempt.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub const fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(Error::new(
                ErrorKind::Configuration,
                format!("unknown RabbitMQ queue type {other:?}; expected quorum or classic"),
            )),
        }
    }
}

/// Settings of a [`crate::RabbitBroker`].
///
/// The URL carries host, port, vhost, credentials and TLS (`amqps://`); it is never logged
/// nor put into an error: [`RabbitConfig::redacted_url`] is what appears instead.
#[derive(Clone)]
pub struct RabbitConfig {
    /// `amqp://user:pass@host:port/vhost` or `amqps://...` (TLS through rustls, with the
    /// system's root certificates).
    pub url: String,
    /// Type of the group queues and dead-letter holding queues.
    pub queue_type: QueueType,
    /// Type of the retry delay queues. Classic by default: they expire when idle (a
    /// quorum queue's expiry lease is not renewed by re-declaring it, so a quorum delay
    /// queue never expires and they would pile up, one per group and delay).
    pub delay_queue_type: QueueType,
    /// Largest message accepted (payload, key and headers), in bytes.
    pub max_message_size: usize,
    /// How long a publish waits for the broker's confirm before reporting an unknown
    /// outcome.
    pub confirm_timeout: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// The exchange every Surety publish goes through (see the crate docs).
    pub router_exchange: String,
    /// First delay between reconnection attempts of a consumer; doubles up to
    /// `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest delay between reconnection attempts.
    pub reconnect_max: Duration,
    /// Heartbeat asked for when the URL sets none, in seconds (detects a dead peer).
    pub heartbeat: u16,
    /// How long an unused retry delay queue lives after its messages' delay.
    pub delay_queue_idle: Duration,
    /// The connection name shown in the management UI.
    pub connection_name: String,
    /// Retries of a publish that failed with a retryable error (same message id), off by
    /// default: the caller sees every failure.
    pub publish_retry: Option<RetryPolicy>,
}

impl RabbitConfig {
    /// Default settings for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RabbitConfig {
            url: url.into(),
            queue_type: QueueType::Quorum,
            delay_queue_type: QueueType::Classic,
            max_message_size: 16 * 1024 * 1024,
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            router_exchange: "surety.router".into(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            heartbeat: 10,
            delay_queue_idle: Duration::from_secs(600),
            connection_name: "surety".into(),
            publish_retry: None,
        }
    }

    /// Settings from `url`. The URL must be `amqp://` or `amqps://`.
    pub fn from_url(url: &str) -> Result<Self> {
        let config = RabbitConfig::new(url);
        config.parse_uri()?;
        Ok(config)
    }

    /// Settings from the environment: `SURETY_RABBITMQ_URL` (default
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`) and `SURETY_RABBITMQ_QUEUE_TYPE`
    /// (`quorum` or `classic`, default `quorum`).
    pub fn from_env() -> Result<Self> {
        let url = std::env::var("SURETY_RABBITMQ_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let mut config = RabbitConfig::from_url(&url)?;
        if let Ok(t) = std::env::var("SURETY_RABBITMQ_QUEUE_TYPE") {
            config.queue_type = QueueType::parse(&t)?;
        }
        Ok(config)
    }

    /// Sets the group queue type.
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// The URL with its password replaced by `***`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    pub(crate) fn parse_uri(&self) -> Result<lapin::uri::AMQPUri> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::Configuration,
                format!("invalid RabbitMQ URL {}: {why}", self.redacted_url()),
            )
            .with_context("adapter", crate::ADAPTER)
        };
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(bad("the scheme must be amqp:// or amqps://".into()));
        }
        let mut uri: lapin::uri::AMQPUri = self.url.parse().map_err(|e: String| {
            // The parser's message may quote the URL: keep only a redacted form.
            bad(redact_text(&e))
        })?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(self.heartbeat);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(self.connect_timeout.as_millis() as u64);
        }
        Ok(uri)
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.redacted_url())
            .field("queue_type", &self.queue_type)
            .field("delay_queue_type", &self.delay_queue_type)
            .field("max_message_size", &self.max_message_size)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("router_exchange", &self.router_exchange)
            .field("publish_retry", &self.publish_retry)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let c = RabbitConfig::new("amqp://u:topsecret@h/%2f");
        assert!(!format!("{c:?}").contains("topsecret"));
        let e = RabbitConfig::from_url("http://u:topsecret@h/").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Configuration);
        assert!(!e.to_string().contains("topsecret"), "{e}");
        // A raw `/` in the password ends lapin's authority early: its parser then reads
        // the password as a port, and neither the message nor the error may show it.
        let c = RabbitConfig::new("amqp://guest:top/secret@127.0.0.1:5672/%2f");
        let e = c.parse_uri().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Configuration);
        assert!(!format!("{e} {e:?} {c:?}").contains("top/secret"), "{e:?}");
        assert!(!format!("{e} {e:?}").contains("top"), "{e:?}");
    }

    #[test]
    fn uri_gets_a_heartbeat() {
        let uri = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
            .parse_uri()
            .unwrap();
        assert_eq!(uri.query.heartbeat, Some(10));
        assert_eq!(uri.vhost, "/");
    }
}
