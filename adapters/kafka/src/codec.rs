//! Surety messages as Kafka records and back.
//!
//! Kafka has no message-id slot: the id travels in the `surety-message-id` header and the
//! creation time in `surety-created-at` (and as the record's CreateTime). The key is the
//! record key, so the default partitioner puts one key on one partition. Retried messages
//! carry `surety-attempt` (deliveries before), `surety-retry-at` (when they are due) and
//! `surety-retry-of` (the topic they came from); those are the adapter's own and are
//! removed before the handler sees the message. They are obeyed only on a record read
//! from a group's retry topic, which only the adapter writes ([`Origin::RetryTopic`]):
//! on any other topic anyone with publish rights can set them, so there they are plain
//! headers (a far-future `surety-retry-at` would otherwise stall the partition, a
//! `surety-retry-of` rename the destination, a `surety-attempt` dead-letter a fresh
//! message).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::Message as _;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use surety_core::raw::wire_text;
use surety_core::{Message, MessageId, headers};

/// When a retried record is due, milliseconds since the Unix epoch.
pub(crate) const RETRY_AT: &str = "surety-retry-at";
/// The topic a retried record was first consumed from.
pub(crate) const RETRY_OF: &str = "surety-retry-of";

/// Kafka headers for `message`: its own headers, then Surety's id and creation time.
pub(crate) fn record_headers(message: &Message) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(message.headers().len() + 2);
    for (name, value) in message.headers() {
        if name == headers::MESSAGE_ID || name == headers::CREATED_AT {
            continue;
        }
        out = out.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    let created = message.created_at_millis().to_string();
    out.insert(Header {
        key: headers::MESSAGE_ID,
        value: Some(message.id().as_str().as_bytes()),
    })
    .insert(Header {
        key: headers::CREATED_AT,
        value: Some(created.as_bytes()),
    })
}

/// A consumed record, as the handler will see it.
pub(crate) struct Decoded {
    /// The message, with the original destination and without the adapter's headers.
    pub(crate) message: Message,
    /// Deliveries before this record was written (0 for a first publish).
    pub(crate) prior_attempts: u32,
    /// When a retried record may be processed.
    pub(crate) due: Option<SystemTime>,
}

/// Where a consumed record was read from, which decides whether its retry headers are
/// the adapter's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin<'a> {
    /// The subscription's own retry topic: written only by the adapter. Even there the
    /// headers are bounded: the origin is the subscription's `destination` (a
    /// `surety-retry-of` naming another is ignored) and the attempts count up to the
    /// policy's `max_attempts`.
    RetryTopic {
        /// The subscription's destination.
        destination: &'a str,
        /// The policy's attempts.
        max_attempts: u32,
    },
    /// Any other topic (the subscribed one, a dead-letter topic): anyone may write it.
    Open,
}

/// Rebuilds the message of `record` read on `origin`. Header values (and a key) that are
/// not UTF-8 are escaped ([`wire_text`]), a null header value is an empty one: what a
/// producer wrote reaches the handler. A record without a usable `surety-message-id` is
/// identified by its position, `<topic>-<partition>-<offset>`, which its retry copies
/// and dead letter carry on.
pub(crate) fn decode(record: &OwnedMessage, origin: Origin<'_>) -> Decoded {
    let (trusted, max_attempts) = match origin {
        Origin::RetryTopic {
            destination,
            max_attempts,
        } => (Some(destination), max_attempts),
        Origin::Open => (None, 0),
    };
    let payload = record.payload().map(<[u8]>::to_vec).unwrap_or_default();
    let mut message = Message::new(record.topic(), payload);
    let mut id = None;
    let mut created = None;
    let mut prior_attempts = 0;
    let mut due = None;
    if let Some(h) = record.headers() {
        for header in h.iter() {
            let value = wire_text(header.value.unwrap_or_default());
            match header.key {
                headers::MESSAGE_ID => id = MessageId::parse(value).ok(),
                headers::CREATED_AT => created = value.parse::<u64>().ok(),
                headers::ATTEMPT if trusted.is_some() => {
                    prior_attempts = value.parse::<u32>().unwrap_or(0).min(max_attempts)
                }
                RETRY_AT if trusted.is_some() => {
                    due = value
                        .parse::<u64>()
                        .ok()
                        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
                }
                RETRY_OF => match trusted {
                    Some(destination) => {
                        if value != destination {
                            tracing::warn!(
                                topic = record.topic(),
                                offset = record.offset(),
                                "a retried record names another origin; its subscription's destination is used"
                            );
                        }
                        message = message.with_destination(destination);
                    }
                    None => message = message.with_header(RETRY_OF, value),
                },
                name => message = message.with_header(name, value),
            }
        }
    }
    let id = id.unwrap_or_else(|| {
        // A record from a producer that is not Surety: its position is its identity.
        MessageId::parse(format!(
            "{}-{}-{}",
            record.topic(),
            record.partition(),
            record.offset()
        ))
        .unwrap_or_default()
    });
    message = message.with_id(id);
    if let Some(key) = record.key() {
        message = message.with_key(wire_text(key));
    }
    let created = created
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .or_else(|| {
            record
                .timestamp()
                .to_millis()
                .and_then(|ms| u64::try_from(ms).ok())
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        });
    if let Some(created) = created {
        message = message.with_created_at(created);
    }
    Decoded {
        message,
        prior_attempts,
        due,
    }
}

/// The record that brings `message` back to the retry topic, due at `due`, after
/// `attempts` deliveries.
pub(crate) fn retry_message(
    message: &Message,
    retry_topic: &str,
    attempts: u32,
    due: SystemTime,
) -> Message {
    let due_ms = due
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    message
        .clone()
        .with_destination(retry_topic)
        .with_header(headers::ATTEMPT, attempts.to_string())
        .with_header(RETRY_AT, due_ms.to_string())
        .with_header(RETRY_OF, message.destination())
}

/// The Kafka record of `message`: payload, id and created-at headers, timestamp, key.
pub(crate) fn record_of(message: &Message) -> FutureRecord<'_, str, [u8]> {
    let payload: &[u8] = message.payload();
    let record = FutureRecord::<str, [u8]>::to(message.destination())
        .payload(payload)
        .timestamp(message.created_at_millis() as i64)
        .headers(record_headers(message));
    match message.key() {
        Some(key) => record.key(key),
        None => record,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    fn record(message: &Message, topic: &str) -> OwnedMessage {
        OwnedMessage::new(
            Some(message.payload().to_vec()),
            message.key().map(|k| k.as_bytes().to_vec()),
            topic.to_owned(),
            Timestamp::CreateTime(message.created_at_millis() as i64),
            1,
            42,
            Some(record_headers(message)),
        )
    }

    #[test]
    fn round_trip_keeps_id_key_headers_and_time() {
        let m = Message::new("orders", "x")
            .with_key("k")
            .with_header("seq", "7");
        let d = decode(&record(&m, "orders"), Origin::Open);
        assert_eq!(d.message.id(), m.id());
        assert_eq!(d.message.key(), Some("k"));
        assert_eq!(d.message.header("seq"), Some("7"));
        assert_eq!(d.message.created_at_millis(), m.created_at_millis());
        assert_eq!(d.message.header(headers::MESSAGE_ID), None);
        assert_eq!(d.prior_attempts, 0);
        assert!(d.due.is_none());
    }

    #[test]
    fn a_retried_record_names_its_origin_and_attempts() {
        let m = Message::new("orders", "x");
        let due = SystemTime::now() + Duration::from_secs(2);
        let r = retry_message(&m, "orders.g.retry", 2, due);
        let lane = Origin::RetryTopic {
            destination: "orders",
            max_attempts: 5,
        };
        let d = decode(&record(&r, "orders.g.retry"), lane);
        assert_eq!(d.message.destination(), "orders");
        assert_eq!(d.message.id(), m.id());
        assert_eq!(d.prior_attempts, 2);
        assert!(d.due.is_some());
        assert_eq!(d.message.header(RETRY_AT), None);
    }

    #[test]
    fn retry_headers_on_an_open_topic_are_plain_headers() {
        let far = SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
        let forged = retry_message(&Message::new("orders", "x"), "orders", 1000, far)
            .with_header(RETRY_OF, "../../etc/passwd");
        let d = decode(&record(&forged, "orders"), Origin::Open);
        assert_eq!(d.message.destination(), "orders");
        assert_eq!(d.prior_attempts, 0);
        assert!(d.due.is_none());
        assert_eq!(d.message.header(RETRY_OF), Some("../../etc/passwd"));
        assert_eq!(d.message.header(headers::ATTEMPT), Some("1000"));
    }

    #[test]
    fn a_retried_record_cannot_name_another_origin_or_exceed_the_attempts() {
        let m = Message::new("orders", "x");
        let r = retry_message(&m, "orders.g.retry", 1000, SystemTime::now())
            .with_header(RETRY_OF, "../../etc/passwd");
        let lane = Origin::RetryTopic {
            destination: "orders",
            max_attempts: 5,
        };
        let d = decode(&record(&r, "orders.g.retry"), lane);
        assert_eq!(d.message.destination(), "orders");
        assert_eq!(d.prior_attempts, 5);
    }

    #[test]
    fn bytes_that_are_not_text_and_null_values_arrive_escaped() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "binary",
                value: Some(&[0xff_u8, 0x41][..]),
            })
            .insert(Header::<&[u8]> {
                key: "null",
                value: None,
            });
        let r = OwnedMessage::new(
            None,
            Some(vec![0xc3, 0x28]),
            "orders".to_owned(),
            Timestamp::CreateTime(1),
            0,
            7,
            Some(headers),
        );
        let d = decode(&r, Origin::Open);
        assert_eq!(d.message.header("binary"), Some("\\xffA"));
        assert_eq!(d.message.header("null"), Some(""));
        assert_eq!(d.message.key(), Some("\\xc3("));
        assert_eq!(d.message.id().as_str(), "orders-0-7");
        assert!(d.message.payload().is_empty());
    }
}
