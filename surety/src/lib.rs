//! Surety: reliable messaging with eventual consistency, the same contracts on every
//! broker.
//!
//! A service changes its own database and must tell other services. Surety makes sure the
//! message is never lost, never sent for a change that rolled back, and that the
//! consumer's effect happens once.
//!
//! This crate re-exports the contracts of [`surety_core`] and, behind one cargo feature
//! each, the adapters:
//!
//! | feature | adapter |
//! |---|---|
//! | `memory` (default) | [`memory`]: in-process broker, the reference and embedded default |
//!
//! The `rabbitmq`, `kafka`, `rocketmq`, `postgres` and `sqlite` features arrive with
//! their adapters. Libraries should depend on `surety-core` alone; applications pick the
//! broker here.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> surety::Result<()> {
//! use surety::{Broker, Message, Topology};
//!
//! let broker = surety::memory::MemoryBroker::new();
//! broker.declare(&Topology::new("orders").group("cart")).await?;
//! let receipt = broker.publisher().await?.publish(&Message::new("orders", "order 1")).await?;
//! assert_eq!(receipt.destination, "orders");
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub use surety_core::*;

/// The in-process broker (feature `memory`).
#[cfg(feature = "memory")]
pub use surety_memory as memory;
