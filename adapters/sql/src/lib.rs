//! Surety's local message table on PostgreSQL and SQLite (sqlx): transactional outbox with
//! a relay, an idempotent inbox, and a prepared-message (half message) store with
//! check-back for brokers without native half messages.
//!
//! | feature | database | store |
//! |---|---|---|
//! | `postgres` (default) | PostgreSQL: several relays share the rows through leases | [`PgStore`] |
//! | `sqlite` (default) | SQLite, bundled: one relay per database file | [`SqliteStore`] |
//! | `tls-rustls` | TLS to PostgreSQL through rustls with ring | |
//!
//! Each feature compiles only its own sqlx driver. A store is typed by its database, as a
//! sqlx `Pool` is: [`SqlStore<DB>`](SqlStore) with `DB` a [`Backend`] (`sqlx::Postgres`
//! or `sqlx::Sqlite`), so the outbox and inbox take that database's connection and code
//! that works on either is generic over `DB: Backend`. A tool that learns the database
//! from a URL at run time picks the type with [`Dialect::of_url`].
//!
//! One store holds a pool and the rendered SQL for its tables (names configurable through
//! [`TableNames`], validated against an identifier whitelist before they reach any SQL).
//! [`SqlStore::migrate`] applies the schema shipped with the crate.
//!
//! - **Outbox** ([`Outbox::enqueue`]): the application inserts the message in its own
//!   transaction (`&mut *tx`), so the message exists if and only if the business change
//!   committed. Messages over [`StoreConfig::max_message_size`] are refused there with an
//!   [`surety_core::ErrorKind::InvalidMessage`] error.
//! - **Relay** ([`Relay`]): leases due rows, publishes them with confirm through any
//!   `Arc<dyn Publisher>` in batches, marks them `SENT` only after the confirm, schedules
//!   failures with the core [`surety_core::RetryPolicy`] backoff and turns rows `DEAD`
//!   after `max_attempts`; [`Outbox::dead`] lists them and [`Outbox::redrive`] sends them
//!   again. On PostgreSQL several relays share the work (`FOR UPDATE SKIP LOCKED` row
//!   leases; a crashed relay's rows are taken over when its lease expires). On SQLite run
//!   **one relay per database file**: SQLite has one writer, and the leases still keep a
//!   second relay from publishing a leased row, but nothing is gained by it.
//! - **Inbox** ([`Inbox::process`], or [`Inbox::handler`] as a subscription's handler):
//!   records `(consumer_name, message_id)` under a unique key in the same transaction as
//!   the consumer's effect; a duplicate skips the effect.
//! - **Prepared messages** ([`PreparedMessages`], [`Checker`],
//!   [`SqlTransactionalPublisher`]): the half-message contract over any publisher;
//!   [`WithSqlHalfMessages`] wraps a whole broker (RabbitMQ, Kafka) so its
//!   `transactional_publisher` is backed by this store.
//! - **Receipts** ([`Receipts`], off by default): the consumer reports completion or a
//!   business failure back; completed rows become `COMPLETED`, failures run the producer's
//!   compensation once, and rows without a receipt are re-delivered after
//!   [`StoreConfig::receipt_timeout`].
//!
//! The code follows a row's life: `outbox.rs` and `prepared.rs` insert it, `lease.rs` and
//! `checker.rs` lease it, and `transitions.rs` holds every change of its state (with the
//! table of allowed transitions); `store.rs` keeps only the pool, the migrations and
//! retention.
//!
//! Delivery is at least once: a relay that dies after the broker's confirm and before it
//! marks the row sent publishes the row again after the lease expires. Consumers absorb
//! that with the inbox (the message id is stable).
//!
//! Errors are [`surety_core::Error`]s: `Unavailable` when the database cannot be reached,
//! `Storage` for other database failures (with a retry verdict), `Configuration` for bad
//! table names or URLs. No error carries a connection URL.
#![deny(missing_docs)]

mod audit;
mod backend;
mod broker;
mod checker;
mod config;
mod dialect;
mod entry;
mod error;
mod inbox;
mod inbox_handler;
mod lease;
mod outbox;
mod prepared;
mod receipts;
mod relay;
mod sql;
mod store;
mod transactional;
mod transitions;
mod worker;

pub use audit::{AuditRecord, DlqAudit, RedriveAudit};
pub use backend::Backend;
pub use broker::WithSqlHalfMessages;
pub use checker::{CheckExhausted, CheckStats, Checker, CheckerConfig};
pub use config::{MAX_TABLE_NAME_LEN, StoreConfig, TableNames, validate_table_name};
pub use dialect::Dialect;
pub use entry::{EntryState, OutboxEntry};
pub use inbox::{Inbox, InboxOutcome, MAX_CONSUMER_NAME_LEN};
pub use inbox_handler::InboxHandler;
pub use outbox::Outbox;
pub use prepared::{PreparedId, PreparedMessages};
pub use receipts::{
    Failure, ReceiptHandler, ReceiptOutcome, Receipts, parse_receipt, receipt_message,
};
pub use relay::{Relay, RelayConfig, RelayStats};
#[cfg(feature = "postgres")]
pub use store::PgStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{CleanupStats, SqlStore};
pub use transactional::SqlTransactionalPublisher;
pub use worker::Worker;

/// sqlx, re-exported so applications use the same version (and the same database
/// features) for their transactions.
pub use sqlx;
