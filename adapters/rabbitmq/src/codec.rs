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
use surety_core::raw::wire_text;
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

/// A header value as text. Strings and byte arrays that are not UTF-8 are escaped
/// ([`wire_text`]), numbers written out, and the rest (arrays, tables) shown in AMQP's
/// own notation: a foreign producer's header reaches the handler, never vanishes.
pub(crate) fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => wire_text(s.as_bytes()),
        AMQPValue::ByteArray(b) => wire_text(b.as_slice()),
        AMQPValue::Void => String::new(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        other => number_text(other).unwrap_or_else(|| format!("{other:?}")),
    }
}

/// A header value that is a number, a boolean or a short string, as text.
fn number_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.to_owned(),
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
        .and_then(number_text)
        .and_then(|t| t.trim().parse::<i64>().ok())
        .map(|n| n.max(0) as u64)
}

/// Where a delivery came from, which decides whether `surety-attempt` on it is Surety's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Through the default exchange: a retry copy Surety published to the group queue, or
    /// one that expired out of the group's delay queue (dead-lettered to the default
    /// exchange). Producers publish to a destination through the router exchange, so
    /// only Surety writes here; `surety-attempt` counts, up to the policy's attempts.
    Retry {
        /// The policy's attempts.
        max_attempts: u32,
    },
    /// Through the router exchange (any producer of the destination): `surety-attempt`
    /// is a plain header.
    Open,
}

impl Lane {
    /// The lane of a delivery routed through `exchange`.
    pub(crate) fn of(exchange: &str, max_attempts: u32) -> Lane {
        if exchange.is_empty() {
            Lane::Retry { max_attempts }
        } else {
            Lane::Open
        }
    }
}

/// Which delivery this is: deliveries before it (the `surety-attempt` header our retries
/// write, on the retry lane only) plus this one, plus the deliveries the broker made but
/// nobody settled (the quorum queue's `x-delivery-count`; on a classic queue only the
/// `redelivered` flag, which says "at least one").
pub(crate) fn attempt(properties: &BasicProperties, redelivered: bool, lane: Lane) -> u32 {
    let before = match lane {
        Lane::Retry { max_attempts } => number(properties, headers::ATTEMPT)
            .unwrap_or(0)
            .min(u64::from(max_attempts)),
        Lane::Open => 0,
    };
    let unsettled = match number(properties, DELIVERY_COUNT) {
        Some(n) if n > 0 => n,
        _ if redelivered => 1,
        _ => 0,
    };
    (before + 1 + unsettled).min(u32::MAX as u64) as u32
}

/// Headers the adapter keeps for itself: not shown to handlers, not copied onward.
/// `surety-attempt` is the adapter's only on the retry lane; elsewhere it is data.
fn internal(name: &str, lane: Lane) -> bool {
    name.starts_with("x-")
        || name == KEY_HEADER
        || (name == headers::ATTEMPT && lane != Lane::Open)
        || name == headers::CREATED_AT
        || name == headers::MESSAGE_ID
}

/// Rebuilds the message of a delivery from `destination`, read on `lane`.
pub(crate) fn decode(
    destination: &str,
    properties: &BasicProperties,
    body: &[u8],
    lane: Lane,
) -> Message {
    let id = properties
        .message_id()
        .as_ref()
        .and_then(|id| MessageId::parse(id.as_str()).ok())
        .or_else(|| {
            header(properties, headers::MESSAGE_ID)
                .and_then(number_text)
                .and_then(|t| MessageId::parse(t).ok())
        })
        .unwrap_or_else(|| {
            // A message from a non-Surety publisher without a usable id. AMQP gives a
            // message no identity of its own, so it gets a fresh one, which no other
            // message can share; Surety's retry copies and dead letter carry it on.
            tracing::warn!(
                destination,
                "message without a usable message-id; a new id was assigned"
            );
            MessageId::new()
        });
    let mut message = Message::new(destination, body.to_vec()).with_id(id);
    if let Some(ms) = number(properties, headers::CREATED_AT) {
        message = message.with_created_at(UNIX_EPOCH + Duration::from_millis(ms));
    } else if let Some(secs) = properties.timestamp() {
        message = message.with_created_at(UNIX_EPOCH + Duration::from_secs(*secs));
    }
    if let Some(key) = header(properties, KEY_HEADER).map(text) {
        message = message.with_key(key);
    }
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            if internal(name.as_str(), lane) {
                continue;
            }
            message = message.with_header(name.as_str(), text(value));
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
        let back = decode("orders", &p, b"body", Lane::Open);
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
        let retry = Lane::Retry { max_attempts: 10 };
        let p = encode(&Message::new("d", "x"));
        assert_eq!(attempt(&p, false, retry), 1);
        assert_eq!(attempt(&p, true, retry), 2);
        let retried = republish_properties(&p, |t| set(t, headers::ATTEMPT, "3"));
        assert_eq!(attempt(&retried, false, retry), 4);
        let mut t = retried.headers().clone().unwrap();
        t.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        let crashed = retried.clone().with_headers(t);
        assert_eq!(attempt(&crashed, true, retry), 6);
    }

    #[test]
    fn an_attempt_header_counts_only_on_the_retry_lane_and_within_the_policy() {
        let forged = republish_properties(&encode(&Message::new("d", "x")), |t| {
            set(t, headers::ATTEMPT, "1000")
        });
        assert_eq!(attempt(&forged, false, Lane::Open), 1);
        assert_eq!(attempt(&forged, false, Lane::Retry { max_attempts: 5 }), 6);
        let seen = decode("d", &forged, b"x", Lane::Open);
        assert_eq!(
            seen.header(headers::ATTEMPT),
            Some("1000"),
            "data, not bookkeeping"
        );
        assert_eq!(Lane::of("", 5), Lane::Retry { max_attempts: 5 });
        assert_eq!(Lane::of("surety", 5), Lane::Open);
    }

    #[test]
    fn header_values_of_every_type_arrive() {
        let mut t = FieldTable::default();
        t.insert(
            "binary".into(),
            AMQPValue::LongString(LongString::from(vec![0xff, 0x41])),
        );
        t.insert(
            "bytes".into(),
            AMQPValue::ByteArray(vec![0x00, 0xfe].into()),
        );
        t.insert("real".into(), AMQPValue::Double(1.5));
        t.insert("none".into(), AMQPValue::Void);
        t.insert(
            "nested".into(),
            AMQPValue::FieldTable(FieldTable::default()),
        );
        let m = decode(
            "d",
            &BasicProperties::default().with_headers(t),
            b"",
            Lane::Open,
        );
        assert_eq!(m.header("binary"), Some("\\xffA"));
        assert_eq!(m.header("bytes"), Some("\u{0}\\xfe"));
        assert_eq!(m.header("real"), Some("1.5"));
        assert_eq!(m.header("none"), Some(""));
        assert!(m.header("nested").is_some());
    }
}
