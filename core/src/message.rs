//! The message every adapter carries: a stable id, a destination, an optional ordering
//! key, string headers and a byte payload.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Longest message id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest destination name accepted by core, in bytes (adapters may be stricter).
pub const MAX_DESTINATION_LEN: usize = 249;
/// Longest header name accepted, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 128;
/// Longest header value accepted, in bytes.
pub const MAX_HEADER_VALUE_LEN: usize = 8 * 1024;

/// Header names Surety itself writes. Names starting with `surety-` are reserved: an
/// adapter overwrites them.
pub mod headers {
    /// The message id, for brokers without a message-id slot of their own.
    pub const MESSAGE_ID: &str = "surety-message-id";
    /// Creation time, milliseconds since the Unix epoch.
    pub const CREATED_AT: &str = "surety-created-at";
    /// How many times the message was delivered before this delivery.
    pub const ATTEMPT: &str = "surety-attempt";
    /// Why a message was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "surety-dead-letter-reason";
    /// How many deliveries a dead-lettered message had.
    pub const DEAD_LETTER_ATTEMPTS: &str = "surety-dead-letter-attempts";
    /// On a dead letter: the headers (and key) removed from it because no message may carry
    /// them (too big, or an invalid name or value), each with its size in bytes.
    pub const DEAD_LETTER_REMOVED: &str = "surety-dead-letter-removed";
    /// The destination a dead-lettered or delayed message came from.
    pub const ORIGINAL_DESTINATION: &str = "surety-original-destination";
    /// The consumer group that dead-lettered the message.
    pub const CONSUMER_GROUP: &str = "surety-consumer-group";
    /// On a receipt: the id of the message it reports on.
    pub const RECEIPT_FOR: &str = "surety-receipt-for";
    /// On a receipt: `completed` or `failed`.
    pub const RECEIPT_OUTCOME: &str = "surety-receipt-outcome";
    /// On a failed receipt: the business reason.
    pub const RECEIPT_REASON: &str = "surety-receipt-reason";
    /// The payload's media type (`application/json` for [`crate::Json`]).
    pub const CONTENT_TYPE: &str = "content-type";
    /// The prefix reserved for Surety's own headers.
    pub const RESERVED_PREFIX: &str = "surety-";
}

/// A message id: unique, stable across retries, and the key every deduplication uses.
///
/// New ids are UUIDv7 (time-ordered), so ids of one producer sort by creation time.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(String);

impl MessageId {
    /// A fresh UUIDv7 id.
    pub fn new() -> Self {
        MessageId(uuid::Uuid::now_v7().to_string())
    }

    /// Takes an id chosen by the application (for example a business key).
    ///
    /// It must be 1 to [`MAX_ID_LEN`] bytes of visible ASCII.
    pub fn parse(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(Error::invalid(format!(
                "message id must be 1 to {MAX_ID_LEN} bytes, got {}",
                id.len()
            )));
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid(
                "message id must be visible ASCII without spaces",
            ));
        }
        Ok(MessageId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        MessageId::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

/// A serde codec for payloads.
pub trait Codec {
    /// The media type written to the `content-type` header.
    const CONTENT_TYPE: &'static str;
    /// Encodes a value.
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>>;
    /// Decodes a value.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T>;
}

/// JSON, the default codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    const CONTENT_TYPE: &'static str = "application/json";

    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(value)
            .map_err(|e| Error::invalid("payload does not encode as JSON").with_source(e))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid("payload does not decode from JSON").with_source(e))
    }
}

/// A message. Build it with [`Message::new`] or [`Message::json`] and the `with_*` methods.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    id: MessageId,
    destination: String,
    key: Option<String>,
    headers: BTreeMap<String, String>,
    payload: Bytes,
    created_at: SystemTime,
}

/// A message key: 1 to [`MAX_HEADER_VALUE_LEN`] bytes without control characters.
pub(crate) fn valid_key(key: &str) -> bool {
    !key.is_empty() && valid_header_value(key)
}

/// A header name: 1 to [`MAX_HEADER_NAME_LEN`] bytes of `[A-Za-z0-9._-]`.
pub(crate) fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HEADER_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A header value: at most [`MAX_HEADER_VALUE_LEN`] bytes without control characters.
pub(crate) fn valid_header_value(value: &str) -> bool {
    value.len() <= MAX_HEADER_VALUE_LEN && !value.chars().any(char::is_control)
}

impl Message {
    /// A message with a fresh id, created now.
    pub fn new(destination: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Message {
            id: MessageId::new(),
            destination: destination.into(),
            key: None,
            headers: BTreeMap::new(),
            payload: payload.into(),
            created_at: SystemTime::now(),
        }
    }

    /// A message whose payload is `value` as JSON.
    pub fn json<T: Serialize>(destination: impl Into<String>, value: &T) -> Result<Self> {
        Message::encoded::<Json, T>(destination, value)
    }

    /// A message whose payload is `value` encoded with codec `C`.
    pub fn encoded<C: Codec, T: Serialize>(
        destination: impl Into<String>,
        value: &T,
    ) -> Result<Self> {
        Ok(Message::new(destination, C::encode(value)?)
            .with_header(headers::CONTENT_TYPE, C::CONTENT_TYPE))
    }

    /// Replaces the id (for example with a business key, or when rebuilding a received
    /// message).
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// Sets the ordering key: messages with one key keep their order where the adapter
    /// supports ordering, and land on one partition or queue.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets a header, replacing an earlier value.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Replaces the destination.
    pub fn with_destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = destination.into();
        self
    }

    /// Replaces the creation time (used when rebuilding a received message).
    pub fn with_created_at(mut self, created_at: SystemTime) -> Self {
        self.created_at = created_at;
        self
    }

    /// The id.
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// Where the message goes: an exchange, a topic.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The ordering key.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// All headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The headers, to change.
    pub fn headers_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.headers
    }

    /// One header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// When the message was created.
    pub fn created_at(&self) -> SystemTime {
        self.created_at
    }

    /// Creation time in milliseconds since the Unix epoch.
    pub fn created_at_millis(&self) -> u64 {
        self.created_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as u64
    }

    /// Decodes the payload as JSON.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T> {
        self.decode::<Json, T>()
    }

    /// Decodes the payload with codec `C`.
    pub fn decode<C: Codec, T: DeserializeOwned>(&self) -> Result<T> {
        C::decode(&self.payload).map_err(|e| e.with_context("message_id", self.id.as_str()))
    }

    /// The size a broker sees, roughly: payload, key and headers.
    pub fn encoded_len(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Checks destination, key and headers, and the size against `max_size`.
    ///
    /// Every adapter calls this before anything reaches the broker, so bad input is a
    /// typed [`crate::ErrorKind::InvalidMessage`] error and nothing half-sent.
    pub fn validate(&self, max_size: Option<usize>) -> Result<()> {
        let bad = |what: String| Error::invalid(what).with_context("message_id", self.id.as_str());
        validate_destination(&self.destination)
            .map_err(|e| e.with_context("message_id", self.id.as_str()))?;
        if let Some(key) = &self.key
            && !valid_key(key)
        {
            return Err(bad(
                "message key must be 1 to 8192 bytes without control characters".into(),
            ));
        }
        for (name, value) in &self.headers {
            if !valid_header_name(name) {
                return Err(bad(format!(
                    "header name {name:?} must be 1 to {MAX_HEADER_NAME_LEN} bytes of [A-Za-z0-9._-]"
                )));
            }
            if !valid_header_value(value) {
                return Err(bad(format!(
                    "header {name:?} must be at most {MAX_HEADER_VALUE_LEN} bytes without control characters"
                )));
            }
        }
        if let Some(max) = max_size {
            let len = self.encoded_len();
            if len > max {
                return Err(bad(format!(
                    "message is {len} bytes, over the limit of {max} bytes"
                ))
                .with_context("limit", max.to_string()));
            }
        }
        Ok(())
    }
}

/// Checks a destination name: 1 to [`MAX_DESTINATION_LEN`] bytes of `[A-Za-z0-9._%|-]`
/// (`%` and `|` appear in RocketMQ's dead-letter topics, `%DLQ%<group>|<destination>`).
///
/// Adapters may restrict further (RocketMQ topics have no `.`, Kafka's no `%` or `|`).
pub fn validate_destination(destination: &str) -> Result<()> {
    if destination.is_empty()
        || destination.len() > MAX_DESTINATION_LEN
        || !destination
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'%' | b'|'))
    {
        return Err(Error::invalid(format!(
            "destination {destination:?} must be 1 to {MAX_DESTINATION_LEN} bytes of [A-Za-z0-9._%|-]"
        ))
        .with_context("destination", destination));
    }
    Ok(())
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The payload may be large or sensitive: show its size, not its bytes.
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("destination", &self.destination)
            .field("key", &self.key)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Order {
        id: u64,
        item: String,
    }

    #[test]
    fn json_round_trip_sets_content_type() {
        let order = Order {
            id: 7,
            item: "book".into(),
        };
        let m = Message::json("orders", &order).unwrap();
        assert_eq!(m.header(headers::CONTENT_TYPE), Some("application/json"));
        assert_eq!(m.decode_json::<Order>().unwrap(), order);
    }

    #[test]
    fn malformed_payload_is_an_invalid_message_error() {
        let m = Message::new("orders", "not json");
        let e = m.decode_json::<Order>().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidMessage);
        assert!(!e.is_retryable());
        assert_eq!(e.context_value("message_id"), Some(m.id().as_str()));
    }

    #[test]
    fn ids_are_unique_and_time_ordered() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert_ne!(a, b);
        assert!(a < b, "UUIDv7 ids sort by creation");
        assert!(MessageId::parse("order-42").is_ok());
        assert!(MessageId::parse("").is_err());
        assert!(MessageId::parse("has space").is_err());
    }

    #[test]
    fn validation_rejects_bad_headers_destinations_and_size() {
        assert!(Message::new("orders", "x").validate(None).is_ok());
        assert!(Message::new("", "x").validate(None).is_err());
        assert!(Message::new("a b", "x").validate(None).is_err());
        assert!(
            Message::new("orders", "x")
                .with_header("bad name", "v")
                .validate(None)
                .is_err()
        );
        assert!(
            Message::new("orders", "x")
                .with_header("h", "line\nbreak")
                .validate(None)
                .is_err()
        );
        let big = Message::new("orders", vec![0u8; 100]);
        let e = big.validate(Some(50)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidMessage);
        assert!(e.to_string().contains("over the limit"));
    }
}
