//! Names and declarations of exchanges and queues.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use surety_core::raw::validate_destination;
use surety_core::{Error, ErrorKind, Result};

use crate::ADAPTER;
use crate::config::{QueueType, RabbitConfig};
use crate::error;

/// Longest exchange or queue name RabbitMQ accepts, in bytes.
const MAX_NAME: usize = 255;

/// The queue of consumer group `group` on `destination`: `<destination>:<group>`.
/// Destinations have no `:`, so this never collides with a destination's own names.
pub(crate) fn group_queue(destination: &str, group: &str) -> String {
    format!("{destination}:{group}")
}

/// The consumer group whose queue every declared dead-letter destination gets, so that
/// dead letters are kept until read: `Subscription::new(dead_letter_destination,
/// DEAD_LETTER_GROUP)` reads them all, including those from before it subscribed.
pub const DEAD_LETTER_GROUP: &str = "dead-letters";

/// The dead-letter destination convention: `<destination>.<group>.dlq`.
pub(crate) fn dead_letter_name(destination: &str, group: &str) -> String {
    format!("{destination}.{group}.dlq")
}

/// The retry delay queue of a group queue for `delay`.
pub(crate) fn delay_queue(queue: &str, delay: Duration) -> String {
    format!("{queue}:delay:{}ms", delay.as_millis())
}

/// Rounds a retry delay up to two significant digits of milliseconds (never earlier,
/// at most 10% later), so that a group has a bounded set of delay queues.
pub(crate) fn delay_bucket(delay: Duration) -> Duration {
    let ms = delay.as_millis().min(i32::MAX as u128) as u64;
    if ms <= 100 {
        return Duration::from_millis(ms);
    }
    let mut scale = 1;
    while ms / scale >= 100 {
        scale *= 10;
    }
    Duration::from_millis(ms.div_ceil(scale) * scale)
}

pub(crate) fn validate_group(group: &str) -> Result<()> {
    if group.is_empty()
        || group.len() > 128
        || !group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'%'))
    {
        return Err(Error::new(
            ErrorKind::Configuration,
            format!("consumer group {group:?} must be 1 to 128 bytes of [A-Za-z0-9._%-]"),
        )
        .with_context("adapter", ADAPTER));
    }
    Ok(())
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    if name.len() > MAX_NAME {
        return Err(Error::new(
            ErrorKind::Configuration,
            format!(
                "RabbitMQ {kind} name {name:?} is {} bytes, over the limit of {MAX_NAME}",
                name.len()
            ),
        )
        .with_context("adapter", ADAPTER));
    }
    if name.starts_with("amq.") {
        return Err(Error::new(
            ErrorKind::Configuration,
            format!("RabbitMQ reserves names starting with \"amq.\": {name:?}"),
        )
        .with_context("adapter", ADAPTER));
    }
    Ok(())
}

pub(crate) fn check_destination(destination: &str) -> Result<()> {
    validate_destination(destination)?;
    check_name("exchange", destination)
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declarations on one channel. A refused declaration closes the channel, so callers
/// use a channel of their own for it.
pub(crate) struct Declarer<'a> {
    pub(crate) channel: &'a Channel,
    pub(crate) config: &'a RabbitConfig,
}

impl Declarer<'_> {
    /// The router exchange every Surety publish goes through.
    pub(crate) async fn router(&self) -> Result<()> {
        self.channel
            .exchange_declare(
                self.config.router_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| error::topology("declare the router exchange", e))
    }

    /// A destination: a durable fanout exchange, bound to the router by its name.
    pub(crate) async fn destination(&self, destination: &str) -> Result<()> {
        check_destination(destination)?;
        self.channel
            .exchange_declare(
                destination.into(),
                ExchangeKind::Fanout,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                error::topology(
                    &format!(
                        "declare exchange {destination:?} (an exchange of that name with another type or durability exists?)"
                    ),
                    e,
                )
                .with_context("destination", destination)
            })?;
        self.channel
            .exchange_bind(
                destination.into(),
                self.config.router_exchange.as_str().into(),
                destination.into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                error::topology(&format!("bind exchange {destination:?} to the router"), e)
            })
    }

    /// A durable queue of the configured type bound to `destination`'s exchange.
    pub(crate) async fn bound_queue(&self, destination: &str, queue: &str) -> Result<()> {
        check_name("queue", queue)?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long(self.config.queue_type.as_str()));
        self.channel
            .queue_declare(queue.into(), durable_queue(), args)
            .await
            .map_err(|e| {
                error::topology(
                    &format!(
                        "declare queue {queue:?} as a durable {} queue (it exists with other arguments?)",
                        self.config.queue_type.as_str()
                    ),
                    e,
                )
                .with_context("queue", queue)
            })?;
        self.channel
            .queue_bind(
                queue.into(),
                destination.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                error::topology(
                    &format!(
                        "bind queue {queue:?} to {destination:?} (is the destination declared?)"
                    ),
                    e,
                )
                .with_context("destination", destination)
            })
    }

    /// The delay queue that holds retries of `queue` for `delay`, then dead-letters
    /// them back to `queue` through the default exchange.
    pub(crate) async fn delay_queue(&self, queue: &str, delay: Duration) -> Result<String> {
        let name = delay_queue(queue, delay);
        check_name("queue", &name)?;
        let ttl = delay.as_millis().min(i32::MAX as u128) as i64;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            long(self.config.delay_queue_type.as_str()),
        );
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(queue));
        match self.config.delay_queue_type {
            QueueType::Classic => {
                let idle = self
                    .config
                    .delay_queue_idle
                    .as_millis()
                    .min(i32::MAX as u128) as i64;
                args.insert(
                    "x-expires".into(),
                    AMQPValue::LongLongInt((ttl + idle).min(i32::MAX as i64)),
                );
            }
            QueueType::Quorum => {
                args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
                args.insert("x-overflow".into(), long("reject-publish"));
            }
        }
        self.channel
            .queue_declare(name.as_str().into(), durable_queue(), args)
            .await
            .map_err(|e| error::topology(&format!("declare delay queue {name:?}"), e))?;
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_by_at_most_ten_percent() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!(delay_bucket(ms(0)), ms(0));
        assert_eq!(delay_bucket(ms(57)), ms(57));
        assert_eq!(delay_bucket(ms(101)), ms(110));
        assert_eq!(delay_bucket(ms(1234)), ms(1300));
        assert_eq!(delay_bucket(ms(1500)), ms(1500));
        assert_eq!(delay_bucket(ms(30_001)), ms(31_000));
        for n in 1..5000u64 {
            let b = delay_bucket(ms(n)).as_millis() as u64;
            assert!(b >= n && b <= n + n / 10 + 1, "{n} -> {b}");
        }
    }
}
