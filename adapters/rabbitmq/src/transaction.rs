//! Broker-native transactions: `tx.select`, `tx.commit`, `tx.rollback` on a channel of
//! their own (a channel cannot be in confirm and tx mode at once).

use std::sync::Arc;

use async_trait::async_trait;
use lapin::Channel;
use lapin::options::BasicPublishOptions;
use surety_core::{BrokerTransaction, Error, ErrorKind, Message, Result};

use crate::ADAPTER;
use crate::codec;
use crate::error;
use crate::shared::Connector;

pub(crate) struct RabbitTransaction {
    channel: Channel,
    connector: Arc<Connector>,
}

impl RabbitTransaction {
    pub(crate) async fn begin(connector: Arc<Connector>) -> Result<Self> {
        let channel = connector.channel().await?;
        channel
            .tx_select()
            .await
            .map_err(|e| error::unavailable("start a transaction", e))?;
        Ok(RabbitTransaction { channel, connector })
    }
}

#[async_trait]
impl BrokerTransaction for RabbitTransaction {
    async fn publish(&mut self, message: &Message) -> Result<()> {
        let config = self.connector.config();
        message.validate(Some(config.max_message_size))?;
        crate::topology::check_destination(message.destination())
            .map_err(|e| Error::invalid(e.message().to_owned()))?;
        self.channel
            .basic_publish(
                config.router_exchange.as_str().into(),
                message.destination().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                message.payload(),
                codec::encode(message),
            )
            .await
            .map(drop)
            .map_err(|e| error::unavailable("publish in a transaction", e))
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.channel
            .tx_commit()
            .await
            .map_err(|e| error::outcome_unknown("a transaction commit", e))?;
        // Returns of unroutable mandatory messages arrive before commit-ok.
        let returned = self.channel.wait_for_confirms().await.unwrap_or_default();
        let _ = self.channel.close(200, "OK".into()).await;
        if returned.is_empty() {
            Ok(())
        } else {
            let ids: Vec<String> = returned
                .iter()
                .filter_map(|r| r.delivery.properties.message_id().as_ref())
                .map(|s| s.as_str().to_owned())
                .collect();
            Err(Error::new(
                ErrorKind::Unroutable,
                format!(
                    "{} message(s) of the committed transaction had no queue and were returned: {}",
                    returned.len(),
                    ids.join(", ")
                ),
            )
            .with_context("adapter", ADAPTER))
        }
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        let result = self
            .channel
            .tx_rollback()
            .await
            .map_err(|e| error::unavailable("roll back a transaction", e));
        // Closing the channel discards uncommitted publishes in any case.
        let _ = self.channel.close(200, "OK".into()).await;
        result
    }
}
