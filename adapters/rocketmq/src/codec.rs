//! Surety messages to RocketMQ messages and back.
//!
//! | Surety | RocketMQ |
//! |---|---|
//! | destination | topic (`[A-Za-z0-9_%|-]`, at most 127 bytes: no `.`) |
//! | group on a destination | consumer group `<group>\|<destination>` ([`consumer_group`]) |
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
use surety_core::{Error, ErrorKind, Message, MessageId, Result, headers};

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
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'%' | b'|'))
    {
        return Err(Error::invalid(format!(
            "RocketMQ topic {topic:?} must be 1 to {MAX_TOPIC_LEN} bytes of [A-Za-z0-9_%|-]"
        ))
        .with_context("destination", topic));
    }
    Ok(())
}

/// The separator of a Surety group and its destination in a RocketMQ consumer group.
/// Surety groups may not contain it, so the pair can always be read back.
const GROUP_SEPARATOR: char = '|';

/// [`consumer_group`] without the checks, for names that were checked before.
pub(crate) fn consumer_group_name(group: &str, destination: &str) -> String {
    format!("{group}{GROUP_SEPARATOR}{destination}")
}

/// The RocketMQ consumer group of Surety group `group` on `destination`:
/// `<group>|<destination>`.
///
/// One RocketMQ group per Surety group *and destination*: RocketMQ keeps retries in
/// `%RETRY%<consumer group>` and dead letters in `%DLQ%<consumer group>`, and a group
/// whose consumers subscribe to different topics mixes them (a consumer of one
/// destination would receive another's retries) and rebalances each topic's queues over
/// consumers that do not read it. The retry topic must fit RocketMQ's topic limit, so the
/// name is refused (a configuration error) when `%RETRY%<name>` would not.
pub(crate) fn consumer_group(group: &str, destination: &str) -> Result<String> {
    let refuse = |why: String| {
        Err(Error::new(ErrorKind::Configuration, why)
            .with_context("group", group)
            .with_context("destination", destination))
    };
    if validate_topic(group).is_err() || group.contains(GROUP_SEPARATOR) {
        return refuse(format!(
            "consumer group {group:?} must be 1 to {MAX_TOPIC_LEN} bytes of [A-Za-z0-9_%-]"
        ));
    }
    validate_topic(destination)?;
    let name = consumer_group_name(group, destination);
    if RETRY_PREFIX.len() + name.len() > MAX_TOPIC_LEN {
        return refuse(format!(
            "the RocketMQ consumer group of {group:?} on {destination:?} is {name:?}; its retry topic {RETRY_PREFIX}{name} would exceed {MAX_TOPIC_LEN} bytes (shorten the group or the destination)"
        ));
    }
    Ok(name)
}

/// Validates `message` and builds the RocketMQ message for `topic`.
pub(crate) fn encode(message: &Message, topic: &str, max_size: usize) -> Result<RmqMessage> {
    message.validate(Some(max_size))?;
    encode_copy(message, topic)
}

/// Builds the RocketMQ message for `topic` without Surety's message rules: for Surety's
/// own copies of a delivered message (a retry, a dead letter), which carry what the broker
/// delivered, a foreign producer's 20 000-byte property included. Refusing those would
/// leave the message unable to move.
pub(crate) fn encode_copy(message: &Message, topic: &str) -> Result<RmqMessage> {
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

/// Where a message was read from, which decides whether Surety's bookkeeping on it is
/// Surety's.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lane<'a> {
    /// The subscription's own retry topic, `%RETRY%<consumer group>`, which only Surety
    /// (and the broker's own send-back) writes: `surety-attempt` counts, at most up to
    /// the policy's attempts, and the origin is the subscription's destination whatever
    /// `RETRY_TOPIC` says.
    Retry {
        /// The subscription's destination.
        destination: &'a str,
        /// The policy's attempts.
        max_attempts: u32,
    },
    /// Any other topic (the subscribed one, a dead-letter topic), which anyone with
    /// publish rights writes: `surety-attempt` there is a plain header.
    Open,
}

impl<'a> Lane<'a> {
    /// The lane `m` was delivered on, for a subscription of `destination`. The client
    /// hands a message from `%RETRY%<consumer group>` over under its original topic, named
    /// by the `RETRY_TOPIC` property that Surety's retry copies and the broker's own
    /// send-back write; that property is a system property, which a producer's user
    /// properties cannot set.
    pub(crate) fn of(m: &MessageExt, destination: &'a str, max_attempts: u32) -> Lane<'a> {
        if prop(m, RETRY_TOPIC_PROPERTY) == Some(destination) {
            Lane::Retry {
                destination,
                max_attempts,
            }
        } else {
            Lane::Open
        }
    }
}

/// Rebuilds the Surety message from what the broker delivered on `lane`, and the attempt
/// number: the broker's count (`reconsumeTimes + 1`), or on the retry lane the larger of
/// it and `surety-attempt`.
///
/// The id is `surety-message-id` when it is a valid id, otherwise the broker's own unique
/// key of the message (`UNIQ_KEY`, else its msgId): a message from a foreign producer keeps
/// one id on every delivery, in the logs and in its dead letter.
pub(crate) fn decode(m: &MessageExt, lane: Lane<'_>) -> Result<(Message, u32)> {
    let (destination, trusted_attempts) = match lane {
        Lane::Retry {
            destination,
            max_attempts,
        } => (destination.to_owned(), Some(max_attempts)),
        Lane::Open => (m.topic().to_string(), None),
    };
    let body = m.body().unwrap_or_default();
    let mut message = Message::new(destination, body);
    let given = prop(m, headers::MESSAGE_ID);
    match given.map(MessageId::parse) {
        Some(Ok(id)) => message = message.with_id(id),
        unusable => {
            // Sent by a non-Surety producer: the broker's unique key is the stable id.
            let uniq = prop(m, "UNIQ_KEY")
                .unwrap_or(m.msg_id().as_str())
                .to_owned();
            if unusable.is_some() {
                let shown: String = given.unwrap_or_default().chars().take(64).collect();
                tracing::warn!(
                    topic = %m.topic(),
                    broker_id = %uniq,
                    given = %surety_core::raw::header_safe(&shown),
                    "message with an unusable surety-message-id; the broker's id is used"
                );
            }
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
        let data = name == headers::ATTEMPT && trusted_attempts.is_none();
        if (is_internal(name) && !data) || is_system(name) {
            continue;
        }
        user.insert(name.to_owned(), value.to_string());
    }
    *message.headers_mut() = user;
    let broker_count = (m.reconsume_times().max(0) as u32).saturating_add(1);
    let carried = trusted_attempts
        .and_then(|max| {
            prop(m, headers::ATTEMPT)
                .and_then(|v| v.parse::<u32>().ok())
                .map(|n| n.min(max))
        })
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
    fn a_consumer_group_is_per_group_and_destination() {
        assert_eq!(
            consumer_group("billing", "orders").unwrap(),
            "billing|orders"
        );
        assert!(
            consumer_group("a|b", "orders").is_err(),
            "the separator is not a group character"
        );
        let long = "d".repeat(119);
        assert!(
            consumer_group("g", &long).is_err(),
            "%RETRY%g|<119> is 128 bytes"
        );
        assert!(consumer_group("g", &long[..118]).is_ok());
    }

    #[test]
    fn reserved_header_names_are_invalid() {
        let m = Message::new("t", "x").with_header("KEYS", "k");
        let e = encode(&m, "t", 1024).unwrap_err();
        assert_eq!(e.kind(), surety_core::ErrorKind::InvalidMessage);
    }
}
