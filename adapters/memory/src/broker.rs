//! The broker object: `impl Broker` for the in-process broker.

use std::sync::Arc;

use async_trait::async_trait;
use surety_core::raw::{DeadLetterQueue, Publish, PublishPath, validate_destination};
use surety_core::{
    Broker, BrokerTransaction, Capabilities, Capability, CheckBack, DeadLetters, Message,
    Publisher, Result, Subscriber, Topology, TransactionalPublisher,
};

use crate::ADAPTER;
use crate::config::MemoryConfig;
use crate::consumer::MemorySubscriber;
use crate::dead_letters::MemoryDeadLetterLog;
use crate::publisher::MemorySender;
use crate::shared::{Shared, dead_letter_name};
use crate::transaction::{MemoryBrokerTransaction, MemoryTransactionalPublisher};

/// The in-process broker. Cheap to clone: clones share one broker.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl MemoryBroker {
    /// A broker with the default settings.
    pub fn new() -> Self {
        MemoryBroker::with_config(MemoryConfig::default())
    }

    /// A broker with `config`.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryBroker {
            shared: Shared::new(config),
        }
    }

    /// Messages waiting or in flight for `group` on `destination` (for tests and status).
    pub fn backlog(&self, destination: &str, group: &str) -> usize {
        self.shared.backlog(destination, group)
    }

    /// Half messages still prepared.
    pub fn prepared_count(&self) -> usize {
        self.shared.lock().half.len()
    }

    /// Half messages discarded after `check_max` unanswered check-backs.
    pub fn discarded_half_messages(&self) -> Vec<Message> {
        self.shared.lock().discarded_half.clone()
    }

    fn publish_path(&self) -> PublishPath {
        PublishPath::new(ADAPTER, self.capabilities())
            .with_retry(self.shared.config.publish_retry.clone())
    }

    fn confirmed_publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(Publish::new(
            self.publish_path(),
            MemorySender::new(self.shared.clone()),
        ))
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn name(&self) -> &'static str {
        ADAPTER
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with(Capability::OnewayPublish)
            .with(Capability::HalfMessages)
            .with(Capability::NativeHalfMessages)
            .with(Capability::BrokerTransactions)
            .with(Capability::OrderingPerKey)
            .with(Capability::DelayedRetry)
            .with(Capability::DeadLetter)
            .with_max_message_size(self.shared.config.max_message_size)
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        validate_destination(&topology.destination)?;
        let mut names = vec![];
        if topology.dead_letter {
            for group in &topology.groups {
                names.push(self.dead_letter_destination(&topology.destination, group));
            }
        }
        for name in &names {
            validate_destination(name)?;
        }
        let mut state = self.shared.lock();
        state.declare_destination(&topology.destination);
        for name in &names {
            state.declare_destination(name);
        }
        for group in &topology.groups {
            Shared::with_group(&mut state, &topology.destination, group, |_| ())?;
        }
        Ok(())
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(self.confirmed_publisher())
    }

    async fn transactional_publisher(
        &self,
        producer_group: &str,
        check_back: Arc<dyn CheckBack>,
    ) -> Result<Arc<dyn TransactionalPublisher>> {
        Ok(Arc::new(MemoryTransactionalPublisher::register(
            self.shared.clone(),
            self.confirmed_publisher(),
            producer_group,
            check_back,
        )))
    }

    async fn begin_transaction(&self) -> Result<Box<dyn BrokerTransaction>> {
        Ok(Box::new(MemoryBrokerTransaction::new(self.shared.clone())))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(MemorySubscriber::new(
            self.shared.clone(),
            self.publish_path(),
        )))
    }

    fn dead_letter_destination(&self, destination: &str, group: &str) -> String {
        dead_letter_name(destination, group)
    }

    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        Ok(Arc::new(DeadLetterQueue::new(
            Arc::new(MemoryDeadLetterLog::new(self.shared.clone())),
            self.confirmed_publisher(),
        )))
    }
}
