//! The Apache Kafka adapter of Surety, on rdkafka (librdkafka, built from its bundled
//! source with make and a C compiler).
//!
//! # What maps to what
//!
//! | Surety | Kafka |
//! |---|---|
//! | destination | topic (created by [`Broker::declare`](surety_core::Broker::declare) with the admin client; existing topics are fine) |
//! | message id, created-at | headers `surety-message-id`, `surety-created-at` (and the record's CreateTime) |
//! | ordering key | record key: the default partitioner puts one key on one partition |
//! | `publish` (confirm) | idempotent producer (`enable.idempotence=true`, `acks=all`); the delivery report is the confirm |
//! | `publish_batch` | every record enqueued before any report is awaited: the batch is pipelined |
//! | `publish_oneway` | enqueue, report ignored (at-most-once) |
//! | undeclared destination | [`Unroutable`](surety_core::ErrorKind::Unroutable): topic existence is checked with a metadata request that never auto-creates (positive answers cached), and the producer runs with `allow.auto.create.topics=false`, so a broker with `auto.create.topics.enable=true` does not create it |
//! | broker transaction | transactional producer (`transactional.id`), pooled; blocking calls in `spawn_blocking`; `publish` enqueues and the delivery reports are read together before the commit (a failed one aborts the transaction, naming the message) |
//! | consumer group | consumer group; `isolation.level=read_committed`, `enable.auto.commit=false`, `auto.offset.reset=earliest` |
//! | ack | offset commit, only after the handler's outcome was settled (`surety_core::raw::ConsumePath`) |
//! | `Retry` | unordered subscription: the record is re-published to the group's retry topic `<topic>.<group>.retry` with `surety-attempt` and a due time, and the source offset committed; the same subscription consumes the retry topic and holds a record until it is due. Ordered subscription: retried in place, blocking its partition |
//! | dead letter | `<topic>.<group>.dlq` (or the subscription's own), with `surety-dead-letter-reason`, `surety-dead-letter-attempts`, `surety-original-destination`, `surety-consumer-group` |
//! | dead-letter list / re-drive | [`Broker::dead_letters`](surety_core::Broker::dead_letters): reads `<topic>.<group>.dlq` from a re-drive cursor, the committed offsets of the group `<group>.surety-redrive` (a log cannot delete); re-driven records are confirmed at their origin before the cursor moves |
//! | exactly-once read-process-write | [`KafkaBroker::exactly_once`]: outputs and consumer offsets in one transaction (`send_offsets_to_transaction`) |
//!
//! # Guarantees and how they are kept
//!
//! - **Confirmed means stored by all in-sync replicas.** librdkafka retries transient
//!   failures inside `delivery.timeout.ms` without duplicating or reordering (the
//!   idempotent producer). Errors that surface are mapped: too large or malformed →
//!   `InvalidMessage`; unknown topic → `Unroutable`; timed out or in flight when the
//!   producer failed → `OutcomeUnknown` (retry; the id absorbs a duplicate). If
//!   librdkafka reports a *fatal* producer error (`client().fatal_error()`, e.g. an
//!   idempotence sequence that cannot be repaired), the producer is rebuilt, never left
//!   stuck.
//! - **Ack after process.** A partition is processed in order, one record at a time; its
//!   offset is committed only after the handler settled. Partitions run in parallel up to
//!   the subscription's `concurrency`.
//! - **Attempts survive restarts.** Retried records carry their attempt count; for a
//!   crash, the lane commits the record's own offset with metadata
//!   `"<offset>:<deliveries>"` *before* the handler runs, so the next consumer knows the
//!   record was delivered before.
//! - **Rebalances neither lose nor double-commit.** A revoked partition's in-flight
//!   handler settles and commits inside the revoke callback; afterwards the partition's
//!   commit gate is closed, so a straggler cannot commit a partition another consumer
//!   owns.
//! - **A poison record does not stall its partition beyond its retries**: retries go
//!   through the retry topic. If the retry or dead-letter topic cannot be written, the
//!   offset is not committed past the record; it is delivered again in place after the
//!   policy's longest backoff (kept, not hot-looped).
//! - **Per-key order** ([`Capability::OrderingPerKey`](surety_core::Capability::OrderingPerKey))
//!   holds for ordered subscriptions, retries included, because they retry in place.
//!   Unordered subscriptions keep partition order for first deliveries but not for retries.
//! - **Aborted transactions are never delivered**: consumers read committed only.
//!
//! # Why a Kafka transaction alone does not give half messages
//!
//! The half-message contract (`send_in_transaction` + `CheckBack`) ties a message to the
//! application's *database* transaction. A Kafka transaction only makes several Kafka
//! writes atomic with each other. Doing "begin Kafka tx; send; commit DB; commit Kafka
//! tx" leaves a window: if the process dies after the database commit and before the
//! Kafka commit, the broker aborts the open transaction after `transaction.timeout.ms`
//! and the message of a committed change is lost. Committing Kafka first has the
//! opposite hole (a message for a change that then rolls back). Kafka never asks the
//! producer "did your local transaction commit?", so nothing resolves the window. That
//! needs a durable prepared record beside the business data, checked back later: the SQL
//! prepared-message store (`surety-sql`) wraps any broker, this one included. This
//! adapter therefore declares `half_messages = false`.
//!
//! # TLS and SASL
//!
//! Put librdkafka's settings (`security.protocol`, `ssl.*`, `sasl.*`) in
//! [`KafkaConfig::settings`]; they reach every client. TLS needs the crate feature `ssl`
//! (system OpenSSL headers, `libssl-dev`) or `ssl-vendored`; without it librdkafka
//! refuses `security.protocol=ssl` with a configuration error. Secret values (keys
//! naming a password, secret, key, token or JAAS config) never appear in `Debug`
//! output, errors or logs.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> surety_core::Result<()> {
//! use surety_core::{Broker, Message, Topology};
//! use surety_kafka::{KafkaBroker, KafkaConfig};
//!
//! let broker = KafkaBroker::connect(KafkaConfig::new("127.0.0.1:9092")).await?;
//! broker.declare(&Topology::new("orders").group("billing")).await?;
//! let receipt = broker.publisher().await?.publish(&Message::new("orders", "order 1").with_key("order-1")).await?;
//! println!("stored at {:?}", receipt.position);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod broker;
mod codec;
mod config;
mod consumer;
mod dead_letters;
pub mod eos;
mod error;
mod publisher;
mod shared;
mod transaction;

pub use broker::KafkaBroker;
pub use config::{BOOTSTRAP_ENV, KafkaConfig};
pub use eos::{ExactlyOnce, Processor, ProcessorFn, processor_fn};

pub(crate) const ADAPTER: &str = "kafka";
