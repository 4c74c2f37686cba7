//! Apache RocketMQ adapter of Surety, on `rocketmq-client-rust` 1.0 (the remoting
//! protocol: name server and broker, no proxy).
//!
//! | Surety | RocketMQ |
//! |---|---|
//! | `publish` | sync send; only `SEND_OK` is a [`surety_core::Receipt`]. `FLUSH_DISK_TIMEOUT`, `FLUSH_SLAVE_TIMEOUT`, `SLAVE_NOT_AVAILABLE` are [`surety_core::ErrorKind::NotDurable`] (retryable); retries bounded by [`RocketMqConfig::publish_retry`] (the client's own retries are off) |
//! | `publish_oneway` | oneway send: **at-most-once** |
//! | async mode | [`RocketMqPublisher::publish_with_callback`] |
//! | unroutable destination | the name server has no route for the topic (checked before sending, because a broker with `autoCreateTopicEnable=true` would create it) |
//! | `declare` | topics created on every master with the admin API; per group `%RETRY%<group>\|<destination>` and `%DLQ%<group>\|<destination>` (readable): one RocketMQ consumer group per Surety group and destination |
//! | `send_in_transaction` | half message, the caller's async local transaction, then commit / rollback (`TransactionMQProducer`) |
//! | `CheckBack` | the broker's check-back to any live producer of the group; `Unknown` leaves it to the next check until the broker's check limit |
//! | consumer group | push consumer (clustering), one client instance per consumer |
//! | ack after process | `CONSUME_SUCCESS` only after the handler's outcome is settled |
//! | retry with delay | a copy in `%RETRY%<group>\|<destination>` with a delay level (rounded up) and `surety-attempt` |
//! | dead letter | Surety publishes to `%DLQ%<group>\|<destination>` (or the subscription's destination) with `surety-dead-letter-*` headers, then acks |
//! | dead-letter list / re-drive | [`surety_core::Broker::dead_letters`]: pulls `%DLQ%<group>\|<destination>` from a re-drive cursor, the consume offsets of the group `<group>\|<destination>-surety-redrive`, moved with the admin API after the confirmed re-publish; a write-only `%DLQ%` topic is made readable first |
//! | per-key ordering | queue chosen by key hash; orderly consumer when `Subscription::ordered` |
//! | ACL | `AclClientRPCHook` from access key and secret key; the secret is never logged |
//!
//! Why some of this is done by the adapter rather than the client: `docs/rocketmq-interop.md`.
#![deny(missing_docs)]
#![recursion_limit = "512"]

mod broker;
mod codec;
mod config;
mod consumer;
mod dead_letters;
mod error;
mod host;
mod publisher;
mod shared;
mod transaction;

pub use broker::RocketMqBroker;
pub use config::{ACCESS_KEY_ENV, NAMESRV_ENV, RocketMqConfig, SECRET_KEY_ENV};
pub use publisher::RocketMqPublisher;

const ADAPTER: &str = "rocketmq";
