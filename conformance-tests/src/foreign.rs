//! A producer that is not Surety: the broker's own client, writing what other languages,
//! other teams or an attacker with publish rights write to a destination Surety consumes.
//!
//! The hostile-input cases send through it; a fixture without one reports those cases
//! as not supported. Each adapter's runner supplies its own (the raw client the adapter
//! wraps), so the messages reach the broker exactly as the case wrote them.

use async_trait::async_trait;

/// One message as a foreign producer writes it.
#[derive(Clone, Debug, Default)]
pub struct ForeignMessage {
    /// The id, in the slot where Surety looks for one (AMQP `message-id`, the
    /// `surety-message-id` header or property); `None` sends none.
    pub id: Option<String>,
    /// Headers (AMQP headers, Kafka headers, RocketMQ user properties), in order. A value
    /// of `None` is a null value where the broker has one (Kafka), an empty one elsewhere;
    /// a broker whose header values are text ([`ForeignProducer::binary_headers`] false)
    /// is only given UTF-8.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The body; `None` is a null body where the broker has one (Kafka), an empty one
    /// elsewhere.
    pub body: Option<Vec<u8>>,
}

impl ForeignMessage {
    /// A message with `body`, no id and no headers.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        ForeignMessage {
            body: Some(body.into()),
            ..ForeignMessage::default()
        }
    }

    /// Sets the id slot.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), Some(value.into())));
        self
    }

    /// Adds a header with a null value.
    pub fn null_header(mut self, name: impl Into<String>) -> Self {
        self.headers.push((name.into(), None));
        self
    }

    /// Sends a null body.
    pub fn null_body(mut self) -> Self {
        self.body = None;
        self
    }
}

/// The broker's own client, sending to Surety's destinations.
#[async_trait]
pub trait ForeignProducer: Send + Sync {
    /// Sends `message` to `destination` the way a producer outside Surety would reach a
    /// Surety subscription of it, and waits for the broker's acknowledgement.
    async fn send(&self, destination: &str, message: ForeignMessage) -> Result<(), String>;

    /// The largest header value (in bytes) this broker takes from a producer, so that the
    /// cases can send "well over Surety's limit" without the broker refusing it first.
    fn max_header_bytes(&self) -> usize;

    /// Whether the broker takes a message with an empty body (RocketMQ refuses one).
    fn empty_bodies(&self) -> bool {
        true
    }

    /// Whether header values can be any bytes and null (AMQP, Kafka) or only text that
    /// is not empty (RocketMQ, whose producer leaves null headers out).
    fn binary_headers(&self) -> bool;
}
