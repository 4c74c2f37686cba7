//! Messages to AMQP properties and back.
//!
//! | Surety | AMQP |
//! |---|---|
//! | id | `message-id` property |
//! | created_at | `timestamp` property (seconds) and `surety-created-at` header (ms) |
//! | key | `surety-key` header |
//! | headers | headers table, long strings |
//! | `content-type` header | also the `content-type` property |
//! | (every message) | `delivery-mode` 2: persistent |

use std::time::{Duration, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use surety_core::{Message, MessageId, headers};

/// The header that carries the ordering key (AMQP has no slot for it).
pub const KEY_HEADER: &str = "surety-key";
/// The quorum queue's count of earlier deliveries that were not settled.
const DELIVERY_COUNT: &str = "x-delivery-count";

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

/// The AMQP properties and body of `message`.
pub(crate) fn encode(message: &Message) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in message.headers() {
        table.insert(ShortString::from(name.as_str()), long(value));
    }
    if let Some(key) = message.key() {
        table.insert(KEY_HEADER.into(), long(key));
    }
    table.insert(
        headers::CREATED_AT.into(),
        long(&message.created_at_millis().to_string()),
    );
    let mut properties = BasicProperties::default()
        .with_message_id(message.id().as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(message.created_at_millis() / 1000)
        .with_headers(table);
    if let Some(ct) = message.header(headers::CONTENT_TYPE)
        && ct.len() < 256
    {
        properties = properties.with_content_type(ct.into());
    }
    properties
}

/// A header value as text, for the value types a header can sensibly hold.
pub(crate) fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

fn number(properties: &BasicProperties, name: &str) -> Option<u64> {
    header(properties, name)
        .and_then(text)
        .and_then(|t| t.trim().parse::<i64>().ok())
        .map(|n| n.max(0) as u64)
}

/// Which delivery this is: deliveries before it (the `surety-attempt` header our retries
/// write) plus this one, plus the deliveries the broker made but nobody settled (the
/// quorum queue's `x-delivery-count`; on a classic queue only the `redelivered` flag,
/// which says "at least one").
pub(crate) fn attempt(properties: &BasicProperties, redelivered: bool) -> u32 {
    let before = number(properties, headers::ATTEMPT).unwrap_or(0);
    let unsettled = match number(properties, DELIVERY_COUNT) {
        Some(n) if n > 0 => n,
        _ if redelivered => 1,
        _ => 0,
    };
    (before + 1 + unsettled).min(u32::MAX as u64) as u32
}

/// Headers the adapter keeps for itself: not shown to handlers, not copied onward.
fn internal(name: &str) -> bool {
    name.starts_with("x-")
        || name == KEY_HEADER
        || name == headers::ATTEMPT
        || name == headers::CREATED_AT
        || name == headers::MESSAGE_ID
}

/// Rebuilds the message of a delivery from `destination`.
pub(crate) fn decode(destination: &str, properties: &BasicProperties, body: &[u8]) -> Message {
    let id = properties
        .message_id()
        .as_ref()
        .and_then(|id| MessageId::parse(id.as_str()).ok())
        .or_else(|| {
            header(properties, headers::MESSAGE_ID)
                .and_then(text)
                .and_then(|t| MessageId::parse(t).ok())
        })
        .unwrap_or_else(|| {
            // A message from a non-Surety publisher without an id: give it one, so the
            // handler has something; it is not stable across redeliveries.
            tracing::warn!(
                destination,
                "message without message-id; a new id was assigned"
            );
            MessageId::new()
        });
    let mut message = Message::new(destination, body.to_vec()).with_id(id);
    if let Some(ms) = number(properties, headers::CREATED_AT) {
        message = message.with_created_at(UNIX_EPOCH + Duration::from_millis(ms));
    } else if let Some(secs) = properties.timestamp() {
        message = message.with_created_at(UNIX_EPOCH + Duration::from_secs(*secs));
    }
    if let Some(key) = header(properties, KEY_HEADER).and_then(text) {
        message = message.with_key(key);
    }
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            if internal(name.as_str()) {
                continue;
            }
            if let Some(v) = text(value) {
                message = message.with_header(name.as_str(), v);
            }
        }
    }
    if message.header(headers::CONTENT_TYPE).is_none()
        && let Some(ct) = properties.content_type()
    {
        message = message.with_header(headers::CONTENT_TYPE, ct.as_str());
    }
    message
}

/// The properties of a copy of a delivered message: every property kept, headers
/// changed by `edit` (the broker's own `x-` headers removed first, except `x-death`).
pub(crate) fn republish_properties(
    properties: &BasicProperties,
    edit: impl FnOnce(&mut FieldTable),
) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (name, value) in old.inner() {
            if name.as_str().starts_with("x-") && name.as_str() != "x-death" {
                continue;
            }
            table.insert(name.clone(), value.clone());
        }
    }
    edit(&mut table);
    properties.clone().with_delivery_mode(2).with_headers(table)
}

/// Sets a header to a text value.
pub(crate) fn set(table: &mut FieldTable, name: &str, value: &str) {
    table.insert(name.into(), long(value));
}

/// Removes the headers that count deliveries, so a copy starts from one.
pub(crate) fn reset_counts(table: &mut FieldTable) -> FieldTable {
    let mut out = FieldTable::default();
    for (name, value) in table.inner() {
        let n = name.as_str();
        if n == headers::ATTEMPT || n.starts_with("x-") {
            continue;
        }
        out.insert(name.clone(), value.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_id_key_headers_and_time() {
        let m = Message::new("orders", "body")
            .with_key("customer-7")
            .with_header("trace", "abc")
            .with_header(headers::CONTENT_TYPE, "application/json");
        let p = encode(&m);
        assert_eq!(p.delivery_mode(), &Some(2));
        let back = decode("orders", &p, b"body");
        assert_eq!(back.id(), m.id());
        assert_eq!(back.key(), Some("customer-7"));
        assert_eq!(back.header("trace"), Some("abc"));
        assert_eq!(back.header(headers::CONTENT_TYPE), Some("application/json"));
        assert_eq!(back.created_at_millis(), m.created_at_millis());
        assert!(back.header(KEY_HEADER).is_none());
        assert_eq!(back.headers().len(), 2);
    }

    #[test]
    fn attempts_count_header_and_unsettled_deliveries() {
        let p = encode(&Message::new("d", "x"));
        assert_eq!(attempt(&p, false), 1);
        assert_eq!(attempt(&p, true), 2);
        let retried = republish_properties(&p, |t| set(t, headers::ATTEMPT, "3"));
        assert_eq!(attempt(&retried, false), 4);
        let mut t = retried.headers().clone().unwrap();
        t.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        let crashed = retried.clone().with_headers(t);
        assert_eq!(attempt(&crashed, true), 6);
    }
}
