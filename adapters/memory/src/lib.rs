//! An in-process broker implementing every Surety contract.
//!
//! It is the reference implementation the conformance suite is written against, and the
//! embedded default for examples and for applications that want Surety's contracts
//! without a server. It is never a stand-in for a real broker in that broker's tests.
//!
//! What it does, like a real broker would:
//! - destinations must be declared; publishing to an undeclared one is
//!   [`ErrorKind::Unroutable`](surety_core::ErrorKind::Unroutable);
//! - each consumer group receives every message; consumers in a group share the work;
//!   a group declared late starts from the first message (like Kafka's `earliest`);
//! - deliveries are acked only after the handler settles them; the attempt count is kept
//!   per message in the broker, so it survives consumer restarts; an aborted consumer's
//!   in-flight messages return to the queue;
//! - half messages with a periodic check-back to any live producer of the group, bounded
//!   by a check limit (then discarded, like RocketMQ);
//! - broker transactions (atomic batch publish);
//! - per-key ordering for ordered subscriptions.
//!
//! Messages live in memory for the broker's lifetime: nothing survives the process.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
//! use std::sync::Arc;
//! use surety_core::{Broker, Message, Publisher, Topology};
//! use surety_memory::MemoryBroker;
//!
//! let broker = MemoryBroker::new();
//! broker.declare(&Topology::new("orders").group("billing")).await?;
//! let publisher: Arc<dyn Publisher> = broker.publisher().await?;
//! publisher.publish(&Message::new("orders", "hello")).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod broker;
mod config;
mod consumer;
mod dead_letters;
mod publisher;
mod shared;
mod transaction;

pub use broker::MemoryBroker;
pub use config::MemoryConfig;

const ADAPTER: &str = "memory";
