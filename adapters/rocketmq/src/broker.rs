//! The broker object: `impl Broker` for RocketMQ.

use std::sync::Arc;

use async_trait::async_trait;
use surety_core::raw::DeadLetterQueue;
use surety_core::{
    Broker, Capabilities, Capability, CheckBack, DeadLetters, Publisher, Result, Subscriber,
    Topology, TransactionalPublisher,
};

use crate::ADAPTER;
use crate::codec::{self, DLQ_PREFIX, RETRY_PREFIX};
use crate::config::RocketMqConfig;
use crate::consumer::RocketMqSubscriber;
use crate::dead_letters::RocketMqDeadLetterLog;
use crate::publisher::RocketMqPublisher;
use crate::shared::{self, Shared};
use crate::transaction::RocketMqTransactionalPublisher;

/// Apache RocketMQ through `rocketmq-client-rust` (remoting protocol: name server and
/// broker, no proxy). See the crate documentation for what maps to what.
#[derive(Clone)]
pub struct RocketMqBroker {
    pub(crate) shared: Arc<Shared>,
    publisher: Arc<RocketMqPublisher>,
}

impl RocketMqBroker {
    /// Connects to the name server of `config`: starts the client runtime, the admin
    /// client and the shared producer, and checks that a master broker is registered.
    ///
    /// The future is boxed: the client's futures are deep enough to exceed the default
    /// recursion limit of a crate that awaits them unboxed.
    pub async fn connect(config: RocketMqConfig) -> Result<RocketMqBroker> {
        let boxed: futures::future::BoxFuture<'static, Result<RocketMqBroker>> =
            Box::pin(Self::connect_inner(config));
        boxed.await
    }

    async fn connect_inner(config: RocketMqConfig) -> Result<RocketMqBroker> {
        let shared = Box::pin(Shared::connect(config)).await?;
        let publisher = Arc::new(Box::pin(RocketMqPublisher::start(shared.clone())).await?);
        Ok(RocketMqBroker { shared, publisher })
    }

    /// The shared confirmed publisher, with the RocketMQ-specific modes (async callback).
    pub fn rocketmq_publisher(&self) -> Arc<RocketMqPublisher> {
        self.publisher.clone()
    }

    /// The RocketMQ consumer group of Surety group `group` on `destination`:
    /// `<group>|<destination>`. Its retries are in `%RETRY%<that>`, its dead letters in
    /// `%DLQ%<that>`.
    pub fn consumer_group(group: &str, destination: &str) -> Result<String> {
        codec::consumer_group(group, destination)
    }

    /// The consumer group whose consume offsets on the dead-letter topic of `group` on
    /// `destination` mark what was re-driven: `<group>|<destination>-surety-redrive`.
    pub fn redrive_cursor_group(group: &str, destination: &str) -> Result<String> {
        Ok(shared::redrive_cursor_group(&codec::consumer_group(
            group,
            destination,
        )?))
    }

    /// The permission bits (`PermName`: 2 write, 4 read) of `topic` on its brokers, as
    /// the name server routes it; `None` if it has no route.
    pub async fn topic_permissions(&self, topic: &str) -> Result<Option<Vec<u32>>> {
        Ok(self
            .shared
            .route_of(topic)
            .await?
            .map(|r| r.iter().map(|q| q.perm).collect()))
    }
}

#[async_trait]
impl Broker for RocketMqBroker {
    fn name(&self) -> &'static str {
        ADAPTER
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.capabilities()
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        // Bad names are the caller's error, not a broker outage: refuse them before the
        // admin call (the broker answers an empty topic with a generic header error).
        codec::validate_topic(&topology.destination)?;
        let groups = topology
            .groups
            .iter()
            .map(|g| codec::consumer_group(g, &topology.destination))
            .collect::<Result<Vec<_>>>()?;
        let shared = &self.shared;
        let queues = shared.config.queues;
        shared.create_topic(&topology.destination, queues).await?;
        for group in &groups {
            // Created here (not left to the broker) so that they exist before the first
            // consumer runs and can be read by other groups.
            shared
                .create_topic(&format!("{RETRY_PREFIX}{group}"), 1)
                .await?;
            if topology.dead_letter {
                shared
                    .create_topic(&format!("{DLQ_PREFIX}{group}"), 1)
                    .await?;
            }
        }
        Ok(())
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(self.publisher.clone())
    }

    async fn transactional_publisher(
        &self,
        producer_group: &str,
        check_back: Arc<dyn CheckBack>,
    ) -> Result<Arc<dyn TransactionalPublisher>> {
        self.capabilities()
            .require(ADAPTER, Capability::HalfMessages)?;
        let p = RocketMqTransactionalPublisher::start(
            self.shared.clone(),
            self.publisher.clone(),
            producer_group,
            check_back,
        )
        .await?;
        Ok(Arc::new(p))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(RocketMqSubscriber::new(
            self.shared.clone(),
            self.publisher.clone(),
        )))
    }

    /// RocketMQ's convention, `%DLQ%<consumer group>`, where the consumer group is
    /// `<group>|<destination>` ([`RocketMqBroker::consumer_group`]).
    fn dead_letter_destination(&self, destination: &str, group: &str) -> String {
        format!(
            "{DLQ_PREFIX}{}",
            codec::consumer_group_name(group, destination)
        )
    }

    /// `%DLQ%<group>|<destination>` with a re-drive cursor kept as the consume offsets of
    /// the group `<group>|<destination>-surety-redrive` (a queue cannot delete): see
    /// [`RocketMqBroker::redrive_cursor_group`].
    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        Ok(Arc::new(DeadLetterQueue::new(
            Arc::new(RocketMqDeadLetterLog::new(self.shared.clone())),
            self.publisher.clone(),
        )))
    }
}
