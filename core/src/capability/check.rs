//! The always-on capability layer: a [`Broker`] wrapper that refuses a call needing a
//! capability the adapter does not declare, before the adapter sees it.
//!
//! Gates, each an [`crate::ErrorKind::Unsupported`] error naming adapter and capability:
//!
//! | call | needs |
//! |---|---|
//! | `Publisher::publish_oneway` (on every publisher the broker hands out) | [`Capability::OnewayPublish`] |
//! | `Broker::transactional_publisher` | [`Capability::HalfMessages`] |
//! | `Broker::begin_transaction` | [`Capability::BrokerTransactions`] |
//! | `Subscriber::subscribe` of an `ordered` subscription | [`Capability::OrderingPerKey`] |
//! | `Subscriber::subscribe` naming a dead-letter destination, `Broker::dead_letters` | [`Capability::DeadLetter`] |
//!
//! The capabilities are read on every call, so a decorator that adds one (the SQL
//! prepared-message store adds half messages) is seen as long as it sits inside the layer.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Capabilities, Capability};
use crate::broker::{Broker, Topology};
use crate::consume::{Handler, Subscriber, Subscription, SubscriptionHandle};
use crate::dead_letter::DeadLetters;
use crate::error::Result;
use crate::message::Message;
use crate::publish::{Publisher, Receipt};
use crate::transaction::{
    BrokerTransaction, CheckBack, LocalTransaction, TransactionalPublisher, TxOutcome,
};

/// A broker whose unsupported calls fail in one place, before they reach the adapter.
///
/// ```
/// # use std::sync::Arc;
/// # fn wrap(adapter: Arc<dyn surety_core::Broker>) -> Arc<dyn surety_core::Broker> {
/// surety_core::CapabilityCheck::wrap(adapter)
/// # }
/// ```
pub struct CapabilityCheck {
    inner: Arc<dyn Broker>,
}

impl CapabilityCheck {
    /// `inner` behind the capability gates.
    pub fn wrap(inner: Arc<dyn Broker>) -> Arc<dyn Broker> {
        Arc::new(CapabilityCheck { inner })
    }

    fn require(&self, capability: Capability) -> Result<Capabilities> {
        let capabilities = self.inner.capabilities();
        capabilities.require(self.inner.name(), capability)?;
        Ok(capabilities)
    }
}

#[async_trait]
impl Broker for CapabilityCheck {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        self.inner.declare(topology).await
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(CheckedPublisher {
            inner: self.inner.publisher().await?,
            adapter: self.inner.name(),
            capabilities: self.inner.capabilities(),
        }))
    }

    async fn transactional_publisher(
        &self,
        producer_group: &str,
        check_back: Arc<dyn CheckBack>,
    ) -> Result<Arc<dyn TransactionalPublisher>> {
        let capabilities = self.require(Capability::HalfMessages)?;
        let inner = self
            .inner
            .transactional_publisher(producer_group, check_back)
            .await?;
        Ok(Arc::new(CheckedTransactionalPublisher {
            inner,
            adapter: self.inner.name(),
            capabilities,
        }))
    }

    async fn begin_transaction(&self) -> Result<Box<dyn BrokerTransaction>> {
        self.require(Capability::BrokerTransactions)?;
        self.inner.begin_transaction().await
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(CheckedSubscriber {
            inner: self.inner.subscriber().await?,
            adapter: self.inner.name(),
            capabilities: self.inner.capabilities(),
        }))
    }

    fn dead_letter_destination(&self, destination: &str, group: &str) -> String {
        self.inner.dead_letter_destination(destination, group)
    }

    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        self.require(Capability::DeadLetter)?;
        self.inner.dead_letters().await
    }
}

struct CheckedPublisher {
    inner: Arc<dyn Publisher>,
    adapter: &'static str,
    capabilities: Capabilities,
}

#[async_trait]
impl Publisher for CheckedPublisher {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.inner.publish(message).await
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<Result<Receipt>> {
        self.inner.publish_batch(messages).await
    }

    async fn publish_oneway(&self, message: &Message) -> Result<()> {
        self.capabilities
            .require(self.adapter, Capability::OnewayPublish)?;
        self.inner.publish_oneway(message).await
    }
}

struct CheckedTransactionalPublisher {
    inner: Arc<dyn TransactionalPublisher>,
    adapter: &'static str,
    capabilities: Capabilities,
}

#[async_trait]
impl Publisher for CheckedTransactionalPublisher {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.inner.publish(message).await
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<Result<Receipt>> {
        self.inner.publish_batch(messages).await
    }

    async fn publish_oneway(&self, message: &Message) -> Result<()> {
        self.capabilities
            .require(self.adapter, Capability::OnewayPublish)?;
        self.inner.publish_oneway(message).await
    }
}

#[async_trait]
impl TransactionalPublisher for CheckedTransactionalPublisher {
    async fn send_in_transaction(
        &self,
        message: &Message,
        local: LocalTransaction<'_>,
    ) -> Result<TxOutcome> {
        self.inner.send_in_transaction(message, local).await
    }
}

struct CheckedSubscriber {
    inner: Arc<dyn Subscriber>,
    adapter: &'static str,
    capabilities: Capabilities,
}

#[async_trait]
impl Subscriber for CheckedSubscriber {
    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Result<SubscriptionHandle> {
        if subscription.ordered {
            self.capabilities
                .require(self.adapter, Capability::OrderingPerKey)?;
        }
        if subscription.dead_letter.is_some() {
            self.capabilities
                .require(self.adapter, Capability::DeadLetter)?;
        }
        self.inner.subscribe(subscription, handler).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::consume::{Delivery, HandlerError, Outcome};
    use crate::error::ErrorKind;
    use crate::transaction::TxState;

    /// A broker that declares `capabilities` and records every call that reaches it.
    struct Mock {
        capabilities: Capabilities,
        reached: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Mock {
        fn reached(&self, call: &'static str) {
            self.reached.lock().unwrap().push(call);
        }
    }

    struct MockPublisher(Arc<Mutex<Vec<&'static str>>>);

    #[async_trait]
    impl Publisher for MockPublisher {
        async fn publish(&self, message: &Message) -> Result<Receipt> {
            self.0.lock().unwrap().push("publish");
            Ok(Receipt::for_message(message))
        }

        async fn publish_oneway(&self, _: &Message) -> Result<()> {
            self.0.lock().unwrap().push("publish_oneway");
            Ok(())
        }
    }

    #[async_trait]
    impl TransactionalPublisher for MockPublisher {
        async fn send_in_transaction(
            &self,
            _: &Message,
            _: LocalTransaction<'_>,
        ) -> Result<TxOutcome> {
            self.0.lock().unwrap().push("send_in_transaction");
            Ok(TxOutcome::RolledBack)
        }
    }

    struct MockTransaction;

    #[async_trait]
    impl BrokerTransaction for MockTransaction {
        async fn publish(&mut self, _: &Message) -> Result<()> {
            Ok(())
        }
        async fn commit(self: Box<Self>) -> Result<()> {
            Ok(())
        }
        async fn abort(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    struct MockSubscriber(Arc<Mutex<Vec<&'static str>>>);

    #[async_trait]
    impl Subscriber for MockSubscriber {
        async fn subscribe(
            &self,
            _: Subscription,
            _: Arc<dyn Handler>,
        ) -> Result<SubscriptionHandle> {
            self.0.lock().unwrap().push("subscribe");
            let (stop, _) = SubscriptionHandle::stop_signal();
            Ok(SubscriptionHandle::new(stop, Vec::new()))
        }
    }

    struct MockDeadLetters;

    #[async_trait]
    impl DeadLetters for MockDeadLetters {
        async fn list(&self, _: &str, _: &str, _: usize) -> Result<Vec<crate::DeadLetter>> {
            Ok(Vec::new())
        }
        async fn redrive(
            &self,
            _: &str,
            _: &str,
            _: &crate::RedriveSelection,
        ) -> Result<crate::RedriveReport> {
            Ok(crate::RedriveReport::default())
        }
    }

    #[async_trait]
    impl Broker for Mock {
        fn name(&self) -> &'static str {
            "mock"
        }
        fn capabilities(&self) -> Capabilities {
            self.capabilities.clone()
        }
        async fn declare(&self, _: &Topology) -> Result<()> {
            Ok(())
        }
        async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
            Ok(Arc::new(MockPublisher(self.reached.clone())))
        }
        // Deliberately answers every call, as a buggy adapter would: only the layer may
        // refuse.
        async fn transactional_publisher(
            &self,
            _: &str,
            _: Arc<dyn CheckBack>,
        ) -> Result<Arc<dyn TransactionalPublisher>> {
            self.reached("transactional_publisher");
            Ok(Arc::new(MockPublisher(self.reached.clone())))
        }
        async fn begin_transaction(&self) -> Result<Box<dyn BrokerTransaction>> {
            self.reached("begin_transaction");
            Ok(Box::new(MockTransaction))
        }
        async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
            Ok(Arc::new(MockSubscriber(self.reached.clone())))
        }
        fn dead_letter_destination(&self, destination: &str, group: &str) -> String {
            format!("{destination}.{group}.dlq")
        }
        async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
            self.reached("dead_letters");
            Ok(Arc::new(MockDeadLetters))
        }
    }

    struct Ignore;

    #[async_trait]
    impl Handler for Ignore {
        async fn handle(&self, _: &Delivery) -> std::result::Result<Outcome, HandlerError> {
            Ok(Outcome::Ack)
        }
    }

    struct Never;

    #[async_trait]
    impl CheckBack for Never {
        async fn check(&self, _: &Message) -> TxState {
            TxState::Unknown
        }
    }

    /// Runs every gated call on a broker with `capabilities`; returns the calls that
    /// reached it and the capabilities named by the refusals.
    async fn exercise(capabilities: Capabilities) -> (Vec<&'static str>, Vec<String>) {
        let reached = Arc::new(Mutex::new(Vec::new()));
        let broker = CapabilityCheck::wrap(Arc::new(Mock {
            capabilities,
            reached: reached.clone(),
        }));
        let message = Message::new("d", "x");
        let mut refused = Vec::new();
        let mut note = |result: Result<()>| {
            if let Err(e) = result {
                assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
                assert!(!e.is_retryable(), "{e}");
                assert_eq!(e.context_value("adapter"), Some("mock"), "{e}");
                refused.push(e.context_value("operation").unwrap_or_default().to_owned());
            }
        };
        let publisher = broker.publisher().await.unwrap();
        publisher.publish(&message).await.unwrap();
        note(publisher.publish_oneway(&message).await);
        let tx = match broker.transactional_publisher("p", Arc::new(Never)).await {
            Ok(tx) => Some(tx),
            Err(e) => {
                note(Err(e));
                None
            }
        };
        if let Some(tx) = tx {
            note(tx.publish_oneway(&message).await);
            tx.send_in_transaction(&message, Box::pin(async { TxState::Rollback }))
                .await
                .unwrap();
        }
        note(broker.begin_transaction().await.map(|_| ()));
        let subscriber = broker.subscriber().await.unwrap();
        let plain = Subscription::new("d", "g");
        subscriber
            .subscribe(plain.clone(), Arc::new(Ignore))
            .await
            .unwrap();
        note(
            subscriber
                .subscribe(plain.clone().ordered(true), Arc::new(Ignore))
                .await
                .map(|_| ()),
        );
        note(
            subscriber
                .subscribe(plain.dead_letter_to("elsewhere"), Arc::new(Ignore))
                .await
                .map(|_| ()),
        );
        note(broker.dead_letters().await.map(|_| ()));
        let reached = reached.lock().unwrap().clone();
        (reached, refused)
    }

    #[tokio::test]
    async fn every_gate_refuses_before_the_adapter_is_reached() {
        let (reached, refused) = exercise(Capabilities::none()).await;
        assert_eq!(reached, vec!["publish", "subscribe"]);
        assert_eq!(
            refused,
            vec![
                "oneway publish",
                "half messages",
                "broker transactions",
                "ordering per key",
                "dead letter",
                "dead letter",
            ]
        );
    }

    #[tokio::test]
    async fn declared_capabilities_pass_through() {
        let all = Capabilities::none()
            .with(Capability::OnewayPublish)
            .with(Capability::HalfMessages)
            .with(Capability::BrokerTransactions)
            .with(Capability::OrderingPerKey)
            .with(Capability::DeadLetter);
        let (reached, refused) = exercise(all).await;
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(
            reached,
            vec![
                "publish",
                "publish_oneway",
                "transactional_publisher",
                "publish_oneway",
                "send_in_transaction",
                "begin_transaction",
                "subscribe",
                "subscribe",
                "subscribe",
                "dead_letters",
            ]
        );
    }
}
