//! A broker wrapper that gives any broker the half-message contract through this store.

use std::sync::Arc;

use async_trait::async_trait;
use surety_core::{
    Broker, BrokerTransaction, Capabilities, Capability, CheckBack, DeadLetters, Publisher, Result,
    Subscriber, Topology, TransactionalPublisher,
};

use crate::prepared::{CheckerConfig, SqlTransactionalPublisher};
use crate::relay::RelayConfig;
use crate::store::SqlStore;

/// Wraps a broker without native half messages (RabbitMQ, Kafka) so that
/// [`Broker::transactional_publisher`] returns a [`SqlTransactionalPublisher`] over the
/// broker's publisher and this store, with its checker and relay running until the
/// publisher is dropped. Everything else is the inner broker's.
///
/// Every transactional publisher runs a relay of its own: on SQLite keep to one
/// transactional publisher per database file.
#[derive(Clone)]
pub struct WithSqlHalfMessages {
    inner: Arc<dyn Broker>,
    store: SqlStore,
    checker: CheckerConfig,
    relay: RelayConfig,
}

impl std::fmt::Debug for WithSqlHalfMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithSqlHalfMessages")
            .field("inner", &self.inner.name())
            .field("store", &self.store)
            .finish()
    }
}

impl WithSqlHalfMessages {
    /// Wraps `inner`. Migrate `store` first.
    pub fn new(
        inner: Arc<dyn Broker>,
        store: SqlStore,
        checker: CheckerConfig,
        relay: RelayConfig,
    ) -> Self {
        WithSqlHalfMessages {
            inner,
            store,
            checker,
            relay,
        }
    }

    /// The store.
    pub fn store(&self) -> &SqlStore {
        &self.store
    }
}

#[async_trait]
impl Broker for WithSqlHalfMessages {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities().with(Capability::HalfMessages)
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        self.inner.declare(topology).await
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        self.inner.publisher().await
    }

    async fn transactional_publisher(
        &self,
        producer_group: &str,
        check_back: Arc<dyn CheckBack>,
    ) -> Result<Arc<dyn TransactionalPublisher>> {
        let publisher = SqlTransactionalPublisher::new(
            self.store.clone(),
            self.inner.publisher().await?,
            producer_group,
            check_back,
            self.checker.clone(),
            RelayConfig {
                // Each publisher is its own lease owner.
                owner: None,
                ..self.relay.clone()
            },
        )?;
        publisher.start();
        Ok(Arc::new(publisher))
    }

    async fn begin_transaction(&self) -> Result<Box<dyn BrokerTransaction>> {
        self.inner.begin_transaction().await
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        self.inner.subscriber().await
    }

    fn dead_letter_destination(&self, destination: &str, group: &str) -> String {
        self.inner.dead_letter_destination(destination, group)
    }

    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        self.inner.dead_letters().await
    }
}
