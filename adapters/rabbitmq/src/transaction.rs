//! Broker-native transactions: `tx.select`, `tx.commit`, `tx.rollback` on a channel of
//! their own (a channel cannot be in confirm and tx mode at once).
//!
//! What a commit makes visible. RabbitMQ routes a transaction's messages at `tx.commit`
//! and returns the unroutable ones (they are mandatory) before `commit-ok`: nothing can
//! hold the routable ones back by then. So an unroutable message is refused where it can
//! be known beforehand, and reported exactly where it cannot:
//! - a message for a destination nobody declared (no exchange) is refused by `publish`
//!   with `Unroutable`, before it joins the transaction (a passive declaration on a
//!   channel of its own, once per destination and transaction); the transaction goes on
//!   and the caller may still commit or abort it;
//! - a message for a declared destination without any queue is returned at commit: the
//!   commit is an `Unroutable` error naming the returned ids and saying that the other
//!   messages of the transaction *were* committed.
//!
//! A failure to read the returns after `commit-ok` is an `OutcomeUnknown` error (the
//! transaction committed; whether a message was returned is not known), never success.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use surety_core::{BrokerTransaction, Error, ErrorKind, Message, Result};

use crate::ADAPTER;
use crate::codec;
use crate::error;
use crate::shared::Connector;

pub(crate) struct RabbitTransaction {
    channel: Channel,
    connector: Arc<Connector>,
    /// Destinations whose exchange was found in this transaction.
    declared: HashSet<String>,
    /// Messages published into the transaction.
    published: usize,
}

impl RabbitTransaction {
    pub(crate) async fn begin(connector: Arc<Connector>) -> Result<Self> {
        let channel = connector.channel().await?;
        channel
            .tx_select()
            .await
            .map_err(|e| error::unavailable("start a transaction", e))?;
        Ok(RabbitTransaction {
            channel,
            connector,
            declared: HashSet::new(),
            published: 0,
        })
    }

    /// Refuses a destination whose exchange does not exist, before its message joins the
    /// transaction. A passive declaration that fails closes its channel, so it runs on
    /// one of its own.
    async fn check_declared(&mut self, destination: &str) -> Result<()> {
        if self.declared.contains(destination) {
            return Ok(());
        }
        let channel = self.connector.channel().await?;
        let found = channel
            .exchange_declare(
                destination.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "OK".into()).await;
        match found {
            Ok(()) => {
                self.declared.insert(destination.to_owned());
                Ok(())
            }
            Err(e) if error::is_not_found(&e) => Err(Error::new(
                ErrorKind::Unroutable,
                format!(
                    "destination {destination:?} is not declared: the message was not added to the transaction"
                ),
            )
            .with_context("adapter", ADAPTER)
            .with_context("destination", destination)),
            Err(e) => Err(error::unavailable("check a transaction's destination", e)),
        }
    }
}

#[async_trait]
impl BrokerTransaction for RabbitTransaction {
    async fn publish(&mut self, message: &Message) -> Result<()> {
        message.validate(Some(self.connector.config().max_message_size))?;
        crate::topology::check_destination(message.destination())
            .map_err(|e| Error::invalid(e.message().to_owned()))?;
        self.check_declared(message.destination())
            .await
            .map_err(|e| e.with_context("message_id", message.id().as_str()))?;
        let config = self.connector.config();
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
            .map_err(|e| error::unavailable("publish in a transaction", e))?;
        self.published += 1;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.channel
            .tx_commit()
            .await
            .map_err(|e| error::outcome_unknown("a transaction commit", e))?;
        // Returns of unroutable mandatory messages arrive before commit-ok.
        let returned = self.channel.wait_for_confirms().await;
        let _ = self.channel.close(200, "OK".into()).await;
        let returned = returned.map_err(|e| {
            error::outcome_unknown(
                "a committed transaction's routing (whether a message was returned as unroutable)",
                e,
            )
        })?;
        if returned.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = returned
            .iter()
            .filter_map(|r| r.delivery.properties.message_id().as_ref())
            .map(|s| s.as_str().to_owned())
            .collect();
        let committed = self.published.saturating_sub(returned.len());
        Err(Error::new(
            ErrorKind::Unroutable,
            format!(
                "{} message(s) of the transaction had no queue and were returned, not delivered: {}; the other {committed} were committed",
                returned.len(),
                ids.join(", "),
            ),
        )
        .with_context("adapter", ADAPTER)
        .with_context("committed", committed.to_string()))
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
