//! A broker wrapper that gives any broker the half-message contract through this store.

use std::sync::Arc;

use async_trait::async_trait;
use surety_core::{
    Broker, BrokerTransaction, Capabilities, Capability, CheckBack, DeadLetters, Publisher, Result,
    Subscriber, Topology, TransactionalPublisher,
};

use crate::backend::Backend;
use crate::checker::CheckerConfig;
use crate::relay::RelayConfig;
use crate::store::SqlStore;
use crate::transactional::SqlTransactionalPublisher;

/// Wraps a broker without native half messages (RabbitMQ, Kafka) so that
/// [`Broker::transactional_publisher`] returns a [`SqlTransactionalPublisher`] over the
/// broker's publisher and this store, with its checker and relay running until the
/// publisher is dropped. Everything else is the inner broker's.
///
/// Every transactional publisher runs a relay of its own: on SQLite keep to one
/// transactional publisher per database file.
pub struct WithSqlHalfMessages<DB: Backend> {
    inner: Arc<dyn Broker>,
    store: SqlStore<DB>,
    checker: CheckerConfig,
    relay: RelayConfig,
}

impl<DB: Backend> Clone for WithSqlHalfMessages<DB> {
    fn clone(&self) -> Self {
        WithSqlHalfMessages {
            inner: self.inner.clone(),
            store: self.store.clone(),
            checker: self.checker.clone(),
            relay: self.relay.clone(),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for WithSqlHalfMessages<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithSqlHalfMessages")
            .field("inner", &self.inner.name())
            .field("store", &self.store)
            .finish()
    }
}

impl<DB: Backend> WithSqlHalfMessages<DB> {
    /// Wraps `inner`. Migrate `store` first.
    pub fn new(
        inner: Arc<dyn Broker>,
        store: SqlStore<DB>,
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
    pub fn store(&self) -> &SqlStore<DB> {
        &self.store
    }
}

#[async_trait]
impl<DB: Backend> Broker for WithSqlHalfMessages<DB> {
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
