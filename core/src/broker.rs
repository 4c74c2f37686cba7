//! The entry point of an adapter: one object per broker connection that declares topology
//! and hands out publishers and subscribers.

use std::sync::Arc;

use async_trait::async_trait;

use crate::capability::{Capabilities, Capability};
use crate::consume::Subscriber;
use crate::dead_letter::DeadLetters;
use crate::error::Result;
use crate::publish::Publisher;
use crate::transaction::{BrokerTransaction, CheckBack, TransactionalPublisher};

/// The durable places a destination needs before messages flow: the destination itself,
/// one queue or cursor per consumer group, and the groups' dead-letter destinations.
///
/// Declaring is idempotent. Declare before publishing: a group declared later may not see
/// earlier messages on every broker (RabbitMQ drops messages no queue was bound for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// The destination.
    pub destination: String,
    /// Its consumer groups.
    pub groups: Vec<String>,
    /// Whether to declare each group's dead-letter destination too.
    pub dead_letter: bool,
}

impl Topology {
    /// A destination with no groups and dead letters on.
    pub fn new(destination: impl Into<String>) -> Self {
        Topology {
            destination: destination.into(),
            groups: Vec::new(),
            dead_letter: true,
        }
    }

    /// Adds a consumer group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.groups.push(group.into());
        self
    }

    /// Sets whether dead-letter destinations are declared.
    pub fn dead_letter(mut self, on: bool) -> Self {
        self.dead_letter = on;
        self
    }
}

/// One broker, seen through Surety's contracts. Object safe: `Arc<dyn Broker>` lets an
/// application switch brokers by configuration.
#[async_trait]
pub trait Broker: Send + Sync {
    /// The adapter's name (`memory`, `rabbitmq`, `kafka`, `rocketmq`).
    fn name(&self) -> &'static str;

    /// What this adapter can do.
    fn capabilities(&self) -> Capabilities;

    /// Declares a destination, its groups and their dead-letter destinations.
    async fn declare(&self, topology: &Topology) -> Result<()>;

    /// A publisher with confirms.
    async fn publisher(&self) -> Result<Arc<dyn Publisher>>;

    /// A transactional publisher of `producer_group`, whose check-back listener is
    /// `check_back`. Requires [`Capability::HalfMessages`].
    async fn transactional_publisher(
        &self,
        producer_group: &str,
        check_back: Arc<dyn CheckBack>,
    ) -> Result<Arc<dyn TransactionalPublisher>> {
        let _ = (producer_group, check_back);
        Err(Capability::HalfMessages.unsupported(self.name()))
    }

    /// Begins a broker-native transaction. Requires [`Capability::BrokerTransactions`].
    async fn begin_transaction(&self) -> Result<Box<dyn BrokerTransaction>> {
        Err(Capability::BrokerTransactions.unsupported(self.name()))
    }

    /// A subscriber.
    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>>;

    /// Where `group`'s dead letters from `destination` go by this adapter's convention.
    fn dead_letter_destination(&self, destination: &str, group: &str) -> String;

    /// The operator's view of dead letters: list and re-drive. Requires
    /// [`Capability::DeadLetter`].
    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        Err(Capability::DeadLetter.unsupported(self.name()))
    }
}
