//! Surety messages to RocketMQ messages and back.
//!
//! | Surety | RocketMQ |
//! |---|---|
//! | destination | topic (`[A-Za-z0-9_%-]`, at most 127 bytes: no `.`) |
//! | id | property `surety-message-id`, and `KEYS` (so the console finds it by key) |
//! | key | property `surety-key`; the queue is chosen by the key's hash (per-key order) |
//! | headers | user properties (names the client reserves, like `KEYS`, are invalid) |
//! | created_at | property `surety-created-at` (ms) |
//! | payload | body |
//!
//! Redeliveries that Surety schedules itself carry `surety-attempt`.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use cheetah_string::CheetahString;
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message as RmqMessage;
use surety_core::{Error, Message, MessageId, Result, headers};

/// The ordering key's property.
pub(crate) const KEY_PROPERTY: &str = "surety-key";
/// The token that pairs a half message with its waiting `send_in_transaction` call.
pub(crate) const TX_TOKEN_PROPERTY: &str = "surety-tx-token";
/// RocketMQ's own property naming the original topic of a message in `%RETRY%<group>`.
pub(crate) const RETRY_TOPIC_PROPERTY: &str = "RETRY_TOPIC";
/// RocketMQ's delay level property.
pub(crate) const DELAY_PROPERTY: &str = "DELAY";
/// RocketMQ's keys property.
const KEYS_PROPERTY: &str = "KEYS";
/// The retry topic prefix.
pub(crate) const RETRY_PREFIX: &str = "%RETRY%";
/// The dead-letter topic prefix.
pub(crate) const DLQ_PREFIX: &str = "%DLQ%";

/// The longest topic name the broker accepts.
const MAX_TOPIC_LEN: usize = 127;

/// The broker's default `messageDelayLevel`: `1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h`.
const DELAY_LEVELS_SECS: [u64; 18] = [
    1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200,
];

/// The broker's shortest delay level.
pub(crate) const SHORTEST_DELAY_LEVEL: Duration = Duration::from_secs(DELAY_LEVELS_SECS[0]);

/// The smallest delay level whose delay is at least `delay` (never earlier than asked),
/// capped at the longest level.
pub(crate) fn delay_level(delay: Duration) -> i32 {
    DELAY_LEVELS_SECS
        .iter()
        .position(|&s| Duration::from_secs(s) >= delay)
        .unwrap_or(DELAY_LEVELS_SECS.len() - 1) as i32
        + 1
}

/// Checks what RocketMQ adds to the core rules: topic characters and length.
pub(crate) fn validate_topic(topic: &str) -> Result<()> {
    if topic.is_empty()
        || topic.len() > MAX_TOPIC_LEN
        || !topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'%'))
    {
        return Err(Error::invalid(format!(
            "RocketMQ topic {topic:?} must be 1 to {MAX_TOPIC_LEN} bytes of [A-Za-z0-9_%-]"
        ))
        .with_context("destination", topic));
    }
    Ok(())
}

/// Validates `message` and builds the RocketMQ message for `topic`.
pub(crate) fn encode(message: &Message, topic: &str, max_size: usize) -> Result<RmqMessage> {
    message.validate(Some(max_size))?;
    validate_topic(topic)?;
    let mut out = RmqMessage::builder()
        .topic(topic)
        .body(message.payload().clone())
        .build_unchecked();
    let invalid = |e: &dyn std::fmt::Display| {
        Error::invalid(format!("header rejected by the RocketMQ client: {e}"))
            .with_context("message_id", message.id().as_str())
    };
    for (name, value) in message.headers() {
        if is_internal(name) {
            // Surety's own bookkeeping is set below, never taken from the caller.
            continue;
        }
        out.put_user_property(
            CheetahString::from(name.as_str()),
            CheetahString::from(value.as_str()),
        )
        .map_err(|e| invalid(&e))?;
    }
    out.put_property(
        CheetahString::from_static_str(headers::MESSAGE_ID),
        CheetahString::from(message.id().as_str()),
    );
    out.put_property(
        CheetahString::from_static_str(KEYS_PROPERTY),
        CheetahString::from(message.id().as_str()),
    );
    out.put_property(
        CheetahString::from_static_str(headers::CREATED_AT),
        CheetahString::from(message.created_at_millis().to_string()),
    );
    if let Some(key) = message.key() {
        out.put_property(
            CheetahString::from_static_str(KEY_PROPERTY),
            CheetahString::from(key),
        );
    }
    Ok(out)
}

/// Properties that are Surety's bookkeeping, not the application's headers.
fn is_internal(name: &str) -> bool {
    matches!(
        name,
        headers::MESSAGE_ID
            | headers::CREATED_AT
            | headers::ATTEMPT
            | KEY_PROPERTY
            | TX_TOKEN_PROPERTY
    )
}

/// Whether a property is RocketMQ's own (system) property.
fn is_system(name: &str) -> bool {
    rocketmq_model::common::message::STRING_HASH_SET.contains(name)
}

fn prop<'a>(m: &'a MessageExt, name: &str) -> Option<&'a str> {
    m.properties().get(name).map(|v| v.as_str())
}

/// Rebuilds the Surety message from what the broker delivered, and the attempt number:
/// the larger of the broker's count (`reconsumeTimes + 1`) and `surety-attempt`.
pub(crate) fn decode(m: &MessageExt) -> Result<(Message, u32)> {
    let mut destination = m.topic().to_string();
    if destination.starts_with(RETRY_PREFIX)
        && let Some(original) = prop(m, RETRY_TOPIC_PROPERTY)
    {
        destination = original.to_owned();
    }
    let body = m.body().unwrap_or_default();
    let mut message = Message::new(destination, body);
    match prop(m, headers::MESSAGE_ID) {
        Some(id) => message = message.with_id(MessageId::parse(id)?),
        None => {
            // Sent by a non-Surety producer: the broker's unique key is the stable id.
            let uniq = prop(m, "UNIQ_KEY")
                .unwrap_or(m.msg_id().as_str())
                .to_owned();
            message = message.with_id(MessageId::parse(uniq)?);
        }
    }
    if let Some(key) = prop(m, KEY_PROPERTY) {
        message = message.with_key(key);
    }
    let created = prop(m, headers::CREATED_AT)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(m.born_timestamp().max(0) as u64);
    message = message.with_created_at(UNIX_EPOCH + Duration::from_millis(created));
    let mut user = BTreeMap::new();
    for (name, value) in m.properties() {
        let name = name.as_str();
        if is_internal(name) || is_system(name) {
            continue;
        }
        user.insert(name.to_owned(), value.to_string());
    }
    *message.headers_mut() = user;
    let broker_count = (m.reconsume_times().max(0) as u32).saturating_add(1);
    let carried = prop(m, headers::ATTEMPT)
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1);
    Ok((message, broker_count.max(carried)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_levels_round_up() {
        assert_eq!(delay_level(Duration::from_millis(50)), 1);
        assert_eq!(delay_level(Duration::from_secs(1)), 1);
        assert_eq!(delay_level(Duration::from_millis(1500)), 2);
        assert_eq!(delay_level(Duration::from_secs(30)), 4);
        assert_eq!(delay_level(Duration::from_secs(100_000)), 18);
    }

    #[test]
    fn topics_without_dots() {
        assert!(validate_topic("orders_v1-%DLQ%").is_ok());
        assert!(validate_topic("orders.v1").is_err());
        assert!(validate_topic("").is_err(), "an empty topic is invalid");
    }

    #[test]
    fn reserved_header_names_are_invalid() {
        let m = Message::new("t", "x").with_header("KEYS", "k");
        let e = encode(&m, "t", 1024).unwrap_err();
        assert_eq!(e.kind(), surety_core::ErrorKind::InvalidMessage);
    }
}
