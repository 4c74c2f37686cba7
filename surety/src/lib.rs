//! Surety: reliable messaging with eventual consistency, the same contracts on every
//! broker.
//!
//! A service changes its own database and must tell other services. Surety makes sure the
//! message is never lost, never sent for a change that rolled back, and that the
//! consumer's effect happens once.
//!
//! This crate re-exports what applications use of [`surety_core`] (messages, publishers,
//! transactional send, consumers, errors, dead letters, metric names) and, behind one
//! cargo feature each, the adapters. What adapter authors need (`surety_core::raw`: the
//! shared publish, consume and re-drive paths) is not re-exported here:
//!
//! ```compile_fail
//! use surety::raw::ConsumePath; // adapter authors depend on surety-core directly
//! ```
//!
//! | feature | adapter |
//! |---|---|
//! | `memory` (default) | [`memory`]: in-process broker, the reference and embedded default |
//! | `rabbitmq` | `rabbitmq`: RabbitMQ (lapin): confirmed mandatory publish, tx, delay-queue retries, dead letters, reconnecting consumers |
//! | `kafka` | `kafka`: Apache Kafka (rdkafka): idempotent confirmed send, transactions, exactly-once read-process-write |
//! | `rocketmq` | `rocketmq`: Apache RocketMQ (rocketmq-client-rust): honest send status, native half messages with check-back, retry and dead letters |
//! | `postgres` | `sql`: outbox + relay, idempotent inbox, prepared-message store (half messages for any broker), on PostgreSQL (`sql::PgStore`) |
//! | `sqlite` | `sql`: the same on SQLite, one relay per database file (`sql::SqliteStore`) |
//! | `sql` | both `postgres` and `sqlite` |
//!
//! `postgres` and `sqlite` both enable the `sql` module, each compiling only its own
//! database driver: `sql::PgStore` comes with `postgres`, `sql::SqliteStore` with
//! `sqlite`, and code generic over `sql::Backend` runs on whichever is on.
//!
//! The features are additive: any combination compiles (`scripts/test` checks the crate
//! with each one alone; the workspace build has them all together). Switching broker is one feature and one URL:
//!
//! ```toml
//! surety = { version = "0.1", default-features = false, features = ["kafka", "postgres"] }
//! ```
//!
//! [`connect`] turns a URL into an `Arc<dyn Broker>`, so an application switches broker by
//! changing one feature and one URL. Libraries should depend on `surety-core` alone;
//! applications pick the broker here.
//!
//! ```
//! # #[cfg(feature = "memory")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> surety::Result<()> {
//! use surety::{Message, Topology};
//!
//! let broker = surety::connect("memory:").await?;
//! broker.declare(&Topology::new("orders").group("cart")).await?;
//! let receipt = broker.publisher().await?.publish(&Message::new("orders", "order 1")).await?;
//! assert_eq!(receipt.destination, "orders");
//! # Ok(()) }
//! # #[cfg(not(feature = "memory"))] fn main() {}
//! ```
#![deny(missing_docs)]

mod connect;

pub use connect::connect;
pub use surety_core::redact;
pub use surety_core::telemetry;
pub use surety_core::{
    Broker, BrokerTransaction, Capabilities, Capability, CapabilityCheck, CheckBack, CheckBackFn,
    Codec, DeadLetter, DeadLetters, Delivery, Error, ErrorKind, Handler, HandlerError, HandlerFn,
    Json, LocalTransaction, Message, MessageId, Outcome, Publisher, Receipt, RedriveReport,
    RedriveSelection, Result, RetryPolicy, Subscriber, Subscription, SubscriptionHandle, Topology,
    TransactionalPublisher, TxOutcome, TxState, check_back_fn, handler_fn, headers,
};

/// The in-process broker (feature `memory`).
#[cfg(feature = "memory")]
pub use surety_memory as memory;

/// The RabbitMQ adapter (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub use surety_rabbitmq as rabbitmq;

/// The Apache Kafka adapter (feature `kafka`).
#[cfg(feature = "kafka")]
pub use surety_kafka as kafka;

/// The Apache RocketMQ adapter (feature `rocketmq`).
#[cfg(feature = "rocketmq")]
pub use surety_rocketmq as rocketmq;

/// The local message table: outbox, relay, inbox, prepared messages (feature `postgres`
/// or `sqlite`).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use surety_sql as sql;
