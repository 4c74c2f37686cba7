//! The broker object: `impl Broker` for Kafka, and the naming of its topics.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::producer::Producer;
use surety_core::raw::{DeadLetterQueue, Publish};
use surety_core::{
    Broker, BrokerTransaction, Capabilities, DeadLetters, Error, ErrorKind, Publisher, Result,
    Subscriber, Topology,
};

use crate::ADAPTER;
use crate::config::KafkaConfig;
use crate::consumer::KafkaSubscriber;
use crate::dead_letters::KafkaDeadLetterLog;
use crate::publisher::KafkaSender;
use crate::shared::{self, Inner, blocking};
use crate::transaction::KafkaTransaction;

/// The Kafka adapter. Cheap to clone: clones share the producer and the topic cache.
///
/// See the crate documentation for what maps to what.
#[derive(Clone)]
pub struct KafkaBroker {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl KafkaBroker {
    /// Connects to the cluster in `config` and checks that it answers.
    ///
    /// Fails with [`ErrorKind::Unavailable`] when no broker answers within the request
    /// timeout, and [`ErrorKind::Configuration`] for an invalid setting.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let (inner, producer) = Inner::new(config)?;
        let timeout = inner.config.request_timeout.min(Duration::from_secs(15));
        let servers = inner.config.bootstrap_servers.clone();
        blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Unavailable,
                        format!("no Kafka broker answered at {servers} within {timeout:?}"),
                    )
                    .with_context("adapter", ADAPTER)
                    .with_source(e)
                })
        })
        .await?;
        Ok(KafkaBroker { inner })
    }

    /// Connects with [`KafkaConfig::from_env`].
    pub async fn from_env() -> Result<Self> {
        KafkaBroker::connect(KafkaConfig::from_env()).await
    }

    /// The settings in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The retry topic of `group` on `topic`: `<topic>.<group>.retry`.
    pub fn retry_topic(topic: &str, group: &str) -> String {
        shared::retry_topic(topic, group)
    }

    /// The dead-letter topic of `group` on `topic`: `<topic>.<group>.dlq`.
    pub fn dead_letter_topic(topic: &str, group: &str) -> String {
        shared::dead_letter_topic(topic, group)
    }

    /// The consumer group whose committed offsets on `<topic>.<group>.dlq` mark what was
    /// re-driven: `<group>.surety-redrive`.
    pub fn redrive_cursor_group(group: &str) -> String {
        shared::redrive_cursor_group(group)
    }

    /// Creates `topics` (idempotent) and waits until the cluster's metadata shows them.
    pub async fn create_topics(&self, topics: &[String]) -> Result<()> {
        self.inner.create_topics(topics).await
    }

    fn confirmed_publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(Publish::new(
            self.inner.publish_path(),
            KafkaSender::new(self.inner.clone()),
        ))
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn name(&self) -> &'static str {
        ADAPTER
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    /// Creates the topic, each group's retry topic and (when asked) each group's
    /// dead-letter topic with the admin client. Existing topics are fine.
    async fn declare(&self, topology: &Topology) -> Result<()> {
        let mut names = vec![topology.destination.clone()];
        for group in &topology.groups {
            names.push(KafkaBroker::retry_topic(&topology.destination, group));
            if topology.dead_letter {
                names.push(KafkaBroker::dead_letter_topic(&topology.destination, group));
            }
        }
        self.inner.create_topics(&names).await
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(self.confirmed_publisher())
    }

    async fn begin_transaction(&self) -> Result<Box<dyn BrokerTransaction>> {
        Ok(Box::new(KafkaTransaction::begin(self.inner.clone()).await?))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(KafkaSubscriber::new(self.inner.clone())))
    }

    fn dead_letter_destination(&self, destination: &str, group: &str) -> String {
        KafkaBroker::dead_letter_topic(destination, group)
    }

    /// The group's dead-letter topic, with a re-drive cursor kept as the committed
    /// offsets of the group `<group>.surety-redrive` (a log cannot delete): see
    /// [`KafkaBroker::redrive_cursor_group`].
    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        Ok(Arc::new(DeadLetterQueue::new(
            Arc::new(KafkaDeadLetterLog::new(self.inner.clone())),
            self.confirmed_publisher(),
        )))
    }
}
