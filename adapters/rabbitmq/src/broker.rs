//! The broker object: topology, publishers, subscribers, transactions.

use std::sync::Arc;

use async_trait::async_trait;
use surety_core::raw::{DeadLetterQueue, Publish};
use surety_core::{
    Broker, BrokerTransaction, Capabilities, DeadLetters, Publisher, Result, Subscriber, Topology,
};

use crate::ADAPTER;
use crate::config::RabbitConfig;
use crate::consumer::RabbitSubscriber;
use crate::dead_letters::RabbitDeadLetterLog;
use crate::publisher::RabbitSender;
use crate::shared::Connector;
use crate::topology::{self, DEAD_LETTER_GROUP, Declarer};
use crate::transaction::RabbitTransaction;

/// RabbitMQ through lapin. Cheap to clone: clones share one connection supervisor.
#[derive(Clone)]
pub struct RabbitBroker {
    connector: Arc<Connector>,
}

impl RabbitBroker {
    /// Connects to the broker of `config` (failing fast if it does not answer) and
    /// declares the router exchange.
    pub async fn connect(config: RabbitConfig) -> Result<Self> {
        let connector = Arc::new(Connector::new(Arc::new(config))?);
        let channel = connector.channel().await?;
        Declarer {
            channel: &channel,
            config: connector.config(),
        }
        .router()
        .await?;
        let _ = channel.close(200, "OK".into()).await;
        Ok(RabbitBroker { connector })
    }

    /// The settings in use.
    pub fn config(&self) -> &RabbitConfig {
        self.connector.config()
    }

    fn confirmed_publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(Publish::new(
            self.connector.publish_path(),
            RabbitSender::new(self.connector.clone()),
        ))
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn name(&self) -> &'static str {
        ADAPTER
    }

    fn capabilities(&self) -> Capabilities {
        self.connector.capabilities()
    }

    async fn declare(&self, t: &Topology) -> Result<()> {
        topology::check_destination(&t.destination)?;
        for group in &t.groups {
            topology::validate_group(group)?;
        }
        // A refused declaration closes its channel: one channel for this call only.
        let channel = self.connector.channel().await?;
        let d = Declarer {
            channel: &channel,
            config: self.connector.config(),
        };
        let result = async {
            d.router().await?;
            d.destination(&t.destination).await?;
            for group in &t.groups {
                d.bound_queue(
                    &t.destination,
                    &topology::group_queue(&t.destination, group),
                )
                .await?;
                if t.dead_letter {
                    // The dead-letter destination, with the queue of the group
                    // `dead-letters` so that dead letters are kept before anyone reads
                    // them; subscribing with that group reads them all.
                    let dl = topology::dead_letter_name(&t.destination, group);
                    d.destination(&dl).await?;
                    d.bound_queue(&dl, &topology::group_queue(&dl, DEAD_LETTER_GROUP))
                        .await?;
                }
            }
            Ok(())
        }
        .await;
        let _ = channel.close(200, "OK".into()).await;
        result
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(self.confirmed_publisher())
    }

    async fn begin_transaction(&self) -> Result<Box<dyn BrokerTransaction>> {
        Ok(Box::new(
            RabbitTransaction::begin(self.connector.clone()).await?,
        ))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(RabbitSubscriber::new(self.connector.clone())))
    }

    fn dead_letter_destination(&self, destination: &str, group: &str) -> String {
        topology::dead_letter_name(destination, group)
    }

    /// The group's dead-letter queue, read with `basic.get` and manual acks (see the
    /// crate docs for what a listing does to the queue).
    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        Ok(Arc::new(DeadLetterQueue::new(
            Arc::new(RabbitDeadLetterLog::new(self.connector.clone())),
            self.confirmed_publisher(),
        )))
    }
}
